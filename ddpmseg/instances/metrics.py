"""COCO mask AP, AP50, AP75 and per-class AP, by pycocotools' COCOeval (the standard definitions:
IoU thresholds 0.50:0.05:0.95, 101-point interpolated precision, up to 100 detections per image,
all areas)."""

from __future__ import annotations

import contextlib
import io
from typing import Any, Mapping

import numpy as np

from ddpmseg._optional import optional_import
from ddpmseg.instances.annotations import PURPOSE, to_coco
from ddpmseg.instances.core import Instances


def _none(v: float) -> float | None:
    return None if v != v else float(v)


def mask_ap(truth: Mapping[str, Instances], pred: Mapping[str, Instances], categories: Mapping[int, str]) -> dict[str, Any]:
    """Scores of ``pred`` against ``truth`` (both {image stem: instances at the same size}; every
    image of ``truth`` is scored, one without predictions too). ``ap``, ``ap50``, ``ap75`` in [0, 1]
    (None when no image holds an instance), ``per_class`` {name: AP or None when the class has no
    ground-truth instance}, ``n_images``, ``n_instances``, ``n_predictions``."""
    coco_mod = optional_import("pycocotools.coco", PURPOSE)
    eval_mod = optional_import("pycocotools.cocoeval", PURPOSE)
    stems = sorted(truth)
    gt_data = to_coco([(s, truth[s]) for s in stems], categories, results=False)
    known = list(categories)
    pred = {s: p.keep(np.isin(p.classes, known)) for s, p in pred.items()}  # a class outside the categories is not scored
    dt_data = to_coco([(s, pred.get(s, Instances.empty(*truth[s].shape))) for s in stems], categories)
    n_gt, n_dt = len(gt_data["annotations"]), len(dt_data["annotations"])
    out: dict[str, Any] = {"ap": None, "ap50": None, "ap75": None, "per_class": {n: None for n in categories.values()},
                           "n_images": len(stems), "n_instances": n_gt, "n_predictions": n_dt}
    if n_gt == 0:
        return out
    if n_dt == 0:
        present = {a["category_id"] for a in gt_data["annotations"]}
        out.update(ap=0.0, ap50=0.0, ap75=0.0, per_class={categories[c]: (0.0 if c in present else None) for c in categories})
        return out
    with contextlib.redirect_stdout(io.StringIO()):  # COCOeval prints its progress and table
        gt = coco_mod.COCO()
        gt.dataset = gt_data
        gt.createIndex()
        dt = gt.loadRes(dt_data["annotations"])
        ev = eval_mod.COCOeval(gt, dt, iouType="segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    s = ev.stats
    out.update(ap=_none(s[0]) if s[0] >= 0 else None, ap50=_none(s[1]) if s[1] >= 0 else None,
               ap75=_none(s[2]) if s[2] >= 0 else None)
    precision = ev.eval["precision"][:, :, :, 0, -1]  # (IoU, recall, class) at all areas, 100 detections
    for k, cid in enumerate(ev.params.catIds):
        p = precision[:, :, k]
        out["per_class"][categories[cid]] = float(np.mean(p[p > -1])) if (p > -1).any() else None
    return out
