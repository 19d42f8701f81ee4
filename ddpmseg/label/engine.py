"""The model behind `ddpmseg label`'s Predict: features (a given cache, or extracted on demand from a
checkpoint into LABELS/.ddpmseg-label/features/), a fit of the head on every label saved so far
(:func:`ddpmseg.pipeline.fit_model` on LABELS/, unlabelled pixels ignored) when the labels changed, and
predictions from the cached features (no second pass through the diffusion model).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ddpmseg import data, viz
from ddpmseg.errors import DdpmsegError
from ddpmseg.label.store import LabelStore
from ddpmseg.records import ExtractConfig

log = logging.getLogger(__name__)

# A fit on strokes: the MLP ensemble with fewer members and a short budget, so Predict answers in seconds
# (benchmarks/bench_label.py measures it against the full recipe).
LABEL_FIT_OPTIONS: dict[str, Any] = {"n_members": 4, "recipe": "fast", "max_epochs": 8}


@dataclass
class Progress:
    """What the page shows while Predict runs (GET /api/status)."""

    busy: bool = False
    phase: str = ""
    started: float = 0.0
    fits: int = 0
    last_fit_seconds: float = float("nan")
    error: str = ""

    def to_dict(self) -> dict[str, Any]:
        elapsed = time.perf_counter() - self.started if self.busy else 0.0
        last = None if np.isnan(self.last_fit_seconds) else round(self.last_fit_seconds, 3)
        return {"busy": self.busy, "phase": self.phase, "elapsed": round(elapsed, 2), "fits": self.fits,
                "last_fit_seconds": last, "error": self.error}


@dataclass
class Prediction:
    labels: np.ndarray  # (H, W) uint8 at the image's size, 255 outside what the model saw
    uncertainty: np.ndarray  # (H, W) float32, nats
    score: float  # the image's uncertainty score (what suggest ranks by)
    seconds: float
    fitted: bool  # whether this call fitted the model


@dataclass
class Labeller:
    """Features, fits and predictions for a :class:`LabelStore` (one request at a time: a lock)."""

    store: LabelStore
    classes: str  # the label set as fit takes it (a CSV path or a shipped name)
    features: Path | None = None
    checkpoint: Path | None = None
    backbone_args: Mapping[str, Any] = field(default_factory=dict)
    extract: ExtractConfig = ExtractConfig()
    fit_options: Mapping[str, Any] = field(default_factory=lambda: dict(LABEL_FIT_OPTIONS))
    device: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        if (self.features is None) == (self.checkpoint is None):
            raise DdpmsegError("give the features: --features CACHE (extracted already) or --ckpt CKPT (extracted "
                               "on demand), one of the two")
        self.progress = Progress()
        self._lock = threading.Lock()
        self._waiting = 0  # Predicts waiting for the lock (the background ranking gives way to them)
        self._extractor = None
        self._model = None
        self._fitted_digest: str | None = None
        self.scores: dict[str, float] = {}  # image -> uncertainty score of its last prediction
        if self.features is not None:
            self._check_cache()

    def warm_up(self) -> None:
        """Import what the first fit needs (scikit-learn, torch's optimisers: ~9 s on a slow CPU), so the
        first Predict does not pay for it; the server runs this in a thread as it starts."""
        import torch

        import ddpmseg.model  # noqa: F401
        import ddpmseg.pipeline  # noqa: F401

        torch.optim.Adam([torch.zeros(1, requires_grad=True)])

    # -- features -----------------------------------------------------------------------------
    @property
    def cache_path(self) -> Path:
        return self.features if self.features is not None else self.store.work / "features"

    @property
    def model_dir(self) -> Path:
        return self.store.work / "model"

    def _check_cache(self) -> None:
        from ddpmseg.features.cache import FeatureCache

        if not self.features.exists():
            raise DdpmsegError(f"--features {self.features} does not exist; run `ddpmseg extract` first or give --ckpt")
        with FeatureCache(self.features) as cache:
            missing = [n for n in self.store.names if n not in cache]
        if missing:
            raise DdpmsegError(f"{len(missing)} of the images are not in --features {self.features} (e.g. {missing[0]}); "
                               "extract them first (`ddpmseg extract ... --out` the same cache) or give --ckpt instead")

    def _ensure_features(self, names: list[str]) -> None:
        if self.features is not None:
            return
        from ddpmseg.workers import Extractor

        if self._extractor is None:
            self.progress.phase = "loading the diffusion model"
            self._extractor = Extractor(self.checkpoint, self.cache_path, self.extract, device=self.device,
                                        **dict(self.backbone_args))
        todo = self._extractor.todo([self.store.entry(n).path for n in names])
        for i, (p, digest) in enumerate(todo, 1):
            self.progress.phase = f"extracting features of {p.stem} ({i}/{len(todo)})"
            self._extractor.add(p, digest)

    # -- fit and predict ----------------------------------------------------------------------
    def _fit_if_changed(self) -> bool:
        from ddpmseg.backbones import resolve_device
        from ddpmseg.model import load_model
        from ddpmseg.pipeline import fit_model

        labelled = self.store.labelled()
        if self.store.links_out():  # fit reads the whole folder: it would train on them
            raise DdpmsegError(f"label PNGs of {', '.join(self.store.links_out()[:5])} are symlinks leading out of "
                               f"{self.store.out}; remove them (or copy the masks in), then Predict")
        if not labelled:
            raise DdpmsegError("nothing is labelled yet: paint a few strokes of each class, then Predict")
        digest = self.store.label_digest()
        if digest == self._fitted_digest and self._model is not None:
            return False
        self._ensure_features(labelled)
        self.progress.phase = f"fitting on the strokes of {len(labelled)} image{'s' * (len(labelled) > 1)}"
        t0 = time.perf_counter()
        fit_model(self.cache_path, self.store.out, self.model_dir, options=self.fit_options, classes=self.classes,
                  seed=self.seed, device=self.device, overwrite=True)
        self.progress.last_fit_seconds = time.perf_counter() - t0
        self._model = load_model(self.model_dir, device=resolve_device(self.device))
        self._fitted_digest = digest
        self.progress.fits += 1
        self.scores.clear()  # the scores of an older model rank nothing
        return True

    def predict(self, name: str) -> Prediction:
        """Fit on every saved label if they changed since the last fit, then segment ``name``; the
        labels and uncertainty maps are kept in LABELS/.ddpmseg-label/predictions/."""
        self.store.entry(name)
        self._waiting += 1
        try:
            if not self._lock.acquire(timeout=600):
                raise DdpmsegError("another Predict has run for 10 minutes and still runs; wait for it")
        finally:
            self._waiting -= 1
        self.progress = Progress(True, "starting", time.perf_counter(), self.progress.fits, self.progress.last_fit_seconds)
        t0 = time.perf_counter()
        try:
            fitted = self._fit_if_changed()
            self._ensure_features([name])
            self.progress.phase = f"predicting {name}"
            labels, unc, score = self._segment(name)
            self.scores[name] = score
            self._save_prediction(name, labels, unc)
            return Prediction(labels, unc, score, time.perf_counter() - t0, fitted)
        except DdpmsegError as e:
            self.progress.error = str(e)
            raise
        except Exception as e:  # shown in the page too, not only in the server's log
            self.progress.error = f"{type(e).__name__}: {e}"
            raise
        finally:
            self.progress.busy = False
            self.progress.phase = ""
            self._lock.release()

    def _grid(self, name: str) -> tuple[Any, data.Preprocess]:
        """The model-grid segmentation of ``name`` from its cached maps, and its preprocessing record."""
        from ddpmseg.features.cache import FeatureCache

        model = self._model
        with FeatureCache(self.cache_path) as cache:
            maps, pre, size = cache.block_maps(name), data.Preprocess.from_dict(cache.preprocess(name)), cache.image_size
        return model.classifier.predict_block_maps(maps, model.keys, size), pre  # as workers.Segmenter after extraction

    def _segment(self, name: str) -> tuple[np.ndarray, np.ndarray, float]:
        from ddpmseg.active.strategies import image_scores

        seg, pre = self._grid(name)
        labels = data.restore_labels(seg.labels, pre, fill=255).astype(np.uint8)
        unc = data.restore_map(seg.uncertainty, pre, fill=0.0).astype(np.float32)
        return labels, unc, image_scores(seg.uncertainty)["uncertainty"]

    def _save_prediction(self, name: str, labels: np.ndarray, unc: np.ndarray) -> None:
        (self.store.work / "predictions").mkdir(parents=True, exist_ok=True)
        top, _ = viz.uncertainty_scale(max(2, self.store.labelset.n_classes))
        heat, _ = viz.heatmap(unc, vmax=top)
        viz.save_png_atomic(self.store.prediction_path(name, "uncertainty"), heat)
        viz.save_label_png(self.store.prediction_path(name), labels, self.store.labelset.palette())

    def suggestion(self) -> list[str]:
        """Unlabelled images by their last prediction's uncertainty, most uncertain first (suggest's
        'label this next' score; images not predicted since the last fit are not ranked)."""
        labelled = set(self.store.labelled())
        ranked = [(s, n) for n, s in list(self.scores.items()) if n not in labelled]
        return [n for _, n in sorted(ranked, key=lambda t: -t[0])]

    def rank_pool(self, limit: int = 64) -> None:
        """Score up to ``limit`` unlabelled images with features already (cheap: the head only)."""
        if self._model is None:
            return
        from ddpmseg.features.cache import FeatureCache

        if not self.cache_path.exists():
            return
        with FeatureCache(self.cache_path) as cache:
            cached = set(cache.image_ids)
        labelled = set(self.store.labelled())
        todo = [n for n in self.store.names if n in cached and n not in labelled and n not in self.scores][:limit]
        from ddpmseg.active.strategies import image_scores

        for n in todo:  # one image at a time, giving way to a Predict that waits
            if self._waiting:
                return
            with self._lock:
                self.scores[n] = image_scores(self._grid(n)[0].uncertainty)["uncertainty"]
