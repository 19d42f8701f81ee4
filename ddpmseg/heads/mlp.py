"""The paper's pixel classifier as a head: an ensemble of MLPs on per-pixel diffusion features.

    est = PixelEnsemble(n_classes=34, random_state=0).fit(X, y)   # X: ImageMaps, an (N, D) array or a PixelSource
    est.predict(X)              # (N,) majority vote of the members' argmax (ties: smallest label)
    est.predict_proba(X)        # (N, K) mean softmax
    est.uncertainty(X)          # (N,) entropy of the mean softmax - mean member entropy
    est.predict_block_maps(maps, keys, size)   # one image from its native-resolution block maps

``fit --head mlp`` (the default) builds it from :class:`MLPConfig`. Members and
their stacking: :mod:`ddpmseg.classify.members`; the recipes and the training
loop: :mod:`ddpmseg.classify.training`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.base import BaseEstimator

from ddpmseg._text import plural
from ddpmseg.classify.members import StackedMLP, default_hidden
from ddpmseg.classify.training import RECIPES, REFERENCE_BATCH, REFERENCE_LR, train_members
from ddpmseg.errors import DdpmsegError
from ddpmseg.features.pixels import CachePixels, PixelSource, as_pixel_source, layer1_by_resolution
from ddpmseg.heads._base import HeadSpec, ImageMaps, NotFittedError, Segmentation, check_config
from ddpmseg.heads._uncertainty import mutual_information
from ddpmseg.options import DEFAULT_RECIPE, LAYER1_PRECISIONS, RECIPES as RECIPE_HELP

log = logging.getLogger(__name__)

STATE_FORMAT = "ddpmseg-pixel-ensemble"
STATE_VERSION = 1  # states saved before ``recipe`` / ``pixel_fraction`` / ``precision`` load as the reference recipe
PREDICT_CHUNK = 65536  # rows per prediction chunk, at most ...
PREDICT_CHUNK_BYTES = 256 << 20  # ... and at most this many bytes of float32 features


@dataclass(frozen=True)
class MLPConfig:
    """The MLP ensemble's options (``fit --head mlp --head-option key=value``; model.json's ``fit.head_config``)."""

    n_members: int = field(default=10, metadata={"help": "MLPs in the ensemble (the paper: 10)"})
    recipe: str = field(default=DEFAULT_RECIPE, metadata={
        "help": "; ".join(f"{k}: {v}" for k, v in RECIPE_HELP.items())})
    max_epochs: int = field(default=100, metadata={"help": "epoch cap (tiles stops by its own budget: 16 epochs, "
                                                           "at most 2,000 steps)"})
    pixel_fraction: float = field(default=1.0, metadata={"help": "fraction of the labelled pixels (tiles: of the "
                                                                 "labelled tiles) visited per epoch"})
    batch_size: Optional[int] = field(default=None, metadata={"help": "pixels (tiles: tile pixels) per step; none: "
                                                                      "the recipe's (64 / 1024 / 1024)"})
    lr: Optional[float] = field(default=None, metadata={"help": "Adam learning rate; none: the recipe's "
                                                                "(1e-3 / 4e-3 / 2e-3)"})
    precision: str = field(default="auto", metadata={"help": "layer 1 of the shared-batch recipes: auto (bf16 where "
                                                             "the device has fast bf16 kernels), fp32, bf16"})

    def __post_init__(self) -> None:
        check_config([
            (self.n_members >= 1, f"n_members {self.n_members} must be at least 1"),
            (self.recipe in RECIPES, f"recipe {self.recipe!r} is unknown: use one of {', '.join(RECIPES)}"),
            (self.max_epochs >= 1, f"max_epochs {self.max_epochs} must be at least 1"),
            (0 < self.pixel_fraction <= 1, f"pixel_fraction {self.pixel_fraction} must be in (0, 1]"),
            (self.batch_size is None or self.batch_size >= 2, f"batch_size {self.batch_size} must be at least 2"),
            (self.lr is None or self.lr > 0, f"lr {self.lr} must be positive"),
            (self.precision in LAYER1_PRECISIONS, f"precision {self.precision!r}: use one of "
                                                  f"{', '.join(LAYER1_PRECISIONS)}"),
        ], "mlp")


def resolve_precision(precision: str, recipe: str, device: torch.device) -> torch.dtype:
    """Layer 1's GEMM dtype: fp32 for the per-member (reference) recipe; for a shared-batch one bf16 if
    asked, or with ``"auto"`` where the device has bf16 matmul kernels (oneDNN on CPU, bf16-capable CUDA)."""
    if not RECIPES[recipe].shared_batch or precision == "fp32":
        return torch.float32
    if precision == "bf16":
        return torch.bfloat16
    try:
        if device.type == "cuda":
            ok = torch.cuda.is_bf16_supported()
        else:
            ok = device.type == "cpu" and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # older torch without the probe
        ok = False
    return torch.bfloat16 if ok else torch.float32



def vote(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Majority label and uncertainty of member logits (M, N, K).

    Label: the most frequent member argmax (ties go to the smallest label).
    Uncertainty: entropy of the mean softmax minus the mean member entropy
    (clamped at 0 against rounding).
    """
    m, n, k = logits.shape
    top = logits.argmax(-1)  # (M, N)
    counts = torch.zeros((n, k), dtype=torch.int64, device=logits.device)
    counts.scatter_add_(1, top.T, torch.ones_like(top.T))
    labels = counts.argmax(1)  # first maximum = smallest label
    return labels, _uncertainty(logits)


def _uncertainty(logits: torch.Tensor) -> torch.Tensor:
    logp = F.log_softmax(logits.float(), dim=-1)
    return mutual_information(logp.exp(), -1, log_probs=logp)


class PixelEnsemble(BaseEstimator):
    """The ddpm-segmentation pixel classifier as a scikit-learn-style estimator.

    ``fit(X, y)`` takes an (N, D) array/tensor or a streaming
    :class:`~ddpmseg.features.pixels.PixelSource` and (N,) integer labels;
    pixels labelled ``ignore_index`` are dropped.

    ``recipe``: ``"reference"`` (the paper's, exactly), ``"fast"`` (shared
    batches) or ``"tiles"`` (shared batches of image tiles, layer 1 at the
    block maps' native resolution; needs a
    :class:`~ddpmseg.features.pixels.CachePixels`, and is what ``ddpmseg fit``
    uses by default); see :mod:`ddpmseg.classify.training`. ``batch_size`` /
    ``lr`` default to the recipe's (64 / 1e-3; fast 1024 / 4e-3; tiles 1024 / 2e-3). ``patience`` is in
    batches of 64 pixels (the fast recipe counts it in pixels; tiles stops by
    its own budget, ``max_epochs`` still caps it).
    ``pixel_fraction``: each epoch visits this fraction of the labelled
    pixels, a fresh random subset each epoch (1.0 = all, the reference).
    ``precision``: layer 1's GEMMs in the fast recipe (``"auto"``: bf16 where
    the device has fast bf16 kernels).
    """

    def __init__(
        self,
        n_classes: int | None = None,
        n_members: int = 10,
        hidden: tuple[int, int] | None = None,
        lr: float | None = None,
        batch_size: int | None = None,
        max_epochs: int = 100,
        patience: int = 50,
        min_epochs: int = 4,
        ignore_index: int = 255,
        random_state: int | None = 0,
        device: str = "cpu",
        progress: bool = False,
        recipe: str = "reference",
        pixel_fraction: float = 1.0,
        precision: str = "auto",
    ) -> None:
        self.n_classes = n_classes
        self.n_members = n_members
        self.hidden = hidden
        self.lr = lr
        self.batch_size = batch_size
        self.max_epochs = max_epochs
        self.patience = patience
        self.min_epochs = min_epochs
        self.ignore_index = ignore_index
        self.random_state = random_state
        self.device = device
        self.progress = progress
        self.recipe = recipe
        self.pixel_fraction = pixel_fraction
        self.precision = precision

    # -- fitting ------------------------------------------------------------------------
    def fit(self, X: Any, y: Any) -> "PixelEnsemble":
        """Train the ensemble on pixels ``X`` with labels ``y``; returns self.

        ``X``: an :class:`~ddpmseg.heads.ImageMaps` (every head's input; ``y`` then holds one (S, S)
        label map per image), an (N, D) array or a :class:`~ddpmseg.features.pixels.PixelSource`
        (``y``: N labels)."""
        self._check_hyperparameters()
        if isinstance(X, ImageMaps):
            if len(y) != len(X):
                raise DdpmsegError(f"got {len(X)} images' maps and {len(y)} label maps; give one each")
            X, y = CachePixels(X.maps, X.keys, X.size), np.concatenate([np.asarray(m).reshape(-1) for m in y])
        source = as_pixel_source(X)
        labels = self._check_labels(y, len(source))
        keep = np.flatnonzero(labels != self.ignore_index)
        if keep.size < 2:
            raise DdpmsegError(
                f"only {keep.size} labelled pixel(s) left after dropping the ignore label {self.ignore_index}; "
                "give masks with at least two labelled pixels"
            )
        kept = labels[keep]
        if kept.min() < 0:
            raise DdpmsegError(
                f"label {int(kept.min())} is negative: labels must be in 0..n_classes-1 or the ignore label "
                f"{self.ignore_index}; fix the masks or set ignore_index"
            )
        n_classes = int(self.n_classes) if self.n_classes is not None else int(kept.max()) + 1
        if kept.max() >= n_classes:
            raise DdpmsegError(
                f"label {int(kept.max())} is out of range: labels must be in 0..{n_classes - 1} or the ignore label "
                f"{self.ignore_index}; fix the masks or raise n_classes"
            )
        hidden = tuple(int(h) for h in self.hidden) if self.hidden is not None else default_hidden(n_classes)
        device = torch.device(self.device)
        d = int(source.n_features)

        module = StackedMLP(self.n_members, d, hidden, n_classes).to(device)
        recipe = RECIPES[self.recipe]
        self.batch_size_ = int(self.batch_size or recipe.batch_size)
        self.lr_ = float(self.lr or recipe.lr)
        self.precision_ = "bf16" if resolve_precision(self.precision, self.recipe, device) == torch.bfloat16 else "fp32"
        log.info(
            "fitting %d members on %d pixels x %d features, %d classes, hidden %s (%s recipe, batch %d, lr %g)",
            self.n_members, keep.size, d, n_classes, hidden, self.recipe, self.batch_size_, self.lr_,
        )
        n_iter, final, best, curves, pixels = train_members(
            module,
            source,
            torch.from_numpy(keep).long(),
            torch.from_numpy(kept).long(),
            recipe=recipe,
            random_state=self.random_state,
            batch_size=self.batch_size_,
            lr=self.lr_,
            low_precision=self.precision_ == "bf16",
            max_epochs=self.max_epochs,
            patience=self.patience,
            min_epochs=self.min_epochs,
            n_epoch=self._epoch_pixels(keep.size),
            device=device,
            progress=self.progress,
            pixel_fraction=self.pixel_fraction,
        )

        self.n_classes_ = n_classes
        self.n_features_in_ = d
        self.hidden_ = hidden
        self.n_iter_ = n_iter
        self.pixels_seen_ = pixels
        self.final_loss_ = final
        self.best_loss_ = best
        self.loss_curve_ = curves
        self.classes_ = np.arange(n_classes)
        self.module_ = module.eval()
        return self

    def _check_hyperparameters(self) -> None:
        checks = [
            (self.n_members >= 1, f"n_members={self.n_members} must be at least 1"),
            (
                self.batch_size is None or self.batch_size >= 2,
                f"batch_size={self.batch_size} must be at least 2 (BatchNorm needs two samples) or None",
            ),
            (self.max_epochs >= 1, f"max_epochs={self.max_epochs} must be at least 1"),
            (self.lr is None or self.lr > 0, f"lr={self.lr} must be positive or None"),
            (self.recipe in RECIPES, f"recipe={self.recipe!r} is unknown: use one of {', '.join(RECIPES)}"),
            (
                isinstance(self.pixel_fraction, (int, float)) and 0 < self.pixel_fraction <= 1,
                f"pixel_fraction={self.pixel_fraction} must be in (0, 1]",
            ),
            (self.precision in LAYER1_PRECISIONS, f"precision={self.precision!r} is unknown: use 'auto', 'fp32' or 'bf16'"),
            (
                self.recipe not in RECIPES or RECIPES[self.recipe].shared_batch or self.precision != "bf16",
                "precision='bf16' applies to the shared-batch recipes (fast, tiles) only: use precision='auto' or "
                "'fp32' with the reference",
            ),
            (self.n_classes is None or self.n_classes >= 1, f"n_classes={self.n_classes} must be at least 1 or None"),
            (
                self.hidden is None or (len(self.hidden) == 2 and all(int(h) >= 1 for h in self.hidden)),
                f"hidden={self.hidden} must be two positive widths or None",
            ),
        ]
        for ok, msg in checks:
            if not ok:
                raise DdpmsegError(f"{msg}; fix the PixelEnsemble argument")

    @staticmethod
    def _check_labels(y: Any, n: int) -> np.ndarray:
        labels = np.asarray(y.detach().cpu() if isinstance(y, torch.Tensor) else y).reshape(-1)
        if labels.size != n:
            raise DdpmsegError(f"got {labels.size} labels for {n} pixels; give one label per pixel")
        if labels.dtype.kind == "f":
            if not np.all(np.isfinite(labels)) or np.any(labels != np.round(labels)):
                raise DdpmsegError("labels must be whole numbers; pass an integer label array")
        elif labels.dtype.kind not in "iub":
            raise DdpmsegError(f"labels must be integers, got dtype {labels.dtype}; pass an integer label array")
        return labels.astype(np.int64)

    def _epoch_pixels(self, n: int) -> int:
        """Pixels visited per epoch: ``pixel_fraction`` of the ``n`` labelled ones (at least 2)."""
        return n if self.pixel_fraction >= 1 else min(n, max(2, round(self.pixel_fraction * n)))

    # -- prediction ---------------------------------------------------------------------
    def __sklearn_is_fitted__(self) -> bool:
        return hasattr(self, "module_")

    def _check_fitted(self) -> None:
        if not hasattr(self, "module_"):
            raise NotFittedError("This PixelEnsemble is not fitted yet: call fit(X, y) first.")

    def _source(self, X: Any) -> PixelSource:
        self._check_fitted()
        source = as_pixel_source(X)
        if int(source.n_features) != self.n_features_in_:
            raise DdpmsegError(
                f"X has {source.n_features} features but this PixelEnsemble was fitted on {self.n_features_in_}; "
                "pass features extracted with the same settings"
            )
        return source

    def _iter_logits(self, X: Any, chunk: int | None = None) -> Iterator[torch.Tensor]:
        """Member logits (M, n, K) chunk by chunk (bounded by ``PREDICT_CHUNK`` rows and ``PREDICT_CHUNK_BYTES``)."""
        source = self._source(X)
        chunk = chunk or min(PREDICT_CHUNK, max(1, PREDICT_CHUNK_BYTES // (4 * max(1, self.n_features_in_))))
        device = self.module_.w1.device
        self.module_.eval()
        n = len(source)
        with torch.inference_mode():
            for lo in range(0, n, chunk):
                idx = torch.arange(lo, min(n, lo + chunk), dtype=torch.long)
                x = source.gather(idx).to(device=device, dtype=torch.float32)
                yield self.module_(x)

    def predict_member_logits(self, X: Any) -> torch.Tensor:
        """Every member's logits, (M, N, K) float32 on the CPU."""
        parts = [z.cpu() for z in self._iter_logits(X)]
        if not parts:
            return torch.zeros((self.n_members_, 0, self.n_classes_))
        return torch.cat(parts, dim=1)

    def predict_proba(self, X: Any) -> np.ndarray:
        """Mean of the members' softmax, (N, K) float32; rows sum to 1."""
        parts = [torch.softmax(z.float(), dim=-1).mean(0).cpu() for z in self._iter_logits(X)]
        return torch.cat(parts).numpy() if parts else np.zeros((0, self.n_classes_), np.float32)

    def predict(self, X: Any) -> np.ndarray:
        """Majority vote of the members' argmax, (N,) int64; ties go to the smallest label."""
        parts = [vote(z)[0].cpu() for z in self._iter_logits(X)]
        return torch.cat(parts).numpy() if parts else np.zeros(0, np.int64)

    def uncertainty(self, X: Any) -> np.ndarray:
        """Entropy of the mean softmax minus the mean member entropy, (N,) float32, >= 0."""
        parts = [_uncertainty(z).cpu() for z in self._iter_logits(X)]
        return torch.cat(parts).numpy() if parts else np.zeros(0, np.float32)

    @torch.inference_mode()
    def predict_block_maps(
        self,
        maps: Mapping[tuple[int, int], np.ndarray | torch.Tensor],
        keys: Sequence[tuple[int, int]],
        size: int,
        chunk: int = 16384,
    ) -> Segmentation:
        """Labels and uncertainty of every pixel of one image from its native block maps.

        Layer 1 is linear and bilinear upsampling is linear with weights
        summing to one, so W·up(F) + b = up(W·F) + b: layer 1 runs at each
        map's native resolution and only its (members x hidden) outputs are
        upsampled to ``size``, never the C-channel pixel features. Maps of the
        same native resolution are summed before the one upsampling of that
        resolution. ``keys`` gives the (t, block) order of the features.
        """
        self._check_fitted()
        module = self.module_.eval()
        weight, bias = module.w1, module.b1  # (M, D, H1), (M, H1)
        m, d, h1 = weight.shape
        per_res = layer1_by_resolution(maps, keys, weight.permute(1, 0, 2).reshape(d, m * h1))
        hidden = torch.zeros((m * h1, size, size), dtype=torch.float32, device=weight.device)
        for (h, w), z in per_res.items():
            hidden += F.interpolate(z.reshape(1, m * h1, h, w), size=(size, size), mode="bilinear", align_corners=False)[0]
        hidden = hidden.reshape(m, h1, size * size).transpose(1, 2) + bias[:, None, :]
        labels, unc, proba = [], [], []
        for start in range(0, size * size, chunk):
            logits = module.head(hidden[:, start : start + chunk])
            lab, u = vote(logits)
            labels.append(lab)
            unc.append(u)
            proba.append(logits.float().softmax(-1).mean(0))
        return Segmentation(
            labels=torch.cat(labels).reshape(size, size).cpu().numpy(),
            uncertainty=torch.cat(unc).reshape(size, size).float().cpu().numpy(),
            proba=torch.cat(proba).T.reshape(-1, size, size).cpu().numpy(),
        )

    @property
    def n_members_(self) -> int:
        self._check_fitted()
        return self.module_.n_members

    def to(self, device: str | torch.device) -> "PixelEnsemble":
        """Move the fitted module to ``device``; returns self."""
        self._check_fitted()
        self.module_.to(torch.device(device))
        return self

    # -- persistence --------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to rebuild the fitted estimator; safe for ``torch.load(weights_only=True)``."""
        self._check_fitted()
        params = self.get_params(deep=False)
        if params["hidden"] is not None:
            params["hidden"] = [int(h) for h in params["hidden"]]
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "params": params,
            "n_classes_": int(self.n_classes_),
            "n_features_in_": int(self.n_features_in_),
            "n_members_": int(self.module_.n_members),
            "hidden_": [int(h) for h in self.hidden_],
            "n_iter_": [int(v) for v in self.n_iter_],
            "pixels_seen_": [int(v) for v in self.pixels_seen_],
            "final_loss_": [float(v) for v in self.final_loss_],
            "best_loss_": [float(v) for v in self.best_loss_],
            "loss_curve_": [[float(v) for v in c] for c in self.loss_curve_],
            "batch_size_": int(self.batch_size_),
            "lr_": float(self.lr_),
            "precision_": self.precision_,
            "module": {k: v.detach().cpu().clone() for k, v in self.module_.state_dict().items()},
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], device: str | torch.device = "cpu", **params: Any) -> "PixelEnsemble":
        """Rebuild a fitted estimator from :meth:`state_dict` (module placed on ``device``); ``params``
        (e.g. a model folder's settings) override the hyperparameters saved in the state."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise DdpmsegError("not a PixelEnsemble state dict; pass what PixelEnsemble.state_dict() returned")
        if state.get("version", 0) > STATE_VERSION:
            raise DdpmsegError(
                f"PixelEnsemble state version {state['version']} is newer than this ddpmseg supports; upgrade ddpmseg"
            )
        known = set(cls().get_params())
        try:
            saved = {k: v for k, v in state["params"].items() if k in known}  # 0.1.0's "fused" switch is gone
            saved.setdefault("recipe", "reference")  # saved before the fast recipe existed
            params = {**saved, **{k: v for k, v in params.items() if k in known}, "device": str(device)}
            if params.get("hidden") is not None:
                params["hidden"] = tuple(params["hidden"])
            est = cls(**params)
            hidden = tuple(int(h) for h in state["hidden_"])
            module = StackedMLP(int(state["n_members_"]), int(state["n_features_in_"]), hidden, int(state["n_classes_"]))
            module.load_state_dict(state["module"])
            n_iter = list(state["n_iter_"])
        except KeyError as e:
            raise DdpmsegError(f"PixelEnsemble state lacks {e}; it is damaged: fit the model again") from None
        except RuntimeError as e:  # load_state_dict: missing, unexpected or mis-shaped tensors
            raise DdpmsegError(f"PixelEnsemble state does not fit its own shapes ({str(e).splitlines()[0]}); fit again") from None
        est.n_classes_ = int(state["n_classes_"])
        est.n_features_in_ = int(state["n_features_in_"])
        est.hidden_ = hidden
        est.n_iter_ = n_iter
        est.pixels_seen_ = [int(v) for v in state.get("pixels_seen_", [])]
        est.final_loss_ = list(state.get("final_loss_", []))
        est.best_loss_ = list(state.get("best_loss_", []))
        est.loss_curve_ = [list(c) for c in state.get("loss_curve_", [])]
        est.batch_size_ = int(state.get("batch_size_", saved.get("batch_size") or REFERENCE_BATCH))
        est.lr_ = float(state.get("lr_", saved.get("lr") or REFERENCE_LR))
        est.precision_ = str(state.get("precision_", "fp32"))
        est.classes_ = np.arange(est.n_classes_)
        est.module_ = module.to(torch.device(device)).eval()
        return est

    def describe(self) -> str:
        """One line on the fit: recipe, epochs, steps and pixels per member, final loss."""
        self._check_fitted()
        lo, hi = min(self.n_iter_), max(self.n_iter_)
        steps = f"{lo:,}-{hi:,}" if lo != hi else f"{lo:,}"
        epochs = max((len(c) for c in self.loss_curve_), default=0)
        pixels = max(self.pixels_seen_, default=0)
        return (f"{self.recipe} recipe: {plural(epochs, 'epoch')}, {steps} steps and {pixels / 1e6:.2f} M pixels per "
                f"member, final loss {float(np.mean(self.final_loss_)):.3f} (the members' mean last batch loss)")


HEAD = HeadSpec("mlp", "the paper's ensemble of pixel MLPs (the default)", MLPConfig, PixelEnsemble, state_key="ensemble")
