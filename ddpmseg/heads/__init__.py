"""Heads: what turns frozen diffusion features into a segmentation, one module each.

    mlp      PixelEnsemble: the paper's ensemble of pixel MLPs (the default)
    ddp      DDPHead: DDP's diffusion map decoder (denoises the label map), SegDiff's multiple generations
    _base    the contract every head follows (HeadSpec, ImageMaps, Segmentation, NotFittedError)

The registry finds heads by module name: ``ddpmseg/heads/<name>.py`` defining
``HEAD = HeadSpec(...)`` is the head ``<name>`` of ``fit --head``, model.json
and ``ddpmseg heads``. :func:`head_names` reads the folder only (importing this
package imports neither torch nor scikit-learn, so the CLI loads fast);
:func:`get_head` imports the head's module.
"""

from __future__ import annotations

import pkgutil
from importlib import import_module
from typing import TYPE_CHECKING, Any

from ddpmseg.errors import DdpmsegError

if TYPE_CHECKING:
    from ddpmseg.heads._base import HeadSpec

__all__ = ["HeadSpec", "ImageMaps", "NotFittedError", "Segmentation", "config_dict", "entropy", "get_head", "head_names",
           "list_heads", "mutual_information", "read_config_file"]


def head_names() -> list[str]:
    """The registered heads' names, sorted (the modules of this package; imports nothing)."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def get_head(name: str) -> HeadSpec:
    """The registry entry of head ``name``; an unknown name is a one-line error listing the heads."""
    if name not in head_names():
        raise DdpmsegError(f"head {name!r} is unknown: use one of {', '.join(head_names())} (see `ddpmseg heads`)")
    from ddpmseg.heads._base import HeadSpec

    spec = getattr(import_module(f"{__name__}.{name}"), "HEAD", None)
    if not isinstance(spec, HeadSpec) or spec.name != name:
        raise DdpmsegError(f"ddpmseg/heads/{name}.py defines no HEAD = HeadSpec({name!r}, ...); it is not a head")
    return spec


def list_heads() -> list[HeadSpec]:
    """Every head's registry entry."""
    return [get_head(n) for n in head_names()]


def __getattr__(name: str) -> Any:  # the contract's names, imported on first use
    if name in ("HeadSpec", "ImageMaps", "NotFittedError", "Segmentation", "config_dict", "read_config_file"):
        from ddpmseg.heads import _base

        return getattr(_base, name)
    if name in ("entropy", "mutual_information"):  # of the probabilities a head (or a student) predicts
        from ddpmseg.heads import _uncertainty

        return getattr(_uncertainty, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
