"""Held-out quality of the fit recipes over seeds: reference, fast and tiles on two kinds of features.

    python benchmarks/bench_fit_quality.py [--kinds ffhq_256,trained] [--recipes reference,fast,tiles] [--seeds 3]

Real images, real labels: FASSEG frontal02 (20 face photos, 6 classes; research
use only, read in place and never copied). Everything goes through the
library (``extract_features``, ``fit_model``; the held-out photos are extracted
once and scored from their cache as ``ddpmseg evaluate`` scores them: mIoU at
the original size), ten members, the same features and split for every
recipe and seed:

ffhq_256  the full ffhq_256 ADM architecture (random weights: no pretrained
          checkpoint can be downloaded here), 256x256, 8448-dim features;
          the first ``--ffhq-train`` photos train (the reference recipe takes
          ~13 min per seed and image pair on 2 cores), the last 10 are held out
trained   the 32 px DDPM that ``bench_trained_features.py`` trains on the 20
          photos with ``ddpmseg train-ddpm`` (its newest EMA weights; trained
          first if the run is missing); the first 10 photos train, the last 10
          are held out
tiny      the tiny random-weight demo ADM (64x64, 1056 dims); 10 / 10

Prints one JSON object per fit (kind, recipe, seed, held-out mIoU, fit
seconds, steps and pixels per member), then per kind and recipe the mean and
sample standard deviation over seeds and the mean fit time as a ratio to the
reference recipe's in the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from _common import FASSEG, heldout_score, mean_std
from ddpmseg.pipeline import extract_features, fit_model

TRAINED_STEPS = 2400  # bench_trained_features.py's default run


def _features(kind: str, work: Path, images: list[Path], n_train: int) -> tuple[Path, Path]:
    """(feature cache of the training photos, feature cache of the held-out photos) for ``kind``."""
    train, test = images[:n_train], images[-10:]
    feats, test_feats = work / f"{kind}.h5", work / f"{kind}_test.h5"
    if kind == "ffhq_256":
        from bench_extract import build_backbone

        ckpt = work / "ffhq_256_random.pt"
        torch.save(build_backbone("ffhq_256").model.state_dict(), ckpt)
        kw: dict = dict(preset="ffhq_256")
    elif kind == "trained":
        from bench_trained_features import fasseg_ddpm

        ckpt, kw = fasseg_ddpm(TRAINED_STEPS, 400), {}
    elif kind == "tiny":
        from ddpmseg.demo import make_tiny_checkpoint

        ckpt, flags = make_tiny_checkpoint(work)
        kw = dict(model_flags=flags)
    else:
        raise SystemExit(f"--kinds: unknown kind {kind!r}; use ffhq_256, trained or tiny")
    extract_features(ckpt, train, feats, device="cpu", **kw)
    extract_features(ckpt, test, test_feats, device="cpu", **kw)
    return feats, test_feats


def _run(args: argparse.Namespace, work: Path) -> None:
    images = sorted((args.data / "train" / "images").glob("*.png"))
    labels, classes = args.data / "train" / "labels", str(args.data / "classes.csv")
    for kind in args.kinds:
        feats, test_feats = _features(kind, work, images, args.ffhq_train if kind == "ffhq_256" else 10)
        mious: dict[str, list[float]] = {}
        seconds: dict[str, list[float]] = {}
        for recipe in args.recipes:
            for seed in range(args.seeds):
                out = work / f"model_{kind}_{recipe}_{seed}"
                t0 = time.perf_counter()
                fit = fit_model(feats, labels, out, classes=classes, seed=seed, recipe=recipe, ensemble=args.ensemble,
                                device="cpu")
                seconds.setdefault(recipe, []).append(time.perf_counter() - t0)
                score = heldout_score(out, test_feats, labels)
                mious.setdefault(recipe, []).append(score["heldout_miou"])
                print(json.dumps({"benchmark": "fit_quality", "kind": kind, "recipe": recipe, "seed": seed,
                                  **score, "fit_seconds": round(seconds[recipe][-1], 1),
                                  "train_images": len(fit.image_ids), "test_images": 10,
                                  "labelled_pixels": fit.n_pixels, "epochs": fit.epochs,
                                  "steps_per_member": max(fit.n_iter), "pixels_per_member": max(fit.pixels_seen)}),
                      flush=True)
        base = statistics.mean(seconds["reference"]) if "reference" in seconds else None
        for recipe in args.recipes:
            line = {"benchmark": "fit_quality_summary", "kind": kind, "recipe": recipe, **mean_std(mious[recipe]),
                    "fit_seconds_mean": round(statistics.mean(seconds[recipe]), 1)}
            if base is not None:
                line["fit_time_vs_reference"] = round(statistics.mean(seconds[recipe]) / base, 3)
            print(json.dumps(line), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=FASSEG, help="FASSEG frontal02 folder (train/images, train/labels, classes.csv)")
    ap.add_argument("--kinds", type=lambda s: s.split(","), default=["ffhq_256", "trained"])
    ap.add_argument("--recipes", type=lambda s: s.split(","), default=["reference", "fast", "tiles"])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--ensemble", type=int, default=10)
    ap.add_argument("--ffhq-train", type=int, default=2, help="photos the ffhq_256 fits train on")
    args = ap.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory(prefix="ddpmseg-fitq-") as tmp:
        _run(args, Path(tmp))


if __name__ == "__main__":
    main()
