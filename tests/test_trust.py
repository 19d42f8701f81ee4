"""Knowing when to trust a mask and what to label next: calibration against a plain per-pixel ECE,
evaluate's figures and per-image scores, suggest's rankings, and noise ensembles of the features."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cli_helpers import fails, ok
from ddpmseg.active.strategies import image_scores, rank
from ddpmseg.errors import DdpmsegError
from ddpmseg.metrics import Calibration, confusion_matrix, present_miou, top_mean

pytestmark = pytest.mark.usefixtures("one_thread")


def _plain_ece(probs: np.ndarray, truth: np.ndarray, n_bins: int = 15, ignore: int = 255) -> float:
    """ECE as textbooks write it: every pixel's confidence kept, bins by (lo, hi], 0 into the first."""
    conf, pred = probs.max(0).ravel(), probs.argmax(0).ravel()
    t = truth.ravel()
    keep = t != ignore
    conf, pred, t = conf[keep], pred[keep], t[keep]
    ece = 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        inside = (conf > lo) & (conf <= hi) if b else (conf <= hi)
        if inside.any():
            ece += inside.mean() * abs((pred[inside] == t[inside]).mean() - conf[inside].mean())
    return ece


def test_streamed_ece_equals_a_per_pixel_computation():
    rng = np.random.default_rng(0)
    calib = Calibration(15)
    all_p, all_t = [], []
    for _ in range(3):  # three "images", streamed
        logits = rng.normal(size=(4, 20, 30)) * 2
        p = np.exp(logits) / np.exp(logits).sum(0)
        t = rng.integers(0, 4, (20, 30))
        t[:2] = 255
        calib.update(p, t)
        all_p.append(p)
        all_t.append(t)
    expect = _plain_ece(np.concatenate(all_p, axis=1), np.concatenate(all_t, axis=0))
    assert calib.ece() == pytest.approx(expect, rel=1e-9, abs=1e-12)
    bins = calib.bins()
    assert bins["count"].sum() == 3 * 18 * 30
    # a perfectly calibrated toy: confidence 0.75 right 3 times in 4
    c = Calibration(4).update(np.array([[0.75] * 4, [0.25] * 4]), np.array([0, 0, 0, 1]))
    assert c.ece() == pytest.approx(0.0)


def test_ece_of_four_pixels_by_hand():
    # confidences 0.9, 0.9 (bin 3 of 4: one right, one wrong) and 0.6, 0.6 (bin 2: both right)
    probs = np.array([[0.9, 0.1, 0.6, 0.4], [0.1, 0.9, 0.4, 0.6]])  # (K=2, 4 pixels)
    truth = np.array([0, 0, 0, 1])
    c = Calibration(4).update(probs, truth)
    # bin 3: accuracy 1/2, confidence 0.9; bin 2: accuracy 1, confidence 0.6; each holds 2 of the 4 pixels
    assert c.ece() == pytest.approx(2 / 4 * abs(0.5 - 0.9) + 2 / 4 * abs(1.0 - 0.6), abs=1e-12)  # 0.4
    assert c.bins()["count"].tolist() == [0, 0, 2, 2]
    assert Calibration(4).update(probs, np.array([0, 0, 255, 255])).ece() == pytest.approx(0.4, abs=1e-12)  # ignored


def test_per_image_scores_by_hand():
    cm = confusion_matrix(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1]), 3)
    # class 0: inter 1, union 2; class 1: inter 2, union 3; class 2 absent from both: not averaged
    assert present_miou(cm, ignore_index=255) == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert top_mean(np.arange(20.0), 0.10) == 18.5
    s = image_scores(np.concatenate([np.zeros(90), np.ones(10)]))
    assert s == {"uncertainty": 1.0, "bald": 0.1}


def test_rankings():
    scores = {"uncertainty": np.array([0.9, 0.89, 0.88, 0.5, 0.1]), "bald": np.array([0.1, 0.2, 0.3, 0.4, 0.0])}
    assert [i for i, _ in rank(scores, 3, "uncertainty")] == [0, 1, 2]
    assert [i for i, _ in rank(scores, 2, "bald")] == [3, 2]
    emb = np.array([[0.0, 0.0], [0.01, 0.0], [0.0, 0.01], [5.0, 5.0], [-5.0, 5.0]])  # images 0-2 nearly the same
    picked = [i for i, _ in rank(scores, 3, "diversity", emb)]
    assert picked[0] == 0 and 1 not in picked and 2 not in picked
    with pytest.raises(DdpmsegError, match="--by 'random' is unknown"):
        rank(scores, 1, "random")


@pytest.fixture(scope="module")
def pool(tmp_path_factory, eyes8) -> Path:
    """Images 3-7 of eyes8 plus four exact copies of image 4 under other names."""
    d = tmp_path_factory.mktemp("pool")
    for i in range(3, 8):
        shutil.copy(eyes8 / f"image_{i}.jpg", d)
    for c in range(4):
        shutil.copy(eyes8 / "image_4.jpg", d / f"copy{c}_of_4.jpg")
    return d


def test_evaluate_reports_calibration_confusion_and_per_image_scores(eyes_world, eyes8, tmp_path):
    d, imgs = eyes_world
    test = tmp_path / "test"
    test.mkdir()
    for i in (4, 5):
        shutil.copy(eyes8 / f"image_{i}.jpg", test)
        shutil.copy(eyes8 / f"image_mask{i}.npy", test)
    r = json.loads(ok("evaluate", test, "--model", d / "model", "--masks", test, "--json", "--out", tmp_path / "figs"))
    truth = [np.load(test / f"image_mask{i}.npy") for i in (4, 5)]
    assert sum(r["reliability"]["count"]) == sum(int((t != 255).sum()) for t in truth)
    # ECE from the reported bins as textbooks write it: sum over bins of count x |accuracy - confidence| / total
    rel = r["reliability"]
    filled = [b for b, n in enumerate(rel["count"]) if n]
    assert r["ece"] == pytest.approx(sum(rel["count"][b] * abs(rel["accuracy"][b] - rel["confidence"][b])
                                         for b in filled) / sum(rel["count"]), rel=1e-9)
    assert all(rel["count"][b] == 0 and rel["accuracy"][b] is None for b in range(15) if b not in filled)
    # the confusion and each image's mIoU, recomputed by hand from predict's label PNGs
    ok("predict", test, "--model", d / "model", "--out", tmp_path / "preds")
    preds = [np.asarray(Image.open(tmp_path / "preds" / f"image_{i}_labels.png")) for i in (4, 5)]
    cm = np.zeros((4, 4), np.int64)
    for pred, t in zip(preds, truth):
        for a in range(4):
            for b in range(4):
                cm[a, b] += int(np.sum((t == a) & (pred == b)))
    assert r["confusion"] == cm.tolist()
    assert [row["image"] for row in r["per_image"]] == ["image_4", "image_5"]
    for row, pred, t in zip(r["per_image"], preds, truth):
        present = [c for c in range(4) if ((pred == c) | (t == c)).any()]
        iou = [np.sum((pred == c) & (t == c)) / np.sum((pred == c) | (t == c)) for c in present]
        assert row["miou"] == pytest.approx(float(np.mean(iou)), abs=1e-12)
        assert 0 < row["uncertainty"] <= np.log(4)  # two members of one epoch disagree somewhere; MI <= log K
    for name in ("reliability.png", "confusion.png"):
        assert (tmp_path / "figs" / name).stat().st_size > 1000
    text = ok("evaluate", test, "--model", d / "model", "--masks", test)
    assert "ECE" in text and "most uncertain first" in text


def test_suggest_ranks_the_pool_and_diversity_skips_copies(eyes_world, pool, tmp_path):
    d, _ = eyes_world
    said = ok("suggest", "--model", d / "model", pool, "--out", tmp_path / "u", "--n", 3)
    rows = (tmp_path / "u" / "suggest.csv").read_text().splitlines()
    assert rows[0] == "rank,image,uncertainty score (nats),path" and len(rows) == 4
    scores = [float(r.split(",")[2]) for r in rows[1:]]
    assert scores == sorted(scores, reverse=True)
    assert (tmp_path / "u" / "suggest.png").stat().st_size > 1000 and "suggest: 3 images of 9 by uncertainty" in said
    ok("suggest", "--model", d / "model", pool, "--out", tmp_path / "d", "--n", 5, "--by", "diversity")
    names = [r.split(",")[1] for r in (tmp_path / "d" / "suggest.csv").read_text().splitlines()[1:]]
    copies = [n for n in names if n == "image_4" or n.startswith("copy")]
    assert len(copies) <= 1, names  # five identical images: at most one suggested
    # the training images are left out of the pool
    said = ok("suggest", "--model", d / "model", d / "imgs", pool, "--out", tmp_path / "t", "--n", 2)
    assert "left out 3 images that trained the model" in said
    fails("suggest", "--model", d / "model", d / "imgs", "--out", tmp_path / "x", match="every image given trained the model")
    fails("suggest", "--model", d / "model", pool, "--out", tmp_path / "u", match="would replace")


def test_noise_samples_average_the_maps_of_successive_draws(tiny_ckpt, eyes8, tmp_path):
    from ddpmseg.backbones import create_backbone
    from ddpmseg.data import load_rgb, preprocess_image
    from ddpmseg.features.cache import FeatureCache
    from ddpmseg.features.extractor import make_noise

    ckpt, flags = tiny_ckpt
    img = eyes8 / "image_0.jpg"
    ok("extract", img, "--ckpt", ckpt, "--model-flags", flags, "--out", tmp_path / "n3.h5", "--noise-samples", 3,
       "--steps", "50,150", "--blocks", "5,12", "--device", "cpu")
    noise = make_noise(0, 64, 3)
    assert torch.equal(noise[:1], make_noise(0, 64))  # the first draw is the single-noise recipe's
    gen = torch.Generator().manual_seed(0)
    draws = [torch.randn((1, 3, 64, 64), generator=gen) for _ in range(3)]
    backbone = create_backbone(ckpt, flags=flags, device="cpu")
    x0, _ = preprocess_image(load_rgb(img), 64)
    with FeatureCache(tmp_path / "n3.h5") as cache:
        assert cache.record.extract.noise_samples == 3 and cache.noise.shape == (3, 3, 64, 64)
        maps = cache.block_maps("image_0")
    for t in (50, 150):
        tt = torch.tensor([t])
        outs = [backbone.forward_intermediates(backbone.q_sample(x0, tt, z), tt, [5, 12]) for z in draws]
        for b in (5, 12):
            expect = torch.stack([o[b][0] for o in outs]).mean(0).half().numpy()
            np.testing.assert_allclose(maps[(t, b)], expect, rtol=2e-3, atol=2e-3)
    fails("extract", img, "--ckpt", ckpt, "--model-flags", flags, "--out", tmp_path / "n3.h5", "--steps", "50,150",
          "--blocks", "5,12", "--device", "cpu", match="extract.noise_samples 3 vs 1")
