"""Tests of the GRPO recipe elements of issue 15: the policy's integral budget feedback, the no-contrast and
requested-vs-achieved diagnostics, each against an independent computation."""
from __future__ import annotations

import collections

import numpy as np
import torch

from utils.actions import ActionSpace
from utils.config import load_config
from utils.engine import Episode, run_episode
from utils.policy import N_SCALARS, SOLPolicy
from utils.schedulers import PolicyScheduler
from utils.trainer import budget_correlations, episode_metrics

SPACE = ActionSpace.build([0.25, 1.0], ["s40", "s100"], ["q16"])
H, E, T, B = 12, 8, 6, 4


def _policy(gain: float, seed: int = 0) -> SOLPolicy:
    torch.manual_seed(seed)
    pol = SOLPolicy(H, E, len(SPACE), d_model=16, n_heads=2, mlp_ratio=2, action_dim=4, max_len=32,
                    budget_feedback_gain=gain, action_usage=SPACE.nominal_usage())
    return pol.eval()


def _inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    s = torch.rand(T, B, N_SCALARS, generator=g) - 0.5
    s[..., 1] = torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0, 1.0])[:, None]  # effective from step 2 on
    acts = torch.randint(0, len(SPACE), (T, B), generator=g)
    prev = torch.cat([torch.full((1, B), len(SPACE)), acts[:-1]])
    return torch.randn(T, B, H, generator=g), torch.randn(T, B, E, generator=g), s, acts, prev


def test_feedback_term_is_minus_gain_times_surplus_dot_usage():
    pol = _policy(gain=7.0)
    _, _, s, _, _ = _inputs()
    n_eff = torch.tensor([0.0, 0.0, 0.0, 1.0, 2.0, 3.0])[:, None].expand(T, B)
    got = pol.budget_feedback(s, n_eff)
    want = torch.zeros(T, B, len(SPACE))
    for t in range(T):
        for b in range(B):
            for a in range(len(SPACE)):
                k, p, q = float(SPACE.keep[a]), float(SPACE.prune[a]), float(SPACE.bits[a]) / 16
                surplus = [float(n_eff[t, b]) * float(s[t, b, 5 + i]) for i in range(3)]
                want[t, b, a] = -7.0 * (surplus[0] * k + surplus[1] * p + surplus[2] * q)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert float(_policy(gain=0.0).budget_feedback(s, n_eff).abs().max()) == 0.0


def test_logit_bound_is_c_tanh_of_the_network_logits_before_the_feedback():
    h, e, s, _, prev = _inputs()
    free, bounded = _policy(gain=3.0), _policy(gain=3.0)
    bounded.logit_bound = 1.5
    n_eff = torch.tensor([0.0, 0.0, 0.0, 1.0, 2.0, 3.0])[:, None].expand(T, B)
    fb = free.budget_feedback(s, n_eff)
    with torch.no_grad():
        raw = free(h, e, s, prev, temperature=1.0) - fb  # the network's own logits
        want = (1.5 * torch.tanh(raw / 1.5) + fb) / 0.7
        torch.testing.assert_close(bounded(h, e, s, prev, temperature=0.7), want, atol=1e-5, rtol=0)


def test_step_equals_forward_with_feedback_and_feedback_changes_logits():
    pol = _policy(gain=5.0)
    h, e, s, acts, prev = _inputs()
    with torch.no_grad():
        full = pol(h, e, s, prev, temperature=1.3)
        state, inc = pol.init_state(B), []
        for t in range(T):
            logits, state = pol.step(h[t], e[t], s[t], state, 1.3)
            inc.append(logits)
            state = state.with_action(acts[t])
        off = _policy(gain=0.0)(h, e, s, prev, temperature=1.3)
    torch.testing.assert_close(torch.stack(inc), full, atol=1e-5, rtol=0)
    assert state.n_eff.tolist() == [4.0] * B
    torch.testing.assert_close(full[:3], off[:3], atol=1e-6, rtol=0)  # no effective step before t = 3: no surplus
    assert float((full[3:] - off[3:]).abs().max()) > 1e-3
    # the feedback is added before the temperature: greedy choices do not depend on it
    torch.testing.assert_close(pol(h, e, s, prev, temperature=0.6) * 0.6, full * 1.3, atol=1e-5, rtol=0)


def _closed_loop(sets: list[str], settings: list[dict], pi_bias) -> list[torch.Tensor]:
    """Per setting (config fields to set): each row's realised prune usage over a 24-step greedy episode of 4
    tiny-Llama blocks at ρ target 0.7, for a policy whose only non-zero logits are `pi_bias(actions)`."""
    from utils.data import load_blocks
    from utils.lm import ControlledLM
    from utils.model import load_lm

    cfg = load_config("official_configs/tiny.yml", ["device=cpu", "max_blocks=8", "sparsity_criteria=recency", *sets])
    cfg.rollout_len = 24
    model, tok = load_lm(cfg.model_name, cfg.dtype, "cpu")
    lm = ControlledLM.from_config(cfg, model, tok)
    blocks = torch.as_tensor(np.asarray(load_blocks(cfg, tok, "test")[:4], dtype=np.int64))
    budgets = torch.tensor([[1.0, 0.7, 1.0]]).expand(4, 3)  # ρ 0.7 on s50/s100: 60% of the steps cheap
    out = []
    for fields in settings:
        for k, v in fields.items():
            setattr(cfg, k, v)
        torch.manual_seed(0)
        pol = SOLPolicy.from_config(cfg, lm.hidden_size, lm.hidden_size, lm.actions).eval()
        with torch.no_grad():
            pol.pi.weight.zero_()
            pol.budget_head[-1].weight.zero_()
            pol.budget_head[-1].bias.zero_()
            pol.pi.bias.copy_(pi_bias(lm.actions))
        ep = run_episode(lm, blocks, PolicyScheduler(pol, 1.0, greedy=True), budgets, cfg.context_len)
        assert int(ep.effective.sum()) == 24
        out.append(ep.usage_means()[:, 1])
    return out


def test_feedback_holds_the_budget_of_a_policy_that_always_wants_dense():
    """A policy whose network always prefers dense by 2 logits: without feedback it never saves; with it,
    each row's realised usage ends within two level steps / R of its budget."""
    off, on = _closed_loop([], [{"budget_feedback_gain": 0.0}, {"budget_feedback_gain": 20.0}],
                           lambda acts: 2.0 * acts.nominal_usage().sum(-1))  # denser = higher logit
    assert (off == 1.0).all()
    assert ((on - 0.7).abs() <= 2 * 0.5 / 24 + 1e-6).all(), on


def test_bounded_logits_cannot_outvote_the_feedback():
    """A network that wants dense by 100 logits outvotes an unbounded feedback for the whole episode; with
    its logits bounded to [-2, 2] every row's surplus stays within 2c / (g · level gap) plus one step."""
    g, c, gap = 20.0, 2.0, 0.5  # s50 / s100: level gap 0.5 in usage units
    free, bounded = _closed_loop(["keep_fracs=[1.0]", "quant_choices=[q16]"],
                                 [{"budget_feedback_gain": g, "policy_logit_bound": b} for b in (0.0, c)],
                                 lambda acts: 100.0 * acts.nominal_usage()[:, 1])
    assert ((free - 0.7) * 24 > 5).all()  # the unbounded network never saves
    surplus = (bounded - 0.7) * 24  # each row's final surplus
    assert (surplus.abs() <= 2 * c / (g * gap) + (1.0 - 0.7) + 1e-6).all(), surplus


def _episode(actions: torch.Tensor, effective: torch.Tensor, K: int) -> Episode:
    Tn, N = actions.shape
    u = torch.ones(Tn, N)
    return Episode(actions=actions, logp=torch.zeros(Tn, N), usage={k: u for k in
                   ("keep", "prune", "qratio", "attn_keep", "channel_keep", "flops")}, effective=effective,
                   budgets=torch.ones(N, 3), dense_logp=torch.zeros(Tn, N // K), kl=None,
                   dense_flops=torch.ones(Tn), group_size=K)


def test_no_contrast_share_on_a_hand_made_batch():
    # 3 steps, 2 groups of K = 3; step 0 is not effective (ignored)
    a = torch.tensor([[0, 1, 2, 3, 3, 3],   # t0 (not effective)
                      [1, 1, 1, 0, 1, 0],   # t1: group 0 no contrast, group 1 contrast
                      [2, 2, 2, 3, 3, 3]])  # t2: both no contrast
    ep = _episode(a, torch.tensor([False, True, True]), K=3)
    m = episode_metrics(ep, torch.zeros(3, 6), torch.zeros(6), SPACE.tags)
    assert abs(m["train/no_contrast_frac"] - 3 / 4) < 1e-9


def test_budget_correlations_match_numpy():
    g = torch.Generator().manual_seed(0)
    window = collections.deque(maxlen=3)
    rows = []
    for _ in range(5):  # more batches than the window holds: only the last 3 count
        t = torch.rand(8, 3, generator=g)
        t[:, 0] = 1.0  # a constant axis has no correlation to report
        a = 0.5 * t + 0.1 * torch.rand(8, 3, generator=g)
        window.append(torch.stack([t, a], dim=1))
        rows.append((t, a))
    out = budget_correlations(window)
    assert "budgets/corr_target_achieved_tok" not in out
    t = torch.cat([r[0] for r in rows[-3:]]).numpy()
    a = torch.cat([r[1] for r in rows[-3:]]).numpy()
    for i, ax in ((1, "prune"), (2, "qratio")):
        assert abs(out[f"budgets/corr_target_achieved_{ax}"] - np.corrcoef(t[:, i], a[:, i])[0, 1]) < 1e-6
