"""Catalogue of bad and odd inputs, run through the CLI, each with its expected outcome.

Supported inputs succeed. Unsupported ones exit non-zero with ONE line on stderr
starting "ddpmseg: error:" that names the file and the fix, with no traceback
(``--debug`` shows one), and leave no half-written output. Also: Ctrl-C during
extract, validation before expensive work, and bit-for-bit reproducibility.
(tests/test_bad_inputs.py holds the older cases; none is repeated here.)
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from ddpmseg.backbones.adm import random_unet
from ddpmseg.backbones import AdmConfig
from ddpmseg.heads.mlp import PixelEnsemble
from ddpmseg.cli.main import main
from cli_helpers import fails, ok
from ddpmseg.features.cache import FeatureCache, parts_dir

FIT = ("--ensemble", "2", "--max-epochs", "1")
EYES_CSV = "index,name,r,g,b\n0,bg,0,0,0\n1,sclera,255,255,255\n2,iris,0,0,255\n3,pupil,255,0,0\n"
EYES_PALETTE = np.array([[0, 0, 0], [255, 255, 255], [0, 0, 255], [255, 0, 0]], np.uint8)


# -- helpers ------------------------------------------------------------------------
pytestmark = pytest.mark.usefixtures("one_thread")


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(eyes_world):
    """Three labelled eyes, their cache and a model fitted on them (conftest's eyes_world)."""
    return eyes_world


def extract_args(tiny_ckpt, images, out, ckpt=None):
    return ["extract", "--ckpt", ckpt or tiny_ckpt[0], "--model-flags", tiny_ckpt[1], "--images", images, "--out", out]


def fit_args(world, masks, out, *extra):
    d, _ = world
    return ["fit", "--features", d / "feats.h5", "--masks", masks, *FIT, "--out", out, *extra]


def eye_masks(world, folder: Path, make) -> Path:
    """A mask folder: ``make(i, label_map, folder)`` returns the array to save as image_{i}.npy, or None."""
    folder.mkdir()
    for i in range(3):
        a = make(i, np.load(world[1] / f"image_mask{i}.npy"), folder)
        if a is not None:
            np.save(folder / f"image_{i}.npy", a)
    return folder


def colour_png(i, a, folder, far=False):
    rgb = EYES_PALETTE[a]
    if far and i == 2:
        rgb[:40, :40] = (0, 255, 0)  # a solid patch of a colour no class has
    Image.fromarray(rgb).save(folder / f"image_{i}.png")


# -- images given to extract: unreadable -> error, nothing written --------------------
def _bad_image(kind: str, folder: Path) -> Path:
    path = folder / f"{kind}.png"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(folder / "full.png")
        path.write_bytes((folder / "full.png").read_bytes()[:2000])
    elif kind == "npy_named_png":
        np.save(folder / "arr.npy", np.zeros((8, 8)))
        path.write_bytes((folder / "arr.npy").read_bytes())
    return path  # "missing": never created


@pytest.mark.parametrize("kind,reason", [
    ("missing", "does not exist"),
    ("empty", "cannot identify image file"),
    ("truncated", "truncated"),
    ("npy_named_png", "cannot identify image file"),
])  # fmt: skip
def test_unreadable_image_is_refused(tmp_path, tiny_ckpt, kind, reason):
    path = _bad_image(kind, tmp_path)
    out = tmp_path / "f.h5"
    fails(*extract_args(tiny_ckpt, path, out), match=(path.name, reason))
    assert not out.exists() and not parts_dir(out).exists()


# -- odd images: supported, predictions at the original size -------------------------
def _odd_images(folder: Path, eyes8: Path) -> dict[str, tuple[int, int]]:
    """Write the odd images; returns id -> (W, H)."""
    rgb = np.asarray(Image.open(eyes8 / "image_0.jpg").convert("RGB"))
    Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 128, np.uint8)]), "RGBA").save(folder / "rgba.png")
    Image.fromarray(rgb[..., 0]).save(folder / "grey.png")
    Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE).save(folder / "palette.png")
    Image.fromarray(rgb[..., 1].astype(np.uint16) * 257).save(folder / "sixteen_bit.png")
    Image.fromarray(rgb[100:108, 100:108].copy()).save(folder / "tiny_8x8.png")
    ramp = np.linspace(0, 255, 6000).astype(np.uint8)
    huge = np.broadcast_to(ramp[None, :, None], (4000, 6000, 3)).copy()
    huge[1000:3000, 2000:4000] = (200, 30, 30)
    Image.fromarray(huge).save(folder / "huge_6000x4000.png", compress_level=1)
    shutil.copy(eyes8 / "image_1.jpg", folder / "jpeg_named.png")  # content decides, not the suffix
    modes = {p.stem: Image.open(p).mode for p in folder.iterdir()}
    assert modes["sixteen_bit"].startswith("I;16") and modes["palette"] == "P" and modes["grey"] == "L"
    return {p.stem: Image.open(p).size for p in folder.iterdir()}


@pytest.fixture(scope="module")
def odd(world, tiny_ckpt, eyes8, tmp_path_factory):
    """The odd images extracted into a cache and predicted with the world's model."""
    d = tmp_path_factory.mktemp("odd")
    images = d / "images"
    images.mkdir()
    sizes = _odd_images(images, eyes8)
    out = ok(*extract_args(tiny_ckpt, images, d / "feats.h5"))
    ok("predict", images, "--model", world[0] / "model", "--out", d / "preds")
    assert f"{len(sizes)} new, 0 already cached" in out
    return d, sizes


ODD_IDS = ["rgba", "grey", "palette", "sixteen_bit", "tiny_8x8", "huge_6000x4000", "jpeg_named"]


@pytest.mark.parametrize("image_id", ODD_IDS)
def test_odd_image_is_extracted_and_predicted_at_original_size(odd, image_id):
    d, sizes = odd
    with FeatureCache(d / "feats.h5") as cache:
        assert cache.preprocess(image_id)["original_size"] == list(sizes[image_id])
        assert torch.isfinite(cache.pixel_features(image_id)).all()
    w, h = sizes[image_id]
    assert Image.open(d / "preds" / f"{image_id}_labels.png").size == (w, h)
    for kind in ("overlay", "uncertainty"):  # the picture at the original size, its legend / colour bar beside it
        pw, ph = Image.open(d / "preds" / f"{image_id}_{kind}.png").size
        # the panel holds the legend, or the colour bar's three title lines (unit, fixed range, the image's max)
        assert w < pw <= w + max(170, w // 2) and ph >= h


# -- masks given to fit ---------------------------------------------------------------
def test_float_mask_with_fractions_is_refused(world, tmp_path):
    masks = eye_masks(world, tmp_path / "masks", lambda i, a, f: a + (0.5 if i == 1 else 0.0))
    fails(*fit_args(world, masks, tmp_path / "m"), match=("image_1.npy", "non-integer", "integer array"))
    assert not (tmp_path / "m").exists()


def test_integer_valued_float_mask_is_accepted(world, tmp_path):
    masks = eye_masks(world, tmp_path / "masks", lambda i, a, f: a.astype(np.float32))
    assert "3 images" in ok(*fit_args(world, masks, tmp_path / "m"))


def test_image_without_mask_is_left_out_of_fit(world, tmp_path):
    masks = eye_masks(world, tmp_path / "masks", lambda i, a, f: None if i == 1 else a)
    assert "2 images" in ok(*fit_args(world, masks, tmp_path / "m"))
    assert json.loads((tmp_path / "m" / "model.json").read_text())["fit"]["images"] == ["image_0", "image_2"]


def test_no_mask_for_any_image_is_refused(world, tmp_path):
    masks = eye_masks(world, tmp_path / "masks", lambda i, a, f: None)
    fails(*fit_args(world, masks, tmp_path / "m"), match=(str(masks), "no mask", "image_mask{i}.npy"))


@pytest.mark.parametrize("labels", [3, 0])
def test_labels_beyond_the_labelled_subset_is_refused(world, tmp_path, labels):
    masks = eye_masks(world, tmp_path / "masks", lambda i, a, f: None if i == 1 else a)  # 3 images, 2 labelled
    fails(*fit_args(world, masks, tmp_path / "m", "--labels", labels),
          match=(f"--labels {labels}", "2 labelled images", "use 1..2"))  # fmt: skip


def test_all_ignored_masks_are_refused_naming_the_folder(world, tmp_path):
    masks = eye_masks(world, tmp_path / "masks", lambda i, a, f: np.full_like(a, 255))
    fails(*fit_args(world, masks, tmp_path / "m"), match=(str(masks), "fewer than two pixels"))


def test_colour_masks_matching_the_classes_csv_are_accepted(world, tmp_path):
    (tmp_path / "eyes.csv").write_text(EYES_CSV)
    masks = eye_masks(world, tmp_path / "masks", colour_png)
    assert "4 classes" in ok(*fit_args(world, masks, tmp_path / "m", "--classes", tmp_path / "eyes.csv"))


def test_colour_mask_far_from_the_palette_is_refused(world, tmp_path):
    (tmp_path / "eyes.csv").write_text(EYES_CSV)
    masks = eye_masks(world, tmp_path / "masks", lambda i, a, f: colour_png(i, a, f, far=True))
    fails(*fit_args(world, masks, tmp_path / "m", "--classes", tmp_path / "eyes.csv"),
          match=("image_2.png", "(0, 255, 0)", "--classes"))  # fmt: skip


# -- checkpoints ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def state(tiny_ckpt):
    return torch.load(tiny_ckpt[0], weights_only=True)


@pytest.mark.parametrize("wrap", ["state_dict", "model", "module_prefix"])
def test_wrapped_checkpoint_is_accepted_with_the_same_features(world, tiny_ckpt, state, tmp_path, wrap):
    obj = {"module." + k: v for k, v in state.items()} if wrap == "module_prefix" else {wrap: state}
    torch.save(obj, tmp_path / "wrapped.pt")
    out = tmp_path / "f.h5"
    ok(*extract_args(tiny_ckpt, world[1] / "image_0.jpg", out, ckpt=tmp_path / "wrapped.pt"))
    with FeatureCache(out) as new, FeatureCache(world[0] / "feats.h5") as ref:
        a, b = new.block_maps("image_0"), ref.block_maps("image_0")
        assert all(np.array_equal(a[k], b[k]) for k in ref.keys)


def _bad_checkpoint(kind: str, folder: Path, tiny_ckpt, state, tiny_flags) -> Path:
    path = folder / f"{kind}.pt"
    if kind == "truncated":
        data = tiny_ckpt[0].read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "not_torch":
        path.write_text("this is not a checkpoint\n" * 50)
    elif kind == "other_architecture":
        torch.save(random_unet(AdmConfig.from_flags(dict(tiny_flags, num_channels=64))).state_dict(), path)
    elif kind == "ambiguous":
        torch.save({"model": state, "ema": state}, path)
    return path


@pytest.mark.parametrize("kind,reason", [
    ("truncated", "download it again"),
    ("not_torch", "not a readable torch file"),
    ("other_architecture", "does not fit"),
    ("ambiguous", "torch.save(ckpt[KEY], PATH)"),
])  # fmt: skip
def test_bad_checkpoint_is_refused(world, tiny_ckpt, state, tiny_flags, tmp_path, kind, reason):
    path = _bad_checkpoint(kind, tmp_path, tiny_ckpt, state, tiny_flags)
    out = tmp_path / "f.h5"
    fails(*extract_args(tiny_ckpt, world[1], out, ckpt=path), match=(path.name, reason))
    assert not out.exists()


# -- options --------------------------------------------------------------------------
@pytest.mark.parametrize("opt,value,match", [
    ("--steps", "50,150,50", "duplicated step"),
    ("--batch-size", "-1", "--batch-size must be 0"),
    ("--precision", "fp16", "--precision fp16 is for CUDA"),
])  # fmt: skip
def test_bad_extract_option_is_refused(world, tiny_ckpt, tmp_path, opt, value, match):
    out = tmp_path / "f.h5"
    fails(*extract_args(tiny_ckpt, world[1], out), opt, value, match=(match,))
    assert not out.exists() and not parts_dir(out).exists()


def test_duplicated_blocks_in_kmeans_are_refused(world, tiny_ckpt, tmp_path):
    fails("kmeans", world[1] / "image_0.jpg", "--ckpt", tiny_ckpt[0], "--model-flags", tiny_ckpt[1],
          "--blocks", "12,5,12", "--out", tmp_path / "k.png", match=("duplicated block", "list each once"))  # fmt: skip
    assert not (tmp_path / "k.png").exists()


# -- caches ---------------------------------------------------------------------------
def test_extract_into_a_cache_of_another_checkpoint_is_refused(world, tiny_ckpt, tiny_config, tmp_path):
    d, imgs = world
    other = tmp_path / "other.pt"
    torch.save(random_unet(tiny_config, seed=1).state_dict(), other)
    before = (d / "feats.h5").read_bytes()
    fails(*extract_args(tiny_ckpt, imgs, d / "feats.h5", ckpt=other),
          match=(str(d / "feats.h5"), "other.pt", "use a new --out file"))  # fmt: skip
    assert (d / "feats.h5").read_bytes() == before
    assert not parts_dir(d / "feats.h5").exists()


def test_extract_into_a_non_hdf5_file_is_refused_and_keeps_it(world, tiny_ckpt, tmp_path):
    out = tmp_path / "notes.h5"
    out.write_text("my notes")
    fails(*extract_args(tiny_ckpt, world[1], out), match=("notes.h5", "HDF5", "--out"))
    assert out.read_text() == "my notes"


def test_features_given_as_a_folder_is_refused(world, tmp_path):
    fails("fit", "--features", world[1], "--masks", world[1], *FIT, "--out", tmp_path / "m",
          match=(str(world[1]), "is a folder", "ddpmseg extract"))  # fmt: skip
    assert not (tmp_path / "m").exists()


# -- outputs of the wrong type or not writable ----------------------------------------
def test_extract_out_is_a_directory_of_other_files(world, tiny_ckpt, tmp_path):
    # an empty (or new) folder becomes a cache folder (test_scale.py); one holding other files is refused
    (tmp_path / "notes.txt").write_text("keep me")
    fails(*extract_args(tiny_ckpt, world[1], tmp_path), match=(str(tmp_path), "not a ddpmseg cache folder", ".h5"))
    assert os.listdir(tmp_path) == ["notes.txt"]


def test_fit_out_is_a_file_fails_before_training(world, tmp_path, monkeypatch):
    def no_training(*a, **k):
        raise AssertionError("training started")

    monkeypatch.setattr(PixelEnsemble, "fit", no_training)
    (tmp_path / "model").write_text("keep me")
    fails(*fit_args(world, world[1], tmp_path / "model"), match=("model", "is not a folder", "choose a folder name"))
    assert (tmp_path / "model").read_text() == "keep me"


def test_predict_out_is_a_file(world, tmp_path):
    (tmp_path / "preds").write_text("keep me")
    fails("predict", world[1] / "image_0.jpg", "--model", world[0] / "model", "--out", tmp_path / "preds",
          match=("preds", "is not a folder"))  # fmt: skip
    assert (tmp_path / "preds").read_text() == "keep me"


def test_predict_model_is_a_file(world, tmp_path):
    fails("predict", world[1] / "image_0.jpg", "--model", world[0] / "feats.h5", "--out", tmp_path / "p",
          match=("feats.h5", "not a model folder", "ddpmseg fit"))  # fmt: skip
    assert not (tmp_path / "p").exists()


def test_predict_bad_image_among_good_ones_writes_nothing(world, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        shutil.copy(world[1] / f"image_{i}.jpg", images)
    (images / "image_9.png").write_bytes(b"")
    fails("predict", images, "--model", world[0] / "model", "--out", tmp_path / "p", match=("image_9.png",))
    assert not (tmp_path / "p").exists() or os.listdir(tmp_path / "p") == []


NOBODY = 65534
CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, PR_CAPBSET_DROP = 1, 2, 24


def _as_nobody() -> None:  # preexec_fn: the child runs as the unprivileged user nobody
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)


def _without_dac_override() -> None:  # preexec_fn: root that file permissions stop (no override capabilities)
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def _unprivileged(env: dict) -> tuple:
    """(preexec_fn, who) under which chmod stops the child: none when not root; as root, the user nobody when
    it can run this Python, else root without CAP_DAC_OVERRIDE (this interpreter may sit in root's 0o700
    home); skipped only when neither works."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return None, "this user"
    probe = [sys.executable, "-c", "import ddpmseg.cli.main"]
    tried = []
    for preexec, who in ((_as_nobody, "user nobody (uid 65534)"), (_without_dac_override, "root without CAP_DAC_OVERRIDE")):
        if preexec is _as_nobody:
            try:
                import pwd

                pwd.getpwuid(NOBODY)
            except (ImportError, KeyError):
                tried.append("no user with uid 65534")
                continue
        try:
            r = subprocess.run(probe, preexec_fn=preexec, env=env, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.SubprocessError) as e:
            tried.append(f"{who}: {type(e).__name__}: {e}")
            continue
        if r.returncode == 0:
            return preexec, who
        tried.append(f"{who}: {(r.stderr.strip().splitlines() or ['exit ' + str(r.returncode)])[-1]}")
    pytest.skip("running as root and no unprivileged child could be started (" + "; ".join(tried) + ")")


@pytest.fixture
def readable(world, tiny_ckpt):
    """A world-readable copy of the inputs (pytest's own tmp folders are 0o700) with a writable HOME."""
    d = Path(tempfile.mkdtemp(prefix="ddpmseg-ro-"))
    try:
        shutil.copytree(world[1], d / "imgs")
        shutil.copy(world[0] / "feats.h5", d / "feats.h5")
        shutil.copytree(world[0] / "model", d / "model")
        shutil.copy(tiny_ckpt[0], d / "adm.pt")
        shutil.copy(tiny_ckpt[1], d / "adm.json")
        (d / "home").mkdir()
        for p in [d, *d.rglob("*")]:
            p.chmod(0o777 if p.name == "home" else (0o755 if p.is_dir() else 0o644))
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("command", ["extract", "fit", "predict"])
def test_read_only_output_folder(readable, command):
    """A folder the user may not write is refused up front, in one line naming it. Run as a user whom chmod
    stops (as root: the user nobody, or root without CAP_DAC_OVERRIDE): root writes into any folder."""
    d = readable
    env = dict(os.environ, HOME=str(d / "home"), PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1")
    preexec, who = _unprivileged(env)
    ro = d / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    args = {
        "extract": ["extract", "--ckpt", d / "adm.pt", "--model-flags", d / "adm.json", "--images", d / "imgs",
                    "--out", ro / "f.h5"],
        "fit": ["fit", "--features", d / "feats.h5", "--masks", d / "imgs", *FIT, "--out", ro / "model"],
        "predict": ["predict", d / "imgs" / "image_0.jpg", "--model", d / "model", "--out", ro / "p"],
    }[command]
    r = subprocess.run([sys.executable, "-m", "ddpmseg.cli.main", "-q", *map(str, args)], preexec_fn=preexec, env=env,
                       capture_output=True, text=True, timeout=300)
    err = r.stderr.strip()
    assert r.returncode == 1, (who, r.returncode, err)
    assert len(err.splitlines()) == 1 and err.startswith("ddpmseg: error:") and "Traceback" not in err, (who, err)
    # the up-front check's words: without it the write fails later with the OS's "Permission denied"
    assert str(ro) in err and "is not writable; choose another --out or fix its permissions" in err, (who, err)
    assert os.listdir(ro) == []


# -- --debug --------------------------------------------------------------------------
def test_debug_shows_the_traceback(tmp_path, tiny_ckpt):
    result = CliRunner().invoke(main, ["--debug", "-q", *map(str, extract_args(tiny_ckpt, tmp_path / "x.png", tmp_path / "f.h5"))])
    assert result.exit_code == 1
    assert "Traceback" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("ddpmseg: error: image input")


# -- validation before expensive work -------------------------------------------------
def test_bad_mask_is_reported_before_training(world, tmp_path, monkeypatch):
    def no_training(*a, **k):
        raise AssertionError("training started before the masks were checked")

    monkeypatch.setattr(PixelEnsemble, "fit", no_training)
    masks = eye_masks(world, tmp_path / "masks", lambda i, a, f: a + (0.25 if i == 2 else 0.0))  # the last one is bad
    d = world[0]
    fails("fit", "--features", d / "feats.h5", "--masks", masks, "--max-epochs", 100, "--out", tmp_path / "m",
          match=("image_2.npy", "integer"))  # fmt: skip
    assert not (tmp_path / "m").exists()


def test_bad_image_among_good_ones_fails_before_any_extraction(world, tiny_ckpt, tmp_path, monkeypatch):
    import ddpmseg.pipeline

    def no_forward(*a, **k):
        raise AssertionError("an image was extracted before every image was checked")

    monkeypatch.setattr(ddpmseg.pipeline, "extract_block_maps", no_forward)
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        shutil.copy(world[1] / f"image_{i}.jpg", images)
    _bad_image("truncated", tmp_path).rename(images / "image_3.png")
    out = tmp_path / "f.h5"
    fails(*extract_args(tiny_ckpt, images, out), match=("image_3.png", "truncated"))
    assert not out.exists() and not parts_dir(out).exists()


# -- reproducibility ------------------------------------------------------------------
def _datasets(path: Path) -> dict[str, np.ndarray]:
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return out


def _same_tree(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same_tree(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same_tree(x, y) for x, y in zip(a, b))
    return a == b


def test_same_inputs_and_seed_give_bit_identical_features(world, tiny_ckpt, tmp_path):
    for name in ("a.h5", "b.h5"):
        ok(*extract_args(tiny_ckpt, world[1], tmp_path / name), "--seed", "3")
    a, b = _datasets(tmp_path / "a.h5"), _datasets(tmp_path / "b.h5")
    assert a.keys() == b.keys() and len(a) == 1 + 3 * 15  # noise + 3 images x 3 steps x 5 blocks
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_same_seed_gives_identical_model_and_predictions(world, tmp_path):
    d, imgs = world
    ok(*fit_args(world, imgs, tmp_path / "model"))  # same inputs and seed as the world's model
    load = lambda m: torch.load(m / "tensors.pt", weights_only=True)  # noqa: E731
    assert _same_tree(load(d / "model"), load(tmp_path / "model"))
    for name, model in (("p1", d / "model"), ("p2", tmp_path / "model")):
        ok("predict", imgs / "image_2.jpg", "--model", model, "--out", tmp_path / name)
    for kind in ("labels", "uncertainty"):
        p1 = np.asarray(Image.open(tmp_path / "p1" / f"image_2_{kind}.png"))
        p2 = np.asarray(Image.open(tmp_path / "p2" / f"image_2_{kind}.png"))
        assert np.array_equal(p1, p2)


# -- Ctrl-C ---------------------------------------------------------------------------
@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a subprocess")
def test_ctrl_c_during_extract_exits_130_and_keeps_finished_images(tmp_path, tiny_ckpt, eyes8):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(8):
        for copy in range(2):  # 16 images
            shutil.copy(eyes8 / f"image_{i}.jpg", images / f"img{copy}_{i}.jpg")
    out = tmp_path / "feats.h5"
    cmd = [sys.executable, "-m", "ddpmseg.cli.main", "-q", *map(str, extract_args(tiny_ckpt, images, out)),
           "--device", "cpu"]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")  # steady speed even on a busy machine
    # SIGINT back to its default in the child: a test run started in the background of a shell (cmd &) ignores
    # it, the child would inherit that, and Python installs its Ctrl-C handler only where SIGINT is not ignored
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and len(list(parts_dir(out).glob("*.h5"))) < 2:
        time.sleep(0.005)
    assert proc.poll() is None, "extract finished before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and "interrupted" in err, err

    with FeatureCache(out) as cache:
        kept = len(cache.image_ids)
    assert 2 <= kept < 16
    assert f"the cache {out} keeps the {kept} images this run finished ({kept} in all)" in err, err
    rerun = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{16 - kept} new, {kept} already cached, 16 in" in rerun.stdout
    assert not parts_dir(out).exists()
