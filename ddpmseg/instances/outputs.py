"""What ``predict`` writes for an instance model, per image: ``<stem>_instances.png`` (uint16, 0 none,
k = the k-th instance of the JSON), ``<stem>_instances.json`` (id, class, score, box, area) and
``<stem>_overlay.png`` (one colour per instance, its outline, and a legend of id, class and score)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image
from scipy import ndimage

from ddpmseg import viz
from ddpmseg._io import write_atomic
from ddpmseg.data.palette import distinct_colors
from ddpmseg.instances.core import Instances

OUTPUT_FILES = ("_instances.png", "_instances.json", "_overlay.png")
LEGEND_MAX = 40  # legend rows (the best-scoring instances)


def instance_records(inst: Instances, names: Sequence[str]) -> list[dict]:
    """One JSON object per instance (best score first, ids 1..N as in the id PNG)."""
    out = []
    for k, (c, s, box, area) in enumerate(zip(inst.classes, inst.scores, inst.boxes(), inst.areas()), start=1):
        out.append({"id": k, "class": names[c] if 0 <= c < len(names) else f"class {c}", "class_index": int(c),
                    "score": round(float(s), 5), "box": [int(v) for v in box], "area": int(area)})
    return out


def instance_overlay(rgb: np.ndarray, inst: Instances, names: Sequence[str], legend: bool = True,
                     alpha: float = 0.5) -> np.ndarray | Image.Image:
    """Each instance in its own colour over ``rgb`` (outlined, so touching instances stay apart)."""
    colours = distinct_colors(len(inst))
    ids = inst.id_map().astype(np.int64)
    out = rgb.astype(np.float32)
    inside = ids > 0
    out[inside] = (1 - alpha) * out[inside] + alpha * colours[ids[inside] - 1]
    edge = inside & (ndimage.grey_erosion(ids, size=3) != ndimage.grey_dilation(ids, size=3))
    out[edge] = colours[ids[edge] - 1]
    out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    if not legend:
        return out
    rows = instance_records(inst, names)[:LEGEND_MAX]
    return viz.with_legend(out, [f"#{r['id']} {r['class']} {r['score']:.2f}" for r in rows], colours[:len(rows)])


def write_instance_outputs(out: Path, stem: str, rgb: np.ndarray, inst: Instances, names: Sequence[str],
                           legend: bool = True) -> None:
    """The three files of one image, each atomically, the id PNG last (it marks the image done)."""
    inst = inst.sorted()
    viz.save_png_atomic(out / f"{stem}_overlay.png", instance_overlay(rgb, inst, names, legend))
    text = json.dumps({"image": stem, "width": int(rgb.shape[1]), "height": int(rgb.shape[0]),
                       "instances": instance_records(inst, names)}, indent=1)
    write_atomic(out / f"{stem}_instances.json", lambda p: p.write_text(text + "\n"))
    ids = inst.id_map()
    write_atomic(out / f"{stem}_instances.png", lambda p: Image.fromarray(ids.astype(np.uint16)).save(p, format="PNG"))
