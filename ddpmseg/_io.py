"""Output paths: checked before any work, written atomically (a temp beside the target, then one rename)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from ddpmseg.errors import DdpmsegError


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


def check_new_folder(path: str | Path, option: str = "--out") -> Path:
    """``check_writable`` for a folder that must not exist yet (or be empty)."""
    path = check_writable(path, folder=True, option=option)
    if path.is_dir() and any(path.iterdir()):
        raise DdpmsegError(f"{option} {path} exists and is a non-empty folder; pass a new folder (or remove it)")
    return path


def write_atomic(path: str | Path, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp)`` for a temp file beside ``path``, then rename it onto ``path``.

    Readers see either the old file or the complete new one, never a partial write.
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
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def is_temp_file(path: Path) -> bool:
    """Whether ``path`` is a temp file of :func:`write_atomic` (left behind only by a killed process)."""
    return path.name.startswith(".") and path.name.endswith(".tmp")


@contextlib.contextmanager
def atomic_folder(out: str | Path) -> Iterator[Path]:
    """Yield a temp folder beside ``out`` to fill; on success it is renamed onto ``out`` (missing or empty).

    On any error (or Ctrl-C) the temp folder is removed and ``out`` is untouched.
    """
    out = Path(out)
    parent = out.parent if str(out.parent) else Path(".")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=parent))
    try:
        yield tmp
        if out.exists():
            out.rmdir()  # empty: checked by check_new_folder before the work
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
