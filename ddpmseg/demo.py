"""``ddpmseg demo``: the whole pipeline offline, on things the project makes itself.

A tiny ADM with the ffhq_256 block structure (64x64, 32 base channels, random
weights) is saved as a checkpoint, a few synthetic labelled images are drawn,
and extract -> fit -> predict -> evaluate -> kmeans run on them. Random weights
carry no learned semantics: the demo proves the machinery, not the quality
(for that, use a real checkpoint: README "The real workflow").
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch

from ddpmseg import data
from ddpmseg.backbones.adm import random_unet
from ddpmseg.backbones.presets import AdmConfig
from ddpmseg.features.extractor import ExtractConfig

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


def run_demo(directory: str | Path, echo: Callable[[str], None] = print, progress: bool = False) -> dict:
    """Run every step; returns the evaluation result."""
    from ddpmseg.pipeline import evaluate_model, extract_features, fit_model, kmeans_grid_image, predict_images

    d = Path(directory)
    ckpt, flags = make_tiny_checkpoint(d)
    train, test = d / "data" / "train", d / "data" / "test"
    data.make_synthetic_dataset(train, n_images=6, size=64, seed=0)
    data.make_synthetic_dataset(test, n_images=3, size=64, seed=1)
    echo(f"demo: tiny random-weight ADM -> {ckpt}; 6 train + 3 test synthetic images -> {d / 'data'}")
    echo("demo: NOTE random weights give no semantic quality; this only exercises the pipeline")
    cfg = ExtractConfig()
    s = extract_features(ckpt, [train], d / "feats.h5", config=cfg, model_flags=flags, device="cpu", progress=progress)
    echo(f"extract: {s.new} images -> {s.out} ({s.seconds / max(s.new, 1):.2f} s/image)")
    f = fit_model(d / "feats.h5", train, d / "model", classes=str(train / "classes.csv"), device="cpu", progress=progress)
    echo(f"fit: {f.n_pixels} pixels, {f.n_classes} classes, {f.seconds:.1f} s -> {f.out}")
    p = predict_images([test], d / "model", d / "preds", device="cpu", progress=progress)
    echo(f"predict: {p.n_images} images -> {p.out}")
    r = evaluate_model(d / "model", [test], test, device="cpu")
    echo("evaluate: " + ", ".join(f"{k} {100 * v:.1f}" for k, v in r["per_class"].items()) + f"; mIoU {100 * r['miou']:.1f}")
    g = kmeans_grid_image(next(iter(sorted(test.glob("*.png")))), ckpt, d / "kmeans.png", k=3, config=cfg,
                          model_flags=flags, device="cpu")
    echo(f"kmeans: -> {g}")
    echo(f"demo: done; outputs in {d}")
    return r
