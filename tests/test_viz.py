"""Tests for ddpmseg.viz: colour maps, label PNGs, overlays, k-means grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddpmseg import data, viz
from ddpmseg.errors import DdpmsegError

PALETTE = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]], dtype=np.uint8)


def _labels(h: int = 6, w: int = 5) -> np.ndarray:
    lab = np.arange(h * w).reshape(h, w) % 3
    lab[0, 0] = 255
    return lab


def test_colorize() -> None:
    lab = _labels()
    out = viz.colorize(lab, PALETTE)
    assert out.shape == (6, 5, 3) and out.dtype == np.uint8
    assert out[0, 0].tolist() == [0, 0, 0]  # ignore -> black
    assert np.array_equal(out[lab == 1], np.tile(PALETTE[1], ((lab == 1).sum(), 1)))
    with pytest.raises(DdpmsegError, match="palette has 3 colours"):
        viz.colorize(np.array([[0, 3]]), PALETTE)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_overlay(alpha: float) -> None:
    lab = _labels()
    rgb = np.full((6, 5, 3), 100, dtype=np.uint8)
    out = viz.overlay(rgb, lab, PALETTE, alpha=alpha)
    assert out.shape == rgb.shape and out.dtype == np.uint8
    assert out[0, 0].tolist() == [100, 100, 100]  # ignored pixel untouched
    expected = np.rint((1 - alpha) * 100 + alpha * PALETTE[lab[1, 1]].astype(float))
    assert out[1, 1].tolist() == expected.tolist()
    with pytest.raises(DdpmsegError):
        viz.overlay(rgb[:3], lab, PALETTE)


@pytest.mark.parametrize("k", [3, 34, 256])
def test_label_png_round_trip(tmp_path: Path, k: int) -> None:
    pal = viz.distinct_colors(k)
    rng = np.random.default_rng(k)
    lab = rng.integers(0, k, (17, 23))
    lab[0, :3] = 255
    p = tmp_path / "labels.png"
    viz.save_label_png(p, lab, pal)
    im = Image.open(p)
    assert im.mode == "P"
    assert np.array_equal(np.array(im), lab)
    got = np.array(im.getpalette(), dtype=np.uint8).reshape(-1, 3)
    assert np.array_equal(got[:k], pal)
    # and our own mask reader gets the indices back
    assert np.array_equal(data.load_mask(p), lab)
    assert [f.name for f in tmp_path.iterdir()] == ["labels.png"]  # no temp files left


def test_label_png_errors(tmp_path: Path) -> None:
    with pytest.raises(DdpmsegError, match="0..255"):
        viz.save_label_png(tmp_path / "x.png", np.array([[0, 300]]), PALETTE)
    with pytest.raises(DdpmsegError, match="256"):
        viz.save_label_png(tmp_path / "x.png", np.array([[0, 1]]), viz.distinct_colors(257))
    assert not list(tmp_path.iterdir())


def test_save_png_atomic(tmp_path: Path) -> None:
    a = np.random.default_rng(0).integers(0, 256, (8, 9, 3), dtype=np.uint8)
    p = tmp_path / "a.png"
    p.write_bytes(b"old")
    viz.save_png_atomic(p, a)
    assert np.array_equal(np.array(Image.open(p)), a)
    viz.save_png_atomic(tmp_path / "g.png", Image.fromarray(a[..., 0]))
    assert np.array_equal(np.array(Image.open(tmp_path / "g.png")), a[..., 0])
    assert sorted(f.name for f in tmp_path.iterdir()) == ["a.png", "g.png"]


def test_uncertainty_image() -> None:
    u = np.array([[0.0, 0.5], [1.0, np.nan]])
    img = viz.uncertainty_image(u)
    assert img.dtype == np.uint8 and img.tolist() == [[0, 128], [255, 0]]
    assert viz.uncertainty_image(u, vmax=2.0).tolist() == [[0, 64], [128, 0]]
    assert (viz.uncertainty_image(np.zeros((3, 3))) == 0).all()


def test_cluster_features_two_blobs() -> None:
    rng = np.random.default_rng(0)
    h, w = 12, 10
    truth = np.zeros((h, w), dtype=int)
    truth[:, 7:] = 1  # the smaller cluster on the right
    feats = rng.normal(0, 0.1, (16, h, w)).astype(np.float32)
    feats[:, truth == 1] += 5.0
    for f in (feats, torch.from_numpy(feats), torch.from_numpy(feats)[None]):
        got = viz.cluster_features(f, 2, random_state=0)
        assert got.shape == (h, w)
        assert np.array_equal(got, truth)  # largest cluster gets id 0
    with pytest.raises(DdpmsegError, match="k=1"):
        viz.cluster_features(feats, 1)
    with pytest.raises(DdpmsegError, match="k=121"):
        viz.cluster_features(feats, 121)


@pytest.mark.parametrize("cell", [32, 64])
def test_kmeans_grid(cell: int) -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    blocks, steps, k = [5, 8], [50, 150, 250], 4
    cells = {(b, t): rng.integers(0, k, (8, 8)) for b in blocks for t in steps}
    grid = viz.kmeans_grid(image, cells, blocks, steps, k, cell_size=cell)
    assert isinstance(grid, Image.Image) and grid.mode == "RGB"
    assert grid.size == (viz.GRID_LEFT + 4 * (cell + viz.GRID_PAD), viz.GRID_TOP + 2 * (cell + viz.GRID_PAD))
    a = np.array(grid)
    colours = viz.distinct_colors(k)
    # cell (block 8, t=150): row 1, column 2, nearest-upsampled
    x0 = viz.GRID_LEFT + 2 * (cell + viz.GRID_PAD)
    y0 = viz.GRID_TOP + 1 * (cell + viz.GRID_PAD)
    block = a[y0 : y0 + cell, x0 : x0 + cell]
    want = colours[np.kron(cells[(8, 150)], np.ones((cell // 8, cell // 8), dtype=int))]
    assert np.array_equal(block, want)
    # the first column below the input image is blank; margins carry dark text
    blank = a[y0 : y0 + cell, viz.GRID_LEFT : viz.GRID_LEFT + cell]
    assert (blank == 255).all()
    assert (a[: viz.GRID_TOP] < 128).any() and (a[:, : viz.GRID_LEFT] < 128).any()
    # deterministic
    assert np.array_equal(a, np.array(viz.kmeans_grid(image, cells, blocks, steps, k, cell_size=cell)))


def test_kmeans_grid_errors() -> None:
    image = np.zeros((16, 16, 3), dtype=np.uint8)
    with pytest.raises(DdpmsegError, match="block 5 at t=50"):
        viz.kmeans_grid(image, {}, [5], [50], 3)
    with pytest.raises(DdpmsegError, match="outside 0..2"):
        viz.kmeans_grid(image, {(5, 50): np.full((4, 4), 3)}, [5], [50], 3)


def test_distinct_colors() -> None:
    c = viz.distinct_colors(300)
    assert c.shape == (300, 3) and c.dtype == np.uint8
    assert len({tuple(x) for x in c}) == 300 and not (c == 0).all(1).any()
    assert np.array_equal(c[:10], viz.distinct_colors(10))
    assert viz.distinct_colors(0).shape == (0, 3)
