"""A made-up anomaly data set (no public one reaches these machines): normal textures and anomalous
copies with known masks.

Normal images are woven-looking textures: oriented stripes (angle, period and
phase drawn from narrow ranges) in two colours of a teal-to-blue family that
drift smoothly across the image, plus mild grain. Anomalous copies add one
defect each, with its mask:

    blob      a soft-edged ellipse of an off-palette colour (rust, red, yellow)
    scratch   a thin dark line across part of the image
    swap      a patch whose stripes run at a right angle (a texture swap)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ddpmseg.viz import save_png_atomic

DEFECTS = ("blob", "scratch", "swap")


def _stripes(rng: np.random.Generator, size: int, angle: float | None = None) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size
    angle = rng.uniform(0.6, 0.9) if angle is None else angle
    period = rng.uniform(0.16, 0.22)
    phase = rng.uniform(0, 2 * np.pi)
    return 0.5 + 0.5 * np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period + phase)


def normal_image(rng: np.random.Generator, size: int = 32) -> tuple[np.ndarray, float]:
    """(uint8 (S, S, 3) texture, its stripe angle)."""
    angle = rng.uniform(0.6, 0.9)
    s = _stripes(rng, size, angle)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size
    drift = rng.uniform(-0.15, 0.15, 3) * (xx[..., None] - 0.5) + rng.uniform(-0.15, 0.15, 3) * (yy[..., None] - 0.5)
    dark = np.array([0.10, 0.30, 0.40]) + rng.uniform(-0.05, 0.05, 3)
    light = np.array([0.45, 0.75, 0.80]) + rng.uniform(-0.05, 0.05, 3)
    img = dark + (light - dark) * s[..., None] + drift + rng.normal(0, 0.02, (size, size, 3))
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8), angle


def add_defect(img: np.ndarray, rng: np.random.Generator, kind: str, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """(image with one ``kind`` defect, its bool mask)."""
    size = img.shape[0]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    out = img.astype(np.float64) / 255
    if kind == "blob":
        cy, cx = rng.uniform(0.25, 0.75, 2) * size
        ry, rx = rng.uniform(0.08, 0.16, 2) * size
        d = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
        alpha = np.clip(1.5 - d, 0, 1)[..., None]
        colour = np.array([(0.75, 0.30, 0.15), (0.85, 0.15, 0.20), (0.90, 0.80, 0.20)][rng.integers(3)])
        out = out * (1 - alpha) + colour * alpha
        mask = alpha[..., 0] > 0.5
    elif kind == "scratch":
        y0, x0 = rng.uniform(0.2, 0.8, 2) * size
        theta = rng.uniform(0, np.pi)
        length = rng.uniform(0.35, 0.6) * size
        ux, uy = np.cos(theta), np.sin(theta)
        along = (xx - x0) * ux + (yy - y0) * uy
        across = np.abs(-(xx - x0) * uy + (yy - y0) * ux)
        line = (np.abs(along) < length / 2) & (across < max(0.6, size / 40))
        out[line] = out[line] * 0.15
        mask = line
    elif kind == "swap":
        h = int(rng.uniform(0.25, 0.35) * size)
        y0, x0 = rng.integers(0, size - h, 2)
        s = _stripes(rng, size, angle + np.pi / 2)
        patch = np.zeros((size, size), bool)
        patch[y0 : y0 + h, x0 : x0 + h] = True
        lo, hi = out.min(axis=(0, 1)), out.max(axis=(0, 1))
        out[patch] = (lo + (hi - lo) * s[..., None])[patch]
        mask = patch
    else:
        raise ValueError(f"unknown defect {kind!r}; use one of {DEFECTS}")
    return (np.clip(out, 0, 1) * 255).round().astype(np.uint8), mask


def make_anomaly_dataset(out: str | Path, n_train: int = 64, n_good: int = 8, n_defect: int = 4,
                         size: int = 32, seed: int = 0) -> Path:
    """Write ``out/train/normal_XXX.png`` (normal images to train a DDPM on), ``out/test/`` with
    ``good_XXX.png`` and ``<defect>_XXX.png`` (``n_defect`` of each defect), and ``out/masks/NAME.png``
    (255 = anomaly; all 0 for the good ones). Deterministic for a seed."""
    out = Path(out)
    rng = np.random.default_rng(seed)
    for d in ("train", "test", "masks"):
        (out / d).mkdir(parents=True, exist_ok=True)
    for i in range(n_train):
        save_png_atomic(out / "train" / f"normal_{i:03d}.png", normal_image(rng, size)[0])
    jobs = [("good", i) for i in range(n_good)] + [(k, i) for k in DEFECTS for i in range(n_defect)]
    for kind, i in jobs:
        img, angle = normal_image(rng, size)
        mask = np.zeros((size, size), bool)
        if kind != "good":
            img, mask = add_defect(img, rng, kind, angle)
        name = f"{kind}_{i:03d}"
        save_png_atomic(out / "test" / f"{name}.png", img)
        save_png_atomic(out / "masks" / f"{name}.png", (mask * 255).astype(np.uint8))
    return out
