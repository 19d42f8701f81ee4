"""Helpers shared by the fidelity tests: the reference's image preprocessing
(written independently of ddpmseg.data) and the relative error they report."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def reference_image_tensor(path, size: int) -> torch.Tensor:
    """(1, 3, size, size) in [-1, 1]: PIL bilinear resize, /127.5 - 1, as the reference does."""
    img = Image.open(path).convert("RGB").resize((size, size), Image.BILINEAR)
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference relative to the largest magnitude of ``b``."""
    return float((a - b).abs().max() / b.abs().max())
