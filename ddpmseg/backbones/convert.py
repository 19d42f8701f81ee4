"""Convert a guided-diffusion (ADM) checkpoint into a diffusers pipeline folder.

Contract:
    result = convert_adm_to_diffusers("ffhq.pt", "ffhq-diffusers/", preset="ffhq_256")
    # ffhq-diffusers/unet/{config.json, diffusion_pytorch_model.safetensors}   UNet2DModel
    # ffhq-diffusers/scheduler/scheduler_config.json                          DDPMScheduler
    # ffhq-diffusers/model_index.json                                        DDPMPipeline
``ddpmseg extract --ckpt ffhq-diffusers/`` then reads it as a diffusers
backbone, whose decoder blocks equal the ADM's ``output_blocks``.

What the mapping has to get right (stock diffusers has no ADM converter):

* ``qkv`` is a 1x1 conv of shape (3C, C, 1) laid out ``[head][q,k,v][ch]``
  (legacy order, ``use_new_attention_order=False``) or ``[q,k,v][head][ch]``
  (new order); ``to_q``/``to_k``/``to_v`` want ``[head][ch]`` rows each.
  guided-diffusion scales q and k by ``ch**-0.25`` each, diffusers the product
  by ``ch**-0.5``: the same function.
* every attention keeps its GroupNorm (``attn_norm_num_groups`` for the mid
  block, which diffusers drops under scale-shift norm by default);
* the timestep embedding is ``[cos, sin]`` with frequencies ``/half``:
  ``flip_sin_to_cos=True, freq_shift=0``;
* ``use_scale_shift_norm`` -> ``resnet_time_scale_shift="scale_shift"``;
  ``resblock_updown`` -> ResnetDownsampleBlock2D / ResnetUpsampleBlock2D and
  ``downsample_type = upsample_type = "resnet"``; else strided 3x3 convs with
  padding 1 (``downsample_padding=1``);
* head count: ``num_head_channels`` -> ``attention_head_dim``; a fixed
  ``num_heads`` only when every attention (mid block included) gets the same
  head width.

Architectures diffusers cannot express are refused with a one-line reason;
the written model is checked against the ADM on a small input (every decoder
block's output and the final output) before the folder appears.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from ddpmseg._io import atomic_folder, check_new_folder
from ddpmseg._optional import diffusers as import_diffusers
import ddpmseg.backbones.runs as runs
from ddpmseg.backbones._builder import adm_architecture
from ddpmseg.backbones._checkpoint import read_state_dict
from ddpmseg.backbones._registry import get_preset
from ddpmseg.backbones.adm import AdmBackbone, build_diffusion, build_unet
from ddpmseg.backbones.configs import AdmConfig, DiffusersConfig
from ddpmseg.backbones.diffusers_unet import DiffusersBackbone
from ddpmseg.errors import DdpmsegError

# Largest relative error of the converted model's output accepted by the self-check.
VERIFY_TOLERANCE = 1e-4

_RES_KEYS = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}


@dataclass(frozen=True)
class Conversion:
    """What ``convert_adm_to_diffusers`` wrote and how closely it reproduces the ADM."""

    out: Path
    unet_config: dict[str, Any]
    scheduler_config: dict[str, Any]
    n_params: int
    max_rel_err: float


# --------------------------------------------------------------------------- configs


def _refuse(why: str) -> DdpmsegError:
    return DdpmsegError(f"cannot convert to a diffusers UNet2DModel: {why}")


def _attention_levels(config: AdmConfig) -> list[bool]:
    """Whether each level has attention (guided-diffusion: its downsampling factor is in attention_resolutions)."""
    ds = {config.image_size // int(r) for r in config.attention_resolutions.split(",") if r.strip()}
    return [2**level in ds for level in range(len(config.mults))]


def _head_dim(config: AdmConfig, attn_widths: list[int], mid_width: int) -> int | None:
    """diffusers' single ``attention_head_dim`` for the ADM's head flags (None: one head of full width)."""
    if config.num_head_channels != -1:
        return config.num_head_channels
    up = config.num_heads if config.num_heads_upsample == -1 else config.num_heads_upsample
    if up != config.num_heads and attn_widths:
        raise _refuse(
            f"num_heads={config.num_heads} but num_heads_upsample={up}: UNet2DModel uses one head layout for the "
            "encoder and decoder"
        )
    if config.num_heads == 1:
        return None  # every attention gets one head of its own width
    widths = sorted(set(attn_widths) | {mid_width})
    if len(widths) > 1:
        raise _refuse(
            f"a fixed num_heads={config.num_heads} over attention widths {widths} gives head widths "
            f"{[w // config.num_heads for w in widths]}, but UNet2DModel has one attention_head_dim; "
            "only num_head_channels (or equal widths) can be expressed"
        )
    return widths[0] // config.num_heads


def diffusers_unet_config(config: AdmConfig) -> dict[str, Any]:
    """The ``UNet2DModel`` config equivalent to an ADM, or a DdpmsegError saying why there is none."""
    if config.class_cond:
        raise _refuse("the checkpoint is class-conditional (class_cond=True); ddpmseg converts unconditional models")
    if config.rescale_timesteps and config.diffusion_steps != 1000:
        raise _refuse(
            f"rescale_timesteps=True with {config.diffusion_steps} steps feeds the network t*1000/steps, "
            "which UNet2DModel's timestep embedding cannot do"
        )
    mults = config.mults
    if mults[0] != 1:
        raise _refuse(
            f"channel_mult starts with {mults[0]}, but UNet2DModel sizes the timestep embedding from the first "
            "level's width; the first multiplier must be 1"
        )
    widths = [int(config.num_channels * m) for m in mults]
    bad = [w for w in widths if w % 32]
    if bad:
        raise _refuse(f"level width {bad[0]} is not a multiple of 32 (the ADM's GroupNorm groups)")
    attn = _attention_levels(config)
    head_dim = _head_dim(config, [w for w, a in zip(widths, attn) if a], widths[-1])
    updown = config.resblock_updown
    plain_down, plain_up = ("ResnetDownsampleBlock2D", "ResnetUpsampleBlock2D") if updown else ("DownBlock2D", "UpBlock2D")
    return {
        "sample_size": config.image_size,
        "in_channels": 3,
        "out_channels": 6 if config.learn_sigma else 3,
        "center_input_sample": False,
        "time_embedding_type": "positional",
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "block_out_channels": widths,
        "layers_per_block": config.num_res_blocks,
        "down_block_types": ["AttnDownBlock2D" if a else plain_down for a in attn],
        "up_block_types": ["AttnUpBlock2D" if a else plain_up for a in reversed(attn)],
        "mid_block_type": "UNetMidBlock2D",
        "mid_block_scale_factor": 1,
        "downsample_padding": 1,
        "downsample_type": "resnet" if updown else "conv",
        "upsample_type": "resnet" if updown else "conv",
        "dropout": 0.0,
        "act_fn": "silu",
        "attention_head_dim": head_dim,
        "norm_num_groups": 32,
        "attn_norm_num_groups": 32,
        "norm_eps": 1e-5,
        "resnet_time_scale_shift": "scale_shift" if config.use_scale_shift_norm else "default",
        "add_attention": True,
        "num_train_timesteps": config.diffusion_steps,
    }


def diffusers_scheduler_config(config: AdmConfig) -> dict[str, Any]:
    """The ``DDPMScheduler`` config of the ADM's noise schedule (linear scaled by 1000/steps, or cosine)."""
    scale = 1000 / config.diffusion_steps
    common = {
        "num_train_timesteps": config.diffusion_steps,
        # guided-diffusion: learned range with learn_sigma, else fixed large (sigma_small=False)
        "variance_type": "learned_range" if config.learn_sigma else "fixed_large",
        "clip_sample": True,
        "clip_sample_range": 1.0,
        "prediction_type": "epsilon",
    }
    if config.noise_schedule == "linear":
        return {**common, "beta_schedule": "linear", "beta_start": scale * 1e-4, "beta_end": scale * 0.02}
    if config.noise_schedule == "cosine":
        return {**common, "beta_schedule": "squaredcos_cap_v2"}
    raise _refuse(f"noise schedule {config.noise_schedule!r} has no DDPMScheduler equivalent")  # pragma: no cover


# --------------------------------------------------------------------------- weights


def _module_map(config: AdmConfig) -> list[tuple[str, str, str]]:
    """(ADM prefix, diffusers prefix, kind) of every module with weights; kind: res, attn, conv, linear, norm."""
    n_levels, nres = len(config.mults), config.num_res_blocks
    has_attn = _attention_levels(config)
    updown = "res" if config.resblock_updown else "conv"
    pairs = [
        ("time_embed.0", "time_embedding.linear_1", "linear"),
        ("time_embed.2", "time_embedding.linear_2", "linear"),
        ("input_blocks.0.0", "conv_in", "conv"),
    ]
    idx = 1
    for level in range(n_levels):
        for r in range(nres):
            pairs.append((f"input_blocks.{idx}.0", f"down_blocks.{level}.resnets.{r}", "res"))
            if has_attn[level]:
                pairs.append((f"input_blocks.{idx}.1", f"down_blocks.{level}.attentions.{r}", "attn"))
            idx += 1
        if level != n_levels - 1:
            adm, dif = ("", "") if config.resblock_updown else (".op", ".conv")
            pairs.append((f"input_blocks.{idx}.0{adm}", f"down_blocks.{level}.downsamplers.0{dif}", updown))
            idx += 1
    pairs += [
        ("middle_block.0", "mid_block.resnets.0", "res"),
        ("middle_block.1", "mid_block.attentions.0", "attn"),
        ("middle_block.2", "mid_block.resnets.1", "res"),
    ]
    idx = 0
    for u, level in enumerate(reversed(range(n_levels))):
        for r in range(nres + 1):
            pairs.append((f"output_blocks.{idx}.0", f"up_blocks.{u}.resnets.{r}", "res"))
            sub = 1
            if has_attn[level]:
                pairs.append((f"output_blocks.{idx}.1", f"up_blocks.{u}.attentions.{r}", "attn"))
                sub = 2
            if level and r == nres:
                suffix = "" if config.resblock_updown else ".conv"
                pairs.append((f"output_blocks.{idx}.{sub}{suffix}", f"up_blocks.{u}.upsamplers.0" + suffix, updown))
            idx += 1
    pairs += [("out.0", "conv_norm_out", "norm"), ("out.2", "conv_out", "conv")]
    return pairs


def _split_qkv(w: torch.Tensor, heads: int, new_order: bool) -> tuple[torch.Tensor, ...]:
    """q, k, v rows (each ``[head][ch]``) of a qkv weight (3C, C) or bias (3C,)."""
    c3 = w.shape[0]
    ch = c3 // (3 * heads)
    rest = w.shape[1:]
    if new_order:  # [q,k,v][head][ch]
        parts = w.reshape(3, heads * ch, *rest).unbind(0)
    else:  # [head][q,k,v][ch]
        parts = w.reshape(heads, 3, ch, *rest).unbind(1)
    return tuple(p.reshape(heads * ch, *rest).clone() for p in parts)


def convert_state_dict(
    state: Mapping[str, torch.Tensor], config: AdmConfig, unet_config: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """The ADM state dict renamed and reshaped into ``UNet2DModel(**unet_config)``'s keys."""
    new: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    head_dim = unet_config["attention_head_dim"]

    def take(key: str) -> torch.Tensor:
        used.add(key)
        return state[key]

    for adm, dif, kind in _module_map(config):
        if kind == "res":
            for a, d in _RES_KEYS.items():
                for p in ("weight", "bias"):
                    if f"{adm}.{a}.{p}" in state:
                        new[f"{dif}.{d}.{p}"] = take(f"{adm}.{a}.{p}").clone()
        elif kind == "attn":
            width = state[f"{adm}.norm.weight"].shape[0]
            heads = 1 if head_dim is None else width // head_dim
            for p in ("weight", "bias"):
                new[f"{dif}.group_norm.{p}"] = take(f"{adm}.norm.{p}").clone()
                qkv = take(f"{adm}.qkv.{p}")
                qkv = qkv[..., 0] if qkv.ndim == 3 else qkv
                for name, part in zip(("to_q", "to_k", "to_v"), _split_qkv(qkv, heads, config.use_new_attention_order)):
                    new[f"{dif}.{name}.{p}"] = part
                proj = take(f"{adm}.proj_out.{p}")
                new[f"{dif}.to_out.0.{p}"] = (proj[..., 0] if proj.ndim == 3 else proj).clone()
        else:
            for p in ("weight", "bias"):
                new[f"{dif}.{p}"] = take(f"{adm}.{p}").clone()
    left = sorted(set(state) - used)
    if left:
        raise _refuse(f"{len(left)} ADM weights have no place in the UNet2DModel (e.g. {left[0]})")
    return new


# --------------------------------------------------------------------------- entry point


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want|, 0 when both are zero (a fresh ADM's output conv is zero)."""
    scale = float(want.abs().max())
    diff = float((got - want).abs().max())
    return diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))


def _verify(adm: AdmBackbone, unet: DiffusersBackbone, steps: tuple[int, ...]) -> float:
    """Largest relative error of every decoder block's output and of the final output on a small random input."""
    side = max(16, 2 ** (len(adm.config.mults) - 1))  # small, and every level can halve it
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(len(steps), 3, side, side, generator=gen)
    t = torch.tensor(steps)
    blocks = list(range(adm.config.num_output_blocks))
    want = adm.forward_intermediates(x, t, blocks)
    got = unet.forward_intermediates(x, t, blocks)
    with torch.inference_mode():
        want[-1], got[-1] = adm.model(x, t), unet.model(x, t).sample
    return max(_rel_err(got[k], want[k]) for k in want)


def _check_schedule(config: AdmConfig, sched_config: Mapping[str, Any]) -> None:
    """The DDPMScheduler's q_sample coefficients must equal guided-diffusion's to float32 precision."""
    mine = import_diffusers().DDPMScheduler.from_config(dict(sched_config)).alphas_cumprod.double().numpy()
    theirs = build_diffusion(config).alphas_cumprod
    # DDPMScheduler keeps alphas_cumprod in float32: sqrt(1 - abar) near t=0 differs by ~1e-6
    err = max(float(np.max(np.abs(f(mine) - f(theirs)))) for f in (np.sqrt, lambda a: np.sqrt(1 - a)))
    if err > 1e-5:
        raise _refuse(f"the {config.noise_schedule} schedule's q_sample coefficients differ from DDPMScheduler's by {err:.1e}")


def convert_adm_to_diffusers(
    checkpoint: str | Path,
    out: str | Path,
    preset: str | None = None,
    model_flags: str | Path | None = None,
    image_size: int | None = None,
    num_head_channels: int | None = None,
    overwrite: bool = False,
) -> Conversion:
    """Write the ADM ``checkpoint`` as a diffusers DDPMPipeline folder ``out`` (unet/ + scheduler/).

    The architecture comes from ``preset``, ``model_flags`` (a guided-diffusion
    flags JSON) or, with neither, the checkpoint itself (a train-ddpm run
    folder: its newest EMA file; a file of a run: the run's flags.json). The folder is built
    next to ``out`` and renamed into place once the converted model has been
    checked against the ADM; an existing non-empty ``out`` is refused.
    """
    out = check_new_folder(out, overwrite=overwrite)
    diffusers = import_diffusers()
    if runs.is_run(checkpoint):
        checkpoint = runs.checkpoint_at(checkpoint)
    if preset is None and model_flags is None and image_size is None and num_head_channels is None:
        run = runs.run_of(checkpoint)
        model_flags = run / runs.FLAGS if run is not None else None
    state = read_state_dict(checkpoint)
    found = get_preset(preset) if preset else None
    if found is not None and found.family != "adm":
        raise DdpmsegError(f"--preset {preset} is already a diffusers model; convert takes guided-diffusion presets")
    _, config = adm_architecture(state, str(checkpoint), found, model_flags, image_size, num_head_channels)
    unet_config = diffusers_unet_config(config)
    sched_config = diffusers_scheduler_config(config)
    _check_schedule(config, sched_config)

    new_state = convert_state_dict(state, config, unet_config)
    with torch.device("meta"):
        unet = diffusers.UNet2DModel(**unet_config)
    want = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in new_state.items()}
    if want != have:
        diff = sorted(set(want) ^ set(have)) or [k for k in want if want[k] != have[k]]
        raise _refuse(f"the mapped weights do not fit the UNet2DModel (first difference: {diff[0]})")
    unet.load_state_dict(new_state, strict=True, assign=True)
    unet.eval()
    with torch.device("meta"):
        adm = build_unet(config)
    adm.load_state_dict(dict(state), strict=True, assign=True)
    steps = (config.diffusion_steps // 10, config.diffusion_steps - 1)
    err = _verify(AdmBackbone(config, adm.eval()), DiffusersBackbone(DiffusersConfig(unet_config, sched_config), unet), steps)
    if not err <= VERIFY_TOLERANCE:
        raise _refuse(f"the converted model differs from the ADM by {err:.1e} (relative); report this as a bug")

    scheduler = diffusers.DDPMScheduler(**sched_config)
    with atomic_folder(out) as tmp:
        diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(str(tmp), safe_serialization=True)
        record = {"source": str(Path(checkpoint).resolve()), "adm_config": config.to_dict(), "max_rel_err": err}
        (tmp / "ddpmseg_conversion.json").write_text(json.dumps(record, indent=2) + "\n")
    return Conversion(
        out=out,
        unet_config=unet_config,
        scheduler_config=sched_config,
        n_params=sum(v.numel() for v in new_state.values()),
        max_rel_err=err,
    )


__all__ = ["Conversion", "convert_adm_to_diffusers", "diffusers_unet_config", "diffusers_scheduler_config"]
