"""The settings of a training run (``RUN/train.json``) and small default architectures by image size."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from ddpmseg.errors import DdpmsegError

if TYPE_CHECKING:  # torch-free at import: the CLI reads these settings
    from ddpmseg.backbones import AdmConfig

TRAIN_PREPROCESS = ("resize", "crop", "random-crop")
SCHEDULE_SAMPLERS = ("uniform", "loss-second-moment")
TRAIN_PRECISIONS = ("fp32", "bf16")

# the settings a resumed run may change (they do not change what is trained); every other one is the run's
RESUMABLE = ("steps", "save_every", "sample_every", "log_every", "keep_last")
_OPTIONS = {"n_samples": "--samples"}  # a setting whose train-ddpm option is not --NAME

# guided-diffusion's ADM at a size a laptop can train: the ffhq_256 design (resblock up/down,
# scale-shift norm, learned sigmas, 1000 linear steps), narrow and with attention at the two
# coarsest useful levels.
_SMALL = {
    32: dict(num_channels=32, channel_mult="1,2,2", attention_resolutions="8"),
    64: dict(num_channels=64, channel_mult="1,2,3,4", attention_resolutions="16,8"),
    128: dict(num_channels=64, channel_mult="1,1,2,3,4", attention_resolutions="16,8"),
    256: dict(num_channels=64, channel_mult="1,1,2,2,4,4", attention_resolutions="16,8"),
}


def small_architecture(image_size: int) -> "AdmConfig":
    """The default architecture for ``--image-size`` S (32, 64, 128 or 256).

    2 res blocks per level, 32 channels per attention head, learned sigmas,
    resblock up/down and scale-shift norm like the paper's checkpoints; 32 px:
    32 channels, channel_mult 1,2,2, attention at 8 (1.9 M parameters);
    64 px: 64 channels, 1,2,3,4, attention at 16 and 8; 128 / 256 px: 64
    channels, guided-diffusion's channel_mult for the size, attention at 16, 8.
    """
    from ddpmseg.backbones import AdmConfig

    if image_size not in _SMALL:
        raise DdpmsegError(
            f"--image-size {image_size} has no default architecture; use one of {', '.join(map(str, _SMALL))}, "
            "or give the architecture with --model-flags FILE or --preset NAME"
        )
    return AdmConfig(image_size=image_size, num_res_blocks=2, num_head_channels=32, learn_sigma=True,
                     resblock_updown=True, use_scale_shift_norm=True, **_SMALL[image_size])


@dataclass(frozen=True)
class TrainConfig:
    """How a DDPM is trained (``RUN/train.json``); the architecture is ``RUN/flags.json``."""

    steps: int = 10000
    batch_size: int = 16
    lr: float = 1e-4  # guided-diffusion's
    weight_decay: float = 0.0
    ema: float = 0.9999  # the EMA's decay, reached after a warm-up: min(ema, (1 + n) / (10 + n)) at step n
    grad_clip: float = 0.0  # max gradient norm; 0: no clipping
    dropout: float = 0.0
    schedule_sampler: str = "uniform"
    precision: str = "fp32"
    preprocess: str = "resize"  # as extract's default, so features see images the way the model learned them
    flip: bool = True
    seed: int = 0
    save_every: int = 1000
    sample_every: int = 1000
    n_samples: int = 16
    sample_steps: int = 25  # DDIM steps of the sample grids
    log_every: int = 10
    keep_last: int = 0  # keep the files of only the newest N saved steps (0: keep every save)
    init: str | None = None  # the checkpoint fine-tuned from, if any

    def __post_init__(self) -> None:
        checks = [
            (self.steps >= 1, f"--steps must be at least 1, got {self.steps}"),
            (self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}"),
            (self.lr > 0, f"--lr must be positive, got {self.lr}"),
            (self.weight_decay >= 0, f"--weight-decay must be 0 or more, got {self.weight_decay}"),
            (0 <= self.ema < 1, f"--ema must be in [0, 1), got {self.ema}"),
            (self.grad_clip >= 0, f"--grad-clip must be 0 (off) or positive, got {self.grad_clip}"),
            (0 <= self.dropout < 1, f"--dropout must be in [0, 1), got {self.dropout}"),
            (self.schedule_sampler in SCHEDULE_SAMPLERS,
             f"--schedule-sampler must be one of {', '.join(SCHEDULE_SAMPLERS)}, got {self.schedule_sampler!r}"),
            (self.precision in TRAIN_PRECISIONS, f"--precision must be fp32 or bf16 for training, got {self.precision!r}"),
            (self.preprocess in TRAIN_PREPROCESS,
             f"--preprocess must be one of {', '.join(TRAIN_PREPROCESS)}, got {self.preprocess!r}"),
            (self.keep_last >= 0, f"--keep-last must be 0 (keep every save) or positive, got {self.keep_last}"),
            (self.save_every >= 1, f"--save-every must be at least 1, got {self.save_every}"),
            (self.sample_every >= 0, f"--sample-every must be 0 (never) or positive, got {self.sample_every}"),
            (self.n_samples >= 1 and self.sample_steps >= 1, "--samples and --sample-steps must be at least 1"),
            (self.log_every >= 1, f"--log-every must be at least 1, got {self.log_every}"),
        ]
        for ok, message in checks:
            if not ok:
                raise DdpmsegError(message)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def from_json(cls, path: Path) -> "TrainConfig":
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError) as e:
            raise DdpmsegError(f"cannot read the training settings {path} ({e}); start a new run in another --out") from None


def option_name(setting: str) -> str:
    """The ``train-ddpm`` option of a :class:`TrainConfig` field (``n_samples`` is ``--samples``)."""
    return _OPTIONS.get(setting, "--" + setting.replace("_", "-"))


def _shown(setting: str, value: Any) -> str:
    """``setting``'s value as a command line gives it (``--no-flip`` for flip False)."""
    if isinstance(value, bool):
        return option_name(setting) if value else "--no-" + option_name(setting)[2:]
    return f"{option_name(setting)} {value}"


def resumed_config(saved: TrainConfig, given: TrainConfig | Mapping[str, Any], source: str) -> tuple[TrainConfig, list[str]]:
    """The settings a resumed run continues with, and what in ``given`` disagrees with the run's.

    ``saved`` is the run's ``train.json`` (``source``); ``given`` the settings a
    command repeats (a mapping of some fields, or a whole TrainConfig). A
    :data:`RESUMABLE` setting takes the given value; any other must equal the
    run's, else it is listed (``--lr 0.0002 differs from the run's 0.0001 (RUN/train.json)``).
    ``init`` is left out: train_ddpm checks it against its ``init`` argument.
    """
    items = given.to_dict() if isinstance(given, TrainConfig) else dict(given)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(items) - known)
    if unknown:
        raise DdpmsegError(f"unknown training setting(s) {', '.join(unknown)}; use the fields of TrainConfig")
    changes, conflicts = {}, []
    for name, value in items.items():
        if name in RESUMABLE:
            changes[name] = value
        elif name != "init" and value != getattr(saved, name):
            ran = getattr(saved, name)
            theirs = _shown(name, ran) if isinstance(ran, bool) else str(ran)
            conflicts.append(f"{_shown(name, value)} differs from the run's {theirs} ({source})")
    return dataclasses.replace(saved, **changes), conflicts
