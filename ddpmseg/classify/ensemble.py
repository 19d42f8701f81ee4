"""The paper's pixel classifier: an ensemble of small MLPs, trained as one fused computation.

The recipe is the DatasetGAN / ddpm-segmentation one: ``n_members`` MLPs
``Linear(D,H1) ReLU BN(H1) Linear(H1,H2) ReLU BN(H2) Linear(H2,K)`` (H = 128/32,
or 256/128 for 30 or more classes), Linear weights ~ N(0, 0.02) and biases 0,
Adam(lr=1e-3), batch 64, cross-entropy, the reference's early stopping, and a
majority vote of the members' argmax at prediction time.

The members are stored stacked (weights ``(M, in, out)``, BatchNorm over
``M * width`` channels) so they train as one batched computation: one Adam
over stacked parameters is exactly M independent Adams, and the summed loss
gives each member exactly its own gradient. Member m draws its initial weights
and its shuffles from its own ``torch.Generator``, so the fused trainer and the
plain one-member-after-another trainer (``fused=False``) see identical batches.

Two training recipes (``PixelEnsemble(recipe=...)``):

``"reference"`` -- the paper's, exactly (above): every member its own shuffle,
    batch 64, one Adam step per member per batch. On a CPU its cost is the
    (D, H1) first layer's matmuls and Adam update per 64 pixels.
``"fast"`` -- all members share one shuffled batch of 1024 pixels, so a step
    gathers the pixels once and runs layer 1 of every member as one
    ``(B, D) x (D, M*H1)`` GEMM (in bfloat16 where the hardware has it, with
    fp32 master weights, Adam and everything after layer 1), and Adam's update
    is amortised over 16x more pixels. Members still differ by their own
    initialisation (same draws as the reference), BatchNorm statistics and
    early stop. The learning rate is scaled by sqrt(1024/64) = 4 (Adam's usual
    rule for a 16x batch) and early stopping counts patience in pixels:
    ``patience * 64`` pixels without a new best batch loss, i.e. 4 batches of
    1024 (:func:`fast_patience_steps`). ``benchmarks/bench_fit.py`` measures
    its speed, ``benchmarks/bench_fit_quality.py`` its held-out mIoU against
    the reference recipe's.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Iterator, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.base import BaseEstimator
from sklearn.exceptions import NotFittedError as _SkNotFittedError
from torch import nn
from tqdm.auto import tqdm

from ddpmseg.errors import DdpmsegError

log = logging.getLogger(__name__)

STATE_FORMAT = "ddpmseg-pixel-ensemble"
STATE_VERSION = 1  # states saved before ``recipe`` / ``pixel_fraction`` / ``precision`` load as the reference recipe
RECIPES = ("reference", "fast")
PRECISIONS = ("auto", "fp32", "bf16")
REFERENCE_BATCH, REFERENCE_LR = 64, 1e-3
FAST_BATCH = 1024
FAST_LR = REFERENCE_LR * math.sqrt(FAST_BATCH / REFERENCE_BATCH)  # 4e-3
PREDICT_CHUNK = 65536  # rows per prediction chunk, at most ...
PREDICT_CHUNK_BYTES = 256 << 20  # ... and at most this many bytes of float32 features
INIT_STD = 0.02


class NotFittedError(DdpmsegError, _SkNotFittedError):
    """Raised when a PixelEnsemble is used before ``fit``."""


# -- pixel sources --------------------------------------------------------------------
@runtime_checkable
class PixelSource(Protocol):
    """Anything that hands out float32 feature rows of pixels by index."""

    n_features: int

    def __len__(self) -> int: ...

    def gather(self, index: torch.Tensor) -> torch.Tensor: ...


class ArrayPixels:
    """A :class:`PixelSource` over an in-memory (N, D) array or tensor (kept as is, no copy)."""

    def __init__(self, array: np.ndarray | torch.Tensor) -> None:
        data = array.detach().cpu() if isinstance(array, torch.Tensor) else torch.as_tensor(np.asarray(array))
        if data.ndim != 2:
            raise DdpmsegError(
                f"pixel features must be a 2-D (n_pixels, n_features) array, got shape {tuple(data.shape)}; reshape them"
            )
        if data.dtype == torch.bool or data.is_complex():
            raise DdpmsegError(f"pixel features must be real numbers, got dtype {data.dtype}; pass a float array")
        self._data = data
        self.n_features = int(data.shape[1])

    def __len__(self) -> int:
        return int(self._data.shape[0])

    def gather(self, index: torch.Tensor) -> torch.Tensor:
        """Float32 rows (B, D) of the pixels ``index`` (int64, B)."""
        return self._data[torch.as_tensor(index, dtype=torch.long)].to(torch.float32)


def as_pixel_source(X: Any) -> PixelSource:
    """``X`` itself if it implements the PixelSource protocol, else ``ArrayPixels(X)``."""
    if isinstance(X, (np.ndarray, torch.Tensor, list, tuple)):
        return ArrayPixels(X)
    if hasattr(X, "gather") and hasattr(X, "n_features") and hasattr(X, "__len__"):
        return X
    return ArrayPixels(X)


# -- the early-stopping rule ------------------------------------------------------------
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


# -- the networks ----------------------------------------------------------------------
def default_hidden(n_classes: int) -> tuple[int, int]:
    """The reference's hidden widths: (128, 32) below 30 classes, (256, 128) from 30 on."""
    return (128, 32) if n_classes < 30 else (256, 128)


def make_mlp(n_features: int, hidden: tuple[int, int], n_classes: int) -> nn.Sequential:
    """One member as the reference builds it (default PyTorch init; see :func:`init_mlp_`)."""
    h1, h2 = hidden
    return nn.Sequential(
        nn.Linear(n_features, h1),
        nn.ReLU(),
        nn.BatchNorm1d(h1),
        nn.Linear(h1, h2),
        nn.ReLU(),
        nn.BatchNorm1d(h2),
        nn.Linear(h2, n_classes),
    )


_LINEAR_IDX = (0, 3, 6)
_BN_IDX = (2, 5)


@torch.no_grad()
def _draw_linear_weights(
    n_features: int, hidden: tuple[int, int], n_classes: int, generator: torch.Generator
) -> list[torch.Tensor]:
    """A member's three Linear weights, each (out, in) ~ N(0, 0.02), drawn in layer order."""
    dims = (n_features, *hidden, n_classes)
    return [torch.empty(dims[i + 1], dims[i]).normal_(0.0, INIT_STD, generator=generator) for i in range(3)]


@torch.no_grad()
def init_mlp_(mlp: nn.Sequential, generator: torch.Generator) -> nn.Sequential:
    """The reference's init: Linear weights N(0, 0.02), biases 0, BatchNorm1d untouched."""
    d, k = mlp[0].in_features, mlp[6].out_features
    weights = _draw_linear_weights(d, (mlp[0].out_features, mlp[3].out_features), k, generator)
    for i, w in zip(_LINEAR_IDX, weights):
        mlp[i].weight.copy_(w)
        mlp[i].bias.zero_()
    return mlp


class StackedMLP(nn.Module):
    """M independent members with stacked parameters.

    ``w1 (M, D, H1)``, ``b1 (M, H1)``, ``bn1 = BatchNorm1d(M*H1)`` (member m owns
    channels ``m*H1 : (m+1)*H1``), likewise layers 2 and 3. Input ``(M, B, D)``
    (one batch per member) or ``(B, D)`` (shared by all members); output ``(M, B, K)``.
    """

    def __init__(self, n_members: int, n_features: int, hidden: tuple[int, int], n_classes: int) -> None:
        super().__init__()
        m, (h1, h2), d, k = n_members, hidden, n_features, n_classes
        self.n_members, self.n_features, self.hidden, self.n_classes = m, d, (h1, h2), k
        self.w1 = nn.Parameter(torch.zeros(m, d, h1))
        self.b1 = nn.Parameter(torch.zeros(m, h1))
        self.bn1 = nn.BatchNorm1d(m * h1)
        self.w2 = nn.Parameter(torch.zeros(m, h1, h2))
        self.b2 = nn.Parameter(torch.zeros(m, h2))
        self.bn2 = nn.BatchNorm1d(m * h2)
        self.w3 = nn.Parameter(torch.zeros(m, h2, k))
        self.b3 = nn.Parameter(torch.zeros(m, k))

    @torch.no_grad()
    def init_member_(self, m: int, generator: torch.Generator) -> None:
        """Initialise member m exactly as :func:`init_mlp_` would with the same generator."""
        weights = _draw_linear_weights(self.n_features, self.hidden, self.n_classes, generator)
        for w, b, drawn in zip((self.w1, self.w2, self.w3), (self.b1, self.b2, self.b3), weights):
            w[m].copy_(drawn.T)
            b[m].zero_()

    @staticmethod
    def _bn(bn: nn.BatchNorm1d, h: torch.Tensor) -> torch.Tensor:
        m, b, w = h.shape
        if not bn.training and bn.running_var is not None:
            # eval: BatchNorm is a per-channel affine map; applied on (M, B, W) directly it
            # avoids the (B, M*W) transposed copy (a third of predict's classification time)
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            shift = bn.bias - bn.running_mean * scale
            return torch.addcmul(shift.view(m, 1, w), h, scale.view(m, 1, w))
        return bn(h.transpose(0, 1).reshape(b, m * w)).reshape(b, m, w).transpose(0, 1)

    def hidden1(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-activation of layer 1, (M, B, H1), from (M, B, D) or shared (B, D) input."""
        if x.ndim == 2:  # shared input: one GEMM per member, no (M, B, D) copy of x
            m, _, h1 = self.w1.shape
            out = x.new_empty((m, x.shape[0], h1))
            for i in range(m):
                torch.addmm(self.b1[i], x, self.w1[i], out=out[i])
            return out
        return torch.baddbmm(self.b1[:, None, :], x, self.w1)

    def forward_train(self, x: torch.Tensor) -> torch.Tensor:
        """Training forward for (M, B, D) batches; layer 1's weight gradient goes straight into ``w1.grad``.

        ``w1.grad`` must be allocated (any values): backward overwrites it, so it
        needs no zeroing, and no new (M, D, H1) tensor is allocated per step (for
        the paper's 8448 x 256 x 10 that is 86 MB, which the allocator would
        otherwise map and page-fault afresh every step).
        """
        return self.head(_FirstLayerInto.apply(x, self.w1, self.b1))

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Everything after layer 1's pre-activation: (M, B, H1) -> logits (M, B, K)."""
        h = self._bn(self.bn1, F.relu(h))
        h = torch.baddbmm(self.b2[:, None, :], h, self.w2)
        h = self._bn(self.bn2, F.relu(h))
        return torch.baddbmm(self.b3[:, None, :], h, self.w3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.hidden1(x))

    # member slices: the unit of early-stopping snapshots and of the sequential trainer
    def _slices(self, m: int) -> list[tuple[torch.Tensor, slice | int]]:
        h1, h2 = self.hidden
        s1, s2 = slice(m * h1, (m + 1) * h1), slice(m * h2, (m + 1) * h2)
        out: list[tuple[torch.Tensor, slice | int]] = [(t, m) for t in (self.w1, self.b1, self.w2, self.b2, self.w3, self.b3)]
        for bn, s in ((self.bn1, s1), (self.bn2, s2)):
            out += [(bn.weight, s), (bn.bias, s), (bn.running_mean, s), (bn.running_var, s)]
        return out

    @torch.no_grad()
    def member_state(self, m: int) -> list[torch.Tensor]:
        """A copy of member m's slice of every parameter and running statistic."""
        return [t[i].detach().clone() for t, i in self._slices(m)]

    @torch.no_grad()
    def load_member_state(self, m: int, state: list[torch.Tensor]) -> None:
        """Write back a :meth:`member_state` copy."""
        for (t, i), v in zip(self._slices(m), state):
            t[i].copy_(v)

    @torch.no_grad()
    def load_member_mlp(self, m: int, mlp: nn.Sequential) -> None:
        """Copy a :func:`make_mlp` network into member m's slices."""
        lin = [mlp[i] for i in _LINEAR_IDX]
        bns = [mlp[i] for i in _BN_IDX]
        state = [lin[0].weight.T, lin[0].bias, lin[1].weight.T, lin[1].bias, lin[2].weight.T, lin[2].bias]
        for bn in bns:
            state += [bn.weight, bn.bias, bn.running_mean, bn.running_var]
        self.load_member_state(m, state)

    @torch.no_grad()
    def member_mlp(self, m: int) -> nn.Sequential:
        """Member m as a standalone :func:`make_mlp` network (same mode and device)."""
        mlp = make_mlp(self.n_features, self.hidden, self.n_classes).to(self.w1.device)
        st = self.member_state(m)
        for j, i in enumerate(_LINEAR_IDX):
            mlp[i].weight.copy_(st[2 * j].T)
            mlp[i].bias.copy_(st[2 * j + 1])
        for j, i in enumerate(_BN_IDX):
            bn = mlp[i]
            for t, v in zip((bn.weight, bn.bias, bn.running_mean, bn.running_var), st[6 + 4 * j : 10 + 4 * j]):
                t.copy_(v)
        return mlp.train(self.training)


class _FirstLayerInto(torch.autograd.Function):
    """``x @ w + b`` for stacked members; backward writes dL/dw into the persistent ``w.grad``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        return torch.baddbmm(b[:, None, :], x, w)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, None, torch.Tensor]:
        x, w = ctx.saved_tensors
        for i in range(w.shape[0]):  # per-member GEMMs beat one bmm over transposed x on CPU
            torch.mm(x[i].T, grad[i], out=w.grad[i])
        return None, None, grad.sum(1)


class _SharedFirstLayer(torch.autograd.Function):
    """Layer 1 of every member on one shared batch: ``x @ w + b``, ``w (D, M*H1)`` fp32, output (B, M*H1) fp32.

    With ``low`` (a persistent bfloat16 buffer shaped like ``w``) both GEMMs run
    in bfloat16 with fp32 accumulation: ``w`` is rounded into ``low`` each
    forward (the master weights and Adam stay fp32), and dL/dw is rounded to
    bf16 once. Backward writes dL/dw into the persistent ``w.grad`` (no new
    (D, M*H1) tensor per step) and gives no gradient to ``x``.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, low: torch.Tensor | None) -> torch.Tensor:
        if low is None:
            ctx.save_for_backward(x, w)
            return torch.addmm(b, x, w)
        xq = x.to(low.dtype)
        ctx.save_for_backward(xq, w)
        return torch.mm(xq, low.copy_(w)).float().add_(b)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, None, torch.Tensor, None]:
        x, w = ctx.saved_tensors
        if x.dtype == torch.float32:
            torch.mm(x.T, grad, out=w.grad)
        else:  # oneDNN's bf16 GEMM is ~2x faster on a contiguous transpose (measured)
            w.grad.copy_(torch.mm(x.T.contiguous(), grad.to(x.dtype)))
        return None, None, grad.sum(0), None


# -- helpers -----------------------------------------------------------------------------
def fast_patience_steps(patience: int, batch_size: int) -> int:
    """The fast recipe's early-stopping patience in batches: the reference's ``patience`` batches of
    64 pixels, counted in pixels (``patience * 64``), i.e. ``ceil(patience * 64 / batch_size)`` batches."""
    return max(1, math.ceil(patience * REFERENCE_BATCH / batch_size))


def resolve_precision(precision: str, recipe: str, device: torch.device) -> torch.dtype:
    """Layer 1's GEMM dtype: fp32 for the reference recipe; for the fast one bf16 if asked, or with
    ``"auto"`` where the device has bf16 matmul kernels (oneDNN on CPU, bf16-capable CUDA)."""
    if recipe == "reference" or precision == "fp32":
        return torch.float32
    if precision == "bf16":
        return torch.bfloat16
    try:
        if device.type == "cuda":
            ok = torch.cuda.is_bf16_supported()
        else:
            ok = device.type == "cpu" and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # older torch without the probe
        ok = False
    return torch.bfloat16 if ok else torch.float32


FitLog = tuple[list[int], list[float], list[float], list[list[float]]]  # steps, final, best losses, epoch curves


class _MemberLog:
    """Per-member bookkeeping of a fused trainer: steps, losses, epoch curves, early stops and snapshots."""

    def __init__(self, n_members: int, patience: int, min_epochs: int) -> None:
        self.stops = [EarlyStop(patience, min_epochs) for _ in range(n_members)]
        self.snapshots: list[list[torch.Tensor] | None] = [None] * n_members
        self.n_iter, self.final = [0] * n_members, [math.nan] * n_members
        self.best = [math.inf] * n_members
        self.curves: list[list[float]] = [[] for _ in range(n_members)]
        self._sums, self._counts = [0.0] * n_members, [0] * n_members

    def active(self) -> list[int]:
        return [m for m, snap in enumerate(self.snapshots) if snap is None]

    def record(self, m: int, loss: float, step: int, epoch: int) -> bool:
        """Record member m's batch loss; True if it has just stopped (the caller then snapshots it)."""
        self.n_iter[m] = step
        self.final[m] = loss
        self.best[m] = min(self.best[m], loss)
        self._sums[m] += loss
        self._counts[m] += 1
        return self.stops[m].update(loss, epoch)

    def record_step(
        self, losses: list[float], active: list[int], step: int, epoch: int, snapshot: Callable[[int], list[torch.Tensor]]
    ) -> None:
        """Record one step's losses of the active members; snapshot (``snapshot(m)``) each that stops now."""
        for m in active:
            if self.record(m, losses[m], step, epoch):
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


def member_generators(random_state: int | None, n_members: int) -> list[torch.Generator]:
    """One CPU generator per member, from ``SeedSequence(random_state).spawn(n_members)``."""
    children = np.random.SeedSequence(random_state).spawn(n_members)
    gens = []
    for child in children:
        lo, hi = (int(v) for v in child.generate_state(2, np.uint32))
        gens.append(torch.Generator().manual_seed((hi << 32 | lo) & ((1 << 63) - 1)))
    return gens


def _batch_bounds(n: int, batch_size: int) -> list[tuple[int, int]]:
    """Slices of one epoch (the last one may be partial, as with a DataLoader).

    A final batch of a single pixel is skipped: BatchNorm cannot train on one sample.
    """
    bounds = [(lo, min(n, lo + batch_size)) for lo in range(0, n, batch_size)]
    if bounds and bounds[-1][1] - bounds[-1][0] < 2:
        bounds.pop()
    return bounds


def vote(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Majority label and uncertainty of member logits (M, N, K).

    Label: the most frequent member argmax (ties go to the smallest label).
    Uncertainty: entropy of the mean softmax minus the mean member entropy
    (clamped at 0 against rounding).
    """
    m, n, k = logits.shape
    top = logits.argmax(-1)  # (M, N)
    counts = torch.zeros((n, k), dtype=torch.int64, device=logits.device)
    counts.scatter_add_(1, top.T, torch.ones_like(top.T))
    labels = counts.argmax(1)  # first maximum = smallest label
    return labels, _uncertainty(logits)


def _uncertainty(logits: torch.Tensor) -> torch.Tensor:
    logp = F.log_softmax(logits.float(), dim=-1)
    p = logp.exp()
    member_entropy = -(p * logp).sum(-1).mean(0)
    mean_p = p.mean(0)
    mean_entropy = -torch.xlogy(mean_p, mean_p).sum(-1)
    return (mean_entropy - member_entropy).clamp_min_(0.0)


# -- the estimator ---------------------------------------------------------------------------
class PixelEnsemble(BaseEstimator):
    """The ddpm-segmentation pixel classifier as a scikit-learn-style estimator.

    ``fit(X, y)`` takes an (N, D) array/tensor or a streaming :class:`PixelSource`
    and (N,) integer labels; pixels labelled ``ignore_index`` are dropped.

    ``recipe``: ``"reference"`` (the paper's, exactly) or ``"fast"`` (shared
    batches; see the module docstring). ``batch_size`` / ``lr`` default to the
    recipe's (64 / 1e-3 and 1024 / 4e-3). ``patience`` is in batches of 64
    pixels (the fast recipe counts it in pixels). ``pixel_fraction``: each epoch
    visits this fraction of the labelled pixels, a fresh random subset each
    epoch (1.0 = all, the reference). ``precision``: layer 1's GEMMs in the fast
    recipe (``"auto"``: bf16 where the device has fast bf16 kernels). ``fused``:
    ``False`` trains the reference members one after another (the naive trainer).
    """

    def __init__(
        self,
        n_classes: int | None = None,
        n_members: int = 10,
        hidden: tuple[int, int] | None = None,
        lr: float | None = None,
        batch_size: int | None = None,
        max_epochs: int = 100,
        patience: int = 50,
        min_epochs: int = 4,
        ignore_index: int = 255,
        fused: bool = True,
        random_state: int | None = 0,
        device: str = "cpu",
        progress: bool = False,
        recipe: str = "reference",
        pixel_fraction: float = 1.0,
        precision: str = "auto",
    ) -> None:
        self.n_classes = n_classes
        self.n_members = n_members
        self.hidden = hidden
        self.lr = lr
        self.batch_size = batch_size
        self.max_epochs = max_epochs
        self.patience = patience
        self.min_epochs = min_epochs
        self.ignore_index = ignore_index
        self.fused = fused
        self.random_state = random_state
        self.device = device
        self.progress = progress
        self.recipe = recipe
        self.pixel_fraction = pixel_fraction
        self.precision = precision

    # -- fitting ------------------------------------------------------------------------
    def fit(self, X: Any, y: Any) -> "PixelEnsemble":
        """Train the ensemble on pixels ``X`` with labels ``y``; returns self."""
        self._check_hyperparameters()
        source = as_pixel_source(X)
        labels = self._check_labels(y, len(source))
        keep = np.flatnonzero(labels != self.ignore_index)
        if keep.size < 2:
            raise DdpmsegError(
                f"only {keep.size} labelled pixel(s) left after dropping the ignore label {self.ignore_index}; "
                "give masks with at least two labelled pixels"
            )
        kept = labels[keep]
        if kept.min() < 0:
            raise DdpmsegError(
                f"label {int(kept.min())} is negative: labels must be in 0..n_classes-1 or the ignore label "
                f"{self.ignore_index}; fix the masks or set ignore_index"
            )
        n_classes = int(self.n_classes) if self.n_classes is not None else int(kept.max()) + 1
        if kept.max() >= n_classes:
            raise DdpmsegError(
                f"label {int(kept.max())} is out of range: labels must be in 0..{n_classes - 1} or the ignore label "
                f"{self.ignore_index}; fix the masks or raise n_classes"
            )
        hidden = tuple(int(h) for h in self.hidden) if self.hidden is not None else default_hidden(n_classes)
        device = torch.device(self.device)
        d = int(source.n_features)

        module = StackedMLP(self.n_members, d, hidden, n_classes).to(device)
        gens = member_generators(self.random_state, self.n_members)
        keep_t = torch.from_numpy(keep).long()
        y_t = torch.from_numpy(kept).long()
        fast = self.recipe == "fast"
        self.batch_size_ = int(self.batch_size or (FAST_BATCH if fast else REFERENCE_BATCH))
        self.lr_ = float(self.lr or (FAST_LR if fast else REFERENCE_LR))
        self.precision_ = "bf16" if resolve_precision(self.precision, self.recipe, device) == torch.bfloat16 else "fp32"
        log.info(
            "fitting %d members on %d pixels x %d features, %d classes, hidden %s (%s recipe, %s, batch %d, lr %g)",
            self.n_members, keep.size, d, n_classes, hidden, self.recipe,
            "fused" if self.fused else "sequential", self.batch_size_, self.lr_,
        )
        train = self._fit_fast if fast else self._fit_fused if self.fused else self._fit_sequential
        n_iter, final, best, curves = train(module, source, keep_t, y_t, gens, device)

        self.n_classes_ = n_classes
        self.n_features_in_ = d
        self.hidden_ = hidden
        self.n_iter_ = n_iter
        self.final_loss_ = final
        self.best_loss_ = best
        self.loss_curve_ = curves
        self.classes_ = np.arange(n_classes)
        self.module_ = module.eval()
        return self

    def _check_hyperparameters(self) -> None:
        checks = [
            (self.n_members >= 1, f"n_members={self.n_members} must be at least 1"),
            (
                self.batch_size is None or self.batch_size >= 2,
                f"batch_size={self.batch_size} must be at least 2 (BatchNorm needs two samples) or None",
            ),
            (self.max_epochs >= 1, f"max_epochs={self.max_epochs} must be at least 1"),
            (self.lr is None or self.lr > 0, f"lr={self.lr} must be positive or None"),
            (self.recipe in RECIPES, f"recipe={self.recipe!r} is unknown: use 'reference' or 'fast'"),
            (
                isinstance(self.pixel_fraction, (int, float)) and 0 < self.pixel_fraction <= 1,
                f"pixel_fraction={self.pixel_fraction} must be in (0, 1]",
            ),
            (self.precision in PRECISIONS, f"precision={self.precision!r} is unknown: use 'auto', 'fp32' or 'bf16'"),
            (
                self.recipe == "fast" or self.precision != "bf16",
                "precision='bf16' applies to recipe='fast' only: use precision='auto' or 'fp32' with the reference",
            ),
            (self.fused or self.recipe == "reference", "fused=False (the sequential trainer) exists for recipe='reference' only"),
            (self.n_classes is None or self.n_classes >= 1, f"n_classes={self.n_classes} must be at least 1 or None"),
            (
                self.hidden is None or (len(self.hidden) == 2 and all(int(h) >= 1 for h in self.hidden)),
                f"hidden={self.hidden} must be two positive widths or None",
            ),
        ]
        for ok, msg in checks:
            if not ok:
                raise DdpmsegError(f"{msg}; fix the PixelEnsemble argument")

    @staticmethod
    def _check_labels(y: Any, n: int) -> np.ndarray:
        labels = np.asarray(y.detach().cpu() if isinstance(y, torch.Tensor) else y).reshape(-1)
        if labels.size != n:
            raise DdpmsegError(f"got {labels.size} labels for {n} pixels; give one label per pixel")
        if labels.dtype.kind == "f":
            if not np.all(np.isfinite(labels)) or np.any(labels != np.round(labels)):
                raise DdpmsegError("labels must be whole numbers; pass an integer label array")
        elif labels.dtype.kind not in "iub":
            raise DdpmsegError(f"labels must be integers, got dtype {labels.dtype}; pass an integer label array")
        return labels.astype(np.int64)

    def _progress_bar(self, total: int) -> tqdm:
        return tqdm(total=total, desc="fit", unit="step", disable=not self.progress, leave=False)

    def _epoch_pixels(self, n: int) -> int:
        """Pixels visited per epoch: ``pixel_fraction`` of the ``n`` labelled ones (at least 2)."""
        return n if self.pixel_fraction >= 1 else min(n, max(2, round(self.pixel_fraction * n)))

    def _fit_fused(
        self,
        module: StackedMLP,
        source: PixelSource,
        keep: torch.Tensor,
        y: torch.Tensor,
        gens: list[torch.Generator],
        device: torch.device,
    ) -> FitLog:
        m_total, n = self.n_members, len(keep)
        for m, g in enumerate(gens):
            module.init_member_(m, g)
        module.train()
        opt = make_adam(module.parameters(), self.lr_)
        module.w1.grad = torch.zeros_like(module.w1)  # persistent, overwritten by every backward
        other_params = [p for p in module.parameters() if p is not module.w1]
        n_epoch = self._epoch_pixels(n)
        bounds = _batch_bounds(n_epoch, self.batch_size_)
        track = _MemberLog(m_total, self.patience, self.min_epochs)
        bar = self._progress_bar(self.max_epochs * len(bounds))
        step = 0
        try:
            for epoch in range(self.max_epochs):
                active = track.active()
                if not active:
                    break
                perms = {m: torch.randperm(n, generator=gens[m])[:n_epoch] for m in active}
                for lo, hi in bounds:
                    active = track.active()
                    if not active:
                        break
                    # stopped members ride along on an active member's batch (their result is discarded)
                    pos = torch.stack([perms[m if m in active else active[0]][lo:hi] for m in range(m_total)])
                    x, yb = self._gather_union(source, keep, y, pos, device)
                    for p in other_params:
                        p.grad = None
                    losses = member_losses(module.forward_train(x), yb.reshape(-1))
                    losses.sum().backward()
                    opt.step()
                    step += 1
                    bar.update(1)
                    track.record_step(losses.tolist(), active, step, epoch, module.member_state)
                track.end_epoch()
        finally:
            bar.close()
        module.w1.grad = None
        track.restore(module)
        return track.result()

    def _fit_fast(
        self,
        module: StackedMLP,
        source: PixelSource,
        keep: torch.Tensor,
        y: torch.Tensor,
        gens: list[torch.Generator],
        device: torch.device,
    ) -> FitLog:
        """The fast recipe: every member on the same shuffled batch, layer 1 as one (B,D)x(D,M*H1) GEMM.

        Layer 1 trains as one (D, M*H1) matrix (member m owns columns
        ``m*H1:(m+1)*H1``), copied into the stacked ``w1`` at snapshots and at
        the end. Shuffles come from one more ``SeedSequence`` child than the
        members' (their inits are the reference's draws).
        """
        m_total, n = self.n_members, len(keep)
        d, h1 = module.n_features, module.hidden[0]
        for m, g in enumerate(gens):
            module.init_member_(m, g)
        shuffle = member_generators(self.random_state, m_total + 1)[-1]
        module.train()
        w = nn.Parameter(module.w1.detach().permute(1, 0, 2).reshape(d, m_total * h1).clone())
        b = nn.Parameter(module.b1.detach().reshape(-1).clone())
        head_params = [p for p in module.parameters() if p is not module.w1 and p is not module.b1]
        opt = make_adam([w, b, *head_params], self.lr_)
        w.grad = torch.zeros_like(w)  # persistent, overwritten by every backward
        low = torch.empty_like(w, dtype=torch.bfloat16) if self.precision_ == "bf16" else None

        @torch.no_grad()
        def sync(members: list[int]) -> None:  # the trained layer-1 columns into the stacked w1 / b1
            for m in members:
                module.w1[m].copy_(w[:, m * h1 : (m + 1) * h1])
                module.b1[m].copy_(b[m * h1 : (m + 1) * h1])

        def snapshot(m: int) -> list[torch.Tensor]:
            sync([m])
            return module.member_state(m)

        n_epoch = self._epoch_pixels(n)
        bounds = _batch_bounds(n_epoch, self.batch_size_)
        track = _MemberLog(m_total, fast_patience_steps(self.patience, self.batch_size_), self.min_epochs)
        bar = self._progress_bar(self.max_epochs * len(bounds))
        step = 0
        try:
            for epoch in range(self.max_epochs):
                if not track.active():
                    break
                perm = torch.randperm(n, generator=shuffle)[:n_epoch]
                for lo, hi in bounds:
                    active = track.active()
                    if not active:
                        break
                    pos = perm[lo:hi]
                    x = source.gather(keep[pos]).to(device=device, dtype=torch.float32, non_blocking=True)
                    yb = y[pos].to(device)
                    for p in head_params:
                        p.grad = None
                    b.grad = None
                    h = _SharedFirstLayer.apply(x, w, b, low)  # (B, M*H1)
                    logits = module.head(h.view(len(pos), m_total, h1).transpose(0, 1))  # (M, B, K)
                    losses = member_losses(logits, yb.repeat(m_total))
                    losses.sum().backward()
                    opt.step()
                    step += 1
                    bar.update(1)
                    # stopped members keep training (shared GEMM); their snapshot is kept
                    track.record_step(losses.tolist(), active, step, epoch, snapshot)
                track.end_epoch()
        finally:
            bar.close()
        sync(list(range(m_total)))
        track.restore(module)
        return track.result()

    @staticmethod
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

    def _fit_sequential(
        self,
        module: StackedMLP,
        source: PixelSource,
        keep: torch.Tensor,
        y: torch.Tensor,
        gens: list[torch.Generator],
        device: torch.device,
    ) -> FitLog:
        """The naive recipe: each member trained alone as an nn.Sequential, then copied into ``module``."""
        n = len(keep)
        n_epoch = self._epoch_pixels(n)
        bounds = _batch_bounds(n_epoch, self.batch_size_)
        n_iter, final, best, curves = [], [], [], []
        d, hidden, k = module.n_features, module.hidden, module.n_classes
        bar = self._progress_bar(self.n_members * self.max_epochs * len(bounds))
        try:
            for m, g in enumerate(gens):
                mlp = init_mlp_(make_mlp(d, hidden, k), g).to(device).train()
                opt = make_adam(mlp.parameters(), self.lr_)
                stop = EarlyStop(self.patience, self.min_epochs)
                steps, last, low, curve = 0, math.nan, math.inf, []
                for epoch in range(self.max_epochs):
                    perm = torch.randperm(n, generator=g)[:n_epoch]
                    total, count = 0.0, 0
                    for lo, hi in bounds:
                        idx = keep[perm[lo:hi]]
                        x = source.gather(idx).to(device=device, dtype=torch.float32)
                        opt.zero_grad(set_to_none=True)
                        loss = F.cross_entropy(mlp(x), y[perm[lo:hi]].to(device))
                        loss.backward()
                        opt.step()
                        steps += 1
                        bar.update(1)
                        last = loss.item()
                        low = min(low, last)
                        total += last
                        count += 1
                        if stop.update(last, epoch):
                            break
                    if count:
                        curve.append(total / count)
                    if stop.stopped:
                        log.info("member %d stopped early after %d steps (epoch %d)", m, steps, epoch)
                        break
                module.load_member_mlp(m, mlp)
                n_iter.append(steps)
                final.append(last)
                best.append(low)
                curves.append(curve)
        finally:
            bar.close()
        return n_iter, final, best, curves

    # -- prediction ---------------------------------------------------------------------
    def __sklearn_is_fitted__(self) -> bool:
        return hasattr(self, "module_")

    def _check_fitted(self) -> None:
        if not hasattr(self, "module_"):
            raise NotFittedError("This PixelEnsemble is not fitted yet: call fit(X, y) first.")

    def _source(self, X: Any) -> PixelSource:
        self._check_fitted()
        source = as_pixel_source(X)
        if int(source.n_features) != self.n_features_in_:
            raise DdpmsegError(
                f"X has {source.n_features} features but this PixelEnsemble was fitted on {self.n_features_in_}; "
                "pass features extracted with the same settings"
            )
        return source

    def _iter_logits(self, X: Any, chunk: int | None = None) -> Iterator[torch.Tensor]:
        """Member logits (M, n, K) chunk by chunk (bounded by ``PREDICT_CHUNK`` rows and ``PREDICT_CHUNK_BYTES``)."""
        source = self._source(X)
        chunk = chunk or min(PREDICT_CHUNK, max(1, PREDICT_CHUNK_BYTES // (4 * max(1, self.n_features_in_))))
        device = self.module_.w1.device
        self.module_.eval()
        n = len(source)
        with torch.inference_mode():
            for lo in range(0, n, chunk):
                idx = torch.arange(lo, min(n, lo + chunk), dtype=torch.long)
                x = source.gather(idx).to(device=device, dtype=torch.float32)
                yield self.module_(x)

    def predict_member_logits(self, X: Any) -> torch.Tensor:
        """Every member's logits, (M, N, K) float32 on the CPU."""
        parts = [z.cpu() for z in self._iter_logits(X)]
        if not parts:
            return torch.zeros((self.n_members_, 0, self.n_classes_))
        return torch.cat(parts, dim=1)

    def predict_proba(self, X: Any) -> np.ndarray:
        """Mean of the members' softmax, (N, K) float32; rows sum to 1."""
        parts = [torch.softmax(z.float(), dim=-1).mean(0).cpu() for z in self._iter_logits(X)]
        return torch.cat(parts).numpy() if parts else np.zeros((0, self.n_classes_), np.float32)

    def predict(self, X: Any) -> np.ndarray:
        """Majority vote of the members' argmax, (N,) int64; ties go to the smallest label."""
        parts = [vote(z)[0].cpu() for z in self._iter_logits(X)]
        return torch.cat(parts).numpy() if parts else np.zeros(0, np.int64)

    def uncertainty(self, X: Any) -> np.ndarray:
        """Entropy of the mean softmax minus the mean member entropy, (N,) float32, >= 0."""
        parts = [_uncertainty(z).cpu() for z in self._iter_logits(X)]
        return torch.cat(parts).numpy() if parts else np.zeros(0, np.float32)

    def vote(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(labels (N,), uncertainty (N,)) of member logits (M, N, K); see :func:`vote`."""
        return vote(logits)

    # -- layer-1 split for native-resolution prediction ---------------------------------------
    def first_layer(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer 1's stacked weight (M, D, H1) and bias (M, H1), on the model's device."""
        self._check_fitted()
        return self.module_.w1.detach(), self.module_.b1.detach()

    def head_from_hidden1(self, h: torch.Tensor) -> torch.Tensor:
        """Logits (M, N, K) from layer 1's pre-activation ``h`` (M, N, H1): ReLU, BN, Linear, ReLU, BN, Linear."""
        self._check_fitted()
        m, h1 = self.module_.n_members, self.hidden_[0]
        if h.ndim != 3 or h.shape[0] != m or h.shape[2] != h1:
            raise DdpmsegError(f"hidden activations must have shape ({m}, N, {h1}), got {tuple(h.shape)}")
        with torch.inference_mode():
            return self.module_.eval().head(h.to(self.module_.w1.device, torch.float32))

    @property
    def n_members_(self) -> int:
        self._check_fitted()
        return self.module_.n_members

    def to(self, device: str | torch.device) -> "PixelEnsemble":
        """Move the fitted module to ``device``; returns self."""
        self._check_fitted()
        self.module_.to(torch.device(device))
        return self

    # -- persistence --------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to rebuild the fitted estimator; safe for ``torch.load(weights_only=True)``."""
        self._check_fitted()
        params = self.get_params(deep=False)
        if params["hidden"] is not None:
            params["hidden"] = [int(h) for h in params["hidden"]]
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "params": params,
            "n_classes_": int(self.n_classes_),
            "n_features_in_": int(self.n_features_in_),
            "n_members_": int(self.module_.n_members),
            "hidden_": [int(h) for h in self.hidden_],
            "n_iter_": [int(v) for v in self.n_iter_],
            "final_loss_": [float(v) for v in self.final_loss_],
            "best_loss_": [float(v) for v in self.best_loss_],
            "loss_curve_": [[float(v) for v in c] for c in self.loss_curve_],
            "batch_size_": int(self.batch_size_),
            "lr_": float(self.lr_),
            "precision_": self.precision_,
            "module": {k: v.detach().cpu().clone() for k, v in self.module_.state_dict().items()},
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], device: str | torch.device = "cpu") -> "PixelEnsemble":
        """Rebuild a fitted estimator from :meth:`state_dict` (module placed on ``device``)."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise DdpmsegError("not a PixelEnsemble state dict; pass what PixelEnsemble.state_dict() returned")
        if state.get("version", 0) > STATE_VERSION:
            raise DdpmsegError(
                f"PixelEnsemble state version {state['version']} is newer than this ddpmseg supports; upgrade ddpmseg"
            )
        params = dict(state["params"])
        params.setdefault("recipe", "reference")  # saved before the fast recipe existed
        if params.get("hidden") is not None:
            params["hidden"] = tuple(params["hidden"])
        est = cls(**params)
        hidden = tuple(int(h) for h in state["hidden_"])
        module = StackedMLP(int(state["n_members_"]), int(state["n_features_in_"]), hidden, int(state["n_classes_"]))
        module.load_state_dict(state["module"])
        est.n_classes_ = int(state["n_classes_"])
        est.n_features_in_ = int(state["n_features_in_"])
        est.hidden_ = hidden
        est.n_iter_ = list(state["n_iter_"])
        est.final_loss_ = list(state.get("final_loss_", []))
        est.best_loss_ = list(state.get("best_loss_", []))
        est.loss_curve_ = [list(c) for c in state.get("loss_curve_", [])]
        est.batch_size_ = int(state.get("batch_size_", params.get("batch_size") or REFERENCE_BATCH))
        est.lr_ = float(state.get("lr_", params.get("lr") or REFERENCE_LR))
        est.precision_ = str(state.get("precision_", "fp32"))
        est.classes_ = np.arange(est.n_classes_)
        est.module_ = module.to(torch.device(device)).eval()
        return est
