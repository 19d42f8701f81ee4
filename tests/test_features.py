"""Fidelity of the ADM features through the cache: what extract stores equals the paper's
recipe, implemented here independently and naively (closed-form q_sample, one full forward
per t with forward hooks on output_blocks, bilinear upsampling, concatenation); the full
ffhq_256 architecture; bf16 and the cache's identity. (The in-memory features of both
families: test_backbones.py.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ddpmseg.backbones import create_backbone, get_preset
from ddpmseg.backbones.adm import build_unet
from ddpmseg.errors import DdpmsegError
from ddpmseg.features.cache import FeatureCache
from ddpmseg.features.extractor import extract_block_maps, make_noise, upsample_concat
from ddpmseg.features.pixels import CachePixels
from ddpmseg.pipeline import extract_features
from ddpmseg.records import ExtractConfig
from recipe_helpers import hooked_recipe, reference_image_tensor, rel_err


def naive_recipe(model, x0, noise, steps, blocks):
    """The reference recipe on an ADM: hooks on ``output_blocks``, full forward per t."""
    return hooked_recipe({b: model.output_blocks[b] for b in blocks}, model, x0, noise, steps)


@pytest.fixture(scope="module")
def tiny_backbone(tiny_ckpt):
    ckpt, flags = tiny_ckpt
    return create_backbone(ckpt, flags=flags, device="cpu")


@pytest.mark.parametrize("storage,tol", [("float32", 1e-5), ("float16", 2e-3)])
def test_cache_pixel_features_match_naive_recipe(tmp_path, tiny_ckpt, tiny_backbone, eyes8, storage, tol):
    ckpt, flags = tiny_ckpt
    cfg = ExtractConfig(storage_dtype=storage)
    out = tmp_path / "feats.h5"
    extract_features(ckpt, [eyes8 / "image_0.jpg", eyes8 / "image_1.jpg"], out, config=cfg, model_flags=flags, device="cpu")
    with FeatureCache(out) as cache:
        assert cache.image_ids == ["image_0", "image_1"]
        assert cache.noise.shape == (1, 3, 64, 64)
        # the shared noise: one draw of a CPU generator seeded 0, written out without ddpmseg's make_noise
        seeded = torch.randn((1, 3, 64, 64), generator=torch.Generator().manual_seed(0), dtype=torch.float32)
        np.testing.assert_array_equal(cache.noise, seeded.numpy())
        for image_id in cache.image_ids:
            x0 = reference_image_tensor(eyes8 / f"{image_id}.jpg", 64)
            ref = naive_recipe(tiny_backbone.model, x0, torch.from_numpy(cache.noise), cache.steps, cache.blocks)
            feats = cache.pixel_features(image_id)
            assert feats.dtype == torch.float32 and feats.shape == ref.shape
            assert rel_err(feats, ref) < tol


def test_cache_pixels_gather_equals_upsampled_features(tiny_backbone):
    torch.manual_seed(0)
    keys = [(50, 5), (50, 8), (150, 12)]
    images = []
    for _ in range(3):
        x0 = torch.rand(1, 3, 64, 64) * 2 - 1
        images.append(extract_block_maps(tiny_backbone, x0, make_noise(1, 64), [50, 150], [5, 8, 12]))
    source = CachePixels(images, keys, 64, dtype=torch.float32)
    assert len(source) == 3 * 64 * 64
    # the paper's pixel features written out with plain torch: each map upsampled bilinearly, concatenated
    full = torch.stack([torch.cat([torch.nn.functional.interpolate(m[k][None].float(), size=(64, 64), mode="bilinear",
                                                                   align_corners=False)[0] for k in keys])
                        for m in images])  # (3, C, 64, 64)
    idx = torch.randint(0, len(source), (500,))
    rows = source.gather(idx)
    expect = full.permute(0, 2, 3, 1).reshape(-1, full.shape[1])[idx]
    assert torch.allclose(rows, expect, rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # builds the full 552 M-parameter network (2.2 GB of float32 weights)
def test_ffhq_256_architecture_gives_8448_channels():
    cfg = get_preset("ffhq_256").config
    model = build_unet(cfg)  # the full 552 M-parameter network, random weights
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(552.8e6, rel=1e-3)
    assert len(model.output_blocks) == cfg.num_output_blocks == 18
    shapes = cfg.output_block_shapes()
    per_step = sum(shapes[b][0] for b in (5, 6, 7, 8, 12))
    assert per_step == 2816 and 3 * per_step == 8448
    assert [shapes[b] for b in (5, 6, 7, 8, 12)] == [(1024, 32), (512, 32), (512, 32), (512, 64), (256, 128)]
    # the channel counts also hold in the built modules (last layer of each block)
    for b in (5, 6, 7, 8, 12):
        convs = [m for m in model.output_blocks[b].modules() if isinstance(m, torch.nn.Conv2d)]
        assert convs[-1].out_channels == shapes[b][0]


def _per_map_rel_err(ours: torch.Tensor, ref: torch.Tensor, n_maps_channels: list[int]) -> list[float]:
    """Norm-relative error of each (t, block) slice of two (C, S, S) feature stacks."""
    errs, col = [], 0
    for c in n_maps_channels:
        a, b = ours[col : col + c], ref[col : col + c]
        errs.append(float((a - b).norm() / b.norm()))
        col += c
    return errs


@pytest.mark.parametrize("steps,blocks", [((50, 150, 250), (5, 6, 7, 8, 12)), ((0, 999), (2, 17))])
def test_bf16_features_stay_within_two_percent_of_the_fp32_recipe(tiny_backbone, eyes8, steps, blocks):
    size = tiny_backbone.image_size
    x0 = reference_image_tensor(eyes8 / "image_1.jpg", size)
    noise = make_noise(0, size)
    keys = [(t, b) for t in steps for b in blocks]
    maps = extract_block_maps(tiny_backbone, x0, noise, steps, blocks, precision="bf16")
    assert all(m.dtype == torch.float32 for m in maps.values())
    ours = upsample_concat(maps, keys, size)
    ref = naive_recipe(tiny_backbone.model, x0, noise, steps, blocks)
    errs = _per_map_rel_err(ours, ref, [maps[k].shape[0] for k in keys])
    assert max(errs) < 0.02
    assert min(errs) > 0  # bf16 really ran: the features are not the fp32 ones


def test_precision_is_part_of_the_cache_identity(tmp_path, tiny_ckpt, eyes8):
    ckpt, flags = tiny_ckpt
    out = tmp_path / "feats.h5"
    extract_features(ckpt, [eyes8 / "image_0.jpg"], out, config=ExtractConfig(precision="bf16"), model_flags=flags, device="cpu")
    with FeatureCache(out) as cache:
        assert cache.record.extract.precision == "bf16"
    before = out.read_bytes()
    with pytest.raises(DdpmsegError, match="precision"):
        extract_features(ckpt, [eyes8 / "image_1.jpg"], out, config=ExtractConfig(), model_flags=flags, device="cpu")
    assert out.read_bytes() == before


def test_cache_from_before_precision_counts_as_fp32(tmp_path, tiny_ckpt, eyes8):
    import h5py
    import json

    ckpt, flags = tiny_ckpt
    out = tmp_path / "feats.h5"
    extract_features(ckpt, [eyes8 / "image_0.jpg"], out, config=ExtractConfig(), model_flags=flags, device="cpu")
    with h5py.File(out, "r+") as f:  # as written by ddpmseg before --precision existed
        config = json.loads(f.attrs["config"])
        del config["extract"]["precision"]
        f.attrs["config"] = json.dumps(config)
    s = extract_features(ckpt, [eyes8 / "image_1.jpg"], out, config=ExtractConfig(), model_flags=flags, device="cpu")
    assert (s.new, s.total) == (1, 2)


@pytest.mark.slow
def test_full_ffhq_256_features_equal_the_naive_recipe(eyes8):
    """The full 552 M-parameter architecture at 256x256 (random weights; ~1 min, ~3 GB)."""
    from ddpmseg.backbones._base import fill_zero_weights_

    torch.manual_seed(0)
    backbone = create_backbone(preset="ffhq_256", device="cpu")
    fill_zero_weights_(backbone.model)
    x0 = reference_image_tensor(eyes8 / "image_0.jpg", 256)
    noise = make_noise(0, 256)
    blocks = (5, 6, 7, 8, 12)
    ours = upsample_concat(extract_block_maps(backbone, x0, noise, (50,), blocks), [(50, b) for b in blocks], 256)
    ref = naive_recipe(backbone.model, x0, noise, (50,), blocks)
    assert ours.shape == ref.shape == (2816, 256, 256)
    assert rel_err(ours, ref) < 1e-5
