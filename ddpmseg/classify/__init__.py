"""The pixel classifier: an ensemble of MLPs on per-pixel diffusion features."""

from ddpmseg.classify.ensemble import ArrayPixels, PixelEnsemble

__all__ = ["PixelEnsemble", "ArrayPixels"]
