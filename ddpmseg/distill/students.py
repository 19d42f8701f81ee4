"""The student networks ``ddpmseg distill`` can train: small segmentation nets from MONAI.

MONAI's networks need only torch and numpy (torchvision's DeepLabV3, which the
reference trains, does not load beside this project's CPU torch build: its
compiled ops need CUDA libraries). Every student maps a (B, 3, S, S) image in
[-1, 1] to (B, K, S, S) logits; ``multiple`` is what S must be divisible by.
Random initialisation (seeded); ``load_weights`` loads a user's own weights.
Importing this module imports neither torch nor MONAI (the CLI lists the names).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ddpmseg._optional import optional_import
from ddpmseg.errors import DdpmsegError

if TYPE_CHECKING:
    import torch

PURPOSE = "ddpmseg distill's student networks"


def _monai_nets():
    return optional_import("monai.networks.nets", PURPOSE)


def _unet(k: int) -> torch.nn.Module:
    return _monai_nets().UNet(spatial_dims=2, in_channels=3, out_channels=k, channels=(16, 32, 64, 128, 256),
                              strides=(2, 2, 2, 2), num_res_units=2)


def _unet_wide(k: int) -> torch.nn.Module:
    return _monai_nets().UNet(spatial_dims=2, in_channels=3, out_channels=k, channels=(32, 64, 128, 256, 512),
                              strides=(2, 2, 2, 2), num_res_units=2)


def _basicunet(k: int) -> torch.nn.Module:
    return _monai_nets().BasicUNet(spatial_dims=2, in_channels=3, out_channels=k, features=(16, 16, 32, 64, 128, 16))


def _segresnet(k: int) -> torch.nn.Module:
    return _monai_nets().SegResNet(spatial_dims=2, in_channels=3, out_channels=k, init_filters=16)


def _flexunet_b0(k: int) -> torch.nn.Module:
    return _monai_nets().FlexibleUNet(in_channels=3, out_channels=k, backbone="efficientnet-b0", pretrained=False,
                                      spatial_dims=2)


@dataclass(frozen=True)
class StudentSpec:
    name: str
    summary: str
    build: Callable[[int], torch.nn.Module]
    multiple: int  # the input side must be a multiple of this


STUDENTS: dict[str, StudentSpec] = {s.name: s for s in (
    StudentSpec("unet", "MONAI UNet, residual units, channels 16-256 (1.6 M parameters)", _unet, 16),
    StudentSpec("unet-wide", "MONAI UNet, residual units, channels 32-512 (6.5 M parameters)", _unet_wide, 16),
    StudentSpec("basicunet", "MONAI BasicUNet, features 16-128 (0.5 M parameters)", _basicunet, 16),
    StudentSpec("segresnet", "MONAI SegResNet, 16 initial filters (1.6 M parameters)", _segresnet, 8),
    StudentSpec("flexunet-b0", "MONAI FlexibleUNet on an EfficientNet-B0 encoder (7.1 M parameters)", _flexunet_b0, 32),
)}
DEFAULT_STUDENT = "unet"


def get_student(name: str) -> StudentSpec:
    if name not in STUDENTS:
        raise DdpmsegError(f"--student {name!r} is not a student network; choose one of {', '.join(STUDENTS)}")
    return STUDENTS[name]


def build_student(name: str, n_classes: int, size: int, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised student (seeded, without touching the global generator's state)."""
    import torch

    spec = get_student(name)
    if size % spec.multiple or size < 2 * spec.multiple:  # its coarsest map needs more than one pixel to normalise
        raise DdpmsegError(f"--size {size}: the {name} student needs a side that is a multiple of {spec.multiple}, "
                           f"at least {2 * spec.multiple}; try --size {max(2 * spec.multiple, round(size / spec.multiple) * spec.multiple)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return spec.build(n_classes)


def load_weights(network: torch.nn.Module, path: str | Path) -> tuple[int, int]:
    """Load the tensors of ``path`` whose names and shapes match ``network``'s (a whole student's or an
    encoder's, with or without a ``state_dict``/``model`` wrapper); (loaded, total) tensors."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise DdpmsegError(f"--student-weights {path} is not a file; give a .pt/.pth file of weights")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise DdpmsegError(f"--student-weights {path} is not a torch weights file ({type(e).__name__}); "
                           "save one with torch.save(model.state_dict(), path)") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise DdpmsegError(f"--student-weights {path} holds no state dict of tensors")
    own = network.state_dict()
    matched = {}
    for name, tensor in state.items():
        for candidate in (name, f"encoder.{name}", name.removeprefix("module.")):
            if candidate in own and isinstance(tensor, torch.Tensor) and own[candidate].shape == tensor.shape:
                matched[candidate] = tensor
                break
    if not matched:
        raise DdpmsegError(f"--student-weights {path}: none of its {len(state)} tensors fits the student "
                           "(names and shapes differ); give weights of the same architecture (--student)")
    network.load_state_dict(matched, strict=False)
    return len(matched), len(own)
