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

    path = tmp_path / "blob.bin"
    data = bytes(range(256)) * 50_000  # > one 8 MiB chunk
    path.write_bytes(data)
    ck._sha256_cache_clear()
    assert ck.file_sha256(path) == hashlib.sha256(data).hexdigest()
    opened = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda *a, **k: opened.append(a) or real_open(*a, **k))
    assert ck.file_sha256(str(path)) == hashlib.sha256(data).hexdigest()
    assert opened == []  # served from the cache
    monkeypatch.undo()
    path.write_bytes(data[:-1])  # a changed file is hashed again
    assert ck.file_sha256(path) == hashlib.sha256(data[:-1]).hexdigest()


# --------------------------------------------------------------------------- check_state_dict


def test_check_state_dict_accepts_matching_state(tiny_state):
    ck.check_state_dict(build_unet(TINY), tiny_state, expected="tiny", source="t.pt")


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


def test_create_backbone_loads_tiny_checkpoint_with_inferred_architecture(tmp_path, tiny_state, caplog):
    path = tmp_path / "tiny.pt"
    torch.save(tiny_state, path)
    with caplog.at_level(logging.WARNING, logger="ddpmseg.backbones._checkpoint"):
        backbone = create_backbone(path)
    assert backbone.config.num_channels == 32 and backbone.config.channel_mult == "1,2"
    assert_same(backbone.model.state_dict(), tiny_state)
    assert any("image_size assumed 256" in r.getMessage() for r in caplog.records)


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
    with caplog.at_level(logging.WARNING, logger="ddpmseg.backbones._checkpoint"):
        name, config = ck.resolve_config(tiny_state, source="tiny.pt", image_size=32)
    assert name is None
    assert ck.config_signature(config) == ck.state_signature(tiny_state)
    assert config.image_size == 32 and config.attention_resolutions == "16"
    assert "heads" in caplog.text


def _heads_like_inference(config: AdmConfig) -> AdmConfig:
    """The head flags infer_config assumes (the weights cannot tell them)."""
    mults = [int(m) for m in config.mults]
    ds = [config.image_size // int(r) for r in config.attention_resolutions.split(",")]
    widths = {config.num_channels * m for j, m in enumerate(mults) if 2**j in ds} | {config.num_channels * mults[-1]}
    if all(w % 64 == 0 for w in widths):
        return dataclasses.replace(config, num_heads=4, num_head_channels=64)
    return dataclasses.replace(config, num_heads=4, num_head_channels=-1)


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
    config = _heads_like_inference(dataclasses.replace(TINY, **flags))
    inferred, notes = ck.infer_config(meta_state(config), image_size=config.image_size)
    assert inferred == config
    assert not any("image_size" in n for n in notes)
    assert any("heads" in n for n in notes)


def test_infer_config_notes_assumed_image_size():
    config, notes = ck.infer_config(meta_state(AdmConfig()))
    assert config.image_size == 256 and config.num_channels == 256 and config.channel_mult == "1,1,2,2,4,4"
    assert ck.config_signature(config) == ck.config_signature(AdmConfig())
    assert any(n.startswith("image_size assumed 256 (weights do not fix it") for n in notes)


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
        ck.infer_config(state, source="odd.pt")
    assert "--model-flags" in str(info.value) and "odd.pt" in str(info.value)
