"""The work on one image that the pipeline's loop and the Ray workers share.

    Extractor   a backbone and a cache writer: extracts images into a feature cache
    Segmenter   a fitted model folder and its backbone: segments images, writes their PNGs
    Analysis    one image through a model (labels, uncertainty, mean softmax, at both sizes)

:mod:`ddpmseg.pipeline` (one process) and :mod:`ddpmseg.engines.ray_data` (a
Ray actor pool) both build these, so both give the same files.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ddpmseg import data, viz
from ddpmseg._io import changed_file, file_sha256, remove_stale_temps
from ddpmseg.backbones import Backbone, backbone_from_record, create_backbone, precision_dtype, resolve_device
from ddpmseg.errors import DdpmsegError
from ddpmseg.features.cache import FeatureWriter
from ddpmseg.features.extractor import extract_block_maps, make_noise
from ddpmseg.model import StudentModel, load_model
from ddpmseg.options import EXTRACT_BATCH_SIZE
from ddpmseg.records import CacheRecord, ExtractConfig

OUTPUT_KINDS = ("labels", "overlay", "uncertainty")  # the PNGs predict writes per image: NAME_<kind>.png


def checked_settings(backbone: Backbone, config: ExtractConfig) -> ExtractConfig:
    """``config`` with its steps and blocks validated for ``backbone`` (no blocks: the backbone's
    :meth:`~ddpmseg.backbones.Backbone.default_blocks`); its precision checked on the device."""
    steps = backbone.check_steps(config.steps)
    blocks = backbone.check_blocks(config.blocks or backbone.default_blocks())
    precision_dtype(config.precision, backbone.device)
    return dataclasses.replace(config, steps=tuple(steps), blocks=tuple(blocks))


def load_image(path: Path, size: int, mode: str) -> tuple[np.ndarray, torch.Tensor, data.Preprocess]:
    """The image's RGB array, its model input and the preprocessing record that maps the grid back."""
    rgb = data.load_rgb(path)
    x0, pre = data.preprocess_image(rgb, size, mode)
    return rgb, x0, pre


def cached_image(image_id: str, source: str, digest: str | None, size: int, mode: str) -> torch.Tensor:
    """The model input (3, S, S) of a cached image, read again from its source file (for a head that
    reads pixels); a file moved or changed since extraction is a one-line error."""
    path = Path(source)
    what = changed_file(path, digest)
    if what:
        what += " since extraction (sha256 differs)" if what == "has changed" else ""
        raise DdpmsegError(f"image {image_id!r}: its source {path} {what}, and this head reads the images' pixels; "
                           "put the file back or extract the features again")
    return load_image(path, size, mode)[1][0]


def _same_image(path: Path, digest: str, cached: tuple[str, str | None]) -> bool:
    """Whether ``path`` (of file digest ``digest``) is the image cached under its id."""
    source, sha = cached
    if sha is not None:
        return sha == digest
    # a 0.1.0 cache stored no digest: the same file, or a readable copy with the same content
    old = Path(source)
    return old.resolve() == path.resolve() or (old.is_file() and file_sha256(old) == digest)


class Extractor:
    """A backbone and a cache writer: what ``extract`` runs, in one process or in each Ray worker."""

    def __init__(self, checkpoint: str | Path, out: str | Path, config: ExtractConfig = ExtractConfig(), *,
                 preset: str | None = None, model_flags: str | Path | None = None, image_size: int | None = None,
                 num_head_channels: int | None = None, device: str = "auto", batch_size: int = EXTRACT_BATCH_SIZE) -> None:
        if batch_size < 0:
            raise DdpmsegError(f"--batch-size must be 0 (all timesteps at once) or positive, got {batch_size}")
        self.out, self.batch_size = Path(out), batch_size
        self.backbone = create_backbone(checkpoint, preset, model_flags, device, image_size=image_size,
                                        num_head_channels=num_head_channels)
        self.config = checked_settings(self.backbone, config)
        self.noise = make_noise(self.config.seed, self.backbone.image_size, self.config.noise_samples)
        self.writer = FeatureWriter(out, CacheRecord(self.config, self.backbone.spec, self.backbone.checkpoint), self.noise)

    def todo(self, paths: Sequence[Path]) -> list[tuple[Path, str]]:
        """(path, sha256) of the images not cached yet; an id cached for other content is an error."""
        done = self.writer.done()
        todo: list[tuple[Path, str]] = []
        for p in paths:
            digest = file_sha256(p)
            if p.stem not in done:
                todo.append((p, digest))
            elif not _same_image(p, digest, done[p.stem]):
                raise DdpmsegError(
                    f"image {p} has the id {p.stem!r} of another image in {self.out} (cached from {done[p.stem][0]}, "
                    "other content); ids are file stems: rename one of them, or extract into another --out"
                )
        return todo

    def add(self, path: Path, digest: str) -> None:
        """Extract one image into the cache (its own file, written atomically)."""
        _, x0, pre = load_image(path, self.backbone.image_size, self.config.preprocess)
        c = self.config
        maps = extract_block_maps(self.backbone, x0, self.noise, c.steps, c.blocks, self.batch_size, c.precision)
        self.writer.add(path.stem, maps, str(path.resolve()), pre.to_dict(), digest)


@dataclass
class Analysis:
    """One image through a model: ``rgb``, ``labels`` and ``uncertainty`` at the original size, the
    extraction ``seconds`` (NaN for a student), the model-grid :class:`~ddpmseg.heads.Segmentation` (labels,
    uncertainty, mean softmax) and the preprocessing record that maps the grid back."""

    rgb: np.ndarray
    labels: np.ndarray
    uncertainty: np.ndarray
    seconds: float
    grid: Any
    pre: data.Preprocess
    maps: Any = None  # the native block maps, when asked for (analyse(keep_maps=True))

    def proba(self) -> tuple[np.ndarray, np.ndarray]:
        """The mean softmax (K, H, W) at the original size, and where the model saw the image (H, W)."""
        inside = data.restore_labels(np.zeros(self.grid.labels.shape, np.int64), self.pre, fill=1) == 0
        return data.restore_map(self.grid.proba, self.pre, fill=0.0), inside


class Segmenter:
    """A model folder ready to segment image files: a teacher with its backbone, or a distilled student."""

    def __init__(self, model_dir: str | Path, checkpoint: str | Path | None = None, device: str = "auto") -> None:
        dev = resolve_device(device)
        self.model = load_model(model_dir, device=dev)
        self.is_student = isinstance(self.model, StudentModel)
        if self.is_student:
            if checkpoint is not None:
                raise DdpmsegError(f"--ckpt: {model_dir} is a distilled student, which runs without the diffusion "
                                   "model; leave --ckpt out")
            self.backbone, self.extract = None, None
        else:
            r = self.model.record
            self.backbone = backbone_from_record(r.backbone, r.checkpoint, checkpoint, dev, where=f"{model_dir}/model.json")
            self.extract = r.extract

    def analyse(self, path: Path, keep_maps: bool = False) -> "Analysis":
        """Everything predict, evaluate and suggest need of one image (see :class:`Analysis`); a student has
        no block maps (``keep_maps`` is an error) and no extraction (``seconds`` is NaN)."""
        if self.is_student:
            if keep_maps:
                raise DdpmsegError("a distilled student has no diffusion features to compare images by; "
                                   "use its teacher's model folder")
            rgb, x0, pre = load_image(path, self.model.size, self.model.preprocess)
            seg, maps, seconds = self.model.segment(x0), None, float("nan")
        else:
            size, e = self.backbone.image_size, self.extract
            rgb, x0, pre = load_image(path, size, e.preprocess)
            t0 = time.perf_counter()
            maps = extract_block_maps(self.backbone, x0, self.model.noise, e.steps, e.blocks, precision=e.precision)
            seconds = time.perf_counter() - t0
            pixels = {"image": x0[0]} if getattr(self.model.classifier, "needs_images", False) else {}
            seg = self.model.classifier.predict_block_maps(maps, self.model.keys, size, **pixels)
        labels = data.restore_labels(seg.labels, pre, fill=255)
        unc = data.restore_map(seg.uncertainty, pre, fill=0.0)
        return Analysis(rgb, labels, unc, seconds, seg, pre, maps if keep_maps else None)

    def segment(self, path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        """(rgb, labels, uncertainty) at the original size, and the extraction seconds."""
        a = self.analyse(path)
        return a.rgb, a.labels, a.uncertainty, a.seconds

    def write_outputs(self, path: Path, out: Path, legend: bool = True) -> float:
        """Segment ``path`` and write its three PNGs into ``out`` (each atomically, the labels last, so
        an image whose labels PNG exists is finished); the extraction seconds."""
        rgb, labels, unc, seconds = self.segment(path)
        labelset = self.model.labelset
        palette = labelset.palette()
        overlay = viz.overlay(rgb, labels, palette)
        top, title = viz.uncertainty_scale(max(2, labelset.n_classes))  # one scale for every image of the model
        heat, _ = viz.heatmap(unc, vmax=top)
        if legend:
            present = [c for c in range(labelset.n_classes) if (labels == c).any()]
            overlay = viz.with_legend(overlay, [labelset.names[c] for c in present], palette[present])
            heat = viz.with_colorbar(heat, top, f"{title}\nthis image: max {float(unc.max(initial=0.0)):.3g}")
        for kind in OUTPUT_KINDS:  # temp files of a writer killed on this image (a Ray worker, kill -9) go
            remove_stale_temps(out / f"{path.stem}_{kind}.png")
        viz.save_png_atomic(out / f"{path.stem}_overlay.png", overlay)
        viz.save_png_atomic(out / f"{path.stem}_uncertainty.png", heat)
        viz.save_label_png(out / f"{path.stem}_labels.png", labels, palette)
        return seconds
