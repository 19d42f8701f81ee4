"""``ddpmseg demo``: the whole pipeline offline, on things the project makes itself.

A tiny ADM with the ffhq_256 block structure (64x64, 32 base channels, random
weights) is saved as a checkpoint, a few synthetic labelled images are drawn,
and extract -> fit -> predict -> evaluate -> kmeans run on them. Random weights
carry no learned semantics: the demo proves the machinery, not the quality
(for that, use a real checkpoint: docs/method.md).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ddpmseg._io import save_npy_atomic
from ddpmseg.backbones import AdmConfig
from ddpmseg.backbones.adm import random_unet
from ddpmseg.data import LabelSet
from ddpmseg.errors import DdpmsegError
from ddpmseg.records import ExtractConfig
from ddpmseg.viz import save_png_atomic

# Same structure as ffhq_256 (6 levels, 2 res blocks, resblock up/down,
# scale-shift norm, attention at 32/16/8 in ffhq's ds terms), 64x64 and narrow.
TINY_FLAGS = {
    "image_size": 64,
    "num_channels": 32,
    "num_res_blocks": 2,
    "channel_mult": "1,1,2,2,4,4",
    "num_head_channels": 32,
    "attention_resolutions": "32,16,8",
    "learn_sigma": True,
    "resblock_updown": True,
    "use_scale_shift_norm": True,
}


def make_tiny_checkpoint(directory: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """Save a random tiny ADM as ``tiny_adm.pt`` plus its ``tiny_adm.json`` flags."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    ckpt, flags = directory / "tiny_adm.pt", directory / "tiny_adm.json"
    torch.save(random_unet(AdmConfig.from_flags(TINY_FLAGS), seed).state_dict(), ckpt)
    flags.write_text(json.dumps(TINY_FLAGS, indent=2) + "\n")
    return ckpt, flags


SYNTHETIC_LABELSET = LabelSet(
    "synthetic_shapes",
    ("background", "disc", "square"),
    ((40, 40, 40), (230, 60, 60), (60, 110, 230)),
)


def _synthetic_one(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    # background: greenish-grey with random stripes and noise
    base = rng.uniform(70, 150, 3) * np.array([0.8, 1.0, 0.8])
    ang, freq, phase = rng.uniform(0, np.pi), rng.uniform(0.15, 0.5), rng.uniform(0, 2 * np.pi)
    stripes = np.sin(freq * (np.cos(ang) * xx + np.sin(ang) * yy) + phase)
    img = base[None, None, :] + 25 * stripes[..., None] + rng.normal(0, 10, (size, size, 3))
    labels = np.zeros((size, size), dtype=np.uint8)
    for _ in range(100):  # place a disc and a square that both stay well visible
        r = rng.uniform(0.12, 0.22) * size
        cx, cy = rng.uniform(r, size - r, 2)
        disc = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
        half = rng.uniform(0.1, 0.2) * size
        sx, sy = rng.uniform(half, size - half, 2)
        square = (np.abs(xx - sx) <= half) & (np.abs(yy - sy) <= half)
        if (disc & ~square).sum() >= 0.6 * disc.sum():
            break
    disc_col = np.array([rng.uniform(180, 255), rng.uniform(20, 110), rng.uniform(20, 90)])
    square_col = np.array([rng.uniform(20, 90), rng.uniform(60, 160), rng.uniform(170, 255)])
    img[disc] = disc_col + rng.normal(0, 12, (int(disc.sum()), 3))
    labels[disc] = 1
    img[square] = square_col + rng.normal(0, 12, (int(square.sum()), 3))
    labels[square] = 2
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), labels


def make_synthetic_dataset(out_dir: str | Path, n_images: int = 6, size: int = 64, seed: int = 0) -> LabelSet:
    """Write ``shape_{i}.png`` images, ``shape_{i}.npy`` label maps and ``classes.csv``.

    Three classes (background, disc, square): noisy striped backgrounds with a
    warm disc and a cool square at random positions, sizes and shades.
    Deterministic for a given ``seed``. Returns the label set.
    """
    if n_images < 1 or size < 16:
        raise DdpmsegError(f"synthetic dataset needs n_images >= 1 and size >= 16, got {n_images} and {size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n_images):
        img, labels = _synthetic_one(rng, size)
        save_png_atomic(out / f"shape_{i}.png", img)
        save_npy_atomic(out / f"shape_{i}.npy", labels)
    SYNTHETIC_LABELSET.to_csv(out / "classes.csv")
    return SYNTHETIC_LABELSET


def run_demo(directory: str | Path, echo: Callable[[str], None] = print, progress: bool = False) -> dict:
    """Run every step; returns the evaluation result."""
    from ddpmseg.pipeline import evaluate_model, extract_features, fit_model, kmeans_grid_image, predict_images

    d = Path(directory)
    ckpt, flags = make_tiny_checkpoint(d)
    train, test = d / "data" / "train", d / "data" / "test"
    make_synthetic_dataset(train, n_images=6, size=64, seed=0)
    make_synthetic_dataset(test, n_images=3, size=64, seed=1)
    echo(f"demo: tiny random-weight ADM -> {ckpt}; 6 train + 3 test synthetic images -> {d / 'data'}")
    echo("demo: NOTE random weights give no semantic quality; this only exercises the pipeline")
    cfg = ExtractConfig()
    s = extract_features(ckpt, [train], d / "feats.h5", config=cfg, model_flags=flags, device="cpu", progress=progress)
    echo(f"extract: {s.new} images -> {s.out} ({s.seconds / max(s.new, 1):.2f} s/image)")
    f = fit_model(d / "feats.h5", train, d / "model", classes=str(train / "classes.csv"), device="cpu", progress=progress,
                  overwrite=True)
    echo(f"fit: {f.n_pixels} pixels, {f.n_classes} classes, {f.seconds:.1f} s -> {f.out}")
    p = predict_images([test], d / "model", d / "preds", device="cpu", progress=progress, overwrite=True)
    echo(f"predict: {p.n_images} images -> {p.out}")
    r = evaluate_model(d / "model", [test], test, device="cpu")
    echo("evaluate: " + ", ".join(f"{k} {100 * v:.1f}" for k, v in r["per_class"].items()) + f"; mIoU {100 * r['miou']:.1f}")
    g = kmeans_grid_image(next(iter(sorted(test.glob("*.png")))), ckpt, d / "kmeans.png", k=3, config=cfg,
                          model_flags=flags, device="cpu", overwrite=True)
    echo(f"kmeans: -> {g}")
    echo(f"demo: done; outputs in {d}")
    return r
