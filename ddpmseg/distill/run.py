"""``ddpmseg distill``: from a teacher model folder to a fast student network (the reference's DatasetDDPM).

    1. images: unlabelled real ones (``images``) and/or ``samples`` drawn from the teacher's own DDPM
       (``STUDENT/samples/sample_NNNNN.png``)
    2. pseudo-labels: the teacher's predict path, one per image, with the reference's uncertainty score
       (``STUDENT/samples/`` beside the samples, ``STUDENT/pseudo/`` for real images)
    3. the filter: the most uncertain fraction dropped (``STUDENT/filter.png`` shows kept and dropped)
    4. the student: trained on the kept pseudo-labels plus the labelled images with their true masks;
       ``STUDENT/model.json`` + ``student.pt`` make it a model folder for predict / evaluate / suggest.

Every stage resumes after a kill (``resume=True``): finished samples and labels are kept, training
continues from its last epoch.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from ddpmseg import data, viz
from ddpmseg._io import check_writable, file_sha256, write_atomic
from ddpmseg.distill.pseudo import FilterResult, PseudoLabel, filter_uncertain, pseudo_label
from ddpmseg.distill.students import DEFAULT_STUDENT, build_student, get_student, load_weights
from ddpmseg.distill.config import DISTILL_DROP, DISTILL_SAMPLE_STEPS, StudentTrainConfig
from ddpmseg.distill.train import train_student
from ddpmseg.errors import DdpmsegError
from ddpmseg.model import StudentModel
from ddpmseg.records import StudentRecord

log = logging.getLogger(__name__)

SETTINGS_FILE = "distill.json"  # the sources' settings, checked on --resume


@dataclass(frozen=True)
class DistillSummary:
    out: Path
    n_samples: int
    n_images: int
    n_labelled: int
    kept: int
    dropped_uncertain: int
    dropped_certain: int
    best_epoch: int
    select_miou: float
    seconds: float
    record: StudentRecord


def _labelled_pairs(segmenter, images: list[Path], labelled: Sequence[str | Path] | None, masks: str | Path | None
                    ) -> tuple[list[tuple[Path, Path]], list[Path]]:
    """(image, mask) pairs of the labelled images, and the unlabelled images left to pseudo-label."""
    fit = segmenter.model.record.fit
    mask_dir = Path(masks) if masks is not None else Path(fit.masks)
    if not mask_dir.is_dir():
        raise DdpmsegError(f"--masks {mask_dir} is not a folder (the teacher was fitted with masks from {fit.masks}); "
                           "give the folder of the labelled images' masks")
    if labelled:
        chosen = data.list_images(labelled)
        rest = [p for p in images if p.resolve() not in {c.resolve() for c in chosen}]
    else:  # the teacher's own training images among those given
        trained = set(fit.training_images([p.stem for p in images], [file_sha256(p) for p in images]))
        chosen = [p for p in images if p.stem in trained]
        rest = [p for p in images if p.stem not in trained]
        if not chosen:
            given = "none of the images given trained the teacher" if images else "no image was given"
            raise DdpmsegError(f"{given}, so no labelled image is known: give the teacher's labelled images as IMAGES "
                               "or with --labelled (their masks: --masks)")
    pairs = []
    for p in chosen:
        m = data.find_mask(p.stem, mask_dir, image_path=p)
        if m is None:
            raise DdpmsegError(f"labelled image {p} has no mask in {mask_dir} ({data.no_mask_found([(p.stem, p)], mask_dir)})")
        pairs.append((p, m))
    return pairs, rest


def _grid_pair(path: Path, size: int, mode: str) -> tuple[np.ndarray, data.Preprocess]:
    """An image file as the student sees it: (S, S, 3) uint8 on its preprocessing grid (``predict``'s
    :func:`~ddpmseg.workers.load_image`, back in 0-255), and that grid's preprocessing record."""
    from ddpmseg.workers import load_image

    _, x0, pre = load_image(path, size, mode)
    return ((x0[0].permute(1, 2, 0).numpy() + 1.0) * 127.5).round().clip(0, 255).astype(np.uint8), pre


def _resize_labels(labels: np.ndarray, size: int) -> np.ndarray:
    if labels.shape == (size, size):
        return labels.astype(np.int64)
    return np.asarray(Image.fromarray(labels.astype(np.uint8)).resize((size, size), Image.NEAREST)).astype(np.int64)


def _contact_sheet(result: FilterResult, labelset, path: Path, size: int, mode: str, per_group: int = 24) -> None:
    """filter.png: the kept images (most certain first, up to ``per_group``) and every dropped one's overlay."""
    palette = labelset.palette()

    def tiles(items: list[PseudoLabel]) -> np.ndarray:
        out = []
        for p in items:
            rgb, _ = _grid_pair(p.image, size, mode)
            lab = _resize_labels(p.load_labels(), size)
            out.append(viz.overlay(rgb, lab, palette))
        return np.stack(out)

    panels = []
    groups = [("kept", result.kept[:per_group], len(result.kept)),
              ("dropped: most uncertain", result.dropped_uncertain[-per_group:], len(result.dropped_uncertain)),
              ("dropped: most certain", result.dropped_certain[:per_group], len(result.dropped_certain))]
    for title, items, total in groups:
        if items:
            lo, hi = min(p.uncertainty for p in items), max(p.uncertainty for p in items)
            shown = f"{len(items)} of {total}" if len(items) < total else f"all {total}"
            panels.append(viz.sample_sheet(tiles(items), f"{title} ({shown}; image uncertainty {lo:.3g}-{hi:.3g} nats, "
                                                         "teacher's labels over the image)", min_width=512, columns=8))
    width = max(p.width for p in panels)
    sheet = Image.new("RGB", (width, sum(p.height for p in panels) + 8 * (len(panels) - 1)), (255, 255, 255))
    y = 0
    for p in panels:
        sheet.paste(p, (0, y))
        y += p.height + 8
    viz.save_png_atomic(path, sheet)


def distill(
    model_dir: str | Path,
    out: str | Path,
    *,
    images: Sequence[str | Path] = (),
    samples: int = 0,
    sample_steps: int = DISTILL_SAMPLE_STEPS,
    labelled: Sequence[str | Path] | None = None,
    masks: str | Path | None = None,
    drop_uncertain: float = DISTILL_DROP,
    skip_certain: int = 0,
    student: str = DEFAULT_STUDENT,
    student_weights: str | Path | None = None,
    size: int | None = None,
    train: StudentTrainConfig = StudentTrainConfig(),
    resume: bool = False,
    overwrite: bool = False,
    device: str = "auto",
    progress: bool = False,
) -> DistillSummary:
    """Distil the teacher ``model_dir`` into a student folder ``out`` (see the module docstring)."""
    from ddpmseg.sampling import check_sampling_args, resolve_ancestral
    from ddpmseg.workers import Segmenter

    start = time.perf_counter()
    out = check_writable(out, folder=True)
    if samples < 0:
        raise DdpmsegError(f"--samples {samples}: give a count >= 0")
    if not images and not samples:
        raise DdpmsegError("nothing to pseudo-label: give unlabelled images with --images and/or --samples N")
    # bad input first: every check below runs before any sampling, labelling or training
    paths = data.list_images(images) if images else []
    get_student(student)
    filter_uncertain([], drop_uncertain, skip_certain)
    settings = {"images": sorted(str(p.resolve()) for p in paths), "samples": samples, "sample_steps": sample_steps,
                "seed": train.seed, "size": size}
    existing = [out / f for f in (SETTINGS_FILE, "model.json", "checkpoint.pt")]
    if resume and (out / SETTINGS_FILE).is_file():
        before = json.loads((out / SETTINGS_FILE).read_text())
        if before != settings:
            changed = sorted(k for k in settings if before.get(k) != settings[k])
            raise DdpmsegError(f"--resume: {out} was distilled with other {', '.join(changed)}; give the same settings, "
                               "or --overwrite to start again")
    elif not resume:
        if any(f.exists() for f in existing) and not overwrite:
            done = "a finished" if (out / "model.json").exists() else "an unfinished"
            raise DdpmsegError(f"--out {out} holds {done} distillation: pass --resume to continue it (more --epochs), "
                               "--overwrite to start again, or choose another --out")
        if overwrite:
            for f in existing + [out / "train_log.jsonl"]:
                f.unlink(missing_ok=True)
    segmenter = Segmenter(model_dir, device=device)
    if segmenter.is_student:
        raise DdpmsegError(f"--model {model_dir} is a distilled student; distill from a teacher (`ddpmseg fit`'s folder)")
    teacher = segmenter.model
    mode, grid = teacher.record.extract.preprocess, segmenter.backbone.image_size
    size = size or grid
    if samples:
        check_sampling_args(segmenter.backbone, sample_steps, "fp32")
    pairs, unlabelled = _labelled_pairs(segmenter, paths, labelled, masks)
    labelset = teacher.labelset
    ignore = labelset.ignore_index
    network = build_student(student, labelset.n_classes, size, seed=train.seed)
    loaded = load_weights(network, student_weights) if student_weights else None
    truths = []
    for p, m in pairs:  # read every mask before the first forward pass
        mask = data.load_mask(m, labelset, expected_size=tuple(data.load_rgb(p).shape[1::-1]))
        data.check_labels(mask, labelset.n_classes, ignore, m)
        truths.append(mask)
    for p in unlabelled:
        data.load_rgb(p)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / SETTINGS_FILE, lambda f: f.write_text(json.dumps(settings, indent=2) + "\n"))

    drawn: list[Path] = []
    if samples:
        from ddpmseg.distill.samples import write_samples

        log.info("sampling %d images from the teacher's DDPM (%d steps each)", samples, sample_steps)
        drawn = write_samples(segmenter.backbone, out / "samples", samples, sample_steps=sample_steps, seed=train.seed,
                              progress=progress)
    labels = pseudo_label(segmenter, unlabelled, out / "pseudo", "image", progress=progress)
    labels += pseudo_label(segmenter, drawn, out / "samples", "sample", progress=progress)
    result = filter_uncertain(labels, drop_uncertain, skip_certain)
    if labels:
        _contact_sheet(result, labelset, out / "filter.png", size, mode)

    # the training set: kept pseudo-labels + the labelled images with their true masks
    x, y = [], []
    for p in result.kept:
        rgb, _ = _grid_pair(p.image, size, mode)
        x.append(rgb)
        y.append(_resize_labels(p.load_labels(), size))
    sel_x, sel_y = [], []
    for (p, _), truth in zip(pairs, truths):
        rgb, pre = _grid_pair(p, size, mode)
        sel_x.append(rgb)
        sel_y.append(data.prepare_mask(truth, pre))
    x += sel_x
    y += sel_y
    sampler = None if not samples else ("ancestral" if resolve_ancestral(segmenter.backbone, sample_steps, None) else "ddim")
    network = network.to(segmenter.backbone.device)
    del segmenter  # the teacher's U-Net is not needed any more
    network, state = train_student(network, np.stack(x), np.stack(y), (np.stack(sel_x), np.stack(sel_y)), out, train,
                                   n_classes=labelset.n_classes, ignore_index=ignore, resume=resume, progress=progress)
    trained_ids = [p.id for p in result.kept if p.kind == "image"] + [p.stem for p, _ in pairs]
    labelled_sha256 = [file_sha256(p) for p, _ in pairs]
    present = set(np.unique(np.concatenate([a.reshape(-1) for a in y])).tolist())
    record = StudentRecord(
        labelset,
        student={"name": student, "size": size, "preprocess": mode, "summary": get_student(student).summary,
                 "n_parameters": sum(t.numel() for t in network.parameters()),
                 "weights": None if student_weights is None else {"file": str(Path(student_weights).resolve()),
                                                                  "tensors_loaded": loaded[0], "tensors": loaded[1]}},
        teacher={"folder": str(Path(model_dir).resolve()), "head": teacher.record.fit.head,
                 "backbone": teacher.record.backbone.to_dict(), "checkpoint": teacher.record.checkpoint.to_dict(),
                 "training_images": list(teacher.record.fit.images), "image_sha256": list(teacher.record.fit.image_sha256)},
        sources={"images": len(unlabelled),
                 "image_inputs": [str(i) for i in images], "samples": samples,
                 "sample_steps": sample_steps if samples else None,
                 "sampler": sampler,
                 "labelled": [p.stem for p, _ in pairs], "masks": str(Path(masks or teacher.record.fit.masks).resolve())},
        filter={"score": "mean of the top 10 % of the pixels' JS score (the reference's)",
                "drop_uncertain": drop_uncertain, "skip_certain": skip_certain, "pseudo_labelled": len(labels),
                "kept": len(result.kept), "dropped_uncertain": [p.id for p in result.dropped_uncertain],
                "dropped_certain": [p.id for p in result.dropped_certain], "threshold": result.threshold},
        training={**train.to_dict(), "best_epoch": state.best_epoch, "select_miou": state.best_score,
                  "selection": "the epoch with the best mIoU on the labelled images (true masks)",
                  "images": trained_ids,
                  "image_sha256": [p.sha256 for p in result.kept if p.kind == "image"] + labelled_sha256,
                  "labelled_sha256": labelled_sha256,
                  "n_training_pairs": len(x),
                  "untrained_classes": [c for c in range(labelset.n_classes) if c != ignore and c not in present]},
    )
    StudentModel(record, network.cpu()).save(out)
    return DistillSummary(out, samples, len(unlabelled), len(pairs), len(result.kept), len(result.dropped_uncertain),
                          len(result.dropped_certain), state.best_epoch, state.best_score, time.perf_counter() - start,
                          record)

