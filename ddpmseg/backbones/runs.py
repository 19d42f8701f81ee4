"""Training-run folders (``ddpmseg train-ddpm --out RUN``): guided-diffusion's file names, and which
checkpoint ``--ckpt RUN/`` means.

    RUN/flags.json              the architecture (guided-diffusion flags)
    RUN/train.json              the training settings (TrainConfig)
    RUN/modelNNNNNN.pt          weights after step NNNNNN (six digits), plain state dicts ...
    RUN/ema_0.9999_NNNNNN.pt    ... their exponential moving average (what --ckpt RUN/ loads) ...
    RUN/optNNNNNN.pt            ... and the optimizer state (what --resume continues from)

A step counts as saved once its model, EMA and optimizer files all exist
(each is written atomically), so a run killed while saving resumes from the
step before.
"""

from __future__ import annotations

import re
from pathlib import Path

from ddpmseg.errors import DdpmsegError

FLAGS, TRAIN_CONFIG, LOG = "flags.json", "train.json", "log.jsonl"
_MODEL = re.compile(r"^model(\d{6})\.pt$")
_EMA = re.compile(r"^ema_([0-9.]+)_(\d{6})\.pt$")


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
