"""``ddpmseg export``: a distilled student as one ONNX file, checked with ONNX Runtime, plus a JSON of
what running it without ddpmseg needs.

    STUDENT.onnx   the network: input "image" (N, 3, S, S) float32 in [-1, 1], output "logits"
                   (N, K, S, S); N is a dynamic axis
    STUDENT.json   beside it: the input side S, the preprocessing (resize or centre-crop to S, RGB,
                   x / 127.5 - 1, NCHW), the class names and colours, the ignore index

Only students export: a teacher's prediction runs the diffusion U-Net on noised images and a head on
its upsampled features, not one network on the image. Both files are written atomically; the .onnx
is renamed into place only after ONNX Runtime's logits matched torch's.
"""

from __future__ import annotations

import json
import statistics
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ddpmseg._io import check_not_there, check_writable, write_atomic
from ddpmseg._optional import optional_import
from ddpmseg.errors import DdpmsegError
from ddpmseg.records import MODEL_FORMAT, STUDENT_FORMAT

PURPOSE = "ddpmseg export (ONNX)"
INPUT_NAME, OUTPUT_NAME = "image", "logits"
SIDECAR_FORMAT, SIDECAR_VERSION = "ddpmseg-onnx", 1
TIMING_RUNS = 5  # after one warm-up run each; the median is reported
# ONNX Runtime's logits may differ from torch's by float32 rounding (~1e-5); more means a wrong export
MAX_DIFF = 1e-3


@dataclass(frozen=True)
class ExportSummary:
    path: Path  # the .onnx file
    json_path: Path  # its sidecar JSON
    size: int  # S: the input and output side
    n_classes: int  # K
    input_name: str
    output_name: str
    opset: int
    image: Path | None  # the check image (None: a seeded random input)
    max_abs_diff: float  # max |ONNX Runtime logit - torch logit| on the check input
    torch_ms: float  # median ms per image (batch 1), torch
    onnxruntime_ms: float  # the same, ONNX Runtime (CPUExecutionProvider)
    threads: int  # the threads both ran with (torch's intra-op count)


def sidecar_path(onnx_path: str | Path) -> Path:
    """The JSON written beside ``NAME.onnx``: ``NAME.json``."""
    return Path(onnx_path).with_suffix(".json")


def _load_student(student_dir: Path):
    """The StudentModel of ``student_dir`` (on the CPU), or a one-line error for a teacher or another folder."""
    from ddpmseg.model import StudentModel

    if student_dir.exists() and not student_dir.is_dir():
        raise DdpmsegError(f"STUDENT {student_dir} is a file, not a student folder; pass the folder written by "
                           "`ddpmseg distill --out`")
    if not student_dir.is_dir():
        raise DdpmsegError(f"student folder {student_dir} does not exist; make one with "
                           f"`ddpmseg distill IMAGES --model MODEL/ --out {student_dir}`")
    try:
        d = json.loads((student_dir / "model.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        d = None
    fmt = d.get("format") if isinstance(d, dict) else None
    if fmt != STUDENT_FORMAT:
        if fmt == MODEL_FORMAT or (student_dir / "tensors.pt").is_file():
            raise DdpmsegError(f"{student_dir} is a teacher model folder (`ddpmseg fit`); only distilled students export "
                               "to ONNX (a teacher needs the diffusion U-Net): distil one with "
                               f"`ddpmseg distill IMAGES --model {student_dir} --out STUDENT/` and export that")
        raise DdpmsegError(f"{student_dir} is not a student folder (no readable model.json of format {STUDENT_FORMAT}); "
                           "pass the folder written by `ddpmseg distill --out`")
    return StudentModel.load(student_dir, "cpu")


def _check_input(student, image: str | Path | None) -> torch.Tensor:
    """The (1, 3, S, S) check input: ``image`` preprocessed as predict does, or a seeded uniform one in [-1, 1]."""
    if image is None:
        g = torch.Generator().manual_seed(0)
        return torch.rand(1, 3, student.size, student.size, generator=g) * 2 - 1
    from ddpmseg.workers import load_image

    image = Path(image)
    if not image.is_file():
        raise DdpmsegError(f"--image {image} is not a file; give an image to check the export on (or leave --image out)")
    return load_image(image, student.size, student.preprocess)[1]


def _median_ms(run: Callable[[], Any]) -> float:
    run()  # warm-up: first-call allocations and kernel selection
    times = []
    for _ in range(TIMING_RUNS):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def _export(network: torch.nn.Module, x: torch.Tensor, path: Path, opset: int | None) -> None:
    # The TorchScript exporter (dynamo=False), not torch.export's (dynamo=True): both give the same logits for
    # MONAI's UNet (max |diff| ~7e-6), but this one exports in ~1.5 s rather than ~8 s, needs no onnxscript,
    # writes one self-contained file (the dynamo exporter puts the weights in a second NAME.onnx.data, named
    # after the temp file write_atomic renames) and its chatter is Python warnings only (the other prints its
    # steps to stdout and logs). Its warnings (deprecation, tracer notes, InstanceNorm "train=True", which is
    # what InstanceNorm without running statistics computes in eval mode too) are silenced: library code is quiet.
    kwargs: dict[str, Any] = {} if opset is None else {"opset_version": int(opset)}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(network, (x,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes={INPUT_NAME: {0: "N"}, OUTPUT_NAME: {0: "N"}}, dynamo=False, **kwargs)
    except Exception as e:  # noqa: BLE001 - with the default opset an exporter failure is a bug: raised as is
        if opset is None:
            raise
        first = " ".join(str(e).split("\n", 1)[0].split())[:160]
        raise DdpmsegError(f"opset {opset}: the ONNX exporter failed ({type(e).__name__}: {first}); "
                           "leave the opset unset for the exporter's default") from None


def _sidecar(student, onnx_name: str, opset: int) -> dict[str, Any]:
    """What running the .onnx without ddpmseg needs."""
    s, labelset = student.size, student.labelset
    resize = {
        "resize": f"resize the whole image to {s}x{s} (PIL bilinear; the aspect ratio is not kept)",
        "crop": (f"resize the short side to {s} and the long side to max({s}, round(long * {s} / short)) (PIL bilinear), "
                 f"then crop the centre {s}x{s} (left = (width - {s}) // 2, top = (height - {s}) // 2)"),
    }[student.preprocess]
    return {
        "format": SIDECAR_FORMAT,
        "format_version": SIDECAR_VERSION,
        "onnx": onnx_name,
        "opset": opset,
        "input": {"name": INPUT_NAME, "shape": ["N", 3, s, s], "dtype": "float32", "range": [-1.0, 1.0]},
        "output": {"name": OUTPUT_NAME, "shape": ["N", labelset.n_classes, s, s], "dtype": "float32",
                   "meaning": "per-class logits; a pixel's class is the argmax over axis 1"},
        "input_size": s,
        "preprocess": student.preprocess,
        "preprocessing": [
            "read the image as 8-bit RGB (EXIF orientation applied)",
            resize,
            "x = pixel / 127.5 - 1 (float32 in [-1, 1])",
            "HWC -> CHW, add the batch axis: (N, 3, S, S)",
        ],
        "classes": {"names": list(labelset.names), "colors": [list(c) for c in labelset.colors],
                    "ignore_index": labelset.ignore_index},
        "student": {k: student.record.student[k] for k in ("name", "summary", "n_parameters") if k in student.record.student},
        "ddpmseg_version": student.record.ddpmseg_version,
    }


def export_onnx(student_dir: str | Path, out: str | Path, *, image: str | Path | None = None, overwrite: bool = False,
                opset: int | None = None) -> ExportSummary:
    """Export the student of ``student_dir`` to ``out`` (a ``.onnx`` file) and ``NAME.json`` beside it.

    The .onnx is checked (``onnx.checker``) and run with ONNX Runtime on ``image`` (preprocessed as
    ``predict`` does) or, without one, on a seeded random input; the summary gives the max absolute
    logit difference from torch and the median time per image of both.
    """
    out, student_dir = Path(out), Path(student_dir)
    if out.suffix.lower() != ".onnx":
        raise DdpmsegError(f"--onnx {out}: give a file name ending in .onnx, such as student.onnx")
    student = _load_student(student_dir)
    out = check_writable(out, folder=False, option="--onnx", example="student.onnx")
    side = sidecar_path(out)
    if side.absolute().resolve() == (student_dir / "model.json").absolute().resolve():
        raise DdpmsegError(f"--onnx {out}: its JSON would be the student's own {side}; give the .onnx another name")
    check_not_there([out, side], overwrite, "--onnx")
    onnx = optional_import("onnx", PURPOSE)
    ort = optional_import("onnxruntime", PURPOSE)
    x = _check_input(student, image)
    network = student.network.eval()
    threads = torch.get_num_threads()
    result: dict[str, Any] = {}

    def write(tmp: Path) -> None:
        _export(network, x, tmp, opset)
        proto = onnx.load(str(tmp))
        onnx.checker.check_model(proto)
        result["opset"] = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads  # the same threads as torch, for a fair timing
        options.log_severity_level = 3  # errors only
        session = ort.InferenceSession(str(tmp), options, providers=["CPUExecutionProvider"])
        feed = {INPUT_NAME: x.numpy()}
        with torch.inference_mode():
            expected = network(x).numpy()
            result["torch_ms"] = _median_ms(lambda: network(x))
        got = session.run([OUTPUT_NAME], feed)[0]
        result["onnxruntime_ms"] = _median_ms(lambda: session.run([OUTPUT_NAME], feed))
        if got.shape != expected.shape:
            raise DdpmsegError(f"the ONNX model gives logits of shape {got.shape}, torch {expected.shape}; nothing was "
                               "written: report this as a bug with the student's model.json")
        diff = float(np.abs(got - expected).max())
        if not diff <= max(MAX_DIFF, 1e-4 * float(np.abs(expected).max())):
            raise DdpmsegError(f"the ONNX model's logits differ from torch's by up to {diff:.3g}; nothing was written: "
                               "report this as a bug with the student's model.json")
        result["diff"] = diff

    write_atomic(out, write)
    text = json.dumps(_sidecar(student, out.name, result["opset"]), indent=2)
    write_atomic(side, lambda p: p.write_text(text + "\n"))
    return ExportSummary(path=out, json_path=side, size=student.size, n_classes=student.labelset.n_classes,
                         input_name=INPUT_NAME, output_name=OUTPUT_NAME, opset=result["opset"],
                         image=None if image is None else Path(image), max_abs_diff=result["diff"],
                         torch_ms=result["torch_ms"], onnxruntime_ms=result["onnxruntime_ms"], threads=threads)
