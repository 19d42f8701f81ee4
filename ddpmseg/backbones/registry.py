"""One entry point for both backbone families (ADM files, diffusers folders / hub ids).

``load_any`` picks the family from what ``--ckpt`` names: a folder or a hub id
(``org/name`` that is no local path) is a diffusers UNet2DModel, a file is a
guided-diffusion checkpoint. ``backbone_from_record`` rebuilds the backbone a
feature cache or model.json describes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from ddpmseg.backbones.presets import AdmConfig, get_preset
from ddpmseg.errors import DdpmsegError

FAMILIES = ("adm", "diffusers")


def family_of(checkpoint: str | Path, preset: str | None = None) -> str:
    """``diffusers`` for a folder, a hub id or a diffusers preset; else ``adm``."""
    from ddpmseg.backbones.presets import list_presets

    if preset in list_presets() and get_preset(preset).family == "diffusers":
        return "diffusers"
    from ddpmseg.backbones.diffusers_unet import is_diffusers_source

    return "diffusers" if is_diffusers_source(checkpoint) else "adm"


def load_any(
    checkpoint: str | Path,
    preset: str | None = None,
    model_flags: str | Path | None = None,
    device: str = "auto",
):
    """(backbone, checkpoint provenance {name, path, sha256}) for ``--ckpt``, either family."""
    from ddpmseg.backbones.checkpoint import file_sha256

    if preset and model_flags:
        raise DdpmsegError("give either --preset or --model-flags, not both")
    if family_of(checkpoint, preset) == "diffusers":
        from ddpmseg.backbones.diffusers_unet import create_diffusers_backbone, locate, weights_file

        if model_flags:
            raise DdpmsegError(
                f"--model-flags describes a guided-diffusion checkpoint, but {checkpoint} is a diffusers model "
                "(its config.json fixes the architecture); leave out --model-flags"
            )
        if preset is not None and get_preset(preset).family != "diffusers":
            raise DdpmsegError(
                f"--preset {preset} is a guided-diffusion (ADM) architecture, but {checkpoint} is a diffusers "
                "model folder; leave out --preset or pass the .pt file"
            )
        if preset is not None and not Path(checkpoint).is_dir() and not Path(checkpoint).exists():
            from ddpmseg.backbones.diffusers_unet import looks_like_hub_id

            if not looks_like_hub_id(checkpoint):
                raise DdpmsegError(
                    f"--ckpt {checkpoint} does not exist; for preset {preset} pass its diffusers folder "
                    f"or the hub id {get_preset(preset).urls[0].removeprefix('hf://')}"
                )
        backbone = create_diffusers_backbone(checkpoint, name=preset, device=device)
        if preset is not None:
            _check_preset_fit(backbone, preset, checkpoint)
        unet_dir, _, display = locate(checkpoint)
        weights = weights_file(checkpoint)
        is_local = Path(checkpoint).exists()
        info = {
            "name": Path(checkpoint).name if is_local else display,
            "path": str(Path(checkpoint).resolve()) if is_local else display,
            "sha256": file_sha256(weights),
        }
        return backbone, info
    from ddpmseg.backbones.adm import create_backbone

    if preset is not None and get_preset(preset).family != "adm":  # pragma: no cover - routed above
        raise DdpmsegError(f"--preset {preset} is a diffusers model; pass its folder as --ckpt")
    config = AdmConfig.from_json(model_flags) if model_flags else None
    backbone = create_backbone(preset, checkpoint, config=config, device=device)
    path = Path(checkpoint)
    info = {"name": path.name, "path": str(path.resolve()), "sha256": file_sha256(path)}
    return backbone, info


def _check_preset_fit(backbone, preset: str, checkpoint: str | Path) -> None:
    """A diffusers preset given with a folder: the folder's UNet config must match the preset's."""
    want = get_preset(preset).config.unet
    have = backbone.config.unet
    keys = ("sample_size", "block_out_channels", "layers_per_block", "down_block_types", "up_block_types")
    diff = [k for k in keys if k in want and have.get(k) != want[k]]
    if diff:
        k = diff[0]
        raise DdpmsegError(
            f"{checkpoint} does not fit preset {preset}: {k} is {have.get(k)} in its config.json, "
            f"{want[k]} in the preset; leave out --preset"
        )


def checkpoint_sha256(checkpoint: str | Path, family: str) -> str:
    """The recorded sha256 of a checkpoint: the file (ADM) or the folder's weights file (diffusers)."""
    from ddpmseg.backbones.checkpoint import file_sha256

    if family == "diffusers":
        from ddpmseg.backbones.diffusers_unet import weights_file

        return file_sha256(weights_file(checkpoint))
    return file_sha256(checkpoint)


def checkpoint_available(checkpoint: str | Path, family: str) -> bool:
    if family == "diffusers":
        from ddpmseg.backbones.diffusers_unet import looks_like_hub_id

        return Path(checkpoint).is_dir() or looks_like_hub_id(checkpoint)
    return Path(checkpoint).is_file()


def backbone_from_record(record: Mapping[str, Any], checkpoint: str | Path, device: Any = "cpu"):
    """The backbone a cache / model.json ``backbone`` record describes, with the weights at ``checkpoint``."""
    family = record.get("family", "adm")
    if family == "adm":
        from ddpmseg.backbones.adm import create_backbone

        return create_backbone(None, checkpoint, config=AdmConfig(**record["config"]), device=device)
    if family == "diffusers":
        from ddpmseg.backbones.diffusers_unet import create_diffusers_backbone
        from ddpmseg.backbones.presets import DiffusersConfig

        preset = record.get("preset")
        backbone = create_diffusers_backbone(checkpoint, name=None if preset == "custom" else preset, device=device)
        if backbone.config != DiffusersConfig.from_dict(record["config"]):
            raise DdpmsegError(
                f"the config.json / scheduler config in {checkpoint} differ from the ones the model was fitted with; "
                "pass --ckpt with the original folder"
            )
        return backbone
    raise DdpmsegError(f"unknown backbone family {family!r} in the model record; expected one of {', '.join(FAMILIES)}")
