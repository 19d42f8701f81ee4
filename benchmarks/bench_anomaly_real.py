"""Anomaly detection on real defects: ELPV solar cells, heal and knn against the mean-image baseline.

    pip install elpv-dataset==1.0.0.post1
    python benchmarks/bench_anomaly_real.py [--size 32] [--seeds 3] [--steps 1500] [--parts baseline,heal,healx,knn]
        [--starts 100,250,400,600] [--variants residual,scaling,all,greedy1,single,random,greedy10,scores]

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

Per seed, on the 200 test images, image AUROC of (``--parts``):

- baseline, the mean image: the distance to the mean normal training image (mean over
  channels of ``|x - m|`` at the model grid), score the mean of its top 1 % (and, as
  rows of their own, the other image scores the detectors are tried with);
- heal: ``ddpmseg anomaly --method heal --sample-steps 50`` (scored by the top 1 %: heal's
  settings before this benchmark) from each single start step (``--starts``) and
  combinations of them (heal's default three 100, 250, 400; all four; 100 + 250); image
  score the top 1 % mean or the map's maximum; and (variant ``residual``) a feature
  residual: the distance between the DDPM patch features of the image and of its
  healed image (t 250), score its maximum;
- healx: one heal per (start, DDIM steps) of ``--healx`` and, from it, the residual in
  colour (heal's: the mean over channels of ``|x - healed|``) or grey (``|grey(x) -
  grey(healed)|``), mapped back to the original size as ``anomaly`` does and scored
  by the mean of its top 0.1 to 50 %, its maximum, or normalised per image (top 1 %
  over the map's mean; minus its median): ``anomaly --start-steps T --sample-steps
  N`` with another image score;
- knn: ``ddpmseg anomaly --method knn`` with its defaults (the bank of the training
  images' patches: PatchCore's greedy 1 % coreset until the first real-defects
  table, every patch since; grid half the model's) and variants (``--variants``):
  all patches, the greedy 1 % (``greedy1``), a random 1 % or 10 %, a greedy 10 %, no
  per-block scaling, one timestep or one block alone, and (``scores``) each variant
  scored by the mean of its top 0.1 to 50 % of patch distances instead of the
  largest; with the bank's size, build time and seconds per image.

Architecture and budget: at 32 px train-ddpm's default (32 channels, mults 1,2,2);
at 64 px the same widths with one level more (mults 1,2,2,2; ``narrow_flags``), since
the 64 px default (64 channels, 1,2,3,4) takes ~12 s a step on 2 CPU cores. The
32 px runs train 1,500 steps; the 64 px ones were given 400 (``--steps 400``: ~2.4-3.3 s
a step single-threaded, 16-22 min a seed; 1,500 would take ~1-1.4 h a seed).

Prints one JSON line per (setting, seed) and a summary per setting (mean, sample sd).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
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
from ddpmseg.anomaly.config import KNN_CORESET
from ddpmseg.anomaly.heal import Healer
from ddpmseg.anomaly.metrics import image_auroc
from ddpmseg.backbones import create_backbone, runs
from ddpmseg.features.extractor import make_noise
from ddpmseg.metrics import top_mean
from ddpmseg.options import DEFAULT_STEPS
from ddpmseg.train import TrainConfig, train_ddpm
from ddpmseg.train.config import small_architecture

CACHE = Path(os.environ.get("DDPMSEG_BENCH_CACHE", Path.home() / ".cache" / "ddpmseg" / "bench")) / "elpv"
STARTS = (100, 250, 400, 600)
HEAL_DDIM = 50  # the heal part's DDIM steps and top 1 % score: heal's defaults before this benchmark set new ones
COMBOS = ((100, 250, 400), (100, 250, 400, 600), (100, 250))  # heal's default three, all four, the two smallest
HEALX = ((50, 10), (100, 50), (100, 10), (250, 10))  # healx: (start step, DDIM steps); --healx picks some
VARIANTS = ("residual", "scaling", "all", "greedy1", "single", "random", "greedy10", "scores")
FRACTIONS = (0.1, 1, 5, 10, 20, 50)  # image scores: the mean of the map's top f %


def healx_scores(colour: np.ndarray, grey: np.ndarray) -> dict[str, float]:
    """Image scores of one healed image's residual maps (colour: mean over channels of |x - healed|;
    grey: |grey(x) - grey(healed)|): top fractions, the maximum, and per-image normalised."""
    out = {f"top {f:g} %": top_mean(colour, f / 100) for f in FRACTIONS}
    out["max"] = float(colour.max())
    out["grey, top 1 %"] = top_mean(grey, 0.01)
    out["top 1 % / mean"] = top_mean(colour, 0.01) / max(float(colour.mean()), 1e-8)
    out["top 1 % - median"] = top_mean(colour, 0.01) - float(np.median(colour))
    return out


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
        config = TrainConfig(steps=steps, batch_size=16, lr=2e-4, save_every=100, sample_every=500, seed=seed,
                             keep_last=1)
        arch = dict(image_size=size) if size == 32 else dict(model_flags=narrow_flags(size))
        train_ddpm([folder], run, config, **arch, device="cpu", progress=True)
    return run


def narrow_flags(size: int) -> Path:
    """train-ddpm's 32 px architecture (32 channels) with one level more per doubling of ``size``: the
    default 64 px one (64 channels, 1,2,3,4) takes ~12 s a step on 2 CPU cores, this one ~4x the 32 px."""
    levels = int(math.log2(size // 32))
    cfg = small_architecture(32)
    cfg = dataclasses.replace(cfg, image_size=size, channel_mult=cfg.channel_mult + ",2" * levels)
    path = CACHE / f"flags{size}.json"
    path.write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    return path


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
    ap.add_argument("--starts", default=",".join(map(str, STARTS)), help="heal's start steps, each alone")
    ap.add_argument("--grid", type=int, default=0, help="knn's patch grid (0: anomaly's default, half the model grid)")
    ap.add_argument("--healx", default=",".join(f"{t}/{n}" for t, n in HEALX), help="healx: START/DDIM-STEPS,...")
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help=f"of {','.join(VARIANTS)}: heal's feature residual and knn's variants (default: all)")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    starts = [int(s) for s in args.starts.split(",")]
    variants = set(args.variants.split(",")) | {"default"}
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
            trained = runs.step_of(runs.latest_ema(run)[0])  # with --no-train, what the cached run has
            log.row("anomaly_real_train", seed=seed, size=args.size, steps=trained, train_images=len(train),
                    seconds_this_call=round(time.perf_counter() - t0))
            backbone = create_backbone(run, device="cpu")
            size = backbone.image_size
            grid_in = lambda p: data.preprocess_image(data.load_rgb(p), size, "resize")[0]  # noqa: E731
            noise = make_noise(seed, size)  # extract's (and anomaly's) fixed noise of the seed
            if "baseline" in parts:
                mean = torch.stack([grid_in(p)[0] for p in train]).mean(0)
                diff = {p.stem: ((grid_in(p)[0] - mean).abs().mean(0) / 2).numpy() for p in test}
                record("baseline: mean image", seed, {k: top_mean(d, 0.01) for k, d in diff.items()})
                for f in FRACTIONS:  # the baseline given each image score the detectors are tried with
                    if f != 1:
                        record(f"baseline: mean image, top {f:g} %", seed, {k: top_mean(d, f / 100) for k, d in diff.items()})
                record("baseline: mean image, max", seed, {k: float(d.max()) for k, d in diff.items()})
            if "heal" in parts:
                maps: dict[int, dict[str, np.ndarray]] = {}
                for s in starts:
                    out = work / f"heal{s}-{seed}"
                    summary = anomaly_maps(test, run, out, method="heal", start_steps=[s], sample_steps=HEAL_DDIM,
                                           seed=seed, save_maps=True, device="cpu")
                    maps[s] = {p.stem: np.load(out / f"{p.stem}_anomaly.npy") for p in test}
                    # scored here, not by scores.csv: these rows keep heal's settings before the table, whatever
                    # anomaly's defaults are now
                    record(f"heal t{s}, top 1 %", seed, {k: top_mean(m, 0.01) for k, m in maps[s].items()},
                           s_per_image=round(summary.seconds / len(test), 3))
                    record(f"heal t{s}, max", seed, {k: float(m.max()) for k, m in maps[s].items()})
                for combo in COMBOS:
                    if set(combo) <= set(starts):
                        combined = {k: np.mean([maps[s][k] for s in combo], 0) for k in maps[starts[0]]}
                        name = "heal t" + "+".join(map(str, combo))
                        record(f"{name}, top 1 %", seed, {k: top_mean(m, 0.01) for k, m in combined.items()})
                        record(f"{name}, max", seed, {k: float(m.max()) for k, m in combined.items()})
            if "heal" in parts and "residual" in variants:
                # the feature residual: DDPM patch features of the image against those of its healed image
                healer = Healer(backbone, HEAL_DDIM, False, "fp32", seed)
                settings = knn.KnnSettings(DEFAULT_STEPS, tuple(backbone.default_blocks()), seed, knn.default_grid(size))
                scores = {}
                for p in test:
                    x0 = grid_in(p)
                    healed = healer.heal(x0, 250, noise)
                    f = knn.patch_features(backbone, x0, noise, settings)
                    g = knn.patch_features(backbone, healed.cpu(), noise, settings)
                    scores[p.stem] = float((f - g).norm(dim=1).max())
                record("heal t250, feature residual, max", seed, scores)
            if "healx" in parts:  # residual and image score variants, from one heal per (start, sample steps)
                for start, steps in [map(int, x.split("/")) for x in args.healx.split(",")]:
                    healer = Healer(backbone, steps, False, "fp32", seed)
                    found: dict[str, dict[str, float]] = {}
                    t1 = time.perf_counter()
                    for lo in range(0, len(test), 4):  # anomaly's batches: the same DDIM paths
                        batch = test[lo : lo + 4]
                        prepared = [data.preprocess_image(data.load_rgb(p), size, "resize") for p in batch]
                        x0 = torch.cat([x for x, _ in prepared])
                        h = healer.heal(x0, start, noise.expand(len(batch), -1, -1, -1)).cpu()
                        colour = ((x0 - h).abs().mean(1) / 2).numpy()
                        grey = ((x0.mean(1) - h.mean(1)).abs() / 2).numpy()
                        for p, c, g, (_, pre) in zip(batch, colour, grey, prepared):
                            # scored at the original size, as anomaly scores its maps
                            full = [data.restore_map(m, pre, fill=0.0) for m in (c, g)]
                            for name, value in healx_scores(*full).items():
                                found.setdefault(name, {})[p.stem] = value
                    seconds = (time.perf_counter() - t1) / len(test)
                    for name, scores in found.items():
                        record(f"heal t{start} ({steps} DDIM steps), {name}", seed, scores,
                               **({"s_per_image": round(seconds, 3)} if name == "top 1 %" else {}))
            if "knn" in parts:
                out = work / f"knn-{seed}"
                t1 = time.perf_counter()
                kw = dict(method="knn", normal=train, seed=seed, grid=args.grid, device="cpu")
                summary = anomaly_maps(test[:1], run, out, **kw)
                bank_seconds = time.perf_counter() - t1 - summary.seconds
                summary = anomaly_maps(test, run, out, **kw, overwrite=True)
                bank = knn.PatchBank.load(out / knn.BANK_FILE)
                grid = args.grid or knn.default_grid(size)
                at = "" if not args.grid else f" (grid {grid})"  # variants' names: the default grid unsaid
                what = "all patches (no coreset)" if KNN_CORESET >= 1 else f"coreset {100 * KNN_CORESET:g} %, grid S/2"
                record(f"knn, {what}{at} (default)", seed, summary.scores,
                       s_per_image=round(summary.seconds / len(test), 3), bank_build_s=round(bank_seconds, 1),
                       bank_patches=len(bank.vectors), dims=int(bank.vectors.shape[1]),
                       bank_mb=round(bank.vectors.numel() * 4 / 2**20, 1), radius=round(bank.radius, 3),
                       peak_rss_mb=peak_rss_mb())
                if not variants & {"scaling", "all", "greedy1", "single", "random", "greedy10"}:
                    continue
                base = knn.KnnSettings(DEFAULT_STEPS, tuple(backbone.default_blocks()), seed, grid)
                widths = knn.block_widths(backbone, base)
                keys = [(t, b) for t in base.steps for b in base.blocks]
                feats = [knn.patch_features(backbone, grid_in(p), noise, base) for p in train]
                tests = {p.stem: knn.patch_features(backbone, grid_in(p), noise, base) for p in test}

                def variant(name: str, columns: list[int] | None = None, **kw) -> None:
                    """A bank of the columns (t, block parts) ``columns`` of the patch vectors, settings ``kw``."""
                    cols = list(range(len(keys))) if columns is None else columns
                    edges = np.cumsum([0, *widths])
                    idx = torch.cat([torch.arange(edges[c], edges[c + 1]) for c in cols])
                    settings = dataclasses.replace(base, **kw)
                    t1 = time.perf_counter()
                    b = knn.build_bank([f[:, idx] for f in feats], [widths[c] for c in cols], settings, "")
                    built = time.perf_counter() - t1
                    t1 = time.perf_counter()
                    dists = {k: b.distances(v[:, idx]).numpy() for k, v in tests.items()}
                    record(f"knn, {name}{at}", seed, {k: float(d.max()) for k, d in dists.items()},
                           bank_build_s=round(built, 1), bank_patches=len(b.vectors),
                           s_per_image_distances=round((time.perf_counter() - t1) / len(tests), 4))
                    if "scores" in variants:  # the image score: the mean of the top f % of patch distances
                        for f in FRACTIONS:
                            record(f"knn, {name}{at}, top {f:g} %", seed, {k: top_mean(d, f / 100) for k, d in dists.items()})

                if "scaling" in variants:
                    variant("no per-block scaling", scale=False)
                if "all" in variants:  # (the default's bank again, for its top-f scores)
                    variant("all patches (no coreset)", coreset=1.0)
                if "greedy1" in variants:  # PatchCore's 1 % (anomaly's default before the real-defects table)
                    variant("coreset 1 %, grid S/2", coreset=0.01)
                if "single" in variants:
                    for t in base.steps:  # one timestep's blocks alone
                        variant(f"t{t} only", [i for i, k in enumerate(keys) if k[0] == t])
                    for blk in base.blocks:  # one block at every timestep
                        variant(f"block {blk} only", [i for i, k in enumerate(keys) if k[1] == blk])
                if "random" in variants:  # a random 10 % / 1 % of the patches (the probe), not the greedy coreset
                    x = torch.cat(feats)
                    pick = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[: round(0.1 * len(x))]
                    every = dataclasses.replace(base, coreset=1.0)
                    b = knn.build_bank([x[pick]], widths, every, "")
                    record(f"knn, random 10 %{at}", seed, {k: float(b.distances(v).max()) for k, v in tests.items()})
                    pick = pick[: round(0.01 * len(x))]
                    b = knn.build_bank([x[pick]], widths, every, "")
                    record(f"knn, random 1 %{at}", seed, {k: float(b.distances(v).max()) for k, v in tests.items()})
                if "greedy10" in variants:  # 10x the greedy steps of the default
                    variant("coreset 10 %", coreset=0.1)
        for name, vals in rows.items():
            log.row("anomaly_real_summary", setting=name, size=args.size, seeds=len(vals),
                    image_auroc_mean=round(statistics.mean(vals), 4),
                    image_auroc_std=round(statistics.stdev(vals), 4) if len(vals) > 1 else 0.0)


if __name__ == "__main__":
    main()
