"""The trivial baseline: a semantic model's class map split into connected components."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ddpmseg.instances.core import Instances, components_of


def components(labels: np.ndarray, proba: np.ndarray | None, classes: Sequence[int], min_area: int = 1) -> Instances:
    """Each 8-connected component of each class of ``classes`` in the (H, W) class map ``labels`` as one
    instance; its score is the ensemble's agreement on it: the mean over its pixels of the mean softmax
    of its class (``proba`` (K, H, W); 1 without it)."""
    masks, cls, scores = [], [], []
    for c in classes:
        for m in components_of(labels == c, min_area):
            masks.append(m)
            cls.append(c)
            scores.append(float(proba[c][m].mean()) if proba is not None else 1.0)
    h, w = labels.shape
    return Instances(np.stack(masks) if masks else np.zeros((0, h, w), bool), cls, scores)
