"""Image files: listing them (natural order, ids = file stems) and reading any of them as RGB."""

from __future__ import annotations

import logging
import os
import re
import struct
import zlib
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageOps

from ddpmseg.errors import DdpmsegError

log = logging.getLogger(__name__)

# what PIL raises, by format plugin, for files that are not (intact) images
_BROKEN_IMAGE = (OSError, ValueError, SyntaxError, EOFError, IndexError, KeyError, struct.error, zlib.error, Image.DecompressionBombError)

SUPPORTED_IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
"""Suffixes (lower case) that :func:`list_images` picks up in a folder."""

def natural_key(s: str | os.PathLike) -> tuple:
    """Sort key that orders embedded numbers numerically (``image_2`` < ``image_10``)."""
    text = str(s)
    parts = re.split(r"(\d+)", text)
    key: list[Any] = []
    for i, part in enumerate(parts):
        # odd positions are digit runs, even positions text: types never mix per position
        key.append(int(part) if i % 2 else part.lower())
    return (tuple(key), text)


def list_images(inputs: Sequence[str | Path], skipped: list[str] | None = None) -> list[Path]:
    """Image files from files and folders (folders: their image files, natural order, non-recursive).

    The file stem is the image id, so two different files with one stem are an error.
    ``skipped``, if given, receives what the folders hold besides images
    (subfolders as ``name/``, other files by name; hidden entries are not listed).
    """
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found, other = [], []
            for f in sorted(p.iterdir(), key=lambda f: natural_key(f.name)):
                if f.name.startswith("."):
                    continue
                if f.is_file() and f.suffix.lower() in SUPPORTED_IMAGE_SUFFIXES:
                    found.append(f)
                else:
                    other.append(f.name + ("/" if f.is_dir() else ""))
            out.extend(found)
            if skipped is not None:
                skipped.extend(other)
        elif p.is_file():
            out.append(p)
        else:
            raise DdpmsegError(f"image input {p} does not exist; give existing image files or folders")
    if not out:
        raise DdpmsegError(
            f"no images found in {', '.join(map(str, inputs))}; supported suffixes are {' '.join(SUPPORTED_IMAGE_SUFFIXES)}"
        )
    unique: list[Path] = []
    by_stem: dict[str, Path] = {}
    for p in out:
        prev = by_stem.get(p.stem)
        if prev is not None:
            if prev.resolve() == p.resolve():
                continue
            raise DdpmsegError(
                f"images {prev} and {p} share the id {p.stem!r} (the file stem); rename one or pass them separately"
            )
        by_stem[p.stem] = p
        unique.append(p)
    return unique


def open_image(path: Path, what: str) -> Image.Image:
    """Open and fully decode an image (EXIF orientation applied), or raise a one-line DdpmsegError.

    A truncated file is an error (PIL's default; ddpmseg never changes
    ``ImageFile.LOAD_TRUNCATED_IMAGES``).
    """
    try:
        with Image.open(path) as im:
            im.load()
            try:  # EXIF orientation; a broken EXIF block only loses the rotation
                out = ImageOps.exif_transpose(im) or im.copy()
            except (OSError, ValueError, KeyError, TypeError, struct.error, ZeroDivisionError):
                log.warning("%s %s: unreadable EXIF orientation ignored", what, path)
                out = im.copy()
        return out
    except FileNotFoundError:
        raise DdpmsegError(f"cannot read {what} {path}: file not found; check the path") from None
    except _BROKEN_IMAGE as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        raise DdpmsegError(
            f"cannot read {what} {path}: {reason}; re-export it as a complete PNG/JPEG or remove it"
        ) from None


def _to_uint8_range(a: np.ndarray, mode: str) -> np.ndarray:
    """Integer (16-bit style) or float greyscale to uint8."""
    if mode == "F":
        a = np.nan_to_num(a.astype(np.float64))
        a = a * 255.0 if a.max(initial=0.0) <= 1.0 else a
        return np.clip(np.rint(a), 0, 255).astype(np.uint8)
    a = np.clip(a.astype(np.int64), 0, 65535)
    return ((a * 255 + 32767) // 65535).astype(np.uint8)  # round(v / 257)


def _composite_white(im: Image.Image) -> np.ndarray:
    rgba = np.asarray(im.convert("RGBA"), dtype=np.float64)
    a = rgba[..., 3:4] / 255.0
    return np.clip(np.rint(rgba[..., :3] * a + 255.0 * (1.0 - a)), 0, 255).astype(np.uint8)


def load_rgb(path: str | Path) -> np.ndarray:
    """Read an image file as an (H, W, 3) uint8 RGB array.

    EXIF orientation is applied. Greyscale (L, 1-bit) is replicated to three
    channels; 16-bit and 32-bit integer greyscale (I;16*, I) is scaled from
    0..65535 to 0..255 (``round(v / 257)``); float (F) is taken as 0..1 if its
    maximum is at most 1, else as 0..255. Transparency (RGBA, LA, palette with
    transparency) is composited over white, so transparent areas never expose
    arbitrary hidden colours. CMYK and YCbCr are converted by PIL.
    Truncated or unreadable files raise :class:`DdpmsegError`.
    """
    path = Path(path)
    im = open_image(path, "image")
    mode = im.mode
    if mode == "RGB":
        rgb = np.asarray(im, dtype=np.uint8)
    elif mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in im.info):
        rgb = _composite_white(im)
    elif mode.startswith("I") or mode == "F":
        g = _to_uint8_range(np.asarray(im), mode)
        rgb = np.repeat(g[..., None], 3, axis=2)
    else:  # L, 1, P, CMYK, YCbCr, LAB, HSV ...
        rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)
    return np.ascontiguousarray(rgb.reshape(rgb.shape[0], rgb.shape[1], 3))


def parse_shard(shard: str) -> tuple[int, int]:
    """``"I/N"`` -> (I, N), 0 <= I < N, else a one-line error."""
    try:
        i, n = (int(v) for v in shard.split("/"))
    except ValueError:
        raise DdpmsegError(f"--shard {shard!r}: give I/N, e.g. 0/4 for the first of four shares") from None
    if not (n >= 1 and 0 <= i < n):
        raise DdpmsegError(f"--shard {shard}: I/N needs N >= 1 and 0 <= I < N (shares are numbered from 0)")
    return i, n


def take_shard(paths: Sequence[Path], shard: str | None) -> list[Path]:
    """Share ``I/N`` of ``paths``: sorted by image id (natural order), every N-th from the I-th. The N
    shares are disjoint and together are all of ``paths``, whatever order the inputs came in."""
    if shard is None:
        return list(paths)
    i, n = parse_shard(shard)
    ordered = sorted(paths, key=lambda p: (natural_key(p.stem), str(p)))
    return ordered[i::n]
