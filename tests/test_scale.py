"""Past one machine without an engine: cache folders that grow by their new files only, --shard I/N
runs that together equal one run, and merge."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from cli_helpers import fails, ok
from ddpmseg.data import take_shard
from ddpmseg.errors import DdpmsegError
from ddpmseg.features.cache import FOLDER_MARKER, FeatureCache

pytestmark = pytest.mark.usefixtures("one_thread")


def _same_cache(a: Path, b: Path) -> None:
    with FeatureCache(a) as x, FeatureCache(b) as y:
        assert x.image_ids == y.image_ids
        assert x.record.identity() == y.record.identity() and np.array_equal(x.noise, y.noise)
        for i in x.image_ids:
            assert x.sha256(i) == y.sha256(i) and x.preprocess(i) == y.preprocess(i)
            mx, my = x.block_maps(i), y.block_maps(i)
            assert all(np.array_equal(mx[k], my[k]) for k in mx), i


@pytest.fixture(scope="module")
def six(tmp_path_factory, eyes8) -> Path:
    d = tmp_path_factory.mktemp("six")
    for i in range(6):
        shutil.copy(eyes8 / f"image_{i}.jpg", d)
        shutil.copy(eyes8 / f"image_mask{i}.npy", d)
    return d


def _extract(ckpt, flags, images, out, *extra) -> str:
    return ok("extract", *images, "--ckpt", ckpt, "--model-flags", flags, "--out", out, "--device", "cpu", *extra)


def test_take_shard_splits_the_sorted_inputs():
    paths = [Path(f"d/img_{i}.png") for i in (10, 2, 1, 3, 11)]
    shares = [take_shard(paths, f"{i}/2") for i in range(2)]
    assert [p.stem for p in shares[0]] == ["img_1", "img_3", "img_11"]  # natural order: 1 2 3 10 11
    assert [p.stem for p in shares[1]] == ["img_2", "img_10"]
    assert take_shard(paths, "0/1") == sorted(paths, key=lambda p: int(p.stem[4:]))
    for bad in ("2/2", "1", "a/b", "-1/3"):
        with pytest.raises(DdpmsegError, match="--shard"):
            take_shard(paths, bad)


def test_a_cache_folder_holds_the_same_features_as_a_file_and_grows_by_new_files(tmp_path, tiny_ckpt, six):
    ckpt, flags = tiny_ckpt
    _extract(ckpt, flags, [six], tmp_path / "feats.h5")
    folder = tmp_path / "feats"
    first = sorted(six.glob("*.jpg"))[:4]
    said = _extract(ckpt, flags, first, folder)
    assert "4 new, 0 already cached, 4 in" in said
    assert (folder / FOLDER_MARKER).is_file() and len(list(folder.glob("*.h5"))) == 4
    before = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.h5")}
    said = _extract(ckpt, flags, [six], folder)
    assert "2 new, 4 already cached, 6 in" in said
    assert all(p.stat().st_mtime_ns == before[p.name] for p in folder.glob("*.h5") if p.name in before)  # untouched
    _same_cache(tmp_path / "feats.h5", folder)
    # fit works from a folder and gives the model a file cache gives
    for src, name in ((tmp_path / "feats.h5", "m_file"), (folder, "m_folder")):
        ok("fit", "--features", src, "--masks", six, "--ensemble", 2, "--max-epochs", 1, "--out", tmp_path / name)
    import torch

    a, b = (torch.load(tmp_path / n / "tensors.pt", weights_only=True)["ensemble"]["module"] for n in ("m_file", "m_folder"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_shards_together_equal_one_run_and_merge_joins_them(tmp_path, tiny_ckpt, six, eyes_world):
    ckpt, flags = tiny_ckpt
    _extract(ckpt, flags, [six], tmp_path / "one.h5")
    for i in range(3):  # three shares into one folder, and each into a file of its own
        _extract(ckpt, flags, [six], tmp_path / "folder", "--shard", f"{i}/3")
        _extract(ckpt, flags, [six], tmp_path / f"part{i}.h5", "--shard", f"{i}/3")
    _same_cache(tmp_path / "one.h5", tmp_path / "folder")
    said = ok("merge", *(tmp_path / f"part{i}.h5" for i in range(3)), "--out", tmp_path / "merged.h5")
    assert "merge: 6 images added, 0 already in" in said
    _same_cache(tmp_path / "one.h5", tmp_path / "merged.h5")
    said = ok("merge", tmp_path / "part0.h5", tmp_path / "folder", "--out", tmp_path / "merged.h5")
    assert "0 images added, 6 already in" in said
    # predict shards write exactly the files of one run
    d, _ = eyes_world
    ok("predict", six, "--model", d / "model", "--out", tmp_path / "p_one")
    for i in range(2):
        ok("predict", six, "--model", d / "model", "--out", tmp_path / "p_shards", "--shard", f"{i}/2")
    one = sorted(p.name for p in (tmp_path / "p_one").iterdir())
    assert one == sorted(p.name for p in (tmp_path / "p_shards").iterdir()) and len(one) == 18
    for name in one:
        assert (tmp_path / "p_one" / name).read_bytes() == (tmp_path / "p_shards" / name).read_bytes(), name
    # a rerun with --skip-done does nothing; without it, outputs are refused
    said = ok("predict", six, "--model", d / "model", "--out", tmp_path / "p_one", "--skip-done")
    assert "predict: 0 images" in said and "6 images done before" in said
    fails("predict", six, "--model", d / "model", "--out", tmp_path / "p_one", match="would replace")


def test_scale_bad_inputs(tmp_path, tiny_ckpt, six, eyes_world):
    ckpt, flags = tiny_ckpt
    stranger = tmp_path / "notes"
    stranger.mkdir()
    (stranger / "todo.txt").write_text("x")
    fails("extract", six, "--ckpt", ckpt, "--model-flags", flags, "--out", stranger,
          match="is a folder but not a ddpmseg cache folder")
    fails("extract", six, "--ckpt", ckpt, "--model-flags", flags, "--out", tmp_path / "f", "--shard", "3/3",
          match="--shard 3/3")
    fails("extract", six, "--ckpt", ckpt, "--model-flags", flags, "--out", tmp_path / "f", "--workers", 2,
          match="apply to --engine ray only")
    _extract(ckpt, flags, [six], tmp_path / "a.h5", "--shard", "0/2")
    _extract(ckpt, flags, [six], tmp_path / "b.h5", "--shard", "1/2", "--steps", "50,150")
    fails("merge", tmp_path / "a.h5", tmp_path / "b.h5", "--out", tmp_path / "m.h5", match="other settings")
    fails("merge", tmp_path / "a.h5", "--out", tmp_path / "a.h5", match="is one of the caches to merge")
    assert not (tmp_path / "m.h5").exists()
    fails("fit", "--features", stranger, "--masks", six, "--out", tmp_path / "m", match="folder without ddpmseg-cache.json")
