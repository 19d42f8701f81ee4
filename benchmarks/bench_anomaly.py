"""Anomaly maps from a DDPM of normal images, against two baselines, and what start and sample steps cost.

    python benchmarks/bench_anomaly.py [--steps 1500] [--seeds 3] [--size 32]

No anomaly data set reaches these machines, so ``ddpmseg.anomaly.synthetic``
makes one (``--train`` normal textures; a test set of ``--good`` normal ones
and ``--defects`` copies of each defect kind: blob, scratch, swap, with
masks). ``ddpmseg train-ddpm`` trains the default small ADM of ``--size`` on
the normal images only (batch 16, lr 2e-4). Then ``ddpmseg anomaly`` maps the
test set for several settings (start steps, DDIM sample steps, ancestral),
each for ``--seeds`` noise seeds, scored by ``evaluate-anomaly``'s metrics
(pixel AUROC, AUPRO to 30 % FPR, best Dice, image AUROC), with the seconds
per image. Baselines, scored the same way:

mean-image  the per-pixel distance (mean over channels of |x - m|) to the mean
            normal training image: what a model that knows only the average
            normal image finds
random      a uniform random map (chance: AUROC 0.5)

Prints one JSON object per (setting, seed) and a summary (mean, sample std).
Everything printed is saved in benchmarks/results/.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from _common import Results
from ddpmseg.anomaly.detect import anomaly_maps
from ddpmseg.anomaly.metrics import evaluate_anomaly
from ddpmseg.anomaly.synthetic import make_anomaly_dataset
from ddpmseg.train import TrainConfig, train_ddpm

SETTINGS = [  # name -> anomaly_maps arguments
    ("t250_ddim10", dict(start_steps=[250], sample_steps=10)),
    ("t250_ddim50", dict(start_steps=[250], sample_steps=50)),
    ("t100_ddim50", dict(start_steps=[100], sample_steps=50)),
    ("t400_ddim50", dict(start_steps=[400], sample_steps=50)),
    ("t100+250+400_ddim50 (default)", dict(  # heal's defaults until the real-defects benchmarkstart_steps=[100, 250, 400], sample_steps=50)),
    ("t250_ancestral", dict(start_steps=[250], ancestral=True)),
]


def _baseline(name: str, data: Path, out: Path, seed: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    mean = np.mean([np.asarray(Image.open(p).convert("RGB"), np.float64) / 255 for p in (data / "train").glob("*.png")], 0)
    rng = np.random.default_rng(seed)
    for p in sorted((data / "test").glob("*.png")):
        x = np.asarray(Image.open(p).convert("RGB"), np.float64) / 255
        m = np.abs(x - mean).mean(2) if name == "mean-image" else rng.random(x.shape[:2])
        np.save(out / f"{p.stem}_anomaly.npy", m.astype(np.float32))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1500, help="train-ddpm steps")
    ap.add_argument("--seeds", type=int, default=3, help="noise seeds of the anomaly step")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--train", type=int, default=256)
    ap.add_argument("--good", type=int, default=16)
    ap.add_argument("--defects", type=int, default=8, help="test images per defect kind")
    args = ap.parse_args()
    torch.set_num_threads(2)
    rows: dict[str, list[dict]] = {}
    metrics = ("pixel_auroc", "aupro_30", "best_dice", "image_auroc")
    with Results("anomaly", args) as log, tempfile.TemporaryDirectory(prefix="ddpmseg-anomaly-") as tmp:
        work = Path(tmp)
        data = make_anomaly_dataset(work / "data", args.train, args.good, args.defects, args.size, seed=0)
        t0 = time.perf_counter()
        run = work / "run"
        train_ddpm([data / "train"], run, TrainConfig(steps=args.steps, batch_size=16, lr=2e-4, save_every=args.steps,
                                                      sample_every=args.steps, n_samples=16, sample_steps=50),
                   image_size=args.size, device="cpu")
        log.row("anomaly_train", steps=args.steps, seconds=round(time.perf_counter() - t0), train_images=args.train)
        for seed in range(args.seeds):
            for i, (name, kw) in enumerate(SETTINGS):
                out = work / f"maps_{i}_{seed}"
                s = anomaly_maps([data / "test"], run, out, method="heal", seed=seed, save_maps=True, device="cpu", **kw)
                r = evaluate_anomaly(out, data / "masks")
                row = log.row("anomaly", setting=name, seed=seed, s_per_image=round(s.seconds / s.n_images, 3),
                              **{k: (None if r[k] is None else round(r[k], 4)) for k in metrics})
                rows.setdefault(name, []).append(row)
            for name in ("mean-image", "random"):
                out = work / f"base_{name}_{seed}"
                _baseline(name, data, out, seed)
                r = evaluate_anomaly(out, data / "masks")
                row = log.row("anomaly", setting=f"baseline: {name}", seed=seed,
                              **{k: (None if r[k] is None else round(r[k], 4)) for k in metrics})
                rows.setdefault(row["setting"], []).append(row)
        for name, rs in rows.items():
            summary = {"setting": name, "seeds": len(rs)}
            for k in (*metrics, "s_per_image"):
                vals = [r[k] for r in rs if r.get(k) is not None]
                if vals:
                    summary[f"{k}_mean"] = round(statistics.mean(vals), 4)
                    summary[f"{k}_std"] = round(statistics.stdev(vals), 4) if len(vals) > 1 else 0.0
            log.row("anomaly_summary", **summary)


if __name__ == "__main__":
    main()
