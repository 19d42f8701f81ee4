"""Model folders: a teacher (features + a fitted head) or a distilled student (one network).

:func:`load_model` reads either; ``predict``, ``evaluate`` and ``suggest`` take both.


A model directory holds
    model.json    the ModelRecord (readable): ddpmseg version, backbone (family,
                  preset, config), checkpoint (name, path, sha256), extraction
                  settings, classes (names, colours), fit (training images, the
                  head's name and its options, ``fit.head_config``)
    tensors.pt    {<the head's state key>: its learned state, "noise": (1,3,S,S)} (the
                  mlp head's key is "ensemble"; tensors and plain values only: loads
                  with weights_only=True)
Both files are written atomically (temp file + rename). Which head, and how it
is saved and loaded, comes from the head registry (:mod:`ddpmseg.heads`).

A student folder (``ddpmseg distill``) holds
    model.json    the StudentRecord (format "ddpmseg-student")
    student.pt    the network's state dict (weights_only); the network comes from
                  :mod:`ddpmseg.distill.students` by the name in model.json
"""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from ddpmseg._io import check_writable, write_atomic
from ddpmseg.data import LabelSet
from ddpmseg.errors import DdpmsegError
from ddpmseg.heads import get_head, head_names
from ddpmseg.options import MODEL_FILES
from ddpmseg.records import STUDENT_FORMAT, ModelRecord, StudentRecord

STUDENT_FILES = ("model.json", "student.pt")

# what torch.load raises for a truncated or foreign tensors.pt
_TENSOR_FILE_ERRORS = (RuntimeError, OSError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile)


class SegmentationModel:
    """What ``ddpmseg fit`` writes and ``predict`` / ``evaluate`` read."""

    def __init__(self, record: ModelRecord, classifier: Any, noise: torch.Tensor) -> None:
        self.record = record
        self.classifier = classifier  # the fitted head: predict_block_maps(maps, keys, size) -> Segmentation
        self.noise = noise

    @property
    def labelset(self) -> LabelSet:
        return self.record.labelset

    @property
    def keys(self) -> list[tuple[int, int]]:
        return self.record.extract.keys

    def save(self, directory: str | Path) -> Path:
        directory = check_writable(directory, folder=True)
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DdpmsegError(f"cannot create model folder {directory}: {e.strerror}") from None
        tensors = {get_head(self.record.fit.head).key: self.classifier.state_dict(), "noise": self.noise.cpu()}
        write_atomic(directory / "tensors.pt", lambda p: torch.save(tensors, p))
        text = json.dumps(self.record.to_dict(), indent=2, sort_keys=True)
        write_atomic(directory / "model.json", lambda p: p.write_text(text + "\n"))
        return directory

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> "SegmentationModel":
        directory = Path(directory)
        if directory.exists() and not directory.is_dir():
            raise DdpmsegError(f"--model {directory} is a file, not a model folder; pass the folder written by `ddpmseg fit`")
        if not directory.is_dir():
            raise DdpmsegError(f"model folder {directory} does not exist; create it with `ddpmseg fit ... --out {directory}`")
        missing = [f for f in MODEL_FILES if not (directory / f).is_file()]
        if missing:
            from ddpmseg.backbones.runs import describe_folder

            what = describe_folder(directory)
            if what == "a train-ddpm run folder":
                raise DdpmsegError(f"{directory} is a train-ddpm run folder (a DDPM), not a model folder: fit a model "
                                   "with `ddpmseg fit ... --out MODEL/` and pass --model MODEL/")
            if what == "a feature cache folder":
                raise DdpmsegError(f"{directory} is a feature cache folder, not a model folder: fit a model with "
                                   f"`ddpmseg fit --features {directory} ... --out MODEL/` and pass --model MODEL/")
            raise DdpmsegError(f"model folder {directory} lacks {', '.join(missing)}; rerun `ddpmseg fit` to rewrite it")
        try:
            d = json.loads((directory / "model.json").read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DdpmsegError(f"{directory}/model.json is damaged ({type(e).__name__}: {e}); rerun `ddpmseg fit`") from None
        record = ModelRecord.from_dict(d, source=f"{directory}/model.json")
        try:
            tensors = torch.load(directory / "tensors.pt", map_location="cpu", weights_only=True)
        except _TENSOR_FILE_ERRORS as e:
            reason = " ".join(str(e).split())[:160]
            raise DdpmsegError(f"{directory}/tensors.pt is damaged ({type(e).__name__}: {reason}); rerun `ddpmseg fit`") from None
        if record.fit.head not in head_names():
            raise DdpmsegError(f"{directory}/model.json was fitted with the head {record.fit.head!r}, which this ddpmseg "
                               f"does not have (its heads: {', '.join(head_names())}); upgrade ddpmseg")
        spec = get_head(record.fit.head)
        if not isinstance(tensors, dict) or not {spec.key, "noise"} <= tensors.keys():
            raise DdpmsegError(f"{directory}/tensors.pt is not a ddpmseg model's tensors file; rerun `ddpmseg fit`")
        config = spec.make_config(record.fit.head_config, where=f"{directory}/model.json fit.head_config")
        head = spec.load(tensors[spec.key], config, device=str(device), n_classes=record.labelset.n_classes,
                         ignore_index=record.fit.ignore_index, random_state=record.fit.seed)
        return cls(record, head, tensors["noise"])


class StudentModel:
    """What ``ddpmseg distill`` writes: one segmentation network on the image itself."""

    def __init__(self, record: StudentRecord, network: torch.nn.Module) -> None:
        self.record = record
        self.network = network.eval()

    @property
    def labelset(self) -> LabelSet:
        return self.record.labelset

    @property
    def size(self) -> int:
        """The side of the square input (and output) grid."""
        return int(self.record.student["size"])

    @property
    def preprocess(self) -> str:
        return str(self.record.student["preprocess"])

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    @torch.inference_mode()
    def segment(self, x0: torch.Tensor):
        """One preprocessed image (1, 3, S, S) in [-1, 1]: a :class:`~ddpmseg.heads.Segmentation` (argmax labels,
        the softmax's entropy as uncertainty, the softmax as ``proba``)."""
        from ddpmseg.heads import Segmentation, entropy

        proba = self.network(x0.to(self.device).float()).float().softmax(1)[0]
        return Segmentation(labels=proba.argmax(0).cpu().numpy(), uncertainty=entropy(proba, 0).cpu().numpy(),
                            proba=proba.cpu().numpy())

    def save(self, directory: str | Path) -> Path:
        directory = check_writable(directory, folder=True)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu() for k, v in self.network.state_dict().items()}
        write_atomic(directory / "student.pt", lambda p: torch.save(state, p))
        text = json.dumps(self.record.to_dict(), indent=2, sort_keys=True)
        write_atomic(directory / "model.json", lambda p: p.write_text(text + "\n"))
        return directory

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu", record: StudentRecord | None = None) -> "StudentModel":
        from ddpmseg.distill.students import build_student

        directory = Path(directory)
        if record is None:
            record = StudentRecord.from_dict(_read_json(directory), source=f"{directory}/model.json")
        if not (directory / "student.pt").is_file():
            raise DdpmsegError(f"student folder {directory} lacks student.pt; rerun `ddpmseg distill --resume`")
        try:
            state = torch.load(directory / "student.pt", map_location="cpu", weights_only=True)
        except _TENSOR_FILE_ERRORS as e:
            raise DdpmsegError(f"{directory}/student.pt is damaged ({type(e).__name__}); rerun `ddpmseg distill`") from None
        s = record.student
        network = build_student(str(s["name"]), record.labelset.n_classes, int(s["size"]))
        try:
            network.load_state_dict(state)
        except (RuntimeError, TypeError) as e:
            raise DdpmsegError(f"{directory}/student.pt does not fit the {s['name']} network of its model.json "
                               f"({str(e).splitlines()[0]}); rerun `ddpmseg distill`") from None
        return cls(record, network.to(device))


def _read_json(directory: Path) -> Any:
    try:
        return json.loads((directory / "model.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DdpmsegError(f"{directory}/model.json is damaged ({type(e).__name__}: {e}); rerun the command "
                           "that wrote it") from None


def load_model(directory: str | Path, device: str | torch.device = "cpu") -> "SegmentationModel | StudentModel":
    """The model folder ``directory``: a teacher (``ddpmseg fit``) or a student (``ddpmseg distill``)."""
    directory = Path(directory)
    if (directory / "model.json").is_file():
        d = _read_json(directory)
        if isinstance(d, dict) and d.get("format") == STUDENT_FORMAT:
            return StudentModel.load(directory, device, StudentRecord.from_dict(d, source=f"{directory}/model.json"))
    return SegmentationModel.load(directory, device)
