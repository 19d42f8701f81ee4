"""Pictures: palettes, colour-coded label maps, overlays, uncertainty maps and the k-means grid.

Every PNG is written atomically (temp file in the same folder, then
``os.replace``), so an interrupted run never leaves a half-written image.
"""

from __future__ import annotations

import colorsys
import logging
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ddpmseg._io import write_atomic
from ddpmseg.errors import DdpmsegError

log = logging.getLogger(__name__)

__all__ = [
    "GRID_LEFT",
    "GRID_PAD",
    "GRID_TOP",
    "cluster_features",
    "colorize",
    "distinct_colors",
    "kmeans_grid",
    "overlay",
    "save_label_png",
    "save_png_atomic",
    "uncertainty_image",
]


def distinct_colors(n: int) -> np.ndarray:
    """``n`` deterministic, visually distinct, non-black RGB colours as an (n, 3) uint8 array.

    Hues follow the golden angle; saturation and brightness cycle through a few
    levels so that neighbouring indices differ strongly even for large ``n``.
    """
    if n < 0:
        raise DdpmsegError(f"distinct_colors needs n >= 0, got {n}")
    out: list[tuple[int, int, int]] = []
    seen: set[tuple[int, int, int]] = set()
    sats, vals = (0.85, 0.55, 1.0), (0.95, 0.7, 0.5)
    i = 0
    while len(out) < n:
        h = (i * 0.618033988749895) % 1.0
        s = sats[(i // 3) % len(sats)]
        v = vals[i % len(vals)]
        c = tuple(int(round(255 * x)) for x in colorsys.hsv_to_rgb(h, s, v))
        if c not in seen and c != (0, 0, 0):
            seen.add(c)  # type: ignore[arg-type]
            out.append(c)  # type: ignore[arg-type]
        i += 1
    return np.asarray(out, dtype=np.uint8).reshape(n, 3)


GRID_LEFT = 72
"""k-means grid: width of the left margin holding the row labels ("block 5")."""
GRID_TOP = 24
"""k-means grid: height of the top margin holding the column labels ("t=50")."""
GRID_PAD = 4
"""k-means grid: gap after every cell (right and below)."""


def _labels_array(labels: Any) -> np.ndarray:
    a = np.asarray(labels)
    if a.ndim != 2 or a.dtype.kind not in "iub":
        raise DdpmsegError(f"a label map must be a 2-D integer array, got shape {a.shape} dtype {a.dtype}")
    return a.astype(np.int64, copy=False)


def _palette_array(palette: Any) -> np.ndarray:
    p = np.asarray(palette)
    if p.ndim != 2 or p.shape[1] != 3 or len(p) == 0:
        raise DdpmsegError(f"a palette must be a (K, 3) array of RGB colours, got shape {p.shape}")
    if p.min() < 0 or p.max() > 255:
        raise DdpmsegError("palette colours must be 0..255")
    return p.astype(np.uint8)


def colorize(labels: np.ndarray, palette: np.ndarray, ignore_index: int = 255) -> np.ndarray:
    """(H, W) class indices -> (H, W, 3) uint8 colours; ``ignore_index`` pixels are black."""
    lab = _labels_array(labels)
    pal = _palette_array(palette)
    k = len(pal)
    valid = (lab >= 0) & (lab < k)
    bad = ~valid & (lab != ignore_index)
    if bad.any():
        vals = np.unique(lab[bad])[:10]
        raise DdpmsegError(
            f"label map holds values {', '.join(map(str, vals))} but the palette has {k} colours (0..{k - 1}, "
            f"ignore {ignore_index}); use the label set the labels came from"
        )
    out = np.zeros((*lab.shape, 3), dtype=np.uint8)
    out[valid] = pal[lab[valid]]
    return out


def save_png_atomic(path: str | Path, image: Image.Image | np.ndarray) -> None:
    """Save a PIL image or a uint8 array ((H, W) or (H, W, 3|4)) as PNG via temp file + rename."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
            raise DdpmsegError(f"save_png_atomic needs a uint8 (H, W[, 3|4]) array, got {image.shape} {image.dtype}")
        image = Image.fromarray(np.ascontiguousarray(image))
    write_atomic(Path(path), lambda tmp: image.save(tmp, format="PNG"))


def save_label_png(path: str | Path, labels: np.ndarray, palette: np.ndarray) -> None:
    """Save a palette ('P') PNG whose pixel values are the label indices and whose palette is the class colours.

    Reading it back with PIL (``np.array(Image.open(path))``) gives the labels;
    viewers show the colours. Index 255 (ignore) is black unless the palette
    has 256 colours. Labels must be 0..255.
    """
    lab = _labels_array(labels)
    pal = _palette_array(palette)
    if len(pal) > 256:
        raise DdpmsegError(f"a label PNG holds at most 256 classes, the palette has {len(pal)}; save the labels as .npy")
    if lab.size and (lab.min() < 0 or lab.max() > 255):
        raise DdpmsegError(
            f"labels {int(lab.min())}..{int(lab.max())} do not fit a label PNG (0..255); save them as .npy"
        )
    img = Image.fromarray(lab.astype(np.uint8), "L").convert("P")
    full = np.zeros((256, 3), dtype=np.uint8)
    full[: len(pal)] = pal
    img.putpalette(full.reshape(-1).tolist())
    save_png_atomic(path, img)


def overlay(rgb: np.ndarray, labels: np.ndarray, palette: np.ndarray, alpha: float = 0.5, ignore_index: int = 255) -> np.ndarray:
    """Blend the class colours over ``rgb`` with weight ``alpha``; ignored pixels stay unchanged."""
    img = np.asarray(rgb)
    lab = _labels_array(labels)
    if img.ndim != 3 or img.shape[2] != 3 or img.shape[:2] != lab.shape:
        raise DdpmsegError(f"overlay needs an (H, W, 3) image matching the {lab.shape} label map, got {img.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise DdpmsegError(f"overlay alpha must be in 0..1, got {alpha}")
    colours = colorize(lab, palette, ignore_index).astype(np.float32)
    base = img.astype(np.float32)
    blend = (1.0 - alpha) * base + alpha * colours
    out = np.where((lab != ignore_index)[..., None], blend, base)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def uncertainty_image(u: np.ndarray, vmax: float | None = None) -> np.ndarray:
    """(H, W) float uncertainty -> (H, W) uint8 greyscale (white = most uncertain).

    Values are divided by ``vmax`` (default: the map's own maximum, so every
    map uses the full range; pass e.g. ``log(K)`` for comparable images),
    clipped to 0..1 and scaled to 0..255. NaN and negative values count as 0;
    an all-zero map gives a black image.
    """
    a = np.nan_to_num(np.asarray(u, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    if a.ndim != 2:
        raise DdpmsegError(f"an uncertainty map must be 2-D, got shape {a.shape}")
    a = np.maximum(a, 0.0)
    top = float(a.max(initial=0.0)) if vmax is None else float(vmax)
    if top <= 0:
        return np.zeros(a.shape, dtype=np.uint8)
    return np.rint(np.clip(a / top, 0.0, 1.0) * 255.0).astype(np.uint8)


def cluster_features(features: Any, k: int, random_state: int = 0, n_init: int = 4) -> np.ndarray:
    """k-means over the pixels of one feature map (C, h, w) -> (h, w) int64 cluster ids.

    Pixels are rows of C float32 features (not standardised, as in the paper).
    Cluster ids are renumbered by decreasing size (ties: first pixel in raster
    order), so the result does not depend on k-means' arbitrary numbering.
    A (1, C, h, w) tensor or array is accepted too.
    """
    from sklearn.cluster import KMeans

    if hasattr(features, "detach"):
        features = features.detach().cpu().float().numpy()
    f = np.asarray(features, dtype=np.float32)
    if f.ndim == 4 and f.shape[0] == 1:
        f = f[0]
    if f.ndim != 3:
        raise DdpmsegError(f"cluster_features needs a (C, h, w) feature map, got shape {f.shape}")
    c, h, w = f.shape
    n = h * w
    if k < 2 or k > n:
        raise DdpmsegError(f"k-means needs 2 <= k <= {n} (pixels of the {h}x{w} map), got k={k}; choose another k")
    x = f.reshape(c, n).T
    if not np.isfinite(x).all():
        raise DdpmsegError("feature map holds NaN or infinite values; check the checkpoint and the input image")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning when a map has fewer than k distinct pixels
        raw = KMeans(n_clusters=k, n_init=n_init, random_state=random_state).fit_predict(x)
    counts = np.bincount(raw, minlength=k)
    first = np.full(k, n, dtype=np.int64)
    np.minimum.at(first, raw, np.arange(n))
    order = np.lexsort((first, -counts))  # new id i = old cluster order[i]
    remap = np.empty(k, dtype=np.int64)
    remap[order] = np.arange(k)
    return remap[raw].reshape(h, w)


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=12)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font: Any) -> tuple[int, int]:
    l, t, r, b = draw.textbbox((0, 0), text, font=font)
    return r - l, b - t


def kmeans_grid(
    image_rgb: np.ndarray,
    cells: Mapping[tuple[int, int], np.ndarray],
    blocks: Sequence[int],
    steps: Sequence[int],
    k: int,
    cell_size: int = 128,
) -> Image.Image:
    """The paper's Figure-4 grid of k-means cluster maps.

    Rows are decoder ``blocks``, columns are ``steps`` (t); ``cells[(block, t)]``
    is an (h, w) map of cluster ids 0..k-1 drawn in :func:`distinct_colors` (k)
    and nearest-upsampled to ``cell_size``. The first column holds the input
    image in the top row. Size: ``GRID_LEFT + (1 + len(steps)) * (cell_size + GRID_PAD)``
    by ``GRID_TOP + len(blocks) * (cell_size + GRID_PAD)``; white background.
    """
    blocks, steps = list(blocks), list(steps)
    if not blocks or not steps:
        raise DdpmsegError("the k-means grid needs at least one block and one step")
    if cell_size < 8:
        raise DdpmsegError(f"cell_size must be at least 8, got {cell_size}")
    if k < 1:
        raise DdpmsegError(f"k must be positive, got {k}")
    img = np.asarray(image_rgb)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise DdpmsegError(f"the k-means grid needs an (S, S, 3) uint8 image, got {img.shape} {img.dtype}")
    colours = distinct_colors(k)
    step_px = cell_size + GRID_PAD
    width = GRID_LEFT + (1 + len(steps)) * step_px
    height = GRID_TOP + len(blocks) * step_px
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = _font()

    def col_x(j: int) -> int:
        return GRID_LEFT + j * step_px

    def row_y(i: int) -> int:
        return GRID_TOP + i * step_px

    canvas.paste(Image.fromarray(img, "RGB").resize((cell_size, cell_size), Image.BILINEAR), (col_x(0), row_y(0)))
    headers = ["input"] + [f"t={t}" for t in steps]
    for j, text in enumerate(headers):
        tw, th = _text_size(draw, text, font)
        draw.text((col_x(j) + (cell_size - tw) // 2, max(0, (GRID_TOP - th) // 2 - 2)), text, fill=(0, 0, 0), font=font)
    for i, b in enumerate(blocks):
        text = f"block {b}"
        tw, th = _text_size(draw, text, font)
        draw.text((max(2, GRID_LEFT - GRID_PAD - tw - 4), row_y(i) + (cell_size - th) // 2), text, fill=(0, 0, 0), font=font)
        for j, t in enumerate(steps):
            if (b, t) not in cells:
                raise DdpmsegError(f"the k-means grid has no cluster map for block {b} at t={t}")
            lab = _labels_array(cells[(b, t)])
            if lab.size == 0 or lab.min() < 0 or lab.max() >= k:
                raise DdpmsegError(f"cluster map for block {b}, t={t} holds ids outside 0..{k - 1}")
            cell = Image.fromarray(colours[lab], "RGB").resize((cell_size, cell_size), Image.NEAREST)
            canvas.paste(cell, (col_x(j + 1), row_y(i)))
    return canvas
