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
