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


def test_atomic_writes_reach_the_disk_before_the_rename_and_after(tmp_path: Path, monkeypatch) -> None:
    """write_atomic fsyncs the new file's data before renaming it into place, then the folder (the
    rename): what the labelling page reports saved survives a crash of the machine, not only kill -9."""
    import os

    from ddpmseg import _io

    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(_io.os, "fsync", lambda fd: (events.append(f"fsync {os.readlink(f'/proc/self/fd/{fd}')}"),
                                                     real_fsync(fd))[1])
    monkeypatch.setattr(_io.os, "replace", lambda a, b: (events.append(f"replace {Path(b).name}"), real_replace(a, b))[1])
    _io.write_atomic(tmp_path / "x.txt", lambda t: t.write_text("new"))
    assert (tmp_path / "x.txt").read_text() == "new"
    assert len(events) == 3 and events[0].startswith(f"fsync {tmp_path}/.x.txt.") and events[0].endswith(".tmp")
    assert events[1:] == ["replace x.txt", f"fsync {tmp_path}"]


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


# --- legibility (issue 23 item 6): every label inside its picture, scales comparable, marks explained ---


def _inside(box: tuple[int, int, int, int], size: tuple[int, int]) -> bool:
    return box[0] >= 0 and box[1] >= 0 and box[2] <= size[0] and box[3] <= size[1]


def _texts(drawn: list) -> list:
    return [d for d in drawn if d.kind == "text"]


def test_wrap_text_fits_every_line_and_keeps_every_character() -> None:
    font = viz.load_font(12)
    text = "1. a_really_very_extremely_long_image_name_without_any_spaces_at_all_0001 (score 0.1234)"
    lines = viz.wrap_text(text, font, 100)
    assert len(lines) > 3 and all(viz._width(line, font) <= 100 for line in lines)
    assert "".join(lines).replace(" ", "") == text.replace(" ", "")
    assert viz.wrap_text("step 8, EMA 0.9999", font, 1000) == ["step 8, EMA 0.9999"]
    assert viz.wrap_text("a\nb", font, 1000) == ["a", "b"]


def test_suggest_contact_sheet_enlarges_small_images_and_fits_every_caption() -> None:
    from ddpmseg.active import suggest

    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)  # before: kept at 32 px, captions cut
    thumb, heat = suggest._thumb(small), suggest._thumb_map(rng.random((24, 32)))
    assert thumb.shape[:2] == (120, suggest.THUMB) and heat.shape == (120, suggest.THUMB)
    assert np.array_equal(thumb[:5, :5], np.broadcast_to(small[0, 0], (5, 5, 3)))  # nearest: pixels stay crisp
    assert suggest._thumb(rng.integers(0, 256, (400, 300, 3), dtype=np.uint8)).shape[:2] == (suggest.THUMB, 120)
    names = ["a_really_very_extremely_long_image_name_without_any_spaces_at_all_0001", "image_7", "x y z " * 12]
    rows = [((thumb, heat), name, 0.5 / (r + 1)) for r, name in enumerate(names)]
    with viz.record_drawing() as drawn:
        sheet = suggest._contact_sheet(rows, 1.0, "bald")
    cell_right = 6 + 2 * suggest.THUMB + 6  # the two thumbnails of a row and the gap between them
    captions = [d for d in _texts(drawn) if d.box[0] < cell_right]
    assert captions and all(d.box[2] <= cell_right for d in captions)  # no caption runs past its row's cell
    assert all(_inside(d.box, sheet.size) for d in _texts(drawn))
    said = "".join(d.text for d in captions).replace(" ", "")
    for r, name in enumerate(names):
        assert f"{r + 1}.{name.replace(' ', '')}" in said  # every name in full
    assert "baldscore0.5" in said


@pytest.mark.parametrize("k", [2, 4, 30])
def test_confusion_image_holds_its_title_and_every_name(k: int) -> None:
    names = ["background", "skin", "hair", "eye"][:k] if k <= 4 else [f"class {i}" for i in range(k)]
    cm = np.eye(k, dtype=int) * 90 + 5
    with viz.record_drawing() as drawn:
        img = viz.confusion_image(cm, names)
    texts = _texts(drawn)
    title = [d for d in texts if d.text == viz.CONFUSION_TITLE]
    assert len(title) == 1 and _inside(title[0].box, img.size)  # before: cut off at the right with 2 and 4 classes
    assert all(_inside(d.box, img.size) for d in texts)
    assert sum(d.text in names for d in texts) == 2 * k  # each name once per axis
    boxes = [d.box for d in texts]
    assert all(a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]  # no two texts overlap
               for i, a in enumerate(boxes) for b in boxes[i + 1:])


def test_uncertainty_maps_share_one_fixed_scale() -> None:
    vmax, title = viz.uncertainty_scale(4)
    assert vmax == pytest.approx(np.log(4)) and title == "uncertainty (nats)\n0 to ln 4 = 1.39"
    a = np.full((8, 8), 0.05)
    a[0, 0] = 0.37  # maxima 0.37 and 0.05: before, each drawn with its own scale
    b = np.full((8, 8), 0.05)
    ha, ta = viz.heatmap(a, vmax=vmax)
    hb, tb = viz.heatmap(b, vmax=vmax)
    assert ta == tb == vmax
    assert np.array_equal(ha[1, 1], hb[1, 1])  # the same value, the same colour
    assert not np.array_equal(viz.heatmap(a)[0][1, 1], viz.heatmap(b)[0][1, 1])  # the old per-map scale differs
    assert np.array_equal(viz.heatmap(np.full((2, 2), 9.0), vmax=vmax)[0][0, 0], viz.colormap(np.array(1.0)))
    with viz.record_drawing() as drawn:
        out = viz.with_colorbar(ha, ta, title)
    said = [d.text for d in _texts(drawn)]
    assert said[:2] == ["uncertainty (nats)", "0 to ln 4 = 1.39"] and "1.39" in said and "0" in said
    assert all(_inside(d.box, out.size) for d in _texts(drawn))
    with pytest.raises(DdpmsegError, match="at least 2 classes"):
        viz.uncertainty_scale(1)


def test_reliability_diagram_explains_its_marks_and_fades_near_empty_bins() -> None:
    n = 15
    conf = (np.arange(n) + 0.5) / n
    acc = conf.copy()
    count = np.zeros(n)
    count[5:] = 10_000
    count[-1] = 5  # under 0.1 % of the pixels: before, a full bar at 1.0 like any other
    acc[:5] = np.nan
    with viz.record_drawing() as drawn:
        img = viz.reliability_diagram(conf, acc, count, 0.0123)
    texts = _texts(drawn)
    said = " ".join(d.text for d in texts)
    for words in ("ECE 0.0123", "bar: accuracy", "red tick: the bin's mean confidence", "diagonal: perfect calibration",
                  "faint bar", "0.1 %", "share of all pixels in each bin", "confidence (top-1 mean softmax)",
                  "accuracy (share of pixels correct)"):
        assert words in said, words
    assert all(_inside(d.box, img.size) for d in texts)
    shares = [d.text for d in texts if d.text.endswith("%")]
    assert shares == ["0%"] * 5 + ["11%"] * 9 + ["0.0056%"]  # each bin's share of the pixels
    bars = {d.text: d for d in drawn if d.kind == "bar"}
    assert len(bars) == 10 and "bin 14 (faint)" in bars and "bin 13" in bars
    a = np.asarray(img).astype(int)
    centre = lambda b: a[(b.box[1] + b.box[3]) // 2 + 3, (b.box[0] + b.box[2]) // 2]  # noqa: E731
    assert centre(bars["bin 14 (faint)"]).sum() > centre(bars["bin 13"]).sum() + 200  # visibly lighter
    assert (centre(bars["bin 14 (faint)"]) > 200).all()


@pytest.mark.parametrize("n", [0, 1, 2, 200])
def test_loss_plot_is_readable_with_any_number_of_points(n: int) -> None:
    x = list(range(100, 100 * n + 1, 100))
    y = list(0.5 * np.exp(-np.arange(n) / 40) + 0.02)
    with viz.record_drawing() as drawn:
        img = viz.line_plot(x, y, "training loss", "step", log_y=True, ylabel="training loss (log scale)")
    texts = _texts(drawn)
    said = [d.text for d in texts]
    assert "training loss (log scale)" in said and "step" in said and "log" not in said  # before: "log" alone
    assert all(_inside(d.box, img.size) for d in texts)
    numbers = [d for d in texts if d.text.replace(",", "").replace(".", "").isdigit()]
    left_ticks = [d for d in numbers if d.box[2] < 64]
    assert len(left_ticks) >= 3 and len(numbers) - len(left_ticks) >= 3  # ticks with values on both axes
    assert len({d.text for d in left_ticks}) == len(left_ticks)  # no two ticks rounded to one label
    boxes = [d.box for d in texts]
    assert all(p[2] <= q[0] or q[2] <= p[0] or p[3] <= q[1] or q[3] <= p[1] for i, p in enumerate(boxes) for q in boxes[i + 1:])
    markers = [d for d in drawn if d.kind == "marker"]
    if n == 0:
        assert "no data yet" in said and not markers
    elif n == 1:  # before: a 2-px dot in the corner
        (m,) = markers
        w, h = img.size
        assert m.box[2] - m.box[0] >= 8 and w / 3 < (m.box[0] + m.box[2]) / 2 < 2 * w / 3
        assert h / 4 < (m.box[1] + m.box[3]) / 2 < 3 * h / 4
        assert any("at step 100" in t for t in said)
    elif n == 2:
        assert len(markers) == 2 and any(d.kind == "line" for d in drawn)
    else:
        assert not markers and any(d.kind == "line" for d in drawn)
        assert any(t == "20,000" for t in said)


@pytest.mark.parametrize("n, side", [(4, 16), (16, 64), (1, 300)])
def test_sample_sheet_enlarges_small_samples_and_says_what_they_are(n: int, side: int) -> None:
    imgs = np.random.default_rng(n).integers(0, 256, (n, side, side, 3), dtype=np.uint8)
    header = "step 8, EMA 0.9999, DDIM 4 steps"
    with viz.record_drawing() as drawn:
        sheet = viz.sample_sheet(imgs, header)
    assert sheet.width >= 256  # before: 4 samples of 16 px made a 38 px picture
    assert [d.text for d in _texts(drawn)] == [header] and _inside(drawn[0].box, sheet.size)
    a = np.asarray(sheet)
    f = (sheet.width - 2) // int(np.ceil(np.sqrt(n))) - 2
    assert f % side == 0 and (f // side == 1 or f < 256 + side)  # the smallest whole factor
    head = sheet.height - (int(np.ceil(n / np.ceil(np.sqrt(n)))) * (f + 2) + 2)
    first = a[head + 2 : head + 2 + f, 2 : 2 + f]
    assert np.array_equal(first, imgs[0].repeat(f // side, 0).repeat(f // side, 1))  # nearest neighbour


def test_anomaly_says_how_many_pixels_its_colour_scale_saturates(tiny_ckpt, eyes8, tmp_path, one_thread) -> None:
    from cli_helpers import ok
    from ddpmseg.anomaly.detect import anomaly_maps

    ckpt, flags = tiny_ckpt
    img = eyes8 / "image_0.jpg"
    args = dict(model_flags=flags, method="heal", start_steps=[50], sample_steps=2, device="cpu", save_maps=True)
    with viz.record_drawing() as drawn:
        s = anomaly_maps([img], ckpt, tmp_path / "a", vmax=0.01, **args)
    m = np.load(tmp_path / "a" / "image_0_anomaly.npy")
    assert s.vmax == 0.01 and s.above_vmax == pytest.approx(float(np.mean(m > 0.01))) and s.above_vmax > 0.01
    assert any(d.text == f"{100 * s.above_vmax:.2g} % of pixels" for d in drawn)  # on the picture's colour bar
    assert anomaly_maps([img], ckpt, tmp_path / "b", vmax=float(m.max()) + 1, **args).above_vmax == 0.0
    said = ok("anomaly", img, "--ckpt", ckpt, "--model-flags", flags, "--out", tmp_path / "c", "--method", "heal",
              "--start-steps", 50,
              "--sample-steps", 2, "--vmax", 0.01, "--device", "cpu")
    assert f"{100 * s.above_vmax:.2g} % of map pixels above --vmax 0.01" in said and "raise --vmax" in said
    said = ok("anomaly", img, "--ckpt", ckpt, "--model-flags", flags, "--out", tmp_path / "d", "--method", "heal",
              "--start-steps", 50,
              "--sample-steps", 2, "--vmax", 100, "--device", "cpu")
    assert "above --vmax" not in said
