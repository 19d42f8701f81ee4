"""Instance segmentation on the frozen features: annotations in and out, metrics, baselines.

    core         Instances: one image's masks, classes and scores (numpy)
    annotations  COCO JSON (polygons, RLE) and instance-id PNGs in; COCO JSON out
    metrics      COCO mask AP / AP50 / AP75, per class (pycocotools' COCOeval)
    synthetic    scenes of touching / overlapping objects of 2-3 classes on textures
    baseline     a class map split into connected components (the trivial baseline)
    boxes        box ops in plain torch (RoIAlign by bilinear sampling, class-wise NMS, GIoU)
    outputs      predict's files: <stem>_instances.png / .json / overlay

pycocotools is the ``ddpmseg[instances]`` extra: only :mod:`annotations`' COCO
reading/RLE and :mod:`metrics` import it, on first use. The diffusion head
itself is :mod:`ddpmseg.heads.diffinst`.
"""

from __future__ import annotations

from ddpmseg._lazy import lazy_exports

__all__ = ["Instances", "load_annotations", "mask_ap", "make_scenes", "components"]

__getattr__ = lazy_exports(__name__, {
    "Instances": "ddpmseg.instances.core",
    "load_annotations": "ddpmseg.instances.annotations",
    "mask_ap": "ddpmseg.instances.metrics",
    "make_scenes": "ddpmseg.instances.synthetic",
    "components": "ddpmseg.instances.baseline",
})
