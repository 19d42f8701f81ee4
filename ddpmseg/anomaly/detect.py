"""``ddpmseg anomaly``: anomaly maps of images from a DDPM of normal images, by one of two methods.

``heal`` (reconstruction): per image, resized to the model grid like
``extract`` does, noised to each start step with the fixed noise of ``seed``
(the one ``extract`` draws) and healed (:class:`~ddpmseg.anomaly.heal.Healer`);
the map is the mean over channels of ``|x - healed|`` (in units of the 0..1
intensity range), averaged over the start steps, optionally smoothed
(Gaussian, ``smooth`` pixels of the model grid); its score is the mean of the
map's top 20 % of pixels.

``knn`` (PatchCore-style, :mod:`ddpmseg.anomaly.knn`): the map is each
patch's distance to the nearest patch of a bank of normal patches, in the
frozen DDPM features; its score is the largest patch distance. The bank comes
from ``normal`` images or, by default, the images the ``train-ddpm`` run was
trained on, and is kept beside the outputs (``knn_bank.npz``) for the next call.

Either map is mapped back to the original size (bilinear) and drawn on one
colour scale for the whole run, stated on each picture.
"""

from __future__ import annotations

import csv
import io
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ddpmseg import data, viz
from ddpmseg._io import changed_file, check_not_there, check_writable, file_sha256, save_npy_atomic, write_atomic
import ddpmseg.backbones.runs as runs
from ddpmseg.anomaly import knn
from ddpmseg.anomaly.config import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_METHOD,
    DEFAULT_SAMPLE_STEPS,
    DEFAULT_START_STEPS,
    DEFAULT_VMAX,
    DISPLAY_SIDE,
    KNN_CORESET,
    KNN_GRID,
    KNN_MAX_MB,
    MAP_SUFFIX,
    METHODS,
    OUTPUT_KINDS,
)
from ddpmseg.anomaly.heal import Healer
from ddpmseg.anomaly.metrics import image_score
from ddpmseg.backbones import Backbone, create_backbone
from ddpmseg.errors import DdpmsegError
from ddpmseg.features.extractor import make_noise
from ddpmseg.options import DEFAULT_SEED, DEFAULT_STEPS

log = logging.getLogger(__name__)


@dataclass
class AnomalySummary:
    out: Path
    n_images: int
    seconds: float
    scores: dict[str, float] = field(default_factory=dict)
    not_images: list[str] = field(default_factory=list)
    vmax: float = DEFAULT_VMAX
    above_vmax: float = 0.0  # share of all map pixels above vmax (drawn at the brightest colour)
    already_done: int = 0  # images left out by skip_done: their outputs and score were there
    method: str = DEFAULT_METHOD
    bank: dict | None = None  # knn: knn.describe of the bank (images, patches, dims, radius, mb)


def _smooth(m: np.ndarray, sigma: float) -> np.ndarray:
    if sigma <= 0:
        return m
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(m, sigma=sigma, mode="nearest").astype(np.float32)


def _parse_steps(start_steps: Sequence[int]) -> list[int]:
    steps = [int(s) for s in start_steps]
    if not steps:
        raise DdpmsegError("--start-steps is empty; give e.g. --start-steps 100,250,400")
    if len(set(steps)) != len(steps):
        raise DdpmsegError(f"duplicated start step in {steps}; list each once")
    return steps


def anomaly_maps(
    images: Sequence[str | Path],
    checkpoint: str | Path,
    out: str | Path,
    *,
    method: str = DEFAULT_METHOD,
    start_steps: Sequence[int] = DEFAULT_START_STEPS,
    sample_steps: int = DEFAULT_SAMPLE_STEPS,
    ancestral: bool = False,
    smooth: float = 0.0,
    normal: Sequence[str | Path] | None = None,
    coreset: float = KNN_CORESET,
    max_bank_mb: float = KNN_MAX_MB,
    grid: int = KNN_GRID,
    seed: int = DEFAULT_SEED,
    batch_size: int = DEFAULT_BATCH_SIZE,
    save_maps: bool = False,
    vmax: float | None = None,
    preset: str | None = None,
    model_flags: str | Path | None = None,
    image_size: int | None = None,
    num_head_channels: int | None = None,
    device: str = "auto",
    precision: str = "fp32",
    progress: bool = False,
    overwrite: bool = False,
    skip_done: bool = False,
) -> AnomalySummary:
    """Write per image ``NAME_anomaly.png`` (the map over the image, colour bar 0..``vmax``), with
    ``method="heal"`` ``NAME_healed.png`` (healed from the first start step) and, with ``save_maps``,
    ``NAME_anomaly.npy`` (float32, original size); and ``scores.csv`` (image, score).

    ``vmax`` (None: heal 0.25, knn the bank's radius) is the one colour scale of the run.
    knn: ``normal`` the normal images of the bank (None: the run's training images, as its
    train.json records them), ``coreset`` the fraction of their patches kept (greedy k-centre below 1),
    ``max_bank_mb`` the bank's largest size (a random sample of the patches beyond), ``grid`` the patch
    grid (0: half the model grid, at most 32); ``start_steps``, ``sample_steps``, ``ancestral`` and ``smooth``
    are heal's.
    ``skip_done`` (without ``overwrite``): leave out the images whose outputs and score row are all
    there already (an interrupted run's finished images) and write the others, replacing what an
    interrupted run left of them (as ``predict --skip-done``), so a rerun finishes the rest."""
    if method not in METHODS:
        raise DdpmsegError(f"--method {method!r}: use one of {', '.join(METHODS)}")
    steps = _parse_steps(start_steps)
    if batch_size < 1:
        raise DdpmsegError(f"--batch-size {batch_size}: give at least 1")
    if smooth < 0:
        raise DdpmsegError(f"--smooth {smooth}: give a Gaussian sigma of 0 (off) or more")
    if vmax is not None and vmax <= 0:
        raise DdpmsegError(f"--vmax {vmax}: give a positive value (the map value drawn brightest)")
    not_images: list[str] = []
    paths = data.list_images(images, skipped=not_images)
    out = check_writable(out, folder=True)
    kinds = OUTPUT_KINDS if method == "heal" else OUTPUT_KINDS[:1]
    suffixes = [f"_{k}.png" for k in kinds] + ([MAP_SUFFIX] if save_maps else [])
    done_before = _done(paths, out, suffixes) if skip_done and not overwrite else set()
    paths = [p for p in paths if p.stem not in done_before]
    targets = [out / f"{p.stem}{suffix}" for p in paths for suffix in suffixes]
    # scores.csv gains these images' rows, keeping the others; skip_done rewrites what an interrupted run left half done
    check_not_there(targets, overwrite or skip_done)
    normal_paths = _normal_images(normal, checkpoint) if method == "knn" else []
    backbone = create_backbone(checkpoint, preset, model_flags, device, image_size=image_size,
                               num_head_channels=num_head_channels)
    size = backbone.image_size
    if method == "heal":
        healer = Healer(backbone, sample_steps, ancestral, precision, seed)
        for s in steps:
            healer.check_start(s)
    else:
        settings = knn.KnnSettings(DEFAULT_STEPS, tuple(backbone.default_blocks()), seed, grid or knn.default_grid(size),
                                   coreset=coreset, max_mb=max_bank_mb)
        knn.check_settings(settings, size)
    for p in paths:  # fail on a bad image before any forward pass
        data.load_rgb(p)
    noise = make_noise(seed, size)
    out.mkdir(parents=True, exist_ok=True)
    bank = _bank(backbone, normal_paths, settings, noise, precision, out, progress) if method == "knn" else None
    if vmax is None:  # one scale for the run: heal's intensity units; knn's bank radius (a normal patch's farthest)
        vmax = DEFAULT_VMAX if bank is None else (bank.radius or 1.0)
    unit = " (|x - healed|)" if bank is None else "\n(distance to the\nnearest normal patch)"
    scores: dict[str, float] = {}
    above, pixels = 0, 0  # map pixels above vmax, all map pixels
    start = time.perf_counter()
    work = len(steps) if method == "heal" else 1
    bar = tqdm(total=len(paths) * work, desc="anomaly", unit="image" if work == 1 else "heal", disable=not progress)
    try:
        for lo in range(0, len(paths), batch_size):
            batch = paths[lo : lo + batch_size]
            loaded = [data.load_rgb(p) for p in batch]
            prepared = [data.preprocess_image(rgb, size, "resize") for rgb in loaded]
            x0 = torch.cat([x for x, _ in prepared])
            healed: torch.Tensor | None = None
            if method == "heal":
                diffs = []
                for s in steps:
                    h = healer.heal(x0, s, noise.expand(len(batch), -1, -1, -1)).cpu()
                    diffs.append((x0 - h).abs().mean(1) / 2)  # 0..1 intensity units
                    healed = h if healed is None else healed
                    bar.update(len(batch))
                grids = [_smooth(m, smooth) for m in torch.stack(diffs).mean(0).numpy()]
                image_scores = [None] * len(batch)
            else:
                grids, image_scores = [], []
                for i in range(len(batch)):
                    d = bank.distances(knn.patch_features(backbone, x0[i : i + 1], noise, settings, precision))
                    grids.append(knn.patch_map(d, settings.grid, size))
                    image_scores.append(float(d.max()))
                    bar.update(1)
            for i, (p, rgb, (_, pre)) in enumerate(zip(batch, loaded, prepared)):
                full = data.restore_map(grids[i], pre, fill=0.0)
                scores[p.stem] = image_score(full) if image_scores[i] is None else image_scores[i]
                above, pixels = above + int(np.count_nonzero(full > vmax)), pixels + full.size
                _write_outputs(out, p.stem, rgb, full, None if healed is None else healed[i], pre, vmax, save_maps,
                               unit)
    finally:
        bar.close()
        if scores:
            _write_scores(out / "scores.csv", scores)
    return AnomalySummary(out, len(paths), time.perf_counter() - start, scores, not_images, vmax,
                          above / max(pixels, 1), len(done_before), method,
                          None if bank is None else knn.describe(bank, len(normal_paths)))


def _normal_images(normal: Sequence[str | Path] | None, checkpoint: str | Path) -> list[tuple[Path, str]]:
    """(path, sha256) of the bank's normal images: ``normal``'s, or those the run ``checkpoint`` was trained on
    (each still there with the same contents)."""
    if normal:
        paths = data.list_images(normal)
        return [(p, file_sha256(p)) for p in paths]
    run = Path(checkpoint) if runs.is_run(checkpoint) else runs.run_of(checkpoint)
    if run is None:
        raise DdpmsegError(f"--method knn (the default) compares with normal images: --ckpt {checkpoint} is not a "
                           "train-ddpm run folder that records its training images, so give them with --normal DIR "
                           "(or use --method heal)")
    listed = runs.training_images(run)
    for path, digest in listed:
        what = changed_file(path, digest)
        if what:
            what += " since training (sha256 differs)" if what == "has changed" else ""
            raise DdpmsegError(f"training image {path} of {run} {what}; put it back, or give the normal images "
                               "with --normal DIR")
    return listed


def _bank(backbone: Backbone, normal: list[tuple[Path, str]], settings: knn.KnnSettings, noise: torch.Tensor,
          precision: str, out: Path, progress: bool) -> knn.PatchBank:
    """The bank of ``normal``'s patches: read from ``out``/knn_bank.npz when it was built from the same weights,
    images and settings, else built (and saved there)."""
    weights = backbone.checkpoint.sha256 if backbone.checkpoint is not None and backbone.checkpoint.sha256 else "random"
    key = knn.bank_key(weights, [d for _, d in normal], settings)
    path = out / knn.BANK_FILE
    if path.is_file():
        try:
            bank = knn.PatchBank.load(path)
            if bank.key == key:
                log.info("knn: reusing the bank in %s", path)
                return bank
        except (OSError, ValueError, KeyError):
            pass  # unreadable (a torn write cannot happen: it is atomic): built again below
    size = backbone.image_size
    feats = []
    for p, _ in tqdm(normal, desc="knn bank: features", unit="image", disable=not progress):
        x0, _ = data.preprocess_image(data.load_rgb(p), size, "resize")
        feats.append(knn.patch_features(backbone, x0, noise, settings, precision))
    widths = knn.block_widths(backbone, settings)
    with tqdm(total=settings.bank_size(sum(len(f) for f in feats), sum(widths)), desc="knn bank: coreset",
              unit="patch", disable=not progress or settings.coreset >= 1) as bar:
        bank = knn.build_bank(feats, widths, settings, key, bar.update)
    bank.save(path)
    return bank


def _done(paths: Sequence[Path], out: Path, suffixes: Sequence[str]) -> set[str]:
    """Stems of ``paths`` whose outputs (``suffixes``) are all in ``out`` and that have a row in its scores.csv."""
    scored: set[str] = set()
    if (out / "scores.csv").is_file():
        with (out / "scores.csv").open(newline="") as f:
            scored = {r["image"] for r in csv.DictReader(f) if r.get("image")}
    return {p.stem for p in paths if p.stem in scored and all((out / f"{p.stem}{s}").is_file() for s in suffixes)}


def _write_outputs(out: Path, stem: str, rgb: np.ndarray, full: np.ndarray, healed: torch.Tensor | None,
                   pre: data.Preprocess, vmax: float, save_maps: bool, unit: str = "") -> None:
    heat, top = viz.heatmap(np.minimum(full, vmax), vmax=vmax)
    blended = (0.5 * rgb.astype(np.float32) + 0.5 * heat.astype(np.float32)).round().astype(np.uint8)
    k = -(-DISPLAY_SIDE // max(1, min(blended.shape[:2])))  # a small image enlarged, so the map is legible
    if k > 1:
        blended = blended.repeat(k, 0).repeat(k, 1)
    over = float(np.mean(full > vmax)) if full.size else 0.0
    title = f"anomaly{unit}" + (f"\n{100 * over:.2g} % of pixels\nabove {vmax:.3g}" if over > 0 else "")
    viz.save_png_atomic(out / f"{stem}_anomaly.png", viz.with_colorbar(blended, top, title))
    if healed is not None:
        img = ((healed.numpy() + 1) * 127.5).clip(0, 255)
        back = data.restore_map(img, pre, fill=255.0).round().clip(0, 255).astype(np.uint8).transpose(1, 2, 0)
        viz.save_png_atomic(out / f"{stem}_healed.png", np.ascontiguousarray(back))
    if save_maps:
        save_npy_atomic(out / f"{stem}{MAP_SUFFIX}", full.astype(np.float32))


def _write_scores(path: Path, scores: dict[str, float]) -> None:
    """``scores.csv``: image, score (heal: the mean of the top 20 % of its map; knn: its largest patch distance),
    merged with the file's earlier rows."""
    rows: dict[str, str] = {}
    if path.is_file():
        with path.open(newline="") as f:
            rows = {r["image"]: r["score"] for r in csv.DictReader(f) if "image" in r and "score" in r}
    rows.update({k: f"{v:.6g}" for k, v in scores.items()})
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["image", "score"])
    for k in sorted(rows, key=data.natural_key):
        w.writerow([k, rows[k]])
    write_atomic(path, lambda p: p.write_text(buf.getvalue()))
