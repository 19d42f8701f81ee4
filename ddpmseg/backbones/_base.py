"""The backbone contract every family implements.

A backbone is a frozen diffusion U-Net plus its noise schedule. For a config
with image size S:

    backbone = create_backbone("ffhq.pt")                       # ddpmseg.backbones
    backbone.blocks()                                            # [BlockInfo(index, module, channels, resolution)]
    x_t = backbone.q_sample(x0, t, noise)                        # (B, 3, S, S)
    maps = backbone.forward_intermediates(x_t, t, [5, 12])       # {5: (B, 1024, S/8, S/8), 12: (B, 256, S/2, S/2)}

``forward_intermediates`` returns the outputs of the requested decoder blocks
(numbered like guided-diffusion's ``output_blocks``) and, with
``stop_early=True``, runs nothing after the last of them. Indices are
range-checked with a message that gives the valid range.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from ddpmseg.backbones.configs import BackboneConfig, BackboneSpec, CheckpointRef
from ddpmseg.errors import DdpmsegError
from ddpmseg.options import PRECISIONS as PRECISION_NAMES

PRECISIONS = dict(zip(PRECISION_NAMES, (torch.float32, torch.bfloat16, torch.float16)))


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else CPU; an unavailable CUDA is a one-line error."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DdpmsegError(f"--device {device} asked for, but this torch has no CUDA device; use --device cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise DdpmsegError(f"unknown device {device!r}; use auto, cpu or cuda") from None


def precision_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The autocast dtype of ``precision`` on ``device``, refusing what the device cannot run well."""
    if precision not in PRECISIONS:
        raise DdpmsegError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if precision == "fp16" and device.type == "cpu":
        raise DdpmsegError("--precision fp16 is for CUDA devices (on the CPU it is very slow); use bf16 or fp32 there")
    return PRECISIONS[precision]


def check_indices(values: Sequence[int], n: int, what: str, valid: str, example: str) -> list[int]:
    """``values`` as ints, each in ``0..n-1`` and listed once, else a one-line DdpmsegError."""
    values = [int(v) for v in values]
    if not values:
        raise DdpmsegError(f"no {what} given; pass e.g. {example}")
    bad = [v for v in values if not 0 <= v < n]
    if bad:
        raise DdpmsegError(f"{what} {bad[0]} out of range: {valid}")
    if len(set(values)) != len(values):
        raise DdpmsegError(f"duplicated {what} in {values}; list each once")
    return values


@torch.no_grad()
def fill_zero_weights_(model: torch.nn.Module, std: float = 0.02) -> torch.nn.Module:
    """Give every all-zero weight matrix Gaussian values (from torch's global generator).

    Both families zero-initialise each residual branch's last layer (a fresh
    model is the identity plus skips); random-weight models for tests,
    benchmarks and the demo get values there, as a trained model has.
    """
    for p in model.parameters():
        if p.ndim > 1 and not p.any():
            p.normal_(0.0, std)
    return model


def _output_to_float32(module: torch.nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
    return output.float()


@dataclass(frozen=True)
class BlockInfo:
    """One decoder block: its index, the module whose output it is, channels and resolution at image_size."""

    index: int
    module: str
    channels: int
    resolution: int


class Backbone:
    """A frozen U-Net (``model``, eval mode, no gradients) with its ``config`` and noise schedule.

    ``preset`` is the registered preset the architecture matches (None: custom);
    ``checkpoint`` where the weights came from (None: random weights).
    Families implement ``blocks``, ``q_sample`` and ``_forward_intermediates``.
    """

    config: BackboneConfig
    model: torch.nn.Module
    preset: str | None = None
    checkpoint: CheckpointRef | None = None

    @property
    def family(self) -> str:
        return self.config.family

    @property
    def spec(self) -> BackboneSpec:
        """The record of this architecture, as caches and model folders store it."""
        return BackboneSpec(self.config, self.preset)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def image_size(self) -> int:
        return self.config.image_size

    def to(self, device: torch.device | str) -> "Backbone":
        self.model.to(device)
        return self

    def blocks(self) -> list[BlockInfo]:
        """Every decoder block (the feature info): index, module name, output channels and resolution."""
        raise NotImplementedError

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise, with this model's schedule."""
        raise NotImplementedError

    def betas(self) -> np.ndarray:
        """The noise schedule's betas (float64, one per diffusion step): what the reverse process needs."""
        raise NotImplementedError

    def variance(self) -> str:
        """How the reverse process's variance is set: ``learned`` (the output's second half, ADM's learned
        sigmas), ``fixed_small`` or ``fixed_large``."""
        raise NotImplementedError

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The network's whole output at integer timesteps ``t``: the noise estimate (plus the variance
        channels of a model that learns them)."""
        raise NotImplementedError

    def forward_intermediates(
        self, x: torch.Tensor, t: torch.Tensor, indices: Sequence[int], stop_early: bool = True
    ) -> dict[int, torch.Tensor]:
        """Outputs of decoder blocks ``indices`` for the batch ``x`` at timesteps ``t``.

        ``stop_early``: return right after the last requested block (nothing
        after it runs); else run the whole network, output head included.
        """
        return self._forward_intermediates(x, t, self.check_blocks(indices), stop_early)

    def _forward_intermediates(
        self, x: torch.Tensor, t: torch.Tensor, indices: list[int], stop_early: bool
    ) -> dict[int, torch.Tensor]:
        raise NotImplementedError

    @contextlib.contextmanager
    def precision(self, precision: str = "fp32") -> Iterator[None]:
        """Forward passes inside run at ``precision`` (fp32, bf16, or fp16 on CUDA).

        bf16 / fp16 autocast the convolutions and matmuls, but every conv and
        linear output is cast back to float32, so the residual stream, the
        norms and the skip additions stay in fp32. On ffhq_256 (random weights)
        that keeps block features within ~1.3 % relative error of fp32 instead
        of ~1.9 % with plain autocast, at the same speed.
        """
        dtype = precision_dtype(precision, self.device)
        if dtype == torch.float32:
            yield
            return
        layers = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Linear)
        hooks = [m.register_forward_hook(_output_to_float32) for m in self.model.modules() if isinstance(m, layers)]
        try:
            with torch.autocast(self.device.type, dtype=dtype):
                yield
        finally:
            for h in hooks:
                h.remove()

    def default_blocks(self) -> list[int]:
        """The paper's feature depths for this decoder: blocks 5, 6, 7, 8, 12 of an 18-block one, else the
        blocks at the same fractions (5/17 ... 12/17) of the decoder's depth."""
        n = self.config.num_output_blocks
        picks = [int(b * (n - 1) / 17 + 0.5) for b in (5, 6, 7, 8, 12)]
        return list(dict.fromkeys(picks))

    def check_blocks(self, blocks: Sequence[int]) -> list[int]:
        """Validated decoder block indices (range, duplicates)."""
        n = self.config.num_output_blocks
        return check_indices(blocks, n, "block index", f"this model has decoder blocks 0..{n - 1}", "--blocks 5,6,7,8,12")

    def check_steps(self, steps: Sequence[int]) -> list[int]:
        """Validated diffusion timesteps (range, duplicates)."""
        n = self.config.diffusion_steps
        return check_indices(steps, n, "step", f"diffusion steps must lie in [0, {n})", "--steps 50,150,250")
