"""SegDiff (Amit et al. 2021, arXiv 2112.00390) as a head: a denoiser of the mask conditioned on the image.

    head = SegDiffHead(n_classes=6, random_state=0).fit(ImageMaps(maps, keys, size, images), labels)
    seg = head.predict_block_maps(maps[0], keys, size, image=images[0])   # Segmentation

``fit --head segdiff`` builds it from :class:`SegDiffConfig` (every field is also a keyword of SegDiffHead).

The recipe (``../shared/METHODS.md``, "SegDiff"; written from the paper's description):

- The mask, K one-hot channels in [-1, 1] (the paper's binary case is one
  channel; here every class has its own), is diffused with T = ``timesteps``
  (100) steps of linear betas rescaled by 1000 / T (0.001 .. 0.2 at T = 100).
- The denoiser is a small U-Net (residual blocks with an added time
  embedding, GroupNorm, no batch norm; self-attention at the lowest level).
  Its first layer F is a 3x3 conv on x_t; the image encoder G is an RRDB
  network (residual-in-residual dense blocks, no batch norm) on the pixels;
  ``F(x_t) + G(I)`` enters the rest of the U-Net. Trained end to end with
  epsilon prediction and MSE (over labelled pixels), AdamW, an EMA of the
  weights (with the usual ``(1 + n) / (10 + n)`` warm-up, so a short run's
  average is not dominated by its random start), random crops and flips of the
  labelled images only.
- ``encoder=frozen``: G reads the frozen DDPM block maps (resized to the grid,
  standardised, a 1x1 conv into the same RRDB trunk) instead of the pixels.
- ``diffusion=false``: the control. The same network run once at t = 0 on
  x_t = 0 and trained with cross-entropy: G(I) straight to the mask.
- Inference: ``generations`` noise draws run as one batch, each denoised by
  ancestral sampling over every step (the paper's; fixed variance beta_t) or
  DDIM (eta 0) over ``steps`` evenly spaced steps; predicted x0 clipped to
  [-1, 1]. The mean of the generations' final masks, mapped from [-1, 1] to
  [0, 1] and normalised over the classes, is the probability map; its argmax
  the label (for one-channel binary SegDiff this is its 0.5 threshold). The
  uncertainty is the generations' disagreement: the mutual information of
  their one-hot votes (entropy of the vote shares; 0 where all agree), or,
  with one generation, the entropy of the probability map.

The RRDB encoder needs the images: :class:`~ddpmseg.heads.ImageMaps`'
``images`` (3, S, S) in [-1, 1] on the model grid, and ``image=`` at
prediction (``ddpmseg fit`` / ``predict`` pass them when
:attr:`SegDiffHead.needs_images`).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.base import BaseEstimator
from torch import nn
from tqdm.auto import tqdm

from ddpmseg.errors import DdpmsegError
from ddpmseg.heads._base import HeadSpec, ImageMaps, Key, NotFittedError, Segmentation, check_config
from ddpmseg.heads._uncertainty import entropy

log = logging.getLogger(__name__)

STATE_FORMAT = "ddpmseg-segdiff-head"
STATE_VERSION = 1
ENCODERS = ("rrdb", "frozen")
SAMPLERS = ("ancestral", "ddim")


@dataclass(frozen=True)
class SegDiffConfig:
    """How the SegDiff head is built, trained and sampled (``fit --head segdiff --head-option key=value``).

    Sized for a CPU (the paper's in brackets): width 32 (128), 2 RRDB blocks of
    24 features (6-15 of 64), 1500 steps (up to 300k), lr 1e-3 (1e-4).
    """

    encoder: str = field(default="rrdb", metadata={"help": "G's input: rrdb (the image's pixels, the paper's) or frozen (the cached DDPM block maps)"})
    diffusion: bool = field(default=True, metadata={"help": "false: the control, the same network trained as a one-step segmenter (CE, no denoising)"})
    width: int = field(default=32, metadata={"help": "U-Net channels at full resolution (paper: 128)"})
    levels: int = field(default=3, metadata={"help": "U-Net resolutions (channels x1, x2, x2, ...); the grid and the crop must divide by 2^(levels-1)"})
    rrdb_blocks: int = field(default=2, metadata={"help": "RRDB blocks of G (paper: 6-15)"})
    rrdb_features: int = field(default=24, metadata={"help": "RRDB trunk features (paper: 64; growth: half of it)"})
    timesteps: int = field(default=100, metadata={"help": "diffusion steps T (linear betas rescaled by 1000/T; paper: 100)"})
    iterations: int = field(default=1500, metadata={"help": "training steps (paper: up to 300k on a GPU)"})
    batch_size: int = field(default=4, metadata={"help": "crops per training step"})
    crop: int = field(default=0, metadata={"help": "crop side on the model grid; 0: three quarters of it (rounded to the U-Net's multiple)"})
    lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate, constant (paper: 1e-4 over far more steps)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    ema: float = field(default=0.9999, metadata={"help": "EMA decay of the weights (with the (1+n)/(10+n) warm-up); 0: no EMA"})
    sampler: str = field(default="ddim", metadata={"help": "ancestral (every step, the paper's) or ddim (eta 0, `steps` steps)"})
    steps: int = field(default=10, metadata={"help": "DDIM steps at inference (ancestral: unused, every step)"})
    generations: int = field(default=9, metadata={"help": "noise draws averaged at inference (the paper's multiple generation: 9)"})

    def __post_init__(self) -> None:
        checks = [
            (self.encoder in ENCODERS, f"encoder {self.encoder!r} is unknown: use one of {', '.join(ENCODERS)}"),
            (self.width >= 8 and self.width % 8 == 0, f"width {self.width} must be a multiple of 8"),
            (1 <= self.levels <= 5, f"levels {self.levels} must be 1 to 5"),
            (self.rrdb_blocks >= 1, f"rrdb_blocks {self.rrdb_blocks} must be at least 1"),
            (self.rrdb_features >= 8 and self.rrdb_features % 2 == 0,
             f"rrdb_features {self.rrdb_features} must be an even number, at least 8"),
            (self.timesteps >= 2, f"timesteps {self.timesteps} must be at least 2"),
            (self.iterations >= 1, f"iterations {self.iterations} must be at least 1"),
            (self.batch_size >= 1, f"batch_size {self.batch_size} must be at least 1"),
            (self.crop >= 0, f"crop {self.crop} must be 0 (derived) or positive"),
            (self.lr > 0, f"lr {self.lr} must be positive"),
            (self.weight_decay >= 0, f"weight_decay {self.weight_decay} must be 0 or more"),
            (0 <= self.ema < 1, f"ema {self.ema} must be in [0, 1)"),
            (self.sampler in SAMPLERS, f"sampler {self.sampler!r} is unknown: use one of {', '.join(SAMPLERS)}"),
            (1 <= self.steps <= self.timesteps, f"steps {self.steps} must be 1 to timesteps ({self.timesteps})"),
            (self.generations >= 1, f"generations {self.generations} must be at least 1"),
        ]
        check_config(checks, "segdiff")

    @property
    def multiple(self) -> int:
        return 2 ** (self.levels - 1)

    def crop_size(self, size: int) -> int:
        """The training crop's side on a ``size`` grid."""
        c = min(self.crop or size * 3 // 4, size)
        return max(self.multiple, c // self.multiple * self.multiple)


# -- the schedule ----------------------------------------------------------------------------
def linear_betas(timesteps: int) -> torch.Tensor:
    """guided-diffusion's linear schedule for ``timesteps`` steps: 1e-4 .. 0.02 scaled by 1000 / T (float64)."""
    scale = 1000 / timesteps
    return torch.linspace(scale * 1e-4, scale * 0.02, timesteps, dtype=torch.float64)


class Schedule:
    """The diffusion's betas and the products the sampler needs (float64, then float32 at use)."""

    def __init__(self, timesteps: int) -> None:
        self.betas = linear_betas(timesteps)
        self.alphas_cumprod = torch.cumprod(1 - self.betas, 0)
        self.T = timesteps

    def ab(self, t: torch.Tensor) -> torch.Tensor:
        """alpha-bar at integer steps ``t`` (-1: 1, before any noise), shaped to broadcast over (B, K, H, W)."""
        padded = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod])
        return padded[t.long().cpu() + 1].float().to(t.device)[:, None, None, None]

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        ab = self.ab(t)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * eps


# -- the network -----------------------------------------------------------------------------
def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, c // 4) or 1, c)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of (float) timesteps, (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=1)


class ResBlock(nn.Module):
    """GN-SiLU-conv, plus the projected time embedding, GN-SiLU-conv, plus the (1x1-projected) input."""

    def __init__(self, c_in: int, c_out: int, temb: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = _norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.time = nn.Linear(temb, c_out)
        self.norm2, self.conv2 = _norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x))) + self.time(F.silu(temb))[:, :, None, None]
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class Attention(nn.Module):
    """Single-head self-attention over the pixels, residual."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.norm, self.qkv, self.out = _norm(c), nn.Conv2d(c, 3 * c, 1), nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).flatten(2).transpose(1, 2).chunk(3, dim=2)
        a = F.scaled_dot_product_attention(q, k, v)
        return x + self.out(a.transpose(1, 2).reshape(b, c, h, w))


class DenseBlock(nn.Module):
    """ESRGAN's residual dense block: five 3x3 convs, each on the concatenation of all before it."""

    def __init__(self, nf: int, gc: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(nf + i * gc, gc if i < 4 else nf, 3, padding=1) for i in range(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [x]
        for i, conv in enumerate(self.convs):
            out = conv(torch.cat(feats, 1))
            if i < 4:
                feats.append(F.leaky_relu(out, 0.2))
        return x + 0.2 * out


class RRDB(nn.Module):
    """Residual in residual dense block: three dense blocks, scaled residual (no batch norm)."""

    def __init__(self, nf: int, gc: int) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*(DenseBlock(nf, gc) for _ in range(3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.2 * self.blocks(x)


class Encoder(nn.Module):
    """G: a first conv (3x3 on pixels, 1x1 on standardised block maps), RRDB trunk, trunk conv, out conv."""

    def __init__(self, c_in: int, c_out: int, nf: int, blocks: int, pixels: bool) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(c_in))
        self.register_buffer("std", torch.ones(c_in))
        self.first = nn.Conv2d(c_in, nf, 3 if pixels else 1, padding=1 if pixels else 0)
        self.trunk = nn.Sequential(*(RRDB(nf, nf // 2) for _ in range(blocks)))
        self.trunk_conv = nn.Conv2d(nf, nf, 3, padding=1)
        self.last = nn.Conv2d(nf, c_out, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean[:, None, None]) / self.std[:, None, None]
        h = self.first(x)
        h = h + self.trunk_conv(self.trunk(h))
        return self.last(F.leaky_relu(h, 0.2))


class SegDiffNet(nn.Module):
    """x_t (B, K, S, S), t (B,), condition (B, C, S, S) -> epsilon (or, for the control, logits) (B, K, S, S)."""

    def __init__(self, n_classes: int, c_cond: int, cfg: SegDiffConfig) -> None:
        super().__init__()
        w, temb = cfg.width, 4 * cfg.width
        chans = [w * min(2, 2 ** i) if i else w for i in range(cfg.levels)]  # x1, x2, x2, ...
        self.time = nn.Sequential(nn.Linear(w, temb), nn.SiLU(), nn.Linear(temb, temb))
        self.F = nn.Conv2d(n_classes, w, 3, padding=1)
        self.G = Encoder(c_cond, w, cfg.rrdb_features, cfg.rrdb_blocks, pixels=cfg.encoder == "rrdb")
        self.down, self.pool = nn.ModuleList(), nn.ModuleList()
        c = w
        for i, ch in enumerate(chans):
            self.down.append(ResBlock(c, ch, temb))
            c = ch
            if i < len(chans) - 1:
                self.pool.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
        self.mid1, self.attn, self.mid2 = ResBlock(c, c, temb), Attention(c), ResBlock(c, c, temb)
        self.up, self.unpool = nn.ModuleList(), nn.ModuleList()
        for i in reversed(range(len(chans))):
            self.up.append(ResBlock(c + chans[i], chans[i], temb))
            c = chans[i]
            if i > 0:
                self.unpool.append(nn.Conv2d(c, c, 3, padding=1))
        self.out = nn.Sequential(_norm(c), nn.SiLU(), nn.Conv2d(c, n_classes, 3, padding=1))
        self.width = w

    def encode(self, cond: torch.Tensor) -> torch.Tensor:
        return self.G(cond)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """``g``: G(condition), computed once per image (:meth:`encode`) and broadcast over generations."""
        temb = self.time(timestep_embedding(t, self.width))
        h = self.F(x_t) + g
        skips = []
        for i, block in enumerate(self.down):
            h = block(h, temb)
            skips.append(h)
            if i < len(self.pool):
                h = self.pool[i](h)
        h = self.mid2(self.attn(self.mid1(h, temb)), temb)
        for i, block in enumerate(self.up):
            h = block(torch.cat([h, skips.pop()], 1), temb)
            if i < len(self.unpool):
                h = self.unpool[i](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.out(h)


# -- the condition -----------------------------------------------------------------------------
def grid_features(maps: Mapping[Key, Any], keys: Sequence[Key], size: int) -> torch.Tensor:
    """Every block map resized to the ``size`` grid (bilinear; antialiased when shrinking), concatenated: (D, S, S)."""
    out = []
    for k in keys:
        m = torch.as_tensor(np.asarray(maps[k])).float()[None]
        if m.shape[-1] != size:
            m = F.interpolate(m, size=(size, size), mode="bilinear", align_corners=False, antialias=m.shape[-1] > size)
        out.append(m[0])
    return torch.cat(out)


def _image(image: Any, size: int, where: str) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(image)).float()
    if x.ndim == 4 and x.shape[0] == 1:
        x = x[0]
    if tuple(x.shape) != (3, size, size):
        raise DdpmsegError(f"segdiff head: {where} is {tuple(x.shape)}, not (3, {size}, {size}) in [-1, 1] on the model grid")
    return x


def one_hot(labels: torch.Tensor, k: int) -> torch.Tensor:
    """(B, S, S) labels (k = ignore) -> (B, K, S, S) one-hot in [-1, 1] (an ignored pixel: -1 everywhere)."""
    return F.one_hot(labels, k + 1)[..., :k].permute(0, 3, 1, 2).float() * 2 - 1


class SegDiffHead(BaseEstimator):
    """The SegDiff head as an estimator: ``fit(X, y)``, ``predict_block_maps(maps, keys, size, image=...)``.

    ``X``: an :class:`~ddpmseg.heads.ImageMaps` (with ``images`` for ``encoder="rrdb"``);
    ``y``: per image an (S, S) integer label map on the model grid, ``ignore_index`` where
    unlabelled. Every :class:`SegDiffConfig` field is a keyword; learned state ends in ``_``.
    """

    def __init__(self, n_classes: int | None = None, *, encoder: str = "rrdb", diffusion: bool = True, width: int = 32,
                 levels: int = 3, rrdb_blocks: int = 2, rrdb_features: int = 24, timesteps: int = 100,
                 iterations: int = 1500, batch_size: int = 4, crop: int = 0, lr: float = 1e-3,
                 weight_decay: float = 0.0, ema: float = 0.9999, sampler: str = "ddim", steps: int = 10,
                 generations: int = 9, ignore_index: int = 255, random_state: int = 0, device: str = "cpu",
                 progress: bool = False) -> None:
        self.n_classes = n_classes
        self.encoder = encoder
        self.diffusion = diffusion
        self.width = width
        self.levels = levels
        self.rrdb_blocks = rrdb_blocks
        self.rrdb_features = rrdb_features
        self.timesteps = timesteps
        self.iterations = iterations
        self.batch_size = batch_size
        self.crop = crop
        self.lr = lr
        self.weight_decay = weight_decay
        self.ema = ema
        self.sampler = sampler
        self.steps = steps
        self.generations = generations
        self.ignore_index = ignore_index
        self.random_state = random_state
        self.device = device
        self.progress = progress

    @property
    def config(self) -> SegDiffConfig:
        """The settings as a (validated) :class:`SegDiffConfig`."""
        return SegDiffConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(SegDiffConfig)})

    @property
    def needs_images(self) -> bool:
        """Whether fit needs ``X.images`` and prediction ``image=`` (the RRDB encoder reads pixels)."""
        return self.encoder == "rrdb"

    # -- fitting ----------------------------------------------------------------------------
    def _conditions(self, X: ImageMaps, size: int) -> list[torch.Tensor]:
        if self.needs_images:
            if X.images is None:
                raise DdpmsegError("segdiff head: encoder=rrdb reads the images' pixels but X has no images; "
                                   "pass ImageMaps(..., images=...) or use --head-option encoder=frozen")
            if len(X.images) != len(X.maps):
                raise DdpmsegError(f"segdiff head: {len(X.images)} images for {len(X.maps)} images' maps; give one each")
            return [_image(im, size, "an image of X") for im in X.images]
        return [grid_features(m, X.keys, size) for m in X.maps]

    def fit(self, X: ImageMaps, y: Sequence[np.ndarray]) -> "SegDiffHead":
        """Train the denoiser on the labelled images ``X`` and their label maps ``y``; returns self."""
        if not isinstance(X, ImageMaps):
            raise DdpmsegError(f"segdiff head: X must be an ImageMaps (the images' block maps), got {type(X).__name__}")
        if not len(X) or len(X) != len(y):
            raise DdpmsegError(f"segdiff head: got {len(X)} images' maps and {len(y)} label maps; give one each")
        if self.n_classes is None or self.n_classes < 1:
            raise DdpmsegError(f"segdiff head: n_classes {self.n_classes} must be at least 1")
        cfg, k = self.config, int(self.n_classes)
        size = int(np.asarray(y[0]).shape[-1])
        if size % cfg.multiple:
            raise DdpmsegError(f"segdiff head: the model grid {size} does not divide by 2^(levels-1) = {cfg.multiple}; "
                               "lower the head's levels")
        crop = cfg.crop_size(size)
        conds = torch.stack(self._conditions(X, size))
        labels = torch.stack([torch.as_tensor(np.asarray(a), dtype=torch.long) for a in y])
        labels = torch.where((labels >= 0) & (labels < k), labels, torch.full_like(labels, k))
        device = torch.device(self.device)
        g = torch.Generator().manual_seed(int(self.random_state))
        with torch.random.fork_rng(devices=[]):  # the module's init from the seed, the global RNG untouched
            torch.manual_seed(int(self.random_state))
            net = SegDiffNet(k, conds.shape[1], cfg)
        flat = conds.transpose(0, 1).flatten(1)
        net.G.mean.copy_(flat.mean(1) if not self.needs_images else torch.zeros(conds.shape[1]))
        net.G.std.copy_(flat.std(1).clamp_min(1e-6) if not self.needs_images else torch.ones(conds.shape[1]))
        net = net.to(device).train()
        ema = copy.deepcopy(net).eval().requires_grad_(False) if cfg.ema > 0 else None
        opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = Schedule(cfg.timesteps)
        losses: list[float] = []
        bar = tqdm(range(cfg.iterations), desc="fit segdiff", unit="step", disable=not self.progress, leave=False)
        for step in bar:
            idx = torch.randint(len(conds), (cfg.batch_size,), generator=g)
            a = torch.randint(size - crop + 1, (cfg.batch_size,), generator=g)
            b = torch.randint(size - crop + 1, (cfg.batch_size,), generator=g)
            flip = torch.rand(cfg.batch_size, generator=g) < 0.5
            c_b, y_b = [], []
            for i, r, s, fl in zip(idx.tolist(), a.tolist(), b.tolist(), flip.tolist()):
                c, l = conds[i, :, r : r + crop, s : s + crop], labels[i, r : r + crop, s : s + crop]
                if fl:  # a horizontal flip (faces and most scenes are left-right symmetric)
                    c, l = c.flip(-1), l.flip(-1)
                c_b.append(c)
                y_b.append(l)
            c_b, y_b = torch.stack(c_b).to(device), torch.stack(y_b).to(device)
            known = (y_b != k)[:, None].float()
            if cfg.diffusion:
                x0 = one_hot(y_b, k)
                t = torch.randint(cfg.timesteps, (cfg.batch_size,), generator=g).to(device)
                eps = torch.randn(x0.shape, generator=g).to(device)
                pred = net(sched.q_sample(x0, t, eps), t, net.encode(c_b))
                loss = (((pred - eps) ** 2) * known).sum() / (known.sum() * k).clamp_min(1)
            else:
                t = torch.zeros(cfg.batch_size, dtype=torch.long, device=device)
                logits = net(torch.zeros(cfg.batch_size, k, crop, crop, device=device), t, net.encode(c_b))
                loss = F.cross_entropy(logits, y_b, ignore_index=k)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if ema is not None:
                decay = min(cfg.ema, (1 + step) / (10 + step))
                with torch.no_grad():
                    for pe, p in zip(ema.parameters(), net.parameters()):
                        pe.mul_(decay).add_(p.detach(), alpha=1 - decay)
            losses.append(loss.item())
            if self.progress and step % 10 == 0:
                bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}")
        bar.close()
        self.module_ = (ema if ema is not None else net).eval()
        self.size_ = size
        self.keys_ = list(X.keys)
        self.n_condition_channels_ = int(conds.shape[1])
        self.crop_ = crop
        self.loss_curve_ = losses
        self.n_iter_ = cfg.iterations
        self.final_loss_ = float(np.mean(losses[-50:]))
        log.info("segdiff head: %d steps, final loss %.4f", cfg.iterations, self.final_loss_)
        return self

    # -- prediction ---------------------------------------------------------------------------
    def __sklearn_is_fitted__(self) -> bool:
        return hasattr(self, "module_")

    def _check_fitted(self) -> None:
        if not hasattr(self, "module_"):
            raise NotFittedError("This SegDiffHead is not fitted yet: call fit(X, y) first.")

    def timesteps_used(self, sampler: str | None = None, steps: int | None = None) -> list[int]:
        """The steps the network is evaluated at, from T-1 down to 0."""
        cfg = self.config
        if (sampler or cfg.sampler) == "ancestral":
            return list(range(cfg.timesteps - 1, -1, -1))
        n = steps or cfg.steps
        return sorted({int(round(v)) for v in np.linspace(0, cfg.timesteps - 1, n)}, reverse=True) if n > 1 else [cfg.timesteps - 1]

    @torch.inference_mode()
    def sample(self, condition: torch.Tensor, generations: int | None = None, sampler: str | None = None,
               steps: int | None = None, seed: int | None = None) -> torch.Tensor:
        """The generations' final masks (N, K, S, S) in [-1, 1] for one image's ``condition`` (C, S, S)
        (the control: its softmax, (1, K, S, S))."""
        self._check_fitted()
        cfg, net = self.config, self.module_
        device = next(net.parameters()).device
        k, size = int(self.n_classes), condition.shape[-1]
        gcond = net.encode(condition[None].to(device))
        if not cfg.diffusion:
            t = torch.zeros(1, dtype=torch.long, device=device)
            return net(torch.zeros(1, k, size, size, device=device), t, gcond).softmax(1)
        n = generations or cfg.generations
        sampler = sampler or cfg.sampler
        if sampler not in SAMPLERS:
            raise DdpmsegError(f"segdiff head: sampler {sampler!r} is unknown: use one of {', '.join(SAMPLERS)}")
        gen = torch.Generator().manual_seed(int(self.random_state if seed is None else seed))
        noise = lambda: torch.randn((n, k, size, size), generator=gen).to(device)
        sched = Schedule(cfg.timesteps)
        gcond = gcond.expand(n, -1, -1, -1)
        x = noise()
        times = self.timesteps_used(sampler, steps)
        for i, t_now in enumerate(times):
            t = torch.full((n,), t_now, dtype=torch.long, device=device)
            eps = net(x, t, gcond)
            ab = sched.ab(t)
            x0 = ((x - (1 - ab).sqrt() * eps) / ab.sqrt()).clamp(-1, 1)
            if sampler == "ddim":
                t_next = times[i + 1] if i + 1 < len(times) else -1
                ab_next = sched.ab(torch.full_like(t, t_next))
                eps = (x - ab.sqrt() * x0) / (1 - ab).sqrt()
                x = ab_next.sqrt() * x0 + (1 - ab_next).sqrt() * eps
            else:  # the posterior mean, plus beta_t noise (the first step's posterior variance at t = 1)
                ab_prev = sched.ab(t - 1)
                beta = 1 - ab / ab_prev
                mean = (beta * ab_prev.sqrt() * x0 + (1 - ab_prev) * (1 - beta).sqrt() * x) / (1 - ab)
                if t_now > 0:
                    var = beta if t_now > 1 else (1 - ab_prev) / (1 - ab) * beta
                    x = mean + var.sqrt() * noise()
                else:
                    x = mean
        return x.clamp(-1, 1)

    def _condition(self, maps: Mapping[Key, Any], keys: Sequence[Key], size: int, image: Any) -> torch.Tensor:
        if self.needs_images:
            if image is None:
                raise DdpmsegError("segdiff head: encoder=rrdb reads the image's pixels; pass image= (3, S, S) in [-1, 1]")
            x = _image(image, size, "image")
        else:
            if list(keys) != self.keys_:
                raise DdpmsegError(f"the maps' keys {list(keys)} differ from the segdiff head's {self.keys_}; "
                                   "use features extracted with the model's settings")
            x = grid_features(maps, keys, size)
        if x.shape[0] != self.n_condition_channels_:
            raise DdpmsegError(f"segdiff head: the condition has {x.shape[0]} channels but the head was fitted on "
                               f"{self.n_condition_channels_}; use features extracted with the model's settings")
        return x

    def predict_block_maps(self, maps: Mapping[Key, Any], keys: Sequence[Key], size: int,
                           image: Any = None) -> Segmentation:
        """One image's labels (argmax of the generations' mean mask), uncertainty (their disagreement)
        and probability map at the ``size`` grid; ``image``: (3, S, S) in [-1, 1] for encoder=rrdb."""
        self._check_fitted()
        if size % self.config.multiple:
            raise DdpmsegError(f"segdiff head: the grid {size} does not divide by {self.config.multiple}")
        x = self._condition(maps, keys, size, image)
        masks = self.sample(x).float().cpu()
        k = int(self.n_classes)
        if not self.config.diffusion:
            proba = masks[0]
            unc = entropy(proba, 0)
        else:
            proba = ((masks.mean(0) + 1) / 2).clamp_min(1e-6)
            proba = proba / proba.sum(0, keepdim=True)
            if len(masks) == 1:
                unc = entropy(proba, 0)
            else:  # the generations' disagreement: entropy of their vote shares (0 where all agree)
                votes = F.one_hot(masks.argmax(1), k).float().mean(0).permute(2, 0, 1)
                unc = entropy(votes, 0)
        return Segmentation(proba.argmax(0).numpy().astype(np.int64), unc.numpy().astype(np.float32),
                            proba.numpy().astype(np.float32))

    def describe(self) -> str:
        """One line on the fit."""
        self._check_fitted()
        cfg = self.config
        kind = "one-step control" if not cfg.diffusion else (
            f"{cfg.generations} generation(s), {'ancestral over ' + str(cfg.timesteps) if cfg.sampler == 'ancestral' else 'DDIM ' + str(cfg.steps)} steps")
        return (f"SegDiff head ({cfg.encoder} encoder, {kind}): {self.n_iter_:,} steps of {cfg.batch_size} "
                f"{self.crop_}px crops, final loss {self.final_loss_:.4f} (mean of the last 50 steps)")

    # -- persistence ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The learned state (the settings are :meth:`get_params`, saved in model.json)."""
        self._check_fitted()
        return {"format": STATE_FORMAT, "version": STATE_VERSION, "keys": [list(k) for k in self.keys_],
                "size": self.size_, "crop": self.crop_, "n_condition_channels": self.n_condition_channels_,
                "loss_curve": [float(v) for v in self.loss_curve_],
                "module": {k: v.cpu() for k, v in self.module_.state_dict().items()}}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any], device: str = "cpu", **params: Any) -> "SegDiffHead":
        """A fitted head from :meth:`state_dict` and its settings ``params`` (those of :meth:`get_params`)."""
        if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
            raise DdpmsegError("not a segdiff head's state; rerun `ddpmseg fit --head segdiff`")
        if int(state.get("version", 1)) > STATE_VERSION:
            raise DdpmsegError(f"segdiff head state version {state['version']} is newer than this ddpmseg supports; "
                               "upgrade ddpmseg")
        known = set(cls().get_params())
        head = cls(**{k: v for k, v in params.items() if k in known}, device=str(device))
        if head.n_classes is None:
            raise DdpmsegError("pass the segdiff head's settings: SegDiffHead.from_state_dict(state, **head.get_params())")
        try:
            net = SegDiffNet(int(head.n_classes), int(state["n_condition_channels"]), head.config)
            net.load_state_dict(state["module"])
        except KeyError as e:
            raise DdpmsegError(f"segdiff head state lacks {e}; it is damaged: fit the model again") from None
        except RuntimeError as e:
            raise DdpmsegError(f"segdiff head state does not fit its settings ({str(e).splitlines()[0]}); fit again") from None
        head.module_ = net.to(device).eval()
        head.keys_ = [tuple(int(v) for v in k) for k in state["keys"]]
        head.size_ = int(state["size"])
        head.crop_ = int(state["crop"])
        head.n_condition_channels_ = int(state["n_condition_channels"])
        head.loss_curve_ = list(state.get("loss_curve", []))
        head.n_iter_ = head.iterations
        head.final_loss_ = float(np.mean(head.loss_curve_[-50:])) if head.loss_curve_ else float("nan")
        return head

    def to(self, device: str | torch.device) -> "SegDiffHead":
        self._check_fitted()
        self.module_.to(device)
        self.device = str(device)
        return self


HEAD = HeadSpec("segdiff", "SegDiff: an end-to-end denoiser of the mask conditioned on the image (RRDB encoder "
                "or the frozen features), generations averaged", SegDiffConfig, SegDiffHead)
