"""Checkpoint reading, architecture checks and inference (tiny random ADMs, no downloads)."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest
import torch

from ddpmseg.backbones import _checkpoint as ck
from ddpmseg.backbones import create_backbone
from ddpmseg.backbones.adm import build_unet
from ddpmseg.backbones import AdmConfig, list_presets
from ddpmseg.errors import DdpmsegError

TINY = AdmConfig(
    image_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="16",
    num_head_channels=32,
)  # fmt: skip
PRESETS_256 = ["ffhq_256", "imagenet_256_uncond", "lsun_bedroom_256", "lsun_cat_256", "lsun_horse_256"]


class NotATensor:
    """A custom class: a checkpoint that pickles one must be refused."""

    def __init__(self) -> None:
        self.value = 3


@pytest.fixture(scope="module")
def tiny_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return build_unet(TINY).state_dict()


def meta_state(config: AdmConfig) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return build_unet(config).state_dict()


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- read_state_dict


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: sd,
        lambda sd: {"state_dict": sd},
        lambda sd: {"model": sd, "step": 1000, "optimizer": "adam"},
        lambda sd: {"ema": sd},
        lambda sd: {"model_state_dict": sd, "epoch": 3},
        lambda sd: {f"module.{k}": v for k, v in sd.items()},
        lambda sd: {"state_dict": {f"model.{k}": v for k, v in sd.items()}},
    ],
    ids=["plain", "state_dict", "model", "ema", "model_state_dict", "module-prefix", "wrapped-model-prefix"],
)
def test_read_state_dict_accepts_plain_and_wrapped(tmp_path, tiny_state, wrap):
    path = tmp_path / "ckpt.pt"
    torch.save(wrap(tiny_state), path)
    assert_same(ck.read_state_dict(path), tiny_state)


def test_read_state_dict_legacy_format(tmp_path, tiny_state):
    path = tmp_path / "legacy.pt"
    torch.save(tiny_state, path, _use_new_zipfile_serialization=False)
    assert_same(ck.read_state_dict(path), tiny_state)


def test_ambiguous_wrapper_names_the_keys(tmp_path, tiny_state):
    path = tmp_path / "both.pt"
    torch.save({"model": tiny_state, "ema": tiny_state}, path)
    with pytest.raises(DdpmsegError, match=r"ambiguous.*'model', 'ema'") as info:
        ck.read_state_dict(path)
    assert "\n" not in str(info.value)


def test_missing_file_lists_pt_files_and_suggests_download(tmp_path):
    (tmp_path / "lsun_cat.pt").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DdpmsegError) as info:
        ck.read_state_dict(tmp_path / "ffhq.pt")
    msg = str(info.value)
    assert "does not exist" in msg and "lsun_cat.pt" in msg and "notes.txt" not in msg
    assert "ddpmseg download" in msg and "\n" not in msg


def _truncated(path: Path, state: dict) -> None:
    torch.save(state, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    "make, pattern",
    [
        (_truncated, "not a readable torch file"),
        (lambda p, sd: p.write_text("this is not a checkpoint\n"), "not a readable torch file"),
        (lambda p, sd: p.write_bytes(b""), "not a readable torch file"),
        (lambda p, sd: torch.save({"model": sd, "cfg": NotATensor()}, p), "non-tensor Python objects.*refuses"),
        (lambda p, sd: torch.save({"epoch": 3, "name": "x"}, p), "holds no tensors"),
        (lambda p, sd: torch.save([torch.zeros(1)], p), "holds a list, not a state dict"),
        (lambda p, sd: torch.save({**sd, "step": 5}, p), "'step' is a int, not a tensor"),
    ],
    ids=["truncated", "text", "empty", "pickled-object", "no-tensors", "list", "mixed"],
)
def test_bad_files_raise_one_line_errors(tmp_path, tiny_state, make, pattern):
    path = tmp_path / "bad.pt"
    make(path, tiny_state)
    with pytest.raises(DdpmsegError, match=pattern) as info:
        ck.read_state_dict(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_pickled_object_is_never_constructed(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(NotATensor, "__setstate__", lambda self, s: calls.append(s), raising=False)
    path = tmp_path / "obj.pt"
    torch.save({"w": torch.zeros(1), "obj": NotATensor()}, path)
    with pytest.raises(DdpmsegError):
        ck.read_state_dict(path)
    assert calls == []


def test_file_sha256_matches_hashlib_and_is_cached(tmp_path, monkeypatch):
    import hashlib

    from ddpmseg import _io

    path = tmp_path / "blob.bin"
    data = bytes(range(256)) * 50_000  # > one 8 MiB chunk
    path.write_bytes(data)
    _io._sha256_cache.clear()
    assert _io.file_sha256(path) == hashlib.sha256(data).hexdigest()
    opened = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda *a, **k: opened.append(a) or real_open(*a, **k))
    assert _io.file_sha256(str(path)) == hashlib.sha256(data).hexdigest()
    assert opened == []  # served from the cache
    monkeypatch.undo()
    path.write_bytes(data[:-1])  # a changed file is hashed again
    assert _io.file_sha256(path) == hashlib.sha256(data[:-1]).hexdigest()


# --------------------------------------------------------------------------- check_state_dict


def test_check_state_dict_accepts_matching_state(tiny_state):
    model = build_unet(TINY)
    assert ck.check_state_dict(model, tiny_state, expected="tiny", source="t.pt") is None
    # what it accepts loads strictly: no key missing or left over, every tensor copied
    loaded = model.load_state_dict(tiny_state, strict=True)
    assert loaded.missing_keys == [] and loaded.unexpected_keys == []
    assert all(torch.equal(v, tiny_state[k]) for k, v in model.state_dict().items())
    # and the acceptance is not blanket: the same state with one key renamed is refused, naming both
    renamed = dict(tiny_state)
    renamed["out.2.bias_renamed"] = renamed.pop("out.2.bias")
    with pytest.raises(DdpmsegError, match=r"1 missing keys \(out\.2\.bias\).*1 unexpected keys \(out\.2\.bias_renamed\)"):
        ck.check_state_dict(model, renamed, expected="tiny", source="t.pt")


def test_check_state_dict_lists_missing_unexpected_and_mismatched(tiny_state):
    state = dict(tiny_state)
    for key in ["out.2.weight", "out.2.bias", "time_embed.0.bias", "input_blocks.0.0.bias"]:
        del state[key]
    state["extra.weight"] = torch.zeros(2)
    state["time_embed.2.weight"] = torch.zeros(5, 7)
    with pytest.raises(DdpmsegError) as info:
        ck.check_state_dict(build_unet(TINY), state, expected="the given flags", source="t.pt")
    msg = str(info.value)
    assert msg.startswith("checkpoint t.pt does not fit the given flags: 4 missing keys (")
    assert ", ...)" in msg  # only three of the four listed
    assert "1 unexpected keys (extra.weight)" in msg
    assert "1 shape mismatches (time_embed.2.weight: file (5, 7) vs model (128, 128))" in msg
    assert "no preset matches" in msg and "--model-flags" in msg and "\n" not in msg


def test_tiny_checkpoint_against_other_tiny_config_names_shapes(tmp_path, tiny_state):
    path = tmp_path / "tiny.pt"
    torch.save(tiny_state, path)
    other = dataclasses.replace(TINY, num_channels=64)
    with pytest.raises(DdpmsegError, match=r"shape mismatches \(time_embed\.0\.weight: file \(128, 32\) vs model \(256, 64\)"):
        ck.check_state_dict(build_unet(other), ck.read_state_dict(path), expected="other", source=str(path))


def test_check_state_dict_suggests_the_matching_preset():
    state = meta_state(AdmConfig())
    with pytest.raises(DdpmsegError, match=r"it matches preset ffhq_256, .*; use --preset ffhq_256"):
        ck.check_signature(ck.config_signature(TINY), state, "tiny", "ffhq.pt")


def test_create_backbone_refuses_to_guess_what_the_weights_cannot_show(tmp_path, tiny_state):
    path = tmp_path / "tiny.pt"
    torch.save(tiny_state, path)
    with pytest.raises(DdpmsegError) as info:  # 0.1.0 assumed 256 px and 4 heads, and ran on the wrong model
        create_backbone(path, device="cpu")
    msg = str(info.value)
    assert "tiny.pt matches no preset" in msg and "image size" in msg and "channels per attention head" in msg
    assert "--image-size S --num-head-channels N" in msg and "--model-flags" in msg
    with pytest.raises(DdpmsegError, match="channels per attention head") as info:
        create_backbone(path, device="cpu", image_size=32)
    assert "image size" not in str(info.value)
    with pytest.raises(DdpmsegError, match="--num-head-channels 48 does not divide the attention width 64"):
        create_backbone(path, device="cpu", image_size=32, num_head_channels=48)
    backbone = create_backbone(path, device="cpu", image_size=32, num_head_channels=32)
    assert backbone.config == TINY and backbone.preset is None
    assert_same(backbone.model.state_dict(), tiny_state)
    assert [b.resolution for b in backbone.blocks()] == [16, 32, 32, 32]  # 0.1.0 listed 128, 256, 256, 256


def test_the_given_values_give_the_features_of_the_true_flags(tmp_path, tiny_state):
    """--num-head-channels changes the features; the value it was trained with gives the flags' features."""
    path = tmp_path / "tiny.pt"
    with torch.no_grad():
        state = {k: v + 0.05 * torch.randn_like(v) if v.ndim > 1 else v for k, v in tiny_state.items()}  # live attention
    torch.save(state, path)
    x, t = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([100])
    true = create_backbone(path, flags=TINY, device="cpu").forward_intermediates(x, t, [3])[3]
    given = create_backbone(path, device="cpu", image_size=32, num_head_channels=32).forward_intermediates(x, t, [3])[3]
    other = create_backbone(path, device="cpu", image_size=32, num_head_channels=16).forward_intermediates(x, t, [3])[3]
    assert torch.equal(given, true)
    assert (other - true).abs().max() > 1e-3  # another head layout is another model


def test_the_values_are_refused_where_the_flags_fix_them(tmp_path, tiny_state):
    path = tmp_path / "tiny.pt"
    torch.save(tiny_state, path)
    with pytest.raises(DdpmsegError, match="--image-size apply to an architecture read from the weights"):
        create_backbone(path, flags=TINY, image_size=64, device="cpu")


# --------------------------------------------------------------------------- presets and inference


def test_meta_built_signature_allocates_nothing_and_matches_real_build():
    sig = ck.config_signature(TINY)
    assert sig == ck.state_signature(build_unet(TINY).state_dict())
    assert all(v.is_meta for v in meta_state(AdmConfig()).values())


def test_matching_presets_on_meta_256_adm():
    assert ck.matching_presets(meta_state(AdmConfig())) == PRESETS_256
    assert set(PRESETS_256) <= set(list_presets())


def test_matching_presets_empty_for_tiny(tiny_state):
    assert ck.matching_presets(tiny_state) == []


def test_resolve_config_uses_preset_architecture(caplog):
    with caplog.at_level(logging.INFO, logger="ddpmseg.backbones._checkpoint"):
        name, config = ck.resolve_config(meta_state(AdmConfig()), source="ffhq.pt")
    assert name == "ffhq_256" and config == AdmConfig()  # recorded under the first matching preset's name
    assert "ffhq_256" in caplog.text


def test_resolve_config_infers_unknown_architecture(tiny_state, caplog):
    with caplog.at_level(logging.INFO, logger="ddpmseg.backbones._checkpoint"):
        name, config = ck.resolve_config(tiny_state, source="tiny.pt", image_size=32, num_head_channels=32)
    assert name is None and config == TINY
    assert ck.config_signature(config) == ck.state_signature(tiny_state)
    assert config.image_size == 32 and config.attention_resolutions == "16"
    assert "noise schedule" in caplog.text  # the defaults taken are said


def test_resolve_config_of_preset_weights_at_another_size():
    """The weights are ffhq_256's; at 128 px the same structure has its attention at 16, 8, 4."""
    name, config = ck.resolve_config(meta_state(AdmConfig()), source="ffhq.pt", image_size=128)
    assert name is None and config.image_size == 128 and config.attention_resolutions == "16,8,4"
    assert config.num_head_channels == 64  # the preset's, not a guess
    assert ck.config_signature(config) == ck.config_signature(AdmConfig())


@pytest.mark.parametrize(
    "flags",
    [
        dict(),
        dict(resblock_updown=False),
        dict(use_scale_shift_norm=False),
        dict(learn_sigma=False),
        dict(class_cond=True),
        dict(num_res_blocks=2, channel_mult="1,2,2", attention_resolutions="16,8"),
        dict(image_size=64, channel_mult="1,1,2,4", attention_resolutions="32,8", resblock_updown=False),
        dict(num_channels=64, channel_mult="1,2,3", attention_resolutions="8", use_scale_shift_norm=False),
        dict(channel_mult="1", attention_resolutions="32", resblock_updown=False),
        dict(attention_resolutions="64"),
    ],
    ids=["base", "no-updown", "no-scale-shift", "fixed-sigma", "class-cond", "3-levels", "64px", "wide", "1-level", "mid-attention-only"],
)
def test_infer_config_recovers_tiny_configs(flags):
    config = dataclasses.replace(TINY, **flags)
    inferred, notes = ck.infer_config(meta_state(config), image_size=config.image_size, num_head_channels=32)
    assert inferred == dataclasses.replace(config, num_heads=4)  # num_heads is unused when channels are given
    assert any("noise schedule" in n for n in notes)


@pytest.mark.parametrize(
    "mutate, pattern",
    [
        (lambda s: s.pop("time_embed.0.weight"), "key 'time_embed.0.weight' is missing"),
        (lambda s: s.__setitem__("out.2.weight", torch.empty(5, 32, 3, 3, device="meta")), "5 channels"),
        (lambda s: s.__setitem__("middle_block.0.skip_connection.weight", torch.empty(1, device="meta")), "unexpected"),
    ],
    ids=["not-adm", "odd-output", "extra-key"],
)
def test_infer_config_fails_clearly(mutate, pattern):
    state = meta_state(TINY)
    mutate(state)
    with pytest.raises(DdpmsegError, match=pattern) as info:
        ck.infer_config(state, image_size=32, num_head_channels=32, source="odd.pt")
    assert "--model-flags" in str(info.value) and "odd.pt" in str(info.value)
