"""Scores of anomaly maps against binary masks (``ddpmseg evaluate-anomaly``).

- pixel AUROC over every pixel of every image (scikit-learn's ``roc_auc_score``);
- AUPRO: the area under the per-region-overlap curve up to 30 % false-positive
  rate, divided by 0.3 (the MVTec AD convention): at each threshold, PRO is the
  mean over every connected anomaly region (8-connectivity, all images) of the
  fraction of its pixels above the threshold, FPR the fraction of normal pixels
  above it; thresholds sweep the normal pixels' quantiles;
- the best achievable Dice over thresholds (Pinaya et al.'s figure), pooled
  over all pixels of all images, and the threshold that gives it;
- image AUROC of the per-image scores (those of the folder's scores.csv, which
  ``anomaly`` writes: heal's top-20 % mean, knn's largest patch distance; the mean
  of each map's top 20 % without one), when some masks are empty (normal images)
  and some are not.

numpy, scipy and scikit-learn only: ``evaluate-anomaly`` never loads torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ddpmseg import data
from ddpmseg.anomaly.config import MAP_SUFFIX, TOP_FRACTION
from ddpmseg.errors import DdpmsegError
from ddpmseg.metrics import top_mean

MASK_NAMES = ("{}.png", "{}.npy", "{}_mask.png", "{}_mask.npy")


def image_score(anomaly: np.ndarray, fraction: float = TOP_FRACTION) -> float:
    """An image's anomaly score: the mean of its map's ``fraction`` (1 %) highest values."""
    return top_mean(anomaly, fraction)


def pixel_auroc(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> float:
    from sklearn.metrics import roc_auc_score

    y = np.concatenate([np.asarray(m, bool).ravel() for m in masks])
    if y.all() or not y.any():
        raise DdpmsegError("pixel AUROC needs both anomalous and normal pixels in the masks")
    return float(roc_auc_score(y, np.concatenate([np.asarray(a, np.float64).ravel() for a in maps])))


def _positives_per_threshold(values: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """How many of ``values`` are >= each of the ascending ``thresholds``."""
    return len(values) - np.searchsorted(np.sort(values), thresholds, side="left")


def aupro(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray], max_fpr: float = 0.3, n_thresholds: int = 400) -> float:
    from scipy.ndimage import label

    normal = np.concatenate([np.asarray(a, np.float64)[~np.asarray(m, bool)] for a, m in zip(maps, masks)])
    if normal.size == 0:
        raise DdpmsegError("AUPRO needs normal pixels; every mask pixel is anomalous")
    levels = np.linspace(1 - min(1.0, max_fpr * 1.2), 1.0, n_thresholds)
    thresholds = np.unique(np.quantile(normal, levels))
    fpr = _positives_per_threshold(normal, thresholds) / normal.size
    overlaps = []
    structure = np.ones((3, 3), dtype=bool)
    for a, m in zip(maps, masks):
        regions, n = label(np.asarray(m, bool), structure=structure)
        a = np.asarray(a, np.float64)
        for r in range(1, n + 1):
            v = a[regions == r]
            overlaps.append(_positives_per_threshold(v, thresholds) / v.size)
    if not overlaps:
        raise DdpmsegError("AUPRO needs anomalous regions; every mask is empty")
    pro = np.mean(overlaps, axis=0)
    # the curve from (0, 0), FPR ascending (thresholds descend), cut at max_fpr
    order = np.argsort(fpr, kind="stable")
    x, y = np.concatenate([[0.0], fpr[order]]), np.concatenate([[0.0], pro[order]])
    keep = x <= max_fpr
    xs, ys = x[keep], y[keep]
    if xs[-1] < max_fpr:
        xs, ys = np.append(xs, max_fpr), np.append(ys, np.interp(max_fpr, x, y))
    return float(np.trapezoid(ys, xs) / max_fpr) if hasattr(np, "trapezoid") else float(np.trapz(ys, xs) / max_fpr)


def best_dice(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray], n_thresholds: int = 1000) -> tuple[float, float]:
    """(best Dice, its threshold) over ``n_thresholds`` quantiles of all map values, pooled over pixels."""
    v = np.concatenate([np.asarray(a, np.float64).ravel() for a in maps])
    y = np.concatenate([np.asarray(m, bool).ravel() for m in masks])
    if not y.any():
        raise DdpmsegError("Dice needs anomalous pixels; every mask is empty")
    thresholds = np.unique(np.quantile(v, np.linspace(0, 1, n_thresholds)))
    predicted = _positives_per_threshold(v, thresholds)
    tp = _positives_per_threshold(v[y], thresholds)
    dice = 2 * tp / (predicted + y.sum())
    i = int(np.argmax(dice))
    return float(dice[i]), float(thresholds[i])


def image_auroc(scores: Sequence[float], anomalous: Sequence[bool]) -> float | None:
    """AUROC of per-image scores against "has an anomaly", or None when all images are of one kind."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(anomalous, bool)
    if y.all() or not y.any():
        return None
    return float(roc_auc_score(y, np.asarray(scores, np.float64)))


def read_scores(path: Path) -> dict[str, float]:
    """The image scores of an ``anomaly`` output folder's scores.csv ({} when there is none)."""
    import csv

    if not path.is_file():
        return {}
    with path.open(newline="") as f:
        try:
            return {r["image"]: float(r["score"]) for r in csv.DictReader(f)}
        except (KeyError, TypeError, ValueError):
            raise DdpmsegError(f"{path} is not an `anomaly` scores file (columns image, score); remove it or "
                               "rerun `ddpmseg anomaly`") from None


def load_binary_mask(path: Path, expected: tuple[int, int]) -> np.ndarray:
    """A mask file (PNG of any mode or .npy) as (H, W) bool: non-zero = anomaly."""
    if path.suffix == ".npy":
        try:
            m = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise DdpmsegError(f"cannot read mask {path}: {' '.join(str(e).split())}") from None
    else:
        m = np.asarray(data.open_image(path, "mask"))
    if m.ndim == 3:
        m = m.any(axis=2)
    if m.shape != expected:
        raise DdpmsegError(f"mask {path} is {m.shape[1]}x{m.shape[0]} (WxH) but its map is {expected[1]}x{expected[0]}; "
                           "give masks of the images' size")
    return m != 0


def evaluate_anomaly(maps_dir: str | Path, masks_dir: str | Path) -> dict[str, Any]:
    """Score every ``NAME_anomaly.npy`` of ``maps_dir`` against ``masks_dir``'s NAME.png / .npy
    (or NAME_mask.png / .npy); every map needs a mask (an empty one for a normal image)."""
    maps_dir, masks_dir = Path(maps_dir), Path(masks_dir)
    for d, what in ((maps_dir, "--maps"), (masks_dir, "--masks")):
        if not d.is_dir():
            raise DdpmsegError(f"{what} {d} is not a folder")
    files = sorted(maps_dir.glob(f"*{MAP_SUFFIX}"), key=lambda p: data.natural_key(p.name))
    if not files:
        raise DdpmsegError(f"no *{MAP_SUFFIX} in {maps_dir}; write them with `ddpmseg anomaly ... --save-maps`")
    names = [f.name[: -len(MAP_SUFFIX)] for f in files]
    found = {n: next((masks_dir / p.format(n) for p in MASK_NAMES if (masks_dir / p.format(n)).is_file()), None)
             for n in names}
    missing = [n for n, p in found.items() if p is None]
    if missing:
        raise DdpmsegError(f"{len(missing)} of {len(names)} maps have no mask in {masks_dir} ({', '.join(missing[:3])}"
                           f"{', ...' if len(missing) > 3 else ''}); give NAME.png or NAME.npy, empty for normal images")
    maps, masks = [], []
    for n, f in zip(names, files):
        try:
            a = np.load(f, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise DdpmsegError(f"cannot read map {f}: {' '.join(str(e).split())}; rerun `ddpmseg anomaly`") from None
        if a.ndim != 2 or not np.isfinite(a).all():
            raise DdpmsegError(f"map {f} is not a finite 2-D array; rerun `ddpmseg anomaly`")
        maps.append(a)
        masks.append(load_binary_mask(found[n], a.shape))
    anomalous = [bool(m.any()) for m in masks]
    dice, threshold = best_dice(maps, masks)
    written = read_scores(maps_dir / "scores.csv")
    scores = [written[n] if n in written else image_score(a) for n, a in zip(names, maps)]
    return {
        "pixel_auroc": pixel_auroc(maps, masks),
        "aupro_30": aupro(maps, masks),
        "best_dice": dice,
        "best_dice_threshold": threshold,
        "image_auroc": image_auroc(scores, anomalous),
        "n_images": len(maps),
        "n_anomalous": int(sum(anomalous)),
        "images": names,
    }


def evaluate_image_labels(maps_dir: str | Path, labels: str | Path) -> dict[str, Any]:
    """Image AUROC of an ``anomaly`` output folder's scores.csv against per-image labels: a CSV
    ``image,anomalous`` (image = the file's stem, anomalous 0 or 1), for data without masks."""
    import csv

    maps_dir, labels = Path(maps_dir), Path(labels)
    scores = read_scores(maps_dir / "scores.csv")
    if not scores:
        raise DdpmsegError(f"no scores.csv in {maps_dir}; give the --out folder of `ddpmseg anomaly`")
    try:
        with labels.open(newline="") as f:
            truth = {r["image"]: r["anomalous"].strip() for r in csv.DictReader(f)}
    except OSError as e:
        raise DdpmsegError(f"--labels {labels}: cannot read it ({e.strerror})") from None
    except (KeyError, AttributeError, TypeError):
        raise DdpmsegError(f"--labels {labels} needs the columns image,anomalous (a stem, 0 or 1 per row)") from None
    bad = [k for k, v in truth.items() if v not in ("0", "1")]
    if bad:
        raise DdpmsegError(f"--labels {labels}: anomalous must be 0 or 1, but {bad[0]!r} has {truth[bad[0]]!r}")
    missing = [n for n in scores if n not in truth]
    if missing:
        raise DdpmsegError(f"--labels {labels} has no row for {len(missing)} scored images ({', '.join(missing[:3])}"
                           f"{', ...' if len(missing) > 3 else ''}); add them")
    names = sorted(scores, key=data.natural_key)
    anomalous = [truth[n] == "1" for n in names]
    return {"pixel_auroc": None, "aupro_30": None, "best_dice": None, "best_dice_threshold": None,
            "image_auroc": image_auroc([scores[n] for n in names], anomalous), "n_images": len(names),
            "n_anomalous": int(sum(anomalous)), "images": names}


def format_table(result: dict[str, Any]) -> str:
    rows = [("pixel AUROC", result["pixel_auroc"]), ("AUPRO (FPR <= 0.3)", result["aupro_30"]),
            ("best Dice", result["best_dice"]), ("  at threshold", result["best_dice_threshold"]),
            ("image AUROC", result["image_auroc"])]
    none = "n/a (no masks)" if result.get("pixel_auroc") is None else "n/a (all images of one kind)"
    return "\n".join(f"{k:20s} {none if v is None else f'{v:.4f}'}" for k, v in rows
                     if v is not None or k == "image AUROC" or result.get("pixel_auroc") is not None)
