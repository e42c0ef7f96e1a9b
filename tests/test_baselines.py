"""Tests of utils/baselines.py: the fixed, random, EMC and DAC schedulers and the budget matching.

Most tests drive the schedulers directly with synthetic observations on the tiny grid
κ ∈ {0.25, 1}, ρ ∈ {0.5, 1}, bits ∈ {4, 16} (usage levels q ∈ {0.25, 1}); a few run them through the real
episode engine on the tiny random Llama.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from utils.actions import ActionSpace
from utils.baselines import (CountSpreader, DACScheduler, EMCScheduler, FixedRefScheduler, FixedScheduler,
                             RandomScheduler, axis_levels, bracket, budget_matched_targets, flat_index)
from utils.config import load_config
from utils.engine import StepObs, prefill_blocks, run_episode
from utils.lm import ControlledLM
from utils.model import load_lm
from utils.schedulers import DenseScheduler

SPACE = ActionSpace.build([0.25, 1.0], ["s50", "s100"], ["q4", "q16"])
GAP = (0.75, 0.5, 0.75)  # hi - lo per axis in usage units
TARGETS = (0.6, 0.8, 0.6)
V, H = 50, 8


def fake_lm(space=SPACE):
    return SimpleNamespace(actions=space)


def usage_of(actions: torch.Tensor, space=SPACE) -> torch.Tensor:
    """[..., 3] nominal (κ, ρ/P_MAX, bits/16) of action indices."""
    k, p, b = space.lookup(actions)
    return torch.stack([k, p / space.prune_max, b.float() / 16], dim=-1).double()


def drive(sched, N: int, T: int, episodes: int = 1, eff_from: int = 0, logits=None, hidden=None):
    """Run synthetic episodes; returns actions [episodes, T, N]. logits/hidden: callables (e, t) -> tensor."""
    out = []
    for e in range(episodes):
        sched.start(fake_lm(), torch.tensor([TARGETS] * N), 1)
        acts = []
        for t in range(T):
            obs = StepObs(
                t, T, torch.zeros(N, dtype=torch.long),
                hidden(e, t) if hidden else torch.randn(N, H),
                logits(e, t) if logits else torch.randn(N, V),
                torch.zeros(N, 8), t >= eff_from)
            acts.append(sched.choose(obs))
        out.append(torch.stack(acts))
    return torch.stack(out)


# ------------------------------------------------------------------ level tables

def test_bracket_interpolates_clamps_and_hits_levels():
    lv = torch.tensor([0.25, 0.5, 1.0], dtype=torch.float64)
    lo, hi, p = bracket(lv, torch.tensor([0.6, 0.5, 0.1, 1.3, 0.25, 0.375]))
    assert lv[lo].tolist() == [0.5, 0.5, 0.25, 1.0, 0.25, 0.25]
    assert lv[hi].tolist() == [1.0, 0.5, 0.25, 1.0, 0.25, 0.5]
    torch.testing.assert_close(p, torch.tensor([0.2, 0.0, 0.0, 0.0, 0.0, 0.5], dtype=torch.float64))


def test_axis_levels_and_flat_index_follow_the_grid():
    space = ActionSpace.build([1.0, 0.3, 0.6], ["s100", "s40"], ["q16", "q8", "q4"])  # unsorted on purpose
    levels = axis_levels(space)
    assert levels[0][0].tolist() == pytest.approx([0.3, 0.6, 1.0])
    assert levels[1][0].tolist() == pytest.approx([0.4, 1.0])
    assert levels[2][0].tolist() == pytest.approx([0.25, 0.5, 1.0])
    for (lk, pk), (lp, pp), (lq, pq) in [((0, 0), (0, 0), (0, 0)), ((2, 2), (1, 1), (1, 1))]:
        idx = flat_index(space, levels[0][1][pk], levels[1][1][pp], levels[2][1][pq])
        k, p, b = space.lookup(idx)
        assert (float(k), float(p), int(b)) == pytest.approx(
            (float(levels[0][0][lk]), float(levels[1][0][lp]), float(levels[2][0][lq]) * 16))
    assert int(flat_index(space, torch.tensor(0), torch.tensor(0), torch.tensor(0))) == space.index(1.0, 1.0, 16)


# ------------------------------------------------------------------ fixed

def test_fixed_matches_target_within_one_row_step_and_rotates():
    N, T = 16, 16
    acts = drive(FixedScheduler(TARGETS), N, T)[0]  # [T, N]
    u = usage_of(acts)
    mean = u.mean(dim=(0, 1))
    for a in range(3):
        assert abs(float(mean[a]) - TARGETS[a]) <= GAP[a] / (N * T) + 1e-12
    # content-blind but spread: every row gets the hi level at some steps and the lo level at others
    hi_frac = (u[..., 0] == 1.0).double().mean(0)
    assert (hi_frac > 0).all() and (hi_frac < 1).all()
    # axes are decorrelated by the rotation offsets
    assert not torch.equal(u[..., 0] == 1.0, u[..., 2] == 1.0)


def test_fixed_residual_spans_episodes_and_streams_with_one_row():
    sched = FixedScheduler((0.6, 1.0, 0.25))
    acts = drive(sched, 1, 5, episodes=4)  # 20 streaming steps in 4 episodes
    u = usage_of(acts).reshape(-1, 3)
    assert abs(float(u[:, 0].mean()) - 0.6) <= 0.75 / 20 + 1e-12
    assert (u[:, 1] == 1.0).all() and (u[:, 2] == 0.25).all()
    k = u[:, 0]
    assert 0 < int((k == 1.0).sum()) < 20  # a temporal dither, not a constant action
    for n in range(1, 21):  # the running average never drifts more than one step's worth
        assert abs(float(k[:n].sum()) - 0.6 * n) <= 0.75 / 2 + 1e-9
    sched.reset()
    assert usage_of(drive(sched, 1, 5)).reshape(-1, 3)[:, 0].tolist() == k[:5].tolist()


def test_fixed_at_grid_level_is_constant_and_non_effective_steps_are_dense():
    acts = drive(FixedScheduler((0.25, 0.5, 1.0)), 4, 6, eff_from=2)[0]
    assert (acts[:2] == SPACE.dense_idx).all()
    assert (acts[2:] == SPACE.index(0.25, 0.5, 16)).all()
    assert (drive(FixedScheduler((1.0, 1.0, 1.0)), 3, 4) == SPACE.dense_idx).all()


def test_targets_are_checked():
    with pytest.raises(ValueError, match="keep"):
        FixedScheduler((1.5, 1.0, 1.0))
    with pytest.raises(ValueError):
        RandomScheduler((0.5, 0.5))


# ------------------------------------------------------------------ random

def test_random_is_count_matched_per_row_and_axis():
    N, T = 32, 10
    acts = drive(RandomScheduler(TARGETS, seed=3), N, T, eff_from=2)[0]
    assert (acts[:2] == SPACE.dense_idx).all()
    u = usage_of(acts[2:])  # R = 8 effective steps
    R = T - 2
    for a, (lo, gap) in enumerate(((0.25, 0.75), (0.5, 0.5), (0.25, 0.75))):
        exact = (TARGETS[a] - lo) / gap * R  # hi steps per row the target asks for, not an integer here
        counts = (u[..., a] > lo).sum(0)
        assert set(counts.tolist()) <= {math.floor(exact), math.ceil(exact)}  # k or k + 1 per row
        assert int(counts.sum()) == math.floor(exact * N + 0.5)  # the total is the target's, rounded once
        assert abs(float(u[..., a].mean()) - TARGETS[a]) <= gap / (2 * R * N) + 1e-12
    # placement differs between rows
    hi = u[..., 0] == 1.0
    assert len({tuple(hi[:, r].tolist()) for r in range(N)}) > 5


def test_count_spreader_tracks_the_total_across_calls():
    sp = CountSpreader()
    p, R, got, rows = 0.3, 16, 0, 0
    for N in (2, 3, 16, 1, 5):
        c = sp.counts(p, R, N)
        assert c.shape == (N,) and int(c.max() - c.min()) <= 1
        got, rows = got + int(c.sum()), rows + N
        assert got == math.floor(p * R * rows + 0.5)  # independent recomputation of the running total
    assert sp.counts(0.0, R, 4).tolist() == [0, 0, 0, 0] and sp.counts(1.0, R, 2).max() <= R


@pytest.mark.parametrize("cls", [RandomScheduler, EMCScheduler, DACScheduler, FixedScheduler, FixedRefScheduler])
def test_every_baseline_mean_usage_is_within_0_002_of_its_target(cls):
    """Matched as exactly as fixed: over several small batches (the evaluators' 16 × 16 steps), the mean
    usage of each axis is within 0.002 of an off-grid target (rounding per row would leave up to 0.019)."""
    torch.manual_seed(1)
    targets = (0.61, 0.83, 0.47)
    sched = cls(targets)
    acts = []
    for _ in range(4):
        sched.start(fake_lm(), torch.tensor([targets] * 16), 1)
        acts.append(torch.stack([sched.choose(StepObs(t, 16, torch.zeros(16, dtype=torch.long), torch.randn(16, H),
                                                      torch.randn(16, V), torch.zeros(16, 8), True))
                                 for t in range(16)]))
    u = usage_of(torch.stack(acts))
    for a in range(3):
        assert abs(float(u[..., a].mean()) - targets[a]) <= 0.002, (a, float(u[..., a].mean()))


def test_fixed_ref_rows_take_turns_with_equal_counts():
    """The reference's pattern: n_hi rows per step as the residual says, window start ((t + 17)·n_hi) mod N on
    ρ, so per row the cheap-step counts differ by at most one and cheap steps interleave."""
    space = ActionSpace.build([1.0], ["s40", "s100"], ["q16"])
    N, T, target = 8, 16, 0.7  # p_hi = 0.5: 4 of 8 rows dense per step
    sched = FixedRefScheduler((1.0, target, 1.0))
    sched.start(fake_lm(space), torch.tensor([[1.0, target, 1.0]] * N), 1)
    acts = torch.stack([sched.choose(StepObs(t, T, torch.zeros(N, dtype=torch.long), torch.randn(N, H),
                                             torch.randn(N, V), torch.zeros(N, 8), True)) for t in range(T)])
    hi = usage_of(acts, space)[..., 1] == 1.0  # [T, N]
    assert (hi.sum(1) == 4).all()  # per-step share = the target's
    assert (hi.sum(0) == T // 2).all()  # equal counts per row
    for t in range(T):  # the window is the reference's
        start = ((t + 17) * 4) % N
        assert hi[t].tolist() == [(r - start) % N < 4 for r in range(N)]
    ours = FixedScheduler((1.0, target, 1.0))
    ours.start(fake_lm(space), torch.tensor([[1.0, target, 1.0]] * N), 1)
    ours_hi = torch.stack([ours.choose(StepObs(t, T, torch.zeros(N, dtype=torch.long), torch.randn(N, H),
                                               torch.randn(N, V), torch.zeros(N, 8), True)) for t in range(T)])
    assert not torch.equal(usage_of(ours_hi, space)[..., 1] == 1.0, hi)  # a different pattern, same counts


def test_random_same_seed_reproducible_different_seed_differs():
    a = drive(RandomScheduler(TARGETS, seed=7), 8, 12, episodes=2)
    b = drive(RandomScheduler(TARGETS, seed=7), 8, 12, episodes=2)
    c = drive(RandomScheduler(TARGETS, seed=8), 8, 12, episodes=2)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a[0], a[1])  # the generator advances between episodes


# ------------------------------------------------------------------ EMC / DAC

@pytest.mark.parametrize("cls", [EMCScheduler, DACScheduler])
def test_heuristics_match_targets_per_row(cls):
    N, T = 24, 12
    torch.manual_seed(0)
    acts = drive(cls(TARGETS), N, T, eff_from=1)[0]
    assert (acts[0] == SPACE.dense_idx).all()
    u = usage_of(acts[1:])
    R = T - 1
    for a in range(3):
        err = (u[..., a].mean(0) - TARGETS[a]).abs()  # per row: its spread total is within one level step
        assert (err <= GAP[a] / R + 1e-9).all(), (a, err.max())
        assert abs(float(u[..., a].mean()) - TARGETS[a]) <= GAP[a] / (2 * R * N) + 1e-9  # and the mean exact


def test_emc_spends_dense_steps_where_the_entropy_is_high():
    N, T = 6, 10

    def logits(e, t):  # flat distribution (entropy 1) for the first half, peaked (entropy ~0) after
        x = torch.zeros(N, V)
        if t >= T // 2:
            x[:, 0] = 50.0
        return x

    sched = EMCScheduler((0.625, 1.0, 1.0), gamma=0.35)  # κ: half the steps at 1.0, half at 0.25
    u = usage_of(drive(sched, N, T, logits=logits)[0])
    k = u[..., 0]
    assert abs(float(k.mean()) - 0.625) < 1e-9
    assert float(k[: T // 2].mean()) > float(k[T // 2:].mean())
    assert sched.signals[0].min() > 0.99 and sched.signals[-1].max() < 0.01


def test_dac_signal_is_hidden_drift_and_neutral_at_start():
    N, T = 4, 8
    base = torch.randn(N, H)

    def hidden(e, t):  # unchanged hidden state for 4 steps, then it flips sign each step (maximal drift)
        return base if t < 4 else base * (-1) ** t

    sched = DACScheduler((0.625, 1.0, 1.0))
    u = usage_of(drive(sched, N, T, hidden=hidden)[0])
    s = torch.stack(sched.signals)
    assert torch.allclose(s[0], torch.full((N,), 0.5, dtype=torch.float64))
    assert torch.allclose(s[1:4], torch.zeros(3, N, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(s[5:], torch.ones(3, N, dtype=torch.float64), atol=1e-6)
    k = u[..., 0]
    assert abs(float(k.mean()) - 0.625) < 1e-9
    assert float(k[4:].mean()) > float(k[:4].mean())


# ------------------------------------------------------------------ through the real engine

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cfg = load_config("official_configs/tiny.yml", ["device=cpu"])
    model, tok = load_lm(cfg.model_name, cfg.dtype, "cpu")
    lm = ControlledLM.from_config(cfg, model, tok)
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 1000, (4, cfg.context_len + cfg.rollout_len + 1), generator=g)
    return cfg, lm, prefill_blocks(lm, blocks, cfg.context_len)


def test_engine_usage_and_budget_matched_targets(tiny):
    cfg, lm, pf = tiny
    targets = (0.6, 0.8, 0.6)
    eps = {}
    for name, sched in (("fixed", FixedScheduler(targets)), ("random", RandomScheduler(targets, seed=1)),
                        ("emc", EMCScheduler(targets)), ("dac", DACScheduler(targets))):
        eps[name] = [run_episode(lm, None, sched, torch.tensor([targets] * 4), cfg.context_len, prefill=pf)
                     for _ in range(2)]
        got = budget_matched_targets(eps[name])
        T = cfg.rollout_len
        tol = [g / T for g in GAP]  # within the dither granularity of one episode
        for a in range(3):
            assert abs(got[a] - targets[a]) <= tol[a] + 1e-6, (name, a, got)
    # budget_matched_targets = the plain mean over effective row-steps
    ep = eps["emc"][0]
    torch.testing.assert_close(torch.tensor(budget_matched_targets([ep]), dtype=torch.float32),
                               ep.usage_means().mean(0), rtol=1e-6, atol=1e-6)
    dense = run_episode(lm, None, DenseScheduler(), torch.ones(4, 3), cfg.context_len, prefill=pf)
    assert budget_matched_targets([dense]) == (1.0, 1.0, 1.0)


def test_methods_side_by_side_equal_one_method_per_forward(tiny_test_split):
    """evaluate_matched with rows_per_forward (3 methods, then all 7, per forward via StackedScheduler) gives
    each method the NLLs, usage and action counts of one method per forward, and the same matched targets."""
    from utils.evaluation import evaluate_matched
    from utils.policy import SOLPolicy
    from utils.schedulers import PolicyScheduler

    cfg, lm, blocks = tiny_test_split
    torch.manual_seed(0)
    policy = SOLPolicy.from_config(cfg, lm.hidden_size, lm.hidden_size, lm.actions).eval()

    def run(rows):
        def baselines(t):
            return {"fixed": FixedScheduler(t), "random_1": RandomScheduler(t, seed=1),
                    "random_2": RandomScheduler(t, seed=2), "emc": EMCScheduler(t), "dac": DACScheduler(t)}
        first = {"policy": PolicyScheduler(policy, 1.0, greedy=True), "dense": DenseScheduler()}
        with torch.inference_mode():
            return evaluate_matched(lm, blocks, 4, 2, first, baselines, (0.5, 0.75, 0.5),
                                    context_len=cfg.context_len, rows_per_forward=rows)

    ref, ref_t = run(0)
    for rows in (12, 1000):
        got, got_t = run(rows)
        assert got.keys() == ref.keys()
        torch.testing.assert_close(torch.tensor(got_t), torch.tensor(ref_t), atol=1e-6, rtol=0)
        for name, r in ref.items():
            torch.testing.assert_close(got[name].nll, r.nll, atol=1e-5, rtol=0, msg=name)
            assert torch.equal(got[name].action_hist, r.action_hist), name
            for a, b in zip(got[name].usage, r.usage):
                assert abs(a - b) < 1e-6, name
    assert len(set(ref["random_1"].nll.tolist()) ^ set(ref["random_2"].nll.tolist())) > 0  # the seeds differ
