"""``--engine ray``: predict and extract over many images on a Ray cluster, with Ray Data.

The image paths are the dataset (``ray.data.from_items``: pixels never pass
through the object store); ``map_batches`` runs a class-based UDF on an actor
pool (``compute=ray.data.ActorPoolStrategy(size=workers)``, ``num_gpus`` per
actor), so each actor loads the backbone (and the fitted model) once. An
actor writes its own outputs (each file atomically, exactly what the plain
loop writes) and returns only small records (path, seconds). Finished outputs
are skipped, on a rerun and when Ray retries the batch of a worker that died
(Ray Data's actor pools restart actors and retry tasks without limit by
default), so nothing is written twice or half.

Extract into a cache folder: workers add their images' files directly. Into
a single ``.h5`` file: workers write the run's part files, the driver merges
them at the end (as the plain loop does).

Ray is an optional extra (``pip install "ddpmseg[ray]"``); the core never imports it.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from tqdm.auto import tqdm

from ddpmseg._optional import optional_import
from ddpmseg.errors import DdpmsegError

log = logging.getLogger(__name__)


@dataclass
class EngineSettings:
    """Where and how wide: ``address`` of a running cluster (``auto``: the one ``ray start`` made here;
    None: start a local one), ``workers`` actors, each ``cpus_per_worker`` CPUs (its torch threads) and
    ``gpus_per_worker`` GPUs."""

    address: str | None = None
    workers: int = 1
    cpus_per_worker: int = 1
    gpus_per_worker: float = 0.0

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise DdpmsegError(f"--workers {self.workers}: give at least 1")
        if self.cpus_per_worker < 1:
            raise DdpmsegError(f"--cpus-per-worker {self.cpus_per_worker}: give at least 1")
        if self.gpus_per_worker < 0:
            raise DdpmsegError(f"--gpus-per-worker {self.gpus_per_worker}: give 0 or more")


def _ray() -> Any:
    return optional_import("ray", "--engine ray")


def _start(settings: EngineSettings) -> tuple[Any, bool]:
    """(ray, whether this call started it)."""
    ray = _ray()
    if ray.is_initialized():
        return ray, False
    kw: dict[str, Any] = dict(include_dashboard=False, log_to_driver=False)
    if settings.address:
        kw["address"] = settings.address
    try:
        ray.init(**kw)
    except ConnectionError as e:
        raise DdpmsegError(f"cannot reach a Ray cluster at --address {settings.address} ({e}); start one with "
                           "`ray start --head`, or leave out --address for a local one") from None
    return ray, True


def _our_error(e: BaseException) -> DdpmsegError | None:
    """The DdpmsegError a worker raised, from the exceptions Ray wraps it in (None if there is none)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, DdpmsegError):
            return DdpmsegError(str(e).splitlines()[-1] if "\n" in str(e) else str(e))
        e = getattr(e, "cause", None) or e.__cause__ or e.__context__
    return None


def _worker_threads(cpus: int) -> None:
    import torch

    torch.set_num_threads(cpus)


class PredictWorker:
    """One actor: a Segmenter loaded once; writes the three PNGs of each path it is given."""

    def __init__(self, model_dir: str, out: str, checkpoint: str | None, device: str, legend: bool, overwrite: bool,
                 cpus: int) -> None:
        from ddpmseg.workers import Segmenter

        _worker_threads(cpus)
        self.segmenter = Segmenter(model_dir, checkpoint, device)
        self.out, self.legend, self.overwrite = Path(out), legend, overwrite

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        seconds, done = [], []
        for p in map(Path, batch["path"]):
            t0 = time.perf_counter()
            # labels are written last: an image whose labels exist is finished (by an earlier attempt of a
            # retried batch; with --overwrite every image is rewritten, atomically, with the same content)
            if not self.overwrite and (self.out / f"{p.stem}_labels.png").is_file():
                done.append(False)
            else:
                self.segmenter.write_outputs(p, self.out, self.legend)
                done.append(True)
            seconds.append(time.perf_counter() - t0)
        return {"path": batch["path"], "seconds": np.array(seconds), "written": np.array(done), "pid": np.full(len(done), os.getpid())}


class ExtractWorker:
    """One actor: an Extractor (backbone + cache writer) built once; extracts each (path, sha256) given."""

    def __init__(self, kwargs: dict[str, Any], cpus: int) -> None:
        from ddpmseg.workers import Extractor

        _worker_threads(cpus)
        self.extractor = Extractor(**kwargs)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        seconds, done = [], []
        for p, digest in zip(map(Path, batch["path"]), batch["sha256"]):
            t0 = time.perf_counter()
            if self.extractor.writer.finished(p.stem):
                done.append(False)
            else:
                self.extractor.add(p, str(digest))
                done.append(True)
            seconds.append(time.perf_counter() - t0)
        return {"path": batch["path"], "seconds": np.array(seconds), "written": np.array(done), "pid": np.full(len(done), os.getpid())}


@dataclass
class EngineRun:
    n_items: int
    n_written: int
    seconds: float
    per_item_seconds: list[float]


def run(items: Sequence[dict[str, str]], worker: type, constructor: dict[str, Any], settings: EngineSettings,
        progress: bool = False, desc: str = "ray") -> EngineRun:
    """Map ``worker`` over ``items`` on an actor pool (a Ray runtime this call starts is stopped at the end)."""
    if not items:
        return EngineRun(0, 0, 0.0, [])
    ray, started = _start(settings)
    start = time.perf_counter()
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # ours is the one bar
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # its progress lines; errors still show
    ds = ray.data.from_items(list(items))
    # Ray Data's actor pools restart a dead actor and retry its batch by default (max_restarts and
    # max_task_retries -1); finished outputs are skipped, so a retried batch writes nothing twice.
    mapped = ds.map_batches(
        worker,
        fn_constructor_kwargs={**constructor, "cpus": settings.cpus_per_worker},
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=settings.workers),
        num_cpus=settings.cpus_per_worker,
        num_gpus=settings.gpus_per_worker,
    )
    written, seconds = 0, []
    bar = tqdm(total=len(items), desc=desc, unit="img", disable=not progress)
    try:
        for row in mapped.iter_rows():
            written += int(row["written"])
            seconds.append(float(row["seconds"]))
            bar.update(1)
    except Exception as e:  # a worker's one-line error, not Ray's traceback
        ours = _our_error(e)
        if ours is None:
            raise
        raise ours from None
    finally:
        bar.close()
        if started:
            ray.shutdown()
    return EngineRun(len(items), written, time.perf_counter() - start, seconds)

