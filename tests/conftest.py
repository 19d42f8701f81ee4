"""Shared fixtures: tiny random-weight ADM checkpoints, the vendored eyes8 set, and one labelled world."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from ddpmseg.backbones import AdmConfig
from ddpmseg.backbones.adm import random_unet
from ddpmseg.demo import TINY_FLAGS
from shared_data import EYES8


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _two_threads():
    torch.set_num_threads(2)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    tiny models gain nothing from two, and two threads spin-waiting on cores shared with
    other jobs make their runs many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_flags() -> dict:
    return dict(TINY_FLAGS)


@pytest.fixture(scope="session")
def tiny16_flags() -> dict:
    """The flags of a tiny ADM that train-ddpm trains in a blink (its tests use it): 16 px, two levels of
    one res block, attention at 8, learned sigmas (the hybrid loss)."""
    return dict(image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="8",
                num_head_channels=32, learn_sigma=True, resblock_updown=True, use_scale_shift_norm=True)


@pytest.fixture(scope="session")
def tiny16_json(tmp_path_factory, tiny16_flags) -> Path:
    """``tiny16_flags`` as a --model-flags JSON file."""
    path = tmp_path_factory.mktemp("tiny16") / "tiny16.json"
    path.write_text(json.dumps(tiny16_flags))
    return path


@pytest.fixture(scope="session")
def tiny_config(tiny_flags) -> AdmConfig:
    return AdmConfig.from_flags(tiny_flags)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory, tiny_config, tiny_flags) -> tuple[Path, Path]:
    """(checkpoint, flags JSON) of a random tiny ADM saved like a real checkpoint."""
    d = tmp_path_factory.mktemp("tiny_adm")
    ckpt, flags = d / "tiny_adm.pt", d / "tiny_adm.json"
    torch.save(random_unet(tiny_config, seed=0).state_dict(), ckpt)
    flags.write_text(json.dumps(tiny_flags))
    return ckpt, flags


@pytest.fixture(scope="session")
def eyes8() -> Path:
    """The 8 eye crops and masks vendored in tests/fixtures/eyes8 (MIT): never skipped."""
    assert len(list(EYES8.glob("image_*.jpg"))) == 8 and len(list(EYES8.glob("image_mask*.npy"))) == 8, EYES8
    return EYES8


@pytest.fixture(scope="session")
def eyes_world(tmp_path_factory, tiny_ckpt, eyes8) -> tuple[Path, Path]:
    """(folder, images): three labelled eyes (images and masks in ``images``), their cache
    ``folder/feats.h5`` and a model ``folder/model`` fitted on them (2 members, 1 epoch), made
    through the CLI with one torch thread (tests compare refits with it bit for bit)."""
    from click.testing import CliRunner

    from ddpmseg.cli.main import main

    d = tmp_path_factory.mktemp("eyes_world")
    ckpt, flags = tiny_ckpt
    imgs = d / "imgs"
    imgs.mkdir()
    for i in range(3):
        shutil.copy(eyes8 / f"image_{i}.jpg", imgs)
        shutil.copy(eyes8 / f"image_mask{i}.npy", imgs)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for args in (
            ["extract", "--ckpt", ckpt, "--model-flags", flags, "--images", imgs, "--out", d / "feats.h5"],
            ["fit", "--features", d / "feats.h5", "--masks", imgs, "--ensemble", 2, "--max-epochs", 1, "--out", d / "model"],
        ):
            r = CliRunner().invoke(main, ["-q", *map(str, args)])
            assert r.exit_code == 0, r.output
    finally:
        torch.set_num_threads(before)
    return d, imgs
