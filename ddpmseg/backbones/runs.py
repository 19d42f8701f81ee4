"""Training-run folders (``ddpmseg train-ddpm --out RUN``): guided-diffusion's file names, and which
checkpoint ``--ckpt RUN/`` means.

    RUN/flags.json              the architecture (guided-diffusion flags)
    RUN/train.json              the training settings (TrainConfig) and the images (absolute paths, sha256)
    RUN/modelNNNNNN.pt          weights after step NNNNNN (six digits), plain state dicts ...
    RUN/ema_0.9999_NNNNNN.pt    ... their exponential moving average (what --ckpt RUN/ loads) ...
    RUN/optNNNNNN.pt            ... and the optimizer state (what --resume continues from)

A step counts as saved once its model, EMA and optimizer files all exist
(each is written atomically), so a run killed while saving resumes from the
step before. ``train-ddpm --keep-last N`` deletes older steps' files
(:func:`prune`) only once a newer step is saved.

Which checkpoint of a run ``--ckpt`` loads: ``--ckpt RUN/`` the newest saved
step's EMA, ``--ckpt RUN/ --step N`` step N's (:func:`checkpoint_at`), or
``--ckpt RUN/ema_0.9999_00NNNN.pt`` that file, with the architecture of the
``flags.json`` beside it (:func:`run_of`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

from ddpmseg.errors import DdpmsegError
from ddpmseg.options import CACHE_FOLDER_MARKER, MODEL_FILES

FLAGS, TRAIN_CONFIG, LOG = "flags.json", "train.json", "log.jsonl"
IMAGES_KEY = "images"  # train.json: [{"path": absolute path, "sha256": digest}] of the training images
_MODEL = re.compile(r"^model(\d{6})\.pt$")
_EMA = re.compile(r"^ema_([0-9.]+)_(\d{6})\.pt$")
_STEP_FILE = re.compile(r"^(?:model|opt|sampler|ema_[0-9.]+_)(\d{6})\.pt$")  # every per-step file of a run


def model_file(run: Path, step: int) -> Path:
    return run / f"model{step:06d}.pt"


def ema_file(run: Path, rate: float, step: int) -> Path:
    return run / f"ema_{rate}_{step:06d}.pt"


def opt_file(run: Path, step: int) -> Path:
    return run / f"opt{step:06d}.pt"


def is_run(path: str | Path) -> bool:
    """A folder with a training run's flags.json (and no diffusers config.json)."""
    p = Path(path)
    return p.is_dir() and (p / FLAGS).is_file() and not (p / "config.json").is_file()


def ema_rates(run: Path, step: int) -> list[str]:
    """The EMA rates saved at ``step`` (as written in the file names)."""
    return sorted(m.group(1) for f in run.glob(f"ema_*_{step:06d}.pt") if (m := _EMA.match(f.name)))


def saved_steps(run: Path) -> list[int]:
    """Steps whose model, EMA and optimizer files are all there, ascending."""
    steps = sorted(int(m.group(1)) for f in run.glob("model*.pt") if (m := _MODEL.match(f.name)))
    return [s for s in steps if opt_file(run, s).is_file() and ema_rates(run, s)]


def latest_ema(run: str | Path) -> tuple[Path, Path]:
    """(newest EMA checkpoint, flags.json) of a run folder: what ``--ckpt RUN/`` loads."""
    run = Path(run)
    steps = saved_steps(run)
    if not steps:
        raise DdpmsegError(
            f"training run {run} has no complete checkpoint yet (modelNNNNNN.pt, ema_*_NNNNNN.pt and optNNNNNN.pt); "
            "let `ddpmseg train-ddpm` save one (--save-every), or pass a checkpoint file"
        )
    rates = ema_rates(run, steps[-1])
    return run / f"ema_{rates[-1]}_{steps[-1]:06d}.pt", run / FLAGS


def ema_steps(run: str | Path) -> list[int]:
    """Steps with an EMA checkpoint file in ``run`` (what ``--step`` may pick), ascending."""
    return sorted({int(m.group(2)) for f in Path(run).glob("ema_*.pt") if (m := _EMA.match(f.name))})


def step_of(path: str | Path) -> int | None:
    """The training step in a run's checkpoint file name (``ema_0.9999_000030.pt``: 30), else None."""
    m = _STEP_FILE.match(Path(path).name)
    return int(m.group(1)) if m else None


def run_of(path: str | Path) -> Path | None:
    """The run folder a checkpoint file lies in (its ``flags.json`` beside it), else None."""
    p = Path(path)
    return p.parent if p.is_file() and is_run(p.parent) else None


def _steps_text(steps: list[int]) -> str:
    shown = [str(s) for s in steps] if len(steps) <= 8 else [*map(str, steps[:3]), "...", *map(str, steps[-4:])]
    return ", ".join(shown)


def checkpoint_at(run: str | Path, step: int | None = None) -> Path:
    """The EMA checkpoint of ``run`` at ``step`` (None: the newest saved step's, as ``--ckpt RUN/``)."""
    run = Path(run)
    if step is None:
        return latest_ema(run)[0]
    rates = ema_rates(run, step)
    if not rates:
        have = ema_steps(run)
        listing = f"its EMA checkpoints are of steps {_steps_text(have)}" if have else "it has no EMA checkpoint yet"
        raise DdpmsegError(f"--step {step}: training run {run} has no ema_*_{step:06d}.pt ({listing}); "
                           "pick one of those with --step, or leave --step out for the newest")
    return run / f"ema_{rates[-1]}_{step:06d}.pt"


def resolve_checkpoint(source: str | Path, step: int | None) -> str | Path:
    """``--ckpt SOURCE --step N``: step N's EMA file of the run folder ``source`` (``source`` itself
    without ``step``)."""
    if step is None:
        return source
    if is_run(source):
        return checkpoint_at(source, step)
    run = run_of(source)
    if run is not None:
        raise DdpmsegError(f"--step {step} picks a checkpoint of a run folder, but --ckpt {source} is already one "
                           f"file of the run {run}; pass --ckpt {run}/ --step {step}, or the file alone")
    raise DdpmsegError(f"--step {step} picks a checkpoint of a train-ddpm run folder (one with {FLAGS}), but "
                       f"--ckpt {source} is not one; leave out --step")


def describe_checkpoint(source: str | Path) -> str | None:
    """Which file and step of a training run ``source`` means (``RUN/ema_0.9999_000030.pt, step 30 of
    the run``), or None for a checkpoint that is no run's."""
    if is_run(source):
        path = latest_ema(source)[0]
    elif run_of(source) is not None:
        path = Path(source)
    else:
        return None
    step = step_of(path)
    return f"{path} (step {step} of the train-ddpm run {path.parent})" if step is not None else str(path)


def describe_folder(path: str | Path) -> str | None:
    """What a folder is, as a message names it: "a train-ddpm run folder", "a feature cache folder",
    "a model folder", "a diffusers model folder", or None (not a folder, or none of these)."""
    p = Path(path)
    if not p.is_dir():
        return None
    if is_run(p):
        return "a train-ddpm run folder"
    if (p / CACHE_FOLDER_MARKER).is_file():
        return "a feature cache folder"
    if (p / MODEL_FILES[0]).is_file():
        return "a model folder"
    if any((p / f).is_file() for f in ("config.json", "model_index.json", "unet/config.json")):
        return "a diffusers model folder"
    return None


def _step_files(run: Path) -> Iterator[tuple[int, Path]]:
    for f in run.iterdir():
        m = _STEP_FILE.match(f.name)
        if m and f.is_file():
            yield int(m.group(1)), f


def prune(run: str | Path, keep_last: int) -> list[int]:
    """Delete the files of every step older than the newest ``keep_last`` saved ones (0: keep all);
    the steps deleted.

    Only complete steps (:func:`saved_steps`) count as kept, so the newest
    save is never the one deleted, and a resume always finds a step. Each
    step's optimizer file goes first: a prune killed midway leaves a step
    that no longer counts as saved, whose remaining files the next prune
    deletes.
    """
    run = Path(run)
    saved = saved_steps(run)
    if keep_last < 1 or not saved:
        return []
    oldest_kept = saved[-min(keep_last, len(saved))]  # older files: of pruned steps (or a prune killed midway)
    old: dict[int, list[Path]] = {}
    for step, f in _step_files(run):
        if step < oldest_kept:
            old.setdefault(step, []).append(f)
    for step, files in sorted(old.items()):
        for f in sorted(files, key=lambda f: not f.name.startswith("opt")):  # the optimizer file first
            f.unlink(missing_ok=True)
    return sorted(old)


def training_images(run: str | Path) -> list[tuple[Path, str]]:
    """(absolute path, sha256) of the images ``run`` was trained on, as its train.json records them
    (runs of an earlier ddpmseg recorded none: a one-line error)."""
    import json

    run = Path(run)
    try:
        listed = json.loads((run / TRAIN_CONFIG).read_text()).get(IMAGES_KEY)
    except (OSError, ValueError, AttributeError):
        listed = None
    if not listed:
        raise DdpmsegError(f"training run {run} records no training images in its {TRAIN_CONFIG} (a run of an "
                           "earlier ddpmseg, or not a train-ddpm run); give the normal images with --normal DIR")
    return [(Path(e["path"]), str(e["sha256"])) for e in listed]
