"""Colours for classes: :func:`distinct_colors`, the palette of label sets without their own colours
(:meth:`~ddpmseg.data.labelsets.LabelSet.default`) and of the pictures :mod:`ddpmseg.viz` draws."""

from __future__ import annotations

import colorsys

import numpy as np

from ddpmseg.errors import DdpmsegError


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
