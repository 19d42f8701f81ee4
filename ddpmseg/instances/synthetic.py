"""Synthetic instance scenes: 2-6 objects of 2-3 classes (discs, squares, triangles), each class with
its own hue range and a texture of its own, on a textured background; objects may touch or overlap
(a later object hides what it covers: the masks are the visible parts)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from ddpmseg.instances.core import Instances

CLASS_NAMES = ("disc", "square", "triangle")
_HUES = ((200, 60, 50), (50, 160, 60), (60, 80, 210))  # base RGB of each class


def _shape(kind: int, size: int, cy: float, cx: float, r: float, angle: float) -> np.ndarray:
    y, x = np.mgrid[:size, :size] + 0.5
    dy, dx = y - cy, x - cx
    if kind == 0:
        return dx * dx + dy * dy <= r * r
    c, s = np.cos(angle), np.sin(angle)
    u, v = c * dx + s * dy, -s * dx + c * dy
    if kind == 1:
        return (np.abs(u) <= r * 0.85) & (np.abs(v) <= r * 0.85)
    # an equilateral triangle of circumradius r: inside all three half-planes
    inside = np.ones_like(u, bool)
    for k in range(3):
        a = angle + np.pi / 2 + 2 * np.pi * k / 3
        inside &= dx * np.cos(a) + dy * np.sin(a) <= r * 0.5
    return inside


def _texture(rng: np.random.Generator, size: int, scale: float) -> np.ndarray:
    """A smooth random field in [-1, 1] (sum of a few random sinusoids)."""
    y, x = np.mgrid[:size, :size] / size
    out = np.zeros((size, size))
    for _ in range(4):
        f = rng.uniform(1, scale)
        t = rng.uniform(0, 2 * np.pi)
        out += np.sin(2 * np.pi * f * (np.cos(t) * x + np.sin(t) * y) + rng.uniform(0, 2 * np.pi))
    return out / 4


def make_scene(rng: np.random.Generator, size: int = 64, n_classes: int = 3,
               objects: tuple[int, int] = (2, 6)) -> tuple[np.ndarray, Instances]:
    """One (size, size, 3) uint8 image and its instances (class indices 1..n_classes)."""
    bg = 128 + 40 * _texture(rng, size, 6)[..., None] + rng.normal(0, 6, (size, size, 3))
    img = np.repeat(bg, 1, axis=2).astype(np.float32)
    shapes, classes = [], []
    for _ in range(int(rng.integers(objects[0], objects[1] + 1))):
        kind = int(rng.integers(n_classes))
        r = rng.uniform(0.09, 0.17) * size
        visible = [m for m in shapes if m.any()]
        if visible and rng.random() < 0.4:  # near an earlier object: touching or overlapping
            ys, xs = np.nonzero(visible[int(rng.integers(len(visible)))])
            j = int(rng.integers(len(ys)))
            a = rng.uniform(0, 2 * np.pi)
            cy, cx = ys[j] + r * np.sin(a), xs[j] + r * np.cos(a)
        else:
            cy, cx = rng.uniform(r, size - r, 2)
        m = _shape(kind, size, cy, cx, r, rng.uniform(0, np.pi))
        if m.sum() < 12:
            continue
        colour = np.asarray(_HUES[kind], np.float32) + rng.normal(0, 18, 3)
        tex = _texture(rng, size, 3 + 5 * kind)[..., None]
        img[m] = (colour + 30 * tex)[m]
        for prev in shapes:
            prev &= ~m
        shapes.append(m)
        classes.append(kind + 1)
    keep = [i for i, m in enumerate(shapes) if m.sum() >= 10]
    img = np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)
    if not keep:
        return img, Instances.empty(size, size)
    return img, Instances(np.stack([shapes[i] for i in keep]), [classes[i] for i in keep], np.ones(len(keep)))


def make_scenes(n: int, size: int = 64, seed: int = 0, n_classes: int = 3,
                objects: tuple[int, int] = (2, 6)) -> list[tuple[np.ndarray, Instances]]:
    """``n`` scenes from one seed."""
    rng = np.random.default_rng(seed)
    return [make_scene(rng, size, n_classes, objects) for _ in range(n)]


def write_scenes(folder: str | Path, scenes: Sequence[tuple[np.ndarray, Instances]], prefix: str = "scene",
                 n_classes: int = 3) -> tuple[list[Path], Path]:
    """``<prefix>NNN.png`` images and ``instances.json`` (COCO) in ``folder``; (image paths, the JSON)."""
    import json

    from ddpmseg.instances.annotations import to_coco

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (img, _) in enumerate(scenes):
        p = folder / f"{prefix}{i:03d}.png"
        Image.fromarray(img).save(p)
        paths.append(p)
    coco = to_coco([(p.name, inst) for p, (_, inst) in zip(paths, scenes)],
                   {c + 1: CLASS_NAMES[c] for c in range(n_classes)}, results=False)
    (folder / "instances.json").write_text(json.dumps(coco))
    return paths, folder / "instances.json"
