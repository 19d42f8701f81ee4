"""``ddpmseg anomaly``: anomaly maps of images from a DDPM of normal images.

Per image: resized to the model grid like ``extract`` does, noised to each
start step with the fixed noise of ``seed`` (the one ``extract`` draws) and
healed (:class:`~ddpmseg.anomaly.heal.Healer`); the map is the mean over
channels of ``|x - healed|`` (in units of the 0..1 intensity range), averaged
over the start steps, optionally smoothed (Gaussian, ``smooth`` pixels of the
model grid), and mapped back to the original size (bilinear). Its score is
the mean of the map's top 1 % of pixels.
"""

from __future__ import annotations

import csv
import io
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ddpmseg import data, viz
from ddpmseg._io import check_not_there, check_writable, save_npy_atomic, write_atomic
from ddpmseg.anomaly.config import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_SAMPLE_STEPS,
    DEFAULT_START_STEPS,
    DEFAULT_VMAX,
    MAP_SUFFIX,
    OUTPUT_KINDS,
)
from ddpmseg.anomaly.heal import Healer
from ddpmseg.anomaly.metrics import image_score
from ddpmseg.backbones import create_backbone
from ddpmseg.errors import DdpmsegError
from ddpmseg.features.extractor import make_noise
from ddpmseg.options import DEFAULT_SEED


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
    start_steps: Sequence[int] = DEFAULT_START_STEPS,
    sample_steps: int = DEFAULT_SAMPLE_STEPS,
    ancestral: bool = False,
    smooth: float = 0.0,
    seed: int = DEFAULT_SEED,
    batch_size: int = DEFAULT_BATCH_SIZE,
    save_maps: bool = False,
    vmax: float = DEFAULT_VMAX,
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
    """Write per image ``NAME_anomaly.png`` (the map over the image, colour bar 0..``vmax``),
    ``NAME_healed.png`` (healed from the first start step) and, with ``save_maps``,
    ``NAME_anomaly.npy`` (float32, original size); and ``scores.csv`` (image, score).
    ``skip_done`` (without ``overwrite``): leave out the images whose outputs and score row are all
    there already (an interrupted run's finished images) and write the others, replacing what an
    interrupted run left of them (as ``predict --skip-done``), so a rerun finishes the rest."""
    steps = _parse_steps(start_steps)
    if batch_size < 1:
        raise DdpmsegError(f"--batch-size {batch_size}: give at least 1")
    if smooth < 0:
        raise DdpmsegError(f"--smooth {smooth}: give a Gaussian sigma of 0 (off) or more")
    if vmax <= 0:
        raise DdpmsegError(f"--vmax {vmax}: give a positive value (the map value drawn brightest)")
    not_images: list[str] = []
    paths = data.list_images(images, skipped=not_images)
    out = check_writable(out, folder=True)
    suffixes = [f"_{k}.png" for k in OUTPUT_KINDS] + ([MAP_SUFFIX] if save_maps else [])
    done_before = _done(paths, out, suffixes) if skip_done and not overwrite else set()
    paths = [p for p in paths if p.stem not in done_before]
    targets = [out / f"{p.stem}{suffix}" for p in paths for suffix in suffixes]
    # scores.csv gains these images' rows, keeping the others; skip_done rewrites what an interrupted run left half done
    check_not_there(targets, overwrite or skip_done)
    backbone = create_backbone(checkpoint, preset, model_flags, device, image_size=image_size,
                               num_head_channels=num_head_channels)
    healer = Healer(backbone, sample_steps, ancestral, precision, seed)
    for s in steps:
        healer.check_start(s)
    for p in paths:  # fail on a bad image before any forward pass
        data.load_rgb(p)
    size = backbone.image_size
    noise = make_noise(seed, size)
    out.mkdir(parents=True, exist_ok=True)
    scores: dict[str, float] = {}
    above, pixels = 0, 0  # map pixels above vmax, all map pixels
    start = time.perf_counter()
    bar = tqdm(total=len(paths) * len(steps), desc="anomaly", unit="heal", disable=not progress)
    try:
        for lo in range(0, len(paths), batch_size):
            batch = paths[lo : lo + batch_size]
            loaded = [data.load_rgb(p) for p in batch]
            prepared = [data.preprocess_image(rgb, size, "resize") for rgb in loaded]
            x0 = torch.cat([x for x, _ in prepared])
            diffs, first = [], None
            for s in steps:
                healed = healer.heal(x0, s, noise.expand(len(batch), -1, -1, -1))
                diffs.append((x0 - healed.cpu()).abs().mean(1) / 2)  # 0..1 intensity units
                first = healed.cpu() if first is None else first
                bar.update(len(batch))
            maps = torch.stack(diffs).mean(0).numpy()
            for i, (p, rgb, (_, pre)) in enumerate(zip(batch, loaded, prepared)):
                grid = _smooth(maps[i], smooth)
                full = data.restore_map(grid, pre, fill=0.0)
                scores[p.stem] = image_score(full)
                above, pixels = above + int(np.count_nonzero(full > vmax)), pixels + full.size
                _write_outputs(out, p.stem, rgb, full, first[i], pre, vmax, save_maps)
    finally:
        bar.close()
        if scores:
            _write_scores(out / "scores.csv", scores)
    return AnomalySummary(out, len(paths), time.perf_counter() - start, scores, not_images, vmax,
                          above / max(pixels, 1), len(done_before))


def _done(paths: Sequence[Path], out: Path, suffixes: Sequence[str]) -> set[str]:
    """Stems of ``paths`` whose outputs (``suffixes``) are all in ``out`` and that have a row in its scores.csv."""
    scored: set[str] = set()
    if (out / "scores.csv").is_file():
        with (out / "scores.csv").open(newline="") as f:
            scored = {r["image"] for r in csv.DictReader(f) if r.get("image")}
    return {p.stem for p in paths if p.stem in scored and all((out / f"{p.stem}{s}").is_file() for s in suffixes)}


def _write_outputs(out: Path, stem: str, rgb: np.ndarray, full: np.ndarray, healed: torch.Tensor,
                   pre: data.Preprocess, vmax: float, save_maps: bool) -> None:
    heat, top = viz.heatmap(np.minimum(full, vmax), vmax=vmax)
    blended = (0.5 * rgb.astype(np.float32) + 0.5 * heat.astype(np.float32)).round().astype(np.uint8)
    over = float(np.mean(full > vmax)) if full.size else 0.0
    title = "anomaly" + (f"\n{100 * over:.2g} % of pixels\nabove {vmax:g}" if over > 0 else "")
    viz.save_png_atomic(out / f"{stem}_anomaly.png", viz.with_colorbar(blended, top, title))
    img = ((healed.numpy() + 1) * 127.5).clip(0, 255)
    back = data.restore_map(img, pre, fill=255.0).round().clip(0, 255).astype(np.uint8).transpose(1, 2, 0)
    viz.save_png_atomic(out / f"{stem}_healed.png", np.ascontiguousarray(back))
    if save_maps:
        save_npy_atomic(out / f"{stem}{MAP_SUFFIX}", full.astype(np.float32))


def _write_scores(path: Path, scores: dict[str, float]) -> None:
    """``scores.csv``: image, score (mean of the top 1 % of its map), merged with the file's earlier rows."""
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
