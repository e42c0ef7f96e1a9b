"""Small statistics shared by the diagnostics (placement, damage probe) and the trainer's logging."""
from __future__ import annotations

import torch


def ranks(x: torch.Tensor) -> torch.Tensor:
    """0-based ranks of a 1-D tensor (ties broken by position), float64: Spearman = Pearson of ranks."""
    return x.argsort().argsort().double()


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of two tensors of the same number of elements; nan when either is constant."""
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    den = float(a.norm() * b.norm())
    return float((a * b).sum()) / den if den > 0 else float("nan")


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two tensors (flattened)."""
    return pearson(ranks(a.flatten()), ranks(b.flatten()))
