"""The five steps of ddpmseg, one function each (the CLI calls exactly these).

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
from ddpmseg.backbones.adm import Backbone, create_backbone, precision_dtype, resolve_device
from ddpmseg.backbones.checkpoint import file_sha256
from ddpmseg.backbones.presets import AdmConfig
from ddpmseg.classify.ensemble import PixelEnsemble
from ddpmseg.errors import DdpmsegError
from ddpmseg.features.cache import FeatureCache, FeatureWriter
from ddpmseg.features.extractor import ExtractConfig, extract_block_maps, make_noise
from ddpmseg.features.pixels import CachePixels
from ddpmseg.metrics import evaluate_masks
from ddpmseg.model import SegmentationModel, classify_block_maps, model_config

log = logging.getLogger(__name__)


# -- backbones ---------------------------------------------------------------------
def load_backbone(
    checkpoint: str | Path,
    preset: str | None = None,
    model_flags: str | Path | None = None,
    device: str = "auto",
) -> tuple[Backbone, dict[str, Any]]:
    """The backbone for ``--ckpt`` and its provenance record (name, path, sha256).

    A file is a guided-diffusion (ADM) checkpoint; a folder or a hub id is a
    diffusers UNet2DModel (sha256 of its weights file).
    """
    from ddpmseg.backbones.registry import load_any

    return load_any(checkpoint, preset, model_flags, device)


def backbone_record(backbone: Backbone) -> dict[str, Any]:
    return {"family": backbone.family, "preset": backbone.name, "config": backbone.config.to_dict()}


def _checked_settings(backbone: Backbone, config: ExtractConfig) -> tuple[list[int], list[int]]:
    """The validated steps and blocks of ``config`` for ``backbone``; its precision checked on the device."""
    steps, blocks = backbone.check_steps(config.steps), backbone.check_blocks(config.blocks)
    precision_dtype(config.precision, backbone.device)
    return steps, blocks


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
    backbone, ckpt = load_backbone(checkpoint, preset, model_flags, device)
    steps, blocks = _checked_settings(backbone, config)
    size = backbone.image_size
    noise = make_noise(config.seed, size)
    cache_config = {"extract": dataclasses.asdict(config), "backbone": backbone_record(backbone), "checkpoint": ckpt}
    cache_config["extract"].update(steps=steps, blocks=blocks)
    writer = FeatureWriter(out, cache_config, noise)
    done = writer.done_ids()
    todo = [p for p in paths if p.stem not in done]
    for p in todo:  # fail on a bad image before any forward pass
        data.load_rgb(p)
    start = time.perf_counter()
    try:
        for p in tqdm(todo, desc="extract", unit="img", disable=not progress):
            _, x0, pre = _load_image(p, size, config.preprocess)
            maps = extract_block_maps(backbone, x0, noise, steps, blocks, batch_size, config.precision)
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
    cache: FeatureCache, pairs: Sequence[tuple[str, Path]], labelset: data.LabelSet | None, ignore_index: int
) -> list[np.ndarray]:
    """Every mask loaded and checked (before any training), mapped onto the model grid."""
    out = []
    for image_id, path in pairs:
        pre = data.Preprocess.from_dict(cache.preprocess(image_id))
        mask = data.load_mask(path, labelset, expected_size=pre.original_size)
        if labelset is not None:
            data.check_labels(mask, labelset.n_classes, ignore_index, path)
        out.append(data.apply_min_pixels(data.prepare_mask(mask, pre), 20, ignore_index))
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
    ignore_index: int = 255,
    device: str = "auto",
    progress: bool = False,
    recipe: str = "reference",
    pixel_fraction: float = 1.0,
) -> FitSummary:
    """Train the pixel ensemble on the labelled images of a feature cache.

    ``recipe``/``pixel_fraction``: see :class:`~ddpmseg.classify.PixelEnsemble`
    ("reference" is the paper's recipe exactly, "fast" shares batches of 1024).
    """
    masks = Path(masks)
    check_writable(out, folder=True)  # before any training
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
        label_maps = _training_masks(cache, pairs, labelset, ignore_index)
        if labelset is None:
            seen = [int(m[m != ignore_index].max()) for m in label_maps if (m != ignore_index).any()]
            labelset = data.LabelSet.default(max(seen, default=0) + 1)
        ids = [i for i, _ in pairs]
        source = CachePixels([cache.block_maps(i) for i in ids], cache.keys, cache.image_size)
        y = np.concatenate([m.reshape(-1) for m in label_maps])
        if int((y != ignore_index).sum()) < 2:
            raise DdpmsegError(
                f"the {len(ids)} masks used from {masks} label fewer than two pixels ({ignore_index} = ignore; "
                "a class under 20 pixels of an image is ignored there); give masks that label the images"
            )
        cache_config = cache.config
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
    fit = {
        "images": ids,
        "masks": str(masks.resolve()),
        "ensemble": ensemble,
        "seed": seed,
        "max_epochs": max_epochs,
        "ignore_index": ignore_index,
        "recipe": recipe,
        "pixel_fraction": pixel_fraction,
        "batch_size": est.batch_size_,
        "lr": est.lr_,
        "precision": est.precision_,
        "n_pixels": int((y != ignore_index).sum()),
        "n_iter": list(est.n_iter_),
    }
    SegmentationModel(model_config(cache_config, labelset, fit), est, noise).save(out)
    return FitSummary(Path(out), ids, fit["n_pixels"], labelset.n_classes, seconds, fit["n_iter"])


# -- predict / evaluate --------------------------------------------------------------
class Segmenter:
    """A fitted model plus its backbone, ready to segment image files."""

    def __init__(self, model_dir: str | Path, checkpoint: str | Path | None = None, device: str = "auto") -> None:
        dev = resolve_device(device)
        self.model = SegmentationModel.load(model_dir, device=dev)
        cfg = self.model.config
        family = cfg["backbone"].get("family", "adm")
        if family == "adm":
            ckpt = Path(checkpoint or cfg["checkpoint"]["path"])
            if not ckpt.is_file():
                raise DdpmsegError(
                    f"checkpoint {ckpt} recorded in {model_dir}/model.json is missing; pass --ckpt with the file "
                    f"{cfg['checkpoint']['name']}"
                )
            if file_sha256(ckpt) != cfg["checkpoint"]["sha256"]:
                raise DdpmsegError(
                    f"checkpoint {ckpt} is not the one the model was fitted with ({cfg['checkpoint']['name']}, "
                    "sha256 differs); pass --ckpt with that file"
                )
            bcfg = AdmConfig(**cfg["backbone"]["config"])
            self.backbone = create_backbone(None, ckpt, config=bcfg, device=dev)
        else:
            from ddpmseg.backbones.registry import backbone_from_record, checkpoint_available, checkpoint_sha256

            ckpt = checkpoint or cfg["checkpoint"]["path"]
            if not checkpoint_available(ckpt, family):
                raise DdpmsegError(
                    f"checkpoint {ckpt} recorded in {model_dir}/model.json is missing; pass --ckpt with the "
                    f"{family} model folder {cfg['checkpoint']['name']}"
                )
            if checkpoint_sha256(ckpt, family) != cfg["checkpoint"]["sha256"]:
                raise DdpmsegError(
                    f"checkpoint {ckpt} is not the one the model was fitted with ({cfg['checkpoint']['name']}, "
                    "sha256 of the weights differs); pass --ckpt with that folder"
                )
            self.backbone = backbone_from_record(cfg["backbone"], ckpt, device=dev)
        self.extract = ExtractConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg["extract"].items()})

    def segment(self, path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        """(rgb, labels, uncertainty) at the original size, and the extraction seconds."""
        size = self.backbone.image_size
        rgb, x0, pre = _load_image(path, size, self.extract.preprocess)
        t0 = time.perf_counter()
        e = self.extract
        maps = extract_block_maps(self.backbone, x0, self.model.noise, e.steps, e.blocks, precision=e.precision)
        seconds = time.perf_counter() - t0
        seg = classify_block_maps(self.model.ensemble, maps, self.model.keys, size)
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
    """Per-class IoU and mIoU over every image with a mask, as the reference computes them."""
    masks = Path(masks)
    if not masks.is_dir():
        raise DdpmsegError(f"--masks {masks} is not a folder; give the folder holding the label maps")
    pairs = [(p, data.find_mask(p.stem, masks, image_path=p)) for p in data.list_images(images)]
    pairs = [(p, m) for p, m in pairs if m is not None]
    if not pairs:
        raise DdpmsegError(f"no image of {', '.join(map(str, images))} has a mask in {masks}")
    segmenter = Segmenter(model_dir, checkpoint, device)
    labelset = segmenter.model.labelset
    ignore = segmenter.model.config["fit"]["ignore_index"]
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
    backbone, _ = load_backbone(checkpoint, preset, model_flags, device)
    steps, blocks = _checked_settings(backbone, config)
    size = backbone.image_size
    rgb, x0, pre = _load_image(image, size, config.preprocess)
    maps = extract_block_maps(backbone, x0, make_noise(config.seed, size), steps, blocks, precision=config.precision)
    cells = {}
    for b, t in tqdm([(b, t) for b in blocks for t in steps], desc="k-means", disable=not progress):
        cells[(b, t)] = viz.cluster_features(maps[(t, b)], k, random_state=config.seed)
    model_rgb = ((x0[0].permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
    grid = viz.kmeans_grid(model_rgb, cells, blocks, steps, k)
    viz.save_png_atomic(out, grid)
    return out
