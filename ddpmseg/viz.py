"""Pictures: palettes, colour-coded label maps, overlays with a legend, heat maps with a colour bar,
and the k-means grid.

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
    "colormap",
    "distinct_colors",
    "heatmap",
    "image_grid",
    "line_plot",
    "kmeans_grid",
    "overlay",
    "save_label_png",
    "save_png_atomic",
    "with_colorbar",
    "with_legend",
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


def image_grid(images: np.ndarray, columns: int | None = None, pad: int = 2) -> np.ndarray:
    """(N, H, W, 3) uint8 images -> one (rows*(H+pad)+pad, cols*(W+pad)+pad, 3) grid on white, row by row."""
    imgs = np.asarray(images)
    if imgs.ndim != 4 or imgs.shape[-1] != 3 or imgs.dtype != np.uint8 or len(imgs) == 0:
        raise DdpmsegError(f"an image grid needs (N, H, W, 3) uint8 images, got {imgs.shape} {imgs.dtype}")
    n, h, w, _ = imgs.shape
    cols = columns or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
    for i, img in enumerate(imgs):
        r, c = divmod(i, cols)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = img
    return grid


def line_plot(x: Sequence[float], y: Sequence[float], title: str, xlabel: str, size: tuple[int, int] = (640, 360),
              log_y: bool = False) -> Image.Image:
    """A line chart of ``y`` against ``x`` with labelled axes (min / max ticks; ``log_y``: a log scale,
    positive values only); empty data gives empty axes."""
    width, height = size
    canvas = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = _font()
    left, right, top, bottom = 64, 16, 28, 40
    draw.text((left, 6), title, fill=(0, 0, 0), font=font)
    draw.rectangle([left, top, width - right, height - bottom], outline=(0, 0, 0))
    draw.text(((left + width - right) // 2 - 12, height - 20), xlabel, fill=(0, 0, 0), font=font)
    xs, ys = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    keep = np.isfinite(xs) & np.isfinite(ys) & ((ys > 0) if log_y else True)
    xs, ys = xs[keep], ys[keep]
    labels = ys
    if log_y:
        ys = np.log10(ys)
    if len(xs):
        x0, x1 = float(xs.min()), float(xs.max()) if xs.max() > xs.min() else float(xs.min()) + 1
        y0, y1 = float(ys.min()), float(ys.max()) if ys.max() > ys.min() else float(ys.min()) + 1
        px = left + (xs - x0) / (x1 - x0) * (width - right - left)
        py = height - bottom - (ys - y0) / (y1 - y0) * (height - bottom - top)
        if len(xs) > 1:
            draw.line(list(zip(px.tolist(), py.tolist())), fill=(31, 119, 180), width=2)
        else:
            draw.ellipse([px[0] - 2, py[0] - 2, px[0] + 2, py[0] + 2], fill=(31, 119, 180))
        for value, yy in ((float(labels.max()), top), (float(labels.min()), height - bottom - 12)):
            draw.text((4, yy), f"{value:.4g}", fill=(0, 0, 0), font=font)
        if log_y:
            draw.text((4, (top + height - bottom) // 2), "log", fill=(0, 0, 0), font=font)
        for value, xx in ((x0, left), (x1, width - right - 40)):
            draw.text((xx, height - bottom + 4), f"{value:.6g}", fill=(0, 0, 0), font=font)
    return canvas


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


def _font(size: int = 12) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


# viridis at five stops (perceptually uniform, readable in greyscale and by colour-blind readers)
_VIRIDIS = np.array([(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)], dtype=np.float64)


def colormap(values: np.ndarray) -> np.ndarray:
    """Values in 0..1 (clipped) -> (..., 3) uint8 viridis colours."""
    v = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float64)), 0.0, 1.0) * (len(_VIRIDIS) - 1)
    lo = np.minimum(np.floor(v).astype(np.int64), len(_VIRIDIS) - 2)
    frac = (v - lo)[..., None]
    return np.rint(_VIRIDIS[lo] * (1 - frac) + _VIRIDIS[lo + 1] * frac).astype(np.uint8)


def heatmap(u: np.ndarray, vmax: float | None = None) -> tuple[np.ndarray, float]:
    """(H, W) non-negative map -> ((H, W, 3) uint8 viridis image, the value drawn brightest).

    Values are divided by ``vmax`` (default: the map's maximum); NaN and
    negative values count as 0.
    """
    a = np.maximum(np.nan_to_num(np.asarray(u, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0), 0.0)
    if a.ndim != 2:
        raise DdpmsegError(f"a heat map needs a 2-D map, got shape {a.shape}")
    top = float(a.max(initial=0.0)) if vmax is None else float(vmax)
    return colormap(a / top if top > 0 else a * 0.0), top


def _panel_font(height: int) -> Any:
    return _font(max(12, min(40, height // 28)))


def _beside(image: np.ndarray, panel_width: int, panel_height: int) -> tuple[Image.Image, int]:
    """A white canvas with ``image`` at the top left and room for a panel on its right; the panel's x."""
    h, w = image.shape[:2]
    canvas = Image.new("RGB", (w + panel_width, max(h, panel_height)), (255, 255, 255))
    canvas.paste(Image.fromarray(np.ascontiguousarray(image), "RGB"), (0, 0))
    return canvas, w


def with_legend(image: np.ndarray, names: Sequence[str], colours: np.ndarray) -> Image.Image:
    """``image`` (H, W, 3) with a legend on its right: a colour swatch and the name of each class given.

    The image keeps its pixels at the top left; the legend grows the canvas
    to the right (and down, when the classes need more rows than ``H``).
    """
    img = np.asarray(image)
    font = _panel_font(img.shape[0])
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line = max(_text_size(probe, "Ag", font)[1], 8) + 6
    pad, swatch = line // 2, line - 4
    text_w = max([_text_size(probe, str(n), font)[0] for n in names] + [_text_size(probe, "classes", font)[0]])
    canvas, x0 = _beside(img, 3 * pad + swatch + text_w, 2 * pad + line * (len(names) + 1))
    draw = ImageDraw.Draw(canvas)
    draw.text((x0 + pad, pad), "classes", fill=(0, 0, 0), font=font)
    for i, (name, colour) in enumerate(zip(names, np.asarray(colours, dtype=np.uint8))):
        y = pad + line * (i + 1)
        draw.rectangle([x0 + pad, y + 2, x0 + pad + swatch, y + 2 + swatch], fill=tuple(int(c) for c in colour),
                       outline=(0, 0, 0))
        draw.text((x0 + 2 * pad + swatch, y), str(name), fill=(0, 0, 0), font=font)
    return canvas


def with_colorbar(image: np.ndarray, vmax: float, title: str) -> Image.Image:
    """``image`` (H, W, 3), drawn with :func:`colormap` over 0..``vmax``, with a labelled colour bar on its right."""
    img = np.asarray(image)
    h = img.shape[0]
    font = _panel_font(h)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line = max(_text_size(probe, "Ag", font)[1], 8) + 6
    pad, bar_w = line // 2, line
    bar_h = max(4 * line, h - 3 * pad - line)
    ticks = [(f"{vmax * f:.3g}", f) for f in (1.0, 0.5, 0.0)]
    text_w = max([_text_size(probe, t, font)[0] for t, _ in ticks] + [_text_size(probe, title, font)[0] - bar_w - pad])
    canvas, x0 = _beside(img, 3 * pad + bar_w + text_w, 3 * pad + line + bar_h)
    draw = ImageDraw.Draw(canvas)
    draw.text((x0 + pad, pad), title, fill=(0, 0, 0), font=font)
    top = 2 * pad + line
    gradient = colormap(np.linspace(1.0, 0.0, bar_h))[:, None, :].repeat(bar_w, axis=1)
    canvas.paste(Image.fromarray(np.ascontiguousarray(gradient), "RGB"), (x0 + pad, top))
    draw.rectangle([x0 + pad, top, x0 + pad + bar_w - 1, top + bar_h - 1], outline=(0, 0, 0))
    for text, f in ticks:
        y = top + round((1 - f) * (bar_h - 1))
        th = _text_size(probe, text, font)[1]
        draw.text((x0 + 2 * pad + bar_w, min(max(top, y - th // 2), top + bar_h - th)), text, fill=(0, 0, 0), font=font)
    return canvas


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
    is an (h, w) map of cluster ids 0..k-1 (or -1 where the model saw no
    pixel: drawn light grey) in :func:`distinct_colors` (k), nearest-resized
    to the cell. Cells have the input image's aspect ratio, ``cell_size`` on
    their long side; the first column holds the input image in the top row.
    Size: ``GRID_LEFT + (1 + len(steps)) * (cell_w + GRID_PAD)`` by
    ``GRID_TOP + len(blocks) * (cell_h + GRID_PAD)``; white background.
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
        raise DdpmsegError(f"the k-means grid needs an (H, W, 3) uint8 image, got {img.shape} {img.dtype}")
    h, w = img.shape[:2]
    cell_w, cell_h = (cell_size, max(1, round(cell_size * h / w))) if w >= h else (max(1, round(cell_size * w / h)), cell_size)
    colours = np.concatenate([distinct_colors(k), np.array([[225, 225, 225]], np.uint8)])  # [-1]: not seen
    width = GRID_LEFT + (1 + len(steps)) * (cell_w + GRID_PAD)
    height = GRID_TOP + len(blocks) * (cell_h + GRID_PAD)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = _font()

    def col_x(j: int) -> int:
        return GRID_LEFT + j * (cell_w + GRID_PAD)

    def row_y(i: int) -> int:
        return GRID_TOP + i * (cell_h + GRID_PAD)

    canvas.paste(Image.fromarray(img, "RGB").resize((cell_w, cell_h), Image.BILINEAR), (col_x(0), row_y(0)))
    headers = ["input"] + [f"t={t}" for t in steps]
    for j, text in enumerate(headers):
        tw, th = _text_size(draw, text, font)
        draw.text((col_x(j) + (cell_w - tw) // 2, max(0, (GRID_TOP - th) // 2 - 2)), text, fill=(0, 0, 0), font=font)
    for i, b in enumerate(blocks):
        text = f"block {b}"
        tw, th = _text_size(draw, text, font)
        draw.text((max(2, GRID_LEFT - GRID_PAD - tw - 4), row_y(i) + (cell_h - th) // 2), text, fill=(0, 0, 0), font=font)
        for j, t in enumerate(steps):
            if (b, t) not in cells:
                raise DdpmsegError(f"the k-means grid has no cluster map for block {b} at t={t}")
            lab = _labels_array(cells[(b, t)])
            if lab.size == 0 or lab.min() < -1 or lab.max() >= k:
                raise DdpmsegError(f"cluster map for block {b}, t={t} holds ids outside 0..{k - 1}")
            cell = Image.fromarray(colours[lab], "RGB").resize((cell_w, cell_h), Image.NEAREST)
            canvas.paste(cell, (col_x(j + 1), row_y(i)))
    return canvas


def reliability_diagram(confidence: np.ndarray, accuracy: np.ndarray, count: np.ndarray, ece: float,
                        size: int = 420) -> Image.Image:
    """A reliability diagram: per equal-width confidence bin a bar of its accuracy (empty bins: none),
    the bin's mean confidence as a tick, the diagonal of perfect calibration, the ECE in the title."""
    n = len(count)
    left, right, top, bottom = 52, 16, 34, 44
    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = _font()
    w, h = size - left - right, size - top - bottom
    draw.text((left, 8), f"reliability (ECE {ece:.4f}, {int(np.sum(count)):,} pixels)", fill=(0, 0, 0), font=font)

    def at(x: float, y: float) -> tuple[float, float]:
        return left + x * w, top + (1 - y) * h

    for i in range(n):
        if count[i] == 0 or not np.isfinite(accuracy[i]):
            continue
        x0, x1 = i / n, (i + 1) / n
        draw.rectangle([*at(x0, accuracy[i]), *at(x1, 0)], fill=(94, 156, 206), outline=(31, 80, 140))
        cx = at(float(confidence[i]), 0)[0]
        draw.line([cx, at(0, accuracy[i])[1] - 4, cx, at(0, accuracy[i])[1] + 4], fill=(200, 60, 40), width=2)
    draw.line([*at(0, 0), *at(1, 1)], fill=(120, 120, 120), width=1)
    draw.rectangle([*at(0, 1), *at(1, 0)], outline=(0, 0, 0))
    for v in (0.0, 0.5, 1.0):
        draw.text((at(v, 0)[0] - 8, top + h + 4), f"{v:g}", fill=(0, 0, 0), font=font)
        draw.text((left - 28, at(0, v)[1] - 6), f"{v:g}", fill=(0, 0, 0), font=font)
    draw.text((left + w // 2 - 60, size - 22), "confidence (top-1 mean softmax)", fill=(0, 0, 0), font=font)
    draw.text((4, top - 18), "accuracy", fill=(0, 0, 0), font=font)
    return canvas


def confusion_image(confusion: np.ndarray, names: Sequence[str], cell: int = 28) -> Image.Image:
    """The confusion matrix normalised per row (rows: true class, columns: predicted), as a grid of
    cells shaded by their share with the percentage written in, class names on both axes."""
    cm = np.asarray(confusion, dtype=np.float64)
    k = len(cm)
    rows = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    font = _font()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max([_text_size(probe, str(n), font)[0] for n in names] + [40]) + 8
    top = label_w + 20
    left = label_w + 20
    canvas = Image.new("RGB", (left + k * cell + 10, top + k * cell + 30), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for r in range(k):
        for c in range(k):
            v = rows[r, c]
            shade = tuple(int(255 - v * (255 - t)) for t in (31, 80, 140))
            box = [left + c * cell, top + r * cell, left + (c + 1) * cell - 1, top + (r + 1) * cell - 1]
            draw.rectangle(box, fill=shade, outline=(220, 220, 220))
            if v >= 0.005:
                text = f"{100 * v:.0f}"
                tw, th = _text_size(probe, text, font)
                draw.text((box[0] + (cell - tw) // 2, box[1] + (cell - th) // 2), text,
                          fill=(255, 255, 255) if v > 0.5 else (0, 0, 0), font=font)
        name = str(names[r])
        draw.text((left - _text_size(probe, name, font)[0] - 6, top + r * cell + cell // 2 - 6), name, fill=(0, 0, 0), font=font)
    for c in range(k):  # column names written vertically
        name = str(names[c])
        tw, th = _text_size(probe, name, font)
        label = Image.new("RGB", (tw + 2, th + 4), (255, 255, 255))
        ImageDraw.Draw(label).text((1, 0), name, fill=(0, 0, 0), font=font)
        label = label.rotate(90, expand=True)
        canvas.paste(label, (left + c * cell + (cell - label.width) // 2, top - label.height - 4))
    draw.text((4, 4), "true \\ predicted (% of each true class)", fill=(0, 0, 0), font=font)
    return canvas
