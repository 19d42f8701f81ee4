"""The preset registry: published checkpoints by name (timm's model registry, for diffusion U-Nets).

A preset fixes the architecture (an ``AdmConfig`` or a ``DiffusersConfig``;
its type is the family) and names the file and where users download it.
``list_presets()`` lists them, ``get_preset(name)`` returns one, and
``register_preset`` adds your own.
"""

from __future__ import annotations

from dataclasses import dataclass

from ddpmseg.backbones.configs import AdmConfig, BackboneConfig, DiffusersConfig
from ddpmseg.errors import DdpmsegError


@dataclass(frozen=True)
class Preset:
    """A published checkpoint: its architecture and where users download it."""

    name: str
    config: BackboneConfig
    filename: str
    urls: tuple[str, ...]
    description: str

    @property
    def family(self) -> str:
        """``adm`` or ``diffusers``: the type of the config."""
        return self.config.family


_YANDEX = "https://storage.yandexcloud.net/yandex-research/ddpm-segmentation/models/ddpm_checkpoints/"
_OPENAI = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/"
_ADM_256 = AdmConfig()  # all five presets share the paper's flags

_PRESETS: dict[str, Preset] = {}


def register_preset(preset: Preset) -> Preset:
    """Add a preset to the registry (its name must be new)."""
    if preset.name in _PRESETS:
        raise DdpmsegError(f"preset {preset.name!r} is already registered; choose another name")
    _PRESETS[preset.name] = preset
    return preset


for _name, _file, _urls, _desc in [
    ("ffhq_256", "ffhq.pt", (_YANDEX + "ffhq.pt",), "FFHQ faces, 256x256 (the paper's FFHQ-34 / CelebA-19)"),
    (
        "lsun_bedroom_256",
        "lsun_bedroom.pt",
        (_YANDEX + "lsun_bedroom.pt", _OPENAI + "lsun_bedroom.pt"),
        "LSUN bedrooms, 256x256 (Bedroom-28, ADE-Bedroom-30)",
    ),
    ("lsun_cat_256", "lsun_cat.pt", (_YANDEX + "lsun_cat.pt",), "LSUN cats, 256x256 (Cat-15)"),
    ("lsun_horse_256", "lsun_horse.pt", (_YANDEX + "lsun_horse.pt",), "LSUN horses, 256x256 (Horse-21)"),
    (
        "imagenet_256_uncond",
        "256x256_diffusion_uncond.pt",
        (_OPENAI + "256x256_diffusion_uncond.pt",),
        "ImageNet, unconditional, 256x256",
    ),
]:
    register_preset(Preset(_name, _ADM_256, _file, _urls, _desc))


# The google DDPM checkpoints (Ho et al. 2020) as diffusers converted them.
# Checked against the hub's files: the config.json of google/ddpm-celebahq-256,
# -bedroom-256, -church-256, -cat-256 and -cifar10-32 (as copied by fine-tunes
# naming those snapshots) and the scheduler_config.json of -cat-256, -church-256
# (fixed_small) and -cifar10-32 (fixed_large). ddpm-ema-celebahq-256 is assumed
# to equal ddpm-celebahq-256 (same training run, EMA weights).
_GOOGLE_DDPM_COMMON = dict(
    in_channels=3,
    out_channels=3,
    layers_per_block=2,
    act_fn="silu",
    attention_head_dim=None,
    center_input_sample=False,
    downsample_padding=0,
    flip_sin_to_cos=False,
    freq_shift=1,
    mid_block_scale_factor=1,
    norm_eps=1e-6,
    norm_num_groups=32,
    time_embedding_type="positional",
)
_GOOGLE_DDPM_256 = DiffusersConfig(
    unet=dict(
        _GOOGLE_DDPM_COMMON,
        sample_size=256,
        block_out_channels=[128, 128, 256, 256, 512, 512],
        down_block_types=["DownBlock2D"] * 4 + ["AttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "AttnUpBlock2D"] + ["UpBlock2D"] * 4,
    ),
    scheduler=dict(
        num_train_timesteps=1000, beta_schedule="linear", beta_start=0.0001, beta_end=0.02,
        variance_type="fixed_small", clip_sample=True,
    ),
)
_GOOGLE_DDPM_32 = DiffusersConfig(
    unet=dict(
        _GOOGLE_DDPM_COMMON,
        sample_size=32,
        block_out_channels=[128, 256, 256, 256],
        down_block_types=["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    ),
    scheduler=dict(_GOOGLE_DDPM_256.scheduler, variance_type="fixed_large"),
)

for _name, _hub, _config, _desc in [
    ("ddpm_celebahq_256", "google/ddpm-celebahq-256", _GOOGLE_DDPM_256, "DDPM CelebA-HQ faces, 256x256 (diffusers)"),
    ("ddpm_ema_celebahq_256", "google/ddpm-ema-celebahq-256", _GOOGLE_DDPM_256, "DDPM CelebA-HQ faces, EMA weights, 256x256 (diffusers)"),
    ("ddpm_bedroom_256", "google/ddpm-bedroom-256", _GOOGLE_DDPM_256, "DDPM LSUN bedrooms, 256x256 (diffusers)"),
    ("ddpm_cat_256", "google/ddpm-cat-256", _GOOGLE_DDPM_256, "DDPM LSUN cats, 256x256 (diffusers)"),
    ("ddpm_church_256", "google/ddpm-church-256", _GOOGLE_DDPM_256, "DDPM LSUN churches, 256x256 (diffusers)"),
    ("ddpm_cifar10_32", "google/ddpm-cifar10-32", _GOOGLE_DDPM_32, "DDPM CIFAR-10, 32x32 (diffusers)"),
]:
    register_preset(Preset(_name, _config, _hub.split("/")[1], ("hf://" + _hub,), _desc))


def list_presets() -> list[str]:
    """Names of all registered presets, sorted."""
    return sorted(_PRESETS)


def get_preset(name: str) -> Preset:
    """The registered preset ``name``, or a DdpmsegError listing the valid names."""
    try:
        return _PRESETS[name]
    except KeyError:
        raise DdpmsegError(
            f"unknown preset {name!r}; choose one of {', '.join(list_presets())} "
            "or pass --model-flags FILE"
        ) from None
