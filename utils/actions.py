"""The composite efficiency-action grid: token keep κ × MLP channel keep ρ × MLP-output bits.

Order and tags follow the reference exactly: κ outermost, ρ in the middle, bits innermost, so
`idx = (i_k * P + i_p) * Q + i_q`; tags read `k{κ%:03d}-s{ρ%:03d}-q{bits}`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from utils.config import parse_prune_choice, parse_quant_choice

DENSE_BITS = 16


@dataclass(frozen=True)
class ActionSpace:
    """Flattened action grid with per-action lookup tables (CPU tensors; move with `.to`)."""

    keep_values: tuple[float, ...]
    prune_values: tuple[float, ...]
    bit_values: tuple[int, ...]
    keep: torch.Tensor  # [A] float32, κ per action
    prune: torch.Tensor  # [A] float32, ρ per action
    bits: torch.Tensor  # [A] int64, bit-width per action
    tags: tuple[str, ...]
    dense_idx: int

    @classmethod
    def build(cls, keep_fracs, prune_choices, quant_choices) -> "ActionSpace":
        kv = tuple(float(k) for k in keep_fracs)
        pv = tuple(parse_prune_choice(p) if isinstance(p, str) else float(p) for p in prune_choices)
        bv = tuple(parse_quant_choice(q) if isinstance(q, str) else int(q) for q in quant_choices)
        grid = [(k, p, b) for k in kv for p in pv for b in bv]
        keep = torch.tensor([g[0] for g in grid], dtype=torch.float32)
        prune = torch.tensor([g[1] for g in grid], dtype=torch.float32)
        bits = torch.tensor([g[2] for g in grid], dtype=torch.int64)
        tags = tuple(f"k{round(k * 100):03d}-s{round(p * 100):03d}-q{b}" for k, p, b in grid)
        dense = [i for i, (k, p, b) in enumerate(grid) if k == 1.0 and p == 1.0 and b >= DENSE_BITS]
        full_k = [i for i, (k, _, _) in enumerate(grid) if k == 1.0]
        dense_idx = dense[0] if dense else (full_k[0] if full_k else 0)
        return cls(kv, pv, bv, keep, prune, bits, tags, dense_idx)

    @classmethod
    def from_config(cls, cfg) -> "ActionSpace":
        """Grid from a Config; `enable_prune_quant: false` collapses the prune and quant axes to dense."""
        prune, quant = cfg.struct_prune_choices, cfg.quant_choices
        if not getattr(cfg, "enable_prune_quant", True):
            prune, quant = ["s100"], ["q16"]
        return cls.build(cfg.keep_fracs, prune, quant)

    def __len__(self) -> int:
        return len(self.tags)

    @property
    def prune_max(self) -> float:
        """P_MAX: prune usage is reported relative to the largest keep value on the axis."""
        return max(self.prune_values)

    @property
    def has_prune(self) -> bool:
        return any(p < 1.0 for p in self.prune_values)

    @property
    def has_quant(self) -> bool:
        return any(b < DENSE_BITS for b in self.bit_values)

    @property
    def has_sparsity(self) -> bool:
        return any(k < 1.0 for k in self.keep_values)

    def axis_sizes(self) -> tuple[int, int, int]:
        return len(self.keep_values), len(self.prune_values), len(self.bit_values)

    def index(self, keep: float, prune: float, bits: int) -> int:
        """Flat index of a grid point (exact values as in the grid)."""
        i_k, i_p, i_q = self.keep_values.index(keep), self.prune_values.index(prune), self.bit_values.index(bits)
        _, n_p, n_q = self.axis_sizes()
        return (i_k * n_p + i_p) * n_q + i_q

    def level_shares(self, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per axis (κ, ρ, bits), the share of steps at each of its levels (grid order), from per-action shares
        `probs` [A]. Quality is concave in each axis, so a schedule that spreads one axis over three levels where
        the fixed baseline takes one or two neighbours pays for it, whatever its mean usage."""
        p = probs.reshape(self.axis_sizes())
        return p.sum((1, 2)), p.sum((0, 2)), p.sum((0, 1))

    def nominal_usage(self) -> torch.Tensor:
        """[A, 3] each action's nominal usage (κ, ρ / P_MAX, bits / 16): the units of budgets and penalties."""
        return torch.stack([self.keep, self.prune / self.prune_max, self.bits.float() / DENSE_BITS], dim=-1)

    def level_indices(self) -> torch.Tensor:
        """[A, 3] long: each action's level index on the κ, ρ and bits axes (grid order, the inverse of `index`)."""
        _, n_p, n_q = self.axis_sizes()
        a = torch.arange(len(self))
        return torch.stack([a // (n_p * n_q), (a // n_q) % n_p, a % n_q], dim=-1)

    def level_map(self) -> torch.Tensor:
        """[A, n_κ + n_ρ + n_bits] 0/1: row a marks action a's level on each axis (κ levels first, then ρ, then
        bits, in grid order). A factorised policy head writes one logit per level and gets the action's logit as
        `level_logits @ level_map().T`: a product of one distribution per axis."""
        n_k, n_p, _ = self.axis_sizes()
        cols = self.level_indices() + torch.tensor([0, n_k, n_k + n_p])
        return torch.zeros(len(self), sum(self.axis_sizes())).scatter_(1, cols, 1.0)

    def middle_levels(self) -> torch.Tensor:
        """[n_κ + n_ρ + n_bits] bool, in `level_map`'s column order: the levels strictly between their axis's
        cheapest and dearest one (e.g. κ 0.6 of {0.1, 0.6, 1})."""
        cols = []
        for values in (self.keep_values, self.prune_values, self.bit_values):
            lo, hi = min(values), max(values)
            cols += [lo < v < hi for v in values]
        return torch.tensor(cols, dtype=torch.bool)

    def lookup(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(κ, ρ, bits) per row for action indices `idx` (any device)."""
        dev = idx.device
        return self.keep.to(dev)[idx], self.prune.to(dev)[idx], self.bits.to(dev)[idx]
