"""Tests for ddpmseg.data: images, masks, label sets, preprocessing, synthetic data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddpmseg import data
from ddpmseg.demo import make_synthetic_dataset
from ddpmseg.errors import DdpmsegError

from shared_data import EYES8 as EYES, FASSEG, LABELSETS, needs_fasseg, needs_labelsets


def _rgb(h: int = 20, w: int = 30, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# -- load_rgb --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "mode,make,expected",
    [
        ("RGB", lambda: Image.new("RGB", (6, 4), (10, 200, 30)), (10, 200, 30)),
        ("RGBA-opaque", lambda: Image.new("RGBA", (6, 4), (10, 200, 30, 255)), (10, 200, 30)),
        ("RGBA-transparent", lambda: Image.new("RGBA", (6, 4), (10, 200, 30, 0)), (255, 255, 255)),
        ("L", lambda: Image.new("L", (6, 4), 77), (77, 77, 77)),
        ("LA", lambda: Image.new("LA", (6, 4), (77, 255)), (77, 77, 77)),
        ("1", lambda: Image.new("1", (6, 4), 1), (255, 255, 255)),
    ],
)
def test_load_rgb_modes(tmp_path: Path, mode: str, make, expected) -> None:
    p = tmp_path / f"{mode}.png"
    make().save(p)
    rgb = data.load_rgb(p)
    assert rgb.shape == (4, 6, 3) and rgb.dtype == np.uint8
    assert (rgb == np.array(expected, dtype=np.uint8)).all()


def test_load_rgb_palette(tmp_path: Path) -> None:
    im = Image.fromarray(np.array([[0, 1], [2, 1]], dtype=np.uint8), "L").convert("P")
    im.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (253 * 3))
    im.save(tmp_path / "p.png")
    rgb = data.load_rgb(tmp_path / "p.png")
    assert rgb[0, 0].tolist() == [255, 0, 0] and rgb[0, 1].tolist() == [0, 255, 0] and rgb[1, 0].tolist() == [0, 0, 255]


@pytest.mark.parametrize("value,expected", [(0, 0), (257, 1), (32896, 128), (65535, 255), (1000, 4)])
def test_load_rgb_16bit(tmp_path: Path, value: int, expected: int) -> None:
    a = np.full((5, 7), value, dtype=np.uint16)
    a[0, 0] = 65535  # a 16-bit range image
    p = tmp_path / "g16.png"
    Image.fromarray(a).save(p)
    assert Image.open(p).mode.startswith("I")
    rgb = data.load_rgb(p)
    assert rgb.shape == (5, 7, 3)
    assert rgb[0, 0].tolist() == [255, 255, 255]
    assert (rgb[1:, 1:] == expected).all()


def test_load_rgb_cmyk_and_jpeg(tmp_path: Path) -> None:
    Image.new("CMYK", (8, 8), (0, 0, 0, 0)).save(tmp_path / "c.jpg")
    rgb = data.load_rgb(tmp_path / "c.jpg")
    assert rgb.shape == (8, 8, 3) and rgb.min() > 240


def test_load_rgb_exif_orientation(tmp_path: Path) -> None:
    im = Image.new("RGB", (10, 4), (0, 0, 0))
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 CW on display
    im.save(tmp_path / "o.jpg", exif=exif)
    assert data.load_rgb(tmp_path / "o.jpg").shape == (10, 4, 3)


@pytest.mark.parametrize("fmt", ["png", "jpg"])
def test_load_rgb_truncated(tmp_path: Path, fmt: str) -> None:
    p = tmp_path / f"t.{fmt}"
    Image.fromarray(_rgb(64, 64)).save(p)
    raw = p.read_bytes()
    p.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DdpmsegError, match=r"cannot read image .*t\." + fmt):
        data.load_rgb(p)


def test_load_rgb_not_an_image(tmp_path: Path) -> None:
    p = tmp_path / "notes.png"
    p.write_text("hello, I am text")
    with pytest.raises(DdpmsegError, match="cannot read image") as e:
        data.load_rgb(p)
    assert "\n" not in str(e.value) and "notes.png" in str(e.value)
    with pytest.raises(DdpmsegError, match="not found"):
        data.load_rgb(tmp_path / "missing.png")


# -- list_images / natural sort ------------------------------------------------------------
def test_natural_key() -> None:
    names = ["image_10.png", "image_2.png", "image_1.png", "Image_3.png", "a.png"]
    assert sorted(names, key=data.natural_key) == ["a.png", "image_1.png", "image_2.png", "Image_3.png", "image_10.png"]


def test_list_images(tmp_path: Path) -> None:
    for n in ["image_10.jpg", "image_2.png", "image_1.webp", "notes.txt", "image_mask1.npy"]:
        (tmp_path / n).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "deep.png").write_bytes(b"x")
    got = data.list_images([tmp_path])
    assert [p.name for p in got] == ["image_1.webp", "image_2.png", "image_10.jpg"]
    # files as given, in order; the same file twice is kept once
    got = data.list_images([tmp_path / "image_10.jpg", str(tmp_path / "image_2.png"), tmp_path / "image_10.jpg"])
    assert [p.name for p in got] == ["image_10.jpg", "image_2.png"]


def test_list_images_errors(tmp_path: Path) -> None:
    with pytest.raises(DdpmsegError, match="does not exist"):
        data.list_images([tmp_path / "nope.png"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DdpmsegError, match="no images found"):
        data.list_images([tmp_path / "empty"])
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.png").write_bytes(b"x")
    (tmp_path / "x.jpg").write_bytes(b"x")
    with pytest.raises(DdpmsegError, match="share the id 'x'"):
        data.list_images([tmp_path / "a", tmp_path / "x.jpg"])


# -- preprocessing --------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["resize", "crop"])
@pytest.mark.parametrize("side,size", [(256, 256), (100, 64), (40, 64)])
def test_preprocess_square_matches_reference(mode: str, side: int, size: int) -> None:
    rgb = _rgb(side, side, seed=side)
    x, pre = data.preprocess_image(rgb, size, mode)
    ref = np.array(Image.fromarray(rgb).resize((size, size), Image.BILINEAR)) / 127.5 - 1
    ref = torch.from_numpy(ref.astype(np.float32)).permute(2, 0, 1)[None]
    assert x.dtype == torch.float32 and x.shape == (1, 3, size, size)
    assert torch.equal(x, ref)
    assert pre.crop_box == (0, 0, size, size) and pre.original_size == (side, side)


def test_preprocess_non_square_shapes() -> None:
    rgb = _rgb(120, 60)  # H=120, W=60
    x, pre = data.preprocess_image(rgb, 32, "resize")
    assert x.shape == (1, 3, 32, 32) and pre.resized_size == (32, 32) and pre.crop_box == (0, 0, 32, 32)
    x, pre = data.preprocess_image(rgb, 32, "crop")
    assert x.shape == (1, 3, 32, 32)
    assert pre.resized_size == (32, 64) and pre.crop_box == (0, 16, 32, 48) and pre.original_size == (60, 120)
    # the crop equals the centre of the short-side resize
    full = np.array(Image.fromarray(rgb).resize((32, 64), Image.BILINEAR))[16:48] / 127.5 - 1
    assert np.array_equal(x[0].permute(1, 2, 0).numpy(), full.astype(np.float32))
    assert -1 <= x.min() and x.max() <= 1


def test_preprocess_errors() -> None:
    with pytest.raises(DdpmsegError, match="unknown"):
        data.preprocess_image(_rgb(), 32, "squash")
    with pytest.raises(DdpmsegError):
        data.preprocess_image(_rgb().astype(np.float32), 32)


@pytest.mark.parametrize("mode", ["resize", "crop"])
def test_preprocess_dict_round_trip(mode: str) -> None:
    _, pre = data.preprocess_image(_rgb(50, 80), 32, mode)
    d = json.loads(json.dumps(pre.to_dict()))
    assert data.Preprocess.from_dict(d) == pre
    with pytest.raises(DdpmsegError):
        data.Preprocess.from_dict({"mode": "resize"})


@pytest.mark.parametrize("mode", ["resize", "crop"])
@pytest.mark.parametrize("w,h,s", [(60, 120, 32), (300, 90, 64), (64, 64, 32), (20, 30, 64)])
def test_prepare_restore_round_trip(mode: str, w: int, h: int, s: int) -> None:
    # a blocky label map (blocks larger than the scale factor) survives a round trip
    yy, xx = np.mgrid[0:h, 0:w]
    mask = ((yy // 15) * 7 + (xx // 15)) % 256
    mask[0, 0] = 255
    pre = data.Preprocess.plan((w, h), s, mode)
    small = data.prepare_mask(mask, pre)
    assert small.shape == (s, s) and small.dtype == np.int64
    assert set(np.unique(small)) <= set(np.unique(mask))  # nearest: no blended labels
    back = data.restore_labels(small, pre, fill=254)
    assert back.shape == (h, w)
    covered = back != 254
    if mode == "resize" or w == h:
        assert covered.all()
    else:
        assert 0 < covered.mean() < 1
        assert (back[~covered] == 254).all()
    # inside the covered region, restored labels agree with the original except at block edges
    agree = (back == mask)[covered].mean()
    assert agree > 0.85


def test_restore_labels_exact_on_upsampling() -> None:
    # S -> original by an integer factor and back is the identity
    pre = data.Preprocess.plan((64, 128), 32, "resize")
    small = np.random.default_rng(0).integers(0, 5, (32, 32))
    assert np.array_equal(data.prepare_mask(data.restore_labels(small, pre), pre), small)
    pre = data.Preprocess.plan((32, 64), 32, "crop")
    back = data.restore_labels(small, pre)
    assert (back[:16] == 255).all() and (back[48:] == 255).all()
    assert np.array_equal(back[16:48], small)


@pytest.mark.parametrize("mode", ["resize", "crop"])
def test_restore_map(mode: str) -> None:
    pre = data.Preprocess.plan((40, 80), 16, mode)
    const = np.full((16, 16), 0.7, dtype=np.float32)
    out = data.restore_map(const, pre, fill=-1.0)
    assert out.shape == (80, 40) and out.dtype == np.float32
    inside = out != -1.0
    assert np.allclose(out[inside], 0.7)
    assert inside.all() if mode == "resize" else (0 < inside.mean() < 1)
    ramp = np.tile(np.linspace(0, 1, 16, dtype=np.float32), (16, 1))
    r = data.restore_map(ramp, pre)
    assert np.all(np.diff(r[40]) >= -1e-6) and r.min() >= 0 and r.max() <= 1  # bilinear: monotone, no overshoot
    assert data.restore_map(np.stack([const, ramp]), pre).shape == (2, 80, 40)


def test_prepare_mask_wrong_size() -> None:
    pre = data.Preprocess.plan((40, 80), 16)
    with pytest.raises(DdpmsegError, match="40x80"):
        data.prepare_mask(np.zeros((40, 40), dtype=np.int64), pre)


# -- masks ----------------------------------------------------------------------------------
def test_eyes8_mask_lookup() -> None:
    images = data.list_images([EYES])
    assert [p.stem for p in images] == [f"image_{i}" for i in range(8)]
    for p in images:
        m = data.find_mask(p.stem, EYES)
        assert m is not None and m.name == f"image_mask{p.stem.split('_')[1]}.npy"
        rgb = data.load_rgb(p)
        mask = data.load_mask(m, expected_size=(rgb.shape[1], rgb.shape[0]))
        assert mask.shape == (256, 256) and mask.dtype == np.int64
        data.check_labels(mask, 4)
    assert set(np.unique(data.load_mask(EYES / "image_mask0.npy"))) == {0, 1, 2, 3}


def test_find_mask_order(tmp_path: Path) -> None:
    assert data.find_mask("a", tmp_path) is None
    (tmp_path / "a.png").write_bytes(b"x")
    assert data.find_mask("a", tmp_path).name == "a.png"
    assert data.find_mask("a", tmp_path, image_path=tmp_path / "a.png") is None
    (tmp_path / "a.npy").write_bytes(b"x")
    assert data.find_mask("a", tmp_path).name == "a.npy"
    (tmp_path / "image_mask12.npy").write_bytes(b"x")
    assert data.find_mask("image_12", tmp_path).name == "image_mask12.npy"
    assert data.find_mask("image_1", tmp_path) is None


@needs_fasseg
def test_fasseg_colour_masks() -> None:
    labelset = data.load_label_set(str(FASSEG / "classes.csv"))
    assert labelset.n_classes == 6
    for name in ["001.png", "002.png", "014.png", "020.png"]:
        path = FASSEG / "train" / "labels" / name
        raw = np.array(Image.open(path).convert("RGB"))
        pal = labelset.palette()
        on_palette = (raw[:, :, None, :] == pal[None, None]).all(-1).any(-1)
        assert 0.005 < 1 - on_palette.mean() < 0.05  # the data really has off-palette border pixels
        img = data.load_rgb(FASSEG / "train" / "images" / name)
        mask = data.load_mask(path, labelset, expected_size=(img.shape[1], img.shape[0]))
        assert mask.shape == img.shape[:2]
        assert set(np.unique(mask)) == set(range(6))
        # exact palette pixels keep their class
        exact = (raw[:, :, None, :] == pal[None, None]).all(-1)
        assert np.array_equal(mask[on_palette], exact[on_palette].argmax(-1))


def _colour_mask(tmp_path: Path, patch_colour, patch: int) -> Path:
    a = np.zeros((40, 40, 3), dtype=np.uint8)
    a[:, :20] = (255, 0, 0)
    a[:, 20:] = (0, 0, 255)
    a[:, 19:21] = (128, 128, 128)  # a 2-px anti-aliased border far from both colours
    a[5:5 + patch, 5:5 + patch] = patch_colour
    p = tmp_path / "cm.png"
    Image.fromarray(a).save(p)
    return p


def test_colour_mask_border_and_far_colour(tmp_path: Path) -> None:
    ls = data.LabelSet("rb", ("red", "blue"), ((255, 0, 0), (0, 0, 255)))
    m = data.load_mask(_colour_mask(tmp_path, (230, 30, 20), 6), ls)  # near red: fine
    assert (m[:, :19] == 0).all() and (m[:, 21:] == 1).all() and set(np.unique(m[:, 19:21])) <= {0, 1}
    with pytest.raises(DdpmsegError, match=r"match no class.*\(0, 255, 0\).*--classes") as e:
        data.load_mask(_colour_mask(tmp_path, (0, 255, 0), 10), ls)
    assert "cm.png" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(DdpmsegError, match="pass --classes"):
        data.load_mask(_colour_mask(tmp_path, (0, 255, 0), 10))  # no label set


@pytest.mark.parametrize("mode", ["L", "P", "I;16"])
def test_index_png_masks(tmp_path: Path, mode: str) -> None:
    a = np.random.default_rng(0).integers(0, 5, (12, 9)).astype(np.uint8)
    a[0, 0] = 255
    if mode == "P":
        im = Image.fromarray(a, "L").convert("P")
        im.putpalette(list(range(256)) * 3)  # colours unrelated to the indices
    elif mode == "I;16":
        im = Image.fromarray(a.astype(np.uint16))
    else:
        im = Image.fromarray(a, "L")
    im.save(tmp_path / "m.png")
    m = data.load_mask(tmp_path / "m.png", expected_size=(9, 12))
    assert m.dtype == np.int64 and np.array_equal(m, a.astype(np.int64))


def test_grey_rgb_png_as_indices(tmp_path: Path) -> None:
    a = np.random.default_rng(1).integers(0, 3, (10, 10)).astype(np.uint8)
    Image.fromarray(np.repeat(a[..., None], 3, axis=2)).save(tmp_path / "g.png")
    assert np.array_equal(data.load_mask(tmp_path / "g.png"), a)
    ls = data.LabelSet.default(3)
    assert np.array_equal(data.load_mask(tmp_path / "g.png", ls), a)


@pytest.mark.parametrize(
    "array,match",
    [
        (np.full((4, 4), 1.5), "non-integer"),
        (np.zeros((4, 4, 3), dtype=np.uint8), "shape"),
        (np.full((4, 4), -1), "negative"),
        (np.array(["a", "b"]), "shape|dtype"),
    ],
)
def test_bad_npy_masks(tmp_path: Path, array: np.ndarray, match: str) -> None:
    np.save(tmp_path / "m.npy", array)
    with pytest.raises(DdpmsegError, match=match):
        data.load_mask(tmp_path / "m.npy")


def test_npy_mask_variants(tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", np.ones((3, 4, 1), dtype=np.uint8))
    assert data.load_mask(tmp_path / "a.npy").shape == (3, 4)
    np.save(tmp_path / "b.npy", np.full((3, 4), 2.0))
    assert (data.load_mask(tmp_path / "b.npy") == 2).all()
    (tmp_path / "c.npy").write_bytes(b"garbage")
    with pytest.raises(DdpmsegError, match="cannot read mask"):
        data.load_mask(tmp_path / "c.npy")
    (tmp_path / "d.png").write_text("text")
    with pytest.raises(DdpmsegError, match="cannot read mask"):
        data.load_mask(tmp_path / "d.png")


def test_mask_wrong_size(tmp_path: Path) -> None:
    np.save(tmp_path / "m.npy", np.zeros((30, 20), dtype=np.uint8))
    with pytest.raises(DdpmsegError, match=r"m\.npy is 20x30 but its image is 40x30"):
        data.load_mask(tmp_path / "m.npy", expected_size=(40, 30))


def test_check_labels() -> None:
    data.check_labels(np.array([[0, 1], [2, 255]]), 3)
    with pytest.raises(DdpmsegError, match=r"values 3, 7 outside the valid range 0\.\.2") as e:
        data.check_labels(np.array([[0, 3], [7, 255]]), 3, path="x.npy")
    assert "x.npy" in str(e.value)
    with pytest.raises(DdpmsegError, match="255"):
        data.check_labels(np.array([[0, 255]]), 3, ignore_index=-1)


@pytest.mark.parametrize("count,kept", [(19, False), (20, True), (21, True)])
def test_min_pixels(count: int, kept: bool) -> None:
    m = np.zeros((10, 10), dtype=np.int64)
    m.flat[:count] = 2
    m.flat[50:53] = 255
    out = data.apply_min_pixels(m, 20, 255)
    assert bool((out == 2).sum() == count) == kept
    assert ((out == 255).sum() == 3 + (0 if kept else count))
    assert (m == 2).sum() == count  # input untouched


# -- label sets -----------------------------------------------------------------------------
SHIPPED = ["ffhq_34", "bedroom_28", "cat_15", "horse_21", "celeba_19", "ade_bedroom_30"]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_label_sets(name: str) -> None:
    assert name in data.list_label_sets()
    ls = data.load_label_set(name)
    k = int(name.rsplit("_", 1)[1])  # the number of scored classes, as the paper counts them
    ignore = 0 if name == "bedroom_28" else 255  # the reference: number_class 29, ignore_label 0 for bedroom
    assert ls.ignore_index == ignore and ls.n_scored == k
    n = k + (ignore == 0)
    assert ls.n_classes == n and len(ls.names) == n and ls.palette().shape == (n, 3)
    assert ls.palette().dtype == np.uint8 and ls.name == name
    assert data.load_label_set(f"{name}.csv") == ls


@needs_labelsets
@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_label_sets_match_the_projects_source(name: str) -> None:
    ls = data.load_label_set(name)
    source = LABELSETS / f"{name}.csv"  # the project's source of the paper's label sets
    rows = [line.split(",") for line in source.read_text().splitlines()[1:] if line.strip()]
    assert [r[1] for r in rows] == list(ls.names)
    assert [tuple(int(v) for v in r[2:]) for r in rows] == list(ls.colors)


@pytest.mark.parametrize("ignore", [255, 0])
def test_label_set_csv_round_trip(tmp_path: Path, ignore: int) -> None:
    ls = data.LabelSet("mine", ("bg", "a, with comma", "b"), ((0, 0, 0), (1, 2, 3), (255, 255, 255)), ignore)
    ls.to_csv(tmp_path / "mine.csv")
    text = (tmp_path / "mine.csv").read_text()
    assert text.startswith("index,name,r,g,b\n" if ignore == 255 else "# ignore_index=0\nindex,name,r,g,b\n")
    assert data.load_label_set(str(tmp_path / "mine.csv")) == ls
    d = data.LabelSet.default(5)
    assert d.names[4] == "class_4" and len(set(d.colors)) == 5


@pytest.mark.parametrize(
    "text,match",
    [
        ("id,name,r,g,b\n0,a,1,2,3\n", "header"),
        ("index,name,r,g,b\n0,a,1,2,3\n2,b,1,2,3\n", "without gaps"),
        ("index,name,r,g,b\n0,a,1,2,300\n", "0..255"),
        ("index,name,r,g,b\n0,a,1,2\n", "fields"),
        ("index,name,r,g,b\n0,a,x,2,3\n", "non-integer"),
        ("index,name,r,g,b\n0,a,1,2,3\n0,b,1,2,3\n", "repeats"),
        ("index,name,r,g,b\n", "no classes"),
    ],
)
def test_bad_label_csv(tmp_path: Path, text: str, match: str) -> None:
    p = tmp_path / "bad.csv"
    p.write_text(text)
    with pytest.raises(DdpmsegError, match=match) as e:
        data.load_label_set(str(p))
    assert "bad.csv" in str(e.value)


def test_unknown_label_set() -> None:
    with pytest.raises(DdpmsegError, match="ffhq_34"):
        data.load_label_set("no_such_set")


# -- synthetic dataset ----------------------------------------------------------------------
def test_synthetic_dataset(tmp_path: Path) -> None:
    ls = make_synthetic_dataset(tmp_path / "a", n_images=3, size=48, seed=3)
    make_synthetic_dataset(tmp_path / "b", n_images=3, size=48, seed=3)
    make_synthetic_dataset(tmp_path / "c", n_images=3, size=48, seed=4)
    assert ls.names == ("background", "disc", "square")
    assert data.load_label_set(str(tmp_path / "a" / "classes.csv")).colors == ls.colors
    images = data.list_images([tmp_path / "a"])
    assert [p.name for p in images] == ["shape_0.png", "shape_1.png", "shape_2.png"]
    for p in images:
        rgb = data.load_rgb(p)
        mask = data.load_mask(data.find_mask(p.stem, p.parent), ls, expected_size=(48, 48))
        assert rgb.shape == (48, 48, 3) and set(np.unique(mask)) == {0, 1, 2}
        assert min(np.bincount(mask.ravel())) >= 20
        # a real (easy) task: classes differ in colour, and the background is textured
        means = [rgb[mask == c].mean(0) for c in range(3)]
        assert means[1][0] > means[1][2] and means[2][2] > means[2][0]
        assert rgb[mask == 0].std() > 10
        same = tmp_path / "b" / p.name
        assert np.array_equal(rgb, data.load_rgb(same))
        assert np.array_equal(mask, data.load_mask(tmp_path / "b" / f"{p.stem}.npy"))
    assert not np.array_equal(data.load_rgb(tmp_path / "a" / "shape_0.png"), data.load_rgb(tmp_path / "c" / "shape_0.png"))
