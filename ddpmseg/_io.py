"""Atomic file writes: a temp file beside the target, then one rename."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

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
