"""What `ddpmseg label` keeps on disk, torch-free: per image, the label PNG that ``fit --masks`` reads and
the edit history (the strokes) as JSON, both written atomically on every save.

    LABELS/NAME.png              palette PNG, pixel = class index, 255 = unlabelled (absent: nothing labelled)
    LABELS/strokes/NAME.json     {"format", "image", "width", "height", "ops", "cursor", "done"}
    LABELS/.ddpmseg-label/       the labeller's own files (model, predictions, features from --ckpt)

An op is a brush stroke ``{"k": "s", "c": CLASS (255: eraser), "r": RADIUS, "p": [x0, y0, x1, y1, ...]}``
(image pixels) or a whole label map ``{"k": "set", "rle": [VALUE, COUNT, ...]}`` (an accepted prediction,
a PUT of a label PNG); ``ops[:cursor]`` are applied, the rest can be redone. Names are image ids (file
stems) looked up in the image set: nothing else is ever opened.
"""

from __future__ import annotations

import io
import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from ddpmseg import data
from ddpmseg._io import remove_stale_temps, write_atomic
from ddpmseg.errors import DdpmsegError
from ddpmseg.label.strokes import UNLABELLED, BadInput, replay, rle_decode, rle_encode

__all__ = ["UNLABELLED", "BadInput", "LabelStore", "NotFound", "rle_decode", "rle_encode"]  # the format's names, as before
log = logging.getLogger(__name__)

HISTORY_FORMAT = "ddpmseg-label-history/1"
WORK_DIR = ".ddpmseg-label"
STROKES_DIR = "strokes"
STATES = ("unlabelled", "partly labelled", "predicted", "done")
MAX_OPS = 20_000  # per image: a history longer than this is refused (the page never gets near it)
MAX_POINTS = 200_000  # per stroke
MAX_RADIUS = 512


class NotFound(DdpmsegError):
    """A name outside the image set (HTTP 404)."""


@dataclass(frozen=True)
class ImageEntry:
    name: str
    path: Path
    width: int
    height: int


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)


class LabelStore:
    """The images being labelled and their labels and histories in ``out`` (thread-safe saves)."""

    def __init__(self, images: Sequence[str | Path], out: str | Path, labelset: data.LabelSet) -> None:
        paths = data.list_images(images)
        if not paths:
            raise DdpmsegError("no images given; pass image files or folders")
        self.labelset = labelset
        self.out = Path(out)
        self.entries: dict[str, ImageEntry] = {}
        for p in paths:
            if p.stem in self.entries:
                raise DdpmsegError(f"images {self.entries[p.stem].path} and {p} have the same id {p.stem!r} (file stem); "
                                   "rename one of them: labels are saved as ID.png")
            w, h = data.open_image(p, "image").size
            self.entries[p.stem] = ImageEntry(p.stem, p, w, h)
        for d in (self.out / STROKES_DIR, self.work):  # their files are written and read without _inside()
            if d.is_symlink():
                raise DdpmsegError(f"{d} is a symlink; labelling writes there, so it must be a real folder inside "
                                   f"{self.out}: remove the link")
        for d in (self.out, self.out / STROKES_DIR, self.work):
            d.mkdir(parents=True, exist_ok=True)
        for n in self.entries:  # the temp files of a server killed while writing
            remove_stale_temps(self.label_path(n))
            remove_stale_temps(self.history_path(n))
        self._lock = threading.RLock()  # set_labels holds it around its read-modify-write and save()
        for n in self.entries:
            self._reconcile(n)

    def _reconcile(self, name: str) -> None:
        """Rewrite the label PNG from the history where they disagree: :meth:`save` writes the history
        first, so a server killed between the two writes left a PNG (what fit reads) without the last edit."""

        if not self.history_path(name).is_file():
            return
        try:
            doc = self.history(name)
            want = replay(doc)
            have = self.labels(name)
        except (OSError, ValueError, DdpmsegError) as err:  # a symlink out of LABELS/, a PNG of another size
            log.warning("labels of %s not checked against its history (%s)", name, err)
            return
        if np.array_equal(want, have):
            return
        log.info("label PNG of %s did not match its history (a server killed mid-save?); rewritten from it", name)
        path = self.label_path(name)
        if (want != UNLABELLED).any():
            self._write_label_png(path, want)
        elif path.is_file() or path.is_symlink():
            path.unlink()

    @property
    def work(self) -> Path:
        return self.out / WORK_DIR

    @property
    def names(self) -> list[str]:
        return list(self.entries)

    def entry(self, name: str) -> ImageEntry:
        """The image called ``name``; any other name (paths, ``..``) is a NotFound."""
        try:
            return self.entries[name]
        except (KeyError, TypeError):
            raise NotFound(f"no image called {name!r} in this label set") from None

    # -- files ------------------------------------------------------------------------------
    def _inside(self, path: Path) -> Path:
        """``path`` if it resolves inside LABELS/ (a symlink out of it is refused)."""
        if not path.resolve().is_relative_to(self.out.resolve()):
            raise NotFound(f"{path} leads out of {self.out} (a symlink?); remove it")
        return path

    def label_path(self, name: str) -> Path:
        return self.out / f"{self.entry(name).name}.png"

    def history_path(self, name: str) -> Path:
        return self.out / STROKES_DIR / f"{self.entry(name).name}.json"

    def prediction_path(self, name: str, kind: str = "labels") -> Path:
        return self.work / "predictions" / f"{self.entry(name).name}_{kind}.png"

    def image_png(self, name: str) -> bytes:
        """The image as ddpmseg reads it (EXIF orientation applied), as PNG bytes."""
        buf = io.BytesIO()
        Image.fromarray(data.load_rgb(self.entry(name).path)).save(buf, "PNG", compress_level=1)
        return buf.getvalue()

    def labels(self, name: str) -> np.ndarray:
        """The saved labels (H, W) uint8, 255 where unlabelled (all 255 before any label)."""
        e = self.entry(name)
        path = self.label_path(name)
        if not path.is_file():
            return np.full((e.height, e.width), UNLABELLED, np.uint8)
        a = data.load_mask(self._inside(path), self.labelset, expected_size=(e.width, e.height))  # colour masks too
        return a.astype(np.uint8)

    def history(self, name: str) -> dict[str, Any]:
        e = self.entry(name)
        path = self.history_path(name)
        empty = {"format": HISTORY_FORMAT, "image": e.name, "width": e.width, "height": e.height, "ops": [],
                 "cursor": 0, "done": False}
        if not path.is_file():  # labels made elsewhere (or before): the history starts from them
            labels = self.labels(name)
            if (labels != UNLABELLED).any():
                empty.update(ops=[{"k": "set", "rle": rle_encode(labels)}], cursor=1)
            return empty
        try:
            doc = json.loads(self._inside(path).read_text(encoding="utf-8"))
            self.check_history(name, doc)
        except (OSError, ValueError, DdpmsegError) as err:
            log.warning("history %s is unreadable (%s); starting it afresh from the label PNG", path, err)
            labels = self.labels(name)
            if (labels != UNLABELLED).any():
                empty.update(ops=[{"k": "set", "rle": rle_encode(labels)}], cursor=1)
            return empty
        return doc

    def check_history(self, name: str, doc: Any) -> None:
        """Raise BadInput unless ``doc`` is a well-formed history of image ``name``."""
        e = self.entry(name)
        if not isinstance(doc, dict) or not isinstance(doc.get("ops"), list):
            raise BadInput("a history is a JSON object with a list 'ops'")
        ops, cursor = doc["ops"], doc.get("cursor")
        if len(ops) > MAX_OPS:
            raise BadInput(f"a history holds at most {MAX_OPS} edits, got {len(ops)}")
        if not isinstance(cursor, int) or isinstance(cursor, bool) or not 0 <= cursor <= len(ops):
            raise BadInput(f"'cursor' must be an integer 0..{len(ops)} (the edits applied)")
        if not isinstance(doc.get("done", False), bool):
            raise BadInput("'done' must be true or false")
        k = self.labelset.n_classes
        for i, op in enumerate(ops):
            kind = op.get("k") if isinstance(op, dict) else None
            if kind == "s":
                c, r, pts = op.get("c"), op.get("r"), op.get("p")
                ok = (isinstance(c, int) and (0 <= c < k or c == UNLABELLED) and _number(r) and 0 < r <= MAX_RADIUS
                      and isinstance(pts, list) and 2 <= len(pts) <= 2 * MAX_POINTS and len(pts) % 2 == 0
                      and all(_number(v) for v in pts))
                if not ok:
                    raise BadInput(f"edit {i}: a stroke is {{'k': 's', 'c': class 0..{k - 1} or 255, 'r': radius "
                                   f"(0, {MAX_RADIUS}], 'p': [x0, y0, x1, y1, ...]}}")
            elif kind == "set":
                if not isinstance(op.get("rle"), list):
                    raise BadInput(f"edit {i}: a 'set' edit holds 'rle': [value, count, ...]")
                self._check_classes(rle_decode(op["rle"], e.width, e.height))
            else:
                raise BadInput(f"edit {i}: 'k' must be 's' (stroke) or 'set' (a whole label map)")

    def _check_classes(self, labels: np.ndarray) -> None:
        vals = np.unique(labels)
        bad = vals[(vals >= self.labelset.n_classes) & (vals != UNLABELLED)]
        if bad.size:
            raise BadInput(f"label values {bad[:5].tolist()} are not classes 0..{self.labelset.n_classes - 1} or "
                           f"{UNLABELLED} (unlabelled)")

    # -- saving -----------------------------------------------------------------------------
    def save(self, name: str, doc: dict[str, Any], labels: np.ndarray) -> str:
        """Write the history, then the label PNG (each atomically); the image's new state."""
        e = self.entry(name)
        self.check_history(name, doc)
        labels = np.asarray(labels, dtype=np.uint8)
        if labels.shape != (e.height, e.width):
            raise BadInput(f"labels are {labels.shape[1]}x{labels.shape[0]} but image {name} is {e.width}x{e.height}")
        self._check_classes(labels)
        clean = {"format": HISTORY_FORMAT, "image": e.name, "width": e.width, "height": e.height,
                 "ops": doc["ops"], "cursor": doc["cursor"], "done": bool(doc.get("done", False))}
        text = json.dumps(clean, separators=(",", ":"))
        with self._lock:
            write_atomic(self.history_path(name), lambda p: p.write_text(text, encoding="utf-8"))
            path = self.label_path(name)
            if (labels != UNLABELLED).any():
                self._write_label_png(path, labels)
            elif path.is_file() or path.is_symlink():  # nothing labelled: no mask, so fit does not count the image
                path.unlink()
        return self.state(name)

    def set_labels(self, name: str, labels: np.ndarray) -> str:
        """A whole label map (PUT /api/labels): one 'set' edit after the applied ones (the redo tail goes)."""
        e = self.entry(name)
        labels = np.asarray(labels)
        if labels.shape != (e.height, e.width):
            raise BadInput(f"labels are {labels.shape[1]}x{labels.shape[0]} but image {name} is {e.width}x{e.height}")
        self._check_classes(labels)
        labels = labels.astype(np.uint8)
        with self._lock:  # a PUT /api/history between the read and the write would be dropped
            doc = self.history(name)
            doc["ops"] = doc["ops"][: doc["cursor"]] + [{"k": "set", "rle": rle_encode(labels)}]
            doc["cursor"] = len(doc["ops"])
            return self.save(name, doc, labels)

    def _write_label_png(self, path: Path, labels: np.ndarray) -> None:
        from ddpmseg import viz

        viz.save_label_png(path, labels, self.labelset.palette())

    # -- states -----------------------------------------------------------------------------
    def state(self, name: str) -> str:
        """unlabelled, partly labelled, predicted (a prediction newer than the labels) or done."""
        path = self.history_path(name)
        if path.is_file() and path.resolve().is_relative_to(self.out.resolve()):
            try:
                if json.loads(path.read_text(encoding="utf-8")).get("done") is True:
                    return "done"
            except (OSError, ValueError):
                pass
        pred = self.prediction_path(name)
        labels = self._saved(name)
        if pred.is_file() and (labels is None or pred.stat().st_mtime_ns >= labels.stat().st_mtime_ns):
            return "predicted"
        return "partly labelled" if labels is not None else "unlabelled"

    def _saved(self, name: str) -> Path | None:
        """The label PNG of ``name`` if there is one inside LABELS/ (a symlink leading out of it is ignored)."""
        path = self.label_path(name)
        if not path.is_file() or (path.is_symlink() and not path.resolve().is_relative_to(self.out.resolve())):
            return None
        return path

    def links_out(self) -> list[str]:
        """Names whose label PNG is a symlink leading out of LABELS/ (``fit --masks LABELS/`` would read it)."""
        return [n for n in self.entries if self.label_path(n).is_file() and self._saved(n) is None]

    def labelled(self) -> list[str]:
        """Names of the images with at least one labelled pixel saved (symlinks out of LABELS/ ignored)."""
        return [n for n in self.entries if self._saved(n) is not None]

    def label_digest(self) -> str:
        """One digest of every saved label PNG (what a fit depends on)."""
        import hashlib

        h = hashlib.sha256()
        for n in sorted(self.labelled()):
            h.update(n.encode() + b"\0" + self.label_path(n).read_bytes())
        return h.hexdigest()
