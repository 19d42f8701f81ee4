"""Does a distilled student keep its teacher's quality, and how much faster is it? (``ddpmseg distill``)

    python benchmarks/bench_distill.py [--seeds 3] [--samples 1000] [--sample-steps 50] [--archs unet] [--sweep 200]
                                       [--epochs 20] [--variants control,...] [--parts speed,quality]

Quality, FASSEG (10 labelled photos, the other 10 held out; research use, read
in place): the teacher is the default MLP ensemble on the 32 px DDPM that
``bench_trained_features`` trains on the 20 photos' images (its cached run,
trained here if missing). Per seed, held-out mIoU at the photos' size
(``evaluate_model``) of:

    teacher             the MLP ensemble (default recipe)
    control             the student trained on the 10 labelled photos alone (no pseudo-labels)
    samples             the student on ``--samples`` DDPM samples pseudo-labelled by the teacher,
                        the 10% most uncertain dropped, plus the 10 labelled photos
    samples, no filter  the same without the uncertainty filter
    samples, no augment the same as ``samples`` without scale/crop/flip augmentation

The sampler sweep (seed 0's teacher): seconds per sample and the teacher's
image uncertainty on ``--sweep`` samples for DDIM 10/25/50/100 steps and on
a fifth as many for 1000-step ancestral sampling.

There are no unlabelled FASSEG photos beyond the 20 (10 labelled, 10 test),
so the "unlabelled real images" source is not measured here.

Speed, same run: seconds per 256x256 image of ``predict`` end to end (load,
network, three PNGs) for the teacher on the full ffhq_256 architecture (random
weights, the default 10 MLPs) and for the student at 256x256, each in its own
process (peak RSS), the student's ONNX Runtime time, and every student
network's forward time at 256 px.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from _common import FASSEG, Results, mean_std, peak_rss_mb, run_in_child
from bench_trained_features import fasseg_ddpm
from ddpmseg.pipeline import evaluate_model, extract_features, fit_model
from ddpmseg.train import TrainConfig

TRAINED_STEPS = 2400


def _predict_child(model_dir: Path, images: list[Path], out: Path, queue) -> None:
    from ddpmseg.pipeline import predict_images

    torch.set_num_threads(2)
    t0 = time.perf_counter()
    s = predict_images(images, model_dir, out, device="cpu")
    queue.put({"s_per_image": round((time.perf_counter() - t0) / len(images), 3),
               "loop_s_per_image": round(s.seconds / len(images), 3), "peak_rss_mb": peak_rss_mb()})


def speed(out: Results, work: Path, archs: list[str]) -> None:
    from PIL import Image

    from bench_predict import write_model
    from ddpmseg.data import LabelSet
    from ddpmseg.distill.export import export_onnx
    from ddpmseg.distill.students import STUDENTS, build_student
    from ddpmseg.model import StudentModel
    from ddpmseg.records import StudentRecord

    rng = np.random.default_rng(0)
    images = []
    for i in range(2):
        p = work / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(p)
        images.append(p)
    _, teacher = write_model(work, "ffhq_256", "fp32")
    k = 10  # bench_predict's classes
    record = StudentRecord(LabelSet.default(k), {"name": "unet", "size": 256, "preprocess": "resize"}, {}, {}, {}, {})
    student = StudentModel(record, build_student("unet", k, 256)).save(work / "student")
    rows = {}
    for name, folder in (("teacher ffhq_256", teacher), ("student unet 256", student)):
        rows[name] = run_in_child(_predict_child, folder, images, work / f"pred_{name.split()[0]}")
        out.row("distill_speed", model=name, **rows[name])
    ratio = rows["teacher ffhq_256"]["s_per_image"] / rows["student unet 256"]["s_per_image"]
    out.row("distill_speedup", what="predict end to end, teacher / student", ratio=round(ratio, 1))
    e = export_onnx(student, work / "student.onnx", image=images[0])
    out.row("distill_onnx", torch_ms=round(e.torch_ms, 1), onnxruntime_ms=round(e.onnxruntime_ms, 1),
            max_abs_diff=float(e.max_abs_diff))
    torch.set_num_threads(2)
    x = torch.randn(1, 3, 256, 256)
    for name in archs or list(STUDENTS):
        net = build_student(name, k, 256).eval()
        with torch.inference_mode():
            net(x)
            t0 = time.perf_counter()
            for _ in range(5):
                net(x)
        out.row("student_forward", student=name, ms_256=round((time.perf_counter() - t0) / 5 * 1000, 1),
                parameters_m=round(sum(p.numel() for p in net.parameters()) / 1e6, 2))


def sampling_sweep(out: Results, teacher: Path, work: Path, n: int) -> None:
    """Seconds per sample and the teacher's image uncertainty on the samples, by sampler: what picks the
    default --sample-steps."""
    from ddpmseg.distill.pseudo import pseudo_label
    from ddpmseg.distill.samples import write_samples
    from ddpmseg.workers import Segmenter

    segmenter = Segmenter(teacher, device="cpu")
    for steps in (10, 25, 50, 100, 1000):
        folder = work / f"steps_{steps}"
        count = n if steps < 1000 else max(2, n // 5)  # full ancestral sampling costs 20x DDIM 50's time
        t0 = time.perf_counter()
        paths = write_samples(segmenter.backbone, folder, count, sample_steps=steps, seed=0)
        seconds = (time.perf_counter() - t0) / count
        scores = [p.uncertainty for p in pseudo_label(segmenter, paths, folder, "sample")]
        out.row("distill_sampling", sample_steps=steps, sampler="ancestral" if steps >= 1000 else "ddim", samples=count,
                s_per_sample=round(seconds, 4), teacher_uncertainty_median=round(float(np.median(scores)), 4),
                teacher_uncertainty_p90=round(float(np.quantile(scores, 0.9)), 4))


def quality(args: argparse.Namespace, out: Results, work: Path) -> None:
    from ddpmseg.distill import StudentTrainConfig, distill

    run = fasseg_ddpm(TRAINED_STEPS, 400)
    ckpt = run / f"ema_{TrainConfig().ema}_{TRAINED_STEPS:06d}.pt"
    images = sorted((FASSEG / "train" / "images").glob("*.png"))
    labels, classes = FASSEG / "train" / "labels", str(FASSEG / "classes.csv")
    train, test = images[:10], images[10:]
    feats = work / "train.h5"
    extract_features(ckpt, train, feats, model_flags=run / "flags.json", device="cpu")
    scores: dict[str, list[float]] = {}

    def record(name: str, seed: int, model: Path, **extra) -> None:
        miou = 100 * evaluate_model(model, test, labels, device="cpu")["miou"]
        scores.setdefault(name, []).append(miou)
        out.row("distill_quality", variant=name, seed=seed, heldout_miou=round(miou, 2), **extra)

    for seed in range(args.seeds):
        teacher = work / f"teacher_{seed}"
        t0 = time.perf_counter()
        fit_model(feats, labels, teacher, classes=classes, seed=seed, device="cpu")
        record("teacher (MLP ensemble)", seed, teacher, seconds=round(time.perf_counter() - t0, 1))
        if seed == 0 and args.sweep:
            sampling_sweep(out, teacher, work / "sweep", args.sweep)
        for arch in args.archs:
            variants = {
                "control: labelled photos only": dict(images=train),
                "samples + filter 0.1": dict(images=train, samples=args.samples, drop_uncertain=0.1),
                "samples, no filter": dict(images=train, samples=args.samples, drop_uncertain=0.0),
                "samples + filter 0.1, no augmentation": dict(images=train, samples=args.samples, drop_uncertain=0.1,
                                                              augment=False),
            }
            for name, kw in variants.items():
                if args.variants and name not in args.variants and name.split(":")[0] not in args.variants:
                    continue
                student = work / f"{arch}_{name.split(':')[0].replace(' ', '_').replace(',', '')}_{seed}"
                samples_from = work / f"samples_{seed}"  # one set of samples per seed, shared by the variants
                augment = kw.pop("augment", True)
                train_cfg = StudentTrainConfig(epochs=args.epochs, seed=seed, augment=augment)
                t0 = time.perf_counter()
                if kw.get("samples") and samples_from.is_dir():
                    student.mkdir(parents=True, exist_ok=True)
                    (student / "samples").symlink_to(samples_from)
                    s = distill(teacher, student, sample_steps=args.sample_steps, student=arch, train=train_cfg,
                                resume=True, device="cpu", **kw)
                else:
                    s = distill(teacher, student, sample_steps=args.sample_steps, student=arch, train=train_cfg,
                                device="cpu", **kw)
                    if kw.get("samples"):
                        (student / "samples").rename(samples_from)
                        (student / "samples").symlink_to(samples_from)
                log = [json.loads(line) for line in (student / "train_log.jsonl").read_text().splitlines()]
                label = f"student {arch}: {name}" + (f", {args.epochs} epochs" if args.epochs != 20 else "")
                record(label, seed, student, seconds=round(time.perf_counter() - t0, 1),
                       kept=s.kept, dropped=s.dropped_uncertain, best_epoch=s.best_epoch,
                       train_images_per_s=round(statistics.median(r["images_per_s"] for r in log), 1))
    for name, values in scores.items():
        out.row("distill_quality_summary", variant=name, **mean_std(values))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--sample-steps", type=int, default=50)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--sweep", type=int, default=200, help="samples per sampler in the --sample-steps sweep (0: none)")
    ap.add_argument("--archs", type=lambda s: s.split(","), default=["unet"], help="students whose quality is measured")
    ap.add_argument("--parts", type=lambda s: s.split(","), default=["speed", "quality"])
    ap.add_argument("--variants", type=lambda s: s.split(","), default=[],
                    help="only these student variants (names, or the part before ':', e.g. 'control,samples + filter 0.1')")
    args = ap.parse_args()
    with Results("distill", args) as out, tempfile.TemporaryDirectory() as tmp:
        if "speed" in args.parts:
            (Path(tmp) / "speed").mkdir()
            speed(out, Path(tmp) / "speed", [])
        if "quality" in args.parts:
            (Path(tmp) / "quality").mkdir()
            quality(args, out, Path(tmp) / "quality")


if __name__ == "__main__":
    main()
