"""Crash safety of extraction: a run killed with SIGKILL keeps every finished
image, the file stays readable, and the next run does only the rest."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from ddpmseg.features.cache import FeatureCache, parts_dir


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
@pytest.mark.parametrize("name", ["feats.h5", "feats"])  # a single file, a cache folder
def test_sigkill_during_extract_keeps_finished_images_and_resumes(tmp_path, tiny_ckpt, eyes8, name):
    ckpt, flags = tiny_ckpt
    images = tmp_path / "images"
    images.mkdir()
    for i in range(8):
        for copy in range(2):  # 16 images so the run is long enough to be killed midway
            shutil.copy(eyes8 / f"image_{i}.jpg", images / f"img{copy}_{i}.jpg")
    out = tmp_path / name
    written = out if name == "feats" else parts_dir(out)  # where finished images land during the run
    cmd = [sys.executable, "-m", "ddpmseg.cli.main", "-q", "extract", "--ckpt", str(ckpt), "--model-flags", str(flags),
           "--images", str(images), "--out", str(out), "--device", "cpu"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if len(list(written.glob("*.h5"))) >= 3:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "extract finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    with FeatureCache(out) as cache:  # readable, with every finished image
        kept = list(cache.image_ids)
        assert len(kept) >= 3
        for image_id in kept:
            assert cache.pixel_features(image_id).shape[0] == cache.n_features

    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{16 - len(kept)} new, {len(kept)} already cached, 16 in" in rerun.stdout
    assert not parts_dir(out).exists() and not list(tmp_path.rglob("*.tmp"))
    with FeatureCache(out) as cache:
        assert len(cache.image_ids) == 16
