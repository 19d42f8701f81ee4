"""The tiles recipe (the default of `ddpmseg fit`): layer 1 at the block maps' native resolution equals
layer 1 on the paper's upsampled pixel features, and the recipe trains, is seeded, keeps to its budget
and stops on a plateau of the training loss."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ddpmseg.classify import ArrayPixels, training
from ddpmseg.heads.mlp import PixelEnsemble
from ddpmseg.classify.training import PlateauStop, tile_plan
from ddpmseg.errors import DdpmsegError
from ddpmseg.features.pixels import CachePixels

KEYS = [(50, 1), (50, 2), (150, 1), (150, 3)]
SHAPES = {1: (6, 4), 2: (5, 8), 3: (3, 16)}  # block -> (channels, side): three native resolutions, like a decoder


def _maps(n_images: int, size: int = 16, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{k: torch.randn(SHAPES[k[1]][0], SHAPES[k[1]][1] * size // 16, SHAPES[k[1]][1] * size // 16, generator=g)
             for k in KEYS} for _ in range(n_images)]


def _pixel_features(maps: list[dict], size: int) -> torch.Tensor:
    """The paper's pixel features, written plainly: every map upsampled bilinearly, concatenated (N, S, S, D)."""
    per_image = [torch.cat([F.interpolate(m[k][None].float(), size=(size, size), mode="bilinear", align_corners=False)[0]
                            for k in KEYS]) for m in maps]
    return torch.stack(per_image).permute(0, 2, 3, 1)


@pytest.mark.parametrize("size, tile", [(16, 4), (16, 2), (32, 8), (32, 5)])
def test_native_layer1_equals_layer1_on_upsampled_features_with_its_gradient(size, tile):
    maps = _maps(2, size)
    source = CachePixels(maps, KEYS, size, dtype=torch.float32)
    feats = _pixel_features(maps, size)
    g = torch.Generator().manual_seed(1)
    w = torch.randn(source.n_features, 7, generator=g).requires_grad_()
    # tiles at the corners, the edges and inside (a tile may run past no edge)
    img = torch.tensor([0, 1, 1, 0, 1])
    y0 = torch.tensor([0, size - tile, 3, size - tile, 1])
    x0 = torch.tensor([0, size - tile, size - tile, 2, 0])
    out = source.tiles_layer1(img, y0, x0, tile, [w[rows] for rows in source.layer1_rows()])
    expect = torch.stack([feats[i, a : a + tile, b : b + tile].reshape(tile * tile, -1) for i, a, b in zip(img, y0, x0)]) @ w
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-5)
    upstream = torch.randn(out.shape, generator=g)
    (grad,) = torch.autograd.grad((out * upstream).sum(), w)
    (expect_grad,) = torch.autograd.grad((expect * upstream).sum(), w)
    torch.testing.assert_close(grad, expect_grad, rtol=1e-4, atol=1e-4)


def test_layer1_rows_partition_the_features_by_resolution():
    source = CachePixels(_maps(1), KEYS, 16, dtype=torch.float32)
    rows = source.layer1_rows()
    # features in key order: (50,1) 0-5, (50,2) 6-10, (150,1) 11-16, (150,3) 17-19
    assert [r.tolist() for r in rows] == [[*range(0, 6), *range(11, 17)], list(range(6, 11)), list(range(17, 20))]


def _teacher_problem(n_images: int, size: int = 16, k: int = 3, seed: int = 0) -> tuple[CachePixels, np.ndarray, torch.Tensor]:
    """Every pixel labelled by a fixed linear teacher on its exact pixel feature: separable by construction."""
    maps = _maps(n_images, size, seed)
    feats = _pixel_features(maps, size).reshape(-1, sum(SHAPES[b][0] for _, b in KEYS))
    teacher = torch.randn(feats.shape[1], k, generator=torch.Generator().manual_seed(99))
    return CachePixels(maps, KEYS, size, dtype=torch.float32), (feats @ teacher).argmax(1).numpy(), feats


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_tiles_recipe_learns_a_separable_case_far_better_than_a_trivial_classifier(precision):
    source, y, feats = _teacher_problem(4)
    n_train = 3 * 16 * 16
    y_train = y.copy()
    y_train[n_train:] = 255  # image 4 is held out
    est = PixelEnsemble(recipe="tiles", precision=precision, n_members=3, batch_size=64, random_state=0).fit(source, y_train)
    assert est.precision_ == precision and est.batch_size_ == 64
    held = y[n_train:]
    accuracy = (est.predict(feats[n_train:]) == held).mean()
    trivial = np.bincount(y[:n_train]).max() / n_train  # the majority class of the training pixels
    assert trivial < 0.6 and accuracy > 0.85, (accuracy, trivial)


def test_tiles_recipe_is_deterministic_for_a_seed():
    source, y, _ = _teacher_problem(2)
    kw = dict(recipe="tiles", n_members=2, batch_size=64, max_epochs=3, precision="fp32")
    a, b = PixelEnsemble(random_state=4, **kw).fit(source, y), PixelEnsemble(random_state=4, **kw).fit(source, y)
    c = PixelEnsemble(random_state=5, **kw).fit(source, y)
    sa, sb, sc = a.module_.state_dict(), b.module_.state_dict(), c.module_.state_dict()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name
    assert not torch.equal(sa["w1"], sc["w1"])
    assert not torch.equal(sa["w1"][0], sa["w1"][1])  # members keep their own inits
    assert a.final_loss_ == b.final_loss_


def test_each_epoch_visits_every_labelled_pixel_once_and_the_budget_caps_it(monkeypatch):
    source, y, _ = _teacher_problem(2)
    y = y.copy()
    y[::7] = 255  # unlabelled pixels are in the tiles but not trained on
    labelled = int((y != 255).sum())
    tile, per_step = tile_plan(16, training.RECIPES["tiles"].tile_div, 64)
    assert (tile, per_step) == (2, 16)  # 2 images x 64 tiles of 2x2: 8 steps an epoch
    est = PixelEnsemble(recipe="tiles", n_members=2, batch_size=64, max_epochs=3, precision="fp32").fit(source, y)
    assert est.n_iter_ == [24, 24] and est.pixels_seen_ == [3 * labelled] * 2
    assert [len(c) for c in est.loss_curve_] == [3, 3]
    est = PixelEnsemble(recipe="tiles", n_members=1, batch_size=64, precision="fp32").fit(source, y)
    assert est.n_iter_ == [8 * training.TILES_EPOCHS]  # its own epoch budget, not the reference's 100-epoch cap
    monkeypatch.setitem(training.RECIPES, "tiles", dataclasses.replace(training.RECIPES["tiles"], max_steps=11))
    est = PixelEnsemble(recipe="tiles", n_members=1, batch_size=64, precision="fp32").fit(source, y)
    assert est.n_iter_ == [11]


def test_tiles_recipe_needs_block_maps():
    x = np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32)
    with pytest.raises(DdpmsegError, match=r"recipe='tiles' needs the native-resolution block maps") as info:
        PixelEnsemble(recipe="tiles").fit(ArrayPixels(x), np.arange(64) % 2)
    assert "\n" not in str(info.value)


def test_plateau_stop_on_synthetic_loss_sequences():
    falling = PlateauStop(min_steps=10, patience=5, rel=1e-3)
    assert not any(falling.update(1.0 / (1 + 0.1 * i), 0) for i in range(500))  # still falling: never stops
    flat = PlateauStop(min_steps=10, patience=5, rel=1e-3)
    flags = [flat.update(1.0, 0) for _ in range(15)]
    # steps 1-9 only track the best; from step 10 on none improves on it: step 15 is the sixth (6 > 5)
    assert flags == [False] * 14 + [True] and flat.stopped
    capped = PlateauStop(min_steps=10, patience=5, max_steps=30)
    assert [capped.update(1.0 / (1 + i), 0) for i in range(30)] == [False] * 29 + [True]
    late = PlateauStop(min_epochs=2, min_steps=0, patience=1)
    assert not any(late.update(1.0, 0) for _ in range(20)) and not late.update(1.0, 2) and late.update(1.0, 2)


def test_fit_uses_the_tiles_recipe_by_default_and_says_what_it_did(eyes_world, tmp_path):
    import json

    from cli_helpers import ok

    d, imgs = eyes_world
    out = ok("fit", "--features", d / "feats.h5", "--masks", imgs, "--ensemble", 2, "--max-epochs", 2, "--out", tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "model.json").read_text())["fit"]
    assert (cfg["head_config"]["recipe"], cfg["head_config"]["batch_size"]) == ("tiles", 1024)
    labelled, steps = cfg["n_pixels"], cfg["n_iter"][0]
    # 3 images of 64x64 (tiles of 4x4: 256 an image, 64 a step): 12 steps an epoch, 2 epochs
    assert cfg["n_iter"] == [24, 24]
    pixels = f"{2 * labelled / 1e6:.2f} M pixels per member"
    assert f"(tiles recipe: 2 epochs, {steps} steps and {pixels}, final loss " in out, out
