"""Diffusion U-Net backbones: preset registry, checkpoint loading, block taps."""

from ddpmseg.backbones.presets import AdmConfig, Preset, get_preset, list_presets, register_preset

__all__ = ["AdmConfig", "Preset", "get_preset", "list_presets", "register_preset"]
