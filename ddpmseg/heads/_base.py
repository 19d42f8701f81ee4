"""What every head shares: its registry entry, the inputs of ``fit`` and the output of prediction.

A head is one module ``ddpmseg/heads/<name>.py`` that defines

- a config dataclass (torch-free; its fields are the head's options, each with a
  ``metadata={"help": ...}``): what ``fit --head-option key=value`` sets,
  ``ddpmseg heads`` lists and model.json stores as ``fit.head_config``;
- an estimator with the scikit-learn contract: every config field, plus
  ``n_classes``, ``ignore_index``, ``random_state``, ``device`` and
  ``progress``, is an ``__init__`` keyword stored unchanged (so ``get_params``
  and ``sklearn.base.clone`` work); ``fit(X, y)`` takes an :class:`ImageMaps`
  and one (S, S) label map per image and returns self; learned state ends in
  ``_`` (``n_iter_`` and ``final_loss_`` at least); an unfitted estimator
  raises :class:`NotFittedError`; ``predict_block_maps(maps, keys, size)``
  gives a :class:`Segmentation`; ``describe()`` is a one-line summary of the
  fit; ``state_dict()`` / ``from_state_dict(state, device, **params)`` hold
  the learned state (tensors.pt) while the settings live in model.json;
- ``HEAD = HeadSpec(name, summary, Config, Estimator)``.

The registry (:func:`ddpmseg.heads.get_head`) finds heads by module name, so
adding a head is one new file plus its tests.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from sklearn.exceptions import NotFittedError as _SkNotFittedError

from ddpmseg._io import read_json
from ddpmseg.errors import DdpmsegError

Key = tuple[int, int]  # (timestep, decoder block)
COMMON_PARAMS = ("n_classes", "ignore_index", "random_state", "device", "progress")  # fit sets these, not options


class NotFittedError(DdpmsegError, _SkNotFittedError):
    """Raised when a head is used before ``fit``."""


@dataclass
class Segmentation:
    """One image's prediction at the model's resolution (S, S)."""

    labels: np.ndarray  # int64
    uncertainty: np.ndarray  # float32, >= 0 (nats)
    proba: np.ndarray | None = None  # float32 (K, S, S), the mean softmax (what calibration scores)


@dataclass(frozen=True)
class ImageMaps:
    """``X`` of every head's ``fit``: per image its native block maps {(t, block): (C, h, w)}, the
    (t, block) order of the features (``keys``) and the side of the model grid (``size``); ``images``
    (optional): per image its model input (3, S, S) in [-1, 1], for a head that reads pixels (its
    ``needs_images`` is true; ``fit`` then passes them, and prediction ``image=``)."""

    maps: Sequence[Mapping[Key, Any]]
    keys: tuple[Key, ...]
    size: int
    images: Sequence[Any] | None = None

    def __len__(self) -> int:
        return len(self.maps)


def _optional(kind: Any) -> tuple[Any, bool]:
    """(the type inside ``Optional[T]`` / ``T | None``, True), or (``kind``, False)."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType) and type(None) in typing.get_args(kind):
        inner = [a for a in typing.get_args(kind) if a is not type(None)]
        if len(inner) == 1:
            return inner[0], True
    return kind, False


def _convert(value: Any, kind: Any, where: str) -> Any:
    """``value`` (a string from the command line, or a JSON value) as the field type ``kind``
    (bool, int, float, str, or one of them or None)."""
    inner, optional = _optional(kind)
    if inner not in (bool, int, float, str):
        raise TypeError(f"{where}: a head option must be a bool, int, float or str (or none), not {kind}")
    if optional:
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "")):
            return None
    kind = inner
    try:
        if isinstance(value, (list, dict)) or value is None:
            raise ValueError
        if kind is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("true", "1", "yes", "on"):
                return True
            if text in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(str(value).strip()) if isinstance(value, str) else int(value)
        if kind is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        return str(value)  # kind is str
    except (ValueError, TypeError):
        pass
    name = getattr(kind, "__name__", str(kind))
    raise DdpmsegError(f"{where}: {value!r} is not a valid {name}{' (or none)' if optional else ''}")


@dataclass(frozen=True)
class Option:
    """One option of a head, as ``ddpmseg heads`` lists it."""

    name: str
    type: str
    default: Any
    help: str


@dataclass(frozen=True)
class HeadSpec:
    """A head's registry entry: its name, a one-line summary, its config dataclass and estimator class.
    ``state_key``: the key of its learned state in tensors.pt (default: the name). ``task``:
    "semantic" (``fit(X, label maps)``, ``predict_block_maps``) or "instances" (``fit(X, instances)``
    with one :class:`ddpmseg.instances.Instances` per image, ``predict_instances(maps, keys, size)``)."""

    name: str
    summary: str
    config: type
    estimator: type
    state_key: str = ""
    task: str = "semantic"

    @property
    def key(self) -> str:
        return self.state_key or self.name

    def options(self) -> list[Option]:
        hints = typing.get_type_hints(self.config)
        out = []
        for f in dataclasses.fields(self.config):
            base, optional = _optional(hints[f.name])
            out.append(Option(f.name, getattr(base, "__name__", str(base)) + (" or none" if optional else ""),
                              f.default, f.metadata.get("help", "")))
        return out

    def convert(self, key: str, value: Any, where: str = "--head-option") -> Any:
        """``value`` of option ``key`` as the option's type; an unknown key or a value of the wrong
        type is a one-line error naming the valid keys (``where``: what gave it, for the message;
        from a model.json, an unknown key asks to upgrade)."""
        names = [f.name for f in dataclasses.fields(self.config)]
        if key not in names:
            fix = "upgrade ddpmseg" if "model.json" in where else "see `ddpmseg heads`"
            raise DdpmsegError(f"{where} {key}: the {self.name} head has no option {key!r}; "
                               f"its options are {', '.join(names)} ({fix})")
        return _convert(value, typing.get_type_hints(self.config)[key], f"{where} {key} ({self.name} head)")

    def make_config(self, options: Mapping[str, Any] | None = None, where: str = "--head-option") -> Any:
        """The head's config from ``options`` (strings from the command line or JSON values), each
        checked by :meth:`convert`, then by the config's own rules."""
        return self.config(**{k: self.convert(k, v, where) for k, v in dict(options or {}).items()})

    def build(self, config: Any, **common: Any) -> Any:
        """An unfitted estimator with the settings of ``config`` and the ``common`` ones (COMMON_PARAMS)."""
        return self.estimator(**dataclasses.asdict(config), **common)

    def fitted_config(self, estimator: Any) -> Any:
        """The config a fitted ``estimator`` ran with, derived values resolved (``batch_size_`` over
        ``batch_size``, and so on)."""
        values = {f.name: getattr(estimator, f.name + "_", getattr(estimator, f.name))
                  for f in dataclasses.fields(self.config)}
        return self.config(**values)

    def load(self, state: Mapping[str, Any], config: Any, device: str = "cpu", **common: Any) -> Any:
        """A fitted estimator from its learned ``state`` and its ``config``."""
        return self.estimator.from_state_dict(state, device=device, **dataclasses.asdict(config), **common)


def config_dict(config: Any) -> dict[str, Any]:
    """A config dataclass as JSON-ready values (tuples as lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The JSON object of ``--head-config FILE``."""
    path = Path(path)
    value = read_json(path, "--head-config", 'write one object such as {"steps": 3}')
    if not isinstance(value, dict):
        raise DdpmsegError(f"--head-config {path} holds a {type(value).__name__}; write one JSON object such as "
                           "{\"steps\": 3}")
    return value


def check_config(checks: Sequence[tuple[bool, str]], head: str) -> None:
    """Raise the first failed check's message as ``<head> head: <message>``."""
    for ok, msg in checks:
        if not ok:
            raise DdpmsegError(f"{head} head: {msg}")
