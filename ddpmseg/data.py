"""Images, label maps and label sets: reading, checking and geometric mapping.

Everything a user hands to ddpmseg passes through here: image files are read
into RGB arrays, label maps (``.npy`` or PNG, index- or colour-coded) into
integer arrays, and both are mapped onto the model's ``S x S`` input grid by a
:class:`Preprocess` record that can also map predictions back to the original
image size.

This module imports nothing else from ddpmseg except the error type, so any
other module (including :mod:`ddpmseg.viz`) may import it.
"""

from __future__ import annotations

import colorsys
import contextlib
import csv
import io
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps

from ddpmseg._io import write_atomic
from ddpmseg.errors import DdpmsegError

log = logging.getLogger(__name__)

__all__ = [
    "COLOR_TOLERANCE",
    "CSV_HEADER",
    "LabelSet",
    "MASK_SUFFIXES",
    "OFF_PALETTE_MAX_WIDTH",
    "Preprocess",
    "SUPPORTED_IMAGE_SUFFIXES",
    "apply_min_pixels",
    "check_labels",
    "distinct_colors",
    "find_mask",
    "list_images",
    "list_label_sets",
    "load_label_set",
    "load_mask",
    "load_rgb",
    "make_synthetic_dataset",
    "natural_key",
    "prepare_mask",
    "preprocess_image",
    "restore_labels",
    "restore_map",
]

SUPPORTED_IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
"""Suffixes (lower case) that :func:`list_images` picks up in a folder."""

MASK_SUFFIXES: tuple[str, ...] = (".npy", ".png", ".bmp", ".tif", ".tiff", ".gif")
"""Suffixes :func:`find_mask` tries, in this order."""

CSV_HEADER: tuple[str, ...] = ("index", "name", "r", "g", "b")
"""The header every label-set CSV must have."""

COLOR_TOLERANCE: float = 60.0
"""Largest RGB (Euclidean) distance at which a mask colour is mapped to its nearest class colour."""

OFF_PALETTE_MAX_WIDTH: int = 4
"""Colours farther than :data:`COLOR_TOLERANCE` from every class colour are accepted only in
bands at most this many pixels wide (anti-aliased class borders); each such pixel takes the
label of the nearest pixel whose colour is within tolerance. Any solid patch wider than this
of off-palette colour is an error (the CSV does not match the mask)."""

_MODES = ("resize", "crop")


def natural_key(s: str | os.PathLike) -> tuple:
    """Sort key that orders embedded numbers numerically (``image_2`` < ``image_10``)."""
    text = str(s)
    parts = re.split(r"(\d+)", text)
    key: list[Any] = []
    for i, part in enumerate(parts):
        # odd positions are digit runs, even positions text: types never mix per position
        key.append(int(part) if i % 2 else part.lower())
    return (tuple(key), text)


# -- colours and label sets ------------------------------------------------------------
def distinct_colors(n: int) -> np.ndarray:
    """``n`` deterministic, visually distinct, non-black RGB colours as an (n, 3) uint8 array.

    Hues follow the golden angle; saturation and brightness cycle through a few
    levels so that neighbouring indices differ strongly even for large ``n``.
    """
    if n < 0:
        raise DdpmsegError(f"distinct_colors needs n >= 0, got {n}")
    out: list[tuple[int, int, int]] = []
    seen: set[tuple[int, int, int]] = set()
    sats, vals = (0.85, 0.55, 1.0), (0.95, 0.7, 0.5)
    i = 0
    while len(out) < n:
        h = (i * 0.618033988749895) % 1.0
        s = sats[(i // 3) % len(sats)]
        v = vals[i % len(vals)]
        c = tuple(int(round(255 * x)) for x in colorsys.hsv_to_rgb(h, s, v))
        if c not in seen and c != (0, 0, 0):
            seen.add(c)  # type: ignore[arg-type]
            out.append(c)  # type: ignore[arg-type]
        i += 1
    return np.asarray(out, dtype=np.uint8).reshape(n, 3)


@dataclass(frozen=True)
class LabelSet:
    """Class names and their RGB colours; class ``i`` is ``names[i]`` drawn in ``colors[i]``."""

    name: str
    names: tuple[str, ...]
    colors: tuple[tuple[int, int, int], ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", tuple(str(n) for n in self.names))
        object.__setattr__(self, "colors", tuple(tuple(int(v) for v in c) for c in self.colors))
        if len(self.names) != len(self.colors):
            raise DdpmsegError(
                f"label set {self.name!r} has {len(self.names)} names but {len(self.colors)} colours; give one colour per class"
            )
        if not self.names:
            raise DdpmsegError(f"label set {self.name!r} has no classes; give at least one class")
        for c in self.colors:
            if len(c) != 3 or not all(0 <= v <= 255 for v in c):
                raise DdpmsegError(f"label set {self.name!r} has colour {c}; colours are three integers 0..255")

    @property
    def n_classes(self) -> int:
        """Number of classes K."""
        return len(self.names)

    def palette(self) -> np.ndarray:
        """The class colours as a (K, 3) uint8 array."""
        return np.asarray(self.colors, dtype=np.uint8).reshape(-1, 3)

    def to_csv(self, path: str | Path) -> None:
        """Write ``index,name,r,g,b`` rows (atomically) to ``path``."""
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(CSV_HEADER)
        for i, (n, c) in enumerate(zip(self.names, self.colors)):
            w.writerow([i, n, *c])
        write_atomic(Path(path), lambda tmp: tmp.write_text(buf.getvalue(), encoding="utf-8"))

    @classmethod
    def default(cls, n_classes: int) -> "LabelSet":
        """``class_0 .. class_{K-1}`` in :func:`distinct_colors`."""
        if n_classes < 1:
            raise DdpmsegError(f"a label set needs at least one class, got {n_classes}")
        cols = distinct_colors(n_classes)
        return cls(
            f"default_{n_classes}",
            tuple(f"class_{i}" for i in range(n_classes)),
            tuple(tuple(int(v) for v in c) for c in cols),  # type: ignore[misc]
        )


def _shipped_dir() -> Any:
    """The shipped label-set folder (installed package, else the repository's annotations/)."""
    try:
        from importlib.resources import files

        root = files("ddpmseg.annotations")
        if any(p.name.endswith(".csv") for p in root.iterdir()):
            return root
    except (ModuleNotFoundError, FileNotFoundError, NotADirectoryError, TypeError):
        pass
    return Path(__file__).resolve().parent.parent / "annotations"


def list_label_sets() -> list[str]:
    """Names of the label sets shipped with ddpmseg (e.g. ``ffhq_34``)."""
    try:
        names = [p.name[:-4] for p in _shipped_dir().iterdir() if p.name.endswith(".csv")]
    except (FileNotFoundError, NotADirectoryError):
        names = []
    return sorted(names, key=natural_key)


def _parse_label_csv(text: str, source: str, name: str) -> LabelSet:
    rows = [r for r in csv.reader(io.StringIO(text.lstrip("\ufeff"))) if any(x.strip() for x in r)]
    if not rows:
        raise DdpmsegError(f"label set {source} is empty; write a header 'index,name,r,g,b' and one row per class")
    header = tuple(x.strip().lower() for x in rows[0])
    if header != CSV_HEADER:
        raise DdpmsegError(
            f"label set {source} has header {','.join(rows[0])!r}; the first line must be 'index,name,r,g,b'"
        )
    entries: dict[int, tuple[str, tuple[int, int, int]]] = {}
    for lineno, row in enumerate(rows[1:], start=2):
        if len(row) != 5:
            raise DdpmsegError(
                f"label set {source} row {lineno} has {len(row)} fields; each row is index,name,r,g,b (quote names with commas)"
            )
        try:
            idx = int(row[0].strip())
            rgb = tuple(int(v.strip()) for v in row[2:])
        except ValueError:
            raise DdpmsegError(
                f"label set {source} row {lineno} ({','.join(row)}) has a non-integer index or colour; use integers"
            ) from None
        if not all(0 <= v <= 255 for v in rgb):
            raise DdpmsegError(f"label set {source} row {lineno} has colour {rgb}; r, g, b must be 0..255")
        cname = row[1].strip()
        if not cname:
            raise DdpmsegError(f"label set {source} row {lineno} has an empty class name; name every class")
        if idx in entries:
            raise DdpmsegError(f"label set {source} repeats index {idx} (row {lineno}); give each class one row")
        entries[idx] = (cname, rgb)  # type: ignore[assignment]
    if not entries:
        raise DdpmsegError(f"label set {source} has a header but no classes; add one row per class")
    k = len(entries)
    if sorted(entries) != list(range(k)):
        missing = sorted(set(range(k)) - set(entries))
        raise DdpmsegError(
            f"label set {source} has indices {sorted(entries)[:8]}...; indices must run 0..{k - 1} without gaps"
            + (f" (missing {missing[:8]})" if missing else "")
        )
    colours = [entries[i][1] for i in range(k)]
    if len(set(colours)) != k:
        log.warning("label set %s gives the same colour to several classes; colour-coded masks will be ambiguous", source)
    return LabelSet(name, tuple(entries[i][0] for i in range(k)), tuple(colours))


def load_label_set(name_or_path: str | Path) -> LabelSet:
    """A shipped label set by name (``"ffhq_34"``) or a ``index,name,r,g,b`` CSV file."""
    path = Path(name_or_path)
    if path.is_file():
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise DdpmsegError(f"cannot read label set {path}: {e}; give a UTF-8 CSV file") from None
        return _parse_label_csv(text, str(path), path.stem)
    key = str(name_or_path)
    key = key[:-4] if key.endswith(".csv") else key
    shipped = list_label_sets()
    if key in shipped:
        res = _shipped_dir() / f"{key}.csv"
        return _parse_label_csv(res.read_text(encoding="utf-8"), f"{key} (shipped)", key)
    if path.exists():
        raise DdpmsegError(f"label set {path} is not a file; give a CSV file or a shipped name")
    raise DdpmsegError(
        f"label set {name_or_path!r} is neither a CSV file nor a shipped name; use a CSV path or one of: {', '.join(shipped)}"
    )


# -- atomic writes -----------------------------------------------------------------------
def _save_image_atomic(path: Path, img: Image.Image, format: str | None = None) -> None:
    fmt = format or Image.registered_extensions().get(Path(path).suffix.lower(), "PNG")
    write_atomic(Path(path), lambda tmp: img.save(tmp, format=fmt))


# -- images --------------------------------------------------------------------------------
def list_images(inputs: Sequence[str | Path]) -> list[Path]:
    """Image files from files and folders (folders: their image files, natural order, non-recursive).

    The file stem is the image id, so two different files with one stem are an error.
    """
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = [
                f
                for f in p.iterdir()
                if f.is_file() and f.suffix.lower() in SUPPORTED_IMAGE_SUFFIXES and not f.name.startswith(".")
            ]
            out.extend(sorted(found, key=lambda f: natural_key(f.name)))
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


@contextlib.contextmanager
def _strict_loading() -> Iterator[None]:
    old = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = old


def _open_image(path: Path, what: str) -> Image.Image:
    """Open and fully decode an image, or raise a one-line DdpmsegError."""
    try:
        with _strict_loading():
            with Image.open(path) as im:
                im.load()
                try:  # EXIF orientation; a broken EXIF block only loses the rotation
                    out = ImageOps.exif_transpose(im) or im.copy()
                except Exception:
                    log.warning("%s %s: unreadable EXIF orientation ignored", what, path)
                    out = im.copy()
        return out
    except FileNotFoundError:
        raise DdpmsegError(f"cannot read {what} {path}: file not found; check the path") from None
    except DdpmsegError:
        raise
    except Exception as e:  # PIL raises many types for broken files
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
    im = _open_image(path, "image")
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


# -- preprocessing -------------------------------------------------------------------------
@dataclass(frozen=True)
class Preprocess:
    """How an original image maps onto the model's S x S input (and back).

    ``mode`` "resize": plain resize to S x S (aspect not kept, every pixel covered).
    ``mode`` "crop": resize the short side to S, then centre-crop S x S (the
    paper's recipe for square images; for non-square images the ends of the
    long side are not seen by the model).
    Sizes are (width, height); ``crop_box`` is (left, top, right, bottom) in the
    resized image's coordinates.
    """

    mode: str
    size: int
    original_size: tuple[int, int]
    crop_box: tuple[int, int, int, int]
    resized_size: tuple[int, int]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (lists, ints, strings)."""
        return {
            "mode": self.mode,
            "size": int(self.size),
            "original_size": [int(v) for v in self.original_size],
            "crop_box": [int(v) for v in self.crop_box],
            "resized_size": [int(v) for v in self.resized_size],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Preprocess":
        """Inverse of :meth:`to_dict` (accepts lists, tuples or numpy arrays)."""
        try:
            pre = cls(
                mode=str(d["mode"]),
                size=int(d["size"]),
                original_size=tuple(int(v) for v in d["original_size"]),  # type: ignore[arg-type]
                crop_box=tuple(int(v) for v in d["crop_box"]),  # type: ignore[arg-type]
                resized_size=tuple(int(v) for v in d["resized_size"]),  # type: ignore[arg-type]
            )
        except (KeyError, TypeError, ValueError) as e:
            raise DdpmsegError(
                f"preprocessing record {dict(d)!r} is invalid ({type(e).__name__}: {e}); re-extract the features"
            ) from None
        if (
            pre.mode not in _MODES
            or len(pre.original_size) != 2
            or len(pre.crop_box) != 4
            or len(pre.resized_size) != 2
        ):
            raise DdpmsegError(f"preprocessing record {dict(d)!r} is invalid; re-extract the features")
        return pre

    @classmethod
    def plan(cls, original_size: tuple[int, int], size: int, mode: str = "resize") -> "Preprocess":
        """The record for an image of ``original_size`` (W, H) and model size ``size``."""
        if mode not in _MODES:
            raise DdpmsegError(f"preprocess mode {mode!r} is unknown; use 'resize' or 'crop'")
        if int(size) < 1:
            raise DdpmsegError(f"model input size must be positive, got {size}")
        w, h = int(original_size[0]), int(original_size[1])
        if w < 1 or h < 1:
            raise DdpmsegError(f"image size {w}x{h} is empty; give a non-empty image")
        s = int(size)
        if mode == "resize" or w == h:
            return cls(mode, s, (w, h), (0, 0, s, s), (s, s))
        if w < h:
            rw, rh = s, max(s, int(round(h * s / w)))
        else:
            rw, rh = max(s, int(round(w * s / h))), s
        left, top = (rw - s) // 2, (rh - s) // 2
        return cls(mode, s, (w, h), (left, top, left + s, top + s), (rw, rh))


def preprocess_image(rgb: np.ndarray, size: int, mode: str = "resize") -> tuple[torch.Tensor, Preprocess]:
    """The model input (1, 3, S, S) float32 in [-1, 1] and its :class:`Preprocess` record.

    Uses PIL bilinear resampling then ``x / 127.5 - 1``; for a square image both
    modes equal the reference ``img.resize((S, S), Image.BILINEAR)``.
    """
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise DdpmsegError(f"preprocess_image needs an (H, W, 3) uint8 array, got {rgb.shape} {rgb.dtype}")
    pre = Preprocess.plan((rgb.shape[1], rgb.shape[0]), size, mode)
    img = Image.fromarray(rgb, "RGB").resize(pre.resized_size, Image.BILINEAR)
    if pre.crop_box != (0, 0, *pre.resized_size):
        img = img.crop(pre.crop_box)
    x = np.asarray(img, dtype=np.float64) / 127.5 - 1.0
    t = torch.from_numpy(np.ascontiguousarray(x.astype(np.float32).transpose(2, 0, 1)))[None]
    return t, pre


def _nearest_index(n_out: int, n_in: int) -> np.ndarray:
    """Source index of each output pixel for a nearest resize n_in -> n_out (pixel centres)."""
    return np.minimum(((np.arange(n_out) + 0.5) * (n_in / n_out)).astype(np.int64), n_in - 1)


def prepare_mask(mask: np.ndarray, pre: Preprocess) -> np.ndarray:
    """Map an (H, W) label map onto the model grid exactly as the image was mapped (nearest)."""
    mask = np.asarray(mask)
    w, h = pre.original_size
    if mask.ndim != 2 or mask.shape != (h, w):
        raise DdpmsegError(
            f"label map is {mask.shape[1] if mask.ndim > 1 else '?'}x{mask.shape[0]} (WxH) but its image is {w}x{h}; "
            "give a mask the size of its image"
        )
    rw, rh = pre.resized_size
    left, top, right, bottom = pre.crop_box
    rows = _nearest_index(rh, h)[top:bottom]
    cols = _nearest_index(rw, w)[left:right]
    return mask.astype(np.int64, copy=False)[np.ix_(rows, cols)]


def _back_coords(n_orig: int, n_resized: int, offset: int, s: int) -> tuple[np.ndarray, np.ndarray]:
    """Continuous coordinate, in the S-grid, of each original pixel centre, and whether it is inside."""
    c = (np.arange(n_orig) + 0.5) * (n_resized / n_orig) - offset
    return c, (c >= 0) & (c < s)


def _inverse_grid(pre: Preprocess) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """S-grid row and column coordinates of the original pixel centres, and the (H, W) inside-crop mask."""
    w, h = pre.original_size
    rw, rh = pre.resized_size
    left, top = pre.crop_box[:2]
    cy, vy = _back_coords(h, rh, top, pre.size)
    cx, vx = _back_coords(w, rw, left, pre.size)
    return cy, cx, vy[:, None] & vx[None, :]


def restore_labels(labels: np.ndarray, pre: Preprocess, fill: int = 255) -> np.ndarray:
    """Map an (S, S) label map back to the original (H, W) size (nearest).

    In crop mode, original pixels outside the crop get ``fill``.
    """
    labels = np.asarray(labels)
    s = pre.size
    if labels.shape != (s, s):
        raise DdpmsegError(f"label map is {labels.shape}, expected ({s}, {s}) for this preprocessing record")
    cy, cx, inside = _inverse_grid(pre)
    iy = np.clip(np.floor(cy).astype(np.int64), 0, s - 1)
    ix = np.clip(np.floor(cx).astype(np.int64), 0, s - 1)
    out = labels.astype(np.int64, copy=False)[np.ix_(iy, ix)].copy()
    out[~inside] = fill
    return out


def restore_map(values: np.ndarray, pre: Preprocess, fill: float = 0.0) -> np.ndarray:
    """Map an (S, S) (or (C, S, S)) float map back to the original size (bilinear, float32).

    In crop mode, original pixels outside the crop get ``fill``.
    """
    v = np.asarray(values, dtype=np.float32)
    s = pre.size
    if v.ndim not in (2, 3) or v.shape[-2:] != (s, s):
        raise DdpmsegError(f"map is {v.shape}, expected ({s}, {s}) or (C, {s}, {s}) for this preprocessing record")
    cy, cx, inside = _inverse_grid(pre)

    def taps(c: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        c = np.clip(c - 0.5, 0, s - 1)
        i0 = np.floor(c).astype(np.int64)
        i1 = np.minimum(i0 + 1, s - 1)
        return i0, i1, (c - i0).astype(np.float32)

    y0, y1, fy = taps(cy)
    x0, x1, fx = taps(cx)
    fy, fx = fy[:, None], fx[None, :]
    top_row = v[..., y0, :][..., x0] * (1 - fx) + v[..., y0, :][..., x1] * fx
    bot_row = v[..., y1, :][..., x0] * (1 - fx) + v[..., y1, :][..., x1] * fx
    out = (top_row * (1 - fy) + bot_row * fy).astype(np.float32)
    out[..., ~inside] = fill
    return out


# -- masks ---------------------------------------------------------------------------------
def find_mask(image_id: str, mask_dir: str | Path, image_path: str | Path | None = None) -> Path | None:
    """The label map for ``image_id`` in ``mask_dir``, or None.

    Tries ``{id}.npy``, ``{id}.png``, ``.bmp``, ``.tif``, ``.tiff``, ``.gif``, then
    DatasetGAN's ``image_mask{i}.npy`` / ``.png`` for an id ``image_{i}``.
    ``image_path`` (the image itself) is never returned, for folders holding
    images and masks together.
    """
    mask_dir = Path(mask_dir)
    names = [f"{image_id}{suf}" for suf in MASK_SUFFIXES]
    m = re.fullmatch(r"image_?(\d+)", image_id)
    if m:
        names += [f"image_mask{m.group(1)}.npy", f"image_mask{m.group(1)}.png"]
    skip = Path(image_path).resolve() if image_path is not None else None
    for n in names:
        p = mask_dir / n
        if p.is_file() and (skip is None or p.resolve() != skip):
            return p
    return None


def _load_npy(path: Path) -> np.ndarray:
    try:
        a = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise DdpmsegError(f"cannot read mask {path}: file not found; check the path") from None
    except Exception as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        raise DdpmsegError(f"cannot read mask {path}: {reason}; save it with numpy.save as an integer array") from None
    if not isinstance(a, np.ndarray):
        raise DdpmsegError(f"mask {path} holds several arrays; save one (H, W) integer array with numpy.save")
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.ndim != 2:
        raise DdpmsegError(f"mask {path} has shape {a.shape}; a label map is a 2-D (H, W) array of class indices")
    if a.dtype == bool:
        a = a.astype(np.int64)
    elif a.dtype.kind == "f":
        if not np.isfinite(a).all() or not np.array_equal(a, np.round(a)):
            raise DdpmsegError(
                f"mask {path} is a float array with non-integer values; save class indices as an integer array"
            )
        a = a.astype(np.int64)
    elif a.dtype.kind not in "iu":
        raise DdpmsegError(f"mask {path} has dtype {a.dtype}; save class indices as an integer array")
    return a.astype(np.int64)


def _nearest_valid_fill(labels: np.ndarray, bad: np.ndarray) -> np.ndarray:
    """Give every ``bad`` pixel the label of the nearest good pixel."""
    from scipy import ndimage

    _, (iy, ix) = ndimage.distance_transform_edt(bad, return_indices=True)
    return labels[iy, ix]


def _map_colours(rgb: np.ndarray, labelset: LabelSet, path: Path) -> np.ndarray:
    """Colour-coded (H, W, 3) mask -> class indices (see :data:`COLOR_TOLERANCE`)."""
    h, w, _ = rgb.shape
    codes = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2].astype(np.int32)
    uniq, inv, counts = np.unique(codes.ravel(), return_inverse=True, return_counts=True)
    ucol = np.stack([(uniq >> 16) & 255, (uniq >> 8) & 255, uniq & 255], axis=1).astype(np.float64)
    pal = labelset.palette().astype(np.float64)
    dist = np.sqrt(((ucol[:, None, :] - pal[None, :, :]) ** 2).sum(-1))
    nearest = dist.argmin(1)
    far_colour = dist.min(1) > COLOR_TOLERANCE
    labels = nearest[inv].reshape(h, w).astype(np.int64)
    if not far_colour.any():
        return labels
    far = far_colour[inv].reshape(h, w)
    n_far = int(far.sum())

    def fail(where: np.ndarray) -> None:
        sel = np.unique(codes[where], return_counts=True)
        top = int(sel[0][sel[1].argmax()])
        colour = ((top >> 16) & 255, (top >> 8) & 255, top & 255)
        raise DdpmsegError(
            f"mask {path} has {n_far} pixels whose colours match no class of label set {labelset.name!r} "
            f"(e.g. {colour}, farther than {COLOR_TOLERANCE:g} from every class colour); "
            "use --classes with the CSV that matches this mask's colours"
        )

    if n_far == far.size:
        fail(far)
    from scipy import ndimage

    k = OFF_PALETTE_MAX_WIDTH + 1
    solid = ndimage.binary_erosion(far, structure=np.ones((k, k), dtype=bool), border_value=0)
    if solid.any():
        fail(ndimage.binary_dilation(solid, structure=np.ones((k, k), dtype=bool)) & far)
    log.debug("mask %s: %d anti-aliased border pixels mapped to the nearest labelled pixel", path, n_far)
    return _nearest_valid_fill(labels, far)


def load_mask(
    path: str | Path,
    labelset: LabelSet | None = None,
    expected_size: tuple[int, int] | None = None,
) -> np.ndarray:
    """Read a label map as an (H, W) int64 array of class indices.

    ``.npy``: an integer (or integer-valued float/bool) 2-D array, (H, W, 1) allowed.
    Image files in mode L / P / I;16 / I / 1: the pixel values are the labels (for
    palette PNGs the palette *indices* are the labels). RGB(A) images are
    colour-coded: each colour maps to the nearest class colour of ``labelset``
    within :data:`COLOR_TOLERANCE`; thin anti-aliased borders of other colours
    take the label of the nearest labelled pixel; solid regions of unknown
    colour are an error. An RGB image whose three channels are equal is read as
    greyscale indices when no ``labelset`` is given (or when its values are all
    valid indices and are not all class colours). ``expected_size`` is (W, H).
    """
    path = Path(path)
    if path.suffix.lower() == ".npy":
        a = _load_npy(path)
    else:
        im = _open_image(path, "mask")
        mode = im.mode
        if mode in ("RGBA", "RGBa", "CMYK", "YCbCr", "HSV", "LAB"):
            im = im.convert("RGB")
            mode = "RGB"
        if mode in ("LA", "PA"):  # alpha dropped; the first channel holds the labels
            a = np.asarray(im)[..., 0].astype(np.int64)
        elif mode in ("L", "P", "1") or mode.startswith("I"):
            a = np.asarray(im).astype(np.int64)
        elif mode == "F":
            f = np.asarray(im)
            if not np.isfinite(f).all() or not np.array_equal(f, np.round(f)):
                raise DdpmsegError(f"mask {path} is a float image with non-integer values; save class indices")
            a = f.astype(np.int64)
        elif mode == "RGB":
            rgb = np.asarray(im, dtype=np.uint8)
            grey = bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())
            if labelset is None:
                if not grey:
                    raise DdpmsegError(
                        f"mask {path} is colour-coded (RGB); pass --classes with the CSV of its class colours"
                    )
                a = rgb[..., 0].astype(np.int64)
            else:
                a = None
                if grey:
                    vals = np.unique(rgb[..., 0])
                    pal_codes = {tuple(c) for c in labelset.colors}
                    all_palette = all((int(v), int(v), int(v)) in pal_codes for v in vals)
                    if not all_palette and int(vals.max()) < labelset.n_classes:
                        a = rgb[..., 0].astype(np.int64)
                if a is None:
                    a = _map_colours(rgb, labelset, path)
        else:
            raise DdpmsegError(f"mask {path} has unsupported image mode {mode}; save it as a greyscale, palette or RGB PNG")
    if a.min(initial=0) < 0:
        raise DdpmsegError(f"mask {path} has negative values (min {int(a.min())}); labels are 0..K-1 (255 = ignore)")
    if expected_size is not None:
        ew, eh = int(expected_size[0]), int(expected_size[1])
        if a.shape != (eh, ew):
            raise DdpmsegError(
                f"mask {path} is {a.shape[1]}x{a.shape[0]} but its image is {ew}x{eh} (WxH); "
                "give a mask the size of its image"
            )
    return a


def check_labels(
    mask: np.ndarray, n_classes: int, ignore_index: int = 255, path: str | Path | None = None
) -> None:
    """Raise if ``mask`` holds values outside ``0..n_classes-1`` other than ``ignore_index``."""
    vals = np.unique(np.asarray(mask))
    bad = vals[((vals < 0) | (vals >= n_classes)) & (vals != ignore_index)]
    if bad.size:
        shown = ", ".join(str(int(v)) for v in bad[:10]) + (", ..." if bad.size > 10 else "")
        where = f"mask {path}" if path is not None else "mask"
        raise DdpmsegError(
            f"{where} has label values {shown} outside the valid range 0..{n_classes - 1} (ignore {ignore_index}); "
            "fix the mask or use --classes with the matching label set"
        )


def apply_min_pixels(mask: np.ndarray, min_pixels: int = 20, ignore_index: int = 255) -> np.ndarray:
    """The reference rule: a class covering fewer than ``min_pixels`` pixels of an image becomes ``ignore_index``."""
    mask = np.asarray(mask)
    vals, counts = np.unique(mask, return_counts=True)
    rare = vals[(counts < min_pixels) & (vals != ignore_index)]
    out = mask.copy()
    if rare.size:
        out[np.isin(mask, rare)] = ignore_index
    return out


# -- synthetic dataset ---------------------------------------------------------------------
SYNTHETIC_LABELSET = LabelSet(
    "synthetic_shapes",
    ("background", "disc", "square"),
    ((40, 40, 40), (230, 60, 60), (60, 110, 230)),
)


def _synthetic_one(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    # background: greenish-grey with random stripes and noise
    base = rng.uniform(70, 150, 3) * np.array([0.8, 1.0, 0.8])
    ang, freq, phase = rng.uniform(0, np.pi), rng.uniform(0.15, 0.5), rng.uniform(0, 2 * np.pi)
    stripes = np.sin(freq * (np.cos(ang) * xx + np.sin(ang) * yy) + phase)
    img = base[None, None, :] + 25 * stripes[..., None] + rng.normal(0, 10, (size, size, 3))
    labels = np.zeros((size, size), dtype=np.uint8)
    for _ in range(100):  # place a disc and a square that both stay well visible
        r = rng.uniform(0.12, 0.22) * size
        cx, cy = rng.uniform(r, size - r, 2)
        disc = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
        half = rng.uniform(0.1, 0.2) * size
        sx, sy = rng.uniform(half, size - half, 2)
        square = (np.abs(xx - sx) <= half) & (np.abs(yy - sy) <= half)
        if (disc & ~square).sum() >= 0.6 * disc.sum():
            break
    disc_col = np.array([rng.uniform(180, 255), rng.uniform(20, 110), rng.uniform(20, 90)])
    square_col = np.array([rng.uniform(20, 90), rng.uniform(60, 160), rng.uniform(170, 255)])
    img[disc] = disc_col + rng.normal(0, 12, (int(disc.sum()), 3))
    labels[disc] = 1
    img[square] = square_col + rng.normal(0, 12, (int(square.sum()), 3))
    labels[square] = 2
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), labels


def make_synthetic_dataset(out_dir: str | Path, n_images: int = 6, size: int = 64, seed: int = 0) -> LabelSet:
    """Write ``shape_{i}.png`` images, ``shape_{i}.npy`` label maps and ``classes.csv``.

    Three classes (background, disc, square): noisy striped backgrounds with a
    warm disc and a cool square at random positions, sizes and shades.
    Deterministic for a given ``seed``. Returns the label set.
    """
    if n_images < 1 or size < 16:
        raise DdpmsegError(f"synthetic dataset needs n_images >= 1 and size >= 16, got {n_images} and {size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n_images):
        img, labels = _synthetic_one(rng, size)
        _save_image_atomic(out / f"shape_{i}.png", Image.fromarray(img, "RGB"), "PNG")
        write_atomic(out / f"shape_{i}.npy", lambda tmp, a=labels: _np_save(tmp, a))
    SYNTHETIC_LABELSET.to_csv(out / "classes.csv")
    return SYNTHETIC_LABELSET


def _np_save(tmp: Path, a: np.ndarray) -> None:
    with open(tmp, "wb") as f:
        np.save(f, a)
