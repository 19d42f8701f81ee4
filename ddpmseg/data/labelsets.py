"""Label sets: class names, colours and the ignore label, from shipped names or CSV files.

A label-set CSV has the header ``index,name,r,g,b`` and one row per class,
indices 0..K-1 without gaps; an optional comment line ``# ignore_index=N``
sets the label that is neither trained nor scored (default 255)."""

from __future__ import annotations

import csv
import io
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ddpmseg._io import write_atomic
from ddpmseg.data.images import natural_key
from ddpmseg.data.palette import distinct_colors
from ddpmseg.errors import DdpmsegError

log = logging.getLogger(__name__)

CSV_HEADER: tuple[str, ...] = ("index", "name", "r", "g", "b")
"""The header every label-set CSV must have."""

@dataclass(frozen=True)
class LabelSet:
    """Class names and their RGB colours; class ``i`` is ``names[i]`` drawn in ``colors[i]``.

    ``ignore_index`` is the label that is neither trained nor scored: 255 (no
    class) for most sets, a class index for some (Bedroom-28's background, 0).
    """

    name: str
    names: tuple[str, ...]
    colors: tuple[tuple[int, int, int], ...]
    ignore_index: int = 255

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", tuple(str(n) for n in self.names))
        object.__setattr__(self, "colors", tuple(tuple(int(v) for v in c) for c in self.colors))
        object.__setattr__(self, "ignore_index", int(self.ignore_index))
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

    @property
    def n_scored(self) -> int:
        """Classes mIoU averages over: all but the ignore label when it is a class index."""
        return self.n_classes - (0 <= self.ignore_index < self.n_classes)

    def to_csv(self, path: str | Path) -> None:
        """Write ``index,name,r,g,b`` rows (atomically) to ``path``, after an ``ignore_index`` comment if not 255."""
        buf = io.StringIO()
        if self.ignore_index != 255:
            buf.write(f"# ignore_index={self.ignore_index}\n")
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
    return Path(__file__).resolve().parents[2] / "annotations"


def list_label_sets() -> list[str]:
    """Names of the label sets shipped with ddpmseg (e.g. ``ffhq_34``)."""
    try:
        names = [p.name[:-4] for p in _shipped_dir().iterdir() if p.name.endswith(".csv")]
    except (FileNotFoundError, NotADirectoryError):
        names = []
    return sorted(names, key=natural_key)


def _parse_label_csv(text: str, source: str, name: str) -> LabelSet:
    lines = text.lstrip("\ufeff").splitlines()
    ignore_index = 255
    for line in lines:  # comment lines: "# ignore_index=N" sets the set's ignore label
        m = re.fullmatch(r"\s*#\s*ignore_index\s*=\s*(\d+)\b.*", line)
        if m:
            ignore_index = int(m.group(1))
    body = "\n".join(line for line in lines if not line.lstrip().startswith("#"))
    rows = [r for r in csv.reader(io.StringIO(body)) if any(x.strip() for x in r)]
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
    return LabelSet(name, tuple(entries[i][0] for i in range(k)), tuple(colours), ignore_index)


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
