"""MLP controls: input-channel pruning and output fake quantization, one setting per batch row.

Both are exact identities for the dense setting (ρ = 1, bits >= 16), so rows with dense actions are
untouched inside a mixed batch and no host sync is needed to decide which rows to skip.
"""
from __future__ import annotations

import torch

from collections.abc import Sequence

from utils.attention import ceil_count, count_choices, topk_by_threshold


def prune_channels(x: torch.Tensor, rho: torch.Tensor,
                   rho_levels: Sequence[float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero all but the ceil(ρ·D) channels of largest |x| in each row of x [B, T, D].

    Channels are ranked by the max |activation| over the T tokens of the call (so a multi-token call
    shares one channel set), ties at the threshold are kept. `rho_levels` (the grid's ρ values) enables
    the fast selection path. Returns (pruned x, kept channel count [B]).
    """
    D = x.shape[-1]
    score = x.detach().abs().amax(dim=1).float()  # [B, D]

    def n_keep(frac: torch.Tensor) -> torch.Tensor:
        return ceil_count(frac, D).clamp(1, D)

    everything = torch.ones_like(score, dtype=torch.bool)
    keep = topk_by_threshold(score, everything, n_keep(rho), count_choices(rho_levels, n_keep))  # [B, D]
    return x * keep.unsqueeze(1).to(x.dtype), keep.sum(-1)


def fake_quantize(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Symmetric per-token absmax fake quantization of x [B, T, D] with a bit-width per row.

    qmax = 2^(b-1) - 1, round half to even, clamp to ±qmax, computed in float32; bits >= 16 is the identity.
    """
    b = bits.to(x.device).view(-1, *([1] * (x.dim() - 1)))
    qmax = (2.0 ** (b.clamp(max=16).float() - 1) - 1).clamp(min=1)
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp(min=1e-8) / qmax
    xq = (torch.round(xf / scale).clamp(-qmax, qmax) * scale).to(x.dtype)
    return torch.where(b >= 16, x, xq)
