"""Classes never vanish without a word (issue 23 items 1 and 2): the reference's min-pixels rule counts
at the mask's resolution, classes left without a training pixel are named by fit, model.json and
evaluate, and masks that hold none of several of the model's classes are flagged."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from cli_helpers import cli, ok

MICRO = Path(__file__).resolve().parent / "fixtures" / "v0_1_0" / "adm"  # a 32 px ADM and a cache of two eyes
pytestmark = pytest.mark.usefixtures("one_thread")


def _fit(masks: Path, out: Path, *extra) -> object:
    return cli("fit", "--features", MICRO / "feats.h5", "--masks", masks, "--ensemble", 2, "--max-epochs", 1,
               "--head-option", "recipe=reference", "--out", out, "--device", "cpu", *extra)


def test_a_small_class_survives_a_small_model_grid(eyes8, tmp_path):
    # the iris on the 32 px grid (what the rule counted before): under 20 pixels in both training images
    for i in (0, 1):
        mask = np.load(eyes8 / f"image_mask{i}.npy")
        assert 0 < (mask[4::8, 4::8] == 2).sum() < 20 and (mask == 2).sum() >= 20
    r = _fit(eyes8, tmp_path / "m")
    assert r.exit_code == 0, r.output
    assert "WARNING" not in r.stderr
    fit = json.loads((tmp_path / "m" / "model.json").read_text())["fit"]
    assert fit["untrained_classes"] == []


def test_a_class_without_training_pixels_is_named_everywhere(eyes8, tmp_path):
    masks = tmp_path / "masks"
    masks.mkdir()
    for i in range(4):
        m = np.load(eyes8 / f"image_mask{i}.npy")
        m[m == 3] = 1  # no pupil anywhere: pupil (3) becomes sclera
        ys, xs = np.nonzero(m == 2)
        m[m == 2] = 0
        m[ys[:10], xs[:10]] = 2  # 10 iris pixels: under --min-pixels 20 at the mask's resolution
        np.save(masks / f"image_mask{i}.npy", m)
    classes = tmp_path / "eyes.csv"  # the four classes, though the masks now hold two
    classes.write_text("index,name,r,g,b\n0,class_0,0,0,0\n1,class_1,255,0,0\n2,class_2,0,255,0\n3,class_3,0,0,255\n")
    r = _fit(masks, tmp_path / "m", "--classes", classes)
    assert r.exit_code == 0, r.output
    assert r.stderr.strip() == ("fit: WARNING no training pixel of 2 classes (class_2, class_3): the model will never "
                                "predict them; label them in a mask, or lower --min-pixels if they are small")
    assert "4 classes" in r.stdout
    assert json.loads((tmp_path / "m" / "model.json").read_text())["fit"]["untrained_classes"] == [2, 3]
    # evaluate says so too (and that the masks hold no pupil); the JSON names them
    images = tmp_path / "imgs"
    images.mkdir()
    for i in (2, 3):
        shutil.copy(eyes8 / f"image_{i}.jpg", images)
    r = cli("evaluate", images, "--model", tmp_path / "m", "--masks", masks, "--ckpt", MICRO / "micro_adm.pt",
            "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert "evaluate: NOTE the model had no training pixel of class_2, class_3: it never predicts them" in r.stderr
    assert "WARNING" not in r.stderr  # one class absent from the masks (the pupil) is not a mismatch
    result = json.loads(ok("evaluate", images, "--model", tmp_path / "m", "--masks", masks, "--ckpt",
                           MICRO / "micro_adm.pt", "--device", "cpu", "--json"))
    assert result["untrained_classes"] == ["class_2", "class_3"] and result["absent_classes"] == ["class_3"]


def test_masks_of_another_label_set_are_flagged(eyes8, tmp_path):
    assert _fit(eyes8, tmp_path / "m").exit_code == 0
    masks, images = tmp_path / "masks", tmp_path / "imgs"
    masks.mkdir()
    images.mkdir()
    for i in (2, 3):
        shutil.copy(eyes8 / f"image_{i}.jpg", images)
        m = np.load(eyes8 / f"image_mask{i}.npy")
        np.save(masks / f"image_mask{i}.npy", (m > 0).astype(np.uint8))  # a 2-class (eye / not eye) label set
    r = cli("evaluate", images, "--model", tmp_path / "m", "--masks", masks, "--ckpt", MICRO / "micro_adm.pt",
            "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert ("evaluate: WARNING the masks hold none of 2 of the model's 4 classes (class_2, class_3): were they drawn "
            "with this model's label set? their IoU counts as 0") in r.stderr
    np.save(masks / "image_mask2.npy", np.full((256, 256), 7, np.uint8))  # a value the model does not know
    r = cli("evaluate", images, "--model", tmp_path / "m", "--masks", masks, "--ckpt", MICRO / "micro_adm.pt",
            "--device", "cpu")
    assert r.exit_code == 1 and "has label values 7 outside the valid range 0..3" in r.stderr


def test_without_a_label_set_the_top_class_is_counted_even_when_the_rule_drops_it(eyes8, tmp_path):
    masks = tmp_path / "masks"
    masks.mkdir()
    for i in (0, 1):
        m = np.load(eyes8 / f"image_mask{i}.npy")
        ys, xs = np.nonzero(m == 3)
        m[m == 3] = 1
        m[ys[:5], xs[:5]] = 3  # 5 pupil pixels: under --min-pixels 20, but the masks hold class 3
        np.save(masks / f"image_mask{i}.npy", m)
    r = _fit(masks, tmp_path / "m")
    assert r.exit_code == 0, r.output
    assert "4 classes" in r.stdout and "(class_3)" in r.stderr
    assert json.loads((tmp_path / "m" / "model.json").read_text())["fit"]["untrained_classes"] == [3]
