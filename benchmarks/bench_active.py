"""Which image to label next, and can the confidence be trusted? Active labelling and calibration on FASSEG.

    python benchmarks/bench_active.py [--kinds trained,tiny] [--seeds 3] [--rounds 6] [--noise-samples 1,4,8]

Real faces (FASSEG frontal02, research use only, read in place): the first 10
photos (sorted names) are the unlabelled pool, the last 10 are held out.
Features of the 32 px DDPM that ``bench_trained_features.py`` trains
(``trained``; trained first if missing) and of the demo's random-weight tiny
ADM (``tiny``).

Active labelling: per seed, 2 pool photos drawn at random are labelled; each
round fits the ensemble (the default tiles recipe, 10 members) on the
labelled photos, scores the held-out photos (mIoU at the original size, as
``ddpmseg evaluate``), ranks the rest of the pool with the strategies of
``ddpmseg suggest`` (uncertainty, bald, diversity; from the pool's cached
maps) or at random, and labels the first. Printed: held-out mIoU per round,
strategy and seed, then per strategy the mean curve and the mean labels it
needs to reach random's final mIoU.

Calibration (features of ``--noise-samples`` N = 1, 4, 8 draws, extracted
for all 20 photos; fits on the 10 pool photos, 3 seeds): held-out ECE of the
ensemble's mean softmax and the mean ECE of its single members (before
averaging), both as ``ddpmseg evaluate`` computes it (15 bins,
``ddpmseg.metrics.Calibration``, at the photos' original size), held-out
mIoU, extraction seconds per photo. Everything printed is saved in
benchmarks/results/.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from _common import FASSEG, Results, add_to_calibration, calibration
from ddpmseg import data
from ddpmseg.active.strategies import embedding, image_scores, rank
from ddpmseg.heads.mlp import PixelEnsemble
from ddpmseg.features.cache import FeatureCache
from ddpmseg.features.pixels import CachePixels
from ddpmseg.metrics import SegmentationScore
from ddpmseg.pipeline import extract_features
from ddpmseg.records import ExtractConfig

TRAINED_STEPS = 2400
STRATEGIES = ("random", "uncertainty", "bald", "diversity")


def _checkpoint(kind: str, work: Path) -> tuple[Path, dict]:
    if kind == "tiny":
        from ddpmseg.demo import make_tiny_checkpoint

        ckpt, flags = make_tiny_checkpoint(work)
        return ckpt, {"model_flags": flags}
    from bench_trained_features import fasseg_ddpm

    return fasseg_ddpm(TRAINED_STEPS, 400), {}


class World:
    """One cache of the 20 photos, their labels on the grid and at the original size."""

    def __init__(self, cache: Path, labels: Path, labelset: data.LabelSet) -> None:
        self.cache = FeatureCache(cache)
        self.labelset = labelset
        self.ids = self.cache.image_ids
        self.maps = {i: self.cache.block_maps(i) for i in self.ids}
        self.pre = {i: data.Preprocess.from_dict(self.cache.preprocess(i)) for i in self.ids}
        self.truth = {i: data.load_mask(data.find_mask(i, labels), labelset, expected_size=self.pre[i].original_size)
                      for i in self.ids}
        self.grid = {i: data.apply_min_pixels(data.prepare_mask(self.truth[i], self.pre[i]), 20, 255) for i in self.ids}

    def fit(self, ids: list[str], seed: int) -> PixelEnsemble:
        src = CachePixels([self.maps[i] for i in ids], self.cache.keys, self.cache.image_size)
        y = np.concatenate([self.grid[i].ravel() for i in ids])
        return PixelEnsemble(n_classes=self.labelset.n_classes, random_state=seed, recipe="tiles").fit(src, y)

    def score(self, est: PixelEnsemble, ids: list[str]) -> tuple[float, float, float]:
        """(held-out mIoU, ECE of the mean softmax, mean member ECE) over ``ids`` (ECE as `evaluate`)."""
        k, size, ignore = self.labelset.n_classes, self.cache.image_size, self.labelset.ignore_index
        s, ens = SegmentationScore(k, ignore), calibration(ignore)
        members = [calibration(ignore) for _ in range(est.n_members_)]
        for i in ids:
            seg = est.predict_block_maps(self.maps[i], self.cache.keys, size)
            s.update(data.restore_labels(seg.labels, self.pre[i]), self.truth[i])
            add_to_calibration(ens, seg.proba, self.pre[i], self.truth[i])
            logits = est.predict_member_logits(CachePixels([self.maps[i]], self.cache.keys, size))  # (M, S*S, K)
            for m, z in zip(members, logits):
                add_to_calibration(m, z.softmax(-1).T.reshape(k, size, size).numpy(), self.pre[i], self.truth[i])
        return 100 * s.result()["miou"], ens.ece(), float(np.mean([m.ece() for m in members]))


def active_run(world: World, pool: list[str], test: list[str], strategy: str, seed: int, rounds: int) -> list[float]:
    rng = np.random.default_rng(seed)
    labelled = list(rng.choice(pool, 2, replace=False))
    curve = []
    for r in range(rounds + 1):
        est = world.fit(labelled, seed)
        curve.append(world.score(est, test)[0])
        rest = [i for i in pool if i not in labelled]
        if r == rounds or not rest:
            break
        if strategy == "random":
            labelled.append(str(rng.choice(rest)))
            continue
        size = world.cache.image_size
        segs = [est.predict_block_maps(world.maps[i], world.cache.keys, size) for i in rest]
        scores = {k: np.array([image_scores(seg.uncertainty)[k] for seg in segs]) for k in ("uncertainty", "bald")}
        emb = known = None
        if strategy == "diversity":  # as `suggest` given the pool with the labelled photos in it
            emb = np.stack([embedding(world.maps[i]) for i in rest])
            known = np.stack([embedding(world.maps[i]) for i in labelled])
        labelled.append(rest[rank(scores, 1, strategy, emb, known)[0][0]])
    return curve


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=FASSEG)
    ap.add_argument("--kinds", type=lambda s: s.split(","), default=["trained", "tiny"])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--noise-samples", type=lambda s: [int(v) for v in s.split(",")], default=[1, 4, 8])
    args = ap.parse_args()
    torch.set_num_threads(2)
    images = sorted((args.data / "train" / "images").glob("*.png"))
    labels = args.data / "train" / "labels"
    labelset = data.load_label_set(str(args.data / "classes.csv"))
    with Results("active", args) as out, tempfile.TemporaryDirectory(prefix="ddpmseg-active-") as tmp:
        work = Path(tmp)
        for kind in args.kinds:
            ckpt, kw = _checkpoint(kind, work)
            worlds = {}
            for n in args.noise_samples:
                t0 = time.perf_counter()
                feats = work / f"{kind}_n{n}.h5"
                extract_features(ckpt, images, feats, config=ExtractConfig(noise_samples=n), device="cpu", **kw)
                seconds = (time.perf_counter() - t0) / len(images)
                worlds[n] = World(feats, labels, labelset)
                pool, test = worlds[n].ids[:10], worlds[n].ids[-10:]
                rows = [worlds[n].score(worlds[n].fit(pool, seed), test) for seed in range(args.seeds)]
                line = {"kind": kind, "noise_samples": n, "extract_s_per_image": round(seconds, 3),
                        "ece_at": "original size"}
                for j, key in enumerate(("heldout_miou", "ece_ensemble", "ece_members")):
                    vals = [r[j] for r in rows]
                    line[f"{key}_mean"] = round(statistics.mean(vals), 4)
                    line[f"{key}_std"] = round(statistics.stdev(vals), 4) if len(vals) > 1 else 0.0
                out.row("calibration", **line)
            world = worlds[args.noise_samples[0]]
            pool, test = world.ids[:10], world.ids[-10:]
            curves: dict[str, list[list[float]]] = {}
            for strategy in STRATEGIES:
                for seed in range(args.seeds):
                    curve = active_run(world, pool, test, strategy, seed, args.rounds)
                    curves.setdefault(strategy, []).append(curve)
                    out.row("active", kind=kind, strategy=strategy, seed=seed, labelled=list(range(2, 2 + len(curve))),
                            heldout_miou=[round(v, 2) for v in curve])
            target = statistics.mean(c[-1] for c in curves["random"])
            for strategy, cs in curves.items():
                mean = np.mean(cs, axis=0)
                reach = next((2 + i for i, v in enumerate(mean) if v >= target), None)
                out.row("active_summary", kind=kind, strategy=strategy, labelled=list(range(2, 2 + len(mean))),
                        mean_curve=[round(float(v), 2) for v in mean],
                        std_curve=[round(float(v), 2) for v in np.std(cs, axis=0, ddof=1)],
                        area=round(float(mean.mean()), 2), labels_to_reach_random_final=reach)
            for w in worlds.values():
                w.cache.close()


if __name__ == "__main__":
    main()
