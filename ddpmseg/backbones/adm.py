"""The ADM (guided-diffusion) U-Net as a frozen feature backbone.

Contract, for a config with image size S:
    backbone = create_backbone("ffhq_256", checkpoint="ffhq.pt")
    x_t = backbone.q_sample(x0, t, noise)           # (B,3,S,S)
    maps = backbone.forward_blocks(x_t, t, [5, 12])  # {5: (B,1024,S/8,S/8), 12: (B,256,S/2,S/2)}
``forward_blocks`` runs the very modules of guided-diffusion's
``UNetModel.forward`` in the same order and stops after the last requested
decoder ("output") block, so the maps equal forward hooks on a full pass.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from ddpmseg.backbones.presets import AdmConfig, get_preset
from ddpmseg.errors import DdpmsegError

log = logging.getLogger(__name__)


def _import_guided_diffusion():
    """Import only the MPI-free modules, silencing their torch FutureWarnings."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        from guided_diffusion import gaussian_diffusion, script_util, unet  # noqa: F401

    return script_util, gaussian_diffusion, unet


def build_unet(config: AdmConfig) -> torch.nn.Module:
    """A randomly initialised guided-diffusion ``UNetModel`` for ``config`` (eval mode)."""
    script_util, _, _ = _import_guided_diffusion()
    try:
        model = script_util.create_model(
            image_size=config.image_size,
            num_channels=config.num_channels,
            num_res_blocks=config.num_res_blocks,
            channel_mult=config.channel_mult,
            learn_sigma=config.learn_sigma,
            class_cond=config.class_cond,
            attention_resolutions=config.attention_resolutions,
            num_heads=config.num_heads,
            num_head_channels=config.num_head_channels,
            num_heads_upsample=config.num_heads_upsample,
            use_scale_shift_norm=config.use_scale_shift_norm,
            resblock_updown=config.resblock_updown,
            use_new_attention_order=config.use_new_attention_order,
        )
    except (AssertionError, ValueError, ZeroDivisionError) as e:
        raise DdpmsegError(f"guided-diffusion cannot build this architecture: {e or type(e).__name__}") from None
    return model.eval().requires_grad_(False)


def build_diffusion(config: AdmConfig):
    """guided-diffusion's ``GaussianDiffusion`` (for q_sample and timestep scaling)."""
    script_util, _, _ = _import_guided_diffusion()
    return script_util.create_gaussian_diffusion(
        steps=config.diffusion_steps,
        learn_sigma=config.learn_sigma,
        noise_schedule=config.noise_schedule,
        rescale_timesteps=config.rescale_timesteps,
        timestep_respacing="",
    )


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DdpmsegError(f"--device {device} asked for, but this torch has no CUDA device; use --device cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise DdpmsegError(f"unknown device {device!r}; use auto, cpu or cuda") from None


def _check_indices(values: Sequence[int], n: int, what: str, valid: str, example: str) -> list[int]:
    values = [int(v) for v in values]
    if not values:
        raise DdpmsegError(f"no {what} given; pass e.g. {example}")
    bad = [v for v in values if not 0 <= v < n]
    if bad:
        raise DdpmsegError(f"{what} {bad[0]} out of range: {valid}")
    if len(set(values)) != len(values):
        raise DdpmsegError(f"duplicated {what} in {values}; list each once")
    return values


PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def precision_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The autocast dtype of ``precision`` on ``device``, refusing what the device cannot run well."""
    if precision not in PRECISIONS:
        raise DdpmsegError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if precision == "fp16" and device.type == "cpu":
        raise DdpmsegError("--precision fp16 is for CUDA devices (on the CPU it is very slow); use bf16 or fp32 there")
    return PRECISIONS[precision]


def _output_to_float32(module: torch.nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
    return output.float()


@dataclass(frozen=True)
class BlockInfo:
    index: int
    module: str
    channels: int
    resolution: int


class Backbone:
    """What every backbone family shares: a frozen U-Net whose ``config`` has
    ``image_size``, ``num_output_blocks`` and ``diffusion_steps``. Subclasses add
    ``blocks()``, ``q_sample`` and ``forward_blocks``."""

    family = "?"
    config: Any
    model: torch.nn.Module

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def image_size(self) -> int:
        return self.config.image_size

    def to(self, device: torch.device | str) -> "Backbone":
        self.model.to(device)
        return self

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

    def check_blocks(self, blocks: Sequence[int]) -> list[int]:
        """Validated decoder block indices (range, duplicates)."""
        n = self.config.num_output_blocks
        return _check_indices(blocks, n, "block index", f"this model has decoder blocks 0..{n - 1}", "--blocks 5,6,7,8,12")

    def check_steps(self, steps: Sequence[int]) -> list[int]:
        """Validated diffusion timesteps (range, duplicates)."""
        n = self.config.diffusion_steps
        return _check_indices(steps, n, "step", f"diffusion steps must lie in [0, {n})", "--steps 50,150,250")


class AdmBackbone(Backbone):
    """A frozen ADM U-Net plus its noise schedule."""

    family = "adm"

    def __init__(self, config: AdmConfig, model: torch.nn.Module, name: str = "custom") -> None:
        self.config = config
        self.model = model
        self.name = name
        self.diffusion = build_diffusion(config)

    def blocks(self) -> list[BlockInfo]:
        """Every decoder block: index, module name, output channels and resolution."""
        return [
            BlockInfo(i, f"output_blocks.{i}", c, r)
            for i, (c, r) in enumerate(self.config.output_block_shapes())
        ]

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise, guided-diffusion's own code."""
        return self.diffusion.q_sample(x0, t, noise=noise)

    @torch.inference_mode()
    def forward_blocks(
        self, x: torch.Tensor, t: torch.Tensor, blocks: Sequence[int], y: torch.Tensor | None = None
    ) -> dict[int, torch.Tensor]:
        """Outputs of the requested decoder blocks for the batch ``x`` at timesteps ``t``.

        Mirrors ``UNetModel.forward`` and returns right after the last requested
        block: later decoder blocks and the output head are never run.
        """
        _, _, unet = _import_guided_diffusion()
        m = self.model
        wanted = set(blocks)
        last = max(wanted)
        if (y is None) != (m.num_classes is None):
            raise DdpmsegError(
                "this checkpoint is class-conditional; ddpmseg supports unconditional models only"
                if y is None
                else "class labels given to an unconditional model"
            )
        emb = m.time_embed(unet.timestep_embedding(self.diffusion._scale_timesteps(t), m.model_channels))
        if y is not None:
            emb = emb + m.label_emb(y)
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
            if i == last:
                break
        return out


def create_backbone(
    name: str | None = None,
    checkpoint: str | Path | None = None,
    *,
    config: AdmConfig | None = None,
    device: str | torch.device = "cpu",
) -> AdmBackbone:
    """Build a backbone from a preset name or a config, optionally loading weights.

    Without weights the network keeps guided-diffusion's random init (tests,
    demos). With ``checkpoint`` and neither name nor config, the architecture is
    matched against the presets or inferred from the state dict's shapes.
    """
    from ddpmseg.backbones.checkpoint import check_state_dict, read_state_dict, resolve_config

    state = read_state_dict(checkpoint) if checkpoint is not None else None
    if config is None and name is not None:
        config = get_preset(name).config
    elif config is None:
        if state is None:
            raise DdpmsegError("give a preset name, a config or a checkpoint to build a backbone")
        name, config = resolve_config(state, source=str(checkpoint))
    model = build_unet(config)
    if state is not None:
        check_state_dict(model, state, expected=name or "the given flags", source=str(checkpoint))
        model.load_state_dict(state)
    dev = resolve_device(device) if isinstance(device, str) else device
    return AdmBackbone(config, model.to(dev), name=name or "custom")


def random_unet(config: AdmConfig, seed: int = 0) -> torch.nn.Module:
    """A deterministic random-weight U-Net whose every block does something.

    guided-diffusion zero-initialises each residual branch's last conv and the
    attention projections (so a fresh model is the identity plus skips); those
    get small Gaussian weights here, as a trained model would have. Used by
    tests, benchmarks and the demo in place of real checkpoints.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_unet(config)
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim > 1 and not p.any():
                    p.normal_(0.0, 0.02)
    return model
