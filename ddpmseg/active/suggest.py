"""``ddpmseg suggest``: which images of an unlabelled pool to label next.

Each pool image runs through the model once (features, labels, the pixel
map of mutual information); images the model was trained on are left out
(by content) and, with ``--by diversity``, count as picked already. Writes ``suggest.csv`` (rank, image id,
score, the image's absolute path; the score column named by what it measures: :data:`SCORE_COLUMNS`) and
``suggest.png``, a contact sheet with each suggested image beside its
uncertainty map (one colour scale for all).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from ddpmseg import data, viz
from ddpmseg._io import check_not_there, check_writable, file_sha256, write_atomic
from ddpmseg.active.strategies import DEFAULT_N, DEFAULT_STRATEGY, embedding, image_scores, rank
from ddpmseg.errors import DdpmsegError

THUMB = 160  # contact sheet: the longer side of each image and map
# suggest.csv's score column by --by: uncertainty and bald are nats (mutual information), diversity's pick
# value is relative (uncertainty / the pool's highest, times distance to the nearest pick / the largest)
SCORE_COLUMNS = {"uncertainty": "uncertainty score (nats)", "bald": "bald score (nats)",
                 "diversity": "diversity score (relative 0-1, not nats)"}


@dataclass
class Suggestion:
    out: Path
    ranked: list[tuple[str, float]]  # (image id, score), best first
    n_pool: int
    left_out: list[str] = field(default_factory=list)  # pool images that trained the model


def suggest_images(
    model_dir: str | Path,
    images: Sequence[str | Path],
    out: str | Path,
    *,
    n: int = DEFAULT_N,
    by: str = DEFAULT_STRATEGY,
    checkpoint: str | Path | None = None,
    device: str = "auto",
    progress: bool = False,
    overwrite: bool = False,
) -> Suggestion:
    """Rank the pool ``images`` by ``by`` (uncertainty, bald, diversity: :mod:`ddpmseg.active.strategies`)."""
    from ddpmseg.workers import Segmenter

    rank({"uncertainty": np.zeros(1), "bald": np.zeros(1)}, n, by, np.zeros((1, 1)))  # check n and by first
    paths = data.list_images(images)
    out = check_writable(out, folder=True)
    check_not_there([out / "suggest.csv", out / "suggest.png"], overwrite)
    segmenter = Segmenter(model_dir, checkpoint, device)
    trained = set(segmenter.model.record.labelled_images([p.stem for p in paths], [file_sha256(p) for p in paths]))
    pool = [p for p in paths if p.stem not in trained]
    if not pool:
        raise DdpmsegError(f"every image given trained the model ({len(paths)}); give unlabelled images to rank")
    for p in paths:  # fail on a bad image before any forward pass
        data.load_rgb(p)
    labelled = []  # diversity: the training images given count as picked already
    if by == "diversity":
        for p in paths:
            if p.stem in trained:
                labelled.append(embedding(segmenter.analyse(p, keep_maps=True).maps))
    scores: dict[str, list[float]] = {"uncertainty": [], "bald": []}
    embeddings, thumbs = [], []
    for p in tqdm(pool, desc="suggest", unit="img", disable=not progress):
        a = segmenter.analyse(p, keep_maps=by == "diversity")
        for k, v in image_scores(a.grid.uncertainty).items():
            scores[k].append(v)
        if a.maps is not None:
            embeddings.append(embedding(a.maps))
        thumbs.append((_thumb(a.rgb), _thumb_map(a.uncertainty)))
    picked = rank({k: np.asarray(v) for k, v in scores.items()}, n, by, np.stack(embeddings) if embeddings else None,
                  np.stack(labelled) if labelled else None)
    ranked = [(pool[i].stem, s) for i, s in picked]
    out.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["rank", "image", SCORE_COLUMNS[by], "path"])
    for r, (i, s) in enumerate(picked, 1):
        w.writerow([r, pool[i].stem, f"{s:.6g}", str(pool[i].resolve())])
    write_atomic(out / "suggest.csv", lambda path: path.write_text(buf.getvalue()))
    vmax = max(float(m.max()) for _, m in thumbs) or 1.0
    viz.save_png_atomic(out / "suggest.png", _contact_sheet([(thumbs[i], pool[i].stem, s) for i, s in picked], vmax, by))
    return Suggestion(out, ranked, len(pool), sorted(trained))


def _fit(img: Image.Image) -> np.ndarray:
    """``img`` resized so its longer side is THUMB: small images are enlarged (nearest neighbour) too."""
    f = THUMB / max(img.size)
    size = (max(1, round(img.width * f)), max(1, round(img.height * f)))
    return np.asarray(img.resize(size, Image.NEAREST if f > 1 else Image.BILINEAR))


def _thumb(rgb: np.ndarray) -> np.ndarray:
    return _fit(Image.fromarray(rgb))


def _thumb_map(m: np.ndarray) -> np.ndarray:
    return _fit(Image.fromarray(np.asarray(m, dtype=np.float32), mode="F"))


def _contact_sheet(rows: list[tuple[tuple[np.ndarray, np.ndarray], str, float]], vmax: float, by: str) -> Image.Image:
    """One row per suggestion: rank, name and score above the image and its uncertainty map (captions
    wrapped to the row's width, never cut); column headings; a colour bar."""
    font = viz.load_font(12)
    line = viz.line_height(font)
    gap = 6
    h = max(t[0].shape[0] for t, _, _ in rows)
    w = max(t[0].shape[1] for t, _, _ in rows)
    cell_w = 2 * w + gap
    captions = [viz.wrap_text(f"{r + 1}. {name}", font, cell_w) + viz.wrap_text(f"{by} score {score:.4g}", font, cell_w)
                for r, (_, name, score) in enumerate(rows)]
    heights = [len(c) * line + h + 2 * gap for c in captions]
    sheet = Image.new("RGB", (cell_w + 2 * gap, gap + line + sum(heights)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    viz.draw_text(draw, (gap, gap), "image", font)
    viz.draw_text(draw, (2 * gap + w, gap), "uncertainty", font)
    y = gap + line
    for ((img, unc), _, _), caption in zip(rows, captions):
        y += gap
        for i, text in enumerate(caption):
            viz.draw_text(draw, (gap, y + i * line), text, font)
        y += len(caption) * line
        sheet.paste(Image.fromarray(img), (gap, y))
        heat, _ = viz.heatmap(unc, vmax=vmax)
        sheet.paste(Image.fromarray(heat), (2 * gap + w, y))
        y += h + gap
    return viz.with_colorbar(np.asarray(sheet), vmax, "uncertainty\n(nats, one scale\nfor all rows)", font_size=14)
