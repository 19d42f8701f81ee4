"""The commands' instance paths: ``fit --instances``, ``predict`` with an instance model (and
``--coco``), ``evaluate --instances``. :mod:`ddpmseg.pipeline` hands over to these."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from tqdm.auto import tqdm

from ddpmseg import data
from ddpmseg._io import check_not_there, check_writable, file_sha256, remove_stale_temps, write_atomic
from ddpmseg.data.palette import distinct_colors
from ddpmseg.errors import DdpmsegError
from ddpmseg.features.extractor import extract_block_maps
from ddpmseg.heads import ImageMaps, config_dict, get_head
from ddpmseg.instances.annotations import load_annotations, to_coco
from ddpmseg.instances.core import Instances
from ddpmseg.instances.metrics import mask_ap
from ddpmseg.instances.outputs import OUTPUT_FILES, write_instance_outputs
from ddpmseg.workers import Segmenter, load_image

LABEL_GRID = 128  # the side the training instances are handed to the head at (at least the model grid)


def is_instance_model(model_dir: str | Path) -> bool:
    """Whether ``model_dir``'s model.json names an instance head (False for anything unreadable:
    the normal loading then says what is wrong)."""
    try:
        d = json.loads((Path(model_dir) / "model.json").read_text())
        name = d["fit"]["head"]
        return get_head(name).task == "instances"
    except (OSError, ValueError, KeyError, TypeError, DdpmsegError):
        return False


def instance_labelset(categories: Mapping[int, str], classes: str | None) -> data.LabelSet:
    """The label set of an instance model: index = COCO category id, 0 = no object (its ignore label)."""
    if classes:
        ls = data.load_label_set(classes)
        missing = [c for c in categories if c >= ls.n_classes]
        if missing:
            raise DdpmsegError(f"--classes {classes} has {ls.n_classes} classes but the annotations use category id "
                               f"{missing[0]}; give a label set covering every category id")
        return data.LabelSet(ls.name, ls.names, ls.colors, ignore_index=0)
    top = max(categories)
    names = ["no object"] + [categories.get(i, f"class {i}") for i in range(1, top + 1)]
    colours = [(0, 0, 0)] + [tuple(int(v) for v in c) for c in distinct_colors(top)]
    return data.LabelSet("instances", names, colours, ignore_index=0)


# -- fit --------------------------------------------------------------------------------------------------
def fit_instances(spec: Any, config: Any, cache: Any, features: Path, instances: Path, *, labels: int | None,
                  classes: str | None, seed: int, device: str, progress: bool) -> tuple[Any, Any, dict]:
    """(fitted estimator, ModelRecord, summary fields) of an instance head on the annotated cached images."""
    from ddpmseg.records import FitConfig, ModelRecord

    names = data.load_label_set(classes).names if classes else None
    ann = load_annotations(instances, names)
    ann.check_images(cache.image_ids, f"the feature cache {features}")
    ids = [i for i in cache.image_ids if i in ann.images]
    unlabelled = [i for i in cache.image_ids if i not in ann.images]
    if labels is not None:
        if labels < 1 or labels > len(ids):
            raise DdpmsegError(f"--labels {labels} asked for, but {len(ids)} annotated images exist; use 1..{len(ids)}")
        ids = ids[:labels]
    if not ann.categories:
        raise DdpmsegError(f"--instances {instances} holds no instance; annotate some objects")
    labelset = instance_labelset(ann.categories, classes)
    size = cache.image_size
    ys = []
    for i in ids:
        pre = data.Preprocess.from_dict(cache.preprocess(i))
        ann.check_size(i, pre.original_size)
        ys.append(ann.images[i].to_grid(pre, max(size, LABEL_GRID)))
    if not any(len(y) for y in ys):
        raise DdpmsegError(f"--instances {instances}: none of the {len(ids)} annotated cached images holds an instance")
    maps = [cache.block_maps(i) for i in ids]
    est = spec.build(config, n_classes=labelset.n_classes, ignore_index=0, random_state=seed, device=device,
                     progress=progress)
    start = time.perf_counter()
    est.fit(ImageMaps(maps, tuple(cache.record.extract.keys), size), ys)
    seconds = time.perf_counter() - start
    present = {int(c) for y in ys for c in y.classes}
    untrained = [c for c in range(1, labelset.n_classes) if c not in present]
    n_instances = sum(len(y) for y in ys)
    fit = FitConfig(images=tuple(ids), masks=str(Path(instances).resolve()),
                    image_sha256=tuple(cache.sha256(i) or "" for i in ids), seed=seed, ignore_index=0, min_pixels=0,
                    n_pixels=int(sum(int(ann.images[i].areas().sum()) for i in ids)), n_iter=(int(est.n_iter_),),
                    head=spec.name, head_config=config_dict(spec.fitted_config(est)), untrained_classes=tuple(untrained))
    record = ModelRecord(cache.record.backbone, cache.record.checkpoint, cache.record.extract, labelset, fit)
    return est, record, dict(ids=ids, seconds=seconds, unlabelled=unlabelled, n_instances=n_instances,
                             untrained=[labelset.names[c] for c in untrained])


# -- predict -------------------------------------------------------------------------------------------------
class InstanceSegmenter:
    """An instance model folder ready to find the instances of image files."""

    def __init__(self, model_dir: str | Path, checkpoint: str | Path | None = None, device: str = "auto") -> None:
        self.base = Segmenter(model_dir, checkpoint, device)
        if self.base.is_student or getattr(get_head(self.base.model.record.fit.head), "task", "") != "instances":
            raise DdpmsegError(f"{model_dir} is not an instance model; fit one with `ddpmseg fit --head diffinst "
                               "--instances ANN`")
        self.model = self.base.model

    @property
    def names(self) -> tuple[str, ...]:
        return self.model.labelset.names

    def categories(self) -> dict[int, str]:
        """The model's classes as COCO categories (id = class index, 0 = no object left out)."""
        return {c: n for c, n in enumerate(self.names) if c != 0}

    def instances(self, path: Path) -> tuple[np.ndarray, Instances, float]:
        """(rgb, instances at the original size, extraction seconds)."""
        size, e = self.base.backbone.image_size, self.base.extract
        rgb, x0, pre = load_image(path, size, e.preprocess)
        t0 = time.perf_counter()
        maps = extract_block_maps(self.base.backbone, x0, self.model.noise, e.steps, e.blocks, precision=e.precision)
        seconds = time.perf_counter() - t0
        inst = self.model.classifier.predict_instances(maps, self.model.keys, size)
        return rgb, inst.to_original(pre).sorted(), seconds


def predict_instance_images(paths: Sequence[Path], model_dir: str | Path, out: Path, *, checkpoint: Any, device: str,
                            progress: bool, overwrite: bool, legend: bool, skip_done: bool,
                            coco: str | Path | None) -> tuple[int, float, float, int]:
    """Write the instance files of ``paths`` (see :mod:`ddpmseg.instances.outputs`) and, with ``coco``, one
    COCO results file for the whole run; (images done, seconds, extraction seconds, already done)."""
    if coco is not None:
        if Path(coco).resolve().parent != out.resolve():  # inside --out: made with it
            check_writable(coco, folder=False, option="--coco", example="results.json")
        coco = Path(coco)
        check_not_there([coco], overwrite, "--coco")
    done = [p for p in paths if all((out / f"{p.stem}{s}").is_file() for s in OUTPUT_FILES)]
    if skip_done and coco is None:
        paths = [p for p in paths if p not in done]
    else:
        check_not_there([out / f"{p.stem}{s}" for p in paths for s in OUTPUT_FILES], overwrite)
    seg = InstanceSegmenter(model_dir, checkpoint, device)
    for p in paths:  # fail on a bad image before any output is written
        data.load_rgb(p)
    out.mkdir(parents=True, exist_ok=True)
    start, ext, results = time.perf_counter(), 0.0, []
    for p in tqdm(paths, desc="predict", unit="img", disable=not progress):
        rgb, inst, s = seg.instances(p)
        ext += s
        for suffix in OUTPUT_FILES:
            remove_stale_temps(out / f"{p.stem}{suffix}")
        write_instance_outputs(out, p.stem, rgb, inst, seg.names, legend)
        results.append((p.name, inst))
    if coco is not None:
        text = json.dumps(to_coco(results, seg.categories()))
        write_atomic(Path(coco), lambda f: f.write_text(text + "\n"))
    return len(paths), time.perf_counter() - start, ext, len(done) if skip_done and coco is None else 0


# -- evaluate ----------------------------------------------------------------------------------------------------
def _named(name: str, cid: int) -> bool:
    """Whether ``name`` is a real class name rather than the placeholder for an unnamed id."""
    return bool(name.strip()) and name.strip() != f"class {cid}"


def evaluate_instances(model_dir: str | Path, images: Sequence[Path], instances: str | Path, *, checkpoint: Any = None,
                       device: str = "auto", progress: bool = False) -> dict[str, Any]:
    """COCO mask AP, AP50, AP75 and per-class AP of an instance model on the annotated ``images``."""
    seg = InstanceSegmenter(model_dir, checkpoint, device)
    ann = load_annotations(instances, seg.names)
    pairs = [p for p in images if p.stem in ann.images]
    if not pairs:
        raise DdpmsegError(f"no image of the {len(images)} given is annotated in {instances}; give the annotated images")
    for cid, name in sorted(ann.categories.items()):  # the same id must mean the same class (unnamed ones: any)
        if 1 <= cid < len(seg.names) and _named(name, cid) and _named(seg.names[cid], cid) \
                and name.strip().lower() != seg.names[cid].strip().lower():
            raise DdpmsegError(f"{instances}: category {cid} is {name!r} but the model's class {cid} is "
                               f"{seg.names[cid]!r}; give annotations with the model's category ids")
    for p in pairs:  # every annotation checked before the first forward pass
        rgb = data.load_rgb(p)
        ann.check_size(p.stem, (rgb.shape[1], rgb.shape[0]))
        bad = [c for c in ann.images[p.stem].classes if not 1 <= c < len(seg.names)]
        if bad:
            raise DdpmsegError(f"{instances}: image {p.stem!r} has an instance of category {bad[0]}, which the model "
                               f"does not have (its classes 1..{len(seg.names) - 1}); use the model's categories")
    truth, pred = {}, {}
    for p in tqdm(pairs, desc="evaluate", unit="img", disable=not progress):
        truth[p.stem] = ann.images[p.stem]
        pred[p.stem] = seg.instances(p)[1]
    r = mask_ap(truth, pred, seg.categories())
    ids = [p.stem for p in pairs]
    r.update(images=ids, no_annotation=[p.stem for p in images if p.stem not in ann.images],
             training_images=seg.model.record.training_images(ids, [file_sha256(p) for p in pairs]),
             untrained_classes=[seg.names[c] for c in seg.model.record.untrained_classes])
    return r
