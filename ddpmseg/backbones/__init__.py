"""Diffusion U-Net backbones: one builder over a preset registry, for two families.

    from ddpmseg.backbones import create_backbone, list_presets
    backbone = create_backbone("ffhq.pt")             # or a diffusers folder / hub id; see create_backbone
    backbone.blocks()                                  # the decoder blocks (feature info)
    backbone.forward_intermediates(x_t, t, [5, 12])    # their outputs, stopping after block 12

Layout: ``_base`` (the Backbone contract), ``configs`` (architecture and
checkpoint records), ``_registry`` (presets), ``_builder`` (create_backbone),
``_checkpoint`` (reading and recognising ADM state dicts), the families
``adm`` and ``diffusers_unet``, and ``convert`` / ``download``. Other packages import
only from here (or the public modules): ``read_state_dict`` (a checkpoint file's tensors,
no code unpickled) and ``adm_architecture`` (the architecture ADM weights fit) for
training and conversion.
"""

from ddpmseg.backbones._base import PRECISIONS, Backbone, BlockInfo, precision_dtype, resolve_device
from ddpmseg.backbones._builder import (
    adm_architecture,
    backbone_from_record,
    checkpoint_ref,
    create_backbone,
    is_diffusers_source,
)
from ddpmseg.backbones._checkpoint import read_state_dict
from ddpmseg.backbones._registry import Preset, get_preset, list_presets, register_preset
from ddpmseg.backbones.configs import AdmConfig, BackboneSpec, CheckpointRef, DiffusersConfig

__all__ = [
    "PRECISIONS",
    "AdmConfig",
    "Backbone",
    "BackboneSpec",
    "BlockInfo",
    "CheckpointRef",
    "DiffusersConfig",
    "Preset",
    "adm_architecture",
    "backbone_from_record",
    "checkpoint_ref",
    "create_backbone",
    "get_preset",
    "is_diffusers_source",
    "list_presets",
    "precision_dtype",
    "read_state_dict",
    "register_preset",
    "resolve_device",
]
