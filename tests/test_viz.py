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


def test_heatmap_scales_to_the_maximum_in_viridis() -> None:
    u = np.array([[0.0, 0.5], [1.0, np.nan]])
    img, top = viz.heatmap(u)
    assert img.shape == (2, 2, 3) and img.dtype == np.uint8 and top == 1.0
    assert img[0, 0].tolist() == [68, 1, 84] and img[1, 0].tolist() == [253, 231, 37]  # viridis' ends
    assert img[0, 1].tolist() == [33, 145, 140] and img[1, 1].tolist() == [68, 1, 84]  # middle; NaN counts as 0
    half, top = viz.heatmap(u, vmax=2.0)
    assert top == 2.0 and half[1, 0].tolist() == [33, 145, 140]
    assert (viz.heatmap(np.zeros((3, 3)))[0] == [68, 1, 84]).all()


def test_colorbar_keeps_the_image_and_labels_its_scale() -> None:
    img, top = viz.heatmap(np.linspace(0, 3, 64 * 48).reshape(48, 64))
    out = np.asarray(viz.with_colorbar(img, top, "uncertainty"))
    assert out.shape[0] >= 48 and out.shape[1] > 64
    assert np.array_equal(out[:48, :64], img)  # the map's own pixels, untouched at the top left
    panel = out[:, 64:]
    # the bar runs from viridis' top colour down to its bottom colour
    top_colour, bottom_colour = np.array([253, 231, 37]), np.array([68, 1, 84])
    near = lambda c: (np.abs(panel.astype(int) - c).sum(-1) < 30).any()  # noqa: E731 (the rows next to the outline)
    assert near(top_colour) and near(bottom_colour)
    assert (panel == 0).all(-1).any()  # black text (the tick labels and title)


def test_legend_shows_a_swatch_per_class_given() -> None:
    img = np.full((40, 30, 3), 128, np.uint8)
    colours = np.array([[255, 0, 0], [0, 0, 255]], np.uint8)
    out = np.asarray(viz.with_legend(img, ["iris", "pupil"], colours))
    assert out.shape[1] > 30 and np.array_equal(out[:40, :30], img)
    panel = out[:, 30:]
    for c in colours:
        assert (panel == c).all(-1).sum() > 20  # a filled swatch of each colour
    assert not (panel == [0, 255, 0]).all(-1).any()
    tall = np.asarray(viz.with_legend(img, [f"class {i}" for i in range(30)], viz.distinct_colors(30)))
    assert tall.shape[0] > 40  # more classes than rows: the canvas grows down


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



def test_kmeans_grid_keeps_the_input_aspect_and_greys_unseen_pixels() -> None:
    image = np.zeros((60, 120, 3), np.uint8)  # 2:1 landscape
    image[:, :60] = (200, 50, 50)
    cells = {(5, 50): np.concatenate([np.zeros((4, 4), int), np.full((4, 4), -1)], axis=1)}  # right half unseen
    grid = np.array(viz.kmeans_grid(image, cells, [5], [50], 2, cell_size=64))
    cell_w, cell_h = 64, 32
    assert grid.shape == (viz.GRID_TOP + cell_h + viz.GRID_PAD, viz.GRID_LEFT + 2 * (cell_w + viz.GRID_PAD), 3)
    thumb = grid[viz.GRID_TOP : viz.GRID_TOP + cell_h, viz.GRID_LEFT : viz.GRID_LEFT + cell_w]
    assert (thumb[:, :28] == (200, 50, 50)).all() and (thumb[:, 36:] == 0).all()  # not squashed: halves stay halves
    x0 = viz.GRID_LEFT + cell_w + viz.GRID_PAD
    cell = grid[viz.GRID_TOP : viz.GRID_TOP + cell_h, x0 : x0 + cell_w]
    assert (cell[:, :32] == viz.distinct_colors(2)[0]).all() and (cell[:, 32:] == 225).all()


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
