"""Tests of utils/grpo.py against small examples worked out by hand in each test."""
from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from utils.grpo import (GRPOUpdater, RolloutBatch, aggregate_returns, axis_levels, budget_gaps, budget_penalty,
                        budget_prices, group_advantages, grpo_advantages, level_gains, level_prices, ppo_loss,
                        sample_budgets, shaped_rewards, slope_shrinks,
                        step_budget_costs, step_price_costs, task_reward, usage_slopes, whiten)


def close(a, b, tol=1e-5):
    torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32),
                               atol=tol, rtol=tol)


def make_cfg(**kw):
    base = dict(
        budget_tok_list=None, budget_tok_min=None, budget_tok_max=None,
        budget_prune_list=None, budget_prune_min=None, budget_prune_max=None,
        budget_q_ratio_list=None, budget_q_ratio_min=None, budget_q_ratio_max=None,
        C_target=0.5, C_target_prune=0.7, C_target_quant_bits=8.0,
        task_w_kl=0.0, reward_agg="sum", reward_gamma=0.85, grpo_level="process", grpo_norm="center",
        adv_whiten_global=True, budget_tolerance=0.02, ppo_clip=0.2, ppo_epochs=1, ppo_minibatch_size=16,
        ppo_target_batch_size=48, grad_accum_steps=1, max_grad_norm=1.0, entropy_coef=0.01,
        kl_pi_ref_coef=0.0, pi_temperature=1.3, rollout_len=4, seed=1234,
    )
    base.update(kw)
    return SimpleNamespace(**base)


# ------------------------------------------------------------------ budgets and rewards

def test_sample_budgets_list_range_default_and_reproducible():
    cfg = make_cfg(budget_tok_min=0.1, budget_tok_max=0.9, budget_prune_list=[0.4, 0.8, 1.0])
    g = torch.Generator().manual_seed(7)
    b = sample_budgets(cfg, 500, g)
    assert b.shape == (500, 3)
    assert (b[:, 0] >= 0.1).all() and (b[:, 0] <= 0.9).all() and b[:, 0].std() > 0.1
    assert set(b[:, 1].tolist()) == set(torch.tensor([0.4, 0.8, 1.0]).tolist())  # all drawn, nothing else
    close(b[:, 2], torch.full((500,), 8.0 / 16))     # default: C_target_quant_bits / 16
    b2 = sample_budgets(cfg, 500, torch.Generator().manual_seed(7))
    assert torch.equal(b, b2)
    b3 = sample_budgets(cfg, 500, torch.Generator().manual_seed(8))
    assert not torch.equal(b, b3)
    # list beats range; defaults for tok and prune
    cfg2 = make_cfg(budget_q_ratio_list=[0.3125], budget_q_ratio_min=0.0, budget_q_ratio_max=1.0)
    b4 = sample_budgets(cfg2, 3, torch.Generator().manual_seed(0))
    close(b4, [[0.5, 0.7, 0.3125]] * 3)
    with pytest.raises(ValueError, match="C_target"):
        sample_budgets(make_cfg(C_target=None), 2, torch.Generator())


def test_task_reward():
    logp = torch.tensor([[-1.0, -2.0]])
    kl = torch.tensor([[0.5, 1.0]])
    close(task_reward(logp, None, 0.0), logp)
    close(task_reward(logp, kl, 0.25), [[0.75 * -1 - 0.25 * 0.5, 0.75 * -2 - 0.25 * 1.0]])
    with pytest.raises(ValueError):
        task_reward(logp, None, 0.5)


def test_aggregate_returns_sum_max_none_and_gamma_one():
    r = torch.tensor([[-1.0], [-2.0], [-3.0]])
    # sum, gamma 0.5: G2 = -3, G1 = -2 + 0.5*-3 = -3.5, G0 = -1 + 0.5*-3.5 = -2.75
    close(aggregate_returns(r, "sum", 0.5), [[-2.75], [-3.5], [-3.0]])
    # max: M2 = -3, M1 = max(-2, -1.5) = -1.5, M0 = max(-1, -0.75) = -0.75
    close(aggregate_returns(r, "max", 0.5), [[-0.75], [-1.5], [-3.0]])
    rp = torch.tensor([[1.0], [4.0], [2.0]])  # M2 = 2, M1 = max(4, 1) = 4, M0 = max(1, 2) = 2
    close(aggregate_returns(rp, "max", 0.5), [[2.0], [4.0], [2.0]])
    close(aggregate_returns(r, None, 0.5), r)
    close(aggregate_returns(r, "sum", 1.0), r)      # gamma = 1 disables aggregation (reference)
    close(aggregate_returns(r, "sum", 0.0), r)      # gamma = 0: immediate reward
    # several columns processed together
    r2 = torch.cat([r, rp], dim=1)
    close(aggregate_returns(r2, "sum", 0.5)[:, 1], [1 + 0.5 * (4 + 0.5 * 2), 4 + 0.5 * 2, 2])


# ------------------------------------------------------------------ penalty

def test_budget_penalty_dead_zone_two_sided_alpha_zero():
    usage = torch.tensor([[0.55, 0.90, 0.50],
                          [0.49, 0.71, 1.00],
                          [0.45, 1.00, 0.50]])
    tgt = torch.tensor([[0.50, 1.00, 0.50],
                        [0.50, 0.70, 0.3125],
                        [0.50, 1.00, 0.50]])
    alphas = (100.0, 10.0, 0.0)
    # row 0: tok +0.05 -> (0.05-0.02)^2*100 = 0.09; prune -0.10 -> (0.08)^2*10 = 0.064; quant exact -> 0
    # row 1: tok -0.01 and prune +0.01 inside the dead zone; quant +0.6875 but alpha 0 -> 0
    # row 2: tok -0.05 (under budget) -> same 0.09 as +0.05
    close(budget_penalty(usage, tgt, alphas, 0.02), [0.154, 0.0, 0.09])
    close(budget_gaps(usage, tgt)[0], [0.05, -0.10, 0.0])
    # tolerance 0: plain squared gap
    close(budget_penalty(usage[:1], tgt[:1], (1.0, 1.0, 1.0), 0.0), [0.05 ** 2 + 0.1 ** 2])


# ------------------------------------------------------------------ shaping and advantages

def test_shaped_rewards_process_and_outcome():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 0.0, -1.0, 2.0]])
    pen = torch.tensor([0.0, 0.5, 0.0, 1.0])
    close(shaped_rewards(x, pen, "process"), [[1.0, 1.5, 3.0, 3.0], [1.0, -0.5, -1.0, 1.0]])
    # outcome: X = sum_t (x_t - pen) = [2, 2-1, 2, 6-2], broadcast over t
    close(shaped_rewards(x, pen, "outcome"), [[2.0, 1.0, 2.0, 4.0]] * 2)


def test_group_advantages_center_and_zscore():
    # T=2, B=2, K=3; row b*K+k
    R = torch.tensor([[1.0, 2.0, 3.0, 0.0, 0.0, 6.0],
                      [-1.0, -1.0, -1.0, 2.0, 4.0, 6.0]])
    # means: t0 b0 2, t0 b1 2, t1 b0 -1, t1 b1 4
    close(group_advantages(R, 3, "process", "center"),
          [[-1.0, 0.0, 1.0, -2.0, -2.0, 4.0], [0.0, 0.0, 0.0, -2.0, 0.0, 2.0]])
    s00 = math.sqrt(2 / 3)            # pop std of [1,2,3]
    s01 = math.sqrt((4 + 4 + 16) / 3)  # of [0,0,6]
    s11 = math.sqrt(8 / 3)             # of [2,4,6]; t1 b0 has std 0 -> floor 1e-6, numerator 0
    close(group_advantages(R, 3, "process", "zscore"),
          [[-1 / s00, 0.0, 1 / s00, -2 / s01, -2 / s01, 4 / s01], [0.0, 0.0, 0.0, -2 / s11, 0.0, 2 / s11]])


def test_group_advantages_outcome_broadcast():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 0.0, -1.0, 2.0]])
    pen = torch.tensor([0.0, 0.5, 0.0, 1.0])
    R = shaped_rewards(x, pen, "outcome")       # X = [2, 1, 2, 4]
    A = group_advantages(R, 2, "outcome", "center")
    close(A, [[0.5, -0.5, -1.0, 1.0]] * 2)      # b0: [2,1]-1.5, b1: [2,4]-3
    Az = group_advantages(R, 2, "outcome", "zscore")
    close(Az, [[1.0, -1.0, -1.0, 1.0]] * 2)     # two-element groups z-score to +-1
    with pytest.raises(ValueError):
        group_advantages(R, 3, "outcome", "center")


def test_whiten():
    A = torch.tensor([[1.0, 2.0], [3.0, 6.0]])
    s = math.sqrt((4 + 1 + 0 + 9) / 4)          # mean 3, population std
    close(whiten(A), [[-2 / s, -1 / s], [0.0, 3 / s]])
    close(whiten(torch.full((2, 3), 5.0)), torch.zeros(2, 3))


def test_grpo_advantages_pipeline_matches_parts():
    g = torch.Generator().manual_seed(0)
    r = -torch.rand(4, 6, generator=g)
    pen = torch.rand(6, generator=g)
    cfg = make_cfg(reward_agg="sum", reward_gamma=0.5, grpo_level="outcome", adv_whiten_global=False)
    G = aggregate_returns(r, "sum", 0.5)
    X = 4 * (G[0] - pen)                          # reference outcome score T*(G0 - penalty)
    exp = (X.view(2, 3) - X.view(2, 3).mean(1, keepdim=True)).view(1, 6).expand(4, 6)
    close(grpo_advantages(r, pen, cfg, 3), exp)
    cfg_p = make_cfg(reward_agg="sum", reward_gamma=0.5, grpo_level="process")
    close(grpo_advantages(r, pen, cfg_p, 3), whiten(group_advantages(G - pen, 3, "process", "center")))


# ------------------------------------------------------------------ loss

def _loss_example():
    # 4 entries laid out [T=2, M=2]; 2 actions; logits = log(probs) so log_softmax gives log(probs) exactly
    probs = torch.tensor([[[0.6, 0.4], [0.5, 0.5]], [[0.6, 0.4], [0.7, 0.3]]])
    actions = torch.tensor([[0, 0], [1, 1]])    # chosen p_new: 0.6, 0.5, 0.4, 0.3
    ratios = [1.5, 0.5, 1.1, 0.6]
    p_new = [0.6, 0.5, 0.4, 0.3]
    logp_old = torch.tensor([math.log(p / q) for p, q in zip(p_new, ratios)]).view(2, 2)
    adv = torch.tensor([[1.0, -2.0], [0.5, 1.0]])
    return probs.log(), actions, logp_old, adv, ratios


def test_ppo_loss_clipped_by_hand():
    logits, actions, logp_old, adv, ratios = _loss_example()
    loss, st = ppo_loss(logits, actions, logp_old, adv, clip=0.2, entropy_coef=0.0)
    # entry 1: min(1.5*1, 1.2*1) = 1.2 (clip binds); entry 2: min(0.5*-2, 0.8*-2) = -1.6 (clip binds)
    # entry 3: min(1.1*0.5, 1.1*0.5) = 0.55;         entry 4: min(0.6*1, 0.8*1) = 0.6 (unclipped is lower)
    expected = -(1.2 - 1.6 + 0.55 + 0.6) / 4
    close(loss, expected)
    close(st["policy_loss"], expected)
    assert st["clip_frac"] == pytest.approx(0.75)   # |ratio-1| > 0.2 for entries 1, 2, 4
    assert st["approx_kl"] == pytest.approx(sum(-math.log(r) for r in ratios) / 4, abs=1e-5)
    assert st["kl_ref"] == 0.0


def test_ppo_loss_entropy_sign_and_gradient():
    logits, actions, logp_old, adv, _ = _loss_example()
    h = lambda p: -(p * math.log(p) + (1 - p) * math.log(1 - p))
    H = (h(0.6) + h(0.5) + h(0.6) + h(0.7)) / 4
    loss0, _ = ppo_loss(logits, actions, logp_old, adv, 0.2, 0.0)
    loss1, st = ppo_loss(logits, actions, logp_old, adv, 0.2, 0.1)
    assert st["entropy"] == pytest.approx(H, abs=1e-6)
    close(loss1, loss0 - 0.1 * H)                   # bonus: higher entropy, lower loss
    # with zero advantages a gradient step on the loss raises entropy
    lg = torch.tensor([[[2.0, -1.0]]], requires_grad=True)
    loss, st0 = ppo_loss(lg, torch.tensor([[0]]), torch.tensor([[0.0]]), torch.zeros(1, 1), 0.2, 1.0)
    loss.backward()
    with torch.no_grad():
        _, st1 = ppo_loss(lg - 0.5 * lg.grad, torch.tensor([[0]]), torch.tensor([[0.0]]), torch.zeros(1, 1), 0.2, 1.0)
    assert st1["entropy"] > st0["entropy"]


def test_ppo_loss_kl_ref():
    logits, actions, logp_old, adv, _ = _loss_example()
    base, _ = ppo_loss(logits, actions, logp_old, adv, 0.2, 0.0)
    same, st = ppo_loss(logits, actions, logp_old, adv, 0.2, 0.0, ref_logits=logits.clone(), kl_ref_coef=1.0)
    close(same, base)
    assert st["kl_ref"] == pytest.approx(0.0, abs=1e-7)
    ref = torch.full_like(logits, math.log(0.5))    # uniform reference
    kl = lambda p: p * math.log(p / 0.5) + (1 - p) * math.log((1 - p) / 0.5)
    exp_kl = (kl(0.6) + kl(0.5) + kl(0.6) + kl(0.7)) / 4
    loss, st = ppo_loss(logits, actions, logp_old, adv, 0.2, 0.0, ref_logits=ref, kl_ref_coef=2.0)
    assert st["kl_ref"] == pytest.approx(exp_kl, abs=1e-6)
    close(loss, base + 2.0 * exp_kl)


# ------------------------------------------------------------------ updater

H_DIM, E_DIM, N_ACT = 3, 2, 4


class LinearPolicy(nn.Module):
    """Stand-in policy with the real signature: logits from a linear map of the per-step inputs."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.lin = nn.Linear(H_DIM + E_DIM + 8 + N_ACT + 1, N_ACT)

    def forward(self, h, e, scalars, prev_actions, temperature=1.0):
        prev = nn.functional.one_hot(prev_actions, N_ACT + 1).float()
        return self.lin(torch.cat([h, e, scalars, prev], dim=-1)) / temperature


def make_batch(policy, T=4, N=6, seed=0, temperature=1.3):
    g = torch.Generator().manual_seed(seed)
    h, e, sc = torch.randn(T, N, H_DIM, generator=g), torch.randn(T, N, E_DIM, generator=g), torch.rand(T, N, 8, generator=g)
    prev = torch.randint(N_ACT + 1, (T, N), generator=g)
    with torch.no_grad():
        logp_all = torch.log_softmax(policy(h, e, sc, prev, temperature=temperature), -1)
    acts = torch.randint(N_ACT, (T, N), generator=g)
    logp_old = logp_all.gather(-1, acts.unsqueeze(-1)).squeeze(-1)
    adv = torch.randn(T, N, generator=g)
    return RolloutBatch(h, e, sc, prev, acts, logp_old, adv)


def make_updater(cfg, seed=0):
    pol = LinearPolicy(seed)
    opt = torch.optim.AdamW(pol.parameters(), lr=1e-2)
    return pol, opt, GRPOUpdater(pol, opt, cfg)


def test_pooling_threshold_and_step_counts():
    # T=4, N=6 per batch -> 24 entries; target 48 -> a cycle every 2 batches over 12 rollouts.
    # minibatch 16 entries -> 4 rollouts -> ceil(12/4) = 3 minibatches per pass, 2 passes -> 6 backward calls;
    # GA 4: cycle 1 -> 1 step (counter 6), cycle 2 -> counter 12 -> steps at 8 and 12 -> 2 steps.
    cfg = make_cfg(ppo_epochs=2, grad_accum_steps=4)
    pol, _, up = make_updater(cfg)
    assert up.add(make_batch(pol, seed=1)) == [] and up.pool_size == 24 and up.num_updates == 0
    st = up.add(make_batch(pol, seed=2))
    assert len(st) == 1 and up.pool_size == 0 and up.num_updates == 1 and up.accum_i == 6
    assert st[0]["minibatches"] == 4 and st[0]["update"] == 1
    assert {"loss", "policy_loss", "entropy", "approx_kl", "clip_frac", "grad_norm"} <= set(st[0])
    up.add(make_batch(pol, seed=3))
    st = up.add(make_batch(pol, seed=4))
    assert len(st) == 2 and up.num_updates == 3 and up.accum_i == 12
    assert up.flush() == []                          # 12 % 4 == 0: nothing pending


def test_partial_minibatch_and_flush():
    # 12 rollouts, mb = 20 // 4 = 5 rollouts -> ceil(12/5) = 3 minibatches; GA 2 -> 1 step, 1 pending
    cfg = make_cfg(ppo_minibatch_size=20, grad_accum_steps=2)
    pol, _, up = make_updater(cfg)
    up.add(make_batch(pol, seed=1))
    assert len(up.add(make_batch(pol, seed=2))) == 1 and up.accum_i == 3
    up.add(make_batch(pol, seed=3))                  # partial pool: dropped by flush
    before = [p.detach().clone() for p in pol.parameters()]
    st = up.flush()
    assert len(st) == 1 and st[0]["minibatches"] == 1 and up.num_updates == 2 and up.pool_size == 0
    assert any(not torch.equal(a, b) for a, b in zip(before, pol.parameters()))
    assert up.flush() == []


def test_first_minibatch_is_on_policy():
    cfg = make_cfg(grad_accum_steps=1)
    pol, _, up = make_updater(cfg)
    up.add(make_batch(pol, seed=1))
    st = up.add(make_batch(pol, seed=2))
    assert len(st) == 3                              # 3 minibatches, one step each
    assert abs(st[0]["approx_kl"]) < 1e-6 and st[0]["clip_frac"] == 0.0
    assert abs(st[1]["approx_kl"]) > 1e-6            # later minibatches see updated parameters


def test_state_dict_round_trip_is_exact():
    cfg = make_cfg(ppo_epochs=2, grad_accum_steps=4, kl_pi_ref_coef=0.1)
    pol, opt, up = make_updater(cfg)
    data = [make_batch(LinearPolicy(9), seed=s) for s in range(1, 8)]
    up.add(data[0]); up.add(data[1]); up.add(data[2])   # one cycle done, 6 % 4 pending, 1 batch pooled
    assert up.accum_i % 4 != 0 and up.pool_size == 24
    snap = copy.deepcopy({"pol": pol.state_dict(), "opt": opt.state_dict(), "up": up.state_dict()})
    for b in data[3:]:
        up.add(b)
    up.flush()
    final_a = [p.detach().clone() for p in pol.parameters()]

    pol2, opt2, up2 = make_updater(cfg, seed=5)          # different init, all overwritten by the snapshot
    pol2.load_state_dict(snap["pol"]); opt2.load_state_dict(snap["opt"]); up2.load_state_dict(snap["up"])
    assert up2.pool_size == 24 and up2.num_updates == 1 and up.num_updates == 5
    for b in data[3:]:
        up2.add(b)
    up2.flush()
    assert up2.num_updates == up.num_updates
    for a, b in zip(final_a, pol2.parameters()):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------
# budget_credit: step
# ---------------------------------------------------------------------------------------------------

def test_step_costs_are_the_marginal_price_of_the_episode_penalty():
    """K=1: Σ_t c_t ∂-matches autograd: c_t = (∂(T·P)/∂u_t)·(u_t − b), with P the reference's squared dead zone."""
    g = torch.Generator().manual_seed(0)
    T, N = 6, 4
    usage = torch.rand(T, N, 3, generator=g)
    targets = torch.rand(N, 3, generator=g)
    eff = torch.tensor([False, True, True, True, True, True])
    alphas, tol = (3.0, 5.0, 7.0), 0.02
    u = usage.clone().requires_grad_(True)
    mean = u[eff].mean(0)
    T_eff = int(eff.sum())
    (T_eff * budget_penalty(mean, targets, alphas, tol)).sum().backward()
    expected = (u.grad * (usage - targets[None])).sum(-1)
    close(step_budget_costs(usage, targets, eff, alphas, tol, group_size=1), expected)
    assert torch.all(step_budget_costs(usage, targets, eff, alphas, tol, 1)[0] == 0)  # warm-up step pays nothing


def test_step_costs_zero_inside_dead_zone_and_only_own_step_counts_within_a_group():
    T, K = 4, 3
    targets = torch.full((K, 3), 0.5)
    inside = torch.full((T, K, 3), 0.51)
    assert torch.all(step_budget_costs(inside, targets, torch.ones(T, dtype=torch.bool), (1, 1, 1), 0.02, K) == 0)
    # group over budget on the token axis; rows differ at step 2 only, and elsewhere by a shuffle of the same
    usage = torch.full((T, K, 3), 0.5)
    usage[:, :, 0] = 0.8
    usage[2, 1, 0] = 1.0
    usage[0, 2, 0], usage[1, 2, 0] = 0.7, 0.9  # row 2: other steps differ, its own step 2 equals row 0's
    c = step_budget_costs(usage, targets, torch.ones(T, dtype=torch.bool), (10.0, 10.0, 10.0), 0.02, K)
    A = group_advantages(-c, K, "process", "center")
    assert A[2, 1] < A[2, 0] and torch.isclose(A[2, 0], A[2, 2])  # only the step's own usage sets its credit
    assert torch.all(c[:, :] >= 0)


def test_grpo_advantages_accepts_step_costs():
    cfg = make_cfg(reward_agg=None, adv_whiten_global=False)
    r = torch.tensor([[1.0, 2.0], [3.0, 1.0]])
    c = torch.tensor([[0.5, 0.0], [0.0, 1.0]])
    close(grpo_advantages(r, c, cfg, 2), group_advantages(r - c, 2, "process", "center"))


# budget_credit: price
# ---------------------------------------------------------------------------------------------------

def test_usage_slopes_are_least_squares_slopes_per_step_and_input():
    """Each (step, input, axis) slope and its variance equal numpy's degree-1 least-squares fit of the K rewards
    on the K usages (variance = residual sum of squares / (K − 2) / Σ(u − ū)²); no contrast (all K alike) and
    non-effective steps are NaN."""
    import numpy as np
    g = torch.Generator().manual_seed(3)
    T, B, K = 5, 2, 4
    usage = torch.randint(0, 2, (T, B * K, 3), generator=g).float() * 0.6 + 0.4
    usage[1, :K, 1] = 1.0  # input 0, step 1: every rollout dense on the prune axis
    r = torch.randn(T, B * K, generator=g)
    eff = torch.tensor([False, True, True, True, True])
    s = usage_slopes(r, usage, eff, K)
    assert s.shape == (T, B, 2, 3) and torch.isnan(s[0]).all() and torch.isnan(s[1, 0, :, 1]).all()
    checked = 0
    for t in range(1, T):
        for b in range(B):
            for j in range(3):
                x, y = usage[t, b * K:(b + 1) * K, j].double().numpy(), r[t, b * K:(b + 1) * K].double().numpy()
                if np.ptp(x) == 0:
                    assert torch.isnan(s[t, b, :, j]).all()
                    continue
                coef, rss, *_ = np.polyfit(x, y, 1, full=True)
                rss = float(rss[0]) if len(rss) else 0.0
                assert abs(float(s[t, b, 0, j]) - coef[0]) < 1e-4
                assert abs(float(s[t, b, 1, j]) - rss / (K - 2) / ((x - x.mean()) ** 2).sum()) < 1e-4
                checked += 1
    assert checked > 10


def test_usage_slope_on_two_levels_is_damage_over_gap():
    """Two of four rollouts cheap (0.4), two dense (1.0): slope = (mean dense r − mean cheap r) / 0.6."""
    usage = torch.full((1, 4, 3), 1.0)
    usage[0, :, 1] = torch.tensor([0.4, 1.0, 0.4, 1.0])
    r = torch.tensor([[-3.0, -1.0, -2.0, -1.5]])
    s = usage_slopes(r, usage, torch.tensor([True]), 4)
    close(s[0, 0, 0, 1], ((-1.0 - 1.5) / 2 - (-3.0 - 2.0) / 2) / 0.6)
    assert torch.isnan(s[0, 0, :, 0]).all() and torch.isnan(s[0, 0, :, 2]).all()


def _cells(slopes, var):
    """[M, 2, 3] cells from per-axis slopes [M, 3] and one noise variance for all."""
    return torch.stack([slopes, torch.full_like(slopes, var)], dim=1)


def test_budget_prices_are_the_quantile_the_budget_affords():
    """Without noise the price is the (1 − q)-quantile of the finite slopes, q = (b − lo)/(hi − lo) the dense
    share b allows; NaN cells are ignored; a one-level axis or too few cells gives 0."""
    import numpy as np
    vals = torch.arange(1.0, 101.0)
    slopes = torch.stack([vals, vals.flip(0), torch.full((100,), 5.0)], dim=1)
    cells = torch.cat([_cells(slopes, 0.0), torch.full((7, 2, 3), float("nan"))])
    lo, hi = torch.tensor([0.4, 0.4, 1.0]), torch.tensor([1.0, 1.0, 1.0])
    targets = torch.tensor([[0.5, 0.7, 1.0], [1.0, 0.4, 1.0], [0.9, 0.3, 1.0]])
    p = budget_prices(cells, targets, lo, hi)
    for i, b in enumerate(targets[:, 0].tolist()):
        q = min(max((b - 0.4) / 0.6, 0.0), 1.0)
        close(p[i, 0], np.quantile(vals.numpy(), 1 - q), tol=1e-4)
    close(p[1, 1], 100.0)  # b = lo: no dense step affordable, the price is the largest slope
    close(p[2, 1], 100.0)  # below lo: clamped
    assert torch.all(p[:, 2] == 0)  # one level on the axis
    assert torch.all(budget_prices(cells[:10], targets, lo, hi, min_cells=16) == 0)
    tb = torch.linspace(0.4, 1.0, 13)[:, None].expand(13, 3)
    pr = budget_prices(cells, tb.contiguous(), lo, hi)[:, 0]
    assert torch.all(pr[1:] <= pr[:-1])  # a tighter budget never gets a lower price


def test_budget_prices_undo_the_noise_of_the_slope_estimates():
    """True slopes N(1, 0.5²) seen through noise of variance 4 (what a cell's residuals report): the prices are
    the true slopes' quantiles, not the noisy ones' (which would price ρ 0.9 below zero)."""
    g = torch.Generator().manual_seed(0)
    M = 200_000
    true = 1.0 + 0.5 * torch.randn(M, generator=g)
    noisy = true + 2.0 * torch.randn(M, generator=g)
    cells = _cells(noisy[:, None].expand(M, 3).contiguous(), 4.0)
    lo, hi = torch.tensor([0.4, 0.4, 0.4]), torch.tensor([1.0, 1.0, 1.0])
    targets = torch.tensor([[0.5] * 3, [0.7] * 3, [0.9] * 3])
    p = budget_prices(cells, targets, lo, hi)[:, 0]
    for i, b in enumerate((0.5, 0.7, 0.9)):
        q = (b - 0.4) / 0.6
        close(p[i], torch.quantile(true[:100_000], 1 - q), tol=0.03)
    assert float(torch.quantile(noisy[:100_000], 1 - 5 / 6)) < 0 < float(p[2])
    mu, shrink, n = slope_shrinks(cells)
    close(shrink, torch.full((3,), (0.25 / 4.25) ** 0.5, dtype=torch.float64), tol=0.01)  # true var / noisy var
    close(mu, torch.full((3,), float(noisy.mean()), dtype=torch.float64), tol=1e-6)
    assert n.tolist() == [M] * 3
    assert torch.isnan(slope_shrinks(cells[:15])[1]).all()  # fewer than min_cells
    # all noise (reported variance ≥ the spread): every budget gets the mean slope
    flat = budget_prices(_cells(noisy[:, None].expand(M, 3).contiguous(), 100.0), targets, lo, hi)[:, 0]
    close(flat, torch.full((3,), float(noisy.mean())), tol=1e-4)


def test_price_costs_by_hand_and_what_they_reward():
    """c_t = Σ price·(u_t − b) on effective steps; with price λ a cheap step (ρ 0.4 vs 1.0) gains the advantage
    over a dense one exactly where its damage is below 0.6·λ."""
    usage = torch.tensor([[[1.0, 0.4, 1.0], [1.0, 1.0, 1.0]], [[1.0, 1.0, 1.0], [1.0, 0.4, 1.0]]])  # [T=2, N=2, 3]
    targets = torch.tensor([[1.0, 0.7, 1.0], [1.0, 0.7, 1.0]])
    prices = torch.tensor([[9.0, 2.0, 9.0], [9.0, 2.0, 9.0]])
    c = step_price_costs(usage, targets, torch.tensor([True, True]), prices)
    close(c, [[2.0 * -0.3, 2.0 * 0.3], [2.0 * 0.3, 2.0 * -0.3]])
    assert torch.all(step_price_costs(usage, targets, torch.tensor([False, True]), prices)[0] == 0)
    # step 0: the cheap row loses 1.0 nat, step 1: it loses 1.5; the price makes 0.6 * 2 = 1.2 nats affordable
    r = torch.tensor([[-2.0, -1.0], [-2.5, -4.0]])
    A = group_advantages(r - c, 2, "process", "center")
    assert A[0, 0] > A[0, 1] and A[1, 1] < A[1, 0]


# budget_credit: price on axes with more than two levels
# ---------------------------------------------------------------------------------------------------

def test_axis_levels_pads_short_axes():
    nominal = torch.tensor([[0.1, 0.4, 1.0], [0.6, 0.8, 1.0], [1.0, 1.0, 1.0], [0.1, 1.0, 1.0]])
    lv = axis_levels(nominal)
    close(lv[0], torch.tensor([0.1, 0.6, 1.0]))
    close(lv[1], torch.tensor([0.4, 0.8, 1.0]))
    assert float(lv[2, 0]) == 1.0 and torch.isnan(lv[2, 1:]).all()


def test_level_gains_are_level_means_against_the_top_level():
    """Per (step, input, axis, level): mean reward at the level − mean at the top level, variance = pooled
    within-level variance (K − levels used degrees of freedom) × (1/n_ℓ + 1/n_top), computed here by loops;
    an unused level, an unused top level and non-effective steps are NaN."""
    import numpy as np
    g = torch.Generator().manual_seed(5)
    T, B, K = 4, 3, 9
    lv = torch.tensor([[0.1, 0.6, 1.0], [0.4, 0.8, 1.0], [0.3125, 1.0, float("nan")]])
    idx = torch.randint(0, 3, (T, B * K, 3), generator=g)
    idx[..., 2] = idx[..., 2] % 2
    usage = torch.stack([lv[j][idx[..., j]] for j in range(3)], dim=-1)
    usage[1, :K, 0] = 0.6  # input 0, step 1: token axis never at its top level
    usage[2, K:2 * K, 1] = torch.tensor([0.4, 0.4, 0.4, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])  # middle level unused
    r = torch.randn(T, B * K, generator=g)
    eff = torch.tensor([True, True, True, False])
    out = level_gains(r, usage, eff, K, lv)
    assert out.shape == (T, B, 2, 3, 3) and torch.isnan(out[3]).all()
    assert torch.isnan(out[1, 0, :, 0]).all()  # no top level: nothing to compare against
    assert torch.isnan(out[2, 1, :, 1, 1]).all() and torch.isfinite(out[2, 1, :, 1, 0]).all()
    checked = 0
    for t in range(3):
        for b in range(B):
            y = r[t, b * K:(b + 1) * K].double().numpy()
            for j in range(3):
                u = usage[t, b * K:(b + 1) * K, j].double().numpy()
                levels = [x for x in lv[j].tolist() if x == x]
                used = [x for x in levels if np.isclose(u, x).any()]
                if not np.isclose(u, levels[-1]).any():
                    continue
                fitted = sum(np.where(np.isclose(u, x), y[np.isclose(u, x)].mean(), 0.0) for x in used)
                s2 = ((y - fitted) ** 2).sum() / (K - len(used))
                top = np.isclose(u, levels[-1])
                for li, x in enumerate(levels):
                    at = np.isclose(u, x)
                    if not at.any():
                        assert torch.isnan(out[t, b, :, j, li]).all()
                        continue
                    assert abs(float(out[t, b, 0, j, li]) - (y[at].mean() - y[top].mean())) < 1e-5
                    assert abs(float(out[t, b, 1, j, li]) - s2 * (1 / at.sum() + 1 / top.sum())) < 1e-5
                    checked += 1
    assert checked > 40


def test_level_gains_on_two_levels_are_the_usage_slopes():
    """On a two-level axis the gain of the cheap level is −slope × gap and its variance the slope's × gap²."""
    g = torch.Generator().manual_seed(6)
    T, B, K = 3, 2, 8
    usage = torch.ones(T, B * K, 3)
    usage[..., 1] = torch.where(torch.rand(T, B * K, generator=g) < 0.5, 0.4, 1.0)
    r = torch.randn(T, B * K, generator=g)
    eff = torch.ones(T, dtype=torch.bool)
    lv = torch.tensor([[1.0, float("nan")], [0.4, 1.0], [1.0, float("nan")]])
    gains, slopes = level_gains(r, usage, eff, K, lv), usage_slopes(r, usage, eff, K)
    ok = torch.isfinite(slopes[:, :, 0, 1])
    assert ok.sum() >= 4
    close(gains[:, :, 0, 1, 0][ok], -0.6 * slopes[:, :, 0, 1][ok], tol=1e-5)
    close(gains[:, :, 1, 1, 0][ok], 0.36 * slopes[:, :, 1, 1][ok], tol=1e-5)


def _level_cells(gains: torch.Tensor, axis: int = 0) -> torch.Tensor:
    """[M, 2, 3, L] cells with noiseless `gains` [M, L] on one axis and NaN on the others."""
    M, L = gains.shape
    cells = torch.full((M, 2, 3, L), float("nan"))
    cells[:, 0, axis], cells[:, 1, axis] = gains, 0.0
    return cells


def test_level_prices_by_hand():
    """Levels 0.2 / 0.6 / 1.0. Cell A gains −1.0 / −0.1 / 0: top below λ 0.25, middle to 2.25, then low.
    Cell B −0.3 / −0.2 / 0: its middle level never wins; top below 0.375, then low. So the pooled spend is
    1.0, 0.8 (λ 0.25–0.375), 0.4 (to 2.25), 0.2, and each budget's price is the jump it falls in."""
    lv = torch.tensor([[0.2, 0.6, 1.0], [0.4, 1.0, float("nan")], [1.0, float("nan"), float("nan")]])
    cells = _level_cells(torch.tensor([[-1.0, -0.1, 0.0], [-0.3, -0.2, 0.0]]))
    targets = torch.tensor([[0.9, 0.7, 1.0], [0.6, 0.7, 1.0], [0.3, 0.7, 1.0]])
    p, shrink = level_prices(cells, targets, lv, min_cells=2)
    close(p[:, 0], torch.tensor([0.25, 0.375, 2.25]), tol=1e-6)
    assert torch.all(p[:, 1:] == 0) and float(shrink[0]) == 1.0 and torch.isnan(shrink[1:]).all()
    assert torch.all(level_prices(cells, targets, lv, min_cells=16)[0] == 0)  # too few cells


def test_level_prices_spend_the_budget():
    """Random concave-ish gains on three levels: at the returned price the pooled cells' spend crosses the
    budget (≥ b just below it, ≤ b just above), and a tighter budget never gets a lower price."""
    g = torch.Generator().manual_seed(7)
    M = 500
    lv = torch.tensor([[0.1, 0.6, 1.0], [1.0, float("nan"), float("nan")], [1.0, float("nan"), float("nan")]])
    low = -torch.rand(M, generator=g) * 3
    mid = low * torch.rand(M, generator=g) * 0.5
    cells = _level_cells(torch.stack([low, mid, torch.zeros(M)], dim=1))
    b = torch.linspace(0.15, 0.95, 9)
    targets = torch.stack([b, torch.ones(9), torch.ones(9)], dim=1)
    p, _ = level_prices(cells, targets, lv, min_cells=2)
    gains = cells[:, 0, 0].double()

    def spend(lam: float) -> float:
        return float(lv[0].double()[(gains - lam * lv[0].double()).argmax(-1)].mean())

    for i in range(9):
        lam = float(p[i, 0])
        assert spend(lam - 1e-4) >= float(b[i]) - 1e-9 and spend(lam + 1e-4) <= float(b[i]) + 1e-9
    assert torch.all(p[1:, 0] <= p[:-1, 0])
