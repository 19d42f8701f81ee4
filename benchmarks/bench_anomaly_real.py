"""Anomaly detection on real defects: ELPV solar cells, heal and knn against the mean-image baseline.

    pip install elpv-dataset==1.0.0.post1
    python benchmarks/bench_anomaly_real.py [--size 32] [--seeds 3] [--steps 1500] [--parts heal,knn]

Data: ELPV (``elpv-dataset`` on PyPI, 2,624 greyscale 300x300 electroluminescence
images of solar cells, each rated defective with probability 0, 1/3, 2/3 or 1;
CC BY-NC-SA 4.0: Buerhop-Lutz et al., EU PVSEC 2018; Deitsch et al., Solar
Energy 185, 2019), read where pip installed it, never copied. Per-image labels
only: no masks, so the figure is image AUROC.

Split (the same for every seed): monocrystalline cells; normal = probability 0,
defective = probability 1; the test set is ``random.Random(0).sample`` of 100
of each, the other 488 normal cells train the DDPM (``train-ddpm --image-size
SIZE --batch-size 16 --lr 2e-4``, ``--steps``, its seed = the benchmark seed;
kept in ``$DDPMSEG_BENCH_CACHE/elpv/`` and resumed there) and fill knn's bank.

Per seed, on the 200 test images, image AUROC of:

- mean-image: the distance to the mean normal training image (mean over channels
  of ``|x - m|`` at the model grid), score the mean of its top 1 % (as heal's);
- heal: ``ddpmseg anomaly --method heal`` from each single start step, and the
  default three (100, 250, 400) combined; image score the top 1 % mean or the map's
  maximum; and a feature residual: the distance between the DDPM patch features
  of the image and of its healed image (t 250), score its maximum;
- knn: ``ddpmseg anomaly --method knn`` (bank of the training images' patches,
  greedy coreset 1 %, grid half the model's) and variants: all patches (and,
  with ``--greedy10``, a greedy 10 %), a random 1 % or 10 % instead of the
  greedy coreset, no per-block scaling, one timestep or one block alone; with
  the bank's size, build time and seconds per image. (The full grid is left out: 4x the patches make
  the greedy coreset ~16x slower, over an hour per seed on 2 CPU cores.)

Prints one JSON line per (setting, seed) and a summary per setting (mean, sample sd).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from _common import Results, peak_rss_mb
from ddpmseg import data
from ddpmseg.anomaly import knn
from ddpmseg.anomaly.detect import anomaly_maps
from ddpmseg.anomaly.heal import Healer
from ddpmseg.anomaly.metrics import image_auroc
from ddpmseg.backbones import create_backbone
from ddpmseg.features.extractor import make_noise
from ddpmseg.metrics import top_mean
from ddpmseg.options import DEFAULT_STEPS
from ddpmseg.train import TrainConfig, train_ddpm

CACHE = Path(os.environ.get("DDPMSEG_BENCH_CACHE", Path.home() / ".cache" / "ddpmseg" / "bench")) / "elpv"
STARTS = (100, 250, 400, 600)
DEFAULT_STARTS = (100, 250, 400)


def elpv_split() -> tuple[list[Path], list[Path], list[Path]]:
    """(train normals, test normals, test defectives) of the monocrystalline cells."""
    spec = importlib.util.find_spec("elpv_dataset")
    if spec is None or spec.origin is None:
        raise SystemExit("ELPV is not installed: pip install elpv-dataset==1.0.0.post1")
    root = Path(spec.origin).parent / "data"
    rows = [line.split() for line in (root / "labels.csv").read_text().splitlines() if line.strip()]
    mono = [(p, float(q)) for p, q, kind in rows if kind == "mono"]
    normal = sorted(p for p, q in mono if q == 0.0)
    bad = sorted(p for p, q in mono if q == 1.0)
    rng = random.Random(0)
    test_normal = sorted(rng.sample(normal, 100))
    test_bad = sorted(rng.sample(bad, 100))
    train = [p for p in normal if p not in set(test_normal)]
    return [root / p for p in train], [root / p for p in test_normal], [root / p for p in test_bad]


def trained_run(train: list[Path], size: int, seed: int, steps: int) -> Path:
    """The DDPM of the training normals (trained, or resumed to ``steps``, in the cache)."""
    folder = CACHE / "train"  # links to the training images, so train-ddpm reads one folder
    folder.mkdir(parents=True, exist_ok=True)
    for p in train:
        link = folder / p.name
        if not link.exists():
            link.symlink_to(p)
    run = CACHE / f"run{size}-s{seed}"
    if (run / "train.json").is_file():
        train_ddpm([folder], run, resume=True, steps=steps, device="cpu", progress=True)
    else:
        config = TrainConfig(steps=steps, batch_size=16, lr=2e-4, save_every=500, sample_every=500, seed=seed,
                             keep_last=1)
        train_ddpm([folder], run, config, image_size=size, device="cpu", progress=True)
    return run


def auroc(scores: dict[str, float], bad: set[str]) -> float:
    names = sorted(scores)
    return round(float(image_auroc([scores[n] for n in names], [n in bad for n in names])), 4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=1500, help="train-ddpm steps")
    ap.add_argument("--parts", default="baseline,heal,knn")
    ap.add_argument("--limit", type=int, default=0, help="test images of each kind (0: all 100); for a quick try")
    ap.add_argument("--no-train", action="store_true", help="use the cached runs as they are (a quick try)")
    ap.add_argument("--greedy10", action="store_true", help="also a greedy coreset of 10 % (~3 min per seed alone)")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    train, test_normal, test_bad = elpv_split()
    if args.limit:
        test_normal, test_bad = test_normal[: args.limit], test_bad[: args.limit]
    test = test_normal + test_bad
    bad = {p.stem for p in test_bad}
    rows: dict[str, list[float]] = {}
    with Results("anomaly_real", args) as log, tempfile.TemporaryDirectory(prefix="ddpmseg-elpv-") as tmp:
        work = Path(tmp)

        def record(setting: str, seed: int, scores: dict[str, float], **extra) -> None:
            a = auroc(scores, bad)
            rows.setdefault(setting, []).append(a)
            log.row("anomaly_real", setting=setting, seed=seed, size=args.size, image_auroc=a, **extra)

        for seed in range(args.seeds):
            t0 = time.perf_counter()
            run = CACHE / f"run{args.size}-s{seed}" if args.no_train else trained_run(train, args.size, seed, args.steps)
            log.row("anomaly_real_train", seed=seed, size=args.size, steps=args.steps, train_images=len(train),
                    seconds_this_call=round(time.perf_counter() - t0))
            backbone = create_backbone(run, device="cpu")
            size = backbone.image_size
            grid_in = lambda p: data.preprocess_image(data.load_rgb(p), size, "resize")[0]  # noqa: E731
            if "baseline" in parts:
                mean = torch.stack([grid_in(p)[0] for p in train]).mean(0)
                scores = {p.stem: top_mean(((grid_in(p)[0] - mean).abs().mean(0) / 2).numpy(), 0.01) for p in test}
                record("baseline: mean image", seed, scores)
            if "heal" in parts:
                maps: dict[int, dict[str, np.ndarray]] = {}
                for s in STARTS:
                    out = work / f"heal{s}-{seed}"
                    summary = anomaly_maps(test, run, out, method="heal", start_steps=[s], seed=seed, save_maps=True,
                                           device="cpu")
                    maps[s] = {p.stem: np.load(out / f"{p.stem}_anomaly.npy") for p in test}
                    record(f"heal t{s}, top 1 %", seed, summary.scores, s_per_image=round(summary.seconds / len(test), 3))
                    record(f"heal t{s}, max", seed, {k: float(m.max()) for k, m in maps[s].items()})
                combined = {k: np.mean([maps[s][k] for s in DEFAULT_STARTS], 0) for k in maps[STARTS[0]]}
                record("heal t100+250+400 (default), top 1 %", seed, {k: top_mean(m, 0.01) for k, m in combined.items()})
                record("heal t100+250+400, max", seed, {k: float(m.max()) for k, m in combined.items()})
                allfour = {k: np.mean([maps[s][k] for s in STARTS], 0) for k in maps[STARTS[0]]}
                record("heal t100+250+400+600, top 1 %", seed, {k: top_mean(m, 0.01) for k, m in allfour.items()})
                # the feature residual: DDPM patch features of the image against those of its healed image
                healer = Healer(backbone, 50, False, "fp32", seed)
                noise = make_noise(seed, size)
                settings = knn.KnnSettings(DEFAULT_STEPS, tuple(backbone.default_blocks()), seed, max(1, size // 2))
                scores = {}
                for p in test:
                    x0 = grid_in(p)
                    healed = healer.heal(x0, 250, noise)
                    f = knn.patch_features(backbone, x0, noise, settings)
                    g = knn.patch_features(backbone, healed.cpu(), noise, settings)
                    scores[p.stem] = float((f - g).norm(dim=1).max())
                record("heal t250, feature residual, max", seed, scores)
            if "knn" in parts:
                out = work / f"knn-{seed}"
                t1 = time.perf_counter()
                summary = anomaly_maps(test[:1], run, out, method="knn", normal=train, seed=seed, device="cpu")
                bank_seconds = time.perf_counter() - t1 - summary.seconds
                summary = anomaly_maps(test, run, out, method="knn", normal=train, seed=seed, device="cpu", overwrite=True)
                bank = knn.PatchBank.load(out / knn.BANK_FILE)
                record("knn, coreset 1 %, grid S/2 (default)", seed, summary.scores,
                       s_per_image=round(summary.seconds / len(test), 3), bank_build_s=round(bank_seconds, 1),
                       bank_patches=len(bank.vectors), dims=int(bank.vectors.shape[1]),
                       bank_mb=round(bank.vectors.numel() * 4 / 2**20, 1), radius=round(bank.radius, 3),
                       peak_rss_mb=peak_rss_mb())
                noise = make_noise(seed, size)
                base = knn.KnnSettings(DEFAULT_STEPS, tuple(backbone.default_blocks()), seed, max(1, size // 2))
                widths = knn.block_widths(backbone, base)
                keys = [(t, b) for t in base.steps for b in base.blocks]
                feats = [knn.patch_features(backbone, grid_in(p), noise, base) for p in train]
                tests = {p.stem: knn.patch_features(backbone, grid_in(p), noise, base) for p in test}

                def variant(name: str, columns: list[int] | None = None, **kw) -> None:
                    """A bank of the columns (t, block parts) ``columns`` of the patch vectors, settings ``kw``."""
                    cols = list(range(len(keys))) if columns is None else columns
                    edges = np.cumsum([0, *widths])
                    idx = torch.cat([torch.arange(edges[c], edges[c + 1]) for c in cols])
                    settings = knn.KnnSettings(**{**base.__dict__, **kw})
                    t1 = time.perf_counter()
                    b = knn.build_bank([f[:, idx] for f in feats], [widths[c] for c in cols], settings, "")
                    built = time.perf_counter() - t1
                    t1 = time.perf_counter()
                    scores = {k: float(b.distances(v[:, idx]).max()) for k, v in tests.items()}
                    record(f"knn, {name}", seed, scores, bank_build_s=round(built, 1), bank_patches=len(b.vectors),
                           s_per_image_distances=round((time.perf_counter() - t1) / len(tests), 4))

                variant("no per-block scaling", scale=False)
                variant("all patches (no coreset)", coreset=1.0)
                for t in base.steps:  # one timestep's blocks alone
                    variant(f"t{t} only", [i for i, k in enumerate(keys) if k[0] == t])
                for blk in base.blocks:  # one block at every timestep
                    variant(f"block {blk} only", [i for i, k in enumerate(keys) if k[1] == blk])
                # a random 10 % of the patches (the probe) instead of the greedy coreset
                x = torch.cat(feats)
                pick = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[: round(0.1 * len(x))]
                b = knn.build_bank([x[pick]], widths, knn.KnnSettings(**{**base.__dict__, "coreset": 1.0}), "")
                record("knn, random 10 %", seed, {k: float(b.distances(v).max()) for k, v in tests.items()})
                pick = pick[: round(0.01 * len(x))]
                b = knn.build_bank([x[pick]], widths, knn.KnnSettings(**{**base.__dict__, "coreset": 1.0}), "")
                record("knn, random 1 %", seed, {k: float(b.distances(v).max()) for k, v in tests.items()})
                if args.greedy10:  # slow: 10x the greedy steps of the default
                    variant("coreset 10 %", coreset=0.1)
        for name, vals in rows.items():
            log.row("anomaly_real_summary", setting=name, size=args.size, seeds=len(vals),
                    image_auroc_mean=round(statistics.mean(vals), 4),
                    image_auroc_std=round(statistics.stdev(vals), 4) if len(vals) > 1 else 0.0)


if __name__ == "__main__":
    main()
