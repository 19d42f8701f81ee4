"""The ensemble's members: the reference MLP, and M of them stacked into one module.

A member is ``Linear(D,H1) ReLU BN(H1) Linear(H1,H2) ReLU BN(H2) Linear(H2,K)``
(H = 128/32, or 256/128 for 30 or more classes), Linear weights ~ N(0, 0.02)
and biases 0, BatchNorm1d at PyTorch's defaults (the DatasetGAN /
ddpm-segmentation classifier). ``StackedMLP`` holds M members as stacked
parameters (weights ``(M, in, out)``, BatchNorm over ``M * width`` channels)
so they train and predict as one batched computation; the two autograd
functions compute layer 1 the way each training recipe needs it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

INIT_STD = 0.02


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
def draw_linear_weights(
    n_features: int, hidden: tuple[int, int], n_classes: int, generator: torch.Generator
) -> list[torch.Tensor]:
    """A member's three Linear weights, each (out, in) ~ N(0, 0.02), drawn in layer order."""
    dims = (n_features, *hidden, n_classes)
    return [torch.empty(dims[i + 1], dims[i]).normal_(0.0, INIT_STD, generator=generator) for i in range(3)]


@torch.no_grad()
def init_mlp_(mlp: nn.Sequential, generator: torch.Generator) -> nn.Sequential:
    """The reference's init: Linear weights N(0, 0.02), biases 0, BatchNorm1d untouched."""
    d, k = mlp[0].in_features, mlp[6].out_features
    weights = draw_linear_weights(d, (mlp[0].out_features, mlp[3].out_features), k, generator)
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
        weights = draw_linear_weights(self.n_features, self.hidden, self.n_classes, generator)
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
        return self.head(StackedFirstLayer.apply(x, self.w1, self.b1))

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Everything after layer 1's pre-activation: (M, B, H1) -> logits (M, B, K)."""
        h = self._bn(self.bn1, F.relu(h))
        h = torch.baddbmm(self.b2[:, None, :], h, self.w2)
        h = self._bn(self.bn2, F.relu(h))
        return torch.baddbmm(self.b3[:, None, :], h, self.w3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.hidden1(x))

    # member slices: the unit of early-stopping snapshots
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


class StackedFirstLayer(torch.autograd.Function):
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


class SharedFirstLayer(torch.autograd.Function):
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
