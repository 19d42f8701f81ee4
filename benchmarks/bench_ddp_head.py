"""Does denoising the label map help? The DDP head against the MLP ensemble and the same head without diffusion.

    python benchmarks/bench_ddp_head.py [--kinds tiny,trained] [--seeds 3] [--iterations 1500]

Real images, real labels: FASSEG frontal02 (20 face photos, 6 classes; research
use only, read in place), the first 10 photos (sorted names) train, the last
10 are held out. Features of two kinds, each extracted once into a train and
a test cache:

tiny     the demo's random-weight ADM with the ffhq_256 block structure (64 px,
         1056 dims): the random-weight ffhq-depth ADM of the other benchmarks
trained  the 32 px DDPM that ``bench_trained_features.py`` trains on the 20
         photos with ``ddpmseg train-ddpm`` (its newest EMA weights; trained first
         if the run is missing)

Per kind and seed, three fits on the same features through ``fit_model``:

mlp      the MLP ensemble as ``ddpmseg fit`` runs it by default
ddp      the DDP head, then inference at 1, 3 and 10 steps with 1 and 8
         generations (one training, six inferences)
control  the same head trained and run without diffusion (a zero label map at
         a fixed time, one step): what the decoder alone gives

Prints one JSON object per (kind, seed, head, inference): held-out mIoU at the
photos' original size (as ``ddpmseg evaluate`` scores), expected calibration
error of the mean softmax (15 bins, on the model grid), fit seconds and the
classifier's seconds per image (features from the cache); then per kind and
variant the mean and sample standard deviation over seeds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from _common import FASSEG, peak_rss_mb
from ddpmseg import data
from ddpmseg.features.cache import FeatureCache
from ddpmseg.features.pixels import CachePixels
from ddpmseg.heads import DDPConfig
from ddpmseg.metrics import Calibration, SegmentationScore
from ddpmseg.model import SegmentationModel
from ddpmseg.pipeline import extract_features, fit_model

TRAINED_STEPS = 2400  # bench_trained_features.py's default run
INFERENCE = [(1, 1), (3, 1), (10, 1), (1, 8), (3, 8), (10, 8)]  # (steps, generations)


def _caches(kind: str, work: Path, train: list[Path], test: list[Path]) -> tuple[Path, Path]:
    if kind == "tiny":
        from ddpmseg.demo import make_tiny_checkpoint

        ckpt, flags = make_tiny_checkpoint(work)
        kw: dict = dict(model_flags=flags)
    elif kind == "trained":
        from bench_trained_features import fasseg_ddpm

        ckpt, kw = fasseg_ddpm(TRAINED_STEPS, 400), {}
    else:
        raise SystemExit(f"--kinds: unknown kind {kind!r}; use tiny or trained")
    out = work / f"{kind}_train.h5", work / f"{kind}_test.h5"
    extract_features(ckpt, train, out[0], device="cpu", **kw)
    extract_features(ckpt, test, out[1], device="cpu", **kw)
    return out


def _score(model: SegmentationModel, test_cache: Path, labels: Path) -> dict:
    """Held-out mIoU at the original size, ECE of the mean softmax on the grid, classifier s/image."""
    labelset = model.labelset
    score, calib, seconds = SegmentationScore(labelset.n_classes, labelset.ignore_index), Calibration(), 0.0
    clf = model.classifier
    with FeatureCache(test_cache) as cache:
        size = cache.image_size
        for image_id in cache.image_ids:
            maps, pre = cache.block_maps(image_id), data.Preprocess.from_dict(cache.preprocess(image_id))
            mask = data.load_mask(data.find_mask(image_id, labels), labelset, expected_size=pre.original_size)
            t0 = time.perf_counter()
            if hasattr(clf, "predict_proba_maps"):  # the DDP head
                probs, _ = clf.predict_proba_maps(maps, size)
                probs = probs.numpy()
            else:
                probs = clf.predict_proba(CachePixels([maps], cache.keys, size)).T.reshape(-1, size, size)
            seconds += time.perf_counter() - t0
            score.update(data.restore_labels(probs.argmax(0), pre, fill=255), mask)
            calib.update(probs, data.prepare_mask(mask, pre))
        n = len(cache.image_ids)
    return {"heldout_miou": round(100 * score.result()["miou"], 2), "ece": round(calib.ece(), 4),
            "classify_s_per_image": round(seconds / n, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=FASSEG)
    ap.add_argument("--kinds", type=lambda s: s.split(","), default=["tiny", "trained"])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--iterations", type=int, default=DDPConfig.iterations, help="DDP head training steps")
    args = ap.parse_args()
    torch.set_num_threads(2)
    images = sorted((args.data / "train" / "images").glob("*.png"))
    labels, classes = args.data / "train" / "labels", str(args.data / "classes.csv")
    train, test = images[:10], images[-10:]
    results: dict[tuple[str, str], list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="ddpmseg-ddp-") as tmp:
        work = Path(tmp)
        for kind in args.kinds:
            train_cache, test_cache = _caches(kind, work, train, test)
            for seed in range(args.seeds):
                for head in ("mlp", "ddp", "control"):
                    cfg = DDPConfig(iterations=args.iterations, diffusion=head != "control")
                    out = work / f"{kind}_{head}_{seed}"
                    fit = fit_model(train_cache, labels, out, classes=classes, seed=seed, device="cpu",
                                    head="mlp" if head == "mlp" else "ddp", ddp=cfg)
                    model = SegmentationModel.load(out)
                    variants = [(head, None)] if head != "ddp" else [(f"ddp_s{s}_g{g}", (s, g)) for s, g in INFERENCE]
                    for name, inference in variants:
                        if inference is not None:
                            model.classifier.config = dataclasses.replace(cfg, steps=inference[0], generations=inference[1])
                        r = {"benchmark": "ddp_head", "kind": kind, "seed": seed, "variant": name,
                             "fit_seconds": round(fit.seconds, 1), **_score(model, test_cache, labels),
                             "peak_rss_mb": peak_rss_mb()}
                        results.setdefault((kind, name), []).append(r)
                        print(json.dumps(r), flush=True)
    for (kind, name), rows in results.items():
        summary = {"benchmark": "ddp_head_summary", "kind": kind, "variant": name, "seeds": len(rows)}
        for key in ("heldout_miou", "ece", "fit_seconds", "classify_s_per_image"):
            vals = [r[key] for r in rows]
            summary[f"{key}_mean"] = round(statistics.mean(vals), 4)
            summary[f"{key}_std"] = round(statistics.stdev(vals), 4) if len(vals) > 1 else 0.0
        print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
