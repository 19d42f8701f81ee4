"""Predict speed, end to end and split into extraction and classification, vs the naive recipe.

    python benchmarks/bench_predict.py [--preset ffhq_256] [--images 2] [--precision fp32]

A random-weight checkpoint of the preset's full architecture and a model
folder (an ensemble fitted for one epoch on random 8448-dim features, 34
classes: the wide ffhq_34 MLPs) are written to a temporary folder; speed does
not depend on the values. Each mode runs in its own child process.

naive:   the reference's way: full forward per timestep with hooks, every block
         upsampled (2.2 GB of fp32 features per image), each of the ten MLPs
         run in turn on all 65536 pixels, majority vote.
ddpmseg: `ddpmseg predict` (predict_images): early-stopped extraction, layer 1
         of the MLPs applied at each block's native resolution, label /
         overlay / uncertainty PNGs written at the original size.

Everything printed is saved in benchmarks/results/.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from _common import Results, peak_rss_mb, run_in_child
from bench_extract import build_backbone, naive_features

N_CLASSES = 34


def write_model(folder: Path, preset: str, precision: str) -> tuple[Path, Path]:
    """(checkpoint, model folder) for ``preset`` with random weights, as `ddpmseg fit` lays them out."""
    from ddpmseg.backbones import create_backbone
    from ddpmseg.heads.mlp import PixelEnsemble
    from ddpmseg.data import LabelSet
    from ddpmseg.features.extractor import make_noise
    from ddpmseg.model import SegmentationModel
    from ddpmseg.records import ExtractConfig, FitConfig, ModelRecord

    ckpt = folder / "random.pt"
    torch.save(build_backbone(preset).model.state_dict(), ckpt)
    backbone = create_backbone(ckpt, preset, device="cpu")
    extract = ExtractConfig(precision=precision)
    extract = dataclasses.replace(extract, blocks=tuple(backbone.default_blocks()))  # what extract resolves "auto" to
    dims = {b.index: b.channels for b in backbone.blocks()}
    n_features = len(extract.steps) * sum(dims[b] for b in extract.blocks)
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(512, n_features, generator=g), torch.randint(0, N_CLASSES, (512,), generator=g)
    est = PixelEnsemble(n_classes=N_CLASSES, max_epochs=1, random_state=0).fit(X, y)
    fit = FitConfig(images=(), masks="")  # the default head's settings: 10 MLPs, as the estimator above
    record = ModelRecord(backbone.spec, backbone.checkpoint, extract, LabelSet.default(N_CLASSES), fit)
    model_dir = SegmentationModel(record, est, make_noise(0, backbone.image_size)).save(folder / "model")
    return ckpt, model_dir


def write_images(folder: Path, n: int, size: int) -> list[Path]:
    from PIL import Image

    rng = np.random.default_rng(1)
    paths = []
    for i in range(n):
        p = folder / f"img{i}.png"
        Image.fromarray((rng.random((size, size, 3)) * 255).astype("uint8")).save(p)
        paths.append(p)
    return paths


def _child(mode: str, preset: str, ckpt: Path, model_dir: Path, images: list[Path], queue) -> None:
    from ddpmseg.pipeline import predict_images

    if mode == "ddpmseg":
        predict_images(images[:1], model_dir, model_dir.parent / "warmup", checkpoint=ckpt, device="cpu")
        s = predict_images(images[1:], model_dir, model_dir.parent / "preds", checkpoint=ckpt, device="cpu")
        n = s.n_images
        result = {"seconds_per_image": s.seconds / n, "extract_seconds_per_image": s.extract_seconds / n}
    else:
        from ddpmseg.heads.mlp import vote
        from ddpmseg.data import load_rgb, preprocess_image
        from ddpmseg.features.extractor import make_noise
        from ddpmseg.model import SegmentationModel

        backbone = build_backbone(preset)
        backbone.model.load_state_dict(torch.load(ckpt, weights_only=True))
        ensemble = SegmentationModel.load(model_dir).classifier
        mlps = [ensemble.module_.member_mlp(m).eval() for m in range(ensemble.n_members_)]
        size = backbone.image_size
        noise = make_noise(0, size)
        ext, total = [], []
        for i, p in enumerate(images):
            t0 = time.perf_counter()
            x0, _ = preprocess_image(load_rgb(p), size, "resize")
            feats = naive_features(backbone, x0, noise)
            t1 = time.perf_counter()
            X = feats[0].reshape(feats.shape[1], -1).T  # (S*S, C): all pixels of the image in one batch
            with torch.no_grad():
                labels, _ = vote(torch.stack([mlp(X) for mlp in mlps]))
            if i:  # the first image warms up
                ext.append(t1 - t0)
                total.append(time.perf_counter() - t0)
            del feats, X
        result = {"seconds_per_image": sum(total) / len(total), "extract_seconds_per_image": sum(ext) / len(ext)}
    result["classify_and_write_seconds_per_image"] = result["seconds_per_image"] - result["extract_seconds_per_image"]
    queue.put({"mode": mode, **{k: round(v, 2) for k, v in result.items()}, "peak_rss_mb": peak_rss_mb()})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="ffhq_256", help="an ADM preset")
    ap.add_argument("--images", type=int, default=2, help="timed images per mode (after one warm-up)")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="ddpmseg's extraction precision")
    args = ap.parse_args()
    with Results("predict", args) as out, tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        ckpt, model_dir = write_model(folder, args.preset, args.precision)
        images = write_images(folder, args.images + 1, 256)
        results = {}
        for mode in ("naive", "ddpmseg"):
            results[mode] = run_in_child(_child, mode, args.preset, ckpt, model_dir, images)
            out.row("predict", preset=args.preset, precision="fp32" if mode == "naive" else args.precision, **results[mode])
        ratio = results["naive"]["seconds_per_image"] / results["ddpmseg"]["seconds_per_image"]
        out.row("predict_speedup", preset=args.preset, precision=args.precision, ratio=round(ratio, 2))


if __name__ == "__main__":
    sys.exit(main())
