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

from ddpmseg.classify.members import SharedFirstLayer, StackedMLP
from ddpmseg import options
from ddpmseg.features.pixels import PixelSource

log = logging.getLogger(__name__)

REFERENCE_BATCH, REFERENCE_LR = 64, 1e-3


@dataclass(frozen=True)
class Recipe:
    """How the members are trained: batch size, learning rate, and whether they share each batch."""

    name: str
    batch_size: int
    lr: float
    shared_batch: bool  # one batch for all members, layer 1 as one GEMM (bf16 allowed); else one batch each
    description: str


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe("reference", REFERENCE_BATCH, REFERENCE_LR, False, options.RECIPES["reference"]),
        Recipe("fast", 1024, REFERENCE_LR * math.sqrt(1024 / REFERENCE_BATCH), True, options.RECIPES["fast"]),
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


FitLog = tuple[list[int], list[float], list[float], list[list[float]]]  # steps, final, best losses, epoch curves


class MemberLog:
    """Per-member bookkeeping: steps, losses, epoch curves, early stops and snapshots."""

    def __init__(self, n_members: int, patience: int, min_epochs: int) -> None:
        self.stops = [EarlyStop(patience, min_epochs) for _ in range(n_members)]
        self.snapshots: list[list[torch.Tensor] | None] = [None] * n_members
        self.n_iter, self.final = [0] * n_members, [math.nan] * n_members
        self.best = [math.inf] * n_members
        self.curves: list[list[float]] = [[] for _ in range(n_members)]
        self._sums, self._counts = [0.0] * n_members, [0] * n_members

    def active(self) -> list[int]:
        return [m for m, snap in enumerate(self.snapshots) if snap is None]

    def record_step(
        self, losses: list[float], active: list[int], step: int, epoch: int, snapshot: Callable[[int], list[torch.Tensor]]
    ) -> None:
        """Record one step's losses of the active members; snapshot (``snapshot(m)``) each that stops now."""
        for m in active:
            loss = losses[m]
            self.n_iter[m] = step
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
        return self.n_iter, self.final, self.best, self.curves


# -- the two ways of drawing a step and running layer 1 --------------------------------------------
class _PerMemberSteps:
    """The reference recipe: member m's batch from its own shuffle; layer 1 as a batched matmul (M, B, D)."""

    def __init__(self, module: StackedMLP, gens: list[torch.Generator]) -> None:
        self.module, self.gens = module, gens
        module.w1.grad = torch.zeros_like(module.w1)  # persistent, overwritten by every backward
        self.weight, self.bias = module.w1, module.b1

    def new_epoch(self, n: int, n_epoch: int, active: list[int]) -> None:
        self.perms = {m: torch.randperm(n, generator=self.gens[m])[:n_epoch] for m in active}

    def logits(self, source: PixelSource, keep: torch.Tensor, y: torch.Tensor, lo: int, hi: int,
               active: list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        # stopped members ride along on an active member's batch (their result is discarded)
        pos = torch.stack([self.perms[m if m in active else active[0]][lo:hi] for m in range(self.module.n_members)])
        x, yb = _gather_union(source, keep, y, pos, device)
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

    def __init__(self, module: StackedMLP, shuffle: torch.Generator, low_precision: bool) -> None:
        self.module, self.shuffle = module, shuffle
        m, d, h1 = module.w1.shape
        self.weight = nn.Parameter(module.w1.detach().permute(1, 0, 2).reshape(d, m * h1).clone())
        self.bias = nn.Parameter(module.b1.detach().reshape(-1).clone())
        self.weight.grad = torch.zeros_like(self.weight)  # persistent, overwritten by every backward
        self.low = torch.empty_like(self.weight, dtype=torch.bfloat16) if low_precision else None

    def new_epoch(self, n: int, n_epoch: int, active: list[int]) -> None:
        self.perm = torch.randperm(n, generator=self.shuffle)[:n_epoch]

    def logits(self, source: PixelSource, keep: torch.Tensor, y: torch.Tensor, lo: int, hi: int,
               active: list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        pos = self.perm[lo:hi]
        x = source.gather(keep[pos]).to(device=device, dtype=torch.float32, non_blocking=True)
        h = SharedFirstLayer.apply(x, self.weight, self.bias, self.low)  # (B, M*H1)
        m, _, h1 = self.module.w1.shape
        return self.module.head(h.view(len(pos), m, h1).transpose(0, 1)), y[pos].to(device).repeat(m)

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
) -> FitLog:
    """Train every member of ``module`` on the pixels ``keep`` (indices into ``source``) with labels ``y``.

    ``n_epoch`` pixels are visited per epoch (a fresh random subset when fewer
    than ``len(keep)``). Each member stops on its own (the reference's rule;
    the fast recipe counts ``patience`` in pixels) and keeps the weights it had
    when it stopped. Returns the per-member steps, final and best batch
    losses, and mean loss per epoch.
    """
    m_total, n = module.n_members, len(keep)
    gens = member_generators(random_state, m_total + 1)  # the last one: the fast recipe's shared shuffle
    for m in range(m_total):
        module.init_member_(m, gens[m])
    module.train()
    if recipe.shared_batch:
        steps = _SharedSteps(module, gens[-1], low_precision)
        track = MemberLog(m_total, fast_patience_steps(patience, batch_size), min_epochs)
    else:
        steps = _PerMemberSteps(module, gens[:m_total])
        track = MemberLog(m_total, patience, min_epochs)
    head_params = [p for p in module.parameters() if p is not module.w1 and p is not module.b1]
    opt = make_adam([steps.weight, steps.bias, *head_params], lr)
    reset = [steps.bias, *head_params]  # layer 1's weight gradient is overwritten in place instead
    bounds = batch_bounds(n_epoch, batch_size)
    bar = tqdm(total=max_epochs * len(bounds), desc="fit", unit="step", disable=not progress, leave=False)
    step = 0
    try:
        for epoch in range(max_epochs):
            active = track.active()
            if not active:
                break
            steps.new_epoch(n, n_epoch, active)
            for lo, hi in bounds:
                active = track.active()
                if not active:
                    break
                for p in reset:
                    p.grad = None
                logits, targets = steps.logits(source, keep, y, lo, hi, active, device)
                losses = member_losses(logits, targets)
                losses.sum().backward()
                opt.step()
                step += 1
                bar.update(1)
                # in the fast recipe stopped members keep training (shared GEMM); their snapshot is kept
                track.record_step(losses.tolist(), active, step, epoch, steps.snapshot)
            track.end_epoch()
    finally:
        bar.close()
    steps.finish()
    track.restore(module)
    return track.result()
