"""Shared by the benchmark scripts: run one measurement in a fresh child process."""

from __future__ import annotations

import multiprocessing as mp
import queue
import resource
import statistics
from pathlib import Path
from typing import Any, Callable

# Real faces for the quality benchmarks (research use only: read in place, never copied).
FASSEG = Path(__file__).resolve().parents[2] / "shared" / "data" / "fasseg-frontal02"


def peak_rss_mb() -> int:
    """This process's peak resident set size in MiB."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def run_in_child(target: Callable[..., None], *args: Any) -> dict:
    """Call ``target(*args, queue)`` in a spawned process (so its peak RSS is its own); return what it puts."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=target, args=(*args, q))
    p.start()
    while True:  # a child that dies (e.g. killed for memory) must not leave the parent waiting forever
        try:
            result = q.get(timeout=5)
            break
        except queue.Empty:
            if not p.is_alive():
                raise SystemExit(f"{target.__name__}{args}: the child process died (exit code {p.exitcode})")
    p.join()
    return result


def mean_std(values: list[float]) -> dict:
    """Mean and sample standard deviation (0 for one value), rounded, for a summary line."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"seeds": len(values), "miou_mean": round(statistics.mean(values), 4), "miou_std": round(std, 4)}


def heldout_score(model_dir: Path, test_cache: Path, labels: Path) -> dict:
    """Held-out mIoU (x100) at the photos' original size (as ``ddpmseg evaluate`` scores), the ECE of the
    mean softmax on the model grid and the classifier's seconds per image, from a cache of the test
    photos (no re-extraction per fit)."""
    import time

    from ddpmseg import data
    from ddpmseg.features.cache import FeatureCache
    from ddpmseg.metrics import Calibration, SegmentationScore
    from ddpmseg.model import SegmentationModel

    model = SegmentationModel.load(model_dir)
    labelset = model.labelset
    score, calib, seconds = SegmentationScore(labelset.n_classes, labelset.ignore_index), Calibration(), 0.0
    with FeatureCache(test_cache) as cache:
        for image_id in cache.image_ids:
            maps, pre = cache.block_maps(image_id), data.Preprocess.from_dict(cache.preprocess(image_id))
            mask = data.load_mask(data.find_mask(image_id, labels), labelset, expected_size=pre.original_size)
            t0 = time.perf_counter()
            seg = model.classifier.predict_block_maps(maps, cache.keys, cache.image_size)
            seconds += time.perf_counter() - t0
            score.update(data.restore_labels(seg.labels, pre, fill=255), mask)
            calib.update(seg.proba, data.prepare_mask(mask, pre))
        n = len(cache.image_ids)
    return {"heldout_miou": round(100 * score.result()["miou"], 2), "ece": round(calib.ece(), 4),
            "classify_s_per_image": round(seconds / n, 3)}
