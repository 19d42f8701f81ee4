"""Files written by ddpmseg 0.1.0 still open, extend and predict the same.

The fixtures in tests/fixtures/v0_1_0/ were written once by 0.1.0 (its
make.py says how): for each backbone family a micro checkpoint, a feature
cache of two eyes8 images, a model fitted on them and the label PNG it
predicted for a third image.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from ddpmseg.cli.main import main
from ddpmseg.features.cache import FeatureCache

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "v0_1_0"
pytestmark = pytest.mark.usefixtures("one_thread")


def ckpt_args(family: str) -> list[str]:
    d = FIXTURES / family
    if family == "adm":
        return ["--ckpt", str(d / "micro_adm.pt"), "--model-flags", str(d / "micro_adm.json")]
    pytest.importorskip("diffusers")
    return ["--ckpt", str(d / "micro_ddpm")]


def ok(*args) -> str:
    result = CliRunner().invoke(main, ["-q", *map(str, args)])
    assert result.exit_code == 0, (result.output, result.exception)
    return result.output


@pytest.fixture
def legacy(tmp_path, request) -> Path:
    """A writable copy of one family's fixture folder."""
    family = request.param
    ckpt_args(family)  # skips without diffusers
    shutil.copytree(FIXTURES / family, tmp_path / family)
    return tmp_path / family


@pytest.mark.parametrize("legacy", ["adm", "diffusers"], indirect=True)
def test_legacy_cache_opens(legacy):
    with FeatureCache(legacy / "feats.h5") as cache:
        assert cache.image_ids == ["image_0", "image_1"]
        assert cache.steps == [50, 150] and cache.blocks == [1, 2]
        feats = cache.pixel_features("image_0")
        assert feats.shape == (cache.n_features, 32, 32) and torch.isfinite(feats).all()


@pytest.mark.parametrize("legacy", ["adm", "diffusers"], indirect=True)
def test_legacy_model_predicts_what_0_1_0_predicted(legacy, eyes8, tmp_path):
    family = legacy.name
    ckpt = [a.replace(str(FIXTURES / family), str(legacy)) for a in ckpt_args(family)][:2]
    ok("predict", eyes8 / "image_3.jpg", "--model", legacy / "model", *ckpt, "--out", tmp_path / "preds", "--device", "cpu")
    got = np.asarray(Image.open(tmp_path / "preds" / "image_3_labels.png"))
    want = np.asarray(Image.open(legacy / "predicted" / "image_3_labels.png"))
    assert got.shape == want.shape == (256, 256)
    # another CPU may round a near-tie pixel the other way; on the machine that wrote them they are equal
    assert (got != want).mean() < 1e-3


@pytest.mark.parametrize("legacy", ["adm", "diffusers"], indirect=True)
def test_legacy_cache_is_extended_with_the_same_features(legacy, eyes8):
    family = legacy.name
    ckpt = [a.replace(str(FIXTURES / family), str(legacy)) for a in ckpt_args(family)]
    with FeatureCache(legacy / "feats.h5") as cache:
        old = cache.block_maps("image_1")
    shutil.copy(eyes8 / "image_1.jpg", legacy / "again_image_1.jpg")
    out = ok("extract", *ckpt, "--images", eyes8 / "image_2.jpg", "--images", legacy / "again_image_1.jpg",
             "--out", legacy / "feats.h5", "--steps", "50,150", "--blocks", "1,2", "--device", "cpu")
    assert "2 new" in out
    with FeatureCache(legacy / "feats.h5") as cache:
        assert cache.image_ids == ["again_image_1", "image_0", "image_1", "image_2"]
        new = cache.block_maps("again_image_1")
    for k in old:  # float16 storage: equal, or one rounding step apart on another CPU
        np.testing.assert_allclose(new[k].astype(np.float32), old[k].astype(np.float32), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("legacy", ["adm", "diffusers"], indirect=True)
def test_refit_on_a_legacy_cache_gives_the_legacy_weights(legacy, eyes8, tmp_path):
    # 0.1.0 applied --min-pixels 20 on the model grid (32 px here: the iris fell under it); 0.2 counts at the
    # mask's resolution. Masks with those grid-rare classes already blanked train on 0.1.0's labels.
    from ddpmseg import data

    masks = tmp_path / "masks"
    masks.mkdir()
    with FeatureCache(legacy / "feats.h5") as cache:
        for i in (0, 1):
            mask = np.load(eyes8 / f"image_mask{i}.npy")
            grid = data.prepare_mask(mask, data.Preprocess.from_dict(cache.preprocess(f"image_{i}")))
            values, counts = np.unique(grid, return_counts=True)
            mask[np.isin(mask, values[counts < 20])] = 255
            np.save(masks / f"image_mask{i}.npy", mask)
    ok("fit", "--features", legacy / "feats.h5", "--masks", masks, "--ensemble", 2, "--max-epochs", 2, "--recipe", "reference",
       "--out", tmp_path / "model", "--device", "cpu")
    old = torch.load(legacy / "model" / "tensors.pt", weights_only=True)["ensemble"]["module"]
    new = torch.load(tmp_path / "model" / "tensors.pt", weights_only=True)["ensemble"]["module"]
    assert old.keys() == new.keys()
    for k in old:
        torch.testing.assert_close(new[k], old[k], rtol=1e-4, atol=1e-5)


MAIN_4F5F4DF = Path(__file__).resolve().parent / "fixtures" / "main_4f5f4df"


@pytest.mark.parametrize("head", ["mlp", "ddp"])
def test_models_of_main_before_the_head_registry_predict_the_same(head, eyes8, tmp_path):
    """model.json format 2 (fit.ddp, the ensemble's settings as fit fields) loads through the registry and
    predicts what main predicted at 4f5f4df (tests/fixtures/main_4f5f4df/make.py)."""
    import json

    from ddpmseg.model import SegmentationModel

    model = MAIN_4F5F4DF / head / "model"
    assert json.loads((model / "model.json").read_text())["format_version"] == 2
    loaded = SegmentationModel.load(model)
    assert loaded.record.fit.head == head
    if head == "ddp":  # the settings fit.ddp held, now the head's own keywords
        assert (loaded.classifier.steps, loaded.classifier.width, loaded.classifier.iterations) == (2, 16, 30)
    else:
        assert (loaded.classifier.n_members, loaded.classifier.recipe) == (2, "tiles")
    adm = FIXTURES / "adm"
    ok("predict", eyes8 / "image_3.jpg", "--model", model, "--ckpt", adm / "micro_adm.pt", "--out", tmp_path / "p",
       "--device", "cpu")
    got = np.asarray(Image.open(tmp_path / "p" / "image_3_labels.png"))
    want = np.asarray(Image.open(MAIN_4F5F4DF / head / "predicted" / "image_3_labels.png"))
    assert got.shape == want.shape == (256, 256)
    assert (got != want).mean() < 1e-3  # equal on the machine that wrote them; a near tie may flip elsewhere


def test_a_refit_writes_model_json_format_3_with_the_heads_options(tmp_path, eyes8):
    import json

    adm = FIXTURES / "adm"
    ok("fit", "--features", adm / "feats.h5", "--masks", eyes8, "--head", "ddp", "--head-option", "iterations=3",
       "--head-option", "width=16", "--out", tmp_path / "m", "--device", "cpu")
    d = json.loads((tmp_path / "m" / "model.json").read_text())
    assert d["format_version"] == 3
    assert d["fit"]["head"] == "ddp" and d["fit"]["head_config"]["width"] == 16
    assert "ddp" not in d["fit"] and "ensemble" not in d["fit"]
    state = torch.load(tmp_path / "m" / "tensors.pt", weights_only=True)["ddp"]
    assert "config" not in state  # settings once, in model.json
