"""The ADM (guided-diffusion) U-Net family.

``build_unet(config)`` builds guided-diffusion's own ``UNetModel`` (so its
published checkpoints load unchanged), ``build_diffusion(config)`` its
``GaussianDiffusion``. ``AdmBackbone._forward_intermediates`` runs the very
modules of ``UNetModel.forward`` in the same order and stops after the last
requested decoder ("output") block, so the maps equal forward hooks on a full
pass. Loading a checkpoint file is the builder's job (``create_backbone``).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from ddpmseg._optional import guided_diffusion
from ddpmseg.backbones._base import Backbone, BlockInfo, fill_zero_weights_
from ddpmseg.backbones.configs import AdmConfig, CheckpointRef
from ddpmseg.errors import DdpmsegError


# the AdmConfig fields that are guided-diffusion create_model arguments (the rest fix the noise schedule)
UNET_FLAGS = tuple(f.name for f in dataclasses.fields(AdmConfig) if f.name not in AdmConfig.SCHEDULE_FLAGS)


def build_unet(config: AdmConfig, dropout: float = 0.0) -> torch.nn.Module:
    """A randomly initialised guided-diffusion ``UNetModel`` for ``config`` (eval mode, frozen;
    ``dropout`` matters only to a caller that trains it)."""
    script_util = guided_diffusion("script_util")
    try:
        model = script_util.create_model(**{k: getattr(config, k) for k in UNET_FLAGS}, dropout=dropout)
    except (AssertionError, ValueError, ZeroDivisionError) as e:
        raise DdpmsegError(f"guided-diffusion cannot build this architecture: {e or type(e).__name__}") from None
    return model.eval().requires_grad_(False)


def build_diffusion(config: AdmConfig, respacing: str = ""):
    """guided-diffusion's ``GaussianDiffusion`` of ``config`` (q_sample, timestep scaling, the training
    objective); ``respacing`` (e.g. ``"ddim25"``) gives its respaced sampler (guided-diffusion's respace)."""
    return guided_diffusion("script_util").create_gaussian_diffusion(
        steps=config.diffusion_steps,
        learn_sigma=config.learn_sigma,
        noise_schedule=config.noise_schedule,
        rescale_timesteps=config.rescale_timesteps,
        timestep_respacing=respacing,
    )


def random_unet(config: AdmConfig, seed: int = 0) -> torch.nn.Module:
    """A deterministic random-weight U-Net whose every block does something (tests, benchmarks, the demo)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fill_zero_weights_(build_unet(config))


class AdmBackbone(Backbone):
    """A frozen ADM U-Net plus its noise schedule."""

    def __init__(
        self,
        config: AdmConfig,
        model: torch.nn.Module,
        preset: str | None = None,
        checkpoint: CheckpointRef | None = None,
    ) -> None:
        self.config = config
        self.model = model
        self.preset = preset
        self.checkpoint = checkpoint
        self.diffusion = build_diffusion(config)

    def blocks(self) -> list[BlockInfo]:
        return [
            BlockInfo(i, f"output_blocks.{i}", c, r)
            for i, (c, r) in enumerate(self.config.output_block_shapes())
        ]

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """guided-diffusion's own q_sample."""
        return self.diffusion.q_sample(x0, t, noise=noise)

    def betas(self) -> np.ndarray:
        return np.asarray(self.diffusion.betas, dtype=np.float64)

    def variance(self) -> str:
        return "learned" if self.config.learn_sigma else "fixed_small"  # guided-diffusion's create_gaussian_diffusion

    @torch.inference_mode()
    def denoise(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.model.num_classes is not None:
            raise DdpmsegError("this checkpoint is class-conditional; ddpmseg supports unconditional models only")
        return self.model(x_t, self.diffusion._scale_timesteps(t)).float()

    @torch.inference_mode()
    def _forward_intermediates(
        self, x: torch.Tensor, t: torch.Tensor, indices: list[int], stop_early: bool
    ) -> dict[int, torch.Tensor]:
        unet = guided_diffusion("unet")
        m = self.model
        if m.num_classes is not None:
            raise DdpmsegError("this checkpoint is class-conditional; ddpmseg supports unconditional models only")
        wanted = set(indices)
        last = max(wanted)
        emb = m.time_embed(unet.timestep_embedding(self.diffusion._scale_timesteps(t), m.model_channels))
        h = x.type(m.dtype)
        hs = []
        for module in m.input_blocks:
            h = module(h, emb)
            hs.append(h)
        h = m.middle_block(h, emb)
        out: dict[int, torch.Tensor] = {}
        for i, module in enumerate(m.output_blocks):
            h = torch.cat([h, hs.pop()], dim=1)
            h = module(h, emb)
            if i in wanted:
                out[i] = h
            if i == last and stop_early:
                return out
        m.out(h.type(x.dtype))
        return out
