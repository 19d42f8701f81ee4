"""Pictures: palettes, colour-coded label maps, overlays with a legend, heat maps with a colour bar,
the k-means grid, sample sheets, line plots, reliability diagrams and confusion matrices.

Every PNG is written atomically (temp file in the same folder, then
``os.replace``), so an interrupted run never leaves a half-written image.
Inside ``with record_drawing() as drawn:`` the picture functions list what
they draw (each text with its bounding box, and marks such as bars), so tests
can check that every label is inside its picture and readable.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ddpmseg._io import write_atomic
from ddpmseg.data.palette import distinct_colors
from ddpmseg.errors import DdpmsegError

log = logging.getLogger(__name__)

__all__ = [
    "GRID_LEFT",
    "GRID_PAD",
    "GRID_TOP",
    "Drawn",
    "cluster_features",
    "colorize",
    "colormap",
    "confusion_image",
    "distinct_colors",
    "draw_text",
    "heatmap",
    "image_grid",
    "line_height",
    "line_plot",
    "kmeans_grid",
    "load_font",
    "overlay",
    "record_drawing",
    "reliability_diagram",
    "sample_sheet",
    "save_label_png",
    "save_png_atomic",
    "uncertainty_scale",
    "with_colorbar",
    "with_legend",
    "wrap_text",
]


@dataclass(frozen=True)
class Drawn:
    """One item a picture function drew: ``kind`` ("text", or a mark: "bar", "marker", "line"),
    its ``text`` (a mark: what it stands for), its bounding ``box`` (x0, y0, x1, y1) on the
    returned picture and its ``fill`` colour."""

    kind: str
    text: str
    box: tuple[int, int, int, int]
    fill: tuple[int, ...]


_RECORDERS: list[list[Drawn]] = []


@contextlib.contextmanager
def record_drawing() -> Iterator[list[Drawn]]:
    """``with record_drawing() as drawn:``: the list fills with a :class:`Drawn` per text and mark
    the picture functions draw inside the block."""
    items: list[Drawn] = []
    _RECORDERS.append(items)
    try:
        yield items
    finally:
        _RECORDERS.remove(items)


def _record(kind: str, text: str, box: Sequence[float], fill: Sequence[int]) -> None:
    for items in _RECORDERS:
        items.append(Drawn(kind, text, tuple(int(round(v)) for v in box), tuple(int(c) for c in fill)))  # type: ignore[arg-type]


def draw_text(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, font: Any,
          fill: tuple[int, int, int] = (0, 0, 0)) -> tuple[int, int, int, int]:
    """Draw ``text`` with its top left at ``xy``; its bounding box (recorded)."""
    draw.text(xy, text, fill=fill, font=font)
    box = tuple(int(v) for v in draw.textbbox(xy, text, font=font))
    _record("text", text, box, fill)
    return box  # type: ignore[return-value]


_PROBE = ImageDraw.Draw(Image.new("RGB", (1, 1)))


def _width(text: str, font: Any) -> int:
    return _text_size(_PROBE, text, font)[0]


def line_height(font: Any) -> int:
    """The distance in px between lines of text in ``font``."""
    return max(_text_size(_PROBE, "Ag", font)[1], 8) + 6


def wrap_text(text: str, font: Any, width: int) -> list[str]:
    """``text`` broken into lines at most ``width`` px wide in ``font``: at spaces, and inside a word
    too long for a line; explicit newlines are kept."""
    lines: list[str] = []
    for para in str(text).split("\n"):
        line, first = "", len(lines)
        for word in para.split(" "):
            trial = f"{line} {word}" if line else word
            if _width(trial, font) <= width:
                line = trial
                continue
            if _width(word, font) <= width:  # the word fits a line of its own
                lines.append(line)
                line = word
                continue
            while _width(trial, font) > width:  # a word longer than a line: cut it at the last fitting character
                fits = [i for i in range(1, len(trial)) if _width(trial[:i], font) <= width]
                cut = fits[-1] if fits else 1
                lines.append(trial[:cut].rstrip())
                trial = trial[cut:].lstrip()
            line = trial
        if line or len(lines) == first:
            lines.append(line)
    return lines


def _vertical_size(text: str, font: Any) -> tuple[int, int]:
    l, t, r, b = font.getbbox(text)
    return b - t + 2, r - l + 2


def _vertical_text(canvas: Image.Image, xy: tuple[int, int], text: str, font: Any,
                   fill: tuple[int, int, int] = (0, 0, 0)) -> tuple[int, int, int, int]:
    """Draw ``text`` reading bottom to top with its box's top left at ``xy``; the box (recorded)."""
    l, t, r, b = font.getbbox(text)
    mask = Image.new("L", (r - l + 2, b - t + 2), 0)
    ImageDraw.Draw(mask).text((1 - l, 1 - t), text, fill=255, font=font)
    mask = mask.rotate(90, expand=True)
    x, y = int(xy[0]), int(xy[1])
    box = (x, y, x + mask.width, y + mask.height)
    canvas.paste(fill, box, mask)
    _record("text", text, box, fill)
    return box


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


def sample_sheet(images: np.ndarray, header: str, min_width: int = 256, columns: int | None = None,
                 pad: int = 2) -> Image.Image:
    """(N, H, W, 3) uint8 images as an :func:`image_grid`, each enlarged by the smallest whole factor
    (nearest neighbour: the pixels stay visible) that makes the grid at least ``min_width`` px
    wide, under a ``header`` line (wrapped to the grid's width) saying what the images are."""
    imgs = np.asarray(images)
    if imgs.ndim != 4 or imgs.shape[-1] != 3 or imgs.dtype != np.uint8 or len(imgs) == 0:
        raise DdpmsegError(f"a sample sheet needs (N, H, W, 3) uint8 images, got {imgs.shape} {imgs.dtype}")
    n, _, w, _ = imgs.shape
    cols = columns or int(np.ceil(np.sqrt(n)))
    factor = max(1, math.ceil((min_width - pad - cols * pad) / (cols * w)))
    grid = image_grid(imgs.repeat(factor, axis=1).repeat(factor, axis=2), cols, pad)
    width = grid.shape[1]
    font = load_font(max(12, min(28, width // 36)))
    line = line_height(font)
    lines = wrap_text(header, font, width - 8)
    head = 4 + line * len(lines)
    canvas = Image.new("RGB", (width, head + grid.shape[0]), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, t in enumerate(lines):
        draw_text(draw, (4, 3 + i * line), t, font)
    canvas.paste(Image.fromarray(grid, "RGB"), (0, head))
    return canvas


def _nice_step(span: float, target: int) -> float:
    raw = span / max(target, 1)
    mag = 10 ** math.floor(math.log10(raw))
    return next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw * 0.999)


def _linear_ticks(lo: float, hi: float, target: int = 5) -> list[float]:
    step = _nice_step(hi - lo, target)
    first = math.ceil(lo / step - 1e-9) * step
    return [round(first + i * step, 12) for i in range(int((hi - first) / step + 1e-9) + 1)]


def _log_ticks(lo: float, hi: float) -> list[float]:
    """Tick values (not logs) for a log axis spanning 10**lo .. 10**hi."""
    span = hi - lo
    if span >= 1:
        mults = (1,) if span > 2.5 else (1, 2, 5)
        ticks = [m * 10.0 ** e for e in range(math.floor(lo), math.ceil(hi) + 1) for m in mults]
        ticks = [v for v in ticks if lo - 1e-9 <= math.log10(v) <= hi + 1e-9]
        while len(ticks) > 8:
            ticks = ticks[::2]
        return ticks
    return [v for v in _linear_ticks(10 ** lo, 10 ** hi, 6) if v > 0]


def _tick_text(v: float) -> str:
    if v == int(v) and abs(v) < 1e7:
        return f"{int(v):,}"
    return f"{v:.6g}"


def line_plot(x: Sequence[float], y: Sequence[float], title: str, xlabel: str, size: tuple[int, int] = (640, 360),
              log_y: bool = False, ylabel: str | None = None) -> Image.Image:
    """A line chart of ``y`` against ``x``: a title, both axes labelled (``ylabel``, default the title,
    with "(log scale)" when ``log_y``: positive values only) with ticks and their values, grid
    lines, markers on the points when there are few (a lone point sits in the middle, its value
    written beside it) and the last value written at the last point; no data: empty axes saying so."""
    width, height = size
    canvas = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = load_font()
    line = line_height(font)
    ylabel = ylabel if ylabel is not None else title + (" (log scale)" if log_y else "")
    xs, ys = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    keep = np.isfinite(xs) & np.isfinite(ys) & ((ys > 0) if log_y else True)
    xs, ys = xs[keep], ys[keep]
    values = ys
    if log_y:
        ys = np.log10(ys)
    if len(xs):
        x0, x1 = float(xs.min()), float(xs.max())
        y0, y1 = float(ys.min()), float(ys.max())
    else:
        x0, x1 = 0.0, 1.0
        y0, y1 = (-1.0, 0.0) if log_y else (0.0, 1.0)
    if x1 <= x0:  # one x: centred
        d = max(abs(x0) * 0.5, 1.0)
        x0, x1 = x0 - d, x1 + d
    if y1 <= y0:
        d = 0.1 if log_y else max(abs(y0) * 0.1, 1e-3)
        y0, y1 = y0 - d, y1 + d
    xpad, ypad = 0.02 * (x1 - x0), 0.06 * (y1 - y0)
    x0, x1, y0, y1 = x0 - xpad, x1 + xpad, y0 - ypad, y1 + ypad
    yticks = [(math.log10(v), _tick_text(v)) for v in _log_ticks(y0, y1)] if log_y else \
        [(v, _tick_text(v)) for v in _linear_ticks(y0, y1)]
    xticks = [(v, _tick_text(v)) for v in _linear_ticks(x0, x1, max(2, (width - 120) // 90))]
    tick_w = max([_width(t, font) for _, t in yticks] + [10])
    left = 8 + line + tick_w + 10
    right, top, bottom = 20, 10 + line, 12 + 2 * line
    pw, ph = width - left - right, height - top - bottom

    def at(xv: float, yv: float) -> tuple[float, float]:
        return left + (xv - x0) / (x1 - x0) * pw, top + (1 - (yv - y0) / (y1 - y0)) * ph

    draw_text(draw, (left, 4), title, font)
    for v, t in yticks:
        _, yy = at(x0, v)
        draw.line([left, yy, left + pw, yy], fill=(232, 232, 232))
        draw.line([left - 4, yy, left, yy], fill=(0, 0, 0))
        th = _text_size(_PROBE, t, font)[1]
        draw_text(draw, (left - 7 - _width(t, font), yy - th / 2 - 3), t, font)
    for v, t in xticks:
        xx, _ = at(v, y0)
        draw.line([xx, top, xx, top + ph], fill=(232, 232, 232))
        draw.line([xx, top + ph, xx, top + ph + 4], fill=(0, 0, 0))
        tw = _width(t, font)
        draw_text(draw, (min(max(xx - tw / 2, 2), width - 2 - tw), top + ph + 6), t, font)
    draw.rectangle([left, top, left + pw, top + ph], outline=(0, 0, 0))
    draw_text(draw, (left + (pw - _width(xlabel, font)) / 2, top + ph + 6 + line), xlabel, font)
    vw, vh = _vertical_size(ylabel, font)
    _vertical_text(canvas, (6, int(top + max(0, (ph - vh) / 2))), ylabel, font)
    blue = (31, 119, 180)
    if not len(xs):
        t = "no data yet"
        draw_text(draw, (left + (pw - _width(t, font)) / 2, top + ph / 2 - 8), t, font, (120, 120, 120))
        return canvas
    pts = [at(a, b) for a, b in zip(xs.tolist(), ys.tolist())]
    if len(pts) > 1:
        draw.line(pts, fill=blue, width=2)
        _record("line", ylabel, (min(p[0] for p in pts), min(p[1] for p in pts), max(p[0] for p in pts),
                                 max(p[1] for p in pts)), blue)
    if len(pts) <= 30:
        r = 4 if len(pts) <= 3 else 3
        for px, py in pts:
            draw.ellipse([px - r, py - r, px + r, py + r], fill=blue, outline=(255, 255, 255))
            _record("marker", ylabel, (px - r, py - r, px + r, py + r), blue)
    px, py = pts[-1]
    t = f"{values[-1]:.4g}" + (f" at {xlabel} {_tick_text(float(xs[-1]))}" if len(pts) == 1 else "")
    tw, th = _text_size(_PROBE, t, font)
    tx = px + 8 if px + 8 + tw <= left + pw - 2 else px - 8 - tw
    ty = min(max(py - th - 8, top + 2), top + ph - th - 6)
    l, tt, r, b = draw.textbbox((tx, ty), t, font=font)
    draw.rectangle([l - 2, tt - 2, r + 2, b + 2], fill=(255, 255, 255), outline=(200, 200, 200))  # readable over the line
    draw_text(draw, (tx, ty), t, font, (20, 70, 120))
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


def load_font(size: int = 12) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's default font at ``size`` px (one bitmap size on Pillow < 10.1)."""
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

    Values are divided by ``vmax`` (default: the map's own maximum, so two maps'
    colours cannot be compared; give a fixed ``vmax``, e.g. the first value of
    :func:`uncertainty_scale`, for one scale across images); values above it
    are drawn brightest, NaN and negative values count as 0.
    """
    a = np.maximum(np.nan_to_num(np.asarray(u, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0), 0.0)
    if a.ndim != 2:
        raise DdpmsegError(f"a heat map needs a 2-D map, got shape {a.shape}")
    top = float(a.max(initial=0.0)) if vmax is None else float(vmax)
    return colormap(a / top if top > 0 else a * 0.0), top


def uncertainty_scale(n_classes: int) -> tuple[float, str]:
    """The fixed colour scale of a K-class uncertainty map (entropy or mutual information, in nats):
    (its largest possible value ln K, a colour-bar title that says so), for
    ``heat, top = heatmap(u, vmax=v)`` and ``with_colorbar(heat, top, title)``."""
    if n_classes < 2:
        raise DdpmsegError(f"an uncertainty scale needs at least 2 classes, got {n_classes}")
    top = math.log(n_classes)
    return top, f"uncertainty (nats)\n0 to ln {n_classes} = {top:.2f}"


def _panel_font(height: int) -> Any:
    return load_font(max(12, min(40, height // 28)))


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
    line = line_height(font)
    pad, swatch = line // 2, line - 4
    text_w = max([_width(str(n), font) for n in names] + [_width("classes", font)])
    canvas, x0 = _beside(img, 3 * pad + swatch + text_w, 2 * pad + line * (len(names) + 1))
    draw = ImageDraw.Draw(canvas)
    draw.text((x0 + pad, pad), "classes", fill=(0, 0, 0), font=font)
    for i, (name, colour) in enumerate(zip(names, np.asarray(colours, dtype=np.uint8))):
        y = pad + line * (i + 1)
        draw.rectangle([x0 + pad, y + 2, x0 + pad + swatch, y + 2 + swatch], fill=tuple(int(c) for c in colour),
                       outline=(0, 0, 0))
        draw.text((x0 + 2 * pad + swatch, y), str(name), fill=(0, 0, 0), font=font)
    return canvas


def with_colorbar(image: np.ndarray, vmax: float, title: str, font_size: int | None = None) -> Image.Image:
    """``image`` (H, W, 3), drawn with :func:`colormap` over 0..``vmax``, with a labelled colour bar on its right.

    ``title`` may hold several lines ("\\n"), e.g. the unit and range from
    :func:`uncertainty_scale`; the panel grows to fit them. The text is
    ``font_size`` px (default: growing with the image's height, 12 to 40).
    """
    img = np.asarray(image)
    h = img.shape[0]
    font = _panel_font(h) if font_size is None else load_font(font_size)
    line = line_height(font)
    pad, bar_w = line // 2, line
    titles = str(title).split("\n")
    head = line * len(titles)
    bar_h = max(4 * line, h - 3 * pad - head)
    ticks = [(f"{vmax * f:.3g}", f) for f in (1.0, 0.5, 0.0)]
    text_w = max([_width(t, font) for t, _ in ticks] + [_width(t, font) - bar_w - pad for t in titles])
    canvas, x0 = _beside(img, 3 * pad + bar_w + text_w, 3 * pad + head + bar_h)
    draw = ImageDraw.Draw(canvas)
    for i, t in enumerate(titles):
        draw_text(draw, (x0 + pad, pad + i * line), t, font)
    top = 2 * pad + head
    gradient = colormap(np.linspace(1.0, 0.0, bar_h))[:, None, :].repeat(bar_w, axis=1)
    canvas.paste(Image.fromarray(np.ascontiguousarray(gradient), "RGB"), (x0 + pad, top))
    draw.rectangle([x0 + pad, top, x0 + pad + bar_w - 1, top + bar_h - 1], outline=(0, 0, 0))
    for text, f in ticks:
        y = top + round((1 - f) * (bar_h - 1))
        th = _text_size(_PROBE, text, font)[1]
        draw_text(draw, (x0 + 2 * pad + bar_w, min(max(top, y - th // 2), top + bar_h - th)), text, font)
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
    font = load_font()

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


FAINT_SHARE = 0.001
"""Reliability diagram: a bin holding less than this share of the pixels (0.1 %) is drawn faint."""

_BAR, _BAR_EDGE, _TICK = (94, 156, 206), (31, 80, 140), (200, 60, 40)


def _faint(colour: tuple[int, int, int], keep: float = 0.25) -> tuple[int, int, int]:
    return tuple(int(round(255 - keep * (255 - c))) for c in colour)  # type: ignore[return-value]


def _share_text(share: float) -> str:
    p = 100 * share
    if p == 0:
        return "0%"
    if p >= 10:
        return f"{p:.0f}%"
    if p >= 1:
        return f"{p:.1f}%"
    return f"{p:.2g}%" if p >= 1e-4 else "<0.0001%"


def reliability_diagram(confidence: np.ndarray, accuracy: np.ndarray, count: np.ndarray, ece: float,
                        size: int = 420) -> Image.Image:
    """A reliability diagram, ``size`` px wide: per equal-width confidence bin a bar of its accuracy
    (empty bins: none; bins with under :data:`FAINT_SHARE` of the pixels: faint), the bin's mean
    confidence as a red tick on the bar, the diagonal of perfect calibration, each bin's share
    of the pixels under the axis, a legend for every mark and the ECE in the title."""
    counts = np.asarray(count, dtype=np.float64)
    n, total = len(counts), float(np.sum(counts))
    share = counts / total if total > 0 else np.zeros(n)
    font = load_font()
    line = line_height(font)
    label_w = max(_vertical_size(_share_text(v), font)[1] for v in share) if n else line
    left, right = 8 + line + _width("0.75", font) + 10, 16
    w = max(size - left - right, 120)
    size = left + w + right
    plot_h = w
    top = 8 + 2 * line
    strip = top + plot_h + 6 + 2 * line  # y of the "share of pixels" strip
    legend_w = size - 16 - 32
    entries = [
        ("bar", "bar: accuracy of the pixels whose confidence falls in the bin"),
        ("tick", "red tick: the bin's mean confidence"),
        ("diag", "diagonal: perfect calibration (accuracy = confidence)"),
        ("faint", f"faint bar: a bin with under {100 * FAINT_SHARE:g} % of the pixels (few pixels, noisy)"),
        ("", "ECE: the pixel-weighted mean gap between bar top and red tick"),
    ]
    wrapped = [(kind, wrap_text(text, font, legend_w)) for kind, text in entries]
    legend_top = strip + line + label_w + 10
    height = legend_top + sum(len(lines) for _, lines in wrapped) * line + 8
    canvas = Image.new("RGB", (size, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, t in enumerate(wrap_text(f"reliability: ECE {ece:.4f} over {int(total):,} pixels "
                                    f"in {n} confidence bins", font, size - 16)[:2]):
        draw_text(draw, (8, 6 + i * line), t, font)

    def at(x: float, y: float) -> tuple[float, float]:
        return left + x * w, top + (1 - y) * plot_h

    for v in (0.0, 0.25, 0.5, 0.75, 1.0):  # grid lines and ticks
        draw.line([*at(v, 0), *at(v, 1)], fill=(235, 235, 235))
        draw.line([*at(0, v), *at(1, v)], fill=(235, 235, 235))
    for i in range(n):
        if counts[i] == 0 or not np.isfinite(accuracy[i]):
            continue
        faint = share[i] < FAINT_SHARE
        fill, edge, tick = (_faint(_BAR), _faint(_BAR_EDGE), _faint(_TICK)) if faint else (_BAR, _BAR_EDGE, _TICK)
        box = [*at(i / n, float(accuracy[i])), *at((i + 1) / n, 0)]
        draw.rectangle(box, fill=fill, outline=edge)
        _record("bar", f"bin {i}" + (" (faint)" if faint else ""), box, fill)
        cx, cy = at(float(confidence[i]), float(accuracy[i]))
        draw.line([cx, cy - 5, cx, cy + 5], fill=tick, width=2)
        _record("tick", f"bin {i}", (cx - 1, cy - 5, cx + 1, cy + 5), tick)
    draw.line([*at(0, 0), *at(1, 1)], fill=(120, 120, 120), width=1)
    draw.rectangle([*at(0, 1), *at(1, 0)], outline=(0, 0, 0))
    for v in (0.0, 0.25, 0.5, 0.75, 1.0):
        x, y = at(v, 0)
        draw.line([x, y, x, y + 4], fill=(0, 0, 0))
        t = f"{v:g}"
        draw_text(draw, (min(max(x - _width(t, font) / 2, 2), size - 2 - _width(t, font)), y + 6), t, font)
        x, y = at(0, v)
        draw.line([x - 4, y, x, y], fill=(0, 0, 0))
        th = _text_size(_PROBE, t, font)[1]
        draw_text(draw, (x - 6 - _width(t, font), min(max(y - th / 2 - 2, top), top + plot_h - th - 2)), t, font)
    xl = "confidence (top-1 mean softmax)"
    draw_text(draw, (left + (w - _width(xl, font)) / 2, top + plot_h + 6 + line), xl, font)
    yl = "accuracy (share of pixels correct)"
    vw, vh = _vertical_size(yl, font)
    _vertical_text(canvas, (6, int(top + (plot_h - vh) / 2)), yl, font)
    draw_text(draw, (8, strip), "share of all pixels in each bin:", font)
    for i in range(n):
        t = _share_text(share[i])
        tw, th = _vertical_size(t, font)
        _vertical_text(canvas, (int(left + (i + 0.5) * w / n - tw / 2), strip + line + 2), t, font,
                       (150, 150, 150) if share[i] < FAINT_SHARE else (0, 0, 0))
    y = legend_top
    for kind, lines in wrapped:
        x0, cy = 16, y + line // 2
        if kind == "bar":
            draw.rectangle([x0, cy - 6, x0 + 20, cy + 5], fill=_BAR, outline=_BAR_EDGE)
        elif kind == "faint":
            draw.rectangle([x0, cy - 6, x0 + 20, cy + 5], fill=_faint(_BAR), outline=_faint(_BAR_EDGE))
        elif kind == "tick":
            draw.line([x0 + 10, cy - 6, x0 + 10, cy + 5], fill=_TICK, width=2)
        elif kind == "diag":
            draw.line([x0, cy + 5, x0 + 20, cy - 6], fill=(120, 120, 120))
        for j, t in enumerate(lines):
            draw_text(draw, (x0 + 32, y + j * line), t, font)
        y += line * len(lines)
    return canvas


CONFUSION_TITLE = "true \\ predicted (% of each true class)"


def confusion_image(confusion: np.ndarray, names: Sequence[str], cell: int = 28) -> Image.Image:
    """The confusion matrix normalised per row (rows: true class, columns: predicted), as a grid of
    cells shaded by their share with the percentage written in, class names on both axes; the
    canvas grows to fit the title and the names."""
    cm = np.asarray(confusion, dtype=np.float64)
    k = len(cm)
    rows = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    font = load_font()
    line = line_height(font)
    cell = max(cell, _width("100", font) + 6)
    label_w = max([_width(str(n), font) for n in names] + [40]) + 8
    col_h = max([_vertical_size(str(n), font)[1] for n in names] + [8])
    top = 6 + line + 4 + col_h + 4
    left = label_w + 12
    width = max(left + k * cell + 10, _width(CONFUSION_TITLE, font) + 16)
    canvas = Image.new("RGB", (width, top + k * cell + 10), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw_text(draw, (8, 6), CONFUSION_TITLE, font)
    for r in range(k):
        for c in range(k):
            v = rows[r, c]
            shade = tuple(int(255 - v * (255 - t)) for t in (31, 80, 140))
            box = [left + c * cell, top + r * cell, left + (c + 1) * cell - 1, top + (r + 1) * cell - 1]
            draw.rectangle(box, fill=shade, outline=(220, 220, 220))
            if v >= 0.005:
                text = f"{100 * v:.0f}"
                tw, th = _text_size(_PROBE, text, font)
                l, t = _PROBE.textbbox((0, 0), text, font=font)[:2]
                draw_text(draw, (box[0] + (cell - tw) // 2 - l, box[1] + (cell - th) // 2 - t), text, font,
                      (255, 255, 255) if v > 0.5 else (0, 0, 0))
        name = str(names[r])
        tw, th = _text_size(_PROBE, name, font)
        t = _PROBE.textbbox((0, 0), name, font=font)[1]
        draw_text(draw, (left - tw - 6, top + r * cell + (cell - th) // 2 - t), name, font)
    for c in range(k):  # column names written vertically, reading upwards
        name = str(names[c])
        vw, vh = _vertical_size(name, font)
        _vertical_text(canvas, (left + c * cell + (cell - vw) // 2, top - vh - 4), name, font)
    return canvas
