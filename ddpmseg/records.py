"""Typed, versioned records: exactly what ``feats.h5`` and ``model.json`` store.

    CacheRecord   feats.h5 root attributes: format, format_version, ddpmseg_version and
                  config = {"extract": ExtractConfig, "backbone": BackboneSpec, "checkpoint": CheckpointRef}
    ModelRecord   model.json: format, format_version, ddpmseg_version, backbone, checkpoint,
                  extract, classes (name, names, colours), fit (FitConfig: the training
                  images, the common settings, the head's name and its options)
    StudentRecord a distilled student's model.json (format "ddpmseg-student"): classes,
                  student (network, input side, preprocessing), teacher, sources,
                  filter, training (settings, images, the epoch kept)

Every record has ``to_dict`` / ``from_dict`` (JSON-ready values, tuples as
lists) and reads the files of earlier releases: missing fields take the
value those releases used. A file from a newer format is refused with a
message to upgrade.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Mapping

from ddpmseg._version import __version__
from ddpmseg.backbones.configs import BackboneSpec, CheckpointRef
from ddpmseg.data.labelsets import LabelSet
from ddpmseg.errors import DdpmsegError
from ddpmseg.options import DEFAULT_SEED, DEFAULT_STEPS, IGNORE_INDEX, MIN_PIXELS, PRECISIONS, PREPROCESS_MODES, STORAGE_DTYPES

CACHE_FORMAT, CACHE_VERSION = "ddpmseg-features", 1
MODEL_FORMAT, MODEL_VERSION = "ddpmseg-model", 3
STUDENT_FORMAT, STUDENT_VERSION = "ddpmseg-student", 1
# model.json formats: 1 = 0.1.0 (no format_version field); 2 = the MLP ensemble's settings as fields of ``fit``
# and the DDP head's in ``fit.ddp``; 3 = every head's options in ``fit.head_config``.


def _check_version(found: int, supported: int, what: str) -> None:
    if found > supported:
        raise DdpmsegError(f"{what} was written by a newer ddpmseg (format {found}, this one reads <= {supported}); upgrade ddpmseg")


def _json_version(d: Any, fmt: str, supported: int, source: str, not_it: str) -> int:
    """The format version of the JSON record ``d`` of format ``fmt``; ``not_it``: the error when it is another file."""
    if not isinstance(d, Mapping) or d.get("format") != fmt:
        raise DdpmsegError(f"{source} is not {not_it}")
    version = int(d.get("format_version", 1))
    _check_version(version, supported, source)
    return version


def _labelset(c: Mapping[str, Any], ignore_index: int) -> LabelSet:
    return LabelSet(c["name"], tuple(c["names"]), tuple(tuple(x) for x in c["colors"]), int(ignore_index))


@dataclass(frozen=True)
class ExtractConfig:
    """Everything that fixes the features of an image, besides the weights.

    ``blocks=()`` (the default) asks for the backbone's default blocks (the
    paper's depths: 5, 6, 7, 8, 12 of an 18-block decoder,
    :meth:`~ddpmseg.backbones.Backbone.default_blocks`); what a cache or model
    records is always the resolved list.
    """

    steps: tuple[int, ...] = DEFAULT_STEPS
    blocks: tuple[int, ...] = ()
    seed: int = DEFAULT_SEED
    preprocess: str = "resize"
    storage_dtype: str = "float16"
    precision: str = "fp32"
    noise_samples: int = 1  # the maps averaged over this many noise draws (1: the paper's single noise)

    def __post_init__(self) -> None:
        if int(self.noise_samples) < 1:
            raise DdpmsegError(f"--noise-samples {self.noise_samples}: give at least 1")
        object.__setattr__(self, "steps", tuple(int(t) for t in self.steps))
        object.__setattr__(self, "blocks", tuple(int(b) for b in self.blocks))
        if self.preprocess not in PREPROCESS_MODES:
            raise DdpmsegError(f"preprocess must be 'resize' or 'crop', got {self.preprocess!r}")
        if self.storage_dtype not in STORAGE_DTYPES:
            raise DdpmsegError(f"storage dtype must be float16 or float32, got {self.storage_dtype!r}")
        if self.precision not in PRECISIONS:
            raise DdpmsegError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")

    @property
    def keys(self) -> list[tuple[int, int]]:
        """(t, block) pairs in the reference's concatenation order."""
        return [(t, b) for t in self.steps for b in self.blocks]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {**d, "steps": list(self.steps), "blocks": list(self.blocks)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ExtractConfig":
        # caches and models from before --precision were made in fp32
        return cls(**{"precision": "fp32", **{k: v for k, v in d.items() if k in _field_names(cls)}})


def _field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


@dataclass(frozen=True)
class CacheRecord:
    """The identity of a feature cache: extraction settings, architecture and weights."""

    extract: ExtractConfig
    backbone: BackboneSpec
    checkpoint: CheckpointRef
    format_version: int = CACHE_VERSION
    ddpmseg_version: str = __version__

    def config_dict(self) -> dict[str, Any]:
        """The ``config`` attribute's JSON object."""
        return {"extract": self.extract.to_dict(), "backbone": self.backbone.to_dict(), "checkpoint": self.checkpoint.to_dict()}

    def to_attrs(self) -> dict[str, Any]:
        """The HDF5 root attributes of a cache file."""
        return {
            "format": CACHE_FORMAT,
            "format_version": self.format_version,
            "ddpmseg_version": self.ddpmseg_version,
            "config": json.dumps(self.config_dict(), sort_keys=True),
        }

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any], source: str) -> "CacheRecord":
        if attrs.get("format") != CACHE_FORMAT:
            raise DdpmsegError(f"{source} is an HDF5 file but not a ddpmseg feature cache; create one with `ddpmseg extract`")
        version = int(attrs.get("format_version", 1))
        _check_version(version, CACHE_VERSION, source)
        try:
            config = json.loads(attrs["config"])
            return cls(
                ExtractConfig.from_dict(config["extract"]),
                BackboneSpec.from_dict(config["backbone"]),
                CheckpointRef.from_dict(config["checkpoint"]),
                version,
                str(attrs.get("ddpmseg_version", "?")),
            )
        except KeyError as e:
            raise DdpmsegError(f"{source}: its cache record lacks {e}; re-extract the features into a new file") from None
        except json.JSONDecodeError as e:
            raise DdpmsegError(f"{source}: its cache record is not JSON ({e}); re-extract the features into a new file") from None

    def identity(self) -> dict[str, Any]:
        """What fixes the features, flattened: a moved or renamed checkpoint with the same weights is the same."""
        out = {f"extract.{k}": v for k, v in self.extract.to_dict().items()}
        out["backbone.family"] = self.backbone.family
        out.update({f"backbone.{k}": v for k, v in _flat(self.backbone.config.to_dict()).items()})
        out["checkpoint.sha256"] = self.checkpoint.sha256
        return out

    def differences(self, other: "CacheRecord") -> list[str]:
        """One phrase per setting that differs from ``other``'s (this record's value first)."""
        a, b = self.identity(), other.identity()
        diffs = []
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                if k == "checkpoint.sha256":
                    diffs.append(f"checkpoint {self.checkpoint.name} vs {other.checkpoint.name} (other weights)")
                else:
                    diffs.append(f"{k} {a.get(k)!r} vs {b.get(k)!r}")
        return diffs


def _flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# format 1 / 2 fields of ``fit`` that were the MLP ensemble's options (model.json 3: fit.head_config)
_MLP_FIELDS = {"ensemble": "n_members", "recipe": "recipe", "max_epochs": "max_epochs", "pixel_fraction": "pixel_fraction",
               "batch_size": "batch_size", "lr": "lr", "precision": "precision"}


@dataclass(frozen=True)
class FitConfig:
    """model.json's ``fit`` section: what was fitted on which images, the head and its options.

    ``head_config`` holds the head's options as JSON values (the fields of the
    head's config dataclass, derived values resolved); :func:`ddpmseg.heads.get_head`
    turns it back into that dataclass.
    """

    images: tuple[str, ...]
    masks: str
    image_sha256: tuple[str, ...] = ()  # of each training image's file ("" if its cache had none: 0.1.0)
    seed: int = DEFAULT_SEED
    ignore_index: int = IGNORE_INDEX
    min_pixels: int = MIN_PIXELS
    n_pixels: int = 0
    n_iter: tuple[int, ...] = field(default_factory=tuple)
    head: str = "mlp"
    head_config: Mapping[str, Any] = field(default_factory=dict)
    untrained_classes: tuple[int, ...] = ()  # classes without a training pixel (never predicted); unknown before 0.2

    def __post_init__(self) -> None:
        object.__setattr__(self, "untrained_classes", tuple(int(c) for c in self.untrained_classes))
        object.__setattr__(self, "images", tuple(str(i) for i in self.images))
        object.__setattr__(self, "image_sha256", tuple(str(h) for h in self.image_sha256))
        object.__setattr__(self, "n_iter", tuple(int(i) for i in self.n_iter))
        object.__setattr__(self, "head_config", json.loads(json.dumps(dict(self.head_config))))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {**d, "images": list(self.images), "image_sha256": list(self.image_sha256), "n_iter": list(self.n_iter),
                "head_config": dict(self.head_config), "untrained_classes": list(self.untrained_classes)}

    def training_images(self, ids: list[str], sha256s: list[str]) -> list[str]:
        """Which of the images ``ids`` (with file digests ``sha256s``) this model was trained on:
        by content, or by id for training images whose digest is unknown (0.1.0's caches)."""
        known = {h for h in self.image_sha256 if h}
        by_id = {i for i, h in zip(self.images, self.image_sha256 or ("",) * len(self.images)) if not h}
        return [i for i, h in zip(ids, sha256s) if h in known or i in by_id]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "FitConfig":
        for key in ("images", "masks"):
            if key not in d:
                raise KeyError(f"fit.{key}")
        d = dict(d)
        if "head_config" not in d:  # formats 1 and 2
            head = d.get("head", "mlp")
            if head == "ddp":
                d["head_config"] = d.get("ddp") or {}
            else:
                # format 1 (0.1.0) knew only the reference recipe and saved no recipe
                old = {"recipe": "reference", **d}
                d["head_config"] = {new: old[k] for k, new in _MLP_FIELDS.items() if k in old}
        return cls(**{k: v for k, v in d.items() if k in _field_names(cls)})


@dataclass(frozen=True)
class ModelRecord:
    """model.json: how the features were made, the classes, and how the classifier was fitted."""

    backbone: BackboneSpec
    checkpoint: CheckpointRef
    extract: ExtractConfig
    classes: LabelSet
    fit: FitConfig
    format_version: int = MODEL_VERSION
    ddpmseg_version: str = __version__

    def __post_init__(self) -> None:  # one ignore label: the one the fit used (model.json stores it there)
        if self.classes.ignore_index != self.fit.ignore_index:
            object.__setattr__(self, "classes", dataclasses.replace(self.classes, ignore_index=self.fit.ignore_index))

    @property
    def labelset(self) -> LabelSet:
        """The classes, with the ignore label the fit used."""
        return self.classes

    def training_images(self, ids: list[str], sha256s: list[str]) -> list[str]:
        """Which of ``ids`` (file digests ``sha256s``) trained the model (:meth:`FitConfig.training_images`)."""
        return self.fit.training_images(ids, sha256s)

    def labelled_images(self, ids: list[str], sha256s: list[str]) -> list[str]:
        """Which of ``ids`` trained the model with a true mask (a teacher: every training image)."""
        return self.fit.training_images(ids, sha256s)

    @property
    def untrained_classes(self) -> tuple[int, ...]:
        return self.fit.untrained_classes

    def to_dict(self) -> dict[str, Any]:
        c = self.classes
        return {
            "format": MODEL_FORMAT,
            "format_version": self.format_version,
            "ddpmseg_version": self.ddpmseg_version,
            "backbone": self.backbone.to_dict(),
            "checkpoint": self.checkpoint.to_dict(),
            "extract": self.extract.to_dict(),
            "classes": {"name": c.name, "names": list(c.names), "colors": [list(x) for x in c.colors]},
            "fit": self.fit.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "model.json") -> "ModelRecord":
        version = _json_version(d, MODEL_FORMAT, MODEL_VERSION, source, "a ddpmseg model.json; rerun `ddpmseg fit` to write it")
        try:
            c = d["classes"]
            fit = FitConfig.from_dict(d["fit"])
            return cls(
                BackboneSpec.from_dict(d["backbone"]),
                CheckpointRef.from_dict(d["checkpoint"]),
                ExtractConfig.from_dict(d["extract"]),
                _labelset(c, fit.ignore_index),
                fit,
                version,
                str(d.get("ddpmseg_version", "?")),
            )
        except KeyError as e:
            raise DdpmsegError(f"{source} lacks the field {e}; rerun `ddpmseg fit` to rewrite it") from None


@dataclass(frozen=True)
class StudentRecord:
    """A student folder's model.json: a segmentation network distilled from a teacher model folder.

    ``student``: network name, input side ``size``, ``preprocess`` (the
    teacher's), parameter count; ``teacher``: its folder, head, backbone,
    checkpoint and training images; ``sources``: the unlabelled images and
    DDPM samples that were pseudo-labelled; ``filter``: the uncertainty filter
    and what it kept; ``training``: the settings, the epoch kept and the images
    (ids and file digests) the student was trained on.
    """

    classes: LabelSet
    student: Mapping[str, Any]
    teacher: Mapping[str, Any]
    sources: Mapping[str, Any]
    filter: Mapping[str, Any]
    training: Mapping[str, Any]
    format_version: int = STUDENT_VERSION
    ddpmseg_version: str = __version__

    @property
    def labelset(self) -> LabelSet:
        return self.classes

    @property
    def untrained_classes(self) -> tuple[int, ...]:
        return tuple(int(c) for c in self.training.get("untrained_classes", ()))

    def training_images(self, ids: list[str], sha256s: list[str]) -> list[str]:
        """Which of ``ids`` (file digests ``sha256s``) the student was trained on (real images, by content)."""
        return self._by_content("image_sha256", ids, sha256s)

    def labelled_images(self, ids: list[str], sha256s: list[str]) -> list[str]:
        """Which of ``ids`` trained the student with a true mask (the others it saw had the teacher's labels)."""
        return self._by_content("labelled_sha256", ids, sha256s)

    def _by_content(self, key: str, ids: list[str], sha256s: list[str]) -> list[str]:
        known = set(self.training.get(key, ()))
        return [i for i, h in zip(ids, sha256s) if h in known]

    def to_dict(self) -> dict[str, Any]:
        c = self.classes
        return json.loads(json.dumps({
            "format": STUDENT_FORMAT,
            "format_version": self.format_version,
            "ddpmseg_version": self.ddpmseg_version,
            "classes": {"name": c.name, "names": list(c.names), "colors": [list(x) for x in c.colors],
                        "ignore_index": c.ignore_index},
            "student": dict(self.student),
            "teacher": dict(self.teacher),
            "sources": dict(self.sources),
            "filter": dict(self.filter),
            "training": dict(self.training),
        }))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "model.json") -> "StudentRecord":
        version = _json_version(d, STUDENT_FORMAT, STUDENT_VERSION, source,
                                "a ddpmseg student's model.json; rerun `ddpmseg distill` to write it")
        try:
            labelset = _labelset(d["classes"], d["classes"].get("ignore_index", IGNORE_INDEX))
            return cls(labelset, d["student"], d["teacher"], d["sources"], d["filter"], d["training"], version,
                       str(d.get("ddpmseg_version", "?")))
        except KeyError as e:
            raise DdpmsegError(f"{source} lacks the field {e}; rerun `ddpmseg distill` to rewrite it") from None
