"""Instance annotations in and out.

In (``--instances ANN``):

- a COCO JSON file: ``images`` (id, file_name, width, height), ``categories``
  (id, name), ``annotations`` (image_id, category_id, segmentation as polygons
  or RLE, compressed or not). Images are matched to the cache / image files by
  the stem of ``file_name``. Crowd annotations (``iscrowd`` 1) are left out.
- a folder of instance-id PNGs ``<stem>.png`` (0 = none, 1..K an instance;
  8- or 16-bit), each instance's class from ``instances.csv`` in the folder
  (columns image,instance,class) or else from a semantic label map beside it,
  ``<stem>_semantic.png`` (or ``.npy``): the most common label under the
  instance.

Class indices are COCO category ids; 0 is "no object" and never an instance's
class. Every problem is a one-line :class:`DdpmsegError` naming the file and the
instance. Out: :func:`to_coco` (ground truth or results, RLE masks).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from ddpmseg._io import read_json
from ddpmseg._optional import optional_import
from ddpmseg.data.images import open_image
from ddpmseg.data.masks import load_mask
from ddpmseg.errors import DdpmsegError
from ddpmseg.instances.core import Instances

PURPOSE = "COCO instance annotations and mask AP"
SEMANTIC_SUFFIX = "_semantic"
CSV_NAME = "instances.csv"


def mask_api() -> Any:
    """pycocotools.mask (the ``ddpmseg[instances]`` extra)."""
    return optional_import("pycocotools.mask", PURPOSE)


@dataclass
class Annotations:
    """Instances per image stem, at each image's original size, and the category names by id."""

    source: Path
    categories: dict[int, str]
    images: dict[str, Instances] = field(default_factory=dict)

    def check_images(self, known: Iterable[str], what: str) -> None:
        """Every annotated image must be one of ``known`` (a cache's ids, or the image files' stems)."""
        known = set(known)
        extra = sorted(s for s in self.images if s not in known)
        if extra:
            raise DdpmsegError(f"{self.source}: image {extra[0]!r} is annotated but {what} does not hold it "
                               f"({len(extra)} such); extract its features or remove its annotations")

    def check_size(self, stem: str, size: tuple[int, int]) -> None:
        """``size`` (W, H): the image's real size must be the annotation's."""
        h, w = self.images[stem].shape
        if (w, h) != tuple(size):
            raise DdpmsegError(f"{self.source}: image {stem!r} is annotated as {w}x{h} but the image is "
                               f"{size[0]}x{size[1]}; annotate the image at its own size")


def load_annotations(path: str | Path, names: Sequence[str] | None = None) -> Annotations:
    """COCO JSON (a file) or instance-id PNGs (a folder); ``names``: class names by index (a label set's),
    used for id PNGs (COCO files name their categories)."""
    path = Path(path)
    if path.is_dir():
        return _load_id_pngs(path, names)
    if not path.is_file():
        raise DdpmsegError(f"--instances {path} does not exist; give a COCO JSON file or a folder of instance-id PNGs")
    return _load_coco(path)


# -- COCO -----------------------------------------------------------------------------------
def _need(d: Any, key: str, kind: type | tuple, where: str) -> Any:
    if not isinstance(d, dict) or key not in d or not isinstance(d[key], kind) or isinstance(d[key], bool):
        raise DdpmsegError(f"{where} has no valid {key!r}; see the COCO format (docs/formats.md)")
    return d[key]


def _decode(seg: Any, h: int, w: int, where: str) -> np.ndarray:
    """One annotation's ``segmentation`` (polygons or RLE) as an (h, w) bool mask."""
    mask = mask_api()
    if isinstance(seg, list):
        polys = [p for p in seg if isinstance(p, list)]
        if not polys or len(polys) != len(seg):
            raise DdpmsegError(f"{where}: empty polygon list; give at least one polygon [x1, y1, x2, y2, x3, y3, ...]")
        for p in polys:
            if len(p) < 6 or len(p) % 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in p):
                raise DdpmsegError(f"{where}: a polygon needs at least 3 points as numbers x1, y1, x2, y2, ... "
                                   f"(got {len(p)} values); fix or remove it")
        rle = mask.merge(mask.frPyObjects(polys, h, w))
    elif isinstance(seg, dict) and "counts" in seg and "size" in seg:
        size = seg["size"]
        if not isinstance(size, (list, tuple)) or list(size) != [h, w]:
            raise DdpmsegError(f"{where}: RLE size {size!r} is not the image's [height, width] [{h}, {w}]")
        counts = seg["counts"]
        if isinstance(counts, list):  # uncompressed: run lengths that cover the image
            if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in counts) or sum(counts) != h * w:
                raise DdpmsegError(f"{where}: uncompressed RLE counts must be non-negative whole numbers summing to "
                                   f"height x width = {h * w}; fix the counts")
        elif not isinstance(counts, (str, bytes)):
            raise DdpmsegError(f"{where}: RLE counts must be a string (compressed) or a list of run lengths, "
                               f"got {type(counts).__name__}")
        try:
            if isinstance(counts, list):
                rle = mask.frPyObjects({"size": [h, w], "counts": counts}, h, w)
            else:
                rle = {"size": [h, w], "counts": counts.encode() if isinstance(counts, str) else counts}
            m = mask.decode(rle)
        except Exception as e:  # pycocotools raises bare errors on corrupt counts
            raise DdpmsegError(f"{where}: the RLE cannot be decoded ({type(e).__name__}); rewrite it") from None
        return m.astype(bool)
    else:
        raise DdpmsegError(f"{where}: segmentation must be a list of polygons or an RLE object {{size, counts}}")
    return mask.decode(rle).astype(bool)


def _load_coco(path: Path) -> Annotations:
    d = read_json(path, "--instances", "give a COCO instances file")
    where = f"--instances {path}"
    images = _need(d, "images", list, where)
    cats = _need(d, "categories", list, where)
    anns = _need(d, "annotations", list, where)
    categories: dict[int, str] = {}
    for i, c in enumerate(cats):
        cid = _need(c, "id", int, f"{path}: categories[{i}]")
        if cid < 1:
            raise DdpmsegError(f"{path}: category {c.get('name', cid)!r} has id {cid}; COCO category ids start at 1 "
                               "(0 means no object here)")
        categories[cid] = str(c.get("name", f"class {cid}"))
    by_id: dict[int, tuple[str, int, int]] = {}
    for i, im in enumerate(images):
        w = f"{path}: images[{i}]"
        iid, name = _need(im, "id", int, w), _need(im, "file_name", str, w)
        ih, iw = _need(im, "height", int, w), _need(im, "width", int, w)
        if ih < 1 or iw < 1:
            raise DdpmsegError(f"{w} ({name!r}) has height {ih} and width {iw}; give the image's size in pixels (both >= 1)")
        by_id[iid] = (Path(name).stem, ih, iw)
    parts: dict[int, list[tuple[np.ndarray, int]]] = {iid: [] for iid in by_id}
    for i, a in enumerate(anns):
        w = f"{path}: annotation {a.get('id', i) if isinstance(a, dict) else i}"
        iid, cid = _need(a, "image_id", int, w), _need(a, "category_id", int, w)
        if iid not in by_id:
            raise DdpmsegError(f"{w} names image_id {iid}, which is not in images; add the image or remove it")
        if cid not in categories:
            raise DdpmsegError(f"{w} (image {by_id[iid][0]!r}) has category_id {cid}, which is not in categories "
                               f"({sorted(categories)}); add it or fix the id")
        if a.get("iscrowd", 0):
            continue
        stem, h, wd = by_id[iid]
        m = _decode(a.get("segmentation"), h, wd, f"{w} (image {stem!r})")
        if not m.any():
            raise DdpmsegError(f"{w} (image {stem!r}): its mask is empty; fix or remove the annotation")
        parts[iid].append((m, cid))
    out = Annotations(path, categories)
    for iid, items in parts.items():
        stem, h, w = by_id[iid]
        if stem in out.images:
            raise DdpmsegError(f"{path}: two images have the file stem {stem!r}; give them distinct names")
        out.images[stem] = (Instances(np.stack([m for m, _ in items]), [c for _, c in items], np.ones(len(items)))
                            if items else Instances.empty(h, w))
    return out


# -- instance-id PNGs ---------------------------------------------------------------------------
def _read_ids(path: Path) -> np.ndarray:
    im = open_image(path, "instance-id map")
    if im.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L", "1"):
        raise DdpmsegError(f"{path} is a {im.mode} image; an instance-id map is one channel (8- or 16-bit, 0 = none)")
    return np.asarray(im.convert("I") if im.mode != "P" else im, dtype=np.int64)


def _read_csv(path: Path) -> dict[str, dict[int, str]]:
    out: dict[str, dict[int, str]] = {}
    try:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
    except OSError as e:
        raise DdpmsegError(f"{path}: cannot read it ({e.strerror or e}); check the file's permissions") from None
    except (UnicodeDecodeError, csv.Error) as e:
        raise DdpmsegError(f"{path} is not a readable CSV ({e}); give a text file image,instance,class") from None
    if not rows or [c.strip().lower() for c in rows[0]] != ["image", "instance", "class"]:
        raise DdpmsegError(f"{path}: the first row must be the header image,instance,class")
    for n, row in enumerate(rows[1:], start=2):
        if not any(c.strip() for c in row):
            continue
        try:
            image, inst, cls = (c.strip() for c in row)
            out.setdefault(image, {})[int(inst)] = cls
        except ValueError:
            raise DdpmsegError(f"{path} line {n}: expected image,instance,class with a whole-number instance, got "
                               f"{','.join(row)!r}") from None
    return out


def _class_index(value: str, names: Sequence[str] | None, where: str) -> int:
    if value.isdigit():
        return int(value)
    if names is not None and value in names:
        return list(names).index(value)
    raise DdpmsegError(f"{where}: class {value!r} is neither an index nor a name of --classes "
                       f"({', '.join(names) if names else 'none given'})")


def _load_id_pngs(folder: Path, names: Sequence[str] | None) -> Annotations:
    maps = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".png" and not p.stem.endswith(SEMANTIC_SUFFIX))
    if not maps:
        raise DdpmsegError(f"--instances {folder} holds no instance-id PNG (<stem>.png); give a COCO JSON file or "
                           "a folder of id maps")
    table = _read_csv(folder / CSV_NAME) if (folder / CSV_NAME).is_file() else None
    out = Annotations(folder, {})
    for p in maps:
        ids = _read_ids(p)
        present = [int(v) for v in np.unique(ids) if v != 0]
        classes: dict[int, int] = {}
        if table is not None:
            rows = table.get(p.stem, {})
            for k in present:
                if k not in rows:
                    raise DdpmsegError(f"{p}: instance {k} has no class in {folder / CSV_NAME}; add a row "
                                       f"{p.stem},{k},CLASS")
                classes[k] = _class_index(rows[k], names, f"{folder / CSV_NAME} ({p.stem}, instance {k})")
        else:
            sem = next((q for q in (p.with_name(p.stem + SEMANTIC_SUFFIX + e) for e in (".png", ".npy")) if q.is_file()), None)
            if sem is None:
                raise DdpmsegError(f"{p}: no class for its instances: add {folder / CSV_NAME} (image,instance,class) or "
                                   f"a semantic label map {p.stem}{SEMANTIC_SUFFIX}.png beside it")
            labels = load_mask(sem, expected_size=(ids.shape[1], ids.shape[0]))
            for k in present:
                values, counts = np.unique(labels[ids == k], return_counts=True)
                classes[k] = int(values[np.argmax(counts)])
        for k, c in classes.items():
            if c < 1 or c == 255:
                raise DdpmsegError(f"{p}: instance {k} has class {c}, which means no object; give it a class "
                                   "index >= 1 (0 and 255 are background / ignore)")
            out.categories.setdefault(c, names[c] if names is not None and c < len(names) else f"class {c}")
        out.images[p.stem] = Instances.from_id_map(ids, classes)
    return out


# -- out ---------------------------------------------------------------------------------------------
def encode_rle(m: np.ndarray) -> dict[str, Any]:
    """A bool mask as COCO compressed RLE with a str ``counts`` (JSON-ready)."""
    rle = mask_api().encode(np.asfortranarray(m.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def to_coco(items: Sequence[tuple[str, Instances]], categories: Mapping[int, str], results: bool = True) -> dict:
    """One COCO dataset for ``items`` ((file_name, instances at the original size)): images with id,
    file_name, width, height; categories; annotations with RLE masks, xywh boxes, areas and, for
    ``results``, scores (ground truth: ``iscrowd`` 0 instead)."""
    images, anns = [], []
    for n, (name, inst) in enumerate(items, start=1):
        h, w = inst.shape
        images.append({"id": n, "file_name": name, "width": int(w), "height": int(h)})
        for box, area, c, s, m in zip(inst.boxes(), inst.areas(), inst.classes, inst.scores, inst.masks):
            a = {"id": len(anns) + 1, "image_id": n, "category_id": int(c), "segmentation": encode_rle(m),
                 "bbox": [float(box[0]), float(box[1]), float(box[2] - box[0]), float(box[3] - box[1])],
                 "area": int(area)}
            a.update({"score": round(float(s), 5)} if results else {"iscrowd": 0})
            anns.append(a)
    cats = [{"id": int(c), "name": categories[c]} for c in sorted(categories)]
    return {"images": images, "categories": cats, "annotations": anns}
