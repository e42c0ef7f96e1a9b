"""Tests for the efficiency controls against brute-force references written from the reference spec.

Pure selection functions (utils/attention.py, utils/mlp_controls.py) are compared with plain Python loops;
the installed controls (utils/controls.py, utils/lm.py) are compared with an unmodified SDPA copy of the
tiny random Llama (2 layers, 4 query heads, 2 KV heads, hidden 64).

Brute-force keep counts use exact rational arithmetic (`Fraction(str(κ))`), i.e. the nominal decimal κ.
Random κ are dyadic (m/64, exact in float32) so float noise cannot interfere with the generic checks; the
float-noise behaviour has its own test.
"""
from __future__ import annotations

import copy
import math
import random
from fractions import Fraction

import pytest
import torch

from utils.actions import ActionSpace
from utils.attention import (
    ceil_count, ceil_count_host, is_effective, quest_keep, quest_page_bounds, quest_page_scores, quest_pages_kept,
    quest_pages_kept_host, recency_keep, recency_start, recency_start_host, relevancy_keep,
)
from utils.controls import Controls
from utils.lm import _CACHE_KW, ControlledLM
from utils.mlp_controls import fake_quantize, prune_channels
from utils.model import load_lm

TS, TW, PAGE = 4, 2, 4


# ==== brute-force references ===========================================================================

def _ceil(kappa, n: int) -> int:
    """ceil(κ·n) with κ read as its nominal decimal value."""
    return math.ceil(Fraction(str(float(kappa))) * n) if not isinstance(kappa, Fraction) else math.ceil(kappa * n)


def _dyadic(rng: random.Random) -> float:
    return rng.randint(1, 64) / 64


def brute_recency(K: int, kappa, Ts: int, Tw: int) -> set[int]:
    if K <= Ts + Tw + 1:
        return set(range(K))
    num_old = K - (Ts + Tw + 1)
    ke = _ceil(kappa, num_old)
    start = max(Ts, K - (Tw + 1 + ke))
    return set(range(Ts)) | set(range(start, K))


def _top_with_ties(values: dict[int, float], n: int) -> set[int]:
    """Keys of the n largest values, every tie at the threshold kept, at least one kept (if any)."""
    if not values:
        return set()
    ordered = sorted(values.values(), reverse=True)
    thr = ordered[min(max(n, 1), len(ordered)) - 1]
    return {p for p, v in values.items() if v >= thr}


def brute_relevancy_head(row: list[float], kappa, Ts: int, Tw: int) -> set[int]:
    K = len(row)
    always = {p for p in range(K) if p < Ts or p >= K - (Tw + 2)}
    elig = {p: row[p] for p in range(K) if p not in always}
    return always | _top_with_ties(elig, _ceil(kappa, len(elig)))


def brute_relevancy(logits: torch.Tensor, kappas, Ts: int, Tw: int, tier: str) -> list[list[set[int]]]:
    """[B][H] keep sets from logits [B, H, K]."""
    B, H, K = logits.shape
    out = []
    for b in range(B):
        rows = logits[b].tolist()
        if tier == "per_head":
            out.append([brute_relevancy_head(rows[h], kappas[b], Ts, Tw) for h in range(H)])
        else:
            mean = [sum(rows[h][p] for h in range(H)) / H for p in range(K)]
            shared = brute_relevancy_head(mean, kappas[b], Ts, Tw)
            out.append([shared for _ in range(H)])
    return out


def brute_page_bounds(keys: torch.Tensor, page: int):
    B, Hkv, K, D = keys.shape
    P = -(-K // page)
    kmax = torch.empty(B, Hkv, P, D, dtype=torch.float64)
    kmin = torch.empty(B, Hkv, P, D, dtype=torch.float64)
    kl = keys.tolist()
    for b in range(B):
        for h in range(Hkv):
            for p in range(P):
                toks = range(p * page, min(K, (p + 1) * page))
                for d in range(D):
                    vals = [kl[b][h][t][d] for t in toks]
                    kmax[b, h, p, d] = max(vals)
                    kmin[b, h, p, d] = min(vals)
    return kmax, kmin


def brute_page_scores(query: torch.Tensor, kmax: torch.Tensor, kmin: torch.Tensor):
    B, Hq, D = query.shape
    Hkv, P = kmax.shape[1], kmax.shape[2]
    g = Hq // Hkv
    out = torch.empty(B, Hq, P, dtype=torch.float64)
    ql, mx, mn = query.tolist(), kmax.tolist(), kmin.tolist()
    for b in range(B):
        for h in range(Hq):
            kv = h // g
            for p in range(P):
                out[b, h, p] = sum(max(ql[b][h][d] * mx[b][kv][p][d], ql[b][h][d] * mn[b][kv][p][d]) for d in range(D))
    return out


def brute_quest(query, keys, kappas, page, keep_sink_window=False, Ts=0, Tw=0,
                tier="per_head") -> list[list[set[int]]]:
    B, Hq, D = query.shape
    K, g = keys.shape[2], Hq // keys.shape[1]
    scores = brute_page_scores(query, *brute_page_bounds(keys, page))
    P = scores.shape[-1]
    out = []
    for b in range(B):
        budget = min(max(_ceil(kappas[b], K), 1), K)
        n_pages = min(-(-budget // page), P)
        heads = []
        for h in range(Hq):
            if tier == "per_kv_head":  # the group's mean bound, one ranking shared by its g query heads
                group = range(h // g * g, h // g * g + g)
                rank = {p: sum(scores[b, j, p].item() for j in group) / g for p in range(P)}
            else:
                rank = {p: scores[b, h, p].item() for p in range(P)}
            pages = _top_with_ties(rank, n_pages)
            keep = {t for p in pages for t in range(p * page, min(K, (p + 1) * page))}
            if keep_sink_window:
                keep |= set(range(min(Ts, K))) | set(range(K - (Tw + 1), K))
            heads.append(keep)
        out.append(heads)
    return out


def _sets(mask: torch.Tensor) -> list[list[set[int]]]:
    """[B, H, K] bool -> [B][H] sets of kept positions."""
    return [[set(torch.nonzero(mask[b, h]).flatten().tolist()) for h in range(mask.shape[1])] for b in range(mask.shape[0])]


# ==== recency ==========================================================================================

def test_recency_reference_examples():
    m = recency_keep(1025, torch.tensor([0.1]), 4, 2)
    assert m.shape == (1, 1025) and m.dtype == torch.bool
    assert int(m.sum()) == 109
    assert set(torch.nonzero(m[0]).flatten().tolist()) == set(range(4)) | set(range(1025 - 105, 1025))
    m = recency_keep(30, torch.tensor([0.5]), 4, 2)
    assert set(torch.nonzero(m[0]).flatten().tolist()) == set(range(4)) | set(range(15, 30))


def test_recency_random_vs_loop():
    rng = random.Random(0)
    for _ in range(60):
        Ts, Tw = rng.randint(0, 6), rng.randint(0, 4)
        K = rng.randint(1, 120)
        kappas = [_dyadic(rng) for _ in range(rng.randint(1, 5))] + [1.0]
        m = recency_keep(K, torch.tensor(kappas), Ts, Tw)
        assert m.shape == (len(kappas), K)
        for b, k in enumerate(kappas):
            assert set(torch.nonzero(m[b]).flatten().tolist()) == brute_recency(K, k, Ts, Tw), (K, k, Ts, Tw)
        assert bool(m[-1].all())  # κ = 1 keeps everything


def test_recency_decimal_kappas_vs_loop():
    for K in (31, 57, 108, 257, 1025, 1031):
        kappas = [0.05, 0.1, 0.25, 0.5, 0.75, 0.85]
        m = recency_keep(K, torch.tensor(kappas), TS, TW)
        for b, k in enumerate(kappas):
            assert set(torch.nonzero(m[b]).flatten().tolist()) == brute_recency(K, k, TS, TW), (K, k)


@pytest.mark.parametrize("K", [1, 3, 6, 7])
def test_recency_short_cache_keeps_all(K):
    assert not is_effective(K, 4, 2)
    assert bool(recency_keep(K, torch.tensor([0.05, 0.5]), 4, 2).all())
    assert is_effective(8, 4, 2)


# ==== relevancy ========================================================================================

@pytest.mark.parametrize("tier", ["per_head", "per_layer"])
def test_relevancy_random_vs_brute(tier):
    g = torch.Generator().manual_seed(1)
    rng = random.Random(1)
    for _ in range(25):
        B, H, K = rng.randint(1, 3), rng.choice([1, 2, 4]), rng.randint(8, 70)
        Ts, Tw = rng.randint(0, 5), rng.randint(0, 3)
        logits = torch.randn(B, H, K, generator=g)
        kappas = [_dyadic(rng) for _ in range(B)]
        m = relevancy_keep(logits, torch.tensor(kappas), Ts, Tw, tier)
        assert m.shape == (B, H, K) and m.dtype == torch.bool
        assert _sets(m) == brute_relevancy(logits, kappas, Ts, Tw, tier), (B, H, K, Ts, Tw, kappas)


def test_relevancy_reference_counts():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 4, 41, generator=g)
    for tier in ("per_head", "per_layer"):
        m = relevancy_keep(logits, torch.tensor([0.1, 0.5]), 4, 2, tier)
        assert m[0].sum(-1).tolist() == [12] * 4
        assert m[1].sum(-1).tolist() == [25] * 4
        assert bool(m[:, :, :4].all()) and bool(m[:, :, 37:].all())  # sinks and the last Tw+2 = 4
        assert m[:, :, 4:37].sum(-1).tolist() == [[4] * 4, [17] * 4]


def test_relevancy_ties_kept_and_at_least_one():
    K = 20  # Ts=4, Tw=2: eligible 4..15 (12 positions)
    logits = torch.zeros(1, 1, K)
    logits[0, 0, 6] = 5.0
    logits[0, 0, 9] = 3.0
    logits[0, 0, 11] = 3.0
    m = relevancy_keep(logits, torch.tensor([2 / 12]), 4, 2)  # keep 2 of 12: 6 and the tie 9, 11
    assert set(torch.nonzero(m[0, 0]).flatten().tolist()) == set(range(4)) | {6, 9, 11} | set(range(16, 20))
    m = relevancy_keep(logits, torch.tensor([1e-4]), 4, 2)  # ceil -> 1
    assert set(torch.nonzero(m[0, 0]).flatten().tolist()) == set(range(4)) | {6} | set(range(16, 20))
    m = relevancy_keep(logits, torch.tensor([0.0]), 4, 2)  # count 0 still keeps the top entry
    assert set(torch.nonzero(m[0, 0]).flatten().tolist()) == set(range(4)) | {6} | set(range(16, 20))


def test_relevancy_per_head_and_per_layer_differ():
    K = 20
    logits = torch.zeros(1, 2, K)
    logits[0, 0, 5], logits[0, 0, 7] = 10.0, 6.0
    logits[0, 1, 9], logits[0, 1, 7] = 10.0, 6.0  # means: pos 5 -> 5, pos 9 -> 5, pos 7 -> 6
    kappa = torch.tensor([1 / 12])
    ph = relevancy_keep(logits, kappa, 4, 2, "per_head")
    pl = relevancy_keep(logits, kappa, 4, 2, "per_layer")
    base = set(range(4)) | set(range(16, 20))
    assert _sets(ph) == [[base | {5}, base | {9}]]
    assert _sets(pl) == [[base | {7}, base | {7}]]
    assert not torch.equal(ph, pl)
    assert _sets(ph) == brute_relevancy(logits, [1 / 12], 4, 2, "per_head")
    assert _sets(pl) == brute_relevancy(logits, [1 / 12], 4, 2, "per_layer")


def test_relevancy_unknown_tier_raises():
    with pytest.raises(ValueError):
        relevancy_keep(torch.randn(1, 2, 20), torch.tensor([0.5]), 4, 2, "per_token")


# ==== QUEST ============================================================================================

def test_quest_page_bounds_vs_loop():
    g = torch.Generator().manual_seed(3)
    for K, page in [(27, 8), (32, 8), (5, 8), (13, 4), (1, 4)]:
        keys = torch.randn(2, 2, K, 6, generator=g)
        kmax, kmin = quest_page_bounds(keys, page)
        bmax, bmin = brute_page_bounds(keys, page)
        assert kmax.shape == bmax.shape == (2, 2, -(-K // page), 6)
        assert torch.equal(kmax.double(), bmax) and torch.equal(kmin.double(), bmin)


def test_quest_page_scores_vs_loop_gqa():
    g = torch.Generator().manual_seed(4)
    keys = torch.randn(2, 2, 27, 8, generator=g)
    query = torch.randn(2, 4, 8, generator=g)
    kmax, kmin = quest_page_bounds(keys, 8)
    s = quest_page_scores(query, kmax, kmin)
    ref = brute_page_scores(query, *brute_page_bounds(keys, 8))
    assert s.shape == (2, 4, 4)
    torch.testing.assert_close(s.double(), ref, atol=1e-5, rtol=1e-5)
    # heads 0, 1 use KV head 0 and heads 2, 3 use KV head 1: moving a query head into the other group changes it
    swapped = quest_page_scores(query[:, [2, 3, 0, 1]], kmax, kmin)
    assert not torch.allclose(swapped[:, :2], s[:, 2:])
    # bounds given as two separate tensors (not halves of one buffer) score the same
    torch.testing.assert_close(quest_page_scores(query, kmax.clone(), kmin.clone()), s, atol=1e-6, rtol=0)
    # per_kv_head: the mean of each group's per-head bounds
    kv = quest_page_scores(query, kmax, kmin, "per_kv_head")
    assert kv.shape == (2, 2, 4)
    torch.testing.assert_close(kv.double(), ref.view(2, 2, 2, 4).mean(2), atol=1e-5, rtol=1e-5)


def test_quest_keep_random_vs_brute():
    g = torch.Generator().manual_seed(5)
    rng = random.Random(5)
    for _ in range(20):
        B, K, page = rng.randint(1, 3), rng.randint(2, 60), rng.choice([1, 4, 8, 16])
        keys = torch.randn(B, 2, K, 8, generator=g)
        query = torch.randn(B, 4, 8, generator=g)
        kappas = [_dyadic(rng) for _ in range(B)]
        m = quest_keep(query, keys, torch.tensor(kappas), page)
        assert m.shape == (B, 4, K) and m.dtype == torch.bool
        assert _sets(m) == brute_quest(query, keys, kappas, page), (B, K, page, kappas)


def test_quest_per_kv_head_random_vs_brute():
    """quest_tier per_kv_head: the query heads of a KV group rank their mean Quest bound and keep the same
    pages, whose count is the per-head budget's (so a KV head's union is the budget, not up to g times it)."""
    g = torch.Generator().manual_seed(15)
    rng = random.Random(15)
    for _ in range(20):
        B, K, page = rng.randint(1, 3), rng.randint(2, 60), rng.choice([1, 4, 8])
        keys = torch.randn(B, 2, K, 8, generator=g)
        query = torch.randn(B, 6, 8, generator=g)  # 3 query heads per KV head
        kappas = [_dyadic(rng) for _ in range(B)]
        m = quest_keep(query, keys, torch.tensor(kappas), page, tier="per_kv_head")
        assert m.shape == (B, 6, K)
        assert _sets(m) == brute_quest(query, keys, kappas, page, tier="per_kv_head"), (B, K, page, kappas)
        assert torch.equal(m[:, :3], m[:, :1].expand(B, 3, K)) and torch.equal(m[:, 3:], m[:, 3:4].expand(B, 3, K))
    with pytest.raises(ValueError, match="quest_tier"):
        quest_keep(query, keys, torch.tensor(kappas), page, tier="per_layer")


def test_quest_budget_page_rounding():
    g = torch.Generator().manual_seed(6)
    K, page = 1025, 8
    keys = torch.randn(1, 2, K, 16, generator=g)
    query = torch.randn(1, 4, 16, generator=g)
    m = quest_keep(query, keys, torch.tensor([0.1]), page)  # budget ceil(102.5) = 103 tokens -> 13 pages
    pages = torch.nn.functional.pad(m, (0, 129 * 8 - K)).reshape(1, 4, 129, 8)
    assert pages.any(-1).sum(-1).tolist() == [[13] * 4]
    assert bool((pages.all(-1) | ~pages.any(-1)).all())  # whole pages only
    for h, n in enumerate(m[0].sum(-1).tolist()):
        assert n == (97 if m[0, h, 1024] else 104)
    assert _sets(m) == brute_quest(query, keys, [0.1], page)


def test_quest_full_keep_and_sink_window():
    g = torch.Generator().manual_seed(7)
    K, page = 29, 4  # last page holds only the current token (position 28)
    keys = torch.randn(2, 2, K, 8, generator=g)
    keys[:, :, K - 1] = 0.0  # its page bound is exactly 0, below every full page's bound
    keys[:, :, :4] = 0.0  # the sink page too
    query = torch.randn(2, 4, 8, generator=g)
    assert bool(quest_keep(query, keys, torch.tensor([1.0, 1.0]), page).all())
    plain = quest_keep(query, keys, torch.tensor([0.1, 0.25]), page)
    assert not plain[:, :, K - 1].any() and not plain[:, :, :4].any()  # nothing protected by default
    prot = quest_keep(query, keys, torch.tensor([0.1, 0.25]), page, keep_sink_window=True, Ts=4, Tw=2)
    assert bool(prot[:, :, :4].all()) and bool(prot[:, :, K - 3:].all())
    assert torch.equal(prot, plain | _positions(K, set(range(4)) | set(range(K - 3, K))))
    assert _sets(prot) == brute_quest(query, keys, [0.1, 0.25], page, True, 4, 2)


def _positions(K: int, pos: set[int]) -> torch.Tensor:
    t = torch.zeros(K, dtype=torch.bool)
    t[list(pos)] = True
    return t


# ==== counts and float noise ===========================================================================

def test_ceil_count_exact_products():
    assert ceil_count(torch.tensor([0.7]), 100).item() == 70
    assert ceil_count(torch.tensor([0.1]), 1018).item() == 102
    assert ceil_count(torch.tensor([0.1]), 1025).item() == 103
    assert ceil_count(torch.tensor([0.5, 1.0, 0.25]), 64).tolist() == [32, 64, 16]


def test_ceil_count_float32_kappa_noise():
    """float32 κ (0.1 stored as 0.100000001) must not add a token: ceil(0.1·1000) = 100."""
    kappa = torch.tensor([0.1, 0.3, 0.6, 0.85], dtype=torch.float32)
    assert ceil_count(kappa, 1000).tolist() == [100, 300, 600, 850]
    assert int(recency_keep(1007, torch.tensor([0.1]), 4, 2).sum()) == 4 + 3 + 100


def test_host_counts_match_the_tensor_counts():
    """The gathered execution's host planning (`*_host`) gives the tensor functions' counts for every float32
    fraction on a 1/1000 grid (and the grid's neighbours one float32 step away) at several lengths."""
    grid = torch.arange(1, 1001, dtype=torch.float32) / 1000
    fracs = torch.cat([grid, torch.nextafter(grid, torch.zeros(1)), torch.nextafter(grid, torch.ones(1) * 2)])
    host = fracs.tolist()
    for total in (1, 7, 100, 576, 1018, 8193):
        assert [ceil_count_host(f, total) for f in host] == ceil_count(fracs, total).tolist()
        assert [quest_pages_kept_host(f, total, 16) for f in host] == quest_pages_kept(fracs, total, 16).tolist()
        if total > TS + TW + 1:
            assert [recency_start_host(total, f, TS, TW) for f in host] == recency_start(total, fracs, TS, TW).tolist()


# ==== MLP pruning and quantization =====================================================================

def test_prune_channels_counts_and_values():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(3, 1, 64, generator=g)
    rho = torch.tensor([0.6, 1.0, 0.3])
    y, kept = prune_channels(x, rho)
    assert kept.tolist() == [39, 64, 20]
    assert (y != 0).sum(-1).flatten().tolist() == [39, 64, 20]
    for b, r in enumerate([0.6, 1.0, 0.3]):
        n = _ceil(r, 64)
        vals = x[b, 0].tolist()
        top = set(sorted(range(64), key=lambda c: -abs(vals[c]))[:n])
        for c in range(64):
            assert y[b, 0, c].item() == (vals[c] if c in top else 0.0)


def test_prune_channels_multi_token_shares_channels():
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 5, 32, generator=g)
    y, kept = prune_channels(x, torch.tensor([0.25, 0.5]))
    assert kept.tolist() == [8, 16]
    for b, n in enumerate([8, 16]):
        score = [max(abs(x[b, t, c].item()) for t in range(5)) for c in range(32)]
        top = set(sorted(range(32), key=lambda c: -score[c])[:n])
        expect = torch.stack([x[b, :, c] if c in top else torch.zeros(5) for c in range(32)], dim=-1)
        assert torch.equal(y[b], expect)


def test_prune_channels_ties_kept_and_min_one():
    x = torch.tensor([[[3.0, -3.0, 1.0, 0.5]]])
    y, kept = prune_channels(x, torch.tensor([0.25]))  # 1 channel, but |3| ties: 2 kept
    assert kept.tolist() == [2] and y.tolist() == [[[3.0, -3.0, 0.0, 0.0]]]
    y, kept = prune_channels(torch.tensor([[[1.0, 2.0, 3.0, 4.0]]]), torch.tensor([0.01]))
    assert kept.tolist() == [1] and y.tolist() == [[[0.0, 0.0, 0.0, 4.0]]]


def _brute_quant_row(vals: list[float], bits: int) -> list[float]:
    if bits >= 16:
        return list(vals)
    qmax = 2 ** (bits - 1) - 1
    scale = torch.tensor(max(max(abs(v) for v in vals), 1e-8) / qmax, dtype=torch.float32).item()
    out = []
    for v in vals:
        lvl = round(torch.tensor(v / scale, dtype=torch.float32).item())  # Python round: half to even
        lvl = max(-qmax, min(qmax, lvl))
        out.append(torch.tensor(lvl * scale, dtype=torch.float32).item())
    return out


@pytest.mark.parametrize("bits,qmax", [(5, 15), (8, 127), (2, 1), (4, 7)])
def test_fake_quantize_levels(bits, qmax):
    g = torch.Generator().manual_seed(10 + bits)
    x = torch.randn(2, 3, 64, generator=g)
    y = fake_quantize(x, torch.tensor([bits, bits]))
    scale = x.abs().amax(-1, keepdim=True) / qmax
    lvl = y / scale
    torch.testing.assert_close(lvl, lvl.round(), atol=1e-4, rtol=0)
    assert lvl.round().abs().max().item() == qmax
    assert len(torch.unique(lvl.round())) <= 2 * qmax + 1
    for b in range(2):
        for t in range(3):
            torch.testing.assert_close(y[b, t], torch.tensor(_brute_quant_row(x[b, t].tolist(), bits)),
                                       atol=1e-6, rtol=0)


def test_fake_quantize_round_half_to_even_and_identity():
    x = torch.tensor([[[15.0, 2.5, 3.5, -2.5, -3.5, 0.5, 1.5, -0.5]]])
    y = fake_quantize(x, torch.tensor([5]))  # qmax 15, scale exactly 1
    assert y.tolist() == [[[15.0, 2.0, 4.0, -2.0, -4.0, 0.0, 2.0, -0.0]]]
    g = torch.Generator().manual_seed(11)
    z = torch.randn(2, 4, 64, generator=g)
    assert torch.equal(fake_quantize(z, torch.tensor([16, 16])), z)
    assert torch.equal(fake_quantize(torch.zeros(1, 1, 8), torch.tensor([4])), torch.zeros(1, 1, 8))


def test_fake_quantize_mixed_bits_per_row():
    g = torch.Generator().manual_seed(12)
    x = torch.randn(4, 2, 64, generator=g)
    bits = [5, 16, 8, 3]
    y = fake_quantize(x, torch.tensor(bits))
    for b, nb in enumerate(bits):
        for t in range(2):
            torch.testing.assert_close(y[b, t], torch.tensor(_brute_quant_row(x[b, t].tolist(), nb)), atol=1e-6, rtol=0)
        if nb == 16:
            assert torch.equal(y[b], x[b])


# ==== the "sol" attention, called directly ==============================================================

def _brute_attention(q, k, v, scaling, keep_sets):
    """Softmax over the kept keys of q·k·scale, then ·V; q [B,Hq,D], k/v [B,Hkv,K,D] -> [B,1,Hq,D]."""
    B, Hq, D = q.shape
    Hkv, K = k.shape[1], k.shape[2]
    g = Hq // Hkv
    out = torch.zeros(B, 1, Hq, D, dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            kv = h // g
            kept = sorted(keep_sets[b][h])
            logits = [sum(q[b, h, d].item() * k[b, kv, t, d].item() for d in range(D)) * scaling for t in kept]
            mx = max(logits)
            w = [math.exp(x - mx) for x in logits]
            z = sum(w)
            for i, t in enumerate(kept):
                out[b, 0, h] += (w[i] / z) * v[b, kv, t].double()
    return out


@pytest.mark.parametrize("criteria,tier,ksw", [
    ("recency", "per_head", False), ("relevancy", "per_head", False), ("relevancy", "per_layer", False),
    ("quest", "per_head", False), ("quest", "per_head", True), ("quest", "per_kv_head", False)])
def test_sparse_decode_attention_vs_brute(criteria, tier, ksw):
    g = torch.Generator().manual_seed(13)
    B, Hq, Hkv, K, D = 3, 4, 2, 37, 8
    q = torch.randn(B, Hq, 1, D, generator=g)
    k = torch.randn(B, Hkv, K, D, generator=g)
    v = torch.randn(B, Hkv, K, D, generator=g)
    kappas = [0.25, 0.5, 1.0]
    scaling = D ** -0.5
    quest = criteria == "quest"
    ctl = Controls(criteria, TS, TW, PAGE, "per_head" if quest else tier, ksw, tier if quest else "per_head")
    ctl.set(torch.tensor(kappas), torch.ones(B), torch.full((B,), 16), K)
    out, w = ctl.sparse_decode_attention(q, k, v, None, scaling)
    assert w is None and out.shape == (B, 1, Hq, D)
    # brute-force keep sets from the logits the attention itself uses
    logits = torch.empty(B, Hq, K, dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            for t in range(K):
                logits[b, h, t] = sum(q[b, h, 0, d].item() * k[b, h // 2, t, d].item() for d in range(D)) * scaling
    if criteria == "recency":
        sets = [[brute_recency(K, kap, TS, TW)] * Hq for kap in kappas]
    elif criteria == "relevancy":
        sets = brute_relevancy(logits, kappas, TS, TW, tier)
    else:
        sets = brute_quest(q[:, :, 0], k, kappas, PAGE, ksw, TS, TW, tier)
    ref = _brute_attention(q[:, :, 0], k, v, scaling, sets)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    frac = [sum(len(s) for s in sets[b]) / (Hq * K) for b in range(B)]
    torch.testing.assert_close(ctl.key_frac_sum.double(), torch.tensor(frac, dtype=torch.float64), atol=1e-6, rtol=0)
    assert ctl.key_frac_sum[2].item() == 1.0  # κ = 1 row attends every key
    # an all-allowed attention mask (bool or additive zeros) changes nothing
    for mask in (torch.ones(B, 1, 1, K, dtype=torch.bool), torch.zeros(B, 1, 1, K)):
        ctl.set(torch.tensor(kappas), torch.ones(B), torch.full((B,), 16), K)
        out2, _ = ctl.sparse_decode_attention(q, k, v, mask, scaling)
        assert torch.equal(out2, out)


# ==== the controlled tiny model =========================================================================

SPACE = ActionSpace.build([0.25, 0.5, 1.0], ["s50", "s100"], ["q4", "q16"])
CTX, TOTAL, B = 30, 38, 3
CRIT = [("recency", "per_head", False), ("relevancy", "per_head", False), ("relevancy", "per_layer", False),
        ("quest", "per_head", False), ("quest", "per_head", True)]
CRIT_IDS = ["recency", "relevancy-head", "relevancy-layer", "quest", "quest-sinkwin"]


def A(k: float, p: float, b: int) -> int:
    return SPACE.index(k, p, b)


DENSE = SPACE.dense_idx


@pytest.fixture(scope="module")
def base():
    model, tok = load_lm("tiny-random-llama")
    ref = copy.deepcopy(model)
    ref.set_attn_implementation("sdpa")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 2000, (B, TOTAL), generator=g)
    with torch.no_grad():
        full = ref(ids).logits.float()
    return model, tok, ref, ids, full


def make_lm(base, criteria="recency", tier="per_head", ksw=False, space=SPACE) -> ControlledLM:
    model, tok = base[0], base[1]
    return ControlledLM(copy.deepcopy(model), tok, space, criteria, TS, TW, PAGE, tier, ksw)


def _close(a, b, atol=1e-6):
    torch.testing.assert_close(a, b, atol=atol, rtol=0)


@pytest.mark.parametrize("crit", CRIT, ids=CRIT_IDS)
def test_dense_action_matches_unmodified_model(base, crit):
    _, _, _, ids, full = base
    lm = make_lm(base, *crit)
    for acts in (torch.full((B,), DENSE), None):
        cache, h, logits = lm.prefill(ids[:, :CTX])
        _close(logits, full[:, CTX - 1])
        for t in range(CTX, TOTAL):
            out = lm.step(cache, ids[:, t], acts)
            _close(out.logits, full[:, t])
            assert out.usage.effective == (acts is not None)
            assert out.usage.attn_keep.tolist() == [1.0] * B
        assert cache.get_seq_length() == TOTAL


def test_sol_attention_keeps_causal_mask(base):
    _, _, _, ids, full = base
    lm = make_lm(base, "relevancy")
    assert lm.model.config._attn_implementation == "sol"
    with torch.no_grad():
        _close(lm.model(ids).logits.float(), full, atol=1e-5)
    _close(lm.prefill_all_logits(ids), full, atol=1e-5)
    # dense replay on top of a cache: the causal mask must be bottom-right aligned
    cache, _, _ = lm.prefill(ids[:, :20])
    cache2 = lm.clone_cache(cache)
    with torch.no_grad():
        out = lm.model(ids[:, 20:], use_cache=True, **{_CACHE_KW: cache})
    _close(out.logits.float(), full[:, 20:], atol=1e-5)
    _, _, last = lm.prefill(ids[:, 20:], cache=cache2)
    _close(last, full[:, -1], atol=1e-5)


@pytest.mark.parametrize("crit", CRIT, ids=CRIT_IDS)
def test_rows_independent_and_sparse_changes_logits(base, crit):
    _, _, _, ids, full = base
    lm = make_lm(base, *crit)
    cache, _, _ = lm.prefill(ids[:, :CTX])
    variants = [
        [A(0.25, 0.5, 4), DENSE, A(0.5, 1.0, 16)],
        [A(1.0, 0.5, 16), DENSE, A(0.5, 1.0, 16)],  # row 0 changes
        [A(0.25, 0.5, 4), DENSE, A(0.25, 1.0, 4)],  # row 2 changes
        [A(0.25, 0.5, 4), A(0.25, 1.0, 16), A(0.5, 1.0, 16)],  # row 1 sparse
    ]
    res = []
    for acts in variants:
        c = lm.clone_cache(cache)
        res.append([lm.step(c, ids[:, t], torch.tensor(acts)).logits for t in range(CTX, CTX + 3)])
    for s in range(3):
        _close(res[1][s][1:], res[0][s][1:])
        _close(res[2][s][:2], res[0][s][:2])
        _close(res[3][s][[0, 2]], res[0][s][[0, 2]])
        _close(res[0][s][1], full[1, CTX + s])  # the dense row equals the unmodified model
        for r in (0, 2):  # every sparse row departs from the dense model
            assert (res[0][s][r] - full[r, CTX + s]).abs().max().item() > 1e-3
        assert (res[3][s][1] - full[1, CTX + s]).abs().max().item() > 1e-3


def test_each_axis_alone_changes_logits(base):
    _, _, _, ids, full = base
    lm = make_lm(base, "recency")
    cache, _, _ = lm.prefill(ids[:, :CTX])
    acts = torch.tensor([A(0.25, 1.0, 16), A(1.0, 0.5, 16), A(1.0, 1.0, 4)])
    out = lm.step(cache, ids[:, CTX], acts)
    diff = (out.logits - full[:, CTX]).abs().amax(-1)
    assert bool((diff > 1e-3).all()), diff


@pytest.mark.parametrize("criteria", ["recency", "relevancy", "quest"])
def test_prefill_after_sparse_steps_is_dense(base, criteria):
    _, _, _, ids, full = base
    lm = make_lm(base, criteria)
    cache, _, _ = lm.prefill(ids[:, :CTX])
    sparse = torch.tensor([A(0.25, 0.5, 4)] * B)
    for t in range(CTX, TOTAL):
        lm.step(cache, ids[:, t], sparse)
    assert not lm.controls.active
    fresh = make_lm(base, criteria)
    c1, h1, l1 = lm.prefill(ids[:, :CTX])
    c2, h2, l2 = fresh.prefill(ids[:, :CTX])
    assert torch.equal(l1, l2) and torch.equal(h1, h2)
    _close(l1, full[:, CTX - 1])
    _close(lm.prefill_all_logits(ids), fresh.prefill_all_logits(ids), atol=0)
    # a dense (actions=None) step right after sparse steps is dense too
    out = lm.step(c1, ids[:, CTX], None)
    _close(out.logits, full[:, CTX])


def test_expand_and_clone_cache(base):
    _, _, _, ids, full = base
    lm = make_lm(base, "quest")
    cache, _, _ = lm.prefill(ids[:2, :CTX])
    k = 3
    big = lm.expand_cache(cache, k)
    assert big.get_seq_length() == CTX and cache.get_seq_length() == CTX
    for li in range(lm.n_layers):
        src, dst = cache.layers[li], big.layers[li]
        assert dst.keys.shape[0] == 2 * k
        for b in range(2):
            for j in range(k):
                assert torch.equal(dst.keys[b * k + j], src.keys[b]) and torch.equal(dst.values[b * k + j], src.values[b])
    tok = ids[:2, CTX].repeat_interleave(k)
    out = lm.step(big, tok, torch.tensor([A(0.25, 0.5, 4)] * (2 * k)))
    for b in range(2):
        for j in range(k):
            _close(out.logits[b * k + j], out.logits[b * k])
    assert cache.get_seq_length() == CTX  # expanding did not touch the source
    # clone independence
    clone = lm.clone_cache(cache)
    lm.step(clone, ids[:2, CTX], torch.tensor([A(0.5, 1.0, 16)] * 2))
    assert clone.get_seq_length() == CTX + 1 and cache.get_seq_length() == CTX
    out = lm.step(cache, ids[:2, CTX], None)
    _close(out.logits, full[:2, CTX])
    # a copy with room for one token keeps decoding correctly past it (the buffers grow)
    src, _, _ = lm.prefill(ids[:2, :CTX])
    tight = lm.expand_cache(src, 2, spare=1)
    for t in range(3):
        out = lm.step(tight, ids[:2, CTX + t].repeat_interleave(2), None)
        _close(out.logits, full[:2, CTX + t].repeat_interleave(2, dim=0))


@pytest.mark.parametrize("crit", CRIT, ids=CRIT_IDS)
def test_usage_fields(base, crit):
    _, _, _, ids, _ = base
    lm = make_lm(base, *crit)
    cache, _, _ = lm.prefill(ids[:, :CTX])
    spec = [(0.25, 0.5, 4), (0.5, 1.0, 16), (1.0, 1.0, 16)]
    acts = torch.tensor([A(*s) for s in spec])
    K = CTX + 1
    out = lm.step(cache, ids[:, CTX], acts)
    u = out.usage
    assert u.effective is True
    assert u.keep.tolist() == [0.25, 0.5, 1.0]
    assert u.prune.tolist() == [0.5, 1.0, 1.0]  # ρ / P_MAX with P_MAX = 1
    assert u.qratio.tolist() == [4 / 16, 1.0, 1.0]
    assert bool((u.attn_keep > 0).all()) and bool((u.attn_keep <= 1).all())
    assert u.attn_keep[2].item() == 1.0
    H = lm.hidden_size
    assert u.channel_keep.tolist() == [math.ceil(0.5 * H) / H, 1.0, 1.0]
    dense = lm.dense_step_flops(K)
    assert u.flops[0].item() < dense and u.flops[1].item() < dense
    assert u.flops[2].item() == dense
    # realised attention keep against the brute-force counts (no ties in random data)
    criteria = crit[0]
    for b, (kap, _, _) in enumerate(spec[:2]):
        got = u.attn_keep[b].item()
        if criteria == "recency":
            assert got == pytest.approx(len(brute_recency(K, kap, TS, TW)) / K, abs=1e-6)
        elif criteria == "relevancy":
            n = TS + TW + 2 + _ceil(kap, K - TS - TW - 2)
            assert got == pytest.approx(n / K, abs=1e-6)
        else:
            budget = _ceil(kap, K)
            n_pages = -(-budget // PAGE)
            hi = n_pages * PAGE + (TS + TW + 1 if crit[2] else 0)
            lo = (n_pages - 1) * PAGE + 1
            assert lo / K - 1e-6 <= got <= hi / K + 1e-6
    assert u.attn_keep[0].item() < u.attn_keep[1].item()
    assert out.hidden.shape == (B, H)
    assert out.logits.shape == (B, lm.vocab_size) and out.logits.dtype == torch.float32


def test_usage_flops_prune_only_and_quant_only(base):
    _, _, _, ids, _ = base
    lm = make_lm(base, "recency")
    cache, _, _ = lm.prefill(ids[:, :CTX])
    out = lm.step(cache, ids[:, CTX], torch.tensor([A(1.0, 0.5, 16), A(1.0, 1.0, 4), DENSE]))
    dense = lm.dense_step_flops(CTX + 1)
    assert out.usage.flops[0].item() < dense
    assert out.usage.flops[1].item() == dense == out.usage.flops[2].item()
    assert out.usage.attn_keep.tolist() == [1.0, 1.0, 1.0]
    assert out.usage.channel_keep.tolist() == [0.5, 1.0, 1.0]


def test_prune_max_relative_usage(base):
    _, _, _, ids, _ = base
    space = ActionSpace.build([0.5, 1.0], ["s40", "s80"], ["q16"])  # P_MAX = 0.8
    lm = make_lm(base, "recency", space=space)
    cache, _, _ = lm.prefill(ids[:2, :CTX])
    out = lm.step(cache, ids[:2, CTX], torch.tensor([space.index(0.5, 0.4, 16), space.index(1.0, 0.8, 16)]))
    torch.testing.assert_close(out.usage.prune, torch.tensor([0.5, 1.0]))
    H = lm.hidden_size
    assert out.usage.channel_keep.tolist() == [math.ceil(0.4 * H) / H, math.ceil(0.8 * H) / H]


@pytest.mark.parametrize("criteria", ["recency", "relevancy", "quest"])
def test_non_effective_steps_run_dense(base, criteria):
    _, _, _, ids, full = base
    lm = make_lm(base, criteria)
    cache, _, _ = lm.prefill(ids[:, :5])  # Ts + Tw + 1 = 7
    sparse = torch.tensor([A(0.25, 0.5, 4)] * B)
    for t in (5, 6):  # kv_len 6 and 7: not effective
        out = lm.step(cache, ids[:, t], sparse)
        assert out.usage.effective is False
        _close(out.logits, full[:, t])
        u = out.usage
        for f in (u.keep, u.prune, u.qratio, u.attn_keep, u.channel_keep):
            assert f.tolist() == [1.0] * B
        assert u.flops.tolist() == [lm.dense_step_flops(t + 1)] * B
    out = lm.step(cache, ids[:, 7], sparse)  # kv_len 8: effective
    assert out.usage.effective is True
    assert out.usage.keep.tolist() == [0.25] * B
    assert (out.logits - full[:, 7]).abs().max().item() > 1e-3


# ==== fast (per-grid-level kthvalue) selection path ====================================================

@pytest.mark.parametrize("tier", ["per_head", "per_layer"])
def test_relevancy_fast_path_equals_sort_path(tier):
    g = torch.Generator().manual_seed(21)
    levels = (0.1, 0.35, 0.6, 1.0)
    logits = torch.randn(8, 4, 97, generator=g)
    kappa = torch.tensor(levels)[torch.randint(0, 4, (8,), generator=g)]
    slow = relevancy_keep(logits, kappa, 4, 2, tier)
    fast = relevancy_keep(logits, kappa, 4, 2, tier, kappa_levels=levels)
    assert torch.equal(slow, fast)


def test_quest_and_prune_fast_paths_equal_sort_paths():
    g = torch.Generator().manual_seed(22)
    levels = (0.1, 0.5, 1.0)
    q, k = torch.randn(6, 4, 16, generator=g), torch.randn(6, 2, 61, 16, generator=g)
    kappa = torch.tensor(levels)[torch.randint(0, 3, (6,), generator=g)]
    assert torch.equal(quest_keep(q, k, kappa, 4), quest_keep(q, k, kappa, 4, kappa_levels=levels))
    x = torch.randn(6, 1, 64, generator=g)
    rho_levels = (0.3, 0.6, 1.0)
    rho = torch.tensor(rho_levels)[torch.randint(0, 3, (6,), generator=g)]
    y_slow, n_slow = prune_channels(x, rho)
    y_fast, n_fast = prune_channels(x, rho, rho_levels)
    assert torch.equal(y_slow, y_fast) and torch.equal(n_slow, n_fast)


# ==== growable KV cache ================================================================================

def test_growable_cache_matches_plain_dynamic_cache(base):
    """Appends into preallocated buffers must give the same keys/values as torch.cat, across crop,
    repeat_interleave, select and deepcopy (which replace the tensors the buffers back)."""
    from transformers import DynamicCache

    from utils.kv_cache import SPARE_TOKENS, GrowableCache

    g = torch.Generator().manual_seed(5)
    grow, plain = GrowableCache(), DynamicCache()

    def push(n, b=2):
        k, v = torch.randn(b, 2, n, 8, generator=g), torch.randn(b, 2, n, 8, generator=g)
        for c in (grow, plain):
            c.update(k, v, 0)

    def same():
        assert torch.equal(grow.layers[0].keys, plain.layers[0].keys)
        assert torch.equal(grow.layers[0].values, plain.layers[0].values)
        # the page summaries kept as tokens arrive equal a recomputation over the whole cache
        for got, want in zip(grow.layers[0].page_bounds(4), quest_page_bounds(plain.layers[0].keys, 4)):
            assert torch.equal(got, want)

    push(10)
    for _ in range(SPARE_TOKENS + 3):  # crosses a reallocation
        push(1)
        same()
    for c in (grow, plain):
        c.crop(-4)
    push(2)
    same()
    for c in (grow, plain):
        c.batch_repeat_interleave(3)
    push(1, b=6)
    same()
    idx = torch.tensor([5, 0, 2])
    for c in (grow, plain):
        c.batch_select_indices(idx)
    push(1, b=3)
    same()
    clone = copy.deepcopy(grow)
    k_before = grow.layers[0].keys.clone()
    clone.update(torch.ones(3, 2, 1, 8), torch.ones(3, 2, 1, 8), 0)
    assert torch.equal(grow.layers[0].keys, k_before)  # the clone does not write into the original
