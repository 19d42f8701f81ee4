"""The HDF5 feature cache: native-resolution block maps per image.

Layout of ``feats.h5`` (README "Cache file format"):
    /                 attrs: format="ddpmseg-features", format_version, ddpmseg_version,
                             config (JSON: extraction config + backbone + checkpoint)
    /noise            float32 (1, 3, S, S): the shared noise
    /images/<id>      group per image (id = file stem); attrs: source, preprocess (JSON)
    /images/<id>/t{t}_b{b}   (C, h, w) float16 (or float32) decoder block output

Crash safety: the main file is never modified in place. Each finished image
is written to its own small file in ``feats.h5.parts/`` (temp file + rename);
at the end of a run the parts are merged into a copy of the main file that
replaces it atomically. A killed run therefore leaves the old main file
intact plus every finished image in the parts folder; the next run (or any
reader) picks them up without recomputing.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import h5py
import numpy as np
import torch

from ddpmseg._io import check_writable
from ddpmseg._version import __version__
from ddpmseg.data import natural_key
from ddpmseg.errors import DdpmsegError
from ddpmseg.features.extractor import BlockMaps, upsample_concat

log = logging.getLogger(__name__)

FORMAT = "ddpmseg-features"
FORMAT_VERSION = 1


def dataset_name(t: int, block: int) -> str:
    return f"t{t}_b{block}"


def parts_dir(path: Path) -> Path:
    return path.with_name(path.name + ".parts")


def _write_header(f: h5py.File, config: dict[str, Any], noise: np.ndarray) -> None:
    f.attrs["format"] = FORMAT
    f.attrs["format_version"] = FORMAT_VERSION
    f.attrs["ddpmseg_version"] = __version__
    f.attrs["config"] = json.dumps(config, sort_keys=True)
    f.create_dataset("noise", data=np.asarray(noise, dtype=np.float32))
    f.require_group("images")


def _open_h5(path: Path, mode: str = "r") -> h5py.File:
    if path.is_dir():
        raise DdpmsegError(f"feature file {path} is a folder; give the HDF5 file written by `ddpmseg extract`")
    try:
        f = h5py.File(path, mode)
    except FileNotFoundError:
        raise DdpmsegError(f"feature file {path} does not exist; create it with `ddpmseg extract`") from None
    except OSError as e:
        reason = " ".join(str(e).split())  # h5py messages can span lines
        raise DdpmsegError(
            f"cannot open feature file {path} ({reason}); it is not a readable HDF5 file: "
            "give a file written by `ddpmseg extract` (or a new file name for --out)"
        ) from None
    if f.attrs.get("format") != FORMAT:
        f.close()
        raise DdpmsegError(f"{path} is an HDF5 file but not a ddpmseg feature cache; create one with `ddpmseg extract`")
    if int(f.attrs.get("format_version", -1)) > FORMAT_VERSION:
        f.close()
        raise DdpmsegError(f"{path} was written by a newer ddpmseg (format {f.attrs['format_version']}); upgrade ddpmseg")
    return f


def _complete_parts(path: Path) -> list[Path]:
    d = parts_dir(path)
    return sorted(d.glob("*.h5")) if d.is_dir() else []


class FeatureWriter:
    """Adds images to a cache file, crash-safely (see module docstring)."""

    def __init__(self, path: str | Path, config: dict[str, Any], noise: torch.Tensor) -> None:
        self.path = Path(path)
        self.config = config
        self.noise = noise.detach().cpu().numpy().astype(np.float32)
        check_writable(self.path, folder=False)  # before any image is extracted
        if self.path.exists():
            with _open_h5(self.path) as f:
                self._check_same(json.loads(f.attrs["config"]), np.asarray(f["noise"]))
        for part in _complete_parts(self.path):
            with _open_h5(part) as f:
                self._check_same(json.loads(f.attrs["config"]), np.asarray(f["noise"]))

    def _check_same(self, old: dict[str, Any], noise: np.ndarray) -> None:
        old, new = _identity(old), _identity(self.config)
        diffs = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        if diffs or not np.array_equal(noise, self.noise):
            what = ", ".join(f"{k}: {old.get(k)!r} vs {new.get(k)!r}" for k in diffs[:3]) or "noise"
            raise DdpmsegError(
                f"{self.path} holds features made with other settings ({what}); "
                "use a new --out file or the same settings"
            )

    def done_ids(self) -> set[str]:
        ids: set[str] = set()
        if self.path.exists():
            with _open_h5(self.path) as f:
                ids.update(k for k, g in f["images"].items() if g.attrs.get("complete", False))
        ids.update(p.stem for p in _complete_parts(self.path))
        return ids

    def add(self, image_id: str, maps: BlockMaps, source: str, preprocess: dict[str, Any]) -> None:
        """Write one finished image to its own part file (atomic)."""
        d = parts_dir(self.path)
        d.mkdir(exist_ok=True)
        final = d / f"{image_id}.h5"
        tmp = d / f"{image_id}.h5.tmp"
        dtype = np.dtype(self.config["extract"]["storage_dtype"])
        with h5py.File(tmp, "w") as f:
            _write_header(f, self.config, self.noise)
            _write_image(f, image_id, {k: v.numpy().astype(dtype) for k, v in maps.items()}, source, preprocess)
        os.replace(tmp, final)

    def merge(self) -> int:
        """Fold every part into the main file; returns the number of images merged."""
        parts = _complete_parts(self.path)
        if not parts:  # nothing finished: never leave an empty cache behind
            self._remove_parts_dir()
            return 0
        tmp = self.path.with_name(self.path.name + ".tmp")
        if self.path.exists():
            shutil.copyfile(self.path, tmp)
            f = h5py.File(tmp, "a")
        else:
            f = h5py.File(tmp, "w")
            _write_header(f, self.config, self.noise)
        with f:
            images = f["images"]
            for part in parts:
                with h5py.File(part, "r") as p:
                    for image_id, g in p["images"].items():
                        if image_id in images:
                            del images[image_id]
                        p.copy(g, images, name=image_id)
        os.replace(tmp, self.path)
        for part in parts:
            part.unlink()
        self._remove_parts_dir()
        return len(parts)

    def _remove_parts_dir(self) -> None:
        """Remove the parts folder with any temp file of an image interrupted mid-write."""
        d = parts_dir(self.path)
        for tmp in d.glob("*.h5.tmp") if d.is_dir() else []:
            tmp.unlink(missing_ok=True)
        try:
            d.rmdir()
        except OSError:
            pass


def _identity(config: dict[str, Any]) -> dict[str, Any]:
    """The part of a cache config that fixes the features (a moved checkpoint is the same)."""
    out = dict(config)
    out["extract"] = {"precision": "fp32", **config.get("extract", {})}  # caches from before --precision
    out["checkpoint"] = {k: v for k, v in config.get("checkpoint", {}).items() if k != "path"}
    return out


def _write_image(f: h5py.File, image_id: str, maps: dict, source: str, preprocess: dict[str, Any]) -> None:
    g = f["images"].create_group(image_id)
    for (t, b), arr in maps.items():
        g.create_dataset(dataset_name(t, b), data=arr)
    g.attrs["source"] = source
    g.attrs["preprocess"] = json.dumps(preprocess, sort_keys=True)
    g.attrs["complete"] = True


class FeatureCache:
    """Read access to a feature file (plus finished parts of an interrupted run).

    ``image_ids`` are the image files' stems (natural order), ``noise`` the
    shared (1, 3, S, S) noise, ``pixel_features(id)`` the exact upsampled
    (C, S, S) float32 pixel features in the reference order.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._files: list[h5py.File] = []
        self._where: dict[str, h5py.Group] = {}
        sources = ([self.path] if self.path.exists() or not _complete_parts(self.path) else []) + _complete_parts(
            self.path
        )
        for src in sources:
            f = _open_h5(src)
            self._files.append(f)
            for image_id, g in f["images"].items():
                if g.attrs.get("complete", False):
                    self._where[image_id] = g
        head = self._files[0]
        self.config: dict[str, Any] = json.loads(head.attrs["config"])
        self.noise: np.ndarray = np.asarray(head["noise"])
        self.ddpmseg_version: str = str(head.attrs["ddpmseg_version"])
        self.image_ids: list[str] = sorted(self._where, key=natural_key)

    # -- configuration -------------------------------------------------------------
    @property
    def steps(self) -> list[int]:
        return list(self.config["extract"]["steps"])

    @property
    def blocks(self) -> list[int]:
        return list(self.config["extract"]["blocks"])

    @property
    def keys(self) -> list[tuple[int, int]]:
        return [(t, b) for t in self.steps for b in self.blocks]

    @property
    def image_size(self) -> int:
        return int(self.config["backbone"]["config"]["image_size"])

    @property
    def n_features(self) -> int:
        return sum(self.block_shapes()[k][0] for k in self.keys)

    def block_shapes(self) -> dict[tuple[int, int], tuple[int, ...]]:
        g = self._group(self.image_ids[0]) if self.image_ids else None
        if g is None:
            raise DdpmsegError(f"{self.path} holds no images yet; run `ddpmseg extract` on some images")
        return {k: tuple(g[dataset_name(*k)].shape) for k in self.keys}

    # -- per image -------------------------------------------------------------------
    def __contains__(self, image_id: str) -> bool:
        return image_id in self._where

    def __len__(self) -> int:
        return len(self.image_ids)

    def __iter__(self) -> Iterator[str]:
        return iter(self.image_ids)

    def _group(self, image_id: str) -> h5py.Group:
        try:
            return self._where[image_id]
        except KeyError:
            raise DdpmsegError(
                f"image {image_id!r} is not in {self.path}; run `ddpmseg extract` on it first"
            ) from None

    def source(self, image_id: str) -> str:
        return str(self._group(image_id).attrs["source"])

    def preprocess(self, image_id: str) -> dict[str, Any]:
        return json.loads(self._group(image_id).attrs["preprocess"])

    def block_maps(self, image_id: str) -> dict[tuple[int, int], np.ndarray]:
        """Native-resolution maps as stored (float16 by default), keyed (t, block)."""
        g = self._group(image_id)
        return {k: g[dataset_name(*k)][()] for k in self.keys}

    def pixel_features(self, image_id: str) -> torch.Tensor:
        """The upsampled, concatenated float32 (C, S, S) pixel features."""
        maps = {k: torch.from_numpy(v.astype(np.float32)) for k, v in self.block_maps(image_id).items()}
        return upsample_concat(maps, self.keys, self.image_size)

    def close(self) -> None:
        for f in self._files:
            f.close()
        self._files.clear()

    def __enter__(self) -> "FeatureCache":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
