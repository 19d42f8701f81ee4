"""The paper's feature recipe: shared noise, q_sample, one forward per t, decoder taps.

For an image x0 in [-1, 1] of shape (1, 3, S, S), each timestep t gives
x_t = q_sample(x0, t, noise) with ONE noise tensor shared by every t and every
image; the U-Net runs on x_t at t and the outputs of the chosen decoder blocks
are kept at their native resolution. ``upsample_concat`` turns those maps into
the (C, S, S) pixel features of the paper: bilinear (align_corners=False),
timestep-major then block order.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

from ddpmseg.backbones import Backbone
from ddpmseg.errors import DdpmsegError

BlockMaps = Mapping[tuple[int, int], torch.Tensor]  # (t, block) -> (C, h, w)


def make_noise(seed: int, size: int, samples: int = 1) -> torch.Tensor:
    """The shared noise (samples, 3, S, S): ``samples`` draws one after another from one generator seeded
    by ``seed`` (the first is the paper's single noise), always on the CPU so runs are portable."""
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.cat([torch.randn((1, 3, size, size), generator=gen, dtype=torch.float32) for _ in range(samples)])


def extract_block_maps(
    backbone: Backbone,
    x0: torch.Tensor,
    noise: torch.Tensor,
    steps: Sequence[int],
    blocks: Sequence[int],
    batch_size: int = 0,
    precision: str = "fp32",
) -> dict[tuple[int, int], torch.Tensor]:
    """Native-resolution float32 block maps of one image for every (t, block), on the CPU.

    The timesteps of the image run as one batch (or ``batch_size`` at a time,
    0 = all at once); each forward stops after the last requested block and
    runs at ``precision`` (see ``Backbone.precision``). ``noise`` (n, 3, S, S):
    with n > 1 draws (``--noise-samples``) the maps are averaged over them.
    """
    if x0.ndim != 4 or x0.shape[0] != 1:
        raise DdpmsegError(f"an image tensor must have shape (1, 3, S, S), got {tuple(x0.shape)}")
    if batch_size < 0:
        raise DdpmsegError(f"--batch-size must be 0 (all timesteps at once) or positive, got {batch_size}")
    device = backbone.device
    x0 = x0.to(device)
    steps = list(steps)
    step_batch = batch_size or len(steps)
    out: dict[tuple[int, int], torch.Tensor] = {}
    for draw in noise.to(device):
        for start in range(0, len(steps), step_batch):
            chunk = steps[start : start + step_batch]
            t = torch.tensor(chunk, device=device, dtype=torch.long)
            n = len(chunk)
            x_t = backbone.q_sample(x0.expand(n, -1, -1, -1), t, draw[None].expand(n, -1, -1, -1))
            with backbone.precision(precision):
                maps = backbone.forward_intermediates(x_t, t, blocks)
            for j, step in enumerate(chunk):
                for b in blocks:
                    m = maps[b][j].float().cpu()
                    out[(step, b)] = m if (step, b) not in out else out[(step, b)] + m
    if len(noise) > 1:  # (inference tensors: no in-place updates outside inference mode)
        out = {k: v / len(noise) for k, v in out.items()}
    return out


def upsample_concat(maps: BlockMaps, keys: Sequence[tuple[int, int]], size: int) -> torch.Tensor:
    """The paper's pixel features: each map upsampled to (size, size), concatenated (C, S, S)."""
    ups = [
        F.interpolate(
            torch.as_tensor(maps[k]).float()[None], size=(size, size), mode="bilinear", align_corners=False
        )[0]
        for k in keys
    ]
    return torch.cat(ups, dim=0)
