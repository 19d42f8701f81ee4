"""The diffusers UNet2DModel family: the google presets, loading folders / hub ids, and the
CLI end to end. (Block numbering and feature parity with hooks on an unmodified full forward:
test_backbones.py.)

Skipped when diffusers is not installed (it is an optional extra)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner

diffusers = pytest.importorskip("diffusers")

from ddpmseg.backbones import BackboneSpec, backbone_from_record, create_backbone, get_preset, list_presets  # noqa: E402
from ddpmseg._io import file_sha256  # noqa: E402
from ddpmseg.backbones.diffusers_unet import random_unet2d  # noqa: E402
from ddpmseg.cli.main import main  # noqa: E402
from ddpmseg.errors import DdpmsegError  # noqa: E402
from ddpmseg.features.cache import FeatureCache  # noqa: E402
from test_backbones import PAPER_BLOCKS, TINY_UNET


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory):
    """(pipeline folder with unet/ + scheduler/, bare model folder) of one random tiny UNet2DModel."""
    d = tmp_path_factory.mktemp("tiny_diffusers")
    model = random_unet2d(TINY_UNET, seed=0)
    pipe, bare = d / "pipe", d / "bare"
    model.save_pretrained(pipe / "unet")
    diffusers.DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear").save_pretrained(
        pipe / "scheduler"
    )
    model.save_pretrained(bare)
    return pipe, bare


@pytest.fixture(scope="module")
def tiny_backbone(tiny_folders):
    return create_backbone(tiny_folders[0], device="cpu")


# --------------------------------------------------------------------------- block map


def test_google_256_presets_give_1408_channels_per_step():
    for name in ("ddpm_celebahq_256", "ddpm_ema_celebahq_256", "ddpm_bedroom_256", "ddpm_cat_256", "ddpm_church_256"):
        preset = get_preset(name)
        assert preset.family == "diffusers" and preset.urls[0].startswith("hf://google/")
        shapes = preset.config.output_block_shapes()
        assert [shapes[b] for b in PAPER_BLOCKS] == [(512, 32), (256, 32), (256, 32), (256, 64), (128, 128)]
        assert sum(shapes[b][0] for b in PAPER_BLOCKS) == 1408
    assert "ddpm_cifar10_32" in list_presets()


def test_google_256_structure_builds_and_matches_its_block_shapes():
    """The preset config builds in diffusers (meta device: no weights) and the real modules
    have the channel counts the block map states."""
    cfg = get_preset("ddpm_celebahq_256").config
    with torch.device("meta"):
        model = diffusers.UNet2DModel(**cfg.unet)
    for level, block in enumerate(model.up_blocks):
        assert len(block.resnets) == cfg.layers_per_block + 1
        assert (block.upsamplers is not None) == (level < 5)
    assert [len(getattr(b, "attentions", None) or []) for b in model.up_blocks] == [0, 3, 0, 0, 0, 0]
    for k, (c, _) in enumerate(cfg.output_block_shapes()):
        level, j = divmod(k, 3)
        assert model.up_blocks[level].resnets[j].conv2.out_channels == c


# --------------------------------------------------------------------------- loading


def test_create_backbone_picks_the_family_and_hashes_the_weights(tiny_folders, tiny_backbone):
    pipe, bare = tiny_folders
    backbone = tiny_backbone
    assert backbone.family == "diffusers" and backbone.checkpoint.name == "pipe" and backbone.preset is None
    assert backbone.checkpoint.sha256 == file_sha256(pipe / "unet" / "diffusion_pytorch_model.safetensors")
    spec = BackboneSpec.from_dict(json.loads(json.dumps(backbone.spec.to_dict())))
    assert spec.family == "diffusers" and spec.config.scheduler["beta_schedule"] == "linear"
    again = backbone_from_record(spec, backbone.checkpoint, device="cpu")
    assert again.config == backbone.config
    # the bare model folder and the unet/ subfolder (scheduler found beside it) load too
    assert create_backbone(bare, device="cpu").scheduler is None
    assert create_backbone(pipe / "unet", device="cpu").scheduler is not None
    other = pipe.parent / "other"
    random_unet2d(TINY_UNET, seed=1).save_pretrained(other)
    with pytest.raises(DdpmsegError, match="sha256 of the weights differs"):  # same config, other weights
        backbone_from_record(spec, backbone.checkpoint, other, device="cpu")


def test_offline_hub_id_is_a_one_line_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(DdpmsegError) as e:
        create_backbone("nobody-ddpmseg/no-such-ddpm", device="cpu")
    msg = str(e.value)
    assert "\n" not in msg and "nobody-ddpmseg/no-such-ddpm" in msg and "--ckpt" in msg
    result = CliRunner().invoke(main, ["blocks", "--ckpt", "nobody-ddpmseg/no-such-ddpm"])
    assert result.exit_code == 1 and result.output.count("\n") == 1 and "error:" in result.output


def test_bad_folders_are_one_line_errors(tmp_path, tiny_folders):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DdpmsegError, match="no config.json"):
        create_backbone(empty, device="cpu")
    noweights = tmp_path / "noweights"
    noweights.mkdir()
    shutil.copy(tiny_folders[1] / "config.json", noweights / "config.json")
    with pytest.raises(DdpmsegError, match="no weights"):
        create_backbone(noweights, device="cpu")
    with pytest.raises(DdpmsegError, match="leave out --model-flags"):
        create_backbone(tiny_folders[1], flags=tmp_path / "f.json", device="cpu")
    with pytest.raises(DdpmsegError, match="does not fit preset ddpm_celebahq_256"):
        create_backbone(tiny_folders[1], preset="ddpm_celebahq_256", device="cpu")


# --------------------------------------------------------------------------- CLI


def run(*args) -> str:
    result = CliRunner().invoke(main, ["-q", *map(str, args)])
    assert result.exit_code == 0, result.output
    return result.output


def test_cli_blocks_and_presets(tiny_folders):
    out = run("blocks", "--ckpt", tiny_folders[0])
    rows = [line.split() for line in out.splitlines()[1:]]
    assert len(rows) == 18
    assert rows[5] == ["5", "up_blocks.1", "(upsampler)", "128", "8x8", "yes"]  # yes: one of --blocks auto's
    assert rows[12] == ["12", "up_blocks.4.resnets.0", "32", "32x32", "yes"]
    presets = run("presets")
    assert any(line.split()[:2] == ["ddpm_celebahq_256", "diffusers"] for line in presets.splitlines())
    assert any(line.split()[:2] == ["ffhq_256", "adm"] for line in presets.splitlines())


def test_cli_extract_fit_predict(tmp_path, tiny_folders, eyes8):
    pipe = tiny_folders[0]
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in (0, 1):
        (imgs / f"image_{i}.jpg").write_bytes((eyes8 / f"image_{i}.jpg").read_bytes())
    run("extract", "--ckpt", pipe, "--images", imgs, "--out", tmp_path / "feats.h5", "--device", "cpu")
    with FeatureCache(tmp_path / "feats.h5") as cache:
        assert cache.n_features == 3 * (128 + 64 + 64 + 64 + 32)
        assert cache.record.backbone.family == "diffusers"
    run("fit", "--features", tmp_path / "feats.h5", "--masks", eyes8, "--ensemble", 2, "--max-epochs", 1,
        "--out", tmp_path / "model", "--device", "cpu")
    cfg = json.loads((tmp_path / "model" / "model.json").read_text())
    assert cfg["backbone"]["family"] == "diffusers" and cfg["checkpoint"]["path"] == str(pipe.resolve())
    run("predict", imgs / "image_0.jpg", imgs / "image_1.jpg", "--model", tmp_path / "model", "--out", tmp_path / "preds",
        "--device", "cpu")
    for i in (0, 1):
        for kind in ("labels", "overlay", "uncertainty"):
            assert (tmp_path / "preds" / f"image_{i}_{kind}.png").is_file()
