"""Training images, streamed from disk: one deterministic batch per step.

Every random choice of a training sample (which image, its flip and crop, its
timestep and noise) comes from a generator seeded by the run's seed and the
sample's global index ``k = step * batch_size + j``. So a run resumed at any
step draws exactly what the uninterrupted run drew, and ``W`` processes that
each take their share of a step's samples draw what one process taking them
all would.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from ddpmseg import data

# what each seeded generator of a sample is for
AUGMENT, DIFFUSION, STEP = 0, 1, 2


def seed_of(seed: int, index: int, purpose: int) -> int:
    """A well-mixed 63-bit seed for sample (or step) ``index`` of a run and one ``purpose``."""
    state = np.random.SeedSequence([seed, index, purpose]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def generator(seed: int, index: int, purpose: int) -> torch.Generator:
    """A CPU generator seeded by :func:`seed_of`."""
    return torch.Generator().manual_seed(seed_of(seed, index, purpose))


def image_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The shuffled order of the ``n`` images in ``epoch``."""
    return torch.randperm(n, generator=generator(seed, epoch, STEP + 1))


class TrainImages(torch.utils.data.Dataset):
    """Item ``step``: the (B_local, 3, S, S) images in [-1, 1] of this process's share of that step.

    Images are read (any size, mode) with the project's reader and mapped to
    S x S by ``preprocess`` (``resize``, ``crop``, or ``random-crop``: the
    short side to S and a random S x S window along the long side), then
    flipped left-right at random when ``flip``.
    """

    def __init__(self, paths: Sequence[Path], size: int, batch_size: int, seed: int, preprocess: str = "resize",
                 flip: bool = True, rank: int = 0, world: int = 1) -> None:
        self.paths, self.size, self.batch_size, self.seed = list(paths), size, batch_size, seed
        self.preprocess, self.flip, self.rank, self.world = preprocess, flip, rank, world

    def samples(self, step: int) -> list[int]:
        """Global sample indices of this process's share of ``step``."""
        share = self.batch_size // self.world
        first = step * self.batch_size + self.rank * share
        return list(range(first, first + share))

    def image_of(self, k: int) -> int:
        n = len(self.paths)
        return int(image_order(self.seed, k // n, n)[k % n])

    def load(self, k: int) -> torch.Tensor:
        g = generator(self.seed, k, AUGMENT)
        flip, where = bool(torch.rand((), generator=g) < 0.5), float(torch.rand((), generator=g))
        rgb = data.load_rgb(self.paths[self.image_of(k)])
        if self.preprocess == "random-crop":
            pre = data.Preprocess.plan((rgb.shape[1], rgb.shape[0]), self.size, "crop")
            (rw, rh), s = pre.resized_size, self.size
            left, top = round(where * (rw - s)), round(where * (rh - s))
            img = Image.fromarray(rgb).resize((rw, rh), Image.BILINEAR).crop((left, top, left + s, top + s))
            x = torch.from_numpy(np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0)
        else:
            x = data.preprocess_image(rgb, self.size, self.preprocess)[0][0]
        return x.flip(-1) if self.flip and flip else x

    def __len__(self) -> int:
        return 2**62  # any step; the loader's sampler says which

    def __getitem__(self, step: int) -> torch.Tensor:
        return torch.stack([self.load(k) for k in self.samples(step)])
