"""The model's view of an image: resize or crop to S x S, and the inverse map back to the original size.

A :class:`Preprocess` record (stored per image in the cache) says how an
original image was mapped onto the model's S x S grid; label maps are mapped
the same way (``prepare_mask``) and predictions mapped back (``restore_labels``,
``restore_map``).

torch is imported only by :func:`preprocess_image` (the one function that
makes a tensor), so ``ddpmseg.data`` loads without it (``evaluate-anomaly``,
label sets and masks are numpy-only).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
from PIL import Image

from ddpmseg.errors import DdpmsegError
from ddpmseg.options import PREPROCESS_MODES as MODES

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Preprocess:
    """How an original image maps onto the model's S x S input (and back).

    ``mode`` "resize": plain resize to S x S (aspect not kept, every pixel covered).
    ``mode`` "crop": resize the short side to S, then centre-crop S x S (the
    paper's recipe for square images; for non-square images the ends of the
    long side are not seen by the model).
    Sizes are (width, height); ``crop_box`` is (left, top, right, bottom) in the
    resized image's coordinates.
    """

    mode: str
    size: int
    original_size: tuple[int, int]
    crop_box: tuple[int, int, int, int]
    resized_size: tuple[int, int]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (lists, ints, strings)."""
        return {
            "mode": self.mode,
            "size": int(self.size),
            "original_size": [int(v) for v in self.original_size],
            "crop_box": [int(v) for v in self.crop_box],
            "resized_size": [int(v) for v in self.resized_size],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Preprocess":
        """Inverse of :meth:`to_dict` (accepts lists, tuples or numpy arrays)."""
        try:
            pre = cls(
                mode=str(d["mode"]),
                size=int(d["size"]),
                original_size=tuple(int(v) for v in d["original_size"]),  # type: ignore[arg-type]
                crop_box=tuple(int(v) for v in d["crop_box"]),  # type: ignore[arg-type]
                resized_size=tuple(int(v) for v in d["resized_size"]),  # type: ignore[arg-type]
            )
        except (KeyError, ValueError) as e:
            raise DdpmsegError(
                f"preprocessing record {dict(d)!r} is invalid ({type(e).__name__}: {e}); re-extract the features"
            ) from None
        if (
            pre.mode not in MODES
            or len(pre.original_size) != 2
            or len(pre.crop_box) != 4
            or len(pre.resized_size) != 2
        ):
            raise DdpmsegError(f"preprocessing record {dict(d)!r} is invalid; re-extract the features")
        return pre

    @classmethod
    def plan(cls, original_size: tuple[int, int], size: int, mode: str = "resize") -> "Preprocess":
        """The record for an image of ``original_size`` (W, H) and model size ``size``."""
        if mode not in MODES:
            raise DdpmsegError(f"preprocess mode {mode!r} is unknown; use 'resize' or 'crop'")
        if int(size) < 1:
            raise DdpmsegError(f"model input size must be positive, got {size}")
        w, h = int(original_size[0]), int(original_size[1])
        if w < 1 or h < 1:
            raise DdpmsegError(f"image size {w}x{h} is empty; give a non-empty image")
        s = int(size)
        if mode == "resize" or w == h:
            return cls(mode, s, (w, h), (0, 0, s, s), (s, s))
        if w < h:
            rw, rh = s, max(s, int(round(h * s / w)))
        else:
            rw, rh = max(s, int(round(w * s / h))), s
        left, top = (rw - s) // 2, (rh - s) // 2
        return cls(mode, s, (w, h), (left, top, left + s, top + s), (rw, rh))


def preprocess_image(rgb: np.ndarray, size: int, mode: str = "resize") -> tuple[torch.Tensor, Preprocess]:
    """The model input (1, 3, S, S) float32 in [-1, 1] and its :class:`Preprocess` record.

    Uses PIL bilinear resampling then ``x / 127.5 - 1``; for a square image both
    modes equal the reference ``img.resize((S, S), Image.BILINEAR)``.
    """
    import torch

    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise DdpmsegError(f"preprocess_image needs an (H, W, 3) uint8 array, got {rgb.shape} {rgb.dtype}")
    pre = Preprocess.plan((rgb.shape[1], rgb.shape[0]), size, mode)
    img = Image.fromarray(rgb, "RGB").resize(pre.resized_size, Image.BILINEAR)
    if pre.crop_box != (0, 0, *pre.resized_size):
        img = img.crop(pre.crop_box)
    x = np.asarray(img, dtype=np.float64) / 127.5 - 1.0
    t = torch.from_numpy(np.ascontiguousarray(x.astype(np.float32).transpose(2, 0, 1)))[None]
    return t, pre


def _nearest_index(n_out: int, n_in: int) -> np.ndarray:
    """Source index of each output pixel for a nearest resize n_in -> n_out (pixel centres)."""
    return np.minimum(((np.arange(n_out) + 0.5) * (n_in / n_out)).astype(np.int64), n_in - 1)


SPARSE_FRACTION = 0.5
"""A mask with more than this fraction of its pixels unlabelled is sparse (strokes): see :func:`prepare_mask`."""


def prepare_mask(mask: np.ndarray, pre: Preprocess, ignore_index: int | None = None) -> np.ndarray:
    """Map an (H, W) label map onto the model grid exactly as the image was mapped (nearest).

    With ``ignore_index``, a sparse mask (more than :data:`SPARSE_FRACTION` of it ``ignore_index``:
    strokes) keeps its thin strokes: a grid cell whose nearest pixel is unlabelled but whose footprint
    holds labelled pixels takes their most common label (strokes drawn between the nearest samples
    would otherwise vanish on a coarse grid). Cells with a labelled nearest pixel, and every cell of a
    denser mask (whose ignored pixels are void regions, not unknown ones), are unchanged."""
    out = _prepare_nearest(mask, pre)
    if ignore_index is None or not (out == ignore_index).any():
        return out
    mask = np.asarray(mask)
    if (mask == ignore_index).mean() <= SPARSE_FRACTION:
        return out
    return _fill_from_footprints(out, mask, pre, ignore_index)


def _fill_from_footprints(out: np.ndarray, mask: np.ndarray, pre: Preprocess, ignore_index: int) -> np.ndarray:
    """``out`` with its ``ignore_index`` cells set to the majority label of the labelled original pixels
    that fall in each cell (pixel centres mapped to the grid; one pass over the labelled pixels only)."""
    w, h = pre.original_size
    rw, rh = pre.resized_size
    left, top = pre.crop_box[:2]
    ys, xs = np.nonzero(mask != ignore_index)
    if ys.size == 0:
        return out
    gy = np.floor((ys + 0.5) * (rh / h)).astype(np.int64) - top
    gx = np.floor((xs + 0.5) * (rw / w)).astype(np.int64) - left
    sh, sw = out.shape
    keep = (gy >= 0) & (gy < sh) & (gx >= 0) & (gx < sw)
    cell = gy[keep] * sw + gx[keep]
    lab = mask[ys[keep], xs[keep]].astype(np.int64)
    holes = (out.reshape(-1) == ignore_index)
    sel = holes[cell]
    if not sel.any():
        return out
    cell, lab = cell[sel], lab[sel]
    n_lab = int(lab.max()) + 1
    pairs, counts = np.unique(cell * n_lab + lab, return_counts=True)
    order = np.lexsort((-counts, pairs // n_lab))  # per cell, the most frequent label first (ties: the lowest)
    pairs = pairs[order]
    cells = pairs // n_lab
    first = np.r_[True, cells[1:] != cells[:-1]]
    filled = out.reshape(-1).copy()
    filled[cells[first]] = pairs[first] % n_lab
    return filled.reshape(out.shape)


def _prepare_nearest(mask: np.ndarray, pre: Preprocess) -> np.ndarray:
    mask = np.asarray(mask)
    w, h = pre.original_size
    if mask.ndim != 2 or mask.shape != (h, w):
        raise DdpmsegError(
            f"label map is {mask.shape[1] if mask.ndim > 1 else '?'}x{mask.shape[0]} (WxH) but its image is {w}x{h}; "
            "give a mask the size of its image"
        )
    rw, rh = pre.resized_size
    left, top, right, bottom = pre.crop_box
    rows = _nearest_index(rh, h)[top:bottom]
    cols = _nearest_index(rw, w)[left:right]
    return mask.astype(np.int64, copy=False)[np.ix_(rows, cols)]


def _back_coords(n_orig: int, n_resized: int, offset: int, s: int) -> tuple[np.ndarray, np.ndarray]:
    """Continuous coordinate, in the S-grid, of each original pixel centre, and whether it is inside."""
    c = (np.arange(n_orig) + 0.5) * (n_resized / n_orig) - offset
    return c, (c >= 0) & (c < s)


def _inverse_grid(pre: Preprocess) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """S-grid row and column coordinates of the original pixel centres, and the (H, W) inside-crop mask."""
    w, h = pre.original_size
    rw, rh = pre.resized_size
    left, top = pre.crop_box[:2]
    cy, vy = _back_coords(h, rh, top, pre.size)
    cx, vx = _back_coords(w, rw, left, pre.size)
    return cy, cx, vy[:, None] & vx[None, :]


def restore_labels(labels: np.ndarray, pre: Preprocess, fill: int = 255) -> np.ndarray:
    """Map an (S, S) label map back to the original (H, W) size (nearest).

    In crop mode, original pixels outside the crop get ``fill``.
    """
    labels = np.asarray(labels)
    s = pre.size
    if labels.shape != (s, s):
        raise DdpmsegError(f"label map is {labels.shape}, expected ({s}, {s}) for this preprocessing record")
    cy, cx, inside = _inverse_grid(pre)
    iy = np.clip(np.floor(cy).astype(np.int64), 0, s - 1)
    ix = np.clip(np.floor(cx).astype(np.int64), 0, s - 1)
    out = labels.astype(np.int64, copy=False)[np.ix_(iy, ix)].copy()
    out[~inside] = fill
    return out


def restore_map(values: np.ndarray, pre: Preprocess, fill: float = 0.0) -> np.ndarray:
    """Map an (S, S) (or (C, S, S)) float map back to the original size (bilinear, float32).

    In crop mode, original pixels outside the crop get ``fill``.
    """
    v = np.asarray(values, dtype=np.float32)
    s = pre.size
    if v.ndim not in (2, 3) or v.shape[-2:] != (s, s):
        raise DdpmsegError(f"map is {v.shape}, expected ({s}, {s}) or (C, {s}, {s}) for this preprocessing record")
    cy, cx, inside = _inverse_grid(pre)

    def taps(c: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        c = np.clip(c - 0.5, 0, s - 1)
        i0 = np.floor(c).astype(np.int64)
        i1 = np.minimum(i0 + 1, s - 1)
        return i0, i1, (c - i0).astype(np.float32)

    y0, y1, fy = taps(cy)
    x0, x1, fx = taps(cx)
    fy, fx = fy[:, None], fx[None, :]
    top_row = v[..., y0, :][..., x0] * (1 - fx) + v[..., y0, :][..., x1] * fx
    bot_row = v[..., y1, :][..., x0] * (1 - fx) + v[..., y1, :][..., x1] * fx
    out = (top_row * (1 - fy) + bot_row * fy).astype(np.float32)
    out[..., ~inside] = fill
    return out
