"""Files: output paths checked before any work and written atomically (a temp beside the target,
then one rename), and content digests (what caches and models identify inputs by)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from tqdm.auto import tqdm

from ddpmseg.errors import DdpmsegError

_HASH_CHUNK = 8 << 20
_sha256_cache: dict[tuple[str, int, int], str] = {}


def check_writable(path: str | Path, *, folder: bool, option: str = "--out", example: str = "feats.h5") -> Path:
    """Raise a one-line DdpmsegError unless ``path`` can be written, before any expensive work.

    ``folder=True``: ``path`` is a folder (created later if missing, parents included);
    ``folder=False``: ``path`` is a file whose folder must already exist.
    """
    path = Path(path)
    if folder:
        if path.exists() and not path.is_dir():
            raise DdpmsegError(f"{option} {path} exists and is not a folder; choose a folder name")
        where = path
        while not where.exists() and where != where.parent:  # the folder that will be written into
            where = where.parent
        if not where.is_dir():
            raise DdpmsegError(f"{option} {path}: {where} is a file, not a folder; choose another {option}")
    else:
        if path.is_dir():
            raise DdpmsegError(f"{option} {path} is a directory; give a file name such as {example}")
        where = path.parent
        if not where.is_dir():
            raise DdpmsegError(f"folder {where} for {option} does not exist; create it first")
    if not os.access(where, os.W_OK | os.X_OK):
        raise DdpmsegError(f"folder {where} for {option} {path} is not writable; choose another {option} or fix its permissions")
    return path


def check_not_there(paths: list[Path], overwrite: bool, what: str = "--out") -> None:
    """Refuse outputs that exist already (one line naming the first few) unless ``overwrite``."""
    existing = [p for p in paths if p.exists()]
    if existing and not overwrite:
        names = ", ".join(str(p) for p in existing[:3]) + (", ..." if len(existing) > 3 else "")
        raise DdpmsegError(
            f"{what} would replace {len(existing)} existing file{'s' if len(existing) > 1 else ''} ({names}); "
            "pass --overwrite to replace them, or choose another output"
        )


def check_new_folder(path: str | Path, option: str = "--out", overwrite: bool = False) -> Path:
    """``check_writable`` for a folder written whole by :func:`atomic_folder`: its parent must exist,
    and it must not exist yet (or be empty) unless ``overwrite``."""
    path = check_writable(path, folder=True, option=option)
    if not path.absolute().parent.is_dir():
        raise DdpmsegError(f"folder {path.parent} for {option} {path} does not exist; create it first")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise DdpmsegError(f"{option} {path} exists and is a non-empty folder; pass a new folder (or --overwrite)")
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_json(path: Path, option: str, fix: str) -> object:
    """The JSON value of the file ``path`` given by ``option``; unreadable or not JSON is a one-line
    error ending in ``fix`` (what the file should hold)."""
    try:
        return json.loads(Path(path).read_text())
    except OSError as e:
        raise DdpmsegError(f"{option} {path}: cannot read it ({e.strerror})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DdpmsegError(f"{option} {path} is not JSON ({e}); {fix}") from None


def changed_file(path: Path, digest: str | None) -> str | None:
    """What is wrong with ``path`` against the sha256 recorded for it: "is gone", "has changed" (the
    contents differ), or None (there, and the same; any contents when ``digest`` is empty)."""
    if not path.is_file():
        return "is gone"
    return "has changed" if digest and file_sha256(path) != digest else None


def _fsync(path: Path) -> None:
    """Flush a file's (or a folder's entries') data to the disk; where the system cannot (some file
    systems refuse a folder), go on: the rename is still atomic."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: str | Path, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp)`` for a temp file beside ``path``, then rename it onto ``path``.

    Readers see either the old file or the complete new one, never a partial
    write, even after a crash of the machine: the file's data and then the
    rename are flushed to the disk (fsync) before this returns. The file gets
    the permissions of a plain ``open(path, "w")`` (0o666 less the umask), not
    the temp file's 0o600.
    """
    path = Path(path)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:  # name the file the user asked for, not the temp file
        raise DdpmsegError(
            f"cannot write {path}: {e.strerror or e}; check that folder {path.parent} exists and is writable"
        ) from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)  # the rename itself
    finally:
        if tmp.exists():
            tmp.unlink()


def save_npy_atomic(path: str | Path, array: np.ndarray) -> None:
    """``np.save`` of ``array`` to ``path`` (the exact name: no ``.npy`` added), through :func:`write_atomic`."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.save would append ".npy" to the temp file's name
            np.save(f, array)

    write_atomic(path, write)


def remove_stale_temps(path: Path) -> None:
    """Delete the temp files a killed :func:`write_atomic` of ``path`` left beside it."""
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_folder(out: str | Path) -> Iterator[Path]:
    """Yield a temp folder beside ``out`` to fill; on success it is renamed onto ``out`` (missing or empty).

    On any error (or Ctrl-C) the temp folder is removed and ``out`` is untouched.
    The folder gets the permissions of a plain ``mkdir`` (0o777 less the umask).
    """
    out = Path(out)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.absolute().parent))
    except OSError as e:
        raise DdpmsegError(f"cannot write {out}: {e.strerror or e}; check that its folder exists and is writable") from None
    old = None
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
        if out.is_dir() and any(out.iterdir()):  # --overwrite: move the old folder aside, then replace
            old = out.with_name(f".{out.name}.{tmp.name}.old")
            os.replace(out, old)
        elif out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not out.exists():
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def file_sha256(path: str | Path, progress: bool = False) -> str:
    """SHA-256 hex digest of a file, cached per (path, size, mtime) for this process."""
    path = Path(path).resolve()
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key in _sha256_cache:
        return _sha256_cache[key]
    digest = hashlib.sha256()
    with open(path, "rb") as f, tqdm(
        total=st.st_size, unit="B", unit_scale=True, unit_divisor=1024, desc=f"sha256 {path.name}", disable=not progress
    ) as bar:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
            bar.update(len(chunk))
    _sha256_cache[key] = digest.hexdigest()
    return _sha256_cache[key]
