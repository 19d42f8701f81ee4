"""Strokes in Python, torch-free: the run-length code of label maps (:func:`rle_encode`), replaying a saved history into labels exactly as the page paints them
(:func:`replay`), and synthetic scribbles drawn inside a true mask's classes (:func:`scribbles`), which
benchmarks/bench_label.py and the docs' screenshot use in place of a person.

A dab of radius ``r`` at ``(cx, cy)`` labels every pixel whose centre lies within ``r``; a stroke is
dabs along its polyline every ``max(0.5, r / 2)`` pixels (static/app.js does the same arithmetic).
"""

from __future__ import annotations

import math
import operator
from typing import Any, Sequence

import numpy as np

from ddpmseg.errors import DdpmsegError

UNLABELLED = 255  # a label PNG's unlabelled pixels


class BadInput(DdpmsegError):
    """A request body that is not what the API takes (HTTP 400)."""


def rle_encode(labels: np.ndarray) -> list[int]:
    """Row-major run lengths of a uint8 map: ``[value, count, value, count, ...]``."""
    flat = np.asarray(labels, dtype=np.uint8).reshape(-1)
    if flat.size == 0:
        return []
    starts = np.r_[0, np.flatnonzero(flat[1:] != flat[:-1]) + 1]
    counts = np.diff(np.r_[starts, flat.size])
    return np.stack([flat[starts].astype(np.int64), counts], 1).reshape(-1).tolist()


def rle_decode(rle: Sequence[int], width: int, height: int) -> np.ndarray:
    """The (height, width) uint8 map of :func:`rle_encode`'s list; a wrong total or value is a BadInput."""
    n = width * height
    msg = f"rle must hold values 0..255 with counts 1..{n} summing to {width}x{height} = {n}"
    if isinstance(rle, (str, bytes)) or not isinstance(rle, Sequence) or len(rle) % 2:
        raise BadInput("rle must be a flat list [value, count, value, count, ...]")
    try:  # Python ints: an int64 sum of huge counts could wrap to n (np.repeat would then crash the server)
        items = [operator.index(v) for v in rle]
    except (TypeError, ValueError, OverflowError):
        raise BadInput(msg) from None
    values, counts = items[0::2], items[1::2]
    if any(not 0 <= v <= 255 for v in values) or any(not 1 <= c <= n for c in counts) or sum(counts) != n:
        raise BadInput(msg)
    return np.repeat(np.asarray(values, np.uint8), np.asarray(counts, np.int64)).reshape(height, width)




def dab(labels: np.ndarray, c: int, cx: float, cy: float, r: float) -> None:
    h, w = labels.shape
    x0, x1 = max(0, math.floor(cx - r)), min(w - 1, math.ceil(cx + r))
    y0, y1 = max(0, math.floor(cy - r)), min(h - 1, math.ceil(cy + r))
    if x1 < x0 or y1 < y0:
        return
    ys = np.arange(y0, y1 + 1, dtype=np.float64)[:, None] + 0.5 - cy
    xs = np.arange(x0, x1 + 1, dtype=np.float64)[None, :] + 0.5 - cx
    inside = xs * xs + ys * ys <= r * r
    labels[y0:y1 + 1, x0:x1 + 1][inside] = c


def paint_stroke(labels: np.ndarray, c: int, r: float, points: Sequence[float]) -> None:
    """One stroke op (``points``: x0, y0, x1, y1, ... in image pixels) painted into ``labels``."""
    p = list(points)
    dab(labels, c, p[0], p[1], r)
    for i in range(2, len(p), 2):
        xa, ya, xb, yb = p[i - 2], p[i - 1], p[i], p[i + 1]
        n = max(1, math.ceil(math.hypot(xb - xa, yb - ya) / max(0.5, r / 2)))
        for k in range(1, n + 1):
            dab(labels, c, xa + (xb - xa) * k / n, ya + (yb - ya) * k / n, r)


def replay(doc: dict[str, Any]) -> np.ndarray:
    """The labels a history describes: its first ``cursor`` ops applied to an unlabelled map."""
    w, h = int(doc["width"]), int(doc["height"])
    labels = np.full((h, w), UNLABELLED, np.uint8)
    for op in doc["ops"][: doc["cursor"]]:
        if op["k"] == "set":
            labels[:] = rle_decode(op["rle"], w, h)
        else:
            paint_stroke(labels, int(op["c"]), float(op["r"]), op["p"])
    return labels


def scribbles(mask: np.ndarray, *, per_class: int = 2, radius: float = 2.0, steps: int = 12, step: float | None = None,
              classes: Sequence[int] | None = None, seed: int = 0, min_area: int = 50) -> list[dict[str, Any]]:
    """Stroke ops a person might draw on ``mask``: per class, ``per_class`` random walks of ``steps`` steps
    (each ``step`` pixels, default 4 % of the image's longer side) that stay inside the class eroded by
    ``radius + 1``, so every painted pixel has the class's true label. Classes with fewer than ``min_area``
    pixels (after erosion) get none."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    mask = np.asarray(mask)
    h, w = mask.shape
    step = step or max(2.0, 0.04 * max(h, w))
    todo = [int(c) for c in np.unique(mask) if c != UNLABELLED] if classes is None else list(classes)
    ops: list[dict[str, Any]] = []
    k = int(math.ceil(radius)) + 1
    disk = np.add.outer(np.arange(-k, k + 1) ** 2, np.arange(-k, k + 1) ** 2) <= k * k
    for c in todo:
        inside = ndimage.binary_erosion(mask == c, structure=disk, border_value=0)
        ys, xs = np.nonzero(inside)
        if ys.size < min_area:
            continue
        for _ in range(per_class):
            i = rng.integers(ys.size)
            x, y = float(xs[i]) + 0.5, float(ys[i]) + 0.5
            pts, angle = [x, y], rng.uniform(0, 2 * math.pi)
            for _ in range(steps):
                for _try in range(12):  # turn until the next point is still inside the class
                    a = angle + rng.normal(0, 0.6) + (_try > 3) * rng.uniform(-math.pi, math.pi)
                    nx, ny = x + step * math.cos(a), y + step * math.sin(a)
                    if _segment_inside(inside, x, y, nx, ny):
                        x, y, angle = nx, ny, a
                        pts += [round(x, 2), round(y, 2)]
                        break
                else:
                    break
            ops.append({"k": "s", "c": c, "r": radius, "p": pts})
    return ops


def _segment_inside(inside: np.ndarray, xa: float, ya: float, xb: float, yb: float) -> bool:
    h, w = inside.shape
    n = max(2, int(math.hypot(xb - xa, yb - ya)) + 1)
    for t in np.linspace(0, 1, n):
        x, y = int(xa + (xb - xa) * t), int(ya + (yb - ya) * t)
        if not (0 <= x < w and 0 <= y < h and inside[y, x]):
            return False
    return True
