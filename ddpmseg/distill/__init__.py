"""Distillation: a teacher model folder's knowledge in a fast student network (the reference's DatasetDDPM).

    run       distill(): samples and/or unlabelled images -> pseudo-labels -> filter -> student folder
    samples   write_samples(): images drawn from the teacher's DDPM, resumable
    pseudo    pseudo_label(), filter_uncertain(): the teacher's labels and the reference's image uncertainty
    students  the student networks (MONAI; the ``distill`` extra), build_student, load_weights
    train     StudentTrainConfig, train_student(): augmentation, checkpoints, the epoch kept
    export    export_onnx(): a student as ONNX, checked with ONNX Runtime

Nothing here is imported by the core commands; MONAI and ONNX load only when used.
"""

from __future__ import annotations

from ddpmseg._lazy import lazy_exports

_EXPORTS = {
    "distill": "ddpmseg.distill.run",
    "DistillSummary": "ddpmseg.distill.run",
    "StudentTrainConfig": "ddpmseg.distill.config",
    "export_onnx": "ddpmseg.distill.export",
    "ExportSummary": "ddpmseg.distill.export",
}
__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS)
