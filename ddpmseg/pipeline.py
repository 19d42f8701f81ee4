"""The steps of ddpmseg, one function each (the CLI calls exactly these).

extract_features  images -> feature cache (HDF5)
fit_model         feature cache + masks -> model folder
predict_images    images + model folder -> label / overlay / uncertainty PNGs
evaluate_model    images + masks + model folder -> per-class IoU and mIoU
kmeans_grid_image one image -> the paper's Figure-4 k-means grid
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ddpmseg import data, viz
from ddpmseg._io import check_writable
from ddpmseg.backbones import Backbone, backbone_from_record, create_backbone, precision_dtype, resolve_device
from ddpmseg.classify.ensemble import PixelEnsemble
from ddpmseg.errors import DdpmsegError
from ddpmseg.features.cache import FeatureCache, FeatureWriter
from ddpmseg.features.extractor import extract_block_maps, make_noise
from ddpmseg.features.pixels import CachePixels
from ddpmseg.metrics import evaluate_masks
from ddpmseg.model import SegmentationModel
from ddpmseg.records import CacheRecord, ExtractConfig, FitConfig, ModelRecord

log = logging.getLogger(__name__)

MIN_PIXELS = 20  # the reference: a class covering fewer pixels of an image is ignored there


def _checked_settings(backbone: Backbone, config: ExtractConfig) -> ExtractConfig:
    """``config`` with its steps and blocks validated for ``backbone``; its precision checked on the device."""
    steps, blocks = backbone.check_steps(config.steps), backbone.check_blocks(config.blocks)
    precision_dtype(config.precision, backbone.device)
    return dataclasses.replace(config, steps=tuple(steps), blocks=tuple(blocks))


def _load_image(path: Path, size: int, mode: str) -> tuple[np.ndarray, torch.Tensor, data.Preprocess]:
    rgb = data.load_rgb(path)
    x0, pre = data.preprocess_image(rgb, size, mode)
    return rgb, x0, pre


# -- extract -----------------------------------------------------------------------
@dataclass
class ExtractSummary:
    out: Path
    new: int
    skipped: int
    total: int
    seconds: float
    bytes_per_image: float


def extract_features(
    checkpoint: str | Path,
    images: Sequence[str | Path],
    out: str | Path,
    *,
    config: ExtractConfig = ExtractConfig(),
    preset: str | None = None,
    model_flags: str | Path | None = None,
    device: str = "auto",
    batch_size: int = 0,
    progress: bool = False,
) -> ExtractSummary:
    """Extract the decoder-block maps of ``images`` into the cache ``out``.

    Images already in ``out`` (or finished by an interrupted run) are skipped.
    """
    if batch_size < 0:
        raise DdpmsegError(f"--batch-size must be 0 (all timesteps at once) or positive, got {batch_size}")
    paths = data.list_images(images)
    backbone = create_backbone(checkpoint, preset, model_flags, device)
    config = _checked_settings(backbone, config)
    size = backbone.image_size
    noise = make_noise(config.seed, size)
    writer = FeatureWriter(out, CacheRecord(config, backbone.spec, backbone.checkpoint), noise)
    done = writer.done_ids()
    todo = [p for p in paths if p.stem not in done]
    for p in todo:  # fail on a bad image before any forward pass
        data.load_rgb(p)
    start = time.perf_counter()
    try:
        for p in tqdm(todo, desc="extract", unit="img", disable=not progress):
            _, x0, pre = _load_image(p, size, config.preprocess)
            maps = extract_block_maps(backbone, x0, noise, config.steps, config.blocks, batch_size, config.precision)
            writer.add(p.stem, maps, str(p), pre.to_dict())
    finally:
        writer.merge()
    seconds = time.perf_counter() - start
    out = Path(out)
    with FeatureCache(out) as cache:
        total = len(cache)
    return ExtractSummary(
        out, len(todo), len(paths) - len(todo), total, seconds, out.stat().st_size / max(total, 1)
    )


# -- fit ---------------------------------------------------------------------------
@dataclass
class FitSummary:
    out: Path
    image_ids: list[str]
    n_pixels: int
    n_classes: int
    seconds: float
    n_iter: list[int] = field(default_factory=list)


def _labelled_ids(cache: FeatureCache, masks: Path) -> list[tuple[str, Path]]:
    if not masks.is_dir():
        raise DdpmsegError(f"--masks {masks} is not a folder; give the folder holding the label maps")
    found = [(i, data.find_mask(i, masks, image_path=cache.source(i))) for i in cache.image_ids]
    return [(i, m) for i, m in found if m is not None]


def _training_masks(
    cache: FeatureCache,
    pairs: Sequence[tuple[str, Path]],
    labelset: data.LabelSet | None,
    ignore_index: int,
    min_pixels: int,
) -> list[np.ndarray]:
    """Every mask loaded and checked (before any training), mapped onto the model grid."""
    out = []
    for image_id, path in pairs:
        pre = data.Preprocess.from_dict(cache.preprocess(image_id))
        mask = data.load_mask(path, labelset, expected_size=pre.original_size)
        if labelset is not None:
            data.check_labels(mask, labelset.n_classes, ignore_index, path)
        out.append(data.apply_min_pixels(data.prepare_mask(mask, pre), min_pixels, ignore_index))
    return out


def fit_model(
    features: str | Path,
    masks: str | Path,
    out: str | Path,
    *,
    labels: int | None = None,
    classes: str | None = None,
    ensemble: int = 10,
    seed: int = 0,
    max_epochs: int = 100,
    ignore_index: int | None = None,
    min_pixels: int = MIN_PIXELS,
    device: str = "auto",
    progress: bool = False,
    recipe: str = "reference",
    pixel_fraction: float = 1.0,
) -> FitSummary:
    """Train the pixel ensemble on the labelled images of a feature cache.

    ``ignore_index``: the label neither trained nor scored (default: the label
    set's, 255 without one; Bedroom-28's is 0). ``min_pixels``: a class
    covering fewer pixels of an image is ignored in that image (the
    reference's 20). ``recipe``/``pixel_fraction``: see
    :class:`~ddpmseg.classify.PixelEnsemble`.
    """
    masks = Path(masks)
    check_writable(out, folder=True)  # before any training
    if min_pixels < 0:
        raise DdpmsegError(f"--min-pixels must be 0 or more, got {min_pixels}")
    with FeatureCache(features) as cache:
        pairs = _labelled_ids(cache, masks)
        if not pairs:
            raise DdpmsegError(
                f"no mask in {masks} matches an image of {features} (looked for ID.npy, ID.png, image_mask{{i}}.npy)"
            )
        if labels is not None:
            if labels < 1 or labels > len(pairs):
                raise DdpmsegError(f"--labels {labels} asked for, but {len(pairs)} labelled images exist; use 1..{len(pairs)}")
            pairs = pairs[:labels]
        labelset = data.load_label_set(classes) if classes else None
        if ignore_index is None:
            ignore_index = labelset.ignore_index if labelset is not None else 255
        label_maps = _training_masks(cache, pairs, labelset, ignore_index, min_pixels)
        if labelset is None:
            seen = [int(m[m != ignore_index].max()) for m in label_maps if (m != ignore_index).any()]
            labelset = data.LabelSet.default(max(seen, default=0) + 1)
        ids = [i for i, _ in pairs]
        source = CachePixels([cache.block_maps(i) for i in ids], cache.keys, cache.image_size)
        y = np.concatenate([m.reshape(-1) for m in label_maps])
        if int((y != ignore_index).sum()) < 2:
            raise DdpmsegError(
                f"the {len(ids)} masks used from {masks} label fewer than two pixels ({ignore_index} = ignore; "
                f"a class under {min_pixels} pixels of an image is ignored there); give masks that label the images"
            )
        cache_record = cache.record
        noise = torch.from_numpy(cache.noise)
    start = time.perf_counter()
    est = PixelEnsemble(
        n_classes=labelset.n_classes,
        n_members=ensemble,
        max_epochs=max_epochs,
        ignore_index=ignore_index,
        random_state=seed,
        device=str(resolve_device(device)),
        progress=progress,
        recipe=recipe,
        pixel_fraction=pixel_fraction,
    ).fit(source, y)
    seconds = time.perf_counter() - start
    fit = FitConfig(
        images=tuple(ids),
        masks=str(masks.resolve()),
        ensemble=ensemble,
        seed=seed,
        max_epochs=max_epochs,
        ignore_index=ignore_index,
        min_pixels=min_pixels,
        recipe=recipe,
        pixel_fraction=pixel_fraction,
        batch_size=est.batch_size_,
        lr=est.lr_,
        precision=est.precision_,
        n_pixels=int((y != ignore_index).sum()),
        n_iter=tuple(est.n_iter_),
    )
    record = ModelRecord(cache_record.backbone, cache_record.checkpoint, cache_record.extract, labelset, fit)
    SegmentationModel(record, est, noise).save(out)
    return FitSummary(Path(out), ids, fit.n_pixels, labelset.n_classes, seconds, list(fit.n_iter))


# -- predict / evaluate --------------------------------------------------------------
class Segmenter:
    """A fitted model plus its backbone, ready to segment image files."""

    def __init__(self, model_dir: str | Path, checkpoint: str | Path | None = None, device: str = "auto") -> None:
        dev = resolve_device(device)
        self.model = SegmentationModel.load(model_dir, device=dev)
        r = self.model.record
        self.backbone = backbone_from_record(r.backbone, r.checkpoint, checkpoint, dev, where=f"{model_dir}/model.json")
        self.extract = r.extract

    def segment(self, path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        """(rgb, labels, uncertainty) at the original size, and the extraction seconds."""
        size = self.backbone.image_size
        rgb, x0, pre = _load_image(path, size, self.extract.preprocess)
        t0 = time.perf_counter()
        e = self.extract
        maps = extract_block_maps(self.backbone, x0, self.model.noise, e.steps, e.blocks, precision=e.precision)
        seconds = time.perf_counter() - t0
        seg = self.model.ensemble.predict_block_maps(maps, self.model.keys, size)
        labels = data.restore_labels(seg.labels, pre, fill=255)
        unc = data.restore_map(seg.uncertainty, pre, fill=0.0)
        return rgb, labels, unc, seconds


@dataclass
class PredictSummary:
    out: Path
    n_images: int
    seconds: float
    extract_seconds: float


def predict_images(
    images: Sequence[str | Path],
    model_dir: str | Path,
    out: str | Path,
    *,
    checkpoint: str | Path | None = None,
    device: str = "auto",
    progress: bool = False,
) -> PredictSummary:
    """Write NAME_labels.png, NAME_overlay.png and NAME_uncertainty.png per image."""
    paths = data.list_images(images)
    out = check_writable(out, folder=True)
    segmenter = Segmenter(model_dir, checkpoint, device)
    for p in paths:  # fail on a bad image before any output is written
        data.load_rgb(p)
    out.mkdir(parents=True, exist_ok=True)
    palette = segmenter.model.labelset.palette()
    start, ext = time.perf_counter(), 0.0
    for p in tqdm(paths, desc="predict", unit="img", disable=not progress):
        rgb, labels, unc, sec = segmenter.segment(p)
        ext += sec
        viz.save_label_png(out / f"{p.stem}_labels.png", labels, palette)
        viz.save_png_atomic(out / f"{p.stem}_overlay.png", viz.overlay(rgb, labels, palette))
        viz.save_png_atomic(out / f"{p.stem}_uncertainty.png", viz.uncertainty_image(unc))
    return PredictSummary(out, len(paths), time.perf_counter() - start, ext)


def evaluate_model(
    model_dir: str | Path,
    images: Sequence[str | Path],
    masks: str | Path,
    *,
    checkpoint: str | Path | None = None,
    device: str = "auto",
    progress: bool = False,
) -> dict[str, Any]:
    """Per-class IoU and mIoU over every image with a mask, as the reference's ``compute_iou``.

    Every class index except the model's ignore label is scored (Bedroom-28:
    its 28 classes 1..28, background 0 being the ignore label).
    """
    masks = Path(masks)
    if not masks.is_dir():
        raise DdpmsegError(f"--masks {masks} is not a folder; give the folder holding the label maps")
    pairs = [(p, data.find_mask(p.stem, masks, image_path=p)) for p in data.list_images(images)]
    pairs = [(p, m) for p, m in pairs if m is not None]
    if not pairs:
        raise DdpmsegError(f"no image of {', '.join(map(str, images))} has a mask in {masks}")
    segmenter = Segmenter(model_dir, checkpoint, device)
    labelset = segmenter.model.labelset
    ignore = labelset.ignore_index
    truths = []
    for p, m in pairs:  # read every mask before the first forward pass
        size = data.load_rgb(p).shape[1::-1]
        truth = data.load_mask(m, labelset, expected_size=tuple(size))
        data.check_labels(truth, labelset.n_classes, ignore, m)
        truths.append(truth)
    preds = []
    for p, _ in tqdm(pairs, desc="evaluate", unit="img", disable=not progress):
        preds.append(segmenter.segment(p)[1])
    result = evaluate_masks(preds, truths, labelset.n_classes, ignore_index=ignore)
    return {
        "miou": float(result["miou"]),
        "per_class": {  # the ignore label, when it is a class index (bedroom_28: 0), is not scored
            name: float(v) for c, (name, v) in enumerate(zip(labelset.names, result["per_class"])) if c != ignore
        },
        "n_images": len(pairs),
        "images": [p.stem for p, _ in pairs],
    }


# -- k-means ------------------------------------------------------------------------
def kmeans_grid_image(
    image: str | Path,
    checkpoint: str | Path,
    out: str | Path,
    *,
    k: int = 5,
    config: ExtractConfig = ExtractConfig(),
    preset: str | None = None,
    model_flags: str | Path | None = None,
    device: str = "auto",
    progress: bool = False,
) -> Path:
    """The paper's Figure-4 grid: rows blocks, columns timesteps, k clusters per cell."""
    image, out = Path(image), check_writable(out, folder=False, example="grid.png")
    backbone = create_backbone(checkpoint, preset, model_flags, device)
    config = _checked_settings(backbone, config)
    size = backbone.image_size
    rgb, x0, pre = _load_image(image, size, config.preprocess)
    noise = make_noise(config.seed, size)
    maps = extract_block_maps(backbone, x0, noise, config.steps, config.blocks, precision=config.precision)
    cells = {}
    for b, t in tqdm([(b, t) for b in config.blocks for t in config.steps], desc="k-means", disable=not progress):
        cells[(b, t)] = viz.cluster_features(maps[(t, b)], k, random_state=config.seed)
    model_rgb = ((x0[0].permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
    grid = viz.kmeans_grid(model_rgb, cells, config.blocks, config.steps, k)
    viz.save_png_atomic(out, grid)
    return out
