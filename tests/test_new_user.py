"""What a new user hit (issue 10): each case failed, or passed silently with a wrong result, in 0.1.0.

Silent wrong results (an image id reused for other content, architecture
guesses, a flattering evaluation on training images), the busy-machine
slowdown (wait policy, threads), and the surprises: shell globs after
--images, Ctrl-C messages, file permissions, skipped inputs, overwriting,
k-means checks, legends, messages.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cli_helpers import cli, fails, ok
from ddpmseg.features.cache import FeatureCache

pytestmark = pytest.mark.usefixtures("one_thread")


def extract(tiny_ckpt, *images, out, extra=()):
    return ["extract", "--ckpt", tiny_ckpt[0], "--model-flags", tiny_ckpt[1], *map(str, images), "--out", out, *extra]


# -- silent wrong results ------------------------------------------------------------------------
def test_an_id_cached_from_another_image_is_refused_not_reused(tmp_path, tiny_ckpt, eyes8):
    (tmp_path / "mixed").mkdir()
    (tmp_path / "dup").mkdir()
    (tmp_path / "copy").mkdir()
    shutil.copy(eyes8 / "image_0.jpg", tmp_path / "mixed" / "001.jpg")
    shutil.copy(eyes8 / "image_1.jpg", tmp_path / "dup" / "001.jpg")  # another photo, the same name
    shutil.copy(eyes8 / "image_0.jpg", tmp_path / "copy" / "001.jpg")  # the same photo elsewhere
    feats = tmp_path / "feats.h5"
    ok(*extract(tiny_ckpt, tmp_path / "mixed" / "001.jpg", out=feats))
    before = feats.read_bytes()
    err = fails(*extract(tiny_ckpt, tmp_path / "dup" / "001.jpg", out=feats),
                match=(str(tmp_path / "dup" / "001.jpg"), str(tmp_path / "mixed" / "001.jpg"), "other content", "rename"))
    assert "'001'" in err and feats.read_bytes() == before  # 0.1.0: "0 new, 1 already cached", old features kept
    assert "0 new, 1 already cached" in ok(*extract(tiny_ckpt, tmp_path / "copy" / "001.jpg", out=feats))
    with FeatureCache(feats) as cache:  # the source is stored absolute (0.1.0: as given, relative)
        assert Path(cache.source("001")).is_absolute() and len(cache.sha256("001")) == 64


def test_blocks_of_a_custom_checkpoint_need_what_the_weights_cannot_show(tiny_ckpt):
    ckpt = tiny_ckpt[0]  # the demo's 64 px model: 0.1.0 assumed 256 px and listed 256-px resolutions
    fails("blocks", "--ckpt", ckpt, match=("matches no preset", "--image-size S --num-head-channels N", "--model-flags"))
    rows = ok("blocks", "--ckpt", ckpt, "--image-size", 64, "--num-head-channels", 32, "--device", "cpu").splitlines()[1:]
    flagged = ok("blocks", "--ckpt", ckpt, "--model-flags", tiny_ckpt[1], "--device", "cpu").splitlines()[1:]
    assert rows == flagged and rows[12].split()[3] == "32x32"  # index, module, channels, resolution[, auto mark]


def test_evaluate_says_when_it_scores_training_images(eyes_world, tmp_path):
    d, imgs = eyes_world  # the model was fitted on image_0..2
    test = tmp_path / "test"
    test.mkdir()
    shutil.copy(imgs / "image_1.jpg", test / "renamed.jpg")  # a training image under another name
    shutil.copy(imgs / "image_mask1.npy", test / "renamed.npy")
    args = ["evaluate", test, imgs / "image_2.jpg", "--model", d / "model", "--masks", test]
    out = ok(*args)
    assert "NOTE 1 of the 1 image trained this model (renamed)" in out and "not a held-out" in out
    r = json.loads(ok(*args, "--json"))
    assert r["training_images"] == ["renamed"] and r["no_mask"] == ["image_2"]


# -- the busy-machine slowdown --------------------------------------------------------------------
def test_the_cli_waits_passively_when_other_processes_are_busy():
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    probe = ("import os, sys, ddpmseg.cli.main, ddpmseg.runtime as r; assert 'torch' not in sys.modules; "
             "r.configure_threads(wait_policy='auto'); print(os.environ.get('OMP_WAIT_POLICY', 'unset'), r.others_busy())")
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])  # another job, one whole core
    try:
        busy = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True)
        kept = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                              env={**env, "OMP_WAIT_POLICY": "ACTIVE"})
    finally:
        spinner.kill()
        spinner.wait()
    assert busy.stdout.split() == ["PASSIVE", "True"]  # set before torch starts (the CLI module loads no torch)
    assert kept.stdout.split()[0] == "ACTIVE"  # the user's choice stands
    idle = ("import os, ddpmseg.runtime as r; r.others_busy = lambda *a: False; r.configure_threads(wait_policy='auto'); "
            "print(os.environ.get('OMP_WAIT_POLICY', 'unset'))")
    assert subprocess.run([sys.executable, "-c", idle], capture_output=True, text=True, env=env,
                          check=True).stdout.split() == ["unset"]  # alone: OpenMP's own (spinning) default


def test_threads_default_to_the_usable_cores_and_follow_threads():
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    threads = "from ddpmseg.cli.main import main; main(['--threads', '1', 'presets'], standalone_mode=False); " \
              "import torch; print(torch.get_num_threads())"
    r = subprocess.run([sys.executable, "-c", threads], capture_output=True, text=True, env=env, check=True)
    assert r.stdout.split()[-1] == "1"
    default = "from ddpmseg.cli.main import main; main(['presets'], standalone_mode=False); import os, torch; " \
              "print(torch.get_num_threads(), len(os.sched_getaffinity(0)))"
    got, cores = subprocess.run([sys.executable, "-c", default], capture_output=True, text=True, env=env,
                                check=True).stdout.split()[-2:]
    assert got == cores


# -- surprises ------------------------------------------------------------------------------------
def test_a_shell_glob_after_images_works_on_every_command(tmp_path, tiny_ckpt, eyes_world):
    d, imgs = eyes_world
    globbed = [imgs / "image_0.jpg", imgs / "image_1.jpg"]  # what the shell makes of --images imgs/image_[01].jpg
    assert "2 new" in ok("extract", "--ckpt", tiny_ckpt[0], "--model-flags", tiny_ckpt[1], "--images", *globbed,
                         "--out", tmp_path / "f.h5")  # 0.1.0: "unexpected extra arguments"
    ok("predict", "--images", *globbed, "--model", d / "model", "--out", tmp_path / "p")
    assert sorted(p.name for p in (tmp_path / "p").iterdir())[:2] == ["image_0_labels.png", "image_0_overlay.png"]
    assert "over 2 images" in ok("evaluate", "--images", *globbed, "--model", d / "model", "--masks", imgs)
    usage = cli("extract", "--ckpt", tiny_ckpt[0], "--out", tmp_path / "g.h5")  # a usage error: click's exit 2
    assert usage.exit_code == 2 and "give the images" in usage.stderr and "Usage: " in usage.stderr


def test_ctrl_c_says_what_is_true_per_command(eyes_world, tmp_path, monkeypatch):
    import ddpmseg.pipeline

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    d, imgs = eyes_world
    monkeypatch.setattr(ddpmseg.pipeline, "fit_model", interrupted)
    r = cli("fit", "--features", d / "feats.h5", "--masks", imgs, "--out", tmp_path / "m")
    assert r.exit_code == 130 and "no model was written" in r.stderr and "resume" in r.stderr  # "does not resume"
    assert "fit does not resume" in r.stderr


def test_written_files_honour_the_umask(eyes_world, tmp_path):
    d, imgs = eyes_world
    old = os.umask(0o022)
    try:
        ok("fit", "--features", d / "feats.h5", "--masks", imgs, "--ensemble", 2, "--max-epochs", 1, "--out", tmp_path / "m")
        ok("predict", imgs / "image_0.jpg", "--model", tmp_path / "m", "--out", tmp_path / "p")
    finally:
        os.umask(old)
    for f in [tmp_path / "m" / "model.json", tmp_path / "m" / "tensors.pt", *(tmp_path / "p").iterdir()]:
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f  # 0.1.0: 0o600, a temp file's mode


def test_skipped_inputs_are_reported(tmp_path, tiny_ckpt, eyes_world):
    d, imgs = eyes_world
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    shutil.copy(imgs / "image_0.jpg", folder)
    (folder / "notes.txt").write_text("x")
    (folder / ".hidden").write_text("x")
    out = ok(*extract(tiny_ckpt, folder, out=tmp_path / "f.h5"))
    assert "1 new" in out and "skipped 2 folder entries that are not images: notes.txt, sub/" in out
    masks = tmp_path / "masks"
    masks.mkdir()
    np.save(masks / "image_0.npy", np.load(imgs / "image_mask0.npy"))
    np.save(masks / "image_2.npy", np.load(imgs / "image_mask2.npy"))
    fit = ok("fit", "--features", d / "feats.h5", "--masks", masks, "--ensemble", 2, "--max-epochs", 1, "--out", tmp_path / "m")
    assert "2 images" in fit and "skipped 1 cached image without a mask: image_1" in fit
    assert "skipped 1 image without a mask: image_1" in ok("evaluate", imgs, "--model", tmp_path / "m", "--masks", masks)


def test_outputs_are_not_overwritten_without_overwrite(eyes_world, tmp_path, tiny_ckpt):
    d, imgs = eyes_world
    fit = ["fit", "--features", d / "feats.h5", "--masks", imgs, "--ensemble", 2, "--max-epochs", 1, "--out", tmp_path / "m"]
    ok(*fit)
    before = (tmp_path / "m" / "tensors.pt").read_bytes()
    fails(*fit, "--seed", 1, match=("model.json", "--overwrite"))  # 0.1.0 silently replaced the model
    assert (tmp_path / "m" / "tensors.pt").read_bytes() == before
    ok(*fit, "--seed", 1, "--overwrite")
    assert (tmp_path / "m" / "tensors.pt").read_bytes() != before
    predict = ["predict", imgs / "image_0.jpg", "--model", tmp_path / "m", "--out", tmp_path / "p"]
    ok(*predict)
    fails(*predict, match=("image_0_labels.png", "--overwrite"))
    ok(*predict, "--overwrite")
    kmeans = ["kmeans", imgs / "image_0.jpg", "--ckpt", tiny_ckpt[0], "--model-flags", tiny_ckpt[1], "--k", 2,
              "--steps", 50, "--blocks", 12, "--out", tmp_path / "k.png"]
    ok(*kmeans)
    fails(*kmeans, match=("k.png", "--overwrite"))


def test_kmeans_checks_k_before_the_unet_pass(tmp_path, tiny_ckpt, eyes8, monkeypatch):
    import ddpmseg.pipeline

    def no_forward(*a, **k):
        raise AssertionError("the U-Net ran before k was checked")

    monkeypatch.setattr(ddpmseg.pipeline, "extract_block_maps", no_forward)
    base = ["kmeans", eyes8 / "image_0.jpg", "--ckpt", tiny_ckpt[0], "--model-flags", tiny_ckpt[1], "--out", tmp_path / "k.png"]
    fails(*base, "--k", 0, match=("--k 0", "at least 2"))
    fails(*base, "--k", 65, "--blocks", "5", match=("--k 65", "2 <= k <= 64"))  # block 5 is 8x8 at 64 px
    assert not (tmp_path / "k.png").exists()


def test_kmeans_grid_keeps_a_non_square_input_unsquashed(tmp_path, tiny_ckpt, eyes8):
    wide = tmp_path / "wide.png"
    Image.open(eyes8 / "image_0.jpg").convert("RGB").resize((256, 128)).save(wide)
    ok("kmeans", wide, "--ckpt", tiny_ckpt[0], "--model-flags", tiny_ckpt[1], "--k", 3, "--steps", "50,150",
       "--blocks", "5,12", "--out", tmp_path / "k.png")
    from ddpmseg import viz

    w, h = Image.open(tmp_path / "k.png").size
    cell_w, cell_h = 128, 64  # the input's 2:1 (0.1.0 drew 128 x 128 cells)
    assert (w, h) == (viz.GRID_LEFT + 3 * (cell_w + viz.GRID_PAD), viz.GRID_TOP + 2 * (cell_h + viz.GRID_PAD))


def test_pictures_have_a_legend_and_a_colour_bar(eyes_world, tmp_path):
    d, imgs = eyes_world
    ok("predict", imgs / "image_0.jpg", "--model", d / "model", "--out", tmp_path / "p")
    ok("predict", imgs / "image_0.jpg", "--model", d / "model", "--out", tmp_path / "plain", "--no-legend")
    for kind in ("overlay", "uncertainty"):
        framed = np.asarray(Image.open(tmp_path / "p" / f"image_0_{kind}.png"))
        plain = np.asarray(Image.open(tmp_path / "plain" / f"image_0_{kind}.png"))
        assert plain.shape == (256, 256, 3) and framed.shape[1] > 256
        assert np.array_equal(framed[:256, :256], plain)  # the same picture, a panel beside it
    labels = np.asarray(Image.open(tmp_path / "p" / "image_0_labels.png"))
    from ddpmseg.model import SegmentationModel

    palette = SegmentationModel.load(d / "model").labelset.palette()
    panel = np.asarray(Image.open(tmp_path / "p" / "image_0_overlay.png"))[:, 256:]
    for c in range(len(palette)):  # a swatch for every class present, none for the others
        assert ((panel == palette[c]).all(-1).sum() > 20) == bool((labels == c).any())


def test_messages_new_users_tripped_on(tmp_path, tiny_ckpt, eyes_world, tiny_config):
    d, imgs = eyes_world
    # the "other settings" error names only what differs
    err = fails(*extract(tiny_ckpt, imgs, out=d / "feats.h5", extra=("--steps", "10,20")), match=("other settings",))
    assert "extract.steps [50, 150, 250] vs [10, 20]" in err and "'blocks'" not in err and "{" not in err
    # wrong flags for a checkpoint: no advice about a --preset never given
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**json.loads(Path(tiny_ckpt[1]).read_text()), "num_channels": 64}))
    err = fails("blocks", "--ckpt", tiny_ckpt[0], "--model-flags", bad, match=("does not fit the given flags", "fix the flags"))
    assert "--preset" not in err
    # one image is "1 image"
    out = ok("fit", "--features", d / "feats.h5", "--masks", imgs, "--labels", 1, "--ensemble", 2, "--max-epochs", 1,
             "--out", tmp_path / "m")
    assert out.startswith("fit: 1 image, ") and "1 images" not in out
