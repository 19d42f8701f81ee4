"""The MLP ensemble's machinery (the estimator itself is the ``mlp`` head, :mod:`ddpmseg.heads.mlp`).

    members    the reference MLP and M members stacked into one module
    training   the recipes (reference, fast, tiles) and the one training loop
"""

from ddpmseg.classify.training import RECIPES, Recipe
from ddpmseg.features.pixels import ArrayPixels, PixelSource

__all__ = ["ArrayPixels", "PixelSource", "RECIPES", "Recipe"]
