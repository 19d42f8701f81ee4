"""Healing by partial diffusion: noise an image to step t, run the reverse process back to 0.

A DDPM trained only on normal images cannot reproduce what it never saw: the
healed image keeps what is normal and replaces what is not, so
``|x - healed|`` marks anomalies (AnoDDPM, Pinaya et al.'s pixel-space
variant, MONAI's generative tutorials).

The reverse process is guided-diffusion's own sampler (``respace.SpacedDiffusion``
over the backbone's betas: the ADM's schedule, or a diffusers scheduler's),
so any backbone ddpmseg loads can heal:

- DDIM (eta 0, the default): ``sample_steps`` timesteps evenly spaced over
  [0, start] (start included), one network evaluation each; the last step
  returns the model's x0 estimate.
- ancestral: every timestep from ``start`` down to 0 (DDPM sampling with the
  model's variance: learned sigmas, or the fixed small / large one), noise
  from a seeded generator.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from ddpmseg._optional import guided_diffusion
from ddpmseg.backbones import Backbone
from ddpmseg.errors import DdpmsegError


def respaced_steps(start: int, n: int) -> list[int]:
    """``n`` distinct timesteps evenly spaced over [0, ``start``], both ends included (all if n > start)."""
    if n < 1:
        raise DdpmsegError(f"--sample-steps {n}: give at least 1")
    if n == 1:
        return [start]  # one evaluation: x0 straight from x_start
    return sorted({int(round(v)) for v in np.linspace(0, start, min(n, start + 1))})


class Healer:
    """Partial diffusion and reverse process with one backbone (frozen, on its device)."""

    def __init__(self, backbone: Backbone, sample_steps: int = 50, ancestral: bool = False,
                 precision: str = "fp32", seed: int = 0) -> None:
        self.backbone, self.sample_steps, self.ancestral = backbone, sample_steps, ancestral
        self.precision, self.seed = precision, seed
        self._spaced: dict[int, tuple[object, list[int]]] = {}
        self.n_steps = len(backbone.betas())

    def check_start(self, start: int) -> None:
        if not 1 <= start < self.n_steps:
            raise DdpmsegError(f"--start-steps {start} out of range: this model's diffusion has steps 1..{self.n_steps - 1}")

    def timesteps(self, start: int) -> list[int]:
        """The original timesteps the reverse process evaluates the network at, from ``start`` down."""
        return list(reversed(range(start + 1) if self.ancestral else respaced_steps(start, self.sample_steps)))

    def _diffusion(self, start: int):
        if start not in self._spaced:
            gd, respace = guided_diffusion("gaussian_diffusion"), guided_diffusion("respace")
            steps = sorted(self.timesteps(start))
            var = self.backbone.variance()
            var_type = {"learned": gd.ModelVarType.LEARNED_RANGE, "fixed_small": gd.ModelVarType.FIXED_SMALL,
                        "fixed_large": gd.ModelVarType.FIXED_LARGE}[var]
            spaced = respace.SpacedDiffusion(
                use_timesteps=steps, betas=self.backbone.betas(), model_mean_type=gd.ModelMeanType.EPSILON,
                model_var_type=var_type, loss_type=gd.LossType.MSE, rescale_timesteps=False)
            self._spaced[start] = (spaced, steps)
        return self._spaced[start]

    @torch.inference_mode()
    def heal(self, x0: torch.Tensor, start: int, noise: torch.Tensor) -> torch.Tensor:
        """``x0`` (B, 3, S, S) in [-1, 1] noised to ``start`` with ``noise`` and denoised back: (B, 3, S, S)."""
        self.check_start(start)
        device = self.backbone.device
        x0, noise = x0.to(device), noise.to(device)
        spaced, steps = self._diffusion(start)
        b = len(x0)
        x = self.backbone.q_sample(x0, torch.full((b,), start, dtype=torch.long, device=device), noise)

        def model(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # t: original timesteps (the wrapper maps them)
            return self.backbone.denoise(x_t, t)

        cuda = [device.index or 0] if device.type == "cuda" else []
        rng = torch.random.fork_rng(devices=cuda) if self.ancestral else contextlib.nullcontext()
        with rng, self.backbone.precision(self.precision):
            if self.ancestral:
                torch.manual_seed(self.seed + start)  # p_sample draws its noise from the global generator
            for i in reversed(range(len(steps))):
                t = torch.full((b,), i, dtype=torch.long, device=device)
                step = spaced.p_sample if self.ancestral else spaced.ddim_sample
                x = step(model, x.float(), t, clip_denoised=True)["sample"]
        return x.float().clamp(-1, 1)
