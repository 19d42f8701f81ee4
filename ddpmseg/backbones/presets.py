"""Named backbone architectures, registered as frozen dataclasses.

Two families: ADM (guided-diffusion; ``AdmConfig``) and diffusers
``UNet2DModel`` (``DiffusersConfig``; the google DDPM checkpoints on the
Hugging Face hub). This module never imports diffusers.

A preset fixes the U-Net flags and the noise schedule of a published
checkpoint. ``AdmConfig`` holds exactly the guided-diffusion
``create_model_and_diffusion`` arguments that change the network or the
schedule; training-only flags (dropout, use_fp16, ...) are accepted from flag
files and ignored.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ddpmseg.errors import DdpmsegError

# Flags guided-diffusion scripts carry that do not change the network's
# eval-mode function or the q_sample schedule.
IGNORED_FLAGS = frozenset(
    {
        "dropout",
        "use_fp16",
        "use_checkpoint",
        "timestep_respacing",
        "use_kl",
        "predict_xstart",
        "rescale_learned_sigmas",
        "model_path",
        "batch_size",
        "num_samples",
        "clip_denoised",
        "use_ddim",
        "lr",
        "weight_decay",
        "ema_rate",
    }
)


@dataclass(frozen=True)
class AdmConfig:
    """guided-diffusion U-Net + diffusion flags (their names and meanings)."""

    image_size: int = 256
    num_channels: int = 256
    num_res_blocks: int = 2
    channel_mult: str = ""
    num_heads: int = 4
    num_head_channels: int = 64
    num_heads_upsample: int = -1
    attention_resolutions: str = "32,16,8"
    class_cond: bool = False
    learn_sigma: bool = True
    use_scale_shift_norm: bool = True
    resblock_updown: bool = True
    use_new_attention_order: bool = False
    diffusion_steps: int = 1000
    noise_schedule: str = "linear"
    rescale_timesteps: bool = False

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            object.__setattr__(self, f.name, _coerce(f.name, value, f.type))
        if self.channel_mult == "" and self.image_size not in (64, 128, 256, 512):
            raise DdpmsegError(
                f"image_size {self.image_size} has no default channel_mult in guided-diffusion; "
                "set channel_mult explicitly (e.g. \"1,1,2,2,4,4\")"
            )
        if self.num_channels % 32:
            raise DdpmsegError(
                f"num_channels must be a multiple of 32 (GroupNorm32), got {self.num_channels}"
            )
        if self.noise_schedule not in ("linear", "cosine"):
            raise DdpmsegError(
                f"noise_schedule must be 'linear' or 'cosine', got {self.noise_schedule!r}"
            )
        if self.diffusion_steps < 1:
            raise DdpmsegError(f"diffusion_steps must be >= 1, got {self.diffusion_steps}")

    @property
    def mults(self) -> tuple[float, ...]:
        """The channel multiplier per level (guided-diffusion's defaults by image size)."""
        if self.channel_mult:
            return tuple(float(m) for m in self.channel_mult.split(","))
        return {
            512: (0.5, 1, 1, 2, 2, 4, 4),
            256: (1, 1, 2, 2, 4, 4),
            128: (1, 1, 2, 3, 4),
            64: (1, 2, 3, 4),
        }[self.image_size]

    @property
    def num_output_blocks(self) -> int:
        return len(self.mults) * (self.num_res_blocks + 1)

    def output_block_shapes(self) -> list[tuple[int, int]]:
        """(channels, resolution) of each decoder block's output at ``image_size``."""
        levels = len(self.mults)
        shapes = []
        for i in range(self.num_output_blocks):
            level = levels - 1 - i // (self.num_res_blocks + 1)
            res = self.image_size // 2**level
            if level and i % (self.num_res_blocks + 1) == self.num_res_blocks:
                res *= 2  # the last block of a level upsamples
            shapes.append((int(self.num_channels * self.mults[level]), res))
        return shapes

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_flags(cls, flags: Mapping[str, Any], source: str = "flags") -> "AdmConfig":
        """Build from guided-diffusion flag names; unknown names are an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(flags) - known - IGNORED_FLAGS)
        if unknown:
            raise DdpmsegError(
                f"{source}: unknown guided-diffusion flag(s) {', '.join(unknown)}; "
                f"valid flags: {', '.join(sorted(known))}"
            )
        return cls(**{k: v for k, v in flags.items() if k in known})

    @classmethod
    def from_json(cls, path: str | Path) -> "AdmConfig":
        path = Path(path)
        try:
            flags = json.loads(path.read_text())
        except FileNotFoundError:
            raise DdpmsegError(f"model flags file {path} does not exist") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DdpmsegError(f"cannot read model flags {path}: {e}; expected a JSON object") from None
        if not isinstance(flags, dict):
            raise DdpmsegError(f"model flags {path} must hold a JSON object of guided-diffusion flags")
        return cls.from_flags(flags, source=str(path))


def _coerce(name: str, value: Any, annotation: str) -> Any:
    """Accept the string/number spellings guided-diffusion's argparse accepts."""
    kind = {"int": int, "bool": bool, "str": str}[annotation]
    try:
        if kind is bool:
            if isinstance(value, str):
                if value.lower() in ("true", "1", "yes"):
                    return True
                if value.lower() in ("false", "0", "no"):
                    return False
                raise ValueError(value)
            return bool(value)
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return int(value)
        if isinstance(value, (list, tuple)):
            return ",".join(str(v) for v in value)
        return str(value)
    except (TypeError, ValueError):
        raise DdpmsegError(f"flag {name}={value!r} is not a valid {annotation}") from None


# UNet2DModel config keys that are diffusers bookkeeping, not architecture.
_DIFFUSERS_PRIVATE = ("_class_name", "_diffusers_version", "_name_or_path", "_use_default_values")


def _json_clean(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (tuples -> lists), so records compare equal after a round trip."""
    return json.loads(json.dumps(obj))


@dataclass(frozen=True, eq=False)
class DiffusersConfig:
    """A diffusers ``UNet2DModel`` config plus the noise schedule used for q_sample.

    ``unet`` is the model's ``config.json`` without diffusers' private keys.
    ``scheduler`` is the scheduler config used for noising (the folder's
    ``scheduler_config.json``) or None: guided-diffusion's linear schedule over
    ``num_train_timesteps`` (1000) steps.
    """

    unet: Mapping[str, Any]
    scheduler: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        unet = {k: v for k, v in dict(self.unet).items() if k not in _DIFFUSERS_PRIVATE}
        sched = None if self.scheduler is None else {
            k: v for k, v in dict(self.scheduler).items() if k not in _DIFFUSERS_PRIVATE
        }
        object.__setattr__(self, "unet", _json_clean(unet))
        object.__setattr__(self, "scheduler", _json_clean(sched))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DiffusersConfig) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(json.dumps(self.to_dict(), sort_keys=True))

    @property
    def image_size(self) -> int:
        size = self.unet.get("sample_size")
        if isinstance(size, list):
            if len(size) != 2 or size[0] != size[1]:
                raise DdpmsegError(f"UNet2DModel sample_size {size} is not square; ddpmseg needs square models")
            size = size[0]
        if not isinstance(size, int) or size < 1:
            raise DdpmsegError(f"UNet2DModel config has no usable sample_size ({size!r}); add it to config.json")
        return size

    @property
    def layers_per_block(self) -> int:
        return int(self.unet.get("layers_per_block", 2))

    @property
    def block_out_channels(self) -> tuple[int, ...]:
        return tuple(int(c) for c in self.unet.get("block_out_channels", (224, 448, 672, 896)))

    @property
    def num_output_blocks(self) -> int:
        return len(self.block_out_channels) * (self.layers_per_block + 1)

    @property
    def diffusion_steps(self) -> int:
        if self.scheduler is not None:
            return int(self.scheduler.get("num_train_timesteps", 1000))
        return int(self.unet.get("num_train_timesteps") or 1000)

    def output_block_shapes(self) -> list[tuple[int, int]]:
        """(channels, resolution) of each decoder unit, numbered like guided-diffusion's output_blocks."""
        chans = self.block_out_channels[::-1]
        n, step = len(chans), self.layers_per_block + 1
        shapes = []
        for k in range(self.num_output_blocks):
            level, j = divmod(k, step)
            res = self.image_size // 2 ** (n - 1 - level)
            if j == step - 1 and level < n - 1:
                res *= 2  # the up block's output, after its upsampler
            shapes.append((chans[level], res))
        return shapes

    def to_dict(self) -> dict[str, Any]:
        # image_size is derived (sample_size); it is recorded for readers of the cache (FeatureCache.image_size)
        return {"image_size": self.image_size, "unet": _json_clean(self.unet), "scheduler": _json_clean(self.scheduler)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DiffusersConfig":
        return cls(unet=d["unet"], scheduler=d.get("scheduler"))


@dataclass(frozen=True)
class Preset:
    """A published checkpoint: its architecture and where users download it."""

    name: str
    config: AdmConfig | DiffusersConfig
    filename: str
    urls: tuple[str, ...]
    description: str
    family: str = "adm"


_YANDEX = "https://storage.yandexcloud.net/yandex-research/ddpm-segmentation/models/ddpm_checkpoints/"
_OPENAI = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/"
_ADM_256 = AdmConfig()  # all five presets share the paper's flags

_PRESETS: dict[str, Preset] = {}


def register_preset(preset: Preset) -> Preset:
    if preset.name in _PRESETS:
        raise ValueError(f"preset {preset.name!r} is already registered")
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
    register_preset(Preset(_name, _config, _hub.split("/")[1], ("hf://" + _hub,), _desc, family="diffusers"))


def list_presets() -> list[str]:
    """Names of all registered presets, sorted."""
    return sorted(_PRESETS)


def get_preset(name: str) -> Preset:
    try:
        return _PRESETS[name]
    except KeyError:
        raise DdpmsegError(
            f"unknown preset {name!r}; choose one of {', '.join(list_presets())} "
            "or pass --model-flags FILE"
        ) from None
