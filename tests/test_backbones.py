"""The Backbone contract, run on one tiny model of each family.

Every family must: number its decoder blocks like guided-diffusion's
``output_blocks`` (checked against a module table written out here, not the
one the implementation reports), give block maps equal to forward hooks on an
unmodified full forward (the paper's recipe, done naively), stop after the
last requested block, range-check indices, and run bf16 without changing the
model. The family-specific parts live in test_features.py (ADM, the cache)
and test_diffusers.py (folders, hub ids).
"""

from __future__ import annotations

import json

import pytest
import torch

from ddpmseg.backbones import create_backbone
from ddpmseg.demo import TINY_FLAGS
from ddpmseg.errors import DdpmsegError
from ddpmseg.features.extractor import extract_block_maps, make_noise, upsample_concat
from recipe_helpers import hooked_recipe, reference_image_tensor, rel_err

# The google 256x256 DDPM structure (6 levels, attention at the 5th down / 2nd up level), tiny.
TINY_UNET = dict(
    sample_size=64,
    block_out_channels=(32, 32, 64, 64, 128, 128),
    layers_per_block=2,
    down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4,
    attention_head_dim=None,
    norm_num_groups=8,
    downsample_padding=0,
    flip_sin_to_cos=False,
    freq_shift=1,
    norm_eps=1e-6,
)

# Decoder block k -> the module whose output it is. ADM: output_blocks.k. diffusers (L = 2 layers
# per block): up block k // 3; positions 0, 1 are that block's attentions (in AttnUpBlock2D) or
# resnets, position 2 is the whole up block (its last resnet/attention, then its upsampler).
MODULES = {
    "adm": {k: f"output_blocks.{k}" for k in range(18)},
    "diffusers": {
        0: "up_blocks.0.resnets.0", 1: "up_blocks.0.resnets.1", 2: "up_blocks.0",
        3: "up_blocks.1.attentions.0", 4: "up_blocks.1.attentions.1", 5: "up_blocks.1",
        6: "up_blocks.2.resnets.0", 7: "up_blocks.2.resnets.1", 8: "up_blocks.2",
        9: "up_blocks.3.resnets.0", 10: "up_blocks.3.resnets.1", 11: "up_blocks.3",
        12: "up_blocks.4.resnets.0", 13: "up_blocks.4.resnets.1", 14: "up_blocks.4",
        15: "up_blocks.5.resnets.0", 16: "up_blocks.5.resnets.1", 17: "up_blocks.5",
    },
}  # fmt: skip
# (channels, resolution) of blocks 5, 6, 7, 8, 12 at 64x64: the paper's depths of each family at 1/4 width
PAPER_SHAPES = {
    "adm": [(128, 8), (64, 8), (64, 8), (64, 16), (32, 32)],
    "diffusers": [(128, 8), (64, 8), (64, 8), (64, 16), (32, 32)],
}
PAPER_BLOCKS = (5, 6, 7, 8, 12)
# a module that runs inside decoder block k, and the output head (runs only without stop_early)
INSIDE = {"adm": MODULES["adm"], "diffusers": {k: f"up_blocks.{k // 3}.resnets.{k % 3}" for k in range(18)}}
HEAD = {"adm": "out", "diffusers": "conv_out"}


def _adm(tmp_path_factory):
    from guided_diffusion import script_util

    from ddpmseg.backbones import AdmConfig
    from ddpmseg.backbones.adm import random_unet

    d = tmp_path_factory.mktemp("adm")
    torch.save(random_unet(AdmConfig.from_flags(TINY_FLAGS), seed=0).state_dict(), d / "tiny.pt")
    (d / "tiny.json").write_text(json.dumps(TINY_FLAGS))
    backbone = create_backbone(d / "tiny.pt", flags=d / "tiny.json", device="cpu")
    args = script_util.model_and_diffusion_defaults()
    args.update(TINY_FLAGS)
    fresh, _ = script_util.create_model_and_diffusion(**args)
    fresh.load_state_dict(torch.load(d / "tiny.pt", weights_only=True))
    return backbone, fresh.eval(), fresh


def _diffusers(tmp_path_factory):
    diffusers = pytest.importorskip("diffusers")
    from ddpmseg.backbones.diffusers_unet import random_unet2d

    d = tmp_path_factory.mktemp("diffusers")
    random_unet2d(TINY_UNET, seed=0).save_pretrained(d / "pipe" / "unet")
    diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear").save_pretrained(d / "pipe" / "scheduler")
    backbone = create_backbone(d / "pipe", device="cpu")
    fresh = diffusers.UNet2DModel.from_pretrained(str(d / "pipe" / "unet")).eval()
    return backbone, fresh, lambda x, t: fresh(x, t).sample


@pytest.fixture(scope="module", params=["adm", "diffusers"])
def family(request, tmp_path_factory):
    """(family name, ddpmseg backbone, an unmodified model with the same weights, its full forward)."""
    backbone, fresh, forward = {"adm": _adm, "diffusers": _diffusers}[request.param](tmp_path_factory)
    return request.param, backbone, fresh, forward


def test_block_numbering_matches_the_module_table(family):
    name, backbone, fresh, _ = family
    infos = backbone.blocks()
    assert [b.index for b in infos] == list(range(18))
    assert [b.module.split(" ")[0] for b in infos] == [MODULES[name][k] for k in range(18)]
    assert [(infos[b].channels, infos[b].resolution) for b in PAPER_BLOCKS] == PAPER_SHAPES[name]


def test_block_shapes_match_a_real_forward(family):
    _, backbone, _, _ = family
    maps = backbone.forward_intermediates(torch.zeros(1, 3, 64, 64), torch.tensor([10]), list(range(18)))
    for b in backbone.blocks():
        assert tuple(maps[b.index].shape) == (1, b.channels, b.resolution, b.resolution)


@pytest.mark.parametrize("steps,blocks", [((50, 150, 250), PAPER_BLOCKS), ((0, 999), (0, 17)), ((10,), (3, 4, 14))])
def test_features_equal_hooks_on_an_unmodified_full_forward(family, eyes8, steps, blocks):
    name, backbone, fresh, forward = family
    x0 = reference_image_tensor(eyes8 / "image_0.jpg", 64)
    noise = make_noise(0, 64)
    keys = [(t, b) for t in steps for b in blocks]
    ours = upsample_concat(extract_block_maps(backbone, x0, noise, steps, blocks), keys, 64)
    ref = hooked_recipe({b: fresh.get_submodule(MODULES[name][b]) for b in blocks}, forward, x0, noise, steps)
    assert ours.shape == ref.shape
    assert rel_err(ours, ref) < 1e-5


def test_stops_after_the_last_requested_block(family):
    name, backbone, _, _ = family
    ran = []
    m = backbone.model
    hooks = [m.get_submodule(mod).register_forward_hook(lambda *a, k=k: ran.append(k)) for k, mod in INSIDE[name].items()]
    hooks.append(m.get_submodule(HEAD[name]).register_forward_hook(lambda *a: ran.append("head")))
    x, t = torch.zeros(2, 3, 64, 64), torch.tensor([5, 7])
    try:
        maps = backbone.forward_intermediates(x, t, [3, 7])
        assert set(maps) == {3, 7} and ran == list(range(8))  # blocks 0..7, nothing after, no head
        ran.clear()
        full = backbone.forward_intermediates(x, t, [3, 7], stop_early=False)
        assert ran == [*range(18), "head"]
        assert all(torch.equal(full[k], maps[k]) for k in maps)
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.parametrize("blocks,match", [([18], "block index 18 out of range: this model has decoder blocks 0..17"),
                                          ([3, 3], "duplicated block index"), ([], "no block index given")])
def test_indices_are_range_checked(family, blocks, match):
    _, backbone, _, _ = family
    with pytest.raises(DdpmsegError, match=match):
        backbone.forward_intermediates(torch.zeros(1, 3, 64, 64), torch.tensor([10]), blocks)


def test_bf16_stays_close_and_leaves_the_model_unchanged(family, eyes8):
    _, backbone, _, _ = family
    x0 = reference_image_tensor(eyes8 / "image_2.jpg", 64)
    noise = make_noise(0, 64)
    ref = extract_block_maps(backbone, x0, noise, (50, 250), PAPER_BLOCKS)
    low = extract_block_maps(backbone, x0, noise, (50, 250), PAPER_BLOCKS, precision="bf16")
    again = extract_block_maps(backbone, x0, noise, (50, 250), PAPER_BLOCKS)
    errs = [float((low[k] - ref[k]).norm() / ref[k].norm()) for k in ref]
    # measured on these random nets: ADM 1.1-1.4 % per map; diffusers (8-channel groups) 1.4-2.0 % on a
    # Xeon with AMX, up to 2.003 % on an AMD Zen 4 (AVX512-BF16, no AMX): bf16 kernels round per CPU
    assert 0 < max(errs) < 0.025  # bf16 really ran, and stayed within a few percent
    assert all(low[k].dtype == torch.float32 for k in low)
    assert all(torch.equal(again[k], ref[k]) for k in ref)  # hooks and autocast are gone afterwards


@pytest.mark.parametrize("precision,message", [("fp16", "CUDA"), ("int8", "precision")])
def test_unusable_precisions_are_refused(family, precision, message):
    _, backbone, _, _ = family
    with pytest.raises(DdpmsegError, match=message):
        with backbone.precision(precision):
            pass


def test_q_sample_is_the_linear_schedule(family):
    import numpy as np

    _, backbone, _, _ = family
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))
    x0, noise = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    t = torch.tensor([0, 600])
    want = torch.stack([float(np.sqrt(abar[s])) * x0[i] + float(np.sqrt(1 - abar[s])) * noise[i] for i, s in enumerate(t)])
    # diffusers keeps alphas_cumprod in float32: sqrt(1 - abar) near t=0 is off by ~1e-6
    torch.testing.assert_close(backbone.q_sample(x0, t, noise), want, rtol=1e-5, atol=5e-6)


def test_default_blocks_are_the_papers_depths(family):
    _, backbone, _, _ = family
    assert backbone.default_blocks() == list(PAPER_BLOCKS)  # an 18-block decoder: the paper's own choice
    from ddpmseg.train import small_architecture

    small = create_backbone(flags=small_architecture(32), device="cpu")  # 9 blocks: the same fractions of the depth
    assert small.config.num_output_blocks == 9 and small.default_blocks() == [2, 3, 4, 6]
