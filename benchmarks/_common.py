"""Shared by the benchmark scripts: child processes, held-out scoring, and one result file per run.

Every benchmark prints its figures as JSON lines through :class:`Results`,
which also saves them, at the end of the run (or when it fails: then
``"complete": false``), as ``benchmarks/results/<name>-<UTC time>.json``
(schema ``ddpmseg-benchmark-result`` 1):

    benchmark, script       which benchmark ran
    provenance              "measured" (transcribed files say where their figures come from)
    complete                false when the run stopped early (the rows printed so far are kept)
    git                     commit, dirty (the tracked files differed from the commit)
    machine                 cpu_model (/proc/cpuinfo "model name"), cores (the cores this process may
                            use: os.sched_getaffinity), cpu_flags (avx512_bf16, amx_bf16 where present),
                            gpu (torch.cuda's device name, or null), label (a short name for tables)
    torch                   version, threads
    ddpmseg_version
    date                    UTC, ISO 8601, when the run ended; wall_seconds: how long it ran
    argv, args              the command line and its parsed arguments
    figures                 every JSON line the run printed, as printed; figures[i]["benchmark"] names the
                            kind of row (e.g. "fit", "fit_full_projection")

``python benchmarks/make_tables.py`` builds the tables of docs/performance.md
from these files.
"""

from __future__ import annotations

import datetime as _dt
import json
import multiprocessing as mp
import os
import queue
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
SCHEMA, SCHEMA_VERSION = "ddpmseg-benchmark-result", 1
ECE_BINS = 15  # every ECE of the benchmarks: ddpmseg.metrics.Calibration's 15 bins, as `ddpmseg evaluate`

# Real faces for the quality benchmarks (research use only: read in place, never copied).
FASSEG = REPO.parent / "shared" / "data" / "fasseg-frontal02"
# The 8 eye photos with masks (MIT), vendored with the tests.
EYES8 = REPO / "tests" / "fixtures" / "eyes8"


def peak_rss_mb() -> int:
    """This process's peak resident set size in MiB: Linux's VmHWM, which belongs to this program's memory
    since its exec (getrusage's ru_maxrss keeps the peak of the process it was forked from, so a spawned child
    of a parent that held a large model reported the parent's peak), else ru_maxrss."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024)
    except OSError:
        pass
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


# -- one ECE everywhere ------------------------------------------------------------------------------
def calibration(ignore_index: int | None):
    """The ECE accumulator of every benchmark: ddpmseg.metrics.Calibration, 15 bins (as `evaluate`)."""
    from ddpmseg.metrics import Calibration

    return Calibration(ECE_BINS, ignore_index)


def add_to_calibration(calib, proba: np.ndarray, pre, truth: np.ndarray) -> None:
    """Add one image to ``calib`` as ``ddpmseg evaluate`` does: the mean softmax ``proba`` (K, S, S) of the
    model grid mapped back to the original size (bilinear), ``truth`` at the original size, pixels the
    model did not see (crop preprocessing) ignored."""
    from ddpmseg import data

    inside = data.restore_labels(np.zeros(proba.shape[1:], np.int64), pre, fill=1) == 0
    ignore = calib.ignore_index
    calib.update(data.restore_map(proba, pre, fill=0.0), np.where(inside, truth, ignore if ignore is not None else -1))


def heldout_score(model_dir: Path, test_cache: Path, labels: Path) -> dict:
    """Held-out mIoU (x100) and ECE of the mean softmax, both at the photos' original size as ``ddpmseg
    evaluate`` scores them, and the classifier's seconds per image, from a cache of the test photos (no
    re-extraction per fit)."""
    from ddpmseg import data
    from ddpmseg.features.cache import FeatureCache
    from ddpmseg.metrics import SegmentationScore
    from ddpmseg.model import SegmentationModel

    model = SegmentationModel.load(model_dir)
    labelset = model.labelset
    score, calib, seconds = SegmentationScore(labelset.n_classes, labelset.ignore_index), calibration(labelset.ignore_index), 0.0
    with FeatureCache(test_cache) as cache:
        for image_id in cache.image_ids:
            maps, pre = cache.block_maps(image_id), data.Preprocess.from_dict(cache.preprocess(image_id))
            mask = data.load_mask(data.find_mask(image_id, labels), labelset, expected_size=pre.original_size)
            t0 = time.perf_counter()
            seg = model.classifier.predict_block_maps(maps, cache.keys, cache.image_size)
            seconds += time.perf_counter() - t0
            score.update(data.restore_labels(seg.labels, pre, fill=255), mask)
            add_to_calibration(calib, seg.proba, pre, mask)
        n = len(cache.image_ids)
    return {"heldout_miou": round(100 * score.result()["miou"], 2), "ece": round(calib.ece(), 4),
            "ece_at": "original size", "classify_s_per_image": round(seconds / n, 3)}


# -- result files ------------------------------------------------------------------------------------
def machine() -> dict:
    """The machine this process runs on, as a result file records it."""
    model, flags = None, set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model is None:
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count()
    gpu = None
    if "torch" in sys.modules:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    cpu_flags = sorted(f for f in ("avx512_bf16", "amx_bf16") if f in flags)
    label = ", ".join([model or "unknown CPU", f"{cores} cores", *cpu_flags] + ([gpu] if gpu else []))
    return {"cpu_model": model, "cores": cores, "cpu_flags": cpu_flags, "gpu": gpu, "label": label}


def git_state() -> dict:
    """The commit of the working tree and whether its tracked files differ from it (None if unknown)."""
    def git(*a: str) -> str | None:
        try:
            return subprocess.run(["git", "-C", str(REPO), *a], capture_output=True, text=True, check=True,
                                  timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def _jsonable(v: Any) -> Any:
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (np.integer, np.floating)):
        return v.item()
    return v


def _dump(record: dict) -> str:
    """The record as JSON, one line per figure row (readable, and diffs stay small)."""
    head = json.dumps({k: v for k, v in record.items() if k != "figures"}, indent=1)
    rows = ",\n  ".join(json.dumps(r) for r in record["figures"])
    return head[:-2] + ',\n "figures": [\n  ' + rows + "\n ]\n}\n"


def write_result(name: str, args: Any, figures: list[dict], *, complete: bool = True,
                 wall_seconds: float | None = None) -> Path:
    """Save one run's figures as ``benchmarks/results/<name>-<UTC time>.json``; return the path."""
    try:
        import torch

        torch_info = {"version": torch.__version__, "threads": torch.get_num_threads()}
    except ImportError:
        torch_info = {"version": None, "threads": None}
    try:
        from ddpmseg import __version__ as version
    except ImportError:
        version = None
    now = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0)
    record = {
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION,
        "benchmark": name, "script": f"benchmarks/{Path(sys.argv[0]).name}",
        "provenance": "measured", "complete": complete,
        "git": git_state(), "machine": machine(), "torch": torch_info, "ddpmseg_version": version,
        "date": now.isoformat().replace("+00:00", "Z"), "wall_seconds": None if wall_seconds is None else round(wall_seconds),
        "argv": sys.argv[1:], "args": _jsonable(vars(args) if hasattr(args, "__dict__") else args),
        "figures": _jsonable(figures),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = f"{name}-{now.strftime('%Y%m%dT%H%M%SZ')}"
    path, n = RESULTS / f"{stem}.json", 1
    while path.exists():  # two runs in one second
        n += 1
        path = RESULTS / f"{stem}-{n}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(_dump(record))
    tmp.replace(path)
    return path


class Results:
    """What a benchmark prints, saved: ``with Results("fit", args) as out: out.row("fit", mode=..., ...)``.

    ``row(kind, **fields)`` prints ``{"benchmark": kind, **fields}`` as one JSON line (as the scripts
    always printed) and keeps it; leaving the ``with`` block writes the result file (also when the run
    fails or is interrupted, marked ``"complete": false``) and prints its path on stderr.
    """

    def __init__(self, name: str, args: Any) -> None:
        self.name, self.args, self.rows = name, args, []
        self._t0 = time.perf_counter()

    def row(self, benchmark: str, /, **fields: Any) -> dict:  # positional-only: a field may be called "kind"
        line = _jsonable({"benchmark": benchmark, **fields})
        print(json.dumps(line), flush=True)
        self.rows.append(line)
        return line

    def __enter__(self) -> "Results":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.rows and exc_type is not None:
            return
        path = write_result(self.name, self.args, self.rows, complete=exc_type is None,
                            wall_seconds=time.perf_counter() - self._t0)
        print(f"results: {os.path.relpath(path)}", file=sys.stderr, flush=True)
