"""Training the ensemble: one loop, parameterised by the recipe.

Both recipes train the members of a :class:`~ddpmseg.classify.members.StackedMLP`
together: one Adam over stacked parameters is exactly M independent Adams, and
the summed loss gives each member exactly its own gradient. Member m draws its
initial weights from its own generator (the reference's draws in either
recipe). What a recipe changes is how a step's batch is drawn and how layer 1
runs (:class:`Recipe`):

``"reference"`` -- the paper's, exactly: every member its own shuffle (from its
    own generator, after its init draws), batch 64, Adam 1e-3, the reference's
    early stopping. Layer 1 is one batched matmul over the members' batches.
``"fast"`` -- all members share one shuffled batch of 1024 pixels (one gather
    per step) and layer 1 of every member runs as one ``(B, D) x (D, M*H1)``
    GEMM, in bfloat16 where the hardware has it (fp32 master weights, Adam and
    everything after layer 1). lr 1e-3 x sqrt(1024/64) = 4e-3 (Adam's usual
    rule for a 16x batch); early-stopping patience counted in pixels
    (``patience * 64`` pixels, :func:`fast_patience_steps`).
``"tiles"`` -- the default of ``ddpmseg fit``: shared batches of 1024 pixels,
    lr 2e-3, a batch made of 64 image tiles of 4 x 4 pixels (of a 256 grid)
    drawn across the images; layer 1 runs on the block maps at their native
    resolution (W·up(F) = up(W·F); :class:`_TileSteps`). It stops by budget,
    not by the reference's rule: 16 epochs, at most 2,000 steps, or sooner on a
    plateau of the smoothed training loss (:class:`PlateauStop`). Both tile
    size and lr were chosen by held-out mIoU (benchmarks/bench_fit_quality.py,
    docs/performance.md): bigger tiles are cheaper but a batch of few large tiles holds
    correlated pixels, and BatchNorm then learns on statistics far from the
    population's (16 x 16 tiles: -4.5 mIoU; 8 x 8: -2.3; 4 x 4 at lr 4e-3:
    -1.3; at lr 2e-3: +0.4 against the reference recipe).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ddpmseg.errors import DdpmsegError

from ddpmseg.classify.members import SharedFirstLayer, StackedMLP
from ddpmseg import options
from ddpmseg.features.pixels import PixelSource

log = logging.getLogger(__name__)

REFERENCE_BATCH, REFERENCE_LR = 64, 1e-3
# The tiles recipe's budget: 16 epochs on small label sets; on large ones 2,000 steps (2 M pixels a
# member, ~1.5 epochs of 20 images at 256^2) end it first: neighbouring pixels are nearly redundant.
TILES_EPOCHS, TILES_MAX_STEPS = 16, 2000
TILES_LR, TILES_DIV = 2e-3, 64  # measured (see the module docstring): 4 x 4-pixel tiles of a 256 grid


@dataclass(frozen=True)
class Recipe:
    """How the members are trained: batch size, learning rate, and whether they share each batch."""

    name: str
    batch_size: int  # pixels per step (tiles: a target; a step takes whole tiles)
    lr: float
    shared_batch: bool  # one batch for all members, layer 1 as one GEMM (bf16 allowed); else one batch each
    description: str
    tiled: bool = False  # batches of image tiles, layer 1 at the block maps' native resolution
    tile_div: int = TILES_DIV  # tiles: a tile's side is the model grid's side / tile_div (at least 2)
    epochs: int | None = None  # its own epoch budget (None: the estimator's max_epochs, the reference's early stop)
    max_steps: int | None = None  # a cap on steps (then a plateau of the training loss may stop it sooner)


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe("reference", REFERENCE_BATCH, REFERENCE_LR, False, options.RECIPES["reference"]),
        Recipe("fast", 1024, REFERENCE_LR * math.sqrt(1024 / REFERENCE_BATCH), True, options.RECIPES["fast"]),
        Recipe("tiles", 1024, TILES_LR, True, options.RECIPES["tiles"], tiled=True, epochs=TILES_EPOCHS,
               max_steps=TILES_MAX_STEPS),
    )
}


class EarlyStop:
    """The reference's batch-level early stopping.

    From epoch ``min_epochs`` on (0-based; the reference's ``epoch > 3``), each
    batch loss below the best so far resets a counter, any other increments it;
    training stops once the counter exceeds ``patience``.
    """

    def __init__(self, patience: int = 50, min_epochs: int = 4, best_loss: float = 1e7) -> None:
        self.patience = patience
        self.min_epochs = min_epochs
        self.best_loss = best_loss
        self.count = 0
        self.stopped = False

    def update(self, loss: float, epoch: int) -> bool:
        """Record one batch loss (after the optimiser step); True once training must stop."""
        if epoch >= self.min_epochs:
            if loss < self.best_loss:
                self.best_loss = loss
                self.count = 0
            else:
                self.count += 1
            if self.count > self.patience:
                self.stopped = True
        return self.stopped


class PlateauStop:
    """Stop once the smoothed training loss has stopped falling, or after ``max_steps`` (the tiles recipe's rule).

    The batch loss is smoothed (an exponential moving average over ~50
    steps, bias-corrected); from ``min_epochs`` epochs and ``min_steps``
    steps on, a smoothed loss ``rel`` below the best so far is a new best,
    and training stops after ``patience`` steps without one, or at
    ``max_steps``. It needs no held-out labels, and counting steps (not
    epochs) fits small and large label sets alike: on a few small images the
    training loss keeps falling (the members memorise) and the step cap ends
    the fit; on many large images one epoch is already thousands of steps.
    """

    def __init__(self, min_epochs: int = 0, min_steps: int = 500, patience: int = 200, rel: float = 1e-3,
                 decay: float = 0.98, max_steps: int | None = None) -> None:
        self.min_epochs, self.min_steps, self.patience, self.rel, self.decay = min_epochs, min_steps, patience, rel, decay
        self.max_steps = max_steps
        self.steps, self.average, self.best, self.count, self.stopped = 0, 0.0, math.inf, 0, False

    def update(self, loss: float, epoch: int) -> bool:
        self.steps += 1
        self.average = self.decay * self.average + (1 - self.decay) * loss
        smoothed = self.average / (1 - self.decay**self.steps)
        if epoch >= self.min_epochs and self.steps >= self.min_steps:
            if smoothed < self.best * (1 - self.rel):
                self.best, self.count = smoothed, 0
            else:
                self.count += 1
            self.stopped = self.count > self.patience
        else:
            self.best = min(self.best, smoothed)
        if self.max_steps is not None and self.steps >= self.max_steps:
            self.stopped = True
        return self.stopped


def fast_patience_steps(patience: int, batch_size: int) -> int:
    """The fast recipe's early-stopping patience in batches: the reference's ``patience`` batches of
    64 pixels, counted in pixels (``patience * 64``), i.e. ``ceil(patience * 64 / batch_size)`` batches."""
    return max(1, math.ceil(patience * REFERENCE_BATCH / batch_size))


def member_generators(random_state: int | None, n: int) -> list[torch.Generator]:
    """One CPU generator each, from ``SeedSequence(random_state).spawn(n)`` (the first k of n are those of k)."""
    children = np.random.SeedSequence(random_state).spawn(n)
    gens = []
    for child in children:
        lo, hi = (int(v) for v in child.generate_state(2, np.uint32))
        gens.append(torch.Generator().manual_seed((hi << 32 | lo) & ((1 << 63) - 1)))
    return gens


def batch_bounds(n: int, batch_size: int) -> list[tuple[int, int]]:
    """Slices of one epoch (the last one may be partial, as with a DataLoader).

    A final batch of a single pixel is skipped: BatchNorm cannot train on one sample.
    """
    bounds = [(lo, min(n, lo + batch_size)) for lo in range(0, n, batch_size)]
    if bounds and bounds[-1][1] - bounds[-1][0] < 2:
        bounds.pop()
    return bounds


def member_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Each member's mean cross-entropy (M,) from logits (M, B, K) and targets (M*B,), member-major."""
    m, _, k = logits.shape
    return F.cross_entropy(logits.reshape(-1, k), targets, reduction="none").reshape(m, -1).mean(1)


def make_adam(params: Any, lr: float) -> torch.optim.Adam:
    """Adam with PyTorch's defaults; the single-kernel (``fused``) implementation where available."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):  # older torch, or a device without a fused kernel
        return torch.optim.Adam(params, lr=lr)


# per member: steps, final and best batch losses, mean loss per epoch, labelled pixels trained on
FitLog = tuple[list[int], list[float], list[float], list[list[float]], list[int]]


class MemberLog:
    """Per-member bookkeeping: steps, losses, epoch curves, early stops and snapshots."""

    def __init__(self, n_members: int, patience: int, min_epochs: int, plateau: bool = False,
                 max_steps: int | None = None) -> None:
        self.stops: list[EarlyStop | PlateauStop] = [
            PlateauStop(max_steps=max_steps) if plateau else EarlyStop(patience, min_epochs) for _ in range(n_members)
        ]
        self.snapshots: list[list[torch.Tensor] | None] = [None] * n_members
        self.n_iter, self.final = [0] * n_members, [math.nan] * n_members
        self.pixels = [0] * n_members  # labelled pixels each member trained on (a pixel seen twice counts twice)
        self.best = [math.inf] * n_members
        self.curves: list[list[float]] = [[] for _ in range(n_members)]
        self._sums, self._counts = [0.0] * n_members, [0] * n_members

    def active(self) -> list[int]:
        return [m for m, snap in enumerate(self.snapshots) if snap is None]

    def since_best(self) -> int:
        """Steps since the last new best batch loss, the fewest over the active members (what stops them)."""
        counts = [self.stops[m].count for m in self.active()]
        return min(counts) if counts else 0

    def record_step(
        self, losses: list[float], active: list[int], step: int, epoch: int, snapshot: Callable[[int], list[torch.Tensor]],
        n_pixels: int = 0,
    ) -> None:
        """Record one step's losses of the active members; snapshot (``snapshot(m)``) each that stops now."""
        for m in active:
            loss = losses[m]
            self.n_iter[m] = step
            self.pixels[m] += n_pixels
            self.final[m] = loss
            self.best[m] = min(self.best[m], loss)
            self._sums[m] += loss
            self._counts[m] += 1
            if self.stops[m].update(loss, epoch):
                self.snapshots[m] = snapshot(m)
                log.info("member %d stopped early after %d steps (epoch %d)", m, step, epoch)

    def end_epoch(self) -> None:
        for m, count in enumerate(self._counts):
            if count:
                self.curves[m].append(self._sums[m] / count)
        self._sums, self._counts = [0.0] * len(self._sums), [0] * len(self._counts)

    def restore(self, module: StackedMLP) -> None:
        """Put every early-stopped member's snapshot back into ``module``."""
        for m, snap in enumerate(self.snapshots):
            if snap is not None:
                module.load_member_state(m, snap)

    def result(self) -> FitLog:
        return self.n_iter, self.final, self.best, self.curves, self.pixels


# -- the ways of drawing a step and running layer 1 ------------------------------------------------
@dataclass
class _Pixels:
    """What is trained on: ``keep`` (labelled pixel indices into ``source``), their labels ``y``, the
    pixels an epoch visits and its batch bounds."""

    source: PixelSource
    keep: torch.Tensor
    y: torch.Tensor
    n_epoch: int
    bounds: list[tuple[int, int]]


class _PerMemberSteps:
    """The reference recipe: member m's batch from its own shuffle; layer 1 as a batched matmul (M, B, D)."""

    def __init__(self, module: StackedMLP, gens: list[torch.Generator], data: "_Pixels") -> None:
        self.module, self.gens, self.data = module, gens, data
        module.w1.grad = torch.zeros_like(module.w1)  # persistent, overwritten by every backward
        self.params, self.reset = [module.w1, module.b1], [module.b1]  # layer 1's; grads reset before each step

    def steps_per_epoch(self) -> int:
        return len(self.data.bounds)

    def epoch(self, active: list[int]) -> list[tuple[int, int]]:
        n = len(self.data.keep)
        self.perms = {m: torch.randperm(n, generator=self.gens[m])[: self.data.n_epoch] for m in active}
        return self.data.bounds

    def logits(self, bounds: tuple[int, int], active: list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = bounds
        # stopped members ride along on an active member's batch (their result is discarded)
        pos = torch.stack([self.perms[m if m in active else active[0]][lo:hi] for m in range(self.module.n_members)])
        x, yb = _gather_union(self.data.source, self.data.keep, self.data.y, pos, device)
        return self.module.forward_train(x), yb.reshape(-1)

    def snapshot(self, m: int) -> list[torch.Tensor]:
        return self.module.member_state(m)

    def finish(self) -> None:
        self.module.w1.grad = None


class _SharedSteps:
    """The fast recipe: one shuffled batch for every member; layer 1 as one (B, D) x (D, M*H1) GEMM.

    Layer 1 trains as one (D, M*H1) matrix (member m owns columns
    ``m*H1:(m+1)*H1``), copied into the stacked ``w1`` at snapshots and at
    the end. The shuffle has its own generator (one more than the members').
    """

    def __init__(self, module: StackedMLP, shuffle: torch.Generator, low_precision: bool, data: "_Pixels") -> None:
        self.module, self.shuffle, self.data = module, shuffle, data
        m, d, h1 = module.w1.shape
        self.weight = nn.Parameter(module.w1.detach().permute(1, 0, 2).reshape(d, m * h1).clone())
        self.bias = nn.Parameter(module.b1.detach().reshape(-1).clone())
        self.weight.grad = torch.zeros_like(self.weight)  # persistent, overwritten by every backward
        self.low = torch.empty_like(self.weight, dtype=torch.bfloat16) if low_precision else None
        self.params, self.reset = [self.weight, self.bias], [self.bias]

    def steps_per_epoch(self) -> int:
        return len(self.data.bounds)

    def epoch(self, active: list[int]) -> list[tuple[int, int]]:
        self.perm = torch.randperm(len(self.data.keep), generator=self.shuffle)[: self.data.n_epoch]
        return self.data.bounds

    def logits(self, bounds: tuple[int, int], active: list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        pos = self.perm[bounds[0] : bounds[1]]
        x = self.data.source.gather(self.data.keep[pos]).to(device=device, dtype=torch.float32, non_blocking=True)
        h = SharedFirstLayer.apply(x, self.weight, self.bias, self.low)  # (B, M*H1)
        m, _, h1 = self.module.w1.shape
        return self.module.head(h.view(len(pos), m, h1).transpose(0, 1)), self.data.y[pos].to(device).repeat(m)

    @torch.no_grad()
    def _sync(self, members: list[int]) -> None:  # the trained layer-1 columns into the stacked w1 / b1
        h1 = self.module.hidden[0]
        for m in members:
            self.module.w1[m].copy_(self.weight[:, m * h1 : (m + 1) * h1])
            self.module.b1[m].copy_(self.bias[m * h1 : (m + 1) * h1])

    def snapshot(self, m: int) -> list[torch.Tensor]:
        self._sync([m])
        return self.module.member_state(m)

    def finish(self) -> None:
        self._sync(list(range(self.module.n_members)))


class _TileSteps(_SharedSteps):
    """The tiles recipe: every member on the same batch of image tiles (``tile`` x ``tile`` pixels of the
    model grid); layer 1 at the native resolution of the block maps.

    Layer 1 is linear and bilinear upsampling is linear, so W·up(F) + b = up(W·F) + b:
    for each tile, layer 1 runs on the native positions under it (for a 4 x 4
    tile of a 256 image: 3 x 3 positions of the 32^2 and 64^2 maps, which hold
    90 % of the paper's 8448 channels, instead of 16 upsampled pixels) and its
    output is upsampled to the tile's pixels
    (:meth:`~ddpmseg.features.pixels.CachePixels.tiles_layer1`); the gradient
    of W flows back through the same upsampling. Each epoch visits the tiles
    holding labelled pixels in a fresh order (``fraction`` of them).
    """

    def __init__(self, module: StackedMLP, shuffle: torch.Generator, low_precision: bool, data: _Pixels,
                 tile: int, tiles_per_step: int, fraction: float) -> None:
        super().__init__(module, shuffle, low_precision, data)
        self.weight.grad, self.low = None, None
        # layer 1 as one (D_g, M*H1) block per native resolution g (plain autograd: the GEMMs are torch ops)
        self.rows = data.source.layer1_rows()
        self.parts = [nn.Parameter(self.weight.detach()[rows].clone()) for rows in self.rows]
        self.params, self.reset = [*self.parts, self.bias], [*self.parts, self.bias]
        self.low_precision = low_precision
        src, self.tile = data.source, tile
        s = src.size
        full = torch.full((src.n_images * s * s,), -1, dtype=torch.long)
        full[data.keep] = data.y
        self.labels = full.view(src.n_images, s, s)
        self.tiles = torch.tensor([(i, y0, x0) for i in range(src.n_images) for y0 in range(0, s, tile)
                                   for x0 in range(0, s, tile) if (self.labels[i, y0 : y0 + tile, x0 : x0 + tile] >= 0).any()])
        self.per_step, self.fraction = tiles_per_step, fraction

    def _n_epoch(self) -> int:
        return max(1, round(self.fraction * len(self.tiles)))

    def steps_per_epoch(self) -> int:
        return -(-self._n_epoch() // self.per_step)

    def epoch(self, active: list[int]) -> list[torch.Tensor]:
        order = torch.randperm(len(self.tiles), generator=self.shuffle)[: self._n_epoch()]
        return [order[i : i + self.per_step] for i in range(0, len(order), self.per_step)]

    def logits(self, picks: torch.Tensor, active: list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.tile
        weights = [p.to(torch.bfloat16) for p in self.parts] if self.low_precision else self.parts
        where = self.tiles[picks]  # (n, 3): image, top row, left column
        img, y0, x0 = where.unbind(1)
        rows, cols = y0[:, None] + torch.arange(t), x0[:, None] + torch.arange(t)
        lab = self.labels[img[:, None, None], rows[:, :, None], cols[:, None, :]].reshape(-1)
        sel = lab >= 0
        hidden = self.data.source.tiles_layer1(img, y0, x0, t, weights).reshape(len(lab), -1)[sel]
        h = hidden.to(device) + self.bias
        m, _, h1 = self.module.w1.shape
        return self.module.head(h.view(len(h), m, h1).transpose(0, 1)), lab[sel].to(device).repeat(m)

    @torch.no_grad()
    def _sync(self, members: list[int]) -> None:
        for rows, part in zip(self.rows, self.parts):
            self.weight[rows] = part
        super()._sync(members)


def tile_plan(size: int, tile_div: int, batch_size: int) -> tuple[int, int]:
    """(tile side, tiles per step) of the tiles recipe: a tile is ``size / tile_div`` pixels wide (at least
    2), a step takes ``batch_size`` pixels' worth of tiles."""
    tile = max(2, size // tile_div)
    return tile, max(1, batch_size // (tile * tile))


def _gather_union(
    source: PixelSource, keep: torch.Tensor, y: torch.Tensor, pos: torch.Tensor, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (M, B, D) and labels (M, B) of kept positions ``pos`` (M, B), one gather for all members.

    Each distinct pixel is gathered once; without repeats (the usual case)
    the rows are gathered straight in batch order, saving a copy.
    """
    flat = keep[pos.reshape(-1)]
    uniq, inverse = torch.unique(flat, return_inverse=True)
    if len(uniq) == len(flat):
        x = source.gather(flat).to(device=device, dtype=torch.float32, non_blocking=True)
    else:
        rows = source.gather(uniq).to(device=device, dtype=torch.float32, non_blocking=True)
        x = rows[inverse.to(device)]
    return x.reshape(*pos.shape, x.shape[-1]), y[pos].to(device)


# -- the loop ----------------------------------------------------------------------------------------
def train_members(
    module: StackedMLP,
    source: PixelSource,
    keep: torch.Tensor,
    y: torch.Tensor,
    *,
    recipe: Recipe,
    random_state: int | None,
    batch_size: int,
    lr: float,
    low_precision: bool,
    max_epochs: int,
    patience: int,
    min_epochs: int,
    n_epoch: int,
    device: torch.device,
    progress: bool = False,
    pixel_fraction: float = 1.0,
) -> FitLog:
    """Train every member of ``module`` on the pixels ``keep`` (indices into ``source``) with labels ``y``.

    ``n_epoch`` pixels are visited per epoch (a fresh random subset when fewer
    than ``len(keep)``). Each member stops on its own (the reference's rule;
    the fast recipe counts ``patience`` in pixels) and keeps the weights it had
    when it stopped. Returns the per-member steps, final and best batch
    losses, and mean loss per epoch.
    """
    m_total = module.n_members
    gens = member_generators(random_state, m_total + 1)  # the last one: the shared shuffle
    for m in range(m_total):
        module.init_member_(m, gens[m])
    module.train()
    data = _Pixels(source, keep, y, n_epoch, batch_bounds(n_epoch, batch_size))
    if recipe.tiled:
        if not hasattr(source, "tiles_layer1"):
            raise DdpmsegError(f"recipe={recipe.name!r} needs the native-resolution block maps (a CachePixels, as "
                               "fit_model builds from a cache); use recipe='fast' or 'reference' for feature arrays")
        tile, per_step = tile_plan(source.size, recipe.tile_div, batch_size)
        steps = _TileSteps(module, gens[-1], low_precision, data, tile, per_step, pixel_fraction)
        track = MemberLog(m_total, patience, min_epochs, plateau=True, max_steps=recipe.max_steps)
    elif recipe.shared_batch:
        steps = _SharedSteps(module, gens[-1], low_precision, data)
        track = MemberLog(m_total, fast_patience_steps(patience, batch_size), min_epochs)
    else:
        steps = _PerMemberSteps(module, gens[:m_total], data)
        track = MemberLog(m_total, patience, min_epochs)
    head_params = [p for p in module.parameters() if p is not module.w1 and p is not module.b1]
    opt = make_adam([*steps.params, *head_params], lr)
    reset = [*steps.reset, *head_params]  # not the weights whose gradient a custom autograd function overwrites
    budget = None  # the reference's early stop ends a fit long before its epoch cap: no total, no false ETA
    if recipe.epochs is not None:
        max_epochs = min(max_epochs, recipe.epochs)
        budget = max_epochs * steps.steps_per_epoch()
        if recipe.max_steps is not None:
            budget = min(budget, recipe.max_steps)  # an upper bound (a loss plateau may end it sooner)
    bar = tqdm(desc="fit", unit="step", total=budget, disable=not progress, leave=False)
    step, pixels = 0, 0
    try:
        for epoch in range(max_epochs):
            active = track.active()
            if not active:
                break
            for desc in steps.epoch(active):
                active = track.active()
                if not active:
                    break
                for p in reset:
                    p.grad = None
                logits, targets = steps.logits(desc, active, device)
                losses = member_losses(logits, targets)
                losses.sum().backward()
                opt.step()
                step += 1
                pixels += logits.shape[1]
                # in the shared-batch recipes stopped members keep training (shared GEMM); their snapshot is kept
                track.record_step(losses.tolist(), active, step, epoch, steps.snapshot, logits.shape[1])
                bar.update(1)
                if progress and step % 10 == 0:
                    bar.set_postfix(epoch=f"{epoch + 1}/{max_epochs}", loss=f"{sum(losses.tolist()) / m_total:.3f}",
                                    since_best=track.since_best(), pixels=f"{pixels:.3g}", active=len(active))
            track.end_epoch()
    finally:
        bar.close()
    steps.finish()
    track.restore(module)
    return track.result()
