"""The HDF5 feature cache: native-resolution block maps per image.

Layout of ``feats.h5`` (docs/formats.md):
    /                 attrs: the CacheRecord (format, format_version, ddpmseg_version,
                             config = JSON of the extraction config + backbone + checkpoint)
    /noise            float32 (1, 3, S, S): the shared noise
    /images/<id>      group per image (id = file stem); attrs: source (absolute path), sha256 (of the
                      image file: the same id with other content is refused), preprocess (JSON), complete
    /images/<id>/t{t}_b{b}   (C, h, w) float16 (or float32) decoder block output

Crash safety: the main file is never modified in place. Each finished image
is written to its own small file in ``feats.h5.parts/`` (atomically); at the
end of a run the parts are merged into a copy of the main file that replaces
it atomically. A killed run therefore leaves the old main file intact plus
every finished image in the parts folder; the next run (or any reader) picks
them up without recomputing.

A **folder cache** (``--out feats/``: an existing folder, or a new path without
an ``.h5`` suffix) holds one such file per image, ``feats/<id>.h5`` (each with
the record and the noise), plus ``ddpmseg-cache.json`` (the record, readable)
and ``noise.npy``. Adding images writes only their files (atomically): the
cost does not grow with the cache, and any number of processes (``--shard
I/N``, Ray workers) can add to it at once. Files are opened when an image is
first read, so opening a cache of 100k images lists a folder instead of
opening 100k files.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Iterator, Mapping

import h5py
import numpy as np
import torch

from ddpmseg._io import check_writable, remove_stale_temps, save_npy_atomic, write_atomic
from ddpmseg.data import natural_key
from ddpmseg.errors import DdpmsegError
from ddpmseg.features.extractor import BlockMaps, upsample_concat
from ddpmseg.options import CACHE_FOLDER_MARKER
from ddpmseg.records import CACHE_FORMAT as CACHE_FORMAT_NAME
from ddpmseg.records import CacheRecord

FOLDER_MARKER, FOLDER_NOISE = CACHE_FOLDER_MARKER, "noise.npy"
FOLDER_FORMAT = "ddpmseg-features-folder"
SINGLE_FILE_SUFFIXES = (".h5", ".hdf5")


def is_folder_cache(path: str | Path) -> bool:
    """A folder cache: an existing folder, or a new path whose name has no HDF5 suffix."""
    path = Path(path)
    return path.is_dir() or (not path.exists() and path.suffix.lower() not in SINGLE_FILE_SUFFIXES)


def _folder_shards(path: Path) -> list[Path]:
    return sorted(path.glob("*.h5"), key=lambda p: natural_key(p.stem))


def _check_folder(path: Path) -> None:
    """An existing folder must be a cache folder (its marker) or empty."""
    if path.is_dir() and not (path / FOLDER_MARKER).is_file() and any(path.iterdir()):
        raise DdpmsegError(f"{path} is a folder but not a ddpmseg cache folder (no {FOLDER_MARKER}); give an empty "
                           "or new folder, or a file name ending in .h5 for a single-file cache")


def _read_marker(path: Path) -> CacheRecord:
    try:
        attrs = json.loads((path / FOLDER_MARKER).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DdpmsegError(f"{path}/{FOLDER_MARKER} is damaged ({type(e).__name__}); re-extract into a new folder") from None
    return CacheRecord.from_attrs({**attrs, "format": CACHE_FORMAT_NAME}, str(path))


def dataset_name(t: int, block: int) -> str:
    return f"t{t}_b{block}"


def parts_dir(path: Path) -> Path:
    return path.with_name(path.name + ".parts")


def _write_header(f: h5py.File, record: CacheRecord, noise: np.ndarray) -> None:
    f.attrs.update(record.to_attrs())
    f.create_dataset("noise", data=np.asarray(noise, dtype=np.float32))
    f.require_group("images")


def _open_h5(path: Path) -> tuple[h5py.File, CacheRecord]:
    """An open cache file (read-only) and its record, or a one-line error."""
    if path.is_dir():
        raise DdpmsegError(f"feature file {path} is a folder; give the HDF5 file written by `ddpmseg extract`")
    try:
        f = h5py.File(path, "r")
    except FileNotFoundError:
        raise DdpmsegError(f"feature file {path} does not exist; create it with `ddpmseg extract`") from None
    except OSError as e:
        reason = " ".join(str(e).split())  # h5py messages can span lines
        raise DdpmsegError(
            f"cannot open feature file {path} ({reason}); it is not a readable HDF5 file: "
            "give a file written by `ddpmseg extract` (or a new file name for --out)"
        ) from None
    try:
        return f, CacheRecord.from_attrs(f.attrs, str(path))
    except BaseException:
        f.close()
        raise


def _complete_parts(path: Path) -> list[Path]:
    d = parts_dir(path)
    return sorted(d.glob("*.h5")) if d.is_dir() else []


def _finished_in_file(path: Path) -> dict[str, tuple[str, str | None]]:
    """The finished images of a single-file cache and its parts: id -> (source, sha256 or None)."""
    found: dict[str, tuple[str, str | None]] = {}
    for src in ([path] if path.exists() else []) + _complete_parts(path):
        f, _ = _open_h5(src)
        with f:
            for k, g in f["images"].items():
                if g.attrs.get("complete", False):
                    sha = g.attrs.get("sha256")
                    found[k] = (str(g.attrs["source"]), None if sha is None else str(sha))
    return found


def finished_images(path: str | Path) -> int:
    """How many images the cache ``path`` holds finished (a folder's image files; a file's complete
    images and its parts), without knowing its record; 0 where there is none yet."""
    path = Path(path)
    if is_folder_cache(path):
        return len(_folder_shards(path)) if path.is_dir() else 0
    return len(_finished_in_file(path))


class FeatureWriter:
    """Adds images to a cache file, crash-safely (see module docstring)."""

    def __init__(self, path: str | Path, record: CacheRecord, noise: torch.Tensor) -> None:
        self.path = Path(path)
        self.record = record
        self.noise = noise.detach().cpu().numpy().astype(np.float32)
        self.folder = is_folder_cache(self.path)
        check_writable(self.path, folder=self.folder)  # before any image is extracted
        if self.folder:
            _check_folder(self.path)
            if (self.path / FOLDER_MARKER).is_file():
                self._check_same(_read_marker(self.path), np.load(self.path / FOLDER_NOISE))
            return
        for src in ([self.path] if self.path.exists() else []) + _complete_parts(self.path):
            f, old = _open_h5(src)
            with f:
                self._check_same(old, np.asarray(f["noise"]))

    def _check_same(self, old: CacheRecord, noise: np.ndarray) -> None:
        diffs = old.differences(self.record)
        if diffs or not np.array_equal(noise, self.noise):
            what = "; ".join(diffs[:3]) or "the noise"
            raise DdpmsegError(
                f"{self.path} holds features made with other settings ({what}: cache vs this run); "
                "use a new --out file or the same settings"
            )

    def done(self) -> Mapping[str, tuple[str, str | None]]:
        """Every finished image (main file and parts): id -> (source, sha256; None in 0.1.0's caches).
        For a folder cache, a mapping that opens an image's file only when it is looked up."""
        if self.folder:
            return _FolderIndex(self.path)
        return _finished_in_file(self.path)

    def finished(self, image_id: str) -> bool:
        """Whether this run (or any other writer) has already written ``image_id``'s file."""
        d = self.path if self.folder else parts_dir(self.path)
        return (d / f"{image_id}.h5").is_file()

    def add(self, image_id: str, maps: BlockMaps, source: str, preprocess: dict[str, Any], sha256: str) -> None:
        """Write one finished image to its own part file (folder cache: its own file in the folder), atomically."""
        d = self.path if self.folder else parts_dir(self.path)
        d.mkdir(exist_ok=True, parents=self.folder)
        if self.folder and not (d / FOLDER_MARKER).is_file():
            save_npy_atomic(d / FOLDER_NOISE, self.noise)
            text = json.dumps({k: v for k, v in self.record.to_attrs().items() if k != "format"} | {"format": FOLDER_FORMAT},
                              indent=2, sort_keys=True)
            write_atomic(d / FOLDER_MARKER, lambda p: p.write_text(text + "\n"))
        dtype = np.dtype(self.record.extract.storage_dtype)

        def write(tmp: Path) -> None:
            with h5py.File(tmp, "w") as f:
                _write_header(f, self.record, self.noise)
                arrays = {k: v.numpy().astype(dtype) for k, v in maps.items()}
                _write_image(f, image_id, arrays, source, preprocess, sha256)

        write_atomic(d / f"{image_id}.h5", write)

    def merge(self) -> int:
        """Fold every part into the main file; returns the number of images merged (a folder cache: 0, it
        only loses the temp files of images interrupted mid-write)."""
        if self.folder:
            for tmp in self.path.glob(".*.tmp") if self.path.is_dir() else []:
                tmp.unlink(missing_ok=True)
            return 0
        parts = _complete_parts(self.path)
        if not parts:  # nothing finished: never leave an empty cache behind
            self._remove_parts_dir()
            return 0
        remove_stale_temps(self.path)  # of a merge killed earlier

        def write(tmp: Path) -> None:
            if self.path.exists():
                shutil.copyfile(self.path, tmp)
                f = h5py.File(tmp, "a")
            else:
                f = h5py.File(tmp, "w")
                _write_header(f, self.record, self.noise)
            with f:
                images = f["images"]
                for part in parts:
                    with h5py.File(part, "r") as p:
                        for image_id, g in p["images"].items():
                            if image_id in images:
                                del images[image_id]
                            p.copy(g, images, name=image_id)

        write_atomic(self.path, write)
        for part in parts:
            part.unlink()
        self._remove_parts_dir()
        return len(parts)

    def _remove_parts_dir(self) -> None:
        """Remove the parts folder with any temp file of an image interrupted mid-write."""
        d = parts_dir(self.path)
        if not d.is_dir():
            return
        for tmp in d.glob("*.tmp"):  # this release's temp files and 0.1.0's (ID.h5.tmp)
            tmp.unlink(missing_ok=True)
        if not any(d.iterdir()):
            d.rmdir()


class _FolderIndex(Mapping):
    """id -> (source, sha256) of a folder cache's images, each file opened only when looked up."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._ids = [p.stem for p in _folder_shards(path)] if path.is_dir() else []

    def __contains__(self, image_id: object) -> bool:
        return isinstance(image_id, str) and (self.path / f"{image_id}.h5").is_file()

    def __getitem__(self, image_id: str) -> tuple[str, str | None]:
        f, _ = _open_h5(self.path / f"{image_id}.h5")
        with f:
            g = f["images"][image_id]
            sha = g.attrs.get("sha256")
            return str(g.attrs["source"]), None if sha is None else str(sha)

    def __iter__(self) -> Iterator[str]:
        return iter(self._ids)

    def __len__(self) -> int:
        return len(self._ids)


def _write_image(f: h5py.File, image_id: str, maps: dict, source: str, preprocess: dict[str, Any], sha256: str) -> None:
    g = f["images"].create_group(image_id)
    for (t, b), arr in maps.items():
        g.create_dataset(dataset_name(t, b), data=arr)
    g.attrs["source"] = source
    g.attrs["sha256"] = sha256
    g.attrs["preprocess"] = json.dumps(preprocess, sort_keys=True)
    g.attrs["complete"] = True


class FeatureCache:
    """Read access to a feature file (plus finished parts of an interrupted run).

    ``record`` is the file's :class:`~ddpmseg.records.CacheRecord`,
    ``image_ids`` the image files' stems (natural order), ``noise`` the shared
    (1, 3, S, S) noise, ``pixel_features(id)`` the exact upsampled (C, S, S)
    float32 pixel features in the reference order.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._files: list[h5py.File] = []
        self._where: dict[str, h5py.Group] = {}
        if self.path.is_dir():
            self._open_folder()
            return
        parts = _complete_parts(self.path)
        sources = ([self.path] if self.path.exists() or not parts else []) + parts
        records = []
        try:
            for src in sources:
                f, record = _open_h5(src)
                self._files.append(f)
                records.append(record)
                for image_id, g in f["images"].items():
                    if g.attrs.get("complete", False):
                        self._where[image_id] = g
        except BaseException:
            self.close()
            raise
        self.record: CacheRecord = records[0]
        self.noise: np.ndarray = np.asarray(self._files[0]["noise"])
        self.image_ids: list[str] = sorted(self._where, key=natural_key)

    def _open_folder(self) -> None:
        if not (self.path / FOLDER_MARKER).is_file():
            raise DdpmsegError(f"feature cache {self.path} is a folder without {FOLDER_MARKER}; give a cache written "
                               "by `ddpmseg extract` (a .h5 file or a cache folder)")
        self.record = _read_marker(self.path)
        self.noise = np.load(self.path / FOLDER_NOISE)
        self._folder = {p.stem: p for p in _folder_shards(self.path)}
        self.image_ids = sorted(self._folder, key=natural_key)

    # -- configuration -------------------------------------------------------------
    @property
    def steps(self) -> list[int]:
        return list(self.record.extract.steps)

    @property
    def blocks(self) -> list[int]:
        return list(self.record.extract.blocks)

    @property
    def keys(self) -> list[tuple[int, int]]:
        return self.record.extract.keys

    @property
    def image_size(self) -> int:
        return int(self.record.backbone.config.image_size)

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
        return image_id in self._where or image_id in getattr(self, "_folder", {})

    def __len__(self) -> int:
        return len(self.image_ids)

    def __iter__(self) -> Iterator[str]:
        return iter(self.image_ids)

    def _group(self, image_id: str) -> h5py.Group:
        if image_id not in self._where and image_id in getattr(self, "_folder", {}):
            f, record = _open_h5(self._folder[image_id])
            self._files.append(f)
            if record.differences(self.record):
                raise DdpmsegError(f"{self._folder[image_id]} was made with other settings than its cache folder "
                                   f"({'; '.join(record.differences(self.record)[:2])}); move it out of {self.path}")
            self._where[image_id] = f["images"][image_id]
        try:
            return self._where[image_id]
        except KeyError:
            raise DdpmsegError(
                f"image {image_id!r} is not in {self.path}; run `ddpmseg extract` on it first"
            ) from None

    def source(self, image_id: str) -> str:
        return str(self._group(image_id).attrs["source"])

    def sha256(self, image_id: str) -> str | None:
        """The image file's sha256 at extraction (None for images cached by 0.1.0)."""
        sha = self._group(image_id).attrs.get("sha256")
        return None if sha is None else str(sha)

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


def merge_caches(sources: list[str | Path], out: str | Path) -> tuple[int, int]:
    """Join caches (files or folders: the outputs of ``extract --shard I/N`` runs, say) into ``out`` (a
    new or existing file or folder of the same settings); returns (images added, distinct images of the
    sources that were there already).

    The same image id with other content (by sha256) in two caches is an error; nothing of ``out`` is
    replaced (a file is rewritten through a copy, a folder only gains files).
    """
    if not sources:
        raise DdpmsegError("no cache to merge; give the caches written by `ddpmseg extract`")
    out = Path(out)
    if any(Path(s).resolve() == out.resolve() for s in sources):
        raise DdpmsegError(f"--out {out} is one of the caches to merge; give a new or another cache")
    caches: list[FeatureCache] = []
    try:
        for s in sources:
            caches.append(FeatureCache(s))
        first = caches[0]
        for c in caches[1:]:
            diffs = c.record.differences(first.record)
            if diffs or not np.array_equal(c.noise, first.noise):
                raise DdpmsegError(f"{c.path} was made with other settings than {first.path} "
                                   f"({'; '.join(diffs[:2]) or 'the noise'}); only caches of one extraction merge")
        writer = FeatureWriter(out, first.record, torch.from_numpy(np.asarray(first.noise)))
        done = dict(writer.done()) if not writer.folder else writer.done()
        added, kept = 0, set()
        try:
            for c in caches:
                for image_id in c.image_ids:
                    sha = c.sha256(image_id)
                    if image_id in done or writer.finished(image_id):
                        known = done[image_id][1] if image_id in done else sha
                        if known and sha and known != sha:
                            raise DdpmsegError(f"image id {image_id!r} is in two caches with other content ({c.path} "
                                               "and another); rename one image and re-extract it")
                        kept.add(image_id)
                        continue
                    maps = {k: torch.from_numpy(v) for k, v in c.block_maps(image_id).items()}
                    writer.add(image_id, maps, c.source(image_id), c.preprocess(image_id), sha or "")
                    added += 1
        finally:
            writer.merge()
        return added, len(kept)
    finally:
        for c in caches:
            c.close()
