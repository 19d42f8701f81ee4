"""The pixel classifier: an ensemble of MLPs on per-pixel diffusion features.

    members    the reference MLP and M members stacked into one module
    training   the recipes (reference, fast, tiles) and the one training loop
    ensemble   PixelEnsemble, the scikit-learn-style estimator (fit, predict, predict_block_maps)
"""

from ddpmseg.classify.ensemble import NotFittedError, PixelEnsemble, Segmentation
from ddpmseg.classify.training import RECIPES, Recipe
from ddpmseg.features.pixels import ArrayPixels, PixelSource

__all__ = ["ArrayPixels", "NotFittedError", "PixelEnsemble", "PixelSource", "RECIPES", "Recipe", "Segmentation"]
