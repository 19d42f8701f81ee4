"""CPU threads for torch, chosen before torch starts: :func:`configure_threads`.

OpenMP reads ``OMP_NUM_THREADS`` and ``OMP_WAIT_POLICY`` once, when torch
loads, so a Python program calls this first, before it (or anything it
imports) imports torch; ``import ddpmseg`` does not::

    import ddpmseg

    ddpmseg.configure_threads()           # the usable cores; wait passively if other processes are busy
    ddpmseg.configure_threads(threads=4)  # four threads

    model = ddpmseg.SegmentationModel(...)  # torch starts here, with those settings

The ``ddpmseg`` command does the same for every command that runs torch
(``--threads N``). What it chooses, and why (benchmarks/bench_threads.py):

- threads: ``threads`` if given, else ``OMP_NUM_THREADS`` if set, else the
  cores this process may use (its CPU affinity, which a batch scheduler sets,
  not the machine's count: :func:`usable_cores`);
- wait policy (``wait_policy="auto"``): threads that spin while they wait for
  work are fastest alone (a passive wait made the eyes8 fit 2.4x slower) but
  take the cores from any other busy process, and then both run several
  times (up to 50x) slower. So unless ``OMP_WAIT_POLICY`` is set already,
  OpenMP waits passively (``OMP_WAIT_POLICY=PASSIVE``) when other processes
  keep at least half a core busy at the start (:func:`others_busy`, 0.2 s of
  ``/proc/stat``), or when that cannot be seen; it keeps OpenMP's own
  (spinning) default otherwise. ``"passive"`` / ``"active"`` set the policy
  outright, ``None`` leaves it alone.

Once torch has started only the thread count can change (``threads`` given:
``torch.set_num_threads``); the environment is then left as it is.

This module imports neither torch nor numpy.
"""

from __future__ import annotations

import logging
import os
import sys
import time

from ddpmseg.errors import DdpmsegError

log = logging.getLogger("ddpmseg")

WAIT_POLICIES = ("auto", "passive", "active")


def usable_cores() -> int:
    """The cores this process may use (its CPU affinity), not the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def others_busy(seconds: float = 0.2) -> bool | None:
    """Whether other processes keep at least half a core busy (``/proc/stat`` over ``seconds``,
    while this process sleeps); None where the system does not say."""

    def snapshot() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        return fields[3] + fields[4], sum(fields[:8])  # (idle + iowait, total) jiffies

    try:
        idle0, total0 = snapshot()
        time.sleep(seconds)
        idle1, total1 = snapshot()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    busy_cores = (1 - (idle1 - idle0) / (total1 - total0)) * (os.cpu_count() or 1)
    return busy_cores >= 0.5


def configure_threads(threads: int | None = None, wait_policy: str | None = "auto") -> None:
    """Set torch's CPU threads and OpenMP's wait policy (see the module docstring); call it before
    importing torch.

    ``threads``: torch's intra-op threads (at least 1); None: ``OMP_NUM_THREADS`` if set, else
    :func:`usable_cores`. ``wait_policy``: ``"auto"`` (passive when other processes are busy,
    unless ``OMP_WAIT_POLICY`` is set), ``"passive"`` or ``"active"`` (set outright), None (leave it).
    """
    if threads is not None and threads < 1:
        raise DdpmsegError(f"--threads {threads}: give at least 1")
    if wait_policy is not None and wait_policy not in WAIT_POLICIES:
        raise DdpmsegError(f"wait_policy {wait_policy!r}: use one of {', '.join(WAIT_POLICIES)} or None")
    if "torch" in sys.modules:  # already running (an in-process caller): change only what was asked
        if wait_policy in ("passive", "active"):
            log.warning("torch has started: OpenMP's wait policy stays as it is; configure threads before importing torch")
        if threads is not None:
            sys.modules["torch"].set_num_threads(threads)
        return
    if wait_policy in ("passive", "active"):
        os.environ["OMP_WAIT_POLICY"] = wait_policy.upper()
    elif wait_policy == "auto" and "OMP_WAIT_POLICY" not in os.environ and others_busy() is not False:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        log.debug("other processes are busy: OpenMP waits passively")
    if threads is not None or "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(threads or usable_cores())
