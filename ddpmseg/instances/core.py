"""One image's instances: masks, classes, scores (numpy only, no torch)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ddpmseg.data.preprocess import Preprocess, prepare_mask, restore_map


@dataclass
class Instances:
    """``masks`` (N, H, W) bool, ``classes`` (N,) int64 class indices (= COCO category ids),
    ``scores`` (N,) float32 (1 for ground truth)."""

    masks: np.ndarray
    classes: np.ndarray
    scores: np.ndarray
    soft: np.ndarray | None = None  # (N, H, W) float32 mask probabilities, where a head gives them

    def __post_init__(self) -> None:
        self.masks = np.asarray(self.masks, dtype=bool)
        if self.masks.ndim != 3:
            raise ValueError(f"masks must be (N, H, W), got {self.masks.shape}")
        self.classes = np.asarray(self.classes, dtype=np.int64).reshape(-1)
        self.scores = np.asarray(self.scores, dtype=np.float32).reshape(-1)
        if not len(self.masks) == len(self.classes) == len(self.scores):
            raise ValueError(f"{len(self.masks)} masks, {len(self.classes)} classes, {len(self.scores)} scores")

    def __len__(self) -> int:
        return len(self.masks)

    @property
    def shape(self) -> tuple[int, int]:
        return self.masks.shape[1], self.masks.shape[2]

    @classmethod
    def empty(cls, height: int, width: int) -> "Instances":
        return cls(np.zeros((0, height, width), bool), np.zeros(0, np.int64), np.zeros(0, np.float32))

    @classmethod
    def from_id_map(cls, ids: np.ndarray, classes: dict[int, int]) -> "Instances":
        """From an (H, W) id map (0 none, 1..K) and each id's class."""
        keys = sorted(classes)
        return cls(np.stack([ids == k for k in keys]) if keys else np.zeros((0, *ids.shape), bool),
                   [classes[k] for k in keys], np.ones(len(keys)))

    def boxes(self) -> np.ndarray:
        """(N, 4) float32 x0, y0, x1, y1 in pixels (x1, y1 exclusive); 0s for an empty mask."""
        out = np.zeros((len(self), 4), np.float32)
        for i, m in enumerate(self.masks):
            ys, xs = np.nonzero(m.any(1))[0], np.nonzero(m.any(0))[0]
            if ys.size:
                out[i] = xs[0], ys[0], xs[-1] + 1, ys[-1] + 1
        return out

    def areas(self) -> np.ndarray:
        return self.masks.sum((1, 2)).astype(np.int64)

    def id_map(self) -> np.ndarray:
        """(H, W) uint16: 0 none, instance i+1 where its mask is; where masks overlap, the higher score wins."""
        h, w = self.shape
        out = np.zeros((h, w), np.uint16)
        for i in np.argsort(self.scores, kind="stable"):  # the best drawn last
            out[self.masks[i]] = i + 1
        return out

    def keep(self, which: np.ndarray) -> "Instances":
        which = np.asarray(which)
        return Instances(self.masks[which], self.classes[which], self.scores[which],
                         None if self.soft is None else self.soft[which])

    def sorted(self) -> "Instances":
        """Best score first."""
        return self.keep(np.argsort(-self.scores, kind="stable"))

    def to_grid(self, pre: Preprocess, size: int) -> "Instances":
        """The masks (at the original size) mapped onto a ``size`` x ``size`` grid as the image was (nearest)."""
        grid = Preprocess.plan(pre.original_size, size, pre.mode)
        masks = [prepare_mask(m.astype(np.int64), grid) > 0 for m in self.masks]
        return Instances(np.stack(masks) if masks else np.zeros((0, size, size), bool), self.classes, self.scores)

    def to_original(self, pre: Preprocess) -> "Instances":
        """Square masks (N, R, R) on the model's grid mapped back to the original image size (their
        probabilities ``soft``, else the masks, resized bilinearly and thresholded at 0.5)."""
        r = self.masks.shape[-1]
        grid = Preprocess.plan(pre.original_size, r, pre.mode)
        values = self.masks.astype(np.float32) if self.soft is None else self.soft
        w, h = pre.original_size
        if not len(self):
            return Instances.empty(h, w)
        masks = restore_map(values, grid, fill=0.0) > 0.5
        return Instances(masks, self.classes, self.scores)


def components_of(mask: np.ndarray, min_area: int = 1) -> list[np.ndarray]:
    """The 8-connected components of a boolean mask with at least ``min_area`` pixels."""
    lab, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
    out = [lab == i for i in range(1, n + 1)]
    return [m for m in out if m.sum() >= min_area]


def instances_from_semantic(labels: np.ndarray, classes: list[int], min_area: int = 1) -> Instances:
    """Each connected component of each class in ``classes`` of a label map as an instance
    (FASSEG: eyes, nose, mouth)."""
    masks, cls = [], []
    for c in classes:
        for m in components_of(labels == c, min_area):
            masks.append(m)
            cls.append(c)
    h, w = labels.shape
    return Instances(np.stack(masks) if masks else np.zeros((0, h, w), bool), cls, np.ones(len(cls)))
