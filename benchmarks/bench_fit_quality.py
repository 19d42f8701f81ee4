"""Held-out quality of the fit recipes: fast vs reference over seeds, and mIoU against the pixel fraction.

    python benchmarks/bench_fit_quality.py [--data ../shared/data/fasseg-frontal02] [--seeds 3]

Real images, real labels: FASSEG frontal02 (20 face photos, 6 classes; research
use only, read in place and never copied), the first ``--train`` images (natural
order) to train, the others held out. Features come from the tiny random-weight
ADM of ``ddpmseg demo`` (64x64, 1056 channels; no pretrained weights on the
development machines), so absolute mIoU is low: what matters is the gap between
recipes compared with the spread over seeds. Everything goes through the
library: ``extract_features``, ``fit_model``, ``evaluate_model``.

Prints one JSON object per fit (recipe, pixel fraction, seed, held-out mIoU,
fit seconds, steps), then one summary per (recipe, fraction) with the mean and
(sample) standard deviation of the mIoU over seeds.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from _common import FASSEG, mean_std
from ddpmseg.demo import make_tiny_checkpoint
from ddpmseg.pipeline import evaluate_model, extract_features, fit_model

def _run(args: argparse.Namespace, work: Path) -> None:
    images = sorted((args.data / "train" / "images").glob("*.png"))
    labels = args.data / "train" / "labels"
    classes = str(args.data / "classes.csv")
    train, test = images[: args.train], images[args.train :]
    ckpt, flags = make_tiny_checkpoint(work)
    feats = work / "train.h5"
    extract_features(ckpt, train, feats, model_flags=flags, device="cpu")
    plan = [("reference", 1.0), ("fast", 1.0)] + [("fast", f) for f in args.fractions if f != 1.0]
    results: dict[tuple[str, float], list[float]] = {}
    for recipe, fraction in plan:
        for seed in range(args.seeds):
            out = work / f"model_{recipe}_{fraction}_{seed}"
            t0 = time.perf_counter()
            fit = fit_model(feats, labels, out, classes=classes, seed=seed, recipe=recipe, pixel_fraction=fraction,
                            ensemble=args.ensemble, device="cpu")
            seconds = time.perf_counter() - t0
            miou = evaluate_model(out, test, labels, checkpoint=ckpt, device="cpu")["miou"]
            results.setdefault((recipe, fraction), []).append(miou)
            print(json.dumps({"benchmark": "fit_quality", "recipe": recipe, "pixel_fraction": fraction, "seed": seed,
                              "heldout_miou": round(miou, 4), "fit_seconds": round(seconds, 1),
                              "train_images": len(train), "test_images": len(test), "n_pixels": fit.n_pixels,
                              "steps_per_member": [min(fit.n_iter), max(fit.n_iter)]}), flush=True)
    for (recipe, fraction), mious in results.items():
        print(json.dumps({"benchmark": "fit_quality_summary", "recipe": recipe, "pixel_fraction": fraction,
                          **mean_std(mious)}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=FASSEG, help="FASSEG frontal02 folder (train/images, train/labels, classes.csv)")
    ap.add_argument("--train", type=int, default=10, help="images to train on; the rest are held out")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--ensemble", type=int, default=10)
    ap.add_argument("--fractions", type=lambda s: [float(v) for v in s.split(",")], default=[1.0, 0.5, 0.25, 0.1, 0.05],
                    help="pixel fractions per epoch for the fast recipe")
    args = ap.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory(prefix="ddpmseg-fitq-") as tmp:
        _run(args, Path(tmp))


if __name__ == "__main__":
    main()
