"""Label maps: finding an image's mask, reading it (``.npy``, index or colour-coded PNG) and checking it."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np

from ddpmseg.data.images import open_image
from ddpmseg.data.labelsets import LabelSet
from ddpmseg.errors import DdpmsegError

log = logging.getLogger(__name__)

MASK_SUFFIXES: tuple[str, ...] = (".npy", ".png", ".bmp", ".tif", ".tiff", ".gif")
"""Suffixes :func:`find_mask` tries, in this order."""

COLOR_TOLERANCE: float = 60.0
"""Largest RGB (Euclidean) distance at which a mask colour is mapped to its nearest class colour."""

OFF_PALETTE_MAX_WIDTH: int = 4
"""Colours farther than :data:`COLOR_TOLERANCE` from every class colour are accepted only in
bands at most this many pixels wide (anti-aliased class borders); each such pixel takes the
label of the nearest pixel whose colour is within tolerance. Any solid patch wider than this
of off-palette colour is an error (the CSV does not match the mask)."""

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


def no_mask_found(items: list[tuple[str, str | Path | None]], mask_dir: str | Path) -> str:
    """What an error says when no image has a mask in ``mask_dir``: the names :func:`find_mask` looked
    for and, for the first image that has a file named like it there, what that file is and why it did
    not count. ``items``: (image id, the image's path or None)."""
    mask_dir = Path(mask_dir)
    names = ", ".join(f"ID{suf}" for suf in MASK_SUFFIXES)
    said = f"looked for {names}, image_mask{{i}}.npy / .png for image_{{i}}"
    for image_id, image_path in items:
        reason = _why_not_a_mask(image_id, mask_dir, image_path)
        if reason:
            return f"{said}; {reason}"
    return said


def _why_not_a_mask(image_id: str, mask_dir: Path, image_path: str | Path | None) -> str | None:
    """Why the files of ``mask_dir`` named like ``image_id`` are not its mask (None: there are none)."""
    image = Path(image_path).resolve() if image_path is not None else None
    try:
        near = sorted(f for f in mask_dir.iterdir() if f.is_file() and f.name.startswith(image_id))
    except OSError:
        return None
    for f in near:
        if f.stem == image_id and image is not None and f.resolve() == image:
            return (f"{f} is there, but it is the image itself (--masks is the image folder): a mask must be "
                    f"another file, {image_id}.npy beside it or {image_id}.png in a folder of masks")
    for f in near:
        if f.stem == image_id and f.suffix.lower() not in MASK_SUFFIXES:
            return (f"{f} is there, but a {f.suffix} file is no label map (JPEG and other photo formats change "
                    f"label values): save the masks as {image_id}.png (label values or --classes colours) or .npy")
    named = re.compile(re.escape(image_id) + r"[_\-. ]+[A-Za-z]")  # image_0_mask.png, not image_01.png
    for f in near:
        if f.stem != image_id and f.suffix.lower() in MASK_SUFFIXES and named.match(f.stem):
            return (f"{f} is there, but masks are found by the image's name: rename it {image_id}{f.suffix.lower()} "
                    f"(or the images so that their names match)")
    return None


def _load_npy(path: Path) -> np.ndarray:
    try:
        a = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise DdpmsegError(f"cannot read mask {path}: file not found; check the path") from None
    except (OSError, ValueError, EOFError) as e:  # what numpy raises for a broken or pickled .npy
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
            "these masks need the label set of their colours: fit --classes CSV (evaluate uses the label set "
            "the model was fitted with)"
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
        im = open_image(path, "mask")
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
            "fix the mask, or fit with --classes naming the label set that covers these values (evaluate "
            "scores against the label set the model was fitted with)"
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
