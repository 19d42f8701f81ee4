"""``ddpmseg suggest``: which images of an unlabelled pool to label next.

Each pool image runs through the model once (features, labels, the pixel
map of mutual information); images the model was trained on are left out
(by content) and, with ``--by diversity``, count as picked already. Writes ``suggest.csv`` (rank, image, score) and
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
from ddpmseg.active.strategies import embedding, image_scores, rank
from ddpmseg.errors import DdpmsegError

THUMB = 160  # contact sheet: the longer side of each image and map


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
    n: int = 5,
    by: str = "uncertainty",
    checkpoint: str | Path | None = None,
    device: str = "auto",
    progress: bool = False,
    overwrite: bool = False,
) -> Suggestion:
    """Rank the pool ``images`` by ``by`` (uncertainty, bald, diversity: :mod:`ddpmseg.active.strategies`)."""
    from ddpmseg.pipeline import Segmenter

    rank({"uncertainty": np.zeros(1), "bald": np.zeros(1)}, n, by, np.zeros((1, 1)))  # check n and by first
    paths = data.list_images(images)
    out = check_writable(out, folder=True)
    check_not_there([out / "suggest.csv", out / "suggest.png"], overwrite)
    segmenter = Segmenter(model_dir, checkpoint, device)
    trained = set(segmenter.model.record.fit.training_images([p.stem for p in paths], [file_sha256(p) for p in paths]))
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
    w.writerow(["rank", "image", "score"])
    for r, (name, s) in enumerate(ranked, 1):
        w.writerow([r, name, f"{s:.6g}"])
    write_atomic(out / "suggest.csv", lambda path: path.write_text(buf.getvalue()))
    vmax = max(float(m.max()) for _, m in thumbs) or 1.0
    viz.save_png_atomic(out / "suggest.png", _contact_sheet([(thumbs[i], pool[i].stem, s) for i, s in picked], vmax, by))
    return Suggestion(out, ranked, len(pool), sorted(trained))


def _thumb(rgb: np.ndarray) -> np.ndarray:
    img = Image.fromarray(rgb)
    img.thumbnail((THUMB, THUMB), Image.BILINEAR)
    return np.asarray(img)


def _thumb_map(m: np.ndarray) -> np.ndarray:
    img = Image.fromarray(np.asarray(m, dtype=np.float32), mode="F")
    img.thumbnail((THUMB, THUMB), Image.BILINEAR)
    return np.asarray(img)


def _contact_sheet(rows: list[tuple[tuple[np.ndarray, np.ndarray], str, float]], vmax: float, by: str) -> Image.Image:
    """One row per suggestion: rank, name and score above the image and its uncertainty map; a colour bar."""
    font = viz._font(12)
    line = 18
    h = max(t[0].shape[0] for t, _, _ in rows)
    w = max(t[0].shape[1] for t, _, _ in rows)
    sheet = Image.new("RGB", (2 * w + 3 * 6, len(rows) * (h + line + 6) + 6), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for r, ((img, unc), name, score) in enumerate(rows):
        y = 6 + r * (h + line + 6)
        draw.text((6, y), f"{r + 1}. {name}  ({by} {score:.4g})", fill=(0, 0, 0), font=font)
        sheet.paste(Image.fromarray(img), (6, y + line))
        heat, _ = viz.heatmap(unc, vmax=vmax)
        sheet.paste(Image.fromarray(heat), (12 + w, y + line))
    return viz.with_colorbar(np.asarray(sheet), vmax, "uncertainty")
