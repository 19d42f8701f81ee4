"""End to end through the CLI on the shared eyes8 set with a tiny random ADM:
extract, fit, predict, evaluate, kmeans, and the README's four usage lines."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from ddpmseg.cli.main import main
from ddpmseg.features.cache import FeatureCache


def run(*args: str) -> str:
    result = CliRunner().invoke(main, ["-q", *map(str, args)])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def workflow(tmp_path_factory, tiny_ckpt, eyes8):
    """extract all 8 eyes, fit on the first 6, predict/evaluate the last 2."""
    d = tmp_path_factory.mktemp("e2e")
    ckpt, flags = tiny_ckpt
    run("extract", "--ckpt", ckpt, "--model-flags", flags, "--images", eyes8, "--out", d / "feats.h5", "--device", "cpu")
    run("fit", "--features", d / "feats.h5", "--masks", eyes8, "--labels", 6, "--ensemble", 3, "--out", d / "model",
        "--device", "cpu")
    test = d / "test"
    test.mkdir()
    for i in (6, 7):
        (test / f"image_{i}.jpg").write_bytes((eyes8 / f"image_{i}.jpg").read_bytes())
        (test / f"image_{i}.npy").write_bytes((eyes8 / f"image_mask{i}.npy").read_bytes())
    return d, test


def test_extract_fills_the_cache(workflow):
    d, _ = workflow
    with FeatureCache(d / "feats.h5") as cache:
        assert cache.image_ids == [f"image_{i}" for i in range(8)]
        assert cache.steps == [50, 150, 250] and cache.blocks == [5, 6, 7, 8, 12]
        assert cache.n_features == 3 * (128 + 64 + 64 + 64 + 32)
        assert cache.pixel_features("image_3").shape == (cache.n_features, 64, 64)
        assert cache.preprocess("image_3")["original_size"] == [256, 256]
    assert not (d / "feats.h5.parts").exists()


def test_rerun_adds_only_new_images(workflow, tiny_ckpt, eyes8):
    d, _ = workflow
    ckpt, flags = tiny_ckpt
    out = run("extract", "--ckpt", ckpt, "--model-flags", flags, "--images", eyes8, "--out", d / "feats.h5")
    assert "0 new, 8 already cached" in out


def test_fit_writes_a_complete_model_folder(workflow):
    d, _ = workflow
    cfg = json.loads((d / "model" / "model.json").read_text())
    assert cfg["fit"]["images"] == [f"image_{i}" for i in range(6)]
    assert cfg["extract"]["steps"] == [50, 150, 250] and cfg["extract"]["blocks"] == [5, 6, 7, 8, 12]
    assert len(cfg["checkpoint"]["sha256"]) == 64
    assert cfg["classes"]["names"] == ["class_0", "class_1", "class_2", "class_3"]
    assert (d / "model" / "tensors.pt").stat().st_size > 0


def test_predict_writes_three_pngs_at_original_size(workflow):
    d, test = workflow
    run("predict", test / "image_6.jpg", test / "image_7.jpg", "--model", d / "model", "--out", d / "preds")
    for i in (6, 7):
        labels = Image.open(d / "preds" / f"image_{i}_labels.png")
        assert labels.mode == "P" and labels.size == (256, 256)
        assert set(np.unique(np.asarray(labels))) <= {0, 1, 2, 3}
        for kind in ("overlay", "uncertainty"):  # the picture at 256x256, a legend / colour bar to its right
            picture = Image.open(d / "preds" / f"image_{i}_{kind}.png")
            assert picture.size[0] > 256 and picture.size[1] == 256


def test_evaluate_json_matches_miou_recomputed_from_predictions(workflow):
    d, test = workflow
    run("predict", test, "--model", d / "model", "--out", d / "preds_all")
    result = json.loads(run("evaluate", "--model", d / "model", "--images", test, "--masks", test, "--json"))
    # the reference's mIoU, recomputed by hand from the written label PNGs
    inter, union = np.zeros(4), np.zeros(4)
    for i in (6, 7):
        pred = np.asarray(Image.open(d / "preds_all" / f"image_{i}_labels.png"))
        truth = np.load(test / f"image_{i}.npy")
        for c in range(4):
            inter[c] += np.sum((pred == c) & (truth == c))
            union[c] += np.sum((pred == c) | (truth == c))
    iou = np.where(union > 0, inter / np.maximum(union, 1), 0.0)
    assert result["miou"] == pytest.approx(iou.mean(), abs=1e-9)
    assert list(result["per_class"].values()) == pytest.approx(list(iou), abs=1e-9)
    assert result["n_images"] == 2


def test_kmeans_grid(workflow, tiny_ckpt, eyes8):
    d, _ = workflow
    ckpt, flags = tiny_ckpt
    run("kmeans", eyes8 / "image_0.jpg", "--ckpt", ckpt, "--model-flags", flags, "--k", 3, "--steps", "50,250",
        "--blocks", "6,12", "--out", d / "grid.png")
    grid = Image.open(d / "grid.png")
    assert grid.width > grid.height  # 1 image column + 2 timesteps, 2 block rows


def test_blocks_lists_every_decoder_block(tiny_ckpt):
    ckpt, flags = tiny_ckpt
    out = run("blocks", "--ckpt", ckpt, "--model-flags", flags)
    rows = [line.split() for line in out.splitlines()[1:]]
    assert len(rows) == 18
    assert rows[12] == ["12", "output_blocks.12", "32", "32x32", "yes"]  # yes: one of --blocks auto's
    assert [r[0] for r in rows if r[-1] == "yes"] == ["5", "6", "7", "8", "12"]


def test_presets_lists_the_five_presets():
    out = run("presets")
    for name in ("ffhq_256", "lsun_bedroom_256", "lsun_cat_256", "lsun_horse_256", "imagenet_256_uncond"):
        assert name in out


def test_demo_runs_offline(tmp_path):
    out = run("demo", "--dir", tmp_path / "demo")
    assert "random weights give no semantic quality" in out
    assert "mIoU" in out
    assert (tmp_path / "demo" / "kmeans.png").is_file()


def test_bedroom_28_trains_without_background_and_scores_28_classes(workflow, eyes8, tmp_path):
    """Bedroom-28 as the reference runs it: 29 label indices, 0 (background) the ignore label
    (number_class 29, ignore_label 0); eyes masks stand in for bedroom masks (labels 0..3)."""
    d, test = workflow
    out = run("fit", "--features", d / "feats.h5", "--masks", eyes8, "--labels", 2, "--ensemble", 2,
              "--max-epochs", 1, "--classes", "bedroom_28", "--out", tmp_path / "bedroom", "--device", "cpu")
    assert "29 classes" in out
    fit = json.loads((tmp_path / "bedroom" / "model.json").read_text())["fit"]
    grids = [np.load(eyes8 / f"image_mask{i}.npy")[2::4, 2::4] for i in (0, 1)]  # nearest to the 64x64 model grid
    assert fit["ignore_index"] == 0 and fit["min_pixels"] == 20
    kept = [np.isin(g, [c for c in np.unique(g) if c != 0 and (g == c).sum() >= 20]) for g in grids]
    assert fit["n_pixels"] == sum(int(k.sum()) for k in kept)  # background never trained on
    r = json.loads(run("evaluate", "--model", tmp_path / "bedroom", "--images", test, "--masks", test, "--json"))
    assert len(r["per_class"]) == 28 and "background" not in r["per_class"] and "table staff" in r["per_class"]
    # --ignore-index overrides the label set's: background trained and scored, as class 0
    run("fit", "--features", d / "feats.h5", "--masks", eyes8, "--labels", 2, "--ensemble", 2, "--max-epochs", 1,
        "--classes", "bedroom_28", "--ignore-index", 255, "--min-pixels", 0, "--out", tmp_path / "all", "--device", "cpu")
    fit = json.loads((tmp_path / "all" / "model.json").read_text())["fit"]
    assert (fit["ignore_index"], fit["min_pixels"], fit["n_pixels"]) == (255, 0, 2 * 64 * 64)
