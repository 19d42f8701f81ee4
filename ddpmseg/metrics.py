"""Confusion matrix, per-class IoU and mIoU as ddpm-segmentation reports them.

Intersections and unions are summed over all test images before dividing;
mIoU averages over every class index in ``range(K)`` except the ignore label
(background included), a class absent from both prediction and truth counting
as IoU 0. As in the reference, a pixel whose truth is the ignore label still
counts in the union of the class it is predicted as (the reference scores
``(pred == c) | (gt == c)`` over every pixel); it never adds an intersection.
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np

from ddpmseg.errors import DdpmsegError


def _as_labels(a: Any, what: str) -> np.ndarray:
    arr = np.asarray(a)
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)):
            raise DdpmsegError(f"{what} must hold whole-number labels; pass an integer label map")
    elif arr.dtype.kind not in "iub":
        raise DdpmsegError(f"{what} must be an integer label map, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def confusion_matrix(pred: Any, truth: Any, n_classes: int, ignore_index: int | None = 255) -> np.ndarray:
    """(K, K) int64 counts, rows = truth, columns = prediction; truth == ignore_index is skipped."""
    if n_classes < 1:
        raise DdpmsegError(f"n_classes={n_classes} must be at least 1")
    p, t = _as_labels(pred, "prediction"), _as_labels(truth, "truth")
    if p.shape != t.shape:
        raise DdpmsegError(f"prediction shape {p.shape} differs from truth shape {t.shape}; predict at the mask's size")
    if ignore_index is not None and not 0 <= ignore_index < n_classes:
        valid = t != ignore_index
        p, t = p[valid], t[valid]
    else:
        p, t = p.reshape(-1), t.reshape(-1)
    k = n_classes
    for arr, what in ((p, "prediction"), (t, "truth")):
        bad = arr[(arr < 0) | (arr >= k)]
        if bad.size:
            extra = "" if what == "prediction" or ignore_index is None else f" or the ignore label {ignore_index}"
            raise DdpmsegError(f"{what} holds label {int(bad[0])} outside 0..{k - 1}{extra}; check n_classes and the label maps")
    return np.bincount(t * k + p, minlength=k * k).reshape(k, k).astype(np.int64)


def predictions_on_ignored(pred: Any, truth: Any, n_classes: int, ignore_index: int | None = 255) -> np.ndarray:
    """(K,) counts of each predicted class on pixels whose truth is an out-of-range ignore label."""
    if ignore_index is None or 0 <= ignore_index < n_classes:
        return np.zeros(n_classes, dtype=np.int64)  # such pixels are in the confusion matrix already
    p = _as_labels(pred, "prediction")[_as_labels(truth, "truth") == ignore_index]
    return np.bincount(p[(p >= 0) & (p < n_classes)], minlength=n_classes).astype(np.int64)


def iou_from_confusion(
    cm: np.ndarray, ignore_index: int | None = None, ignored_pred: np.ndarray | None = None
) -> np.ndarray:
    """Per-class IoU (K,) float64: diag / (row + column - diag), 0 where the union is empty.

    ``ignored_pred`` (from ``predictions_on_ignored``) adds the predictions on
    ignore-label pixels to the unions, as the reference does. If
    ``ignore_index`` is a class index, that entry is NaN (it is not scored).
    """
    cm = np.asarray(cm, dtype=np.float64)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise DdpmsegError(f"confusion matrix must be square (K, K), got shape {cm.shape}")
    inter = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - inter
    if ignored_pred is not None:
        union = union + np.asarray(ignored_pred, dtype=np.float64)
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    if ignore_index is not None and 0 <= ignore_index < len(iou):
        iou[ignore_index] = np.nan
    return iou


def scored_classes(n_classes: int, ignore_index: int | None = 255) -> list[int]:
    """The class indices mIoU averages over: range(K) without the ignore label."""
    return [c for c in range(n_classes) if c != ignore_index]


def present_miou(cm: np.ndarray, ignore_index: int | None = 255, ignored_pred: np.ndarray | None = None) -> float:
    """Mean IoU over the classes present in the truth or the prediction (non-empty union), the ignore
    label left out: one image's score (absent classes would count 0 in :func:`mean_iou`)."""
    cm = np.asarray(cm, dtype=np.float64)
    iou = iou_from_confusion(cm, ignored_pred=ignored_pred)
    union = cm.sum(0) + cm.sum(1) - np.diag(cm) + (0 if ignored_pred is None else np.asarray(ignored_pred))
    classes = [c for c in scored_classes(len(iou), ignore_index) if union[c] > 0]
    return float(iou[classes].mean()) if classes else float("nan")


IMAGE_UNCERTAINTY_FRACTION = 0.10  # the reference's image score: the top 10 % of the pixel map


def image_uncertainty(pixel_map: Any) -> float:
    """The reference's uncertainty of one image (``generate_dataset.py``): the mean of the top 10 % of its
    pixels' scores (ensemble mutual information / JS score, or a student's entropy)."""
    return top_mean(pixel_map, IMAGE_UNCERTAINTY_FRACTION)


def top_mean(values: Any, fraction: float) -> float:
    """The mean of the ``fraction`` highest values (at least one): the reference's per-image uncertainty
    (top 10 % of the pixel map), heal's anomaly score (top 20 %)."""
    flat = np.sort(np.asarray(values, dtype=np.float64).reshape(-1))
    if flat.size == 0:
        raise DdpmsegError("an empty map has no score")
    return float(flat[-max(1, int(round(fraction * flat.size))):].mean())


def mean_iou(cm: np.ndarray, ignore_index: int | None = 255, ignored_pred: np.ndarray | None = None) -> float:
    """Mean IoU over range(K) except the ignore label (if it is a class index); absent classes count 0."""
    iou = iou_from_confusion(cm, ignored_pred=ignored_pred)
    classes = scored_classes(len(iou), ignore_index)
    if not classes:
        raise DdpmsegError(f"no class left to score: the only class is the ignore label {ignore_index}")
    return float(iou[classes].mean())


class SegmentationScore:
    """Accumulates a confusion matrix over images; ``result()`` gives mIoU and per-class IoU."""

    def __init__(self, n_classes: int, ignore_index: int | None = 255) -> None:
        self.n_classes = n_classes
        self.ignore_index = ignore_index
        self.confusion = np.zeros((n_classes, n_classes), dtype=np.int64)
        self.ignored_pred = np.zeros(n_classes, dtype=np.int64)
        self.n_images = 0

    def update(self, pred: Any, truth: Any) -> "SegmentationScore":
        """Add one image's prediction and truth (same shape)."""
        self.confusion += confusion_matrix(pred, truth, self.n_classes, self.ignore_index)
        self.ignored_pred += predictions_on_ignored(pred, truth, self.n_classes, self.ignore_index)
        self.n_images += 1
        return self

    def result(self) -> dict[str, Any]:
        """``miou`` (float), ``per_class`` (K floats, NaN for an ignored class index), ``confusion``, ``n_images``."""
        return {
            "miou": mean_iou(self.confusion, self.ignore_index, self.ignored_pred),
            "per_class": [float(v) for v in iou_from_confusion(self.confusion, self.ignore_index, self.ignored_pred)],
            "confusion": self.confusion.copy(),
            "n_images": self.n_images,
        }


def evaluate_masks(
    preds: Iterable[Any], truths: Iterable[Any], n_classes: int, ignore_index: int | None = 255
) -> dict[str, Any]:
    """Score predicted label maps against truths, summing intersections and unions over images.

    Returns ``dict(miou=float, per_class=list[float], confusion=(K, K) int64, n_images=int)``.
    """
    score = SegmentationScore(n_classes, ignore_index)
    sentinel = object()
    p_iter, t_iter = iter(preds), iter(truths)
    i = 0
    while True:
        p, t = next(p_iter, sentinel), next(t_iter, sentinel)
        if p is sentinel and t is sentinel:
            break
        if p is sentinel or t is sentinel:
            raise DdpmsegError(f"got a different number of predictions and truths (mismatch at image {i}); pair them one to one")
        try:
            score.update(p, t)
        except DdpmsegError as e:
            raise DdpmsegError(f"image {i}: {e}") from None
        i += 1
    if i == 0:
        raise DdpmsegError("no image to evaluate; give at least one prediction and truth")
    return score.result()


class Calibration:
    """Expected calibration error of top-1 confidences, streamed: a running count, confidence sum and
    hit count per equal-width bin (no per-pixel state, so any number of dense maps fits in memory).

    ``update(probs, truth)``: ``probs`` (K, ...) class probabilities, ``truth`` (...) labels; pixels
    whose truth is ``ignore_index`` (or outside 0..K-1) are skipped. ECE = sum over bins of
    (bin count / total) x |accuracy - mean confidence| (Guo et al. 2017; 15 bins as torchmetrics).
    """

    def __init__(self, n_bins: int = 15, ignore_index: int | None = 255) -> None:
        if n_bins < 1:
            raise DdpmsegError(f"n_bins={n_bins} must be at least 1")
        self.n_bins, self.ignore_index = n_bins, ignore_index
        self.count = np.zeros(n_bins, dtype=np.int64)
        self.confidence = np.zeros(n_bins, dtype=np.float64)
        self.hits = np.zeros(n_bins, dtype=np.int64)

    def update(self, probs: Any, truth: Any) -> "Calibration":
        p = np.asarray(probs, dtype=np.float64)
        t = _as_labels(truth, "truth")
        if p.shape[1:] != t.shape:
            raise DdpmsegError(f"probabilities of shape {p.shape} do not match truth of shape {t.shape}; "
                               "give (K, ...) probabilities for (...) labels")
        p, t = p.reshape(p.shape[0], -1), t.reshape(-1)
        valid = (t >= 0) & (t < p.shape[0])
        if self.ignore_index is not None:
            valid &= t != self.ignore_index
        conf, pred = p.max(0)[valid], p.argmax(0)[valid]
        bins = np.minimum((conf * self.n_bins).astype(np.int64), self.n_bins - 1)  # (lo, hi] edges but 0 -> bin 0
        self.count += np.bincount(bins, minlength=self.n_bins)
        self.confidence += np.bincount(bins, weights=conf, minlength=self.n_bins)
        self.hits += np.bincount(bins, weights=(pred == t[valid]), minlength=self.n_bins).astype(np.int64)
        return self

    def bins(self) -> dict[str, np.ndarray]:
        """Per bin: ``count``, ``confidence`` (mean) and ``accuracy`` (NaN for an empty bin), and its ``edges``."""
        n = np.maximum(self.count, 1)
        empty = self.count == 0
        return {
            "edges": np.linspace(0, 1, self.n_bins + 1),
            "count": self.count.copy(),
            "confidence": np.where(empty, np.nan, self.confidence / n),
            "accuracy": np.where(empty, np.nan, self.hits / n),
        }

    def ece(self) -> float:
        total = self.count.sum()
        if total == 0:
            raise DdpmsegError("no labelled pixel was given to the calibration; check the masks")
        return float(np.abs(self.hits - self.confidence).sum() / total)
