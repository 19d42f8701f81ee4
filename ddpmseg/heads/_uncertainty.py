"""Uncertainty of several samples' class probabilities (ensemble members, diffusion generations)."""

from __future__ import annotations

import torch


def entropy(probs: torch.Tensor, dim: int) -> torch.Tensor:
    """Entropy in nats of the distributions along ``dim`` (0 log 0 = 0)."""
    return -torch.xlogy(probs, probs).sum(dim)


def mutual_information(probs: torch.Tensor, dim: int, log_probs: torch.Tensor | None = None) -> torch.Tensor:
    """Entropy of the mean of N samples' distributions minus their mean entropy (BALD's mutual
    information), in nats, >= 0 (clamped against rounding).

    ``probs``: (N, ...) with the classes along ``dim`` (counted in ``probs``, not 0); ``log_probs``
    (the same shape, optional): their logarithms, for an exact member entropy from log-softmax.
    One sample has none: 0 everywhere.
    """
    dim = dim % probs.ndim
    if dim == 0:
        raise ValueError("dim 0 holds the samples; the classes must be on another axis")
    mean = probs.mean(0)
    total = entropy(mean, dim - 1)
    members = -(probs * log_probs).sum(dim).mean(0) if log_probs is not None else entropy(probs, dim).mean(0)
    return (total - members).clamp_min_(0.0)
