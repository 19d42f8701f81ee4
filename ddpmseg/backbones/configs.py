"""The records that describe a backbone: its architecture config and its checkpoint.

Two families, told apart by the config's type: ``AdmConfig`` (guided-diffusion's
``create_model_and_diffusion`` flags) and ``DiffusersConfig`` (a diffusers
``UNet2DModel`` config.json plus the scheduler used for noising).
``BackboneSpec`` (family, preset name, config) and ``CheckpointRef`` (name,
path, sha256) are what feature caches and model folders store. Pure data: this
module imports neither torch nor diffusers.

``AdmConfig`` holds exactly the flags that change the network or the schedule;
training-only flags (dropout, use_fp16, ...) are accepted from flag files and
ignored.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Mapping, Union

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

    family: ClassVar[str] = "adm"
    SCHEDULE_FLAGS: ClassVar[tuple[str, ...]] = ("diffusion_steps", "noise_schedule", "rescale_timesteps")

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

    family: ClassVar[str] = "diffusers"

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


BackboneConfig = Union[AdmConfig, DiffusersConfig]
CONFIG_TYPES: dict[str, type] = {"adm": AdmConfig, "diffusers": DiffusersConfig}


@dataclass(frozen=True)
class BackboneSpec:
    """Which architecture: the family (from the config's type), the preset it matches (or None), the config."""

    config: BackboneConfig
    preset: str | None = None

    @property
    def family(self) -> str:
        return self.config.family

    def to_dict(self) -> dict[str, Any]:
        return {"family": self.family, "preset": self.preset or "custom", "config": self.config.to_dict()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "BackboneSpec":
        family = d.get("family", "adm")  # records from before the diffusers family have none
        if family not in CONFIG_TYPES:
            raise DdpmsegError(
                f"unknown backbone family {family!r} in the record; expected one of {', '.join(CONFIG_TYPES)} "
                "(written by a newer ddpmseg? upgrade it)"
            )
        config = AdmConfig.from_flags(d["config"], "the backbone record") if family == "adm" else DiffusersConfig.from_dict(d["config"])
        preset = d.get("preset")
        return cls(config, None if preset in (None, "custom") else str(preset))


@dataclass(frozen=True)
class CheckpointRef:
    """Where the weights came from: file or folder name, absolute path (or hub id), sha256 of the weights file."""

    name: str
    path: str
    sha256: str

    def to_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CheckpointRef":
        return cls(str(d["name"]), str(d["path"]), str(d["sha256"]))
