"""ADM -> diffusers conversion: a converted tiny random ADM (the ffhq_256 structure and
variants) gives the ADM's output, noising and decoder-block features; refusals; the CLI
command and ``extract --ckpt`` on its output.

Skipped when diffusers is not installed (it is an optional extra)."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

diffusers = pytest.importorskip("diffusers")

from ddpmseg.backbones import AdmConfig, create_backbone  # noqa: E402
from ddpmseg.backbones import convert as convert_mod  # noqa: E402
from ddpmseg.backbones.adm import build_unet, random_unet  # noqa: E402
from ddpmseg.backbones.convert import convert_adm_to_diffusers  # noqa: E402
from ddpmseg.cli.main import main  # noqa: E402
from ddpmseg.demo import TINY_FLAGS, make_synthetic_dataset  # noqa: E402
from ddpmseg.errors import DdpmsegError  # noqa: E402
from ddpmseg.features.cache import FeatureCache  # noqa: E402
from recipe_helpers import rel_err

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = 1e-5

# ffhq_256's structure at 64x64 (resblock_updown, scale-shift norm, learned sigma, 64-wide heads
# -> 32 here, attention at three levels), then variants of every choice the converter maps.
CONFIGS = {
    "ffhq_like": dict(TINY_FLAGS),
    "conv_updown_plain_norm_one_head": dict(
        TINY_FLAGS, image_size=32, channel_mult="1,1,2,2", attention_resolutions="16,8", resblock_updown=False,
        use_scale_shift_norm=False, learn_sigma=False, num_head_channels=-1, num_heads=1, diffusion_steps=500,
    ),
    "fixed_heads_new_order_cosine": dict(
        TINY_FLAGS, image_size=32, channel_mult="1,2,2", attention_resolutions="16,8", num_head_channels=-1,
        num_heads=2, use_new_attention_order=True, noise_schedule="cosine",
    ),
}
# three levels at 32x32: for the tests that need a checkpoint, not the full structure
SMALL_FLAGS = dict(TINY_FLAGS, image_size=32, channel_mult="1,2,2", attention_resolutions="16,8")


def _save_adm(directory, flags: dict, seed: int = 0):
    ckpt, flag_file = directory / "adm.pt", directory / "adm.json"
    torch.save(random_unet(AdmConfig.from_flags(flags), seed=seed).state_dict(), ckpt)
    flag_file.write_text(json.dumps(flags))
    return ckpt, flag_file


@pytest.fixture(scope="module", params=list(CONFIGS))
def converted(request, tmp_path_factory):
    """(ADM backbone, diffusers backbone of its conversion, flags) for each config."""
    flags = CONFIGS[request.param]
    d = tmp_path_factory.mktemp(request.param)
    ckpt, flag_file = _save_adm(d, flags)
    result = convert_adm_to_diffusers(ckpt, d / "converted", model_flags=flag_file)
    assert result.max_rel_err <= TOL
    config = AdmConfig.from_flags(flags)
    return create_backbone(ckpt, flags=config, device="cpu"), create_backbone(result.out, device="cpu"), config


def _steps(config: AdmConfig) -> torch.Tensor:
    n = config.diffusion_steps
    return torch.tensor([0, n // 4, n - 1])


def _input(config: AdmConfig, n: int, seed: int) -> torch.Tensor:
    """Half the model size: the network is convolutional, and the forward passes stay cheap."""
    side = config.image_size // 2
    return torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(seed))


def test_final_output_matches(converted):
    adm, dif, config = converted
    t = _steps(config)
    x = _input(config, len(t), seed=1)
    with torch.no_grad():
        want, got = adm.model(x, t), dif.model(x, t).sample
    assert got.shape == want.shape == (len(t), 6 if config.learn_sigma else 3, *x.shape[2:])
    errs = {"eps": rel_err(got[:, :3], want[:, :3])}
    if config.learn_sigma:
        errs["sigma"] = rel_err(got[:, 3:], want[:, 3:])
    print(f"\nfinal output max relative error: {errs}")
    assert max(errs.values()) <= TOL


def test_every_decoder_block_matches(converted):
    adm, dif, config = converted
    assert [(b.channels, b.resolution) for b in dif.blocks()] == [(b.channels, b.resolution) for b in adm.blocks()]
    t = _steps(config)
    x = _input(config, len(t), seed=2)
    blocks = list(range(config.num_output_blocks))
    want, got = adm.forward_intermediates(x, t, blocks), dif.forward_intermediates(x, t, blocks)
    errs = {b: rel_err(got[b], want[b]) for b in blocks}
    print(f"\nper-block max relative error: { {b: f'{e:.1e}' for b, e in errs.items()} }")
    assert max(errs.values()) <= TOL


def test_scheduler_noises_like_the_adm(converted):
    adm, dif, config = converted
    assert dif.scheduler is not None and dif.config.diffusion_steps == config.diffusion_steps
    t = _steps(config)
    gen = torch.Generator().manual_seed(3)
    x0 = torch.rand(len(t), 3, 8, 8, generator=gen) * 2 - 1
    noise = torch.randn(x0.shape, generator=gen)
    err = rel_err(dif.q_sample(x0, t, noise), adm.q_sample(x0, t, noise))
    print(f"\nq_sample max relative error: {err:.1e}")
    assert err <= TOL


def test_a_freshly_initialised_adm_converts(tmp_path):
    """guided-diffusion zero-initialises the output conv: the final outputs are both exactly 0,
    and the check must not divide 0 by 0 (0.1.0 refused such a model as "differs by nan")."""
    torch.manual_seed(0)
    model = build_unet(AdmConfig.from_flags(SMALL_FLAGS))
    assert not model.out[2].weight.any()
    torch.save(model.state_dict(), tmp_path / "fresh.pt")
    (tmp_path / "fresh.json").write_text(json.dumps(SMALL_FLAGS))
    result = convert_adm_to_diffusers(tmp_path / "fresh.pt", tmp_path / "out", model_flags=tmp_path / "fresh.json")
    assert 0 <= result.max_rel_err <= TOL  # the decoder blocks (not zero) are compared too


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "flags,match",
    [
        (dict(SMALL_FLAGS, attention_resolutions="32,16", num_head_channels=-1, num_heads=4), "one attention_head_dim"),
        (dict(SMALL_FLAGS, class_cond=True), "class-conditional"),
        (dict(SMALL_FLAGS, num_head_channels=-1, num_heads=1, num_heads_upsample=2), "num_heads_upsample"),
        (dict(SMALL_FLAGS, channel_mult="2,4,4"), "first multiplier must be 1"),
    ],
)
def test_inexpressible_architectures_are_refused(tmp_path, flags, match):
    ckpt, flag_file = _save_adm(tmp_path, flags)
    with pytest.raises(DdpmsegError, match=match) as e:
        convert_adm_to_diffusers(ckpt, tmp_path / "out", model_flags=flag_file)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_output_is_atomic_and_never_overwrites(tmp_path, monkeypatch):
    ckpt, flag_file = _save_adm(tmp_path, SMALL_FLAGS)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(DdpmsegError, match="non-empty folder"):
        convert_adm_to_diffusers(ckpt, busy, model_flags=flag_file)
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]
    # a failed self-check leaves neither the output nor the temporary folder behind
    monkeypatch.setattr(convert_mod, "VERIFY_TOLERANCE", -1.0)
    before = set(tmp_path.iterdir())
    with pytest.raises(DdpmsegError, match="differs from the ADM"):
        convert_adm_to_diffusers(ckpt, tmp_path / "new", model_flags=flag_file)
    assert set(tmp_path.iterdir()) == before
    monkeypatch.undo()
    empty = tmp_path / "empty"
    empty.mkdir()
    out = convert_adm_to_diffusers(ckpt, empty, model_flags=flag_file).out
    assert (out / "unet" / "config.json").is_file() and (out / "scheduler" / "scheduler_config.json").is_file()
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "DDPMPipeline"


def test_a_plain_qkv_split_is_caught_by_the_self_check(tmp_path, monkeypatch):
    """Splitting the legacy [head][q,k,v][ch] rows into three equal thirds (what a naive
    converter does) scrambles multi-head attention; the conversion must refuse to write it."""
    ckpt, flag_file = _save_adm(tmp_path, SMALL_FLAGS)  # 64-wide attentions: two 32-channel heads
    monkeypatch.setattr(convert_mod, "_split_qkv", lambda w, heads, new_order: tuple(p.clone() for p in w.chunk(3)))
    with pytest.raises(DdpmsegError, match="differs from the ADM"):
        convert_adm_to_diffusers(ckpt, tmp_path / "out", model_flags=flag_file)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- CLI


def test_cli_convert_then_extract_gives_the_adm_features(tmp_path):
    ckpt, flag_file = _save_adm(tmp_path, SMALL_FLAGS)
    imgs = tmp_path / "imgs"
    make_synthetic_dataset(imgs, n_images=2, size=32, seed=0)
    runner = CliRunner()
    out = tmp_path / "converted"
    res = runner.invoke(main, ["-q", "convert", str(ckpt), "--model-flags", str(flag_file), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert res.output.count("\n") == 1 and f"--ckpt {out}" in res.output
    again = runner.invoke(main, ["-q", "convert", str(ckpt), "--model-flags", str(flag_file), "--out", str(out)])
    assert again.exit_code == 1 and again.output.startswith("ddpmseg: error: --out") and again.output.count("\n") == 1

    caches = {}
    for name, source in (("adm", [str(ckpt), "--model-flags", str(flag_file)]), ("dif", [str(out)])):
        caches[name] = tmp_path / f"{name}.h5"
        res = runner.invoke(main, ["-q", "extract", "--ckpt", *source, "--images", str(imgs), "--out", str(caches[name]),
                                   "--steps", "10,500", "--blocks", "2,4,8", "--storage", "float32", "--device", "cpu"])
        assert res.exit_code == 0, res.output
    with FeatureCache(caches["adm"]) as a, FeatureCache(caches["dif"]) as b:
        assert b.record.backbone.family == "diffusers" and a.image_ids == b.image_ids == ["shape_0", "shape_1"]
        for image_id in a.image_ids:
            want, got = a.block_maps(image_id), b.block_maps(image_id)
            assert want.keys() == got.keys()
            for key in want:
                assert rel_err(torch.from_numpy(got[key]), torch.from_numpy(want[key])) <= TOL
