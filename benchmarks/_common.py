"""Shared by the benchmark scripts: run one measurement in a fresh child process."""

from __future__ import annotations

import multiprocessing as mp
import resource
from typing import Any, Callable


def peak_rss_mb() -> int:
    """This process's peak resident set size in MiB."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def run_in_child(target: Callable[..., None], *args: Any) -> dict:
    """Call ``target(*args, queue)`` in a spawned process (so its peak RSS is its own); return what it puts."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=target, args=(*args, q))
    p.start()
    result = q.get()
    p.join()
    return result
