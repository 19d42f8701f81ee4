"""``create_backbone``: where a checkpoint becomes a model, for both families.

    create_backbone("ffhq.pt")                          # ADM file: architecture matched to a preset or inferred
    create_backbone("ffhq.pt", preset="ffhq_256")       # ... or named
    create_backbone("my.pt", flags="flags.json")        # ... or given as guided-diffusion flags (file, dict, AdmConfig)
    create_backbone("google/ddpm-cat-256")              # diffusers hub id, model folder or pipeline folder
    create_backbone("run/")                             # a train-ddpm run: its newest EMA checkpoint and flags
    create_backbone("run/ema_0.9999_000030.pt")         # ... an earlier step's (runs.checkpoint_at(run, 30)) with them
    create_backbone(preset="ffhq_256")                  # the preset's architecture with random weights

A file is always an ADM checkpoint (one in a train-ddpm run folder has the
run's flags.json); a train-ddpm run folder (flags.json) its newest EMA
checkpoint; any other folder or an ``org/name`` hub id a diffusers
``UNet2DModel``. The backbone carries its provenance:
``backbone.preset`` (the matching preset's name, or None) and
``backbone.checkpoint`` (name, path, sha256 of the weights file).
``backbone_from_record`` rebuilds the backbone a cache or model folder
recorded, refusing weights other than the recorded ones.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Union

import torch

import ddpmseg.backbones.diffusers_unet as dif
import ddpmseg.backbones.runs as runs
from ddpmseg.backbones._base import Backbone, resolve_device
from ddpmseg._io import file_sha256
from ddpmseg.backbones._checkpoint import check_signature, config_signature, read_state_dict, resolve_config
from ddpmseg.backbones._registry import Preset, get_preset, list_presets
from ddpmseg.backbones.adm import AdmBackbone, build_unet
from ddpmseg.backbones.configs import AdmConfig, BackboneSpec, CheckpointRef, DiffusersConfig
from ddpmseg.errors import DdpmsegError

log = logging.getLogger(__name__)

Flags = Union[str, Path, Mapping[str, Any], AdmConfig]

# the UNet2DModel config keys that fix a diffusers preset's architecture
_DIFFUSERS_ARCH_KEYS = ("sample_size", "block_out_channels", "layers_per_block", "down_block_types", "up_block_types")


def is_diffusers_source(source: str | Path) -> bool:
    """A folder (other than a train-ddpm run) or a hub id: diffusers; anything else is an ADM checkpoint."""
    return (Path(source).is_dir() and not runs.is_run(source)) or dif.looks_like_hub_id(source)


def create_backbone(
    source: str | Path | None = None,
    preset: str | None = None,
    flags: Flags | None = None,
    device: str | torch.device = "auto",
    *,
    image_size: int | None = None,
    num_head_channels: int | None = None,
) -> Backbone:
    """The frozen backbone of ``source`` (a checkpoint file, diffusers folder or hub id), on ``device``.

    ``preset`` names the architecture (``ddpmseg presets``), ``flags`` gives it
    as guided-diffusion flags; with neither, it is matched against the presets
    or inferred from the weights, which cannot show two values that change
    the features: ``image_size`` and ``num_head_channels`` (needed then, unless
    the weights are a preset's). Without ``source`` the network keeps its
    family's random init.
    """
    if preset is not None and flags is not None:
        raise DdpmsegError("give either --preset or --model-flags, not both")
    if source is None and preset is None and flags is None:
        raise DdpmsegError("give a checkpoint, a preset or model flags to build a backbone")
    if source is not None and runs.is_run(source):
        if preset is not None or flags is not None:
            raise DdpmsegError(f"{source} is a training run: its flags.json fixes the architecture; "
                               "leave out --preset and --model-flags")
        source, flags = runs.latest_ema(source)
    elif (source is not None and preset is None and flags is None and image_size is None and num_head_channels is None
          and (run := runs.run_of(source)) is not None):
        flags = run / runs.FLAGS  # an earlier step's file of a run: the run's architecture
    found = get_preset(preset) if preset is not None else None
    diffusers = (found is not None and found.family == "diffusers") or (source is not None and is_diffusers_source(source))
    if diffusers and (image_size is not None or num_head_channels is not None):
        raise DdpmsegError("--image-size and --num-head-channels apply to guided-diffusion checkpoints; a diffusers "
                           "model's config.json fixes them: leave them out")
    if diffusers:
        backbone = _create_diffusers(source, found, flags)
    else:
        backbone = _create_adm(source, found, flags, image_size, num_head_channels)
    return backbone.to(resolve_device(device))


def checkpoint_ref(source: str | Path) -> CheckpointRef:
    """Name, absolute path (or hub id) and sha256 of the weights of ``source`` (either family)."""
    if runs.is_run(source):
        source = runs.latest_ema(source)[0]
    if not is_diffusers_source(source):
        path = Path(source)
        if not path.is_file():
            read_state_dict(path)  # the one-line "does not exist / is a folder" error
        return CheckpointRef(path.name, str(path.resolve()), file_sha256(path))
    unet_dir, _, display = dif.locate(source)
    local = Path(source).exists()
    return CheckpointRef(
        Path(source).name if local else display,
        str(Path(source).resolve()) if local else display,
        file_sha256(dif.weights_file(unet_dir)),
    )


def backbone_from_record(
    spec: BackboneSpec,
    recorded: CheckpointRef,
    source: str | Path | None = None,
    device: str | torch.device = "auto",
    where: str = "the model",
) -> Backbone:
    """The backbone ``spec`` describes, with the weights at ``source`` (default: the recorded path).

    Refused unless the weights are the recorded ones (sha256) and, for a
    diffusers folder, its configs are the recorded ones.
    """
    source = source if source is not None else recorded.path
    if runs.is_run(source):
        source = runs.latest_ema(source)[0]
    available = is_diffusers_source(source) if spec.family == "diffusers" else Path(source).is_file()
    kind = "file" if spec.family == "adm" else f"{spec.family} model folder"
    if not available:
        raise DdpmsegError(
            f"checkpoint {source} recorded in {where} is missing; pass --ckpt with the {kind} {recorded.name}"
        )
    if checkpoint_ref(source).sha256 != recorded.sha256:
        raise DdpmsegError(
            f"checkpoint {source} is not the one {where} was made with ({recorded.name}, sha256 of the weights "
            f"differs); pass --ckpt with that {kind}"
        )
    flags = spec.config if spec.family == "adm" else None
    backbone = create_backbone(source, flags=flags, device=device)
    if backbone.config != spec.config:
        raise DdpmsegError(
            f"the config.json / scheduler config in {source} differ from the ones {where} was made with; "
            "pass --ckpt with the original folder"
        )
    backbone.preset = spec.preset
    return backbone


# --------------------------------------------------------------------------- ADM


def _adm_config(flags: Flags) -> AdmConfig:
    if isinstance(flags, AdmConfig):
        return flags
    if isinstance(flags, Mapping):
        return AdmConfig.from_flags(flags)
    return AdmConfig.from_json(flags)


def preset_for(config: AdmConfig | DiffusersConfig, filename: str | None = None) -> str | None:
    """The name a config is recorded under: the preset of that architecture (the one whose file is
    ``filename`` if several share it, else the first by name), or None for a custom architecture."""
    names = [n for n in list_presets() if _fits(config, get_preset(n))]
    by_file = [n for n in names if get_preset(n).filename == filename]
    return (by_file or names or [None])[0]


def _fits(config: AdmConfig | DiffusersConfig, preset: Preset) -> bool:
    if isinstance(config, AdmConfig):
        return preset.config == config
    if not isinstance(preset.config, DiffusersConfig):
        return False
    want = preset.config.unet
    return all(config.unet.get(k) == want[k] for k in _DIFFUSERS_ARCH_KEYS if k in want)


def adm_architecture(
    state: Mapping[str, torch.Tensor] | None,
    source: str,
    preset: Preset | None = None,
    flags: Flags | None = None,
    image_size: int | None = None,
    num_head_channels: int | None = None,
) -> tuple[str | None, AdmConfig]:
    """``(recorded preset name, config)`` of ADM weights: from ``preset``, ``flags``, else the weights
    themselves (with the image size and head channels they cannot show); the weights (if any) are
    checked to fit, with a message listing what does not."""
    if preset is not None and flags is not None:
        raise DdpmsegError("give either --preset or --model-flags, not both")
    if preset is not None and preset.family != "adm":
        raise DdpmsegError(f"--preset {preset.name} is a diffusers model; pass its folder (or hub id) as --ckpt")
    given = [o for o, v in (("--image-size", image_size), ("--num-head-channels", num_head_channels)) if v is not None]
    if given and (preset is not None or flags is not None):
        raise DdpmsegError(f"{' and '.join(given)} apply to an architecture read from the weights; with --preset or "
                           "--model-flags they are fixed there (the flags' image_size / num_head_channels)")
    if preset is not None:
        name, config = preset.name, preset.config
    elif flags is not None:
        name, config = None, _adm_config(flags)
    else:
        if state is None:  # pragma: no cover - create_backbone needs a source, preset or flags
            raise DdpmsegError("give a checkpoint, a preset or model flags to build a backbone")
        _, config = resolve_config(state, source, image_size, num_head_channels)
        name = preset_for(config, Path(source).name)  # the preset whose file this is, when several share the weights
    if state is not None and (preset is not None or flags is not None):  # resolve_config's fit the weights already
        check_signature(config_signature(config), state, f"preset {preset.name}" if preset else "the given flags", source)
    if name is None:
        name = preset_for(config, Path(source).name)
    return name, config


def _create_adm(
    source: str | Path | None, preset: Preset | None, flags: Flags | None, image_size: int | None, num_head_channels: int | None
) -> AdmBackbone:
    state = read_state_dict(source) if source is not None else None
    name, config = adm_architecture(state, str(source or "the given architecture"), preset, flags, image_size,
                                    num_head_channels)
    model = build_unet(config)
    if state is None:
        return AdmBackbone(config, model, preset=name)
    model.load_state_dict(state)
    return AdmBackbone(config, model, preset=name, checkpoint=checkpoint_ref(source))


# --------------------------------------------------------------------------- diffusers


def _create_diffusers(source: str | Path | None, preset: Preset | None, flags: Flags | None) -> dif.DiffusersBackbone:
    where = source if source is not None else f"preset {preset.name if preset else ''}"
    if flags is not None:
        raise DdpmsegError(
            f"--model-flags describes a guided-diffusion checkpoint, but {where} is a diffusers model "
            "(its config.json fixes the architecture); leave out --model-flags"
        )
    if preset is not None and preset.family != "diffusers":
        raise DdpmsegError(
            f"--preset {preset.name} is a guided-diffusion (ADM) architecture, but {source} is a diffusers "
            "model folder; leave out --preset or pass the .pt file"
        )
    if source is None:  # only a diffusers preset is routed here without a source: its architecture, random weights
        model = dif.import_diffusers().UNet2DModel(**preset.config.unet)  # type: ignore[union-attr]
        return dif.DiffusersBackbone(preset.config, model, preset=preset.name)  # type: ignore[union-attr]
    if preset is not None and not Path(source).exists() and not dif.looks_like_hub_id(source):
        raise DdpmsegError(
            f"--ckpt {source} does not exist; for preset {preset.name} pass its diffusers folder "
            f"or the hub id {preset.urls[0].removeprefix('hf://')}"
        )
    unet_dir, sched_file, display = dif.locate(source)
    model = dif.load_unet(unet_dir)
    sched = dif.read_scheduler_config(sched_file)
    if sched is None:
        log.info("%s: no scheduler config found; noising with guided-diffusion's linear schedule", display)
    config = DiffusersConfig(unet=dict(model.config), scheduler=sched)
    if preset is not None and not _fits(config, preset):
        k = next(k for k in _DIFFUSERS_ARCH_KEYS if k in preset.config.unet and config.unet.get(k) != preset.config.unet[k])
        raise DdpmsegError(
            f"{source} does not fit preset {preset.name}: {k} is {config.unet.get(k)} in its config.json, "
            f"{preset.config.unet[k]} in the preset; leave out --preset"
        )
    name = preset.name if preset is not None else preset_for(config, str(source).rstrip("/").rsplit("/", 1)[-1])
    return dif.DiffusersBackbone(config, model, preset=name, checkpoint=checkpoint_ref(source))
