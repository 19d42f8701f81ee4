"""The steps of ddpmseg, one function each (the CLI calls exactly these); the work on one image
that they share with the Ray workers is in :mod:`ddpmseg.workers`.

extract_features  images -> feature cache (HDF5)
fit_model         feature cache + masks -> model folder
predict_images    images + model folder -> label / overlay / uncertainty PNGs
evaluate_model    images + masks + model folder -> per-class IoU and mIoU
kmeans_grid_image one image -> the paper's Figure-4 k-means grid
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ddpmseg import data, viz
from ddpmseg._io import check_not_there, check_writable, file_sha256
from ddpmseg.backbones import create_backbone, resolve_device
from ddpmseg.backbones.runs import describe_folder
from ddpmseg.errors import DdpmsegError
from ddpmseg.features.cache import FeatureCache
from ddpmseg.features.extractor import extract_block_maps, make_noise
from ddpmseg.heads import ImageMaps, config_dict, get_head
from ddpmseg.metrics import Calibration, SegmentationScore, image_uncertainty, present_miou
from ddpmseg.model import MODEL_FILES, SegmentationModel, load_model
from ddpmseg.options import DEFAULT_SEED, ENGINES, EXTRACT_BATCH_SIZE, KMEANS_K, MIN_PIXELS
from ddpmseg.records import ExtractConfig, FitConfig, ModelRecord
from ddpmseg.workers import OUTPUT_KINDS, Analysis, Extractor, Segmenter, cached_image, checked_settings, load_image


# -- extract -----------------------------------------------------------------------
@dataclass
class ExtractSummary:
    out: Path
    new: int
    skipped: int  # already cached
    total: int
    seconds: float
    bytes_per_image: float
    not_images: list[str] = field(default_factory=list)  # folder entries that are not images


def _check_engine(engine: str) -> None:
    if engine not in ENGINES:
        raise DdpmsegError(f"--engine {engine!r} is unknown: use one of {', '.join(ENGINES)}")


def _extract_summary(out: Path, new: int, skipped: int, seconds: float, not_images: list[str]) -> ExtractSummary:
    if not out.exists():  # nothing new, nothing there before
        return ExtractSummary(out, 0, skipped, 0, seconds, 0.0, not_images)
    with FeatureCache(out) as cache:
        total = len(cache)
    size = sum(f.stat().st_size for f in out.glob("*.h5")) if out.is_dir() else out.stat().st_size
    return ExtractSummary(out, new, skipped, total, seconds, size / max(total, 1), not_images)


def extract_features(
    checkpoint: str | Path,
    images: Sequence[str | Path],
    out: str | Path,
    *,
    config: ExtractConfig = ExtractConfig(),
    preset: str | None = None,
    model_flags: str | Path | None = None,
    image_size: int | None = None,
    num_head_channels: int | None = None,
    device: str = "auto",
    batch_size: int = EXTRACT_BATCH_SIZE,
    progress: bool = False,
    shard: str | None = None,
    engine: str = "local",
    engine_settings: Any = None,
) -> ExtractSummary:
    """Extract the decoder-block maps of ``images`` into the cache ``out`` (a ``.h5`` file or a cache
    folder, see :mod:`ddpmseg.features.cache`).

    Images already in ``out`` (or finished by an interrupted run) are
    skipped; an image with the id (file stem) of a cached image but other
    content is refused. ``preset`` / ``model_flags`` / ``image_size`` /
    ``num_head_channels``: see :func:`~ddpmseg.backbones.create_backbone`.
    ``shard="I/N"``: only share I of N of the sorted images (:func:`~ddpmseg.data.take_shard`).
    ``engine="ray"``: the images are extracted by a Ray actor pool (``engine_settings``:
    :class:`~ddpmseg.engines.ray_data.EngineSettings`); the features are the same.
    """
    _check_engine(engine)
    not_images: list[str] = []
    paths = data.take_shard(data.list_images(images, skipped=not_images), shard)
    kwargs = dict(preset=preset, model_flags=model_flags, image_size=image_size, num_head_channels=num_head_channels,
                  device=device, batch_size=batch_size)
    ex = Extractor(checkpoint, out, config, **kwargs)
    todo = ex.todo(paths)
    start = time.perf_counter()
    try:
        if engine == "ray":  # workers decode their own images (a bad one fails the run when reached)
            from ddpmseg.engines import ray_data

            items = [{"path": str(p), "sha256": d} for p, d in todo]
            kwargs.update(checkpoint=str(checkpoint), out=str(out), config=ex.config)
            ray_data.run(items, ray_data.ExtractWorker, {"kwargs": kwargs}, engine_settings or ray_data.EngineSettings(),
                         progress, "extract")
        else:
            for p, _ in todo:  # fail on a bad image before any forward pass
                data.load_rgb(p)
            for p, digest in tqdm(todo, desc="extract", unit="img", disable=not progress):
                ex.add(p, digest)
    finally:
        ex.writer.merge()
    return _extract_summary(Path(out), len(todo), len(paths) - len(todo), time.perf_counter() - start, not_images)


# -- fit ---------------------------------------------------------------------------
@dataclass
class FitSummary:
    out: Path
    image_ids: list[str]
    n_pixels: int
    n_classes: int
    seconds: float
    head: str = "mlp"
    description: str = ""  # the head's one line on its fit (recipe, steps, final loss, ...)
    n_iter: list[int] = field(default_factory=list)  # steps (the mlp head: per member)
    final_loss: float = float("nan")
    unlabelled: list[str] = field(default_factory=list)  # cached images without a mask
    untrained: list[str] = field(default_factory=list)  # classes with no training pixel: never predicted
    n_instances: int | None = None  # an instance head's training instances


def _labelled_ids(cache: FeatureCache, masks: Path) -> tuple[list[tuple[str, Path]], list[str]]:
    """(id, mask) of the cached images with a mask in ``masks``, and the ids of those without."""
    if not masks.is_dir():
        raise DdpmsegError(f"--masks {masks} is not a folder; give the folder holding the label maps")
    found = [(i, data.find_mask(i, masks, image_path=cache.source(i))) for i in cache.image_ids]
    return [(i, m) for i, m in found if m is not None], [i for i, m in found if m is None]


def _training_masks(
    cache: FeatureCache,
    pairs: Sequence[tuple[str, Path]],
    labelset: data.LabelSet | None,
    ignore_index: int,
    min_pixels: int,
) -> tuple[list[np.ndarray], int]:
    """Every mask loaded and checked (before any training), mapped onto the model grid; and the
    largest label the masks hold (before any rule drops a class: it fixes the class count)."""
    out, largest = [], -1
    for image_id, path in pairs:
        pre = data.Preprocess.from_dict(cache.preprocess(image_id))
        mask = data.load_mask(path, labelset, expected_size=pre.original_size)
        # strokes: a mask mostly *unlabelled* (255, what `ddpmseg label` writes); a label set's ignored class (Bedroom-28's
        # background 0) covering most of a dense mask is not, and that mask keeps the reference's nearest sampling
        sparse = bool((mask == 255).mean() > data.SPARSE_FRACTION)
        if ignore_index != 255 and labelset is not None and labelset.n_classes <= 255:
            mask[mask == 255] = ignore_index  # 255 = unlabelled (sparse masks, `ddpmseg label`) under any label set
        if labelset is not None:
            data.check_labels(mask, labelset.n_classes, ignore_index, path)
        labelled = mask[mask != ignore_index]
        largest = max(largest, int(labelled.max()) if labelled.size else -1)
        # the reference's rule at the label's own resolution (its masks are 256x256 like its model grid):
        # counted on a small model's grid, a small class (eyes at 32 px) would vanish from every image
        kept = data.apply_min_pixels(mask, min_pixels, ignore_index)
        grid = data.prepare_mask(mask, pre, ignore_index if sparse else None)  # strokes kept on a coarse grid
        dropped = np.setdiff1d(np.unique(mask[mask != ignore_index]), np.unique(kept[kept != ignore_index]))
        if dropped.size:  # the rule's classes ignored on the grid too (never a neighbour's label in their place)
            grid[np.isin(grid, dropped)] = ignore_index
        out.append(grid)
    return out, largest


def fit_model(
    features: str | Path,
    masks: str | Path | None,
    out: str | Path,
    *,
    instances: str | Path | None = None,
    head: str = "mlp",
    options: Mapping[str, Any] | None = None,
    labels: int | None = None,
    classes: str | None = None,
    seed: int = DEFAULT_SEED,
    ignore_index: int | None = None,
    min_pixels: int = MIN_PIXELS,
    device: str = "auto",
    progress: bool = False,
    overwrite: bool = False,
) -> FitSummary:
    """Fit the head ``head`` (see :func:`ddpmseg.heads.get_head`; ``options``: its options, e.g.
    ``{"n_members": 10, "recipe": "reference"}`` for the MLP ensemble) on the labelled images of a
    feature cache, and save the model folder ``out``.

    ``ignore_index``: the label neither trained nor scored (default: the label
    set's, 255 without one; Bedroom-28's is 0). ``min_pixels``: a class
    covering fewer pixels of an image's mask, counted at the mask's own
    resolution, is ignored in that image (the reference's 20, at 256x256).
    Classes left with no training pixel are named in the summary and in
    model.json (``fit.untrained_classes``): the model never predicts them.
    An instance head (``diffinst``) trains on ``instances`` (COCO JSON or instance-id PNGs,
    :mod:`ddpmseg.instances.annotations`) instead of ``masks``.
    """
    spec = get_head(head)
    config = spec.make_config(options)  # every setting checked before any work
    if (spec.task == "instances") != (instances is not None) or (instances is None) == (masks is None):
        raise DdpmsegError(f"--head {head} trains on --instances ANN (COCO JSON or instance-id PNGs), not --masks"
                           if spec.task == "instances" else
                           f"--head {head} segments classes: give --masks DIR (--instances needs --head diffinst)")
    masks = Path(masks) if masks is not None else None
    check_writable(out, folder=True)
    what = describe_folder(out)
    if what in ("a train-ddpm run folder", "a feature cache folder"):  # never mixed with a model, --overwrite or not
        raise DdpmsegError(f"--out {out} is {what}; a model written there would be mixed with it: give a new folder, "
                           f"e.g. --out {Path(out).parent / 'model'}")
    check_not_there([Path(out) / f for f in MODEL_FILES], overwrite, "--out")
    if min_pixels < 0:
        raise DdpmsegError(f"--min-pixels must be 0 or more, got {min_pixels}")
    if instances is not None:
        from ddpmseg.instances.steps import fit_instances

        with FeatureCache(features) as cache:
            est, record, r = fit_instances(spec, config, cache, Path(features), Path(instances), labels=labels,
                                           classes=classes, seed=seed, device=str(resolve_device(device)), progress=progress)
            noise = torch.from_numpy(cache.noise)
        SegmentationModel(record, est, noise).save(out)
        return FitSummary(Path(out), r["ids"], record.fit.n_pixels, record.labelset.n_classes, r["seconds"], head,
                          est.describe(), [int(est.n_iter_)], float(est.final_loss_), r["unlabelled"], r["untrained"],
                          r["n_instances"])
    with FeatureCache(features) as cache:
        pairs, unlabelled = _labelled_ids(cache, masks)
        if not pairs:
            raise DdpmsegError(
                f"no mask in {masks} matches an image of {features} "
                f"({data.no_mask_found([(i, cache.source(i)) for i in cache.image_ids], masks)})"
            )
        if labels is not None:
            if labels < 1 or labels > len(pairs):
                raise DdpmsegError(f"--labels {labels} asked for, but {len(pairs)} labelled images exist; use 1..{len(pairs)}")
            pairs = pairs[:labels]
        labelset = data.load_label_set(classes) if classes else None
        if ignore_index is None:
            ignore_index = labelset.ignore_index if labelset is not None else 255
        label_maps, largest = _training_masks(cache, pairs, labelset, ignore_index, min_pixels)
        if labelset is None:  # the classes the masks hold, even one that no rule left a training pixel of
            labelset = data.LabelSet.default(max(largest, 0) + 1)
        ids = [i for i, _ in pairs]
        digests = [cache.sha256(i) or "" for i in ids]
        maps = [cache.block_maps(i) for i in ids]
        sources = [(i, cache.source(i), d) for i, d in zip(ids, digests)]  # for a head that reads pixels
        n_pixels = int(sum((m != ignore_index).sum() for m in label_maps))
        trained = set(np.unique(np.concatenate([m.reshape(-1) for m in label_maps])).tolist())
        untrained = [c for c in range(labelset.n_classes) if c != ignore_index and c not in trained]
        if n_pixels < 2:
            raise DdpmsegError(
                f"the {len(ids)} masks used from {masks} label fewer than two pixels ({ignore_index} = ignore; "
                f"a class under {min_pixels} pixels of an image is ignored there); give masks that label the images"
            )
        cache_record, size = cache.record, cache.image_size
        noise = torch.from_numpy(cache.noise)
    start = time.perf_counter()
    est = spec.build(config, n_classes=labelset.n_classes, ignore_index=ignore_index, random_state=seed,
                     device=str(resolve_device(device)), progress=progress)
    images = None
    if getattr(est, "needs_images", False):  # a head that reads pixels (segdiff's RRDB encoder)
        images = [cached_image(*src, size, cache_record.extract.preprocess) for src in sources]
    est.fit(ImageMaps(maps, tuple(cache_record.extract.keys), size, images), label_maps)
    seconds = time.perf_counter() - start
    n_iter = [int(v) for v in np.atleast_1d(est.n_iter_)]
    fit = FitConfig(images=tuple(ids), masks=str(masks.resolve()), image_sha256=tuple(digests), seed=seed,
                    ignore_index=ignore_index, min_pixels=min_pixels, n_pixels=n_pixels, n_iter=tuple(n_iter),
                    head=head, head_config=config_dict(spec.fitted_config(est)), untrained_classes=tuple(untrained))
    record = ModelRecord(cache_record.backbone, cache_record.checkpoint, cache_record.extract, labelset, fit)
    SegmentationModel(record, est, noise).save(out)
    return FitSummary(Path(out), ids, n_pixels, labelset.n_classes, seconds, head, est.describe(), n_iter,
                      float(np.mean(est.final_loss_)), unlabelled, [labelset.names[c] for c in untrained])


# -- predict / evaluate --------------------------------------------------------------
@dataclass
class PredictSummary:
    out: Path
    n_images: int
    seconds: float
    extract_seconds: float
    not_images: list[str] = field(default_factory=list)
    already_done: int = 0  # skipped: their PNGs existed (skip_done)


def predict_images(
    images: Sequence[str | Path],
    model_dir: str | Path,
    out: str | Path,
    *,
    checkpoint: str | Path | None = None,
    device: str = "auto",
    progress: bool = False,
    overwrite: bool = False,
    legend: bool = True,
    shard: str | None = None,
    skip_done: bool = False,
    engine: str = "local",
    engine_settings: Any = None,
    coco: str | Path | None = None,
) -> PredictSummary:
    """Write per image, at its original size: ``NAME_labels.png`` (palette PNG, pixel = label),
    ``NAME_overlay.png`` (class colours over the image, with a legend of the classes present) and
    ``NAME_uncertainty.png`` (the ensemble's uncertainty in viridis, with a colour bar). With
    ``legend=False`` the last two have no panel (exactly the image's size). ``shard="I/N"``: only
    share I of N of the sorted images; ``skip_done``: leave out images whose three PNGs exist.
    ``engine="ray"``: a Ray actor pool writes the same files (``engine_settings``:
    :class:`~ddpmseg.engines.ray_data.EngineSettings`). An instance model (``fit --head diffinst``) writes
    ``NAME_instances.png`` / ``.json`` and ``NAME_overlay.png`` instead (:mod:`ddpmseg.instances.outputs`),
    and with ``coco`` one COCO results file for the run."""
    _check_engine(engine)
    not_images: list[str] = []
    paths = data.take_shard(data.list_images(images, skipped=not_images), shard)
    out = check_writable(out, folder=True)
    from ddpmseg.instances.steps import is_instance_model, predict_instance_images

    if is_instance_model(model_dir):  # instance files (ddpmseg.instances.outputs), the plain loop
        if engine != "local":
            raise DdpmsegError(f"--engine {engine}: {model_dir} is an instance model, which predicts in the plain loop "
                               "only; leave --engine out")
        n, seconds, ext, before = predict_instance_images(
            paths, model_dir, out, checkpoint=checkpoint, device=device, progress=progress, overwrite=overwrite,
            legend=legend, skip_done=skip_done, coco=coco)
        return PredictSummary(out, n, seconds, ext, not_images, before)
    if coco is not None:
        raise DdpmsegError(f"--coco: {model_dir} segments classes, not instances; --coco needs an instance model "
                           "(`ddpmseg fit --head diffinst --instances ANN`)")
    done = [p for p in paths if all((out / f"{p.stem}_{kind}.png").is_file() for kind in OUTPUT_KINDS)]
    if skip_done:
        paths = [p for p in paths if p not in done]
    else:
        check_not_there([out / f"{p.stem}_{kind}.png" for p in paths for kind in OUTPUT_KINDS], overwrite)
    if engine == "ray":  # the model is checked here, the images by the workers (a bad one fails the run when reached)
        from ddpmseg.engines import ray_data

        load_model(model_dir)
        out.mkdir(parents=True, exist_ok=True)
        r = ray_data.run([{"path": str(p)} for p in paths], ray_data.PredictWorker,
                         dict(model_dir=str(model_dir), out=str(out), checkpoint=None if checkpoint is None else str(checkpoint),
                              device=device, legend=legend, overwrite=overwrite), engine_settings or ray_data.EngineSettings(), progress, "predict")
        return PredictSummary(out, len(paths), r.seconds, float("nan"), not_images, len(done) if skip_done else 0)
    segmenter = Segmenter(model_dir, checkpoint, device)
    for p in paths:  # fail on a bad image before any output is written
        data.load_rgb(p)
    out.mkdir(parents=True, exist_ok=True)
    start, ext = time.perf_counter(), 0.0
    for p in tqdm(paths, desc="predict", unit="img", disable=not progress):
        ext += segmenter.write_outputs(p, out, legend)
    return PredictSummary(out, len(paths), time.perf_counter() - start, ext, not_images,
                          len(done) if skip_done else 0)


def evaluate_model(
    model_dir: str | Path,
    images: Sequence[str | Path],
    masks: str | Path | None,
    *,
    instances: str | Path | None = None,
    checkpoint: str | Path | None = None,
    device: str = "auto",
    progress: bool = False,
    out: str | Path | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Per-class IoU and mIoU over every image with a mask, as the reference's ``compute_iou``, and how far
    the model's confidence can be trusted.

    Every class index except the model's ignore label is scored (Bedroom-28:
    its 28 classes 1..28, background 0 being the ignore label). The result
    names the evaluated images the model was trained on (``training_images``:
    the same file content, or id for models fitted on 0.1.0 caches): a score
    over them is not held out. ``no_mask`` lists the images without a mask.
    ``ece``: expected calibration error of the mean softmax (15 bins, at the
    original size, :class:`~ddpmseg.metrics.Calibration`), ``reliability`` its
    bins; ``confusion`` (rows true, columns predicted); ``per_image``: each
    image's mIoU over the classes present in its mask or prediction, and its
    uncertainty score (the reference's: the mean of the top 10 % of the pixel
    map). ``absent_classes``: the model's classes that no mask holds (several
    of them usually mean masks of another label set); ``untrained_classes``:
    classes the model had no training pixel of (it never predicts them). With
    ``out``: ``reliability.png`` and ``confusion.png`` there (refused if they exist, unless ``overwrite``).
    With ``instances`` (an instance model): COCO mask AP instead, see
    :func:`ddpmseg.instances.steps.evaluate_instances`.
    """
    if (masks is None) == (instances is None):
        raise DdpmsegError("evaluate: give --masks DIR (a class model) or --instances ANN (an instance model), one of them")
    if instances is not None:
        from ddpmseg.instances.steps import evaluate_instances

        if out is not None:
            raise DdpmsegError("--out: evaluate --instances writes no figures; leave --out out")
        return evaluate_instances(model_dir, data.list_images(images), instances, checkpoint=checkpoint, device=device,
                                  progress=progress)
    from ddpmseg.instances.steps import is_instance_model

    if is_instance_model(model_dir):
        raise DdpmsegError(f"--masks: {model_dir} is an instance model; score it with --instances ANN (COCO mask AP)")
    if out is not None:  # before any forward pass, like every command's --out
        out = check_writable(out, folder=True)
        check_not_there([out / "reliability.png", out / "confusion.png"], overwrite)
    masks = Path(masks)
    if not masks.is_dir():
        raise DdpmsegError(f"--masks {masks} is not a folder; give the folder holding the label maps")
    found = [(p, data.find_mask(p.stem, masks, image_path=p)) for p in data.list_images(images)]
    pairs = [(p, m) for p, m in found if m is not None]
    if not pairs:
        raise DdpmsegError(f"no image of {', '.join(map(str, images))} has a mask in {masks} "
                           f"({data.no_mask_found([(p.stem, p) for p, _ in found], masks)})")
    segmenter = Segmenter(model_dir, checkpoint, device)
    labelset = segmenter.model.labelset
    ignore = labelset.ignore_index
    truths = []
    for p, m in pairs:  # read every mask before the first forward pass
        size = data.load_rgb(p).shape[1::-1]
        truth = data.load_mask(m, labelset, expected_size=tuple(size))
        data.check_labels(truth, labelset.n_classes, ignore, m)
        truths.append(truth)
    present = set(np.unique(np.concatenate([np.unique(t) for t in truths])).tolist())
    absent = [c for c in range(labelset.n_classes) if c != ignore and c not in present]
    k = labelset.n_classes
    score, calib, per_image = SegmentationScore(k, ignore), Calibration(15, ignore), []
    for (p, _), truth in tqdm(list(zip(pairs, truths)), desc="evaluate", unit="img", disable=not progress):
        a = segmenter.analyse(p)
        score.update(a.labels, truth)
        proba, inside = a.proba()
        calib.update(proba, np.where(inside, truth, ignore if ignore is not None else -1))
        one = SegmentationScore(k, ignore).update(a.labels, truth)
        per_image.append({"image": p.stem, "miou": present_miou(one.confusion, ignore, one.ignored_pred),
                          "uncertainty": image_uncertainty(a.grid.uncertainty)})
    result = score.result()
    ids = [p.stem for p, _ in pairs]
    bins = calib.bins()
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        viz.save_png_atomic(out / "reliability.png", viz.reliability_diagram(bins["confidence"], bins["accuracy"],
                                                                            bins["count"], calib.ece()))
        scored = [c for c in range(k) if c != ignore]
        viz.save_png_atomic(out / "confusion.png", viz.confusion_image(result["confusion"][np.ix_(scored, scored)],
                                                                      [labelset.names[c] for c in scored]))
    nan_to_none = lambda v: None if v != v else float(v)  # noqa: E731 (JSON has no NaN)
    return {
        "miou": float(result["miou"]),
        "per_class": {  # the ignore label, when it is a class index (bedroom_28: 0), is not scored
            name: float(v) for c, (name, v) in enumerate(zip(labelset.names, result["per_class"])) if c != ignore
        },
        "n_images": len(pairs),
        "images": ids,
        "training_images": segmenter.model.record.training_images(ids, [file_sha256(p) for p, _ in pairs]),
        "no_mask": [p.stem for p, m in found if m is None],
        "ece": calib.ece(),
        "reliability": {key: [nan_to_none(v) for v in bins[key]] for key in ("confidence", "accuracy", "count")},
        "confusion": result["confusion"].tolist(),
        "per_image": [{**r, "miou": nan_to_none(r["miou"])} for r in per_image],
        # classes no mask holds (several: are these the model's masks?) and classes the model never learned
        "absent_classes": [labelset.names[c] for c in absent],
        "untrained_classes": [labelset.names[c] for c in segmenter.model.record.untrained_classes],
    }


# -- k-means ------------------------------------------------------------------------
def kmeans_grid_image(
    image: str | Path,
    checkpoint: str | Path,
    out: str | Path,
    *,
    k: int = KMEANS_K,
    config: ExtractConfig = ExtractConfig(),
    preset: str | None = None,
    model_flags: str | Path | None = None,
    image_size: int | None = None,
    num_head_channels: int | None = None,
    device: str = "auto",
    progress: bool = False,
    overwrite: bool = False,
) -> Path:
    """The paper's Figure-4 grid: rows blocks, columns timesteps, k clusters per cell.

    Cells keep the input image's aspect ratio: each block's cluster map is
    mapped back through the preprocessing (resize or crop; pixels the model
    did not see are grey), like predictions are. ``out``: a ``.png`` file, or
    a folder (one that exists, or a name ending with ``/``) for
    ``<folder>/<image stem>_kmeans.png``; other names are refused.
    """
    image = Path(image)
    out = kmeans_out_path(image, out)
    check_not_there([out], overwrite)
    if k < 2:
        raise DdpmsegError(f"--k {k}: k-means needs at least 2 clusters; choose another k")
    backbone = create_backbone(checkpoint, preset, model_flags, device, image_size=image_size,
                               num_head_channels=num_head_channels)
    config = checked_settings(backbone, config)
    smallest = min(backbone.blocks()[b].resolution for b in config.blocks) ** 2
    if not 2 <= k <= smallest:
        raise DdpmsegError(f"--k {k}: k-means needs 2 <= k <= {smallest} (the pixels of the smallest block map); "
                           "choose another k")
    size = backbone.image_size
    rgb, x0, pre = load_image(image, size, config.preprocess)
    noise = make_noise(config.seed, size, config.noise_samples)
    maps = extract_block_maps(backbone, x0, noise, config.steps, config.blocks, precision=config.precision)
    h, w = rgb.shape[:2]
    scale = min(1.0, 256 / max(h, w))  # the cells are small: map back at most 256 pixels on the long side
    shown = data.Preprocess.plan((max(1, round(w * scale)), max(1, round(h * scale))), size, pre.mode)
    cells = {}
    for b, t in tqdm([(b, t) for b in config.blocks for t in config.steps], desc="k-means", disable=not progress):
        ids = viz.cluster_features(maps[(t, b)], k, random_state=config.seed)
        on_grid = np.repeat(np.repeat(ids, size // ids.shape[0], axis=0), size // ids.shape[1], axis=1)
        cells[(b, t)] = data.restore_labels(on_grid, shown, fill=-1)
    grid = viz.kmeans_grid(rgb, cells, config.blocks, config.steps, k)
    out.parent.mkdir(parents=True, exist_ok=True)
    viz.save_png_atomic(out, grid)
    return out


def kmeans_out_path(image: str | Path, out: str | Path) -> Path:
    """Where ``kmeans --out OUT`` writes the grid of ``image``: OUT itself for a ``.png`` name, else
    ``OUT/<image stem>_kmeans.png`` for a folder (existing, or written with a trailing slash)."""
    text, image = str(out), Path(image)
    if Path(text).is_dir() or text.endswith(("/", "\\")):
        return check_writable(text, folder=True, option="--out") / f"{image.stem}_kmeans.png"
    path = Path(text)
    if path.suffix.lower() != ".png":
        what = f"a {path.suffix} name" if path.suffix else "a name without a suffix"
        raise DdpmsegError(f"--out {out} is {what}, but kmeans writes a PNG (lossless: JPEG would blur the cluster "
                           f"borders); give a .png file such as {path.with_suffix('.png').name}, or a folder "
                           f"({path.name}/) for {image.stem}_kmeans.png in it")
    return check_writable(path, folder=False, example="grid.png")
