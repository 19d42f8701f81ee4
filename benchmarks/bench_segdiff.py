"""Which head with 10 labels? SegDiff (RRDB on pixels, or on the frozen features), its one-step control,
the MLP ensemble and the DDP head on the same FASSEG split.

    python benchmarks/bench_segdiff.py [--seeds 3] [--iterations 400] [--ddp-iterations 300]

The budget (about 30 min single-threaded on an idle 2-core CPU): SegDiff 400
steps of 4 crops of 32 px (the head's default: 1500 steps of 3/4-grid crops;
the paper's: up to 300k steps), the DDP head 300 steps (its default: 1500). On a
GPU raise --iterations to 20k or more, the head's width to 128 and rrdb_blocks to 6.

FASSEG frontal02 (research use only, read in place): the first 10 photos
(sorted names) train, the last 10 are held out; mIoU of the held-out photos at
their original size, as ``ddpmseg evaluate`` scores them.

No 64 px DDPM exists here (training one takes ~12 s a step on these CPUs), so
the frozen features come from the 32 px DDPM that ``bench_trained_features.py``
trains on the 20 photos (``~/.cache/ddpmseg/bench/fasseg32``):

mlp              the MLP ensemble (``fit_model``, its defaults) on the 32 px features
ddp              the DDP head on them (``--ddp-iterations`` steps; the rest its defaults)
segdiff_frozen   SegDiff with G on the 32 px frozen block maps (``encoder=frozen``), 32 px grid
segdiff_rrdb     SegDiff with G an RRDB on the pixels, trained and run at 64 px (``--size``)
control_rrdb     the same network as a one-step segmenter (``diffusion=false``), 64 px

Each SegDiff model is sampled with DDIM (10 steps) at 1 and 9 generations, and
on the first seed also ancestrally (all 100 steps) at 1 generation (one
training, several inferences).
Rows: held-out mIoU, fit seconds and predict seconds per image (the head
alone; the frozen features' extraction is cached and not counted). Then per
variant the mean and sample sd over seeds (timings marked "contaminated" unless
``--alone`` says nothing else ran). Saved in benchmarks/results/.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from _common import FASSEG, Results, peak_rss_mb
from ddpmseg import data
from ddpmseg.features.cache import FeatureCache
from ddpmseg.heads import ImageMaps, get_head
from ddpmseg.metrics import SegmentationScore
from ddpmseg.model import SegmentationModel
from ddpmseg.options import MIN_PIXELS
from ddpmseg.pipeline import extract_features, fit_model

TRAINED_STEPS = 2400  # bench_trained_features.py's default run
SAMPLING = [("ddim10_g1", "ddim", 10, 1), ("ddim10_g9", "ddim", 10, 9), ("ancestral_g1", "ancestral", 100, 1)]


def _pixels(paths: list[Path], labels: Path, labelset: data.LabelSet, size: int):
    """Model inputs (3, S, S), training label maps on the S grid (the pipeline's min-pixels rule), the
    preprocessing records and the original-size masks."""
    images, grids, pres, masks = [], [], [], []
    for p in paths:
        x0, pre = data.preprocess_image(data.load_rgb(p), size, "resize")
        mask = data.load_mask(data.find_mask(p.stem, labels), labelset, expected_size=pre.original_size)
        images.append(x0[0])
        grids.append(data.prepare_mask(data.apply_min_pixels(mask, MIN_PIXELS, labelset.ignore_index), pre))
        pres.append(pre)
        masks.append(mask)
    return images, grids, pres, masks


def _score(segs, pres, masks, labelset) -> float:
    score = SegmentationScore(labelset.n_classes, labelset.ignore_index)
    for seg, pre, mask in zip(segs, pres, masks):
        score.update(data.restore_labels(seg.labels, pre, fill=255), mask)
    return round(100 * score.result()["miou"], 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=FASSEG)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--size", type=int, default=64, help="grid of the pixel (RRDB) variants")
    ap.add_argument("--iterations", type=int, default=400, help="SegDiff training steps (head default: 1500)")
    ap.add_argument("--crop", type=int, default=32, help="SegDiff crop side at --size (head default: 3/4 of the grid)")
    ap.add_argument("--ddp-iterations", type=int, default=300, help="DDP head training steps (head default: 1500)")
    ap.add_argument("--images", type=int, default=10, help="held-out photos scored (fewer: a quick check)")
    ap.add_argument("--alone", action="store_true",
                    help="nothing else ran on the CPU: the summary's timings are 'alone' (default: 'contaminated')")
    ap.add_argument("--variants", type=lambda s: s.split(","),
                    default=["mlp", "ddp", "segdiff_frozen", "segdiff_rrdb", "control_rrdb"])
    args = ap.parse_args()
    torch.set_num_threads(1)
    paths = sorted((args.data / "train" / "images").glob("*.png"))
    labels, classes = args.data / "train" / "labels", str(args.data / "classes.csv")
    labelset = data.load_label_set(classes)
    train, test = paths[:10], paths[-10:][: args.images]
    px_train = _pixels(train, labels, labelset, args.size)
    px_test = _pixels(test, labels, labelset, args.size)
    sd = get_head("segdiff")
    results: dict[str, list[dict]] = {}
    with Results("segdiff", args) as out, tempfile.TemporaryDirectory(prefix="ddpmseg-segdiff-") as tmp:
        work = Path(tmp)
        from bench_trained_features import fasseg_ddpm

        ckpt = fasseg_ddpm(TRAINED_STEPS, 400, progress=False)
        train_cache, test_cache = work / "train.h5", work / "test.h5"
        extract_features(ckpt, train, train_cache, device="cpu")
        extract_features(ckpt, test, test_cache, device="cpu")
        with FeatureCache(test_cache) as cache:
            keys, grid = cache.keys, cache.image_size
            feats = [(cache.block_maps(p.stem), data.Preprocess.from_dict(cache.preprocess(p.stem))) for p in test]
        masks = px_test[3]

        def record(variant: str, seed: int, fit_s: float, predict, **extra) -> None:
            t0 = time.perf_counter()
            segs, pres = predict()
            per_image = (time.perf_counter() - t0) / len(segs)
            r = out.row("segdiff", variant=variant, seed=seed, heldout_miou=_score(segs, pres, masks, labelset),
                        fit_seconds=round(fit_s, 1), predict_s_per_image=round(per_image, 3),
                        peak_rss_mb=peak_rss_mb(), **extra)
            results.setdefault(variant, []).append(r)

        for seed in range(args.seeds):
            for variant in args.variants:
                if variant in ("mlp", "ddp", "segdiff_frozen"):  # through the pipeline, on the 32 px cache
                    head = "segdiff" if variant == "segdiff_frozen" else variant
                    options = {"ddp": {"iterations": args.ddp_iterations},
                               "segdiff_frozen": {"encoder": "frozen", "iterations": args.iterations}}.get(variant, {})
                    model_dir = work / f"{variant}_{seed}"
                    fit = fit_model(train_cache, labels, model_dir, head=head, options=options, classes=classes,
                                    seed=seed, device="cpu")
                    est = SegmentationModel.load(model_dir).classifier
                    run = lambda: ([est.predict_block_maps(m, keys, grid) for m, _ in feats], [p for _, p in feats])
                    fit_s, desc = fit.seconds, fit.description
                else:  # SegDiff on the pixels at --size, straight through the estimator
                    options = {"iterations": args.iterations, "crop": args.crop,
                               "diffusion": variant != "control_rrdb"}
                    est = sd.build(sd.make_config(options), n_classes=labelset.n_classes,
                                   ignore_index=labelset.ignore_index, random_state=seed, device="cpu", progress=False)
                    images, grids = px_train[0], px_train[1]
                    t0 = time.perf_counter()
                    est.fit(ImageMaps([{}] * len(images), (), args.size, images), grids)
                    fit_s, desc = time.perf_counter() - t0, est.describe()
                    run = lambda: ([est.predict_block_maps({}, (), args.size, image=im) for im in px_test[0]],
                                   px_test[2])
                if variant.startswith("segdiff"):
                    for name, sampler, steps, gens in SAMPLING[: None if seed == 0 else -1]:
                        est.sampler, est.steps, est.generations = sampler, min(steps, est.timesteps), gens
                        record(f"{variant}_{name}", seed, fit_s, run, fit=desc)
                else:
                    record(variant, seed, fit_s, run, fit=desc)
        for variant, rows in results.items():
            summary = {"variant": variant, "seeds": len(rows), "train_photos": len(train), "heldout_photos": len(test),
                       "grid": args.size if "rrdb" in variant else grid,
                       "timings": "alone" if args.alone else "contaminated"}
            for key in ("heldout_miou", "fit_seconds", "predict_s_per_image"):
                vals = [r[key] for r in rows]
                summary[f"{key}_mean"] = round(statistics.mean(vals), 3)
                summary[f"{key}_std"] = round(statistics.stdev(vals), 3) if len(vals) > 1 else 0.0
            out.row("segdiff_summary", **summary)


if __name__ == "__main__":
    main()
