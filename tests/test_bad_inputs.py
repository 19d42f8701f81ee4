"""Bad inputs through the CLI: one line on stderr, non-zero exit, no traceback,
and nothing already written is lost."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from ddpmseg.backbones.adm import random_unet
from cli_helpers import fails


def extract_args(tiny_ckpt, images, out):
    ckpt, flags = tiny_ckpt
    return ["extract", "--ckpt", ckpt, "--model-flags", flags, "--images", images, "--out", out]


def test_unreadable_image(tmp_path, tiny_ckpt):
    (tmp_path / "broken.png").write_text("not an image")
    fails(*extract_args(tiny_ckpt, tmp_path / "broken.png", tmp_path / "f.h5"), match="broken.png")
    assert not (tmp_path / "f.h5").exists()


def test_missing_checkpoint(tmp_path, eyes8):
    fails("extract", "--ckpt", tmp_path / "nope.pt", "--images", eyes8, "--out", tmp_path / "f.h5", match="nope.pt")


def test_unknown_preset(tmp_path, tiny_ckpt, eyes8):
    fails("extract", "--ckpt", tiny_ckpt[0], "--preset", "ffhq_512", "--images", eyes8, "--out", tmp_path / "f.h5",
          match="unknown preset 'ffhq_512'")


def test_wrong_checkpoint_for_preset(tmp_path, tiny_ckpt, eyes8):
    err = fails("extract", "--ckpt", tiny_ckpt[0], "--preset", "ffhq_256", "--images", eyes8,
                "--out", tmp_path / "f.h5", match="does not fit")
    assert "shape" in err


@pytest.mark.parametrize("opt,value,match", [
    ("--blocks", "5,18", "block index 18 out of range"),
    ("--blocks", "5,5", "duplicated block"),
    ("--steps", "50,1000", "step 1000 out of range"),
    ("--steps", "-1", "step -1 out of range"),
    ("--steps", "a,b", "comma-separated integers"),
])
def test_steps_and_blocks_out_of_range(tmp_path, tiny_ckpt, eyes8, opt, value, match):
    fails(*extract_args(tiny_ckpt, eyes8, tmp_path / "f.h5"), opt, value, match=match)
    assert not (tmp_path / "f.h5").exists()


def test_other_settings_into_existing_cache_is_refused(eyes_world, tiny_ckpt):
    d, imgs = eyes_world
    before = (d / "feats.h5").read_bytes()
    fails(*extract_args(tiny_ckpt, imgs, d / "feats.h5"), "--steps", "10,20", match="other settings")
    assert (d / "feats.h5").read_bytes() == before


def test_mask_of_wrong_size(eyes_world, tmp_path):
    d, imgs = eyes_world
    masks = tmp_path / "masks"
    masks.mkdir()
    for i in range(3):
        np.save(masks / f"image_{i}.npy", np.zeros((100, 120), np.uint8))
    fails("fit", "--features", d / "feats.h5", "--masks", masks, "--out", tmp_path / "m", match="image_0")
    assert not (tmp_path / "m").exists()


def test_labels_beyond_the_classes(eyes_world, tmp_path):
    d, imgs = eyes_world
    masks = tmp_path / "masks"
    masks.mkdir()
    for i in range(3):
        m = np.load(imgs / f"image_mask{i}.npy").copy()
        m[:10, :10] = 7
        np.save(masks / f"image_{i}.npy", m)
    csv = tmp_path / "eyes.csv"
    csv.write_text("index,name,r,g,b\n0,bg,0,0,0\n1,sclera,255,255,255\n2,iris,0,0,255\n3,pupil,255,0,0\n")
    fails("fit", "--features", d / "feats.h5", "--masks", masks, "--classes", csv, "--out", tmp_path / "m", match="7")


def test_more_labels_than_labelled_images(eyes_world, tmp_path):
    d, imgs = eyes_world
    fails("fit", "--features", d / "feats.h5", "--masks", imgs, "--labels", 20, "--out", tmp_path / "m",
          match="--labels 20")


def test_predict_with_another_checkpoint(eyes_world, tmp_path, tiny_config):
    d, imgs = eyes_world
    other = tmp_path / "other.pt"
    torch.save(random_unet(tiny_config, seed=1).state_dict(), other)
    fails("predict", imgs / "image_0.jpg", "--model", d / "model", "--ckpt", other, "--out", tmp_path / "p",
          match="sha256")


def test_model_folder_with_a_file_missing(eyes_world, tmp_path):
    d, imgs = eyes_world
    broken = tmp_path / "model"
    shutil.copytree(d / "model", broken)
    (broken / "tensors.pt").unlink()
    fails("predict", imgs / "image_0.jpg", "--model", broken, "--out", tmp_path / "p", match="tensors.pt")


def test_features_from_another_file_type(tmp_path, eyes8):
    (tmp_path / "feats.h5").write_text("plain text")
    fails("fit", "--features", tmp_path / "feats.h5", "--masks", eyes8, "--out", tmp_path / "m", match="HDF5")
