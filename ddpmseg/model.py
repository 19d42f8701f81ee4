"""A fitted segmentation model: backbone spec + extraction config + pixel ensemble.

A model directory holds
    model.json    readable config: ddpmseg version, backbone (family, preset,
                  guided-diffusion flags), checkpoint (path, file name, sha256),
                  extraction (steps, blocks, seed, preprocessing), classes
                  (names, colours), fit settings and training images
    tensors.pt    {"ensemble": PixelEnsemble.state_dict(), "noise": (1,3,S,S)}
                  (tensors and plain values only: loads with weights_only=True)
Both files are written atomically (temp file + rename).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ddpmseg._version import __version__
from ddpmseg.classify.ensemble import PixelEnsemble
from ddpmseg.data import LabelSet
from ddpmseg._io import write_atomic
from ddpmseg.errors import DdpmsegError

MODEL_FILES = ("model.json", "tensors.pt")


@dataclass
class Segmentation:
    """One image's prediction at the model's resolution (S, S)."""

    labels: np.ndarray  # int64, majority vote
    uncertainty: np.ndarray  # float32, entropy of mean softmax - mean entropy


@torch.inference_mode()
def classify_block_maps(
    ensemble: PixelEnsemble,
    maps: Mapping[tuple[int, int], np.ndarray | torch.Tensor],
    keys: Sequence[tuple[int, int]],
    size: int,
    chunk: int = 16384,
) -> Segmentation:
    """Classify every pixel of one image from its native block maps.

    The first layer is linear and bilinear upsampling is linear with weights
    summing to one, so W·up(F) + b = up(W·F) + b: layer 1 runs at each map's
    native resolution and only its (members x hidden) outputs are upsampled,
    never the C-channel pixel features. Maps of the same native resolution
    are summed before the one upsampling of that resolution.
    """
    weight, bias = ensemble.first_layer()  # (M, D, H1), (M, H1)
    m, d, h1 = weight.shape
    device = weight.device
    per_res: dict[tuple[int, int], torch.Tensor] = {}  # (h, w) -> sum of W_k F_k, (M*H1, h*w)
    col = 0
    for k in keys:
        f = torch.as_tensor(maps[k]).to(device=device, dtype=torch.float32)
        c, h, w = f.shape
        w_k = weight[:, col : col + c].permute(1, 0, 2).reshape(c, m * h1)  # member-major columns
        z = torch.mm(w_k.T, f.reshape(c, h * w))
        if (h, w) in per_res:
            per_res[(h, w)] += z
        else:
            per_res[(h, w)] = z
        col += c
    if col != d:
        raise DdpmsegError(f"features have {col} channels but the classifier expects {d}; refit the model")
    hidden = torch.zeros((m * h1, size, size), dtype=torch.float32, device=device)
    for (h, w), z in per_res.items():
        hidden += F.interpolate(z.reshape(1, m * h1, h, w), size=(size, size), mode="bilinear", align_corners=False)[0]
    hidden = hidden.reshape(m, h1, size * size).transpose(1, 2) + bias[:, None, :]
    labels, unc = [], []
    for start in range(0, size * size, chunk):
        logits = ensemble.head_from_hidden1(hidden[:, start : start + chunk])
        lab, u = ensemble.vote(logits)
        labels.append(lab)
        unc.append(u)
    return Segmentation(
        labels=torch.cat(labels).reshape(size, size).cpu().numpy(),
        uncertainty=torch.cat(unc).reshape(size, size).float().cpu().numpy(),
    )


class SegmentationModel:
    """What ``ddpmseg fit`` writes and ``predict`` / ``evaluate`` read."""

    def __init__(self, config: dict[str, Any], ensemble: PixelEnsemble, noise: torch.Tensor) -> None:
        self.config = config
        self.ensemble = ensemble
        self.noise = noise

    @property
    def labelset(self) -> LabelSet:
        c = self.config["classes"]
        return LabelSet(c["name"], tuple(c["names"]), tuple(tuple(x) for x in c["colors"]))

    @property
    def keys(self) -> list[tuple[int, int]]:
        e = self.config["extract"]
        return [(t, b) for t in e["steps"] for b in e["blocks"]]

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        if directory.exists() and not directory.is_dir():
            raise DdpmsegError(f"--out {directory} exists and is not a folder; choose a folder name")
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DdpmsegError(f"cannot create model folder {directory}: {e.strerror}") from None
        tensors = {"ensemble": self.ensemble.state_dict(), "noise": self.noise.cpu()}
        write_atomic(directory / "tensors.pt", lambda p: torch.save(tensors, p))
        text = json.dumps(self.config, indent=2, sort_keys=True)
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
            raise DdpmsegError(f"model folder {directory} lacks {', '.join(missing)}; rerun `ddpmseg fit` to rewrite it")
        try:
            config = json.loads((directory / "model.json").read_text())
            if config.get("format") != "ddpmseg-model":
                raise ValueError("not a ddpmseg model.json")
            tensors = torch.load(directory / "tensors.pt", map_location="cpu", weights_only=True)
            ensemble = PixelEnsemble.from_state_dict(tensors["ensemble"])
            noise = tensors["noise"]
        except Exception as e:  # any corruption of the two files means the same fix
            raise DdpmsegError(f"model folder {directory} is damaged ({type(e).__name__}: {e}); rerun `ddpmseg fit`") from None
        ensemble.to(device)
        return cls(config, ensemble, noise)


def model_config(cache_config: dict[str, Any], labelset: LabelSet, fit: dict[str, Any]) -> dict[str, Any]:
    """model.json: the cache's extraction provenance plus classes and fit settings."""
    return {
        "format": "ddpmseg-model",
        "ddpmseg_version": __version__,
        "backbone": cache_config["backbone"],
        "checkpoint": cache_config["checkpoint"],
        "extract": cache_config["extract"],
        "classes": {"name": labelset.name, "names": list(labelset.names), "colors": [list(c) for c in labelset.colors]},
        "fit": fit,
    }
