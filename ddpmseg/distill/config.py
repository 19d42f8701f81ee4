"""The settings of ``ddpmseg distill`` (torch-free: the CLI reads its defaults from here)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ddpmseg.errors import DdpmsegError

DISTILL_SAMPLE_STEPS = 50  # DDIM steps per DDPM sample (docs/distill.md: the measurement behind it)
DISTILL_DROP = 0.1  # the reference's portion of pseudo-labelled images dropped, most uncertain first


@dataclass(frozen=True)
class StudentTrainConfig:
    """How the student is trained (saved in the student's model.json under ``training``)."""

    epochs: int = 40  # bench_distill: 40 beat 20 for the student on samples (58.5 vs 56.2 mIoU) and the control
    batch_size: int = 8
    lr: float = 1e-3
    epoch_images: int = 512  # pairs drawn per epoch at least (shuffled passes over the training set)
    augment: bool = True  # random scale (scale_range) + crop/pad back to S, and flips if ``flip``
    flip: bool = True  # horizontal flips (turn off for label sets with left/right classes)
    scale_range: tuple[float, float] = (0.75, 1.5)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "epoch_images"):
            if int(getattr(self, name)) < 1:
                raise DdpmsegError(f"--{name.replace('_', '-')} {getattr(self, name)}: give at least 1")
        if not self.lr > 0:
            raise DdpmsegError(f"--lr {self.lr}: give a positive learning rate")
        lo, hi = self.scale_range
        if not 0 < lo <= hi:
            raise DdpmsegError(f"scale range {self.scale_range}: give 0 < low <= high")
        object.__setattr__(self, "scale_range", (float(lo), float(hi)))

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "scale_range": list(self.scale_range)}
