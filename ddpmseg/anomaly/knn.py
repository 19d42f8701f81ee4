"""PatchCore-style anomaly maps on the frozen DDPM features (Roth et al., CVPR 2022).

The second detector of ``ddpmseg anomaly`` (``--method knn``); anomalib's
PatchCore is the anchor, with ddpmseg's extractor in place of an ImageNet CNN:

- patch features: the decoder block maps of ``extract`` (the same timesteps,
  blocks and shared noise as segmentation), each 3x3 average-pooled (stride 1,
  zero padding counted, the "locally aware" neighbourhood) at its native
  resolution, resized (bilinear) to a ``grid`` x ``grid`` patch grid and
  concatenated: one vector per grid cell;
- the memory bank: every patch of the normal images (the default: on real
  defects all patches scored above PatchCore's 1 % coreset, see
  docs/anomaly.md) or, with ``coreset`` < 1, a coreset chosen by greedy
  k-centre selection (distances on a Gaussian random projection to
  ~24.7 ln N dimensions, the Johnson-Lindenstrauss size anomalib uses; the
  bank keeps the full vectors); at most ``max_mb`` of float32 vectors, a
  random sample of them beyond (the memory, and the time a test patch takes,
  grow with the bank);
- a patch's score: the Euclidean distance to its nearest bank vector; the map:
  the patch scores resized to the model grid (bilinear) and smoothed (Gaussian,
  sigma 4 px of a 256 px grid, scaled); the image score: the largest patch score.

The bank's ``radius`` is the largest distance of a normal patch to the bank
built without its own image (checked on up to 32 normal images): the top of
the colour scale, since a patch beyond it lies farther from the normal
patches than any normal patch of an unseen normal image did.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ddpmseg._io import write_atomic
from ddpmseg.anomaly.config import KNN_MAX_GRID
from ddpmseg.backbones import Backbone
from ddpmseg.errors import DdpmsegError
from ddpmseg.features.extractor import extract_block_maps

RADIUS_IMAGES = 32  # normal images whose patches, left out of the bank, set its radius
BANK_FILE = "knn_bank.npz"  # beside the outputs: the second call with the same normal images and settings reuses it


@dataclass(frozen=True)
class KnnSettings:
    """What fixes a bank besides the weights and the normal images."""

    steps: tuple[int, ...]
    blocks: tuple[int, ...]
    seed: int
    grid: int
    pool: int = 3
    coreset: float = 1.0  # fraction of the normal patches kept by greedy k-centre selection (1: every patch)
    scale: bool = True  # each block map divided by its RMS over the normal patches (else the largest blocks dominate)
    max_mb: float = 512.0  # the bank's float32 vectors at most this many MiB: a random sample of the patches beyond

    def bank_size(self, n_patches: int, dims: int) -> int:
        """How many of ``n_patches`` normal patches of ``dims`` numbers the bank keeps."""
        return max(1, min(round(self.coreset * n_patches), self.max_patches(dims)))

    def max_patches(self, dims: int) -> int:
        return max(1, int(self.max_mb * 2**20 // (4 * max(dims, 1))))


def patch_features(backbone: Backbone, x0: torch.Tensor, noise: torch.Tensor, settings: KnnSettings,
                   precision: str = "fp32") -> torch.Tensor:
    """(grid * grid, D) patch vectors of one image ``x0`` (1, 3, S, S), in (t, block) order."""
    maps = extract_block_maps(backbone, x0, noise, settings.steps, settings.blocks, precision=precision)
    g, p = settings.grid, settings.pool
    parts = []
    for t in settings.steps:
        for b in settings.blocks:
            m = maps[(t, b)][None]
            if p > 1:
                m = F.avg_pool2d(m, p, stride=1, padding=p // 2)
            parts.append(F.interpolate(m, size=(g, g), mode="bilinear", align_corners=False)[0])
    return torch.cat(parts).flatten(1).T.contiguous()


def block_widths(backbone: Backbone, settings: KnnSettings) -> list[int]:
    """The channels of each (t, block) part of a patch vector."""
    ch = {b.index: b.channels for b in backbone.blocks()}
    return [ch[b] for _ in settings.steps for b in settings.blocks]


def _sq_dists(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((x * x).sum(1, keepdim=True) - 2 * x @ y.T + (y * y).sum(1)[None]).clamp_min_(0)


def nearest_distance(x: torch.Tensor, bank: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Each row of ``x``'s Euclidean distance to its nearest row of ``bank``."""
    out = torch.full((len(x),), float("inf"))
    for lo in range(0, len(bank), chunk):
        out = torch.minimum(out, _sq_dists(x, bank[lo : lo + chunk]).min(1).values)
    return out.sqrt()


def greedy_coreset(x: torch.Tensor, n: int, seed: int = 0, progress: Callable[[int], None] | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of ``n`` rows of ``x`` chosen by greedy k-centre selection, and every row's distance
    to the chosen ones, both measured on a Gaussian random projection of ``x``.

    Starts from one random row; each step adds the row farthest from all chosen so far."""
    gen = torch.Generator().manual_seed(seed)
    k = min(x.shape[1], max(1, int(4 * math.log(len(x)) / (0.9**2 / 2 - 0.9**3 / 3))))
    z = x @ torch.randn(x.shape[1], k, generator=gen) / math.sqrt(k) if k < x.shape[1] else x
    chosen = torch.empty(n, dtype=torch.long)
    chosen[0] = int(torch.randint(len(z), (1,), generator=gen))
    zz = (z * z).sum(1)
    dist = torch.full((len(z),), float("inf"))
    for i in range(n):
        c = z[chosen[i]]
        dist = torch.minimum(dist, (zz - 2 * z @ c + c @ c).clamp_min_(0))
        if i + 1 < n:
            chosen[i + 1] = int(dist.argmax())
        if progress is not None:
            progress(1)
    return chosen, dist.sqrt()


@dataclass
class PatchBank:
    """The normal patches a test patch is compared with."""

    vectors: torch.Tensor  # (M, D) float32, already scaled
    scale: torch.Tensor  # (D,) what each patch vector is multiplied by first
    radius: float  # the largest distance of a normal patch to the bank without its own image (see _radius)
    key: str  # what the bank was built from (weights, images, settings)

    def distances(self, patches: torch.Tensor) -> torch.Tensor:
        return nearest_distance(patches * self.scale, self.vectors)

    def save(self, path: Path) -> None:
        def write(tmp: Path) -> None:
            with tmp.open("wb") as f:  # no pickles: plain arrays and the key as text
                np.savez(f, vectors=self.vectors.numpy(), scale=self.scale.numpy(),
                         radius=np.float64(self.radius), key=np.array(self.key))

        write_atomic(path, write)

    @classmethod
    def load(cls, path: Path) -> "PatchBank":
        with np.load(path, allow_pickle=False) as z:
            return cls(torch.from_numpy(z["vectors"]), torch.from_numpy(z["scale"]), float(z["radius"]), str(z["key"]))


def bank_key(weights: str, images: Sequence[str], settings: KnnSettings) -> str:
    """A digest of what fixes the bank: the checkpoint's identity, the normal images' contents, the settings."""
    text = json.dumps({"weights": weights, "images": sorted(images), "settings": asdict(settings)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def build_bank(features: Sequence[torch.Tensor], widths: Sequence[int], settings: KnnSettings, key: str,
               progress: Callable[[int], None] | None = None) -> PatchBank:
    """The bank of the normal images' patch ``features`` (one (P, D) tensor per image)."""
    x = torch.cat(list(features)).float()
    owner = torch.repeat_interleave(torch.arange(len(features)), torch.tensor([len(f) for f in features]))
    if settings.scale:  # one factor per (t, block) part: 1 / its RMS over all normal patches
        parts = torch.split(x, list(widths), dim=1)
        scale = torch.cat([torch.full((w,), 1.0 / max(float(p.pow(2).mean().sqrt()), 1e-12)) for p, w in zip(parts, widths)])
    else:
        scale = torch.ones(x.shape[1])
    x = x * scale
    n = settings.bank_size(len(x), x.shape[1])
    if n >= len(x):
        chosen = torch.arange(len(x))
    elif settings.coreset < 1:
        chosen = greedy_coreset(x, n, settings.seed, progress)[0]
    else:  # every patch, but more than max_mb holds: a random sample (greedy selection of so many would take hours)
        gen = torch.Generator().manual_seed(settings.seed)
        chosen = torch.randperm(len(x), generator=gen)[:n].sort().values
    bank, bank_owner = x[chosen].contiguous(), owner[chosen]
    return PatchBank(bank, scale, _radius(x, owner, bank, bank_owner, settings.seed), key)


def _radius(x: torch.Tensor, owner: torch.Tensor, bank: torch.Tensor, bank_owner: torch.Tensor, seed: int,
            images: int = RADIUS_IMAGES) -> float:
    """The largest distance of a normal patch to the bank without its own image's patches, over up to
    ``images`` normal images: how far a normal patch of an image the bank never saw may lie."""
    n_images = int(owner.max()) + 1
    if n_images < 2:
        return 0.0
    picked = torch.randperm(n_images, generator=torch.Generator().manual_seed(seed))[:images]
    top = 0.0
    for i in picked.tolist():
        others = bank[bank_owner != i]
        if len(others):
            top = max(top, float(nearest_distance(x[owner == i], others).max()))
    return top


def patch_map(scores: torch.Tensor, grid: int, size: int) -> np.ndarray:
    """The (grid * grid,) patch scores as a (size, size) map: bilinear, then Gaussian (sigma 4 px at 256)."""
    m = F.interpolate(scores.reshape(1, 1, grid, grid), size=(size, size), mode="bilinear", align_corners=False)[0, 0]
    sigma = 4.0 * size / 256
    if sigma >= 0.5:
        from scipy.ndimage import gaussian_filter

        return gaussian_filter(m.numpy(), sigma=sigma, mode="nearest").astype(np.float32)
    return m.numpy().astype(np.float32)


def default_grid(size: int) -> int:
    """The patch grid of a ``size`` px model: half its grid, at most KNN_MAX_GRID cells a side."""
    return max(1, min(size // 2, KNN_MAX_GRID))


def check_settings(settings: KnnSettings, size: int) -> None:
    if not 0 < settings.coreset <= 1:
        raise DdpmsegError(f"--coreset {settings.coreset}: give the fraction of normal patches kept, in (0, 1]")
    if not settings.max_mb > 0:
        raise DdpmsegError(f"--max-bank-mb {settings.max_mb:g}: give the bank's largest size in MiB, above 0")
    if not 1 <= settings.grid <= size:
        raise DdpmsegError(f"--grid {settings.grid}: give a patch grid of 1..{size} (the model grid) cells a side")
    if settings.pool < 1 or settings.pool % 2 == 0:
        raise DdpmsegError(f"pool {settings.pool}: give an odd neighbourhood size (1, 3, 5)")


def describe(bank: PatchBank, n_images: int) -> dict[str, Any]:
    """What the CLI says of a bank: its normal images, patches, their length, MiB and radius."""
    return {"images": n_images, "patches": int(len(bank.vectors)), "dims": int(bank.vectors.shape[1]),
            "radius": bank.radius, "mb": round(bank.vectors.numel() * 4 / 2**20, 1)}
