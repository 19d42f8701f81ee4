"""The DDP head's settings (torch-free: records and the CLI read them without importing torch)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from ddpmseg.errors import DdpmsegError

HEADS: dict[str, str] = {  # fit --head -> what it is
    "mlp": "the paper's ensemble of pixel MLPs",
    "ddp": "DDP's diffusion map decoder (conv blocks, denoises the label map)",
}


@dataclass(frozen=True)
class DDPConfig:
    """How the DDP head is built, trained and sampled (saved in model.json's ``fit.ddp``).

    ``resolution`` 0 means "derive it": a quarter of the model grid, at least 32
    (64 for a 256 model, as DDP's 1/4-resolution decoder) and at most the grid.
    ``diffusion=False`` is the control: the same decoder trained and run on a
    zero label map at a fixed time, one step (no denoising).
    """

    width: int = 128  # the decoder's channels (DDP's 256: 3.5x slower on a CPU; --head-width 256)
    depth: int = 4  # residual conv blocks with time FiLM (DDP: 6 deformable-attention layers)
    resolution: int = 0  # working resolution (0: derived from the model grid)
    bit_scale: float = 0.01  # label embedding (sigmoid(e) * 2 - 1) * bit_scale, DDP's configs
    aux_weight: float = 0.4  # auxiliary CE of a 1x1 classifier on the fused features (DDP's FCN head)
    diffusion: bool = True
    iterations: int = 1500
    batch_size: int = 4  # crops per step
    crop: int = 32  # crop side at the working resolution (the whole map when smaller)
    lr: float = 1e-3  # AdamW, linear warm-up over 50 steps, then polynomial decay (power 1) to 0
    weight_decay: float = 1e-4
    steps: int = 3  # DDIM steps at inference (DDP reports 1 / 3 / 10)
    generations: int = 1  # independent noise draws averaged at inference (SegDiff; DDP's randsteps)
    time_difference: float = 1.0  # DDP's asymmetric time pairs (td = 1)

    def __post_init__(self) -> None:
        checks = [
            (self.width >= 8 and self.width % 8 == 0, f"width {self.width} must be a multiple of 8"),
            (self.depth >= 1, f"depth {self.depth} must be at least 1"),
            (self.resolution >= 0, f"resolution {self.resolution} must be 0 (derived) or positive"),
            (self.bit_scale > 0, f"bit_scale {self.bit_scale} must be positive"),
            (self.aux_weight >= 0, f"aux_weight {self.aux_weight} must be 0 or more"),
            (self.iterations >= 1, f"--head-iterations {self.iterations} must be at least 1"),
            (self.batch_size >= 1, f"--head-batch {self.batch_size} must be at least 1"),
            (self.crop >= 4, f"--head-crop {self.crop} must be at least 4"),
            (self.lr > 0, f"--head-lr {self.lr} must be positive"),
            (self.weight_decay >= 0, f"weight_decay {self.weight_decay} must be 0 or more"),
            (self.steps >= 1, f"--head-steps {self.steps} must be at least 1"),
            (self.generations >= 1, f"--generations {self.generations} must be at least 1"),
            (self.time_difference >= 0, f"time_difference {self.time_difference} must be 0 or more"),
        ]
        for ok, msg in checks:
            if not ok:
                raise DdpmsegError(f"DDP head: {msg}")

    def working_resolution(self, size: int) -> int:
        return self.resolution or min(size, max(32, size // 4))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DDPConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
