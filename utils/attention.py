"""Token-level attention sparsity for one decode step: which cached keys each row (and head) may attend.

Every function here is pure and vectorised over rows, heads (and, by the caller, layers): each batch row
carries its own keep fraction κ. All rows of a decode step share the cache length `K`, which counts the
current token (the reference's `kv_len`). Selections return boolean masks, True = attend.

Counts use `ceil_count`, which is robust to float noise (0.7 * 100 = 70.00000000000001 keeps 70).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

CRITERIA = ("recency", "relevancy", "quest")


def ceil_count(frac: torch.Tensor, total: int | torch.Tensor) -> torch.Tensor:
    """ceil(frac * total) as int64, robust to float noise.

    Fractions arrive as float32 (0.1 is stored as 0.100000001...), so they are first snapped to a 1e-6
    grid; then ceil(0.1 * 1000) is 100, not 101.
    """
    snapped = torch.round(torch.as_tensor(frac).double() * 1e6) / 1e6
    return torch.ceil(snapped * total - 1e-9).long()


def ceil_count_host(frac: float, total: int) -> int:
    """`ceil_count` of one fraction on the host, by the same float64 operations (the gathered execution plans a
    batch-1 step from host values: a dozen tensor ops fewer per step)."""
    return math.ceil(round(frac * 1e6) / 1e6 * total - 1e-9)


def is_effective(kv_len: int, Ts: int, Tw: int) -> bool:
    """A decode step is controlled only when the cache is longer than sinks + window + current token."""
    return kv_len > Ts + Tw + 1


def recency_keep(kv_len: int, kappa: torch.Tensor, Ts: int, Tw: int) -> torch.Tensor:
    """[B, K] mask: Ts sinks, then the current token, Tw window tokens and ceil(κ·old) most recent others."""
    pos = torch.arange(kv_len, device=kappa.device)
    if kv_len <= Ts + Tw + 1:
        return torch.ones(kappa.shape[0], kv_len, dtype=torch.bool, device=kappa.device)
    start = recency_start(kv_len, kappa, Ts, Tw)
    return (pos[None, :] < Ts) | (pos[None, :] >= start[:, None])


def recency_start_host(kv_len: int, kappa: float, Ts: int, Tw: int) -> int:
    """`recency_start` of one row on the host."""
    return max(kv_len - (Tw + 1 + ceil_count_host(kappa, kv_len - (Ts + Tw + 1))), Ts)


def recency_start(kv_len: int, kappa: torch.Tensor, Ts: int, Tw: int) -> torch.Tensor:
    """[B] first position of each row's recent span (>= Ts): recency keeps [0, Ts) and [start, kv_len).
    Only meaningful when kv_len > Ts + Tw + 1 (`is_effective`)."""
    n_extra = ceil_count(kappa, kv_len - (Ts + Tw + 1))
    return torch.clamp(kv_len - (Tw + 1 + n_extra), min=Ts)


def protected_positions(kv_len: int, Ts: int, n_recent: int, device: torch.device) -> torch.Tensor:
    """[K] mask of the always-kept positions: the first Ts and the last n_recent."""
    pos = torch.arange(kv_len, device=device)
    return (pos < min(Ts, kv_len)) | (pos >= kv_len - n_recent)


def topk_by_threshold(scores: torch.Tensor, eligible: torch.Tensor, count: torch.Tensor,
                      count_choices: Sequence[int] | None = None) -> torch.Tensor:
    """Keep eligible entries scoring >= the count-th largest eligible score along the last dim.

    scores/eligible: [..., N]; count: broadcastable to scores.shape[:-1]. Ties at the threshold are all
    kept and at least one entry is kept (the reference's threshold trick).

    `count_choices` (host ints) lists every value `count` can take, which callers know from the action
    grid. Each row's threshold then comes from one O(N) `kthvalue` selection per distinct choice instead
    of a full sort. Each choice must not exceed the number of eligible entries per row (callers count
    from that number, so it holds).
    """
    masked = scores.masked_fill(~eligible, float("-inf"))
    if count_choices is None:
        ordered = masked.sort(dim=-1, descending=True).values
        n_elig = eligible.sum(-1)
        idx = torch.minimum(count.expand_as(n_elig), n_elig).clamp(min=1) - 1
        thr = ordered.gather(-1, idx.unsqueeze(-1))
    else:
        N = masked.shape[-1]
        thr = torch.full_like(masked[..., :1], float("-inf"))
        for c in sorted(set(count_choices)):  # one selection per grid level, never per row
            if c >= N:  # keeps every eligible entry: the -inf threshold already does
                continue
            kth = masked.kthvalue(N - max(1, c) + 1, dim=-1, keepdim=True).values
            thr = torch.where((count == c).expand(masked.shape[:-1]).unsqueeze(-1), kth, thr)
    return eligible & (masked >= thr)


def count_choices(levels: Sequence[float] | None, count_fn) -> list[int] | None:
    """The counts `count_fn` gives for each grid level (host arithmetic on the level list)."""
    if levels is None:
        return None
    return count_fn(torch.tensor(list(levels), dtype=torch.float32)).tolist()


def relevancy_keep(logits: torch.Tensor, kappa: torch.Tensor, Ts: int, Tw: int, tier: str = "per_head",
                   kappa_levels: Sequence[float] | None = None) -> torch.Tensor:
    """[B, H, K] mask from scaled attention logits [B, H, K] of the current query.

    Always keeps the first Ts and the last Tw+2 positions (current token plus Tw+1 earlier, as the
    reference); of the rest keeps ceil(κ·eligible) by logit. `per_head` ranks each head's logits;
    `per_layer` ranks the head-averaged logits and shares one selection across the layer's heads.
    `kappa_levels` (the grid's κ values) enables the fast selection path.
    """
    B, H, K = logits.shape
    always = protected_positions(K, Ts, Tw + 2, logits.device)
    eligible = ~always
    n_elig = K - len(set(range(min(Ts, K))) | set(range(max(0, K - (Tw + 2)), K)))
    count = ceil_count(kappa, n_elig)  # [B]
    if tier == "per_layer":
        scores = logits.float().mean(dim=1, keepdim=True)  # [B, 1, K]
    elif tier == "per_head":
        scores = logits.float()
    else:
        raise ValueError(f"unknown relevancy_tier {tier!r}")
    elig = eligible.expand(scores.shape)
    keep = topk_by_threshold(scores, elig, count[:, None], count_choices(kappa_levels, lambda v: ceil_count(v, n_elig)))
    return (keep | always).expand(B, H, K)


def quest_page_bounds(keys: torch.Tensor, page: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-page elementwise max and min of the keys: [B, Hkv, K, D] -> two [B, Hkv, P, D] (P = ceil(K/page)),
    the two halves of one [B, Hkv, P, 2D] tensor (`quest_page_scores` then scores both with one product)."""
    B, Hkv, K, D = keys.shape
    n_full = K // page
    full = keys[:, :, : n_full * page].reshape(B, Hkv, n_full, page, D)
    kmax, kmin = full.amax(dim=3), full.amin(dim=3)
    if K % page:
        tail = keys[:, :, n_full * page :]
        kmax = torch.cat([kmax, tail.amax(dim=2, keepdim=True)], dim=2)
        kmin = torch.cat([kmin, tail.amin(dim=2, keepdim=True)], dim=2)
    both = torch.cat([kmax, kmin], dim=-1)
    return both[..., :D], both[..., D:]


def _side_by_side(kmax: torch.Tensor, kmin: torch.Tensor) -> torch.Tensor:
    """[B, H, P, 2D]: kmax and kmin as one tensor, a view when they are the halves of one buffer (as
    `quest_page_bounds` and the cache give them), else a copy."""
    D = kmax.shape[-1]
    if (kmin.stride() == kmax.stride() and kmax.stride(-1) == 1 and kmax.stride(-2) >= 2 * D
            and kmin.data_ptr() == kmax.data_ptr() + D * kmax.element_size()):
        return kmax.as_strided((*kmax.shape[:-1], 2 * D), kmax.stride())
    return torch.cat([kmax, kmin], dim=-1)


def quest_page_scores(query: torch.Tensor, kmax: torch.Tensor, kmin: torch.Tensor,
                      tier: str = "per_head") -> torch.Tensor:
    """Quest upper bound Σ_d max(q_d·max_d, q_d·min_d) per query head and page.

    query: [B, Hq, D]; kmax/kmin: [B, Hkv, P, D] shared by the Hq/Hkv query heads of each KV group.
    Returns [B, Hq, P], or with `tier="per_kv_head"` the mean over each group's heads [B, Hkv, P]. The bound is
    [q⁺, q⁻]·[max, min] (q⁺ = max(q, 0), q⁻ = min(q, 0)), one product over the side-by-side bounds; being linear
    in [q⁺, q⁻], the group mean is the product with the group's mean [q⁺, q⁻] (the bounds are read once).
    """
    B, Hq, D = query.shape
    Hkv = kmax.shape[1]
    q = query.reshape(B, Hkv, Hq // Hkv, D).float()
    qq = torch.cat([q.clamp(min=0), q.clamp(max=0)], dim=-1)  # [B, Hkv, g, 2D]
    if tier == "per_kv_head":
        qq = qq.mean(dim=2, keepdim=True)
    elif tier != "per_head":
        raise ValueError(f"unknown quest_tier {tier!r}")
    scores = qq @ _side_by_side(kmax, kmin).float().transpose(-1, -2)  # [B, Hkv, g or 1, P]
    return scores.reshape(B, -1, scores.shape[-1])


def quest_keep(
    query: torch.Tensor,
    keys: torch.Tensor,
    kappa: torch.Tensor,
    page: int,
    keep_sink_window: bool = False,
    Ts: int = 0,
    Tw: int = 0,
    kappa_levels: Sequence[float] | None = None,
    bounds: tuple[torch.Tensor, torch.Tensor] | None = None,
    tier: str = "per_head",
) -> torch.Tensor:
    """[B, Hq, K] mask: the top ceil(ceil(κ·K)/page) pages by Quest bound, pages aligned to position 0.

    As in the reference nothing is protected unless `keep_sink_window` is set, in which case the Ts sinks,
    the Tw window tokens and the current token are always kept as well. `bounds`: the keys' page max/min if
    already known (`GrowableLayer.page_bounds`), else computed here. `tier`: see `quest_select_pages`.
    """
    K = keys.shape[2]
    kmax, kmin = bounds if bounds is not None else quest_page_bounds(keys, page)
    keep_pages = quest_select_pages(query, K, kappa, page, kmax, kmin, kappa_levels, tier)
    keep_pages = keep_pages.repeat_interleave(query.shape[1] // keep_pages.shape[1], dim=1)  # per_kv_head: to Hq
    keep = keep_pages.repeat_interleave(page, dim=-1)[..., :K]
    if keep_sink_window:
        keep = keep | protected_positions(K, Ts, Tw + 1, keys.device)
    return keep


def quest_select_pages(query: torch.Tensor, K: int, kappa: torch.Tensor, page: int, kmax: torch.Tensor,
                       kmin: torch.Tensor, kappa_levels: Sequence[float] | None = None,
                       tier: str = "per_head") -> torch.Tensor:
    """Mask of the pages kept: the top ceil(ceil(κ·K)/page) by Quest bound (ties kept), from the page max/min
    [B, Hkv, P, D] of a cache of K keys. `quest_keep` expands it to tokens.

    `tier="per_head"` (the reference): each query head ranks its own bounds -> [B, Hq, P].
    `tier="per_kv_head"`: the Hq/Hkv query heads of a KV group rank their mean bound and share the pages ->
    [B, Hkv, P] (the per-group analogue of relevancy's per_layer; with GQA a per-head choice makes a KV head
    read the union of its query heads' pages, which per_kv_head caps at the budget)."""
    scores = quest_page_scores(query, kmax, kmin, tier)  # [B, Hq, P] or [B, Hkv, P]

    def n_keep_pages(frac: torch.Tensor) -> torch.Tensor:
        return quest_pages_kept(frac, K, page)

    all_pages = torch.ones_like(scores, dtype=torch.bool)
    return topk_by_threshold(scores, all_pages, n_keep_pages(kappa)[:, None],
                             count_choices(kappa_levels, n_keep_pages))


def quest_pages_kept(kappa: torch.Tensor, K: int, page: int) -> torch.Tensor:
    """Pages QUEST keeps per selection at keep fraction κ over K keys: ceil(ceil(κ·K)/page), at least one key's
    page, at most every page."""
    budget = ceil_count(kappa, K).clamp(1, K)
    return torch.ceil(budget.double() / page).long().clamp(max=-(-K // page))


def quest_pages_kept_host(kappa: float, K: int, page: int) -> int:
    """`quest_pages_kept` of one row on the host."""
    budget = min(max(ceil_count_host(kappa, K), 1), K)
    return min(-(-budget // page), -(-K // page))
