"""--engine ray on a real local Ray (2 CPUs, started by the test): the same labels and features as the
plain loop, finished outputs skipped on a rerun, and a worker killed mid-run replaced without loss."""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from cli_helpers import ok

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def many(tmp_path_factory, eyes8) -> Path:
    d = tmp_path_factory.mktemp("many")
    for copy in range(2):
        for i in range(8):
            shutil.copy(eyes8 / f"image_{i}.jpg", d / f"c{copy}_{i}.jpg")
    return d


def _same_files(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir()) and names
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes(), n


def test_predict_with_ray_writes_exactly_the_plain_runs_files(local_ray, eyes_world, eyes8, tmp_path):
    d, _ = eyes_world
    ok("predict", eyes8, "--model", d / "model", "--out", tmp_path / "plain")
    said = ok("predict", eyes8, "--model", d / "model", "--out", tmp_path / "ray", "--engine", "ray", "--workers", 2)
    assert "predict: 8 images" in said
    _same_files(tmp_path / "plain", tmp_path / "ray")
    said = ok("predict", eyes8, "--model", d / "model", "--out", tmp_path / "ray", "--engine", "ray", "--workers", 2)
    assert "predict: 0 images" in said and "8 images done before" in said  # a rerun skips finished images


def test_a_distilled_student_predicts_the_same_files_with_ray(local_ray, eyes_world, eyes8, tmp_path):
    pytest.importorskip("monai")
    d, imgs = eyes_world
    student = tmp_path / "student"
    ok("distill", imgs, "--model", d / "model", "--out", student, "--epochs", 1, "--epoch-images", 8, "--size", 32)
    ok("predict", eyes8, "--model", student, "--out", tmp_path / "plain")
    ok("predict", eyes8, "--model", student, "--out", tmp_path / "ray", "--engine", "ray", "--workers", 2)
    _same_files(tmp_path / "plain", tmp_path / "ray")


def test_extract_with_ray_gives_the_plain_runs_features(local_ray, tiny_ckpt, eyes8, tmp_path):
    from ddpmseg.features.cache import FeatureCache

    ckpt, flags = tiny_ckpt
    args = ("--ckpt", ckpt, "--model-flags", flags, "--device", "cpu")
    ok("extract", eyes8, *args, "--out", tmp_path / "plain.h5")
    for out in (tmp_path / "ray_folder", tmp_path / "ray_file.h5"):
        said = ok("extract", eyes8, *args, "--out", out, "--engine", "ray", "--workers", 2)
        assert "8 new, 0 already cached, 8 in" in said, said
        with FeatureCache(tmp_path / "plain.h5") as a, FeatureCache(out) as b:
            assert a.image_ids == b.image_ids
            for i in a.image_ids:
                ma, mb = a.block_maps(i), b.block_maps(i)
                assert all(np.array_equal(ma[k], mb[k]) for k in ma), i


def _map_worker_pids() -> list[int]:
    """Processes of Ray Data's map actors (their process title names the UDF's actor class)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().decode(errors="ignore")
            except OSError:
                continue
            if "MapWorker" in cmd and int(entry.name) != os.getpid():
                pids.append(int(entry.name))
    return pids


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds Ray's worker processes in /proc")
def test_a_worker_killed_mid_run_is_replaced_and_nothing_is_lost_or_doubled(local_ray, eyes_world, many, tmp_path):
    d, _ = eyes_world
    out = tmp_path / "killed"
    killed: list[int] = []

    def kill_one() -> None:
        deadline = time.time() + 120
        while time.time() < deadline:
            if out.is_dir() and len(list(out.glob("*_labels.png"))) >= 2:
                pids = _map_worker_pids()
                if pids:
                    os.kill(pids[0], signal.SIGKILL)
                    killed.append(pids[0])
                    return
            time.sleep(0.05)

    watcher = threading.Thread(target=kill_one)
    watcher.start()
    said = ok("predict", many, "--model", d / "model", "--out", out, "--engine", "ray", "--workers", 2)
    watcher.join()
    assert killed, "no Ray map worker was found to kill"
    assert "predict: 16 images" in said
    ok("predict", many, "--model", d / "model", "--out", tmp_path / "plain")
    _same_files(tmp_path / "plain", out)
    assert not list(out.glob(".*"))  # no temp file left half-written
