"""Helpers shared by the fidelity tests: the naive reference recipe, the reference's
image preprocessing (both written independently of ddpmseg) and the relative error."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def reference_image_tensor(path, size: int) -> torch.Tensor:
    """(1, 3, size, size) in [-1, 1]: PIL bilinear resize, /127.5 - 1, as the reference does."""
    img = Image.open(path).convert("RGB").resize((size, size), Image.BILINEAR)
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference relative to the largest magnitude of ``b``."""
    return float((a - b).abs().max() / b.abs().max())


def hooked_recipe(taps: dict, forward, x0: torch.Tensor, noise: torch.Tensor, steps, T: int = 1000) -> torch.Tensor:
    """The paper's recipe, naively: closed-form q_sample on guided-diffusion's linear
    schedule, one full forward per t (``forward(x_t, t)``), forward hooks on the
    modules ``taps`` ({block: module}), bilinear upsampling, timestep-major concat."""
    betas = np.linspace(0.0001 * 1000 / T, 0.02 * 1000 / T, T, dtype=np.float64)
    abar = np.cumprod(1.0 - betas)
    outputs = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, b=b: outputs.__setitem__(b, out)) for b, m in taps.items()]
    feats = []
    try:
        for t in steps:
            x_t = float(np.sqrt(abar[t])) * x0 + float(np.sqrt(1 - abar[t])) * noise
            with torch.no_grad():
                forward(x_t, torch.tensor([t]))  # full forward, output head included
            for b in taps:
                feats.append(F.interpolate(outputs[b], size=x0.shape[-2:], mode="bilinear", align_corners=False)[0])
    finally:
        for h in hooks:
            h.remove()
    return torch.cat(feats, dim=0)
