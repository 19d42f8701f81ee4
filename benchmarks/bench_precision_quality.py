"""Does --precision bf16 change segmentation quality? Held-out mIoU of bf16 vs fp32 features.

    python benchmarks/bench_precision_quality.py [--train 6] [--test 6] [--seeds 3]

The full ffhq_256 architecture with random weights (no pretrained weights on
the development machines) extracts features of FASSEG frontal02 face photos
(research use only, read in place) once in fp32 and once in bf16. Prints the
relative error of the bf16 block maps, then for each precision and seed the
held-out mIoU of an ensemble fitted on the first ``--train`` images (the same
fit settings for both precisions), and a summary per precision (mean and
sample standard deviation over seeds). Random weights give low absolute mIoU:
what matters is the gap between precisions against the spread over seeds.
Held-out images are classified from their cached maps exactly as `predict`
does (no second extraction). Everything printed is saved in
benchmarks/results/.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from _common import FASSEG, Results, mean_std
from bench_extract import build_backbone
from ddpmseg import data
from ddpmseg.features.cache import FeatureCache
from ddpmseg.metrics import evaluate_masks
from ddpmseg.model import SegmentationModel
from ddpmseg.pipeline import extract_features, fit_model
from ddpmseg.records import ExtractConfig

def heldout_miou(model_dir: Path, feats: Path, test: list[Path], labels: Path) -> float:
    """mIoU over the held-out images, classified from their cached block maps as `predict` does."""
    model = SegmentationModel.load(model_dir)
    labelset = model.labelset
    preds, truths = [], []
    with FeatureCache(feats) as cache:
        for p in test:
            pre = data.Preprocess.from_dict(cache.preprocess(p.stem))
            seg = model.classifier.predict_block_maps(cache.block_maps(p.stem), model.keys, cache.image_size)
            preds.append(data.restore_labels(seg.labels, pre, fill=255))
            truths.append(data.load_mask(data.find_mask(p.stem, labels, image_path=p), labelset,
                                         expected_size=pre.original_size))
    return float(evaluate_masks(preds, truths, labelset.n_classes, ignore_index=labelset.ignore_index)["miou"])


def map_errors(fp32: Path, bf16: Path) -> list[float]:
    """Norm-relative error of every bf16 block map against the fp32 one."""
    errs = []
    with FeatureCache(fp32) as a, FeatureCache(bf16) as b:
        for i in a.image_ids:
            ref, low = a.block_maps(i), b.block_maps(i)
            errs += [float(torch.linalg.vector_norm(torch.as_tensor(low[k]).float() - torch.as_tensor(ref[k]).float())
                           / torch.linalg.vector_norm(torch.as_tensor(ref[k]).float())) for k in ref]
    return errs


def _run(args: argparse.Namespace, work: Path, out: Results) -> None:
    images = sorted((args.data / "train" / "images").glob("*.png"))
    labels = args.data / "train" / "labels"
    classes = str(args.data / "classes.csv")
    train, test = images[: args.train], images[args.train : args.train + args.test]
    ckpt = work / "ffhq_random.pt"
    torch.save(build_backbone("ffhq_256").model.state_dict(), ckpt)
    caches = {}
    for precision in ("fp32", "bf16"):
        caches[precision] = work / f"{precision}.h5"
        t0 = time.perf_counter()
        extract_features(ckpt, train + test, caches[precision], config=ExtractConfig(precision=precision),
                         preset="ffhq_256", device="cpu")
        out.row("precision_extract", precision=precision, images=len(train + test),
                seconds_per_image=round((time.perf_counter() - t0) / len(train + test), 1))
    errs = map_errors(caches["fp32"], caches["bf16"])
    out.row("precision_feature_error", maps=len(errs), mean_rel_error=round(statistics.mean(errs), 4),
            max_rel_error=round(max(errs), 4))
    results: dict[str, list[float]] = {}
    for precision, feats in caches.items():
        for seed in range(args.seeds):
            model = work / f"model_{precision}_{seed}"
            fit_model(feats, labels, model, labels=len(train), classes=classes, seed=seed, device="cpu", head="mlp",
                      options={"recipe": args.recipe, "pixel_fraction": args.pixel_fraction})
            miou = heldout_miou(model, feats, test, labels)
            results.setdefault(precision, []).append(miou)
            out.row("precision_quality", precision=precision, seed=seed, heldout_miou=round(miou, 4))
    for precision, mious in results.items():
        out.row("precision_quality_summary", precision=precision, recipe=args.recipe,
                pixel_fraction=args.pixel_fraction, train_images=len(train), **mean_std(mious))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=FASSEG, help="FASSEG frontal02 folder (train/images, train/labels, classes.csv)")
    ap.add_argument("--train", type=int, default=6, help="images to train on (natural order)")
    ap.add_argument("--test", type=int, default=6, help="held-out images after those")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--recipe", default="fast", choices=["fast", "reference"])
    ap.add_argument("--pixel-fraction", type=float, default=0.25)
    args = ap.parse_args()
    with Results("precision_quality", args) as out, tempfile.TemporaryDirectory(prefix="ddpmseg-precq-") as tmp:
        _run(args, Path(tmp), out)


if __name__ == "__main__":
    main()
