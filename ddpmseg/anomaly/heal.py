"""Healing by partial diffusion: noise an image to step t, run the reverse process back to 0.

A DDPM trained only on normal images cannot reproduce what it never saw: the
healed image keeps what is normal and replaces what is not, so
``|x - healed|`` marks anomalies (AnoDDPM, Pinaya et al.'s pixel-space
variant, MONAI's generative tutorials).

The reverse process is :class:`ddpmseg.sampling.ReverseProcess`, guided-diffusion's
own sampler (``respace.SpacedDiffusion`` over the backbone's betas: the ADM's
schedule, or a diffusers scheduler's), so any backbone ddpmseg loads can heal:

- DDIM (eta 0, the default): ``sample_steps`` timesteps evenly spaced over
  [0, start] (start included), one network evaluation each; the last step
  returns the model's x0 estimate.
- ancestral: every timestep from ``start`` down to 0 (DDPM sampling with the
  model's variance: learned sigmas, or the fixed small / large one), noise
  from a generator seeded ``seed + start`` (the same each call).
"""

from __future__ import annotations

import torch

from ddpmseg.backbones import Backbone
from ddpmseg.errors import DdpmsegError
from ddpmseg.sampling import ReverseProcess, respaced_steps

__all__ = ["Healer", "respaced_steps"]  # respaced_steps: re-exported, it lived here


class Healer:
    """Partial diffusion and reverse process with one backbone (frozen, on its device)."""

    def __init__(self, backbone: Backbone, sample_steps: int = 50, ancestral: bool = False,
                 precision: str = "fp32", seed: int = 0) -> None:
        self.process = ReverseProcess(backbone, sample_steps, ancestral, precision, seed)
        self.backbone, self.sample_steps, self.ancestral = backbone, sample_steps, ancestral
        self.precision, self.seed = precision, seed
        self.n_steps = self.process.n_steps

    def check_start(self, start: int) -> None:
        if not 1 <= start < self.n_steps:
            raise DdpmsegError(f"--start-steps {start} out of range: this model's diffusion has steps 1..{self.n_steps - 1}")

    def timesteps(self, start: int) -> list[int]:
        """The original timesteps the reverse process evaluates the network at, from ``start`` down."""
        return self.process.timesteps(start)

    @torch.inference_mode()
    def heal(self, x0: torch.Tensor, start: int, noise: torch.Tensor) -> torch.Tensor:
        """``x0`` (B, 3, S, S) in [-1, 1] noised to ``start`` with ``noise`` and denoised back: (B, 3, S, S).

        Ancestral noise: one generator seeded ``seed + start`` per call."""
        self.check_start(start)
        device = self.backbone.device
        x0, noise = x0.to(device), noise.to(device)
        x = self.backbone.q_sample(x0, torch.full((len(x0),), start, dtype=torch.long, device=device), noise)
        return self.process.run(x, start)
