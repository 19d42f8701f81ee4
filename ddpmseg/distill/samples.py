"""Images drawn from a backbone's DDPM (:func:`ddpmseg.sampling.generate`), written one PNG each, resumably.

Sample i is ``sample_{i:05d}.png`` and depends on (``seed``, i) alone: one CPU
generator per sample, seeded from the pair, draws its initial noise and then,
when sampling is ancestral, every step's noise for that sample only. So a
sample is the same whatever the batch size, whichever other samples exist
already, and on any device up to the device's arithmetic. Finished PNGs (each
written by one rename) are kept, so a rerun after a kill draws only the missing
ones. One writer per folder.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ddpmseg._io import check_writable, remove_stale_temps
from ddpmseg.backbones import Backbone
from ddpmseg.errors import DdpmsegError
from ddpmseg.sampling import ReverseProcess, check_sampling_args, resolve_ancestral
from ddpmseg.viz import save_png_atomic

PREFIX = "sample_"


def sample_path(folder: str | Path, i: int) -> Path:
    """Where sample ``i`` lives in ``folder``."""
    return Path(folder) / f"{PREFIX}{i:05d}.png"


def sample_generator(seed: int, i: int) -> torch.Generator:
    """Sample ``i``'s CPU generator: seeded from (``seed``, ``i``) through numpy's SeedSequence, so
    neighbouring seeds and indices give unrelated streams."""
    state = np.random.SeedSequence([seed, i]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator(device="cpu").manual_seed(int(state))


def write_samples(backbone: Backbone, folder: str | Path, n: int, *, sample_steps: int, seed: int = 0,
                  batch_size: int = 8, ancestral: bool | None = None, precision: str = "fp32",
                  progress: bool = False) -> list[Path]:
    """Draw samples 0..n-1 into ``folder`` as RGB PNGs at the backbone's image size; those already there
    are kept. Returns the n paths in order.

    ``ancestral``: None (the default) samples ancestrally over every step when ``sample_steps``
    reaches the diffusion's step count T (the reference's 1000-step sampling), else DDIM over
    ``sample_steps`` steps (see :func:`ddpmseg.sampling.generate`).
    """
    if n < 0:
        raise DdpmsegError(f"{n} samples asked for; give a count >= 0")
    if batch_size < 1:
        raise DdpmsegError(f"--batch-size {batch_size}: give at least 1")
    if seed < 0:
        raise DdpmsegError(f"--seed {seed}: give a seed >= 0")
    check_sampling_args(backbone, sample_steps, precision)
    folder = check_writable(folder, folder=True, option="samples folder")
    paths = [sample_path(folder, i) for i in range(n)]
    if not n:
        return paths
    folder.mkdir(parents=True, exist_ok=True)
    todo = [i for i, p in enumerate(paths) if not p.exists()]
    # what a killed writer left: one listing of the folder, not one glob per sample
    stale = {name.split(".")[1] for name in os.listdir(folder)
             if name.startswith(f".{PREFIX}") and name.endswith(".tmp")}
    for i in todo:
        if paths[i].stem in stale:
            remove_stale_temps(paths[i])
    process = ReverseProcess(backbone, sample_steps, resolve_ancestral(backbone, sample_steps, ancestral),
                             precision, seed)
    size = backbone.image_size
    with tqdm(total=n, initial=n - len(todo), desc="samples", unit="image", disable=not progress) as bar:
        for lo in range(0, len(todo), batch_size):
            batch = todo[lo : lo + batch_size]
            generators = [sample_generator(seed, i) for i in batch]
            noise = torch.cat([torch.randn((1, 3, size, size), generator=g, dtype=torch.float32) for g in generators])
            x = process.run(noise, process.n_steps - 1, generators)
            images = ((x + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).cpu().numpy()
            for i, image in zip(batch, images):
                save_png_atomic(paths[i], image)
            bar.update(len(batch))
    return paths
