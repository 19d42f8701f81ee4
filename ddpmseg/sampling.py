"""The reverse diffusion process: one sampler for healing (``ddpmseg.anomaly``) and sampling (``distill``).

It is guided-diffusion's own (``respace.SpacedDiffusion`` over the backbone's
betas, with the backbone's variance type, predicted x0 clipped to [-1, 1]), so
any backbone ddpmseg loads that predicts the noise can run it:

- DDIM (eta 0): ``sample_steps`` timesteps evenly spaced over [0, start], both
  ends included, one network evaluation each; the last step returns the
  model's x0 estimate.
- ancestral: every timestep from ``start`` down to 0 (DDPM sampling with the
  model's variance: learned sigmas, or the fixed small / large one).

Ancestral noise comes from explicit generators, never torch's global one:
by default one generator on the backbone's device seeded with
``seed + start`` draws the whole batch's noise (what healing uses), or, given
``generators`` (one per image), image i's noise is drawn from generator i
alone, so an image does not depend on which others share its batch.

    x0 = generate(backbone, torch.randn(4, 3, S, S), sample_steps=50)   # DDIM from pure noise at T-1
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from ddpmseg._optional import guided_diffusion
from ddpmseg.backbones import Backbone, precision_dtype
from ddpmseg.errors import DdpmsegError

VARIANCES = ("learned", "fixed_small", "fixed_large")


def respaced_steps(start: int, n: int) -> list[int]:
    """``n`` distinct timesteps evenly spaced over [0, ``start``], both ends included (all if n > start)."""
    if n < 1:
        raise DdpmsegError(f"--sample-steps {n}: give at least 1")
    if n == 1:
        return [start]  # one evaluation: x0 straight from x_start
    return sorted({int(round(v)) for v in np.linspace(0, start, min(n, start + 1))})


def check_can_sample(backbone: Backbone) -> None:
    """A one-line DdpmsegError unless the reverse process can run with ``backbone`` (read from its
    configuration: no forward pass). Mirrors what the families' ``denoise`` / ``variance`` refuse."""
    kind = dict(getattr(backbone.config, "scheduler", None) or {}).get("prediction_type", "epsilon")
    if kind != "epsilon":
        raise DdpmsegError(
            f"this model predicts {kind!r}, not the noise, so ddpmseg cannot sample from it or heal with it; "
            "use an epsilon-prediction model (scheduler prediction_type 'epsilon')")
    if getattr(backbone.model, "num_classes", None) is not None:
        raise DdpmsegError("this checkpoint is class-conditional, so ddpmseg cannot sample from it or heal with it; "
                           "use an unconditional checkpoint")
    var = backbone.variance()
    if var not in VARIANCES:
        raise DdpmsegError(f"this model's variance type {var!r} is not one of {', '.join(VARIANCES)}; "
                           "ddpmseg cannot sample from it")


def resolve_ancestral(backbone: Backbone, sample_steps: int, ancestral: bool | None) -> bool:
    """``ancestral`` as given, or for None: ancestral exactly when ``sample_steps`` covers every step."""
    return sample_steps >= len(backbone.betas()) if ancestral is None else bool(ancestral)


class ReverseProcess:
    """The reverse process with one backbone (frozen, on its device), from any start step down to x0.

    ``sample_steps`` is the DDIM step count (unused when ``ancestral``); ``seed`` seeds the
    ancestral noise when no per-image generators are given (``seed + start``).
    """

    def __init__(self, backbone: Backbone, sample_steps: int = 50, ancestral: bool = False,
                 precision: str = "fp32", seed: int = 0) -> None:
        self.backbone, self.sample_steps, self.ancestral = backbone, sample_steps, ancestral
        self.precision, self.seed = precision, seed
        self._spaced: dict[int, tuple[object, list[int]]] = {}
        self.n_steps = len(backbone.betas())

    def timesteps(self, start: int) -> list[int]:
        """The original timesteps the network is evaluated at, from ``start`` down."""
        return list(reversed(range(start + 1) if self.ancestral else respaced_steps(start, self.sample_steps)))

    def _diffusion(self, start: int):
        if start not in self._spaced:
            gd, respace = guided_diffusion("gaussian_diffusion"), guided_diffusion("respace")
            steps = sorted(self.timesteps(start))
            var_type = {"learned": gd.ModelVarType.LEARNED_RANGE, "fixed_small": gd.ModelVarType.FIXED_SMALL,
                        "fixed_large": gd.ModelVarType.FIXED_LARGE}[self.backbone.variance()]
            spaced = respace.SpacedDiffusion(
                use_timesteps=steps, betas=self.backbone.betas(), model_mean_type=gd.ModelMeanType.EPSILON,
                model_var_type=var_type, loss_type=gd.LossType.MSE, rescale_timesteps=False)
            self._spaced[start] = (spaced, steps)
        return self._spaced[start]

    def _noise(self, start: int, device: torch.device,
               generators: Sequence[torch.Generator] | None) -> Callable[[torch.Tensor], torch.Tensor]:
        """What draws an ancestral step's noise like ``x``."""
        if generators is None:
            # a fresh generator seeded like torch.manual_seed(seed + start): the same numbers guided-diffusion's
            # p_sample drew from the global generator when healing seeded that
            gen = torch.Generator(device=device).manual_seed(self.seed + start)
            return lambda x: torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
        return lambda x: torch.cat([torch.randn((1, *x.shape[1:]), generator=g, device=g.device, dtype=x.dtype)
                                    for g in generators]).to(x.device)

    @torch.inference_mode()
    def run(self, x_t: torch.Tensor, start: int,
            generators: Sequence[torch.Generator] | None = None) -> torch.Tensor:
        """``x_t`` (B, 3, S, S) at timestep ``start`` denoised to x0: (B, 3, S, S) in [-1, 1], on the backbone's device.

        ``generators``: one per image for the ancestral noise (image i's from generator i alone);
        None: one generator on the device seeded ``seed + start`` for the batch.
        """
        if not 0 <= start < self.n_steps:
            raise DdpmsegError(
                f"start step {start} out of range: this model's diffusion has steps 0..{self.n_steps - 1}")
        if generators is not None and len(generators) != len(x_t):
            raise DdpmsegError(f"{len(generators)} generators for a batch of {len(x_t)}; give one per image")
        device = self.backbone.device
        x = x_t.to(device)
        spaced, steps = self._diffusion(start)
        b = len(x)
        noise = self._noise(start, device, generators) if self.ancestral else None

        def model(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # t: original timesteps (the wrapper maps them)
            return self.backbone.denoise(x_t, t)

        cuda = [device.index or 0] if device.type == "cuda" else []
        # ddim_sample draws (unused, eta 0) noise from the global generator: leave the caller's stream as it was
        with torch.random.fork_rng(devices=cuda), self.backbone.precision(self.precision):
            for i in reversed(range(len(steps))):
                t = torch.full((b,), i, dtype=torch.long, device=device)
                if noise is not None:
                    x = _p_sample(spaced, model, x.float(), t, noise)
                else:
                    x = spaced.ddim_sample(model, x.float(), t, clip_denoised=True)["sample"]
        return x.float().clamp(-1, 1)


def _p_sample(spaced, model, x: torch.Tensor, t: torch.Tensor,
              noise: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """guided-diffusion's ``p_sample`` (clip_denoised, no conditioning) with the noise from ``noise``
    instead of the global generator."""
    out = spaced.p_mean_variance(model, x, t, clip_denoised=True)
    nonzero_mask = (t != 0).float().view(-1, *([1] * (len(x.shape) - 1)))  # no noise when t == 0
    return out["mean"] + nonzero_mask * torch.exp(0.5 * out["log_variance"]) * noise(x)


def check_sampling_args(backbone: Backbone, sample_steps: int, precision: str) -> None:
    """Everything :func:`generate` refuses, checked before any work (one-line DdpmsegErrors)."""
    check_can_sample(backbone)
    if sample_steps < 1:
        raise DdpmsegError(f"--sample-steps {sample_steps}: give at least 1")
    precision_dtype(precision, backbone.device)


def generate(backbone: Backbone, noise: torch.Tensor, sample_steps: int, ancestral: bool | None = False,
             precision: str = "fp32", seed: int = 0,
             generators: Sequence[torch.Generator] | None = None) -> torch.Tensor:
    """Images from pure noise at the last timestep T-1: (B, 3, S, S) in [-1, 1], on the backbone's device.

    DDIM over ``sample_steps`` timesteps evenly spaced over [0, T-1] (every step when
    ``sample_steps >= T``); ``ancestral``: DDPM sampling over every step (``sample_steps``
    unused), the reference's full ancestral sampling; None picks ancestral exactly when
    ``sample_steps >= T``. ``seed`` / ``generators``: the ancestral noise (:meth:`ReverseProcess.run`).
    """
    check_sampling_args(backbone, sample_steps, precision)
    size = backbone.image_size
    if noise.ndim != 4 or tuple(noise.shape[1:]) != (3, size, size):
        raise DdpmsegError(
            f"noise of shape {tuple(noise.shape)} for a {size}x{size} model; give (B, 3, {size}, {size})")
    process = ReverseProcess(backbone, sample_steps, resolve_ancestral(backbone, sample_steps, ancestral),
                             precision, seed)
    return process.run(noise, process.n_steps - 1, generators)
