"""Pseudo-labels from a teacher model folder, with the reference's per-image uncertainty, and the filter.

Each image goes through the teacher's own predict path (its ensemble's
majority vote on the model grid); its score is the mean of the top 10 % of the
pixels' JS score H(mean p) - mean_i H(p_i) (the reference's
``generate_dataset.py``). Per image two files, each written atomically:
``<id>_labels.png`` (palette PNG on the teacher's S x S grid, to look at) and,
last, ``<id>.json`` (source, file digest, score): an image with its JSON is
finished, so a run killed anywhere resumes without relabelling it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from ddpmseg import viz
from ddpmseg._io import file_sha256, remove_stale_temps, write_atomic
from ddpmseg.data import load_mask
from ddpmseg.errors import DdpmsegError
from ddpmseg.metrics import image_uncertainty


@dataclass(frozen=True)
class PseudoLabel:
    """One pseudo-labelled image: its id, the image file, the labels PNG (teacher grid) and its score."""

    id: str
    image: Path
    labels: Path
    uncertainty: float
    sha256: str
    kind: str  # "sample" (DDPM) or "image" (a real unlabelled image)

    def load_labels(self) -> np.ndarray:
        return load_mask(self.labels)


def pseudo_label(segmenter, paths: Sequence[Path], folder: Path, kind: str, *, progress: bool = False) -> list[PseudoLabel]:
    """Label the images ``paths`` (ids: their file stems) of ``kind`` ("image" or "sample") with the teacher
    ``segmenter`` (a :class:`~ddpmseg.workers.Segmenter` of a teacher folder) into ``folder``; finished ones
    are read back."""
    palette = segmenter.model.labelset.palette()
    if paths:
        folder.mkdir(parents=True, exist_ok=True)
    out = []
    for path in tqdm(paths, desc=f"pseudo-labels ({kind}s)", unit="img", disable=not progress):
        image_id = path.stem
        record = folder / f"{image_id}.json"
        labels_png = folder / f"{image_id}_labels.png"
        digest = file_sha256(path)
        if record.is_file():
            d = json.loads(record.read_text())
            if d.get("sha256") != digest:
                raise DdpmsegError(f"{record} labels another image than {path} (other content); the id is the file "
                                   "stem: rename one of them, or distill into another --out")
            out.append(PseudoLabel(image_id, path, labels_png, float(d["uncertainty"]), digest, kind))
            continue
        for f in (record, labels_png):
            remove_stale_temps(f)
        a = segmenter.analyse(path)
        score = image_uncertainty(a.grid.uncertainty)
        viz.save_label_png(labels_png, a.grid.labels, palette)
        text = json.dumps({"image": str(path.resolve()), "sha256": digest, "uncertainty": score, "kind": kind})
        write_atomic(record, lambda p: p.write_text(text + "\n"))
        out.append(PseudoLabel(image_id, path, labels_png, score, digest, kind))
    return out


@dataclass(frozen=True)
class FilterResult:
    kept: list[PseudoLabel]
    dropped_uncertain: list[PseudoLabel]
    dropped_certain: list[PseudoLabel]
    threshold: float | None  # the highest score kept (None: nothing kept)


def filter_uncertain(labels: Sequence[PseudoLabel], drop_uncertain: float, skip_certain: int = 0) -> FilterResult:
    """Sort by score; drop the ``drop_uncertain`` fraction (of all) most uncertain and the ``skip_certain`` most
    certain. The reference keeps sorted[30 : -k + 30] with k = portion * N: its 30 most certain and k - 30
    most uncertain go; here the two are separate settings."""
    if not 0.0 <= drop_uncertain < 1.0:
        raise DdpmsegError(f"--drop-uncertain {drop_uncertain}: give a fraction in [0, 1), e.g. 0.1")
    if skip_certain < 0:
        raise DdpmsegError(f"--skip-certain {skip_certain}: give a count >= 0")
    ranked = sorted(labels, key=lambda p: (p.uncertainty, p.id))
    n_drop = int(round(drop_uncertain * len(ranked)))
    certain = ranked[:min(skip_certain, len(ranked))]
    rest = ranked[len(certain):]
    uncertain = rest[len(rest) - min(n_drop, len(rest)):] if n_drop else []
    kept = rest[:len(rest) - len(uncertain)]
    return FilterResult(kept, uncertain, certain, kept[-1].uncertainty if kept else None)
