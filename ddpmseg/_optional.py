"""Imports of the packages ddpmseg uses only on some paths, in one place.

guided-diffusion is a core dependency, but its modules raise torch
FutureWarnings on import and two of them (``dist_util``, ``train_util``) need
MPI: only the MPI-free ones are imported, quietly. diffusers, huggingface_hub,
ray, monai/onnx (``distill``) and starlette/uvicorn (``label``) are optional extras: a missing one is a one-line error that says
which extra to install.
"""

from __future__ import annotations

import importlib
import warnings
from types import ModuleType

from ddpmseg.errors import DdpmsegError

# top-level package -> how to install it
_INSTALL = {
    "guided_diffusion": "pip install guided-diffusion-sdk",
    "diffusers": 'pip install "ddpmseg[diffusers]"',
    "safetensors": 'pip install "ddpmseg[diffusers]"',
    "huggingface_hub": 'pip install "ddpmseg[diffusers]"',
    "ray": 'pip install "ddpmseg[ray]"',
    "monai": 'pip install "ddpmseg[distill]"',
    "onnx": 'pip install "ddpmseg[distill]"',
    "onnxruntime": 'pip install "ddpmseg[distill]"',
    "onnxscript": 'pip install "ddpmseg[distill]"',
    "starlette": 'pip install "ddpmseg[label]"',
    "uvicorn": 'pip install "ddpmseg[label]"',
    "pycocotools": 'pip install "ddpmseg[instances]"',
}
GUIDED_DIFFUSION_MODULES = ("script_util", "unet", "gaussian_diffusion", "nn", "respace", "resample", "losses")


def optional_import(module: str, purpose: str) -> ModuleType:
    """``import module`` (FutureWarnings silenced), or a DdpmsegError naming what to install for ``purpose``."""
    top = module.split(".")[0]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return importlib.import_module(module)
    except ImportError as e:
        if e.name is not None and e.name.split(".")[0] != top:
            raise  # the package is there but broken (a dependency of it is missing): not ours to rephrase
        hint = _INSTALL.get(top, f"pip install {top}")
        raise DdpmsegError(f"{purpose} needs the {top} package; install it: {hint}") from None


def guided_diffusion(name: str) -> ModuleType:
    """One of guided-diffusion's MPI-free modules (``script_util``, ``unet``, ``gaussian_diffusion``, ...)."""
    if name not in GUIDED_DIFFUSION_MODULES:
        raise ValueError(f"guided_diffusion.{name} is not one of the MPI-free modules {GUIDED_DIFFUSION_MODULES}")
    return optional_import(f"guided_diffusion.{name}", "the ADM (guided-diffusion) U-Net")


def diffusers() -> ModuleType:
    return optional_import("diffusers", "diffusers backbones")
