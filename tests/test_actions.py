"""Tests for utils/actions.py: the (κ, ρ, bits) action grid, its order, tags and dense index."""
from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import torch

from utils.actions import ActionSpace, parse_prune_choice, parse_quant_choice

KEEP = [0.1, 0.5, 1.0]
PRUNE = ["s40", "s60", "s100"]
QUANT = ["q5", "q8", "q16"]


def _space(keep=KEEP, prune=PRUNE, quant=QUANT) -> ActionSpace:
    return ActionSpace.build(keep, prune, quant)


def test_grid_order_kappa_outer_prune_middle_bits_inner():
    sp = _space()
    expected = list(itertools.product([0.1, 0.5, 1.0], [0.4, 0.6, 1.0], [5, 8, 16]))
    assert len(sp) == 27
    got = list(zip(sp.keep.tolist(), sp.prune.tolist(), sp.bits.tolist()))
    for (k, p, b), (gk, gp, gb) in zip(expected, got):
        assert gk == pytest.approx(k) and gp == pytest.approx(p) and gb == b
    assert sp.keep.dtype == torch.float32 and sp.prune.dtype == torch.float32 and sp.bits.dtype == torch.int64
    assert sp.axis_sizes() == (3, 3, 3)


def test_index_formula_and_lookup():
    sp = _space()
    P, Q = 3, 3
    for i_k, k in enumerate(sp.keep_values):
        for i_p, p in enumerate(sp.prune_values):
            for i_q, b in enumerate(sp.bit_values):
                idx = i_k * (P * Q) + i_p * Q + i_q
                assert sp.index(k, p, b) == idx
                assert sp.keep[idx].item() == pytest.approx(k)
                assert sp.prune[idx].item() == pytest.approx(p)
                assert sp.bits[idx].item() == b
    idx = torch.tensor([0, 13, 26])
    kk, pp, bb = sp.lookup(idx)
    assert torch.equal(kk, sp.keep[idx]) and torch.equal(pp, sp.prune[idx]) and torch.equal(bb, sp.bits[idx])


def test_non_square_grid_index():
    sp = ActionSpace.build([0.05, 0.3, 0.6, 0.85, 1.0], ["s50", "s100"], ["q4", "q6", "q8", "q16"])
    assert len(sp) == 5 * 2 * 4
    for i_k, i_p, i_q in itertools.product(range(5), range(2), range(4)):
        idx = i_k * 8 + i_p * 4 + i_q
        assert sp.keep[idx].item() == pytest.approx(sp.keep_values[i_k])
        assert sp.prune[idx].item() == pytest.approx(sp.prune_values[i_p])
        assert sp.bits[idx].item() == sp.bit_values[i_q]


def test_tags():
    sp = _space()
    assert sp.tags[0] == "k010-s040-q5"
    assert sp.tags[sp.index(0.1, 0.6, 5)] == "k010-s060-q5"
    assert sp.tags[-1] == "k100-s100-q16"
    assert sp.tags[sp.index(0.5, 1.0, 8)] == "k050-s100-q8"
    for t, k, p, b in zip(sp.tags, sp.keep.tolist(), sp.prune.tolist(), sp.bits.tolist()):
        assert t == f"k{round(k * 100):03d}-s{round(p * 100):03d}-q{b}"
    assert len(set(sp.tags)) == len(sp)
    # float noise must not change a tag (0.85*100 = 85.00000000000001, 0.05 -> 5)
    sp2 = ActionSpace.build([0.05, 0.85, 0.07, 0.29, 0.57], ["s100"], ["q16"])
    assert sp2.tags == ("k005-s100-q16", "k085-s100-q16", "k007-s100-q16", "k029-s100-q16", "k057-s100-q16")
    # 0.29 * 100 = 28.999999999999996: truncation would give 028
    sp3 = ActionSpace.build([0.29], ["s29", "s57"], ["q5"])
    assert sp3.tags == ("k029-s029-q5", "k029-s057-q5")


def test_dense_idx():
    sp = _space()
    assert sp.dense_idx == 26
    k, p, b = sp.keep[sp.dense_idx].item(), sp.prune[sp.dense_idx].item(), sp.bits[sp.dense_idx].item()
    assert (k, p, b) == (1.0, 1.0, 16)
    # dense point in the middle of the grid
    sp = ActionSpace.build([1.0, 0.5], ["s100", "s50"], ["q16", "q8"])
    assert sp.dense_idx == 0
    sp = ActionSpace.build([0.5, 1.0, 0.2], ["s50", "s100"], ["q8", "q16"])
    assert sp.dense_idx == sp.index(1.0, 1.0, 16) == 1 * 4 + 1 * 2 + 1


def test_dense_idx_fallback_first_full_keep():
    # no (1, 1, 16) point: first action with κ = 1
    sp = ActionSpace.build([0.3, 1.0], ["s50", "s80"], ["q4", "q8"])
    assert sp.dense_idx == 4
    assert sp.keep[sp.dense_idx].item() == 1.0
    sp = ActionSpace.build([0.3, 1.0], ["s50", "s100"], ["q4", "q8"])  # ρ=1 but no q16
    assert sp.dense_idx == 4
    # no κ = 1 at all: 0
    sp = ActionSpace.build([0.3, 0.6], ["s100"], ["q16"])
    assert sp.dense_idx == 0


def test_prune_choice_keeps_percent():
    assert parse_prune_choice("s60") == pytest.approx(0.60)
    assert parse_prune_choice("s40") == pytest.approx(0.40)
    assert parse_prune_choice("s100") == 1.0
    assert parse_prune_choice("s5") == pytest.approx(0.05)
    sp = ActionSpace.build([1.0], ["s60"], ["q16"])
    assert sp.prune[0].item() == pytest.approx(0.6)
    assert sp.tags == ("k100-s060-q16",)
    assert parse_quant_choice("q5") == 5 and parse_quant_choice("q16") == 16 and parse_quant_choice("q2") == 2


@pytest.mark.parametrize("bad", ["s0", "s101", "60", "x60", "s", "s6.5", "s-10", "ss60", ""])
def test_bad_prune_choice_raises(bad):
    with pytest.raises(ValueError):
        parse_prune_choice(bad)
    with pytest.raises(ValueError):
        ActionSpace.build([1.0], [bad], ["q16"])


@pytest.mark.parametrize("bad", ["q1", "q17", "q0", "16", "b8", "q", "q8.0", "q-4"])
def test_bad_quant_choice_raises(bad):
    with pytest.raises(ValueError):
        parse_quant_choice(bad)
    with pytest.raises(ValueError):
        ActionSpace.build([1.0], ["s100"], [bad])


def test_enable_prune_quant_false_collapses_axes():
    cfg = SimpleNamespace(keep_fracs=[0.1, 0.5, 1.0], struct_prune_choices=["s40", "s100"],
                          quant_choices=["q5", "q16"], enable_prune_quant=False)
    sp = ActionSpace.from_config(cfg)
    assert sp.axis_sizes() == (3, 1, 1)
    assert sp.tags == ("k010-s100-q16", "k050-s100-q16", "k100-s100-q16")
    assert torch.all(sp.prune == 1.0) and torch.all(sp.bits == 16)
    assert sp.dense_idx == 2
    assert not sp.has_prune and not sp.has_quant and sp.has_sparsity

    cfg.enable_prune_quant = True
    sp = ActionSpace.from_config(cfg)
    assert sp.axis_sizes() == (3, 2, 2)
    assert sp.has_prune and sp.has_quant
    assert sp.dense_idx == 11
    assert sp.prune_max == 1.0


def test_axis_flags_and_prune_max():
    sp = ActionSpace.build([1.0], ["s40", "s80"], ["q16"])
    assert sp.prune_max == pytest.approx(0.8)
    assert sp.has_prune and not sp.has_quant and not sp.has_sparsity
    assert sp.dense_idx == 0  # κ = 1 fallback


def test_level_shares_are_the_per_axis_marginals():
    sp = ActionSpace.build([0.1, 0.6, 1.0], ["s40", "s80", "s100"], ["q5", "q7", "q16"])
    probs = torch.zeros(len(sp))
    probs[sp.index(0.6, 0.4, 7)] = 0.5
    probs[sp.index(0.6, 1.0, 16)] = 0.25
    probs[sp.index(1.0, 0.8, 7)] = 0.25
    k, p, q = sp.level_shares(probs)
    assert k.tolist() == [0.0, 0.75, 0.25]
    assert p.tolist() == [0.5, 0.25, 0.25]
    assert q.tolist() == [0.0, 0.75, 0.25]
    # the shares' mean usage is the usage of the mixture
    usage = probs @ sp.nominal_usage()
    assert float(k @ torch.tensor(sp.keep_values)) == pytest.approx(float(usage[0]))
    assert float(p @ torch.tensor(sp.prune_values)) == pytest.approx(float(usage[1]))
