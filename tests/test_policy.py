"""Tests for utils/policy.py: step() == forward(), causality, heads, eval biases, parameter count."""
from __future__ import annotations

import itertools

import pytest
import torch

from utils.config import Config
from utils.policy import (
    N_SCALARS, PolicyState, SOLPolicy, action_logit_bias, choose_actions, count_parameters,
)

H, E, A, T, B = 24, 16, 5, 7, 3


def _policy(n_layers: int = 1, scalar_dim: int = 8, seed: int = 0, **kw) -> SOLPolicy:
    torch.manual_seed(seed)
    pol = SOLPolicy(H, E, A, d_model=32, n_heads=4, n_layers=n_layers, mlp_ratio=2, action_dim=8,
                    max_len=16, scalar_dim=scalar_dim, **kw)
    # make the zero-initialised pi bias non-trivial so the tests exercise it
    with torch.no_grad():
        pol.pi.bias.normal_()
    return pol.eval()


def _inputs(t: int = T, b: int = B, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(t, b, H, generator=g)
    e = torch.randn(t, b, E, generator=g)
    s = torch.rand(t, b, N_SCALARS, generator=g)
    acts = torch.randint(0, A, (t, b), generator=g)
    prev = torch.cat([torch.full((1, b), A), acts[:-1]], dim=0)  # BOS at t = 0
    return h, e, s, acts, prev


def _run_steps(pol: SOLPolicy, h, e, s, acts, temperature: float, state: PolicyState | None = None):
    state = pol.init_state(h.shape[1]) if state is None else state
    out = []
    for t in range(h.shape[0]):
        logits, state = pol.step(h[t], e[t], s[t], state, temperature=temperature)
        out.append(logits)
        state = state.with_action(acts[t])
    return torch.stack(out), state


@pytest.mark.parametrize("n_layers", [1, 2])
def test_step_matches_forward(n_layers: int) -> None:
    pol = _policy(n_layers)
    h, e, s, acts, prev = _inputs()
    with torch.no_grad():
        full = pol(h, e, s, prev, temperature=1.3)
        inc, state = _run_steps(pol, h, e, s, acts, temperature=1.3)
    assert full.shape == (T, B, A)
    torch.testing.assert_close(inc, full, atol=1e-5, rtol=0)
    assert state.step_idx == T and state.past_k[0].shape == (B, 4, T, 8)


def test_bos_at_step_zero() -> None:
    pol = _policy()
    h, e, s, acts, prev = _inputs()
    st = pol.init_state(B)
    assert st.step_idx == 0 and torch.equal(st.last_action, torch.full((B,), A))
    with torch.no_grad():
        l0, new = pol.step(h[0], e[0], s[0], st)
        full = pol(h, e, s, prev)
        prev_bad = prev.clone()
        prev_bad[0] = 0
        full_bad = pol(h, e, s, prev_bad)
    torch.testing.assert_close(l0, full[0], atol=1e-5, rtol=0)
    assert not torch.allclose(full_bad[0], full[0], atol=1e-4)
    # step() leaves last_action for the caller to set
    assert torch.equal(new.last_action, st.last_action)
    assert torch.equal(new.with_action(acts[0]).last_action, acts[0])


def test_causality() -> None:
    pol = _policy(n_layers=2)
    h, e, s, acts, prev = _inputs()
    h2, e2, s2, prev2 = h.clone(), e.clone(), s.clone(), prev.clone()
    h2[5:] += 1.0
    e2[5:] -= 1.0
    s2[5:] = torch.rand_like(s2[5:])
    prev2[5:] = (prev2[5:] + 1) % A
    with torch.no_grad():
        a, b = pol(h, e, s, prev), pol(h2, e2, s2, prev2)
    torch.testing.assert_close(a[:5], b[:5], atol=1e-6, rtol=0)
    assert not torch.allclose(a[5:], b[5:], atol=1e-4)


def test_temperature_divides_logits() -> None:
    pol = _policy()
    h, e, s, _, prev = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(pol(h, e, s, prev, temperature=0.5), pol(h, e, s, prev) / 0.5)


def test_budget_head_acts_directly_on_logits() -> None:
    # scalar_dim = 2 keeps C_tok out of the observation, so only the budget head can see it
    pol = _policy(scalar_dim=2)
    h, e, s, _, prev = _inputs()
    s2 = s.clone()
    s2[..., 2] += 0.5
    with torch.no_grad():
        a, b = pol(h, e, s, prev), pol(h, e, s2, prev)
        expected = pol.budget_head(s2[..., 2:5]) - pol.budget_head(s[..., 2:5])
    assert not torch.allclose(a, b, atol=1e-4)
    torch.testing.assert_close(b - a, expected, atol=1e-5, rtol=0)


def test_scalar_dim_ignores_trailing_scalars() -> None:
    h, e, s, _, prev = _inputs()
    s2 = s.clone()
    s2[..., 5:] = torch.rand_like(s2[..., 5:]) + 3.0
    with torch.no_grad():
        pol5 = _policy(scalar_dim=5)
        torch.testing.assert_close(pol5(h, e, s, prev), pol5(h, e, s2, prev), atol=0, rtol=0)
        pol8 = _policy(scalar_dim=8)
        assert not torch.allclose(pol8(h, e, s, prev), pol8(h, e, s2, prev), atol=1e-4)
        s3 = s.clone()
        s3[..., 8:] += 1.0  # the LM-derived scalars: read only with scalar_dim 10
        torch.testing.assert_close(pol8(h, e, s, prev), pol8(h, e, s3, prev), atol=0, rtol=0)
        pol10 = _policy(scalar_dim=10)
        assert not torch.allclose(pol10(h, e, s, prev), pol10(h, e, s3, prev), atol=1e-4)
    assert pol5.scalar_proj[0].in_features == 5 and N_SCALARS == 10


def test_action_logit_bias_hand_computed() -> None:
    grid = list(itertools.product([0.3, 1.0], [0.5, 1.0], [4.0, 16.0]))  # (kappa, rho, bits) x 8
    kappa, rho, bits = (torch.tensor(c) for c in zip(*grid))
    s, p, q = 0.7, -0.2, 1.5
    got = action_logit_bias(kappa, rho, bits, s, p, q)
    want = torch.tensor([s * (k == 1.0) + p * (r == 1.0) + q * (b == 16.0) for k, r, b in grid])
    torch.testing.assert_close(got, want)
    # non-binary values are min-max normalised; a constant axis contributes nothing
    got3 = action_logit_bias(torch.tensor([0.2, 0.4, 1.0]), torch.ones(3), torch.tensor([8.0, 8.0, 8.0]),
                             2.0, 5.0, 5.0)
    torch.testing.assert_close(got3, torch.tensor([0.0, 0.5, 2.0]))


def test_choose_actions() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0], [5.0, -1.0, 0.0]])
    assert choose_actions(logits, greedy=True).tolist() == [1, 0]
    a1 = choose_actions(logits, greedy=False, generator=torch.Generator().manual_seed(3))
    a2 = choose_actions(logits, greedy=False, generator=torch.Generator().manual_seed(3))
    assert a1.dtype == torch.long and a1.shape == (2,) and torch.equal(a1, a2)
    # a near-one-hot distribution is always sampled at its mode
    sharp = torch.tensor([[-50.0, 50.0, -50.0]]).expand(4, 3)
    assert choose_actions(sharp, greedy=False).tolist() == [1, 1, 1, 1]


def test_parameter_count_matches_reference_formula() -> None:
    h, e, a, d, heads, ratio, ad, max_len = 2048, 2048, 2, 512, 4, 4, 32, 1024
    pol = SOLPolicy(h, e, a, d_model=d, n_heads=heads, n_layers=1, mlp_ratio=ratio, action_dim=ad,
                    max_len=max_len, scalar_dim=8)
    action_emb = (a + 1) * ad
    scalar_proj = 8 * 64 + 64 + 2 * 64
    obs_proj = (h + e + 64 + ad) * d + d
    pos = max_len * d
    block = 2 * (2 * d) + 4 * d * d + (d * ratio * d + ratio * d) + (ratio * d * d + d)
    final_ln = 2 * d
    pi = d * a + a
    budget = 3 * 32 + 32 + 32 * a + a
    value_head = d + 1
    expected = action_emb + scalar_proj + obs_proj + pos + block + final_ln + pi + budget
    assert count_parameters(pol) == expected == 5_824_484
    assert abs((expected + value_head) / 1e6 - 5.82) < 0.01  # the reference's ~5.82 M with its value head


def test_select_keeps_rows() -> None:
    pol = _policy(n_layers=2)
    h, e, s, acts, _ = _inputs(t=6, b=4)
    idx = torch.tensor([3, 1])
    with torch.no_grad():
        _, st = _run_steps(pol, h[:4], e[:4], s[:4], acts[:4], 1.3)  # steps 0-3, all 4 rows
        after, _ = _run_steps(pol, h[4:, idx], e[4:, idx], s[4:, idx], acts[4:, idx], 1.3,
                              state=st.select(idx))
        ref_all, _ = _run_steps(pol, h[:, idx], e[:, idx], s[:, idx], acts[:, idx], 1.3)
        # boolean masks and repeat_interleave also work
        mask = torch.tensor([False, True, False, True])
        after_m, _ = _run_steps(pol, h[4:, mask], e[4:, mask], s[4:, mask], acts[4:, mask], 1.3,
                                state=st.select(mask))
        ref_m, _ = _run_steps(pol, h[:, mask], e[:, mask], s[:, mask], acts[:, mask], 1.3)
    torch.testing.assert_close(after, ref_all[4:], atol=1e-5, rtol=0)
    torch.testing.assert_close(after_m, ref_m[4:], atol=1e-5, rtol=0)
    rep = st.repeat_interleave(2)
    assert rep.batch_size == 8 and torch.equal(rep.past_k[1][2], st.past_k[1][1])


def test_gradients_reach_all_parameters() -> None:
    pol = _policy(n_layers=2).train()
    h, e, s, acts, prev = _inputs()
    logp = torch.log_softmax(pol(h, e, s, prev, temperature=1.3), dim=-1)
    logp.gather(-1, acts.unsqueeze(-1)).sum().backward()
    for name, p in pol.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_from_config_and_limits() -> None:
    cfg = Config()
    cfg.policy_d_model, cfg.policy_n_heads, cfg.policy_n_layers = 64, 4, 1
    cfg.policy_max_len, cfg.policy_scalar_dim = 4, 6
    pol = SOLPolicy.from_config(cfg, H, E, A)
    assert pol.d_model == 64 and len(pol.blocks) == 1 and pol.scalar_dim == 6
    assert pol.pi.bias.abs().sum() == 0
    h, e, s, acts, prev = _inputs(t=5)
    with pytest.raises(ValueError, match="policy_max_len"):
        pol(h, e, s, prev)
    with pytest.raises(ValueError, match="divisible"):
        SOLPolicy(H, E, A, d_model=30, n_heads=4)


def test_block_chunk_on_top_of_cache() -> None:
    # several new steps after a cache (offset causal mask) == one full causal pass
    blk = _policy().blocks[0]
    x = torch.randn(2, 7, 32)
    with torch.no_grad():
        full, _, _ = blk(x)
        _, k, v = blk(x[:, :3])
        tail, k2, v2 = blk(x[:, 3:], k, v)
    torch.testing.assert_close(tail, full[:, 3:], atol=1e-5, rtol=0)
    assert k2.shape[2] == 7


@pytest.mark.parametrize("use_hidden,use_token", [(False, True), (True, False), (False, False)])
def test_switched_off_inputs_are_ignored(use_hidden: bool, use_token: bool) -> None:
    # an ablated policy's logits must not move when the input it cannot see changes, and must move for the rest
    pol = _policy(use_hidden=use_hidden, use_token=use_token)
    h, e, s, _, prev = _inputs()
    h2, e2, _, _, _ = _inputs(seed=7)
    with torch.no_grad():
        base = pol(h, e, s, prev)
        moved_h = pol(h2, e, s, prev)
        moved_e = pol(h, e2, s, prev)
    assert torch.equal(base, moved_h) == (not use_hidden)
    assert torch.equal(base, moved_e) == (not use_token)
    assert not torch.equal(base, pol(h, e, torch.rand_like(s), prev))  # budgets and progress are always seen


def test_from_config_passes_input_switches() -> None:
    cfg = Config()
    cfg.policy_d_model, cfg.policy_n_heads, cfg.policy_use_hidden = 32, 4, False
    pol = SOLPolicy.from_config(cfg, H, E, A)
    assert not pol.use_hidden and pol.use_token


def test_head_init_scale_scales_only_the_logit_layers() -> None:
    # same seed: every parameter is PyTorch's draw, the two logit layers' times the scale; both layers are
    # linear in those parameters and pi's bias starts at zero, so the scaled policy's logits are exactly the
    # scale times the default policy's
    def build(scale: float) -> SOLPolicy:
        torch.manual_seed(3)
        return SOLPolicy(H, E, A, d_model=32, n_heads=4, action_dim=8, max_len=16, head_init_scale=scale).eval()

    base, small = build(1.0), build(0.01)
    scaled = {"pi.weight", "budget_head.2.weight", "budget_head.2.bias"}
    for (name, p0), (_, p1) in zip(base.named_parameters(), small.named_parameters()):
        torch.testing.assert_close(p1, p0 * 0.01 if name in scaled else p0, atol=0, rtol=0)
    h, e, s, _, prev = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(small(h, e, s, prev), 0.01 * base(h, e, s, prev), atol=1e-7, rtol=1e-5)
    cfg = Config()
    cfg.policy_d_model, cfg.policy_n_heads, cfg.policy_head_init_scale = 32, 4, 0.0
    with torch.no_grad():
        assert SOLPolicy.from_config(cfg, H, E, A)(h, e, s, prev).abs().max() == 0  # 0: exactly uniform
    with pytest.raises(ValueError, match="head_init_scale"):
        SOLPolicy(H, E, A, d_model=32, n_heads=4, head_init_scale=-1.0)


def test_level_map_marks_each_actions_levels() -> None:
    from utils.actions import ActionSpace
    space = ActionSpace.build([0.1, 0.6, 1.0], ["s40", "s100"], ["q5", "q7", "q16"])
    m = space.level_map()
    assert m.shape == (18, 3 + 2 + 3) and torch.equal(m.sum(1), torch.full((18,), 3.0))
    levels = [float(k) for k in space.keep_values] + list(space.prune_values) + [float(b) for b in space.bit_values]
    for a in range(len(space)):
        k, p, b = (float(v) for v in space.lookup(torch.tensor(a)))
        marked = [levels[j] for j in m[a].nonzero().flatten().tolist()]
        assert marked == pytest.approx([k, p, b])


@pytest.mark.parametrize("bound", [0.0, 2.0])
def test_factorised_head_is_a_product_of_axis_distributions(bound: float) -> None:
    # the 18 action probabilities factor into one distribution per axis (their marginals), the incremental
    # path agrees with the full pass, and the joint head does not factor
    from utils.actions import ActionSpace
    space = ActionSpace.build([0.1, 0.6, 1.0], ["s40", "s100"], ["q5", "q7", "q16"])
    torch.manual_seed(0)
    pol = SOLPolicy(H, E, len(space), d_model=32, n_heads=4, action_dim=8, max_len=16,
                    level_map=space.level_map(), logit_bound=bound).eval()
    assert pol.pi.out_features == 8
    g = torch.Generator().manual_seed(1)
    h, e, s = torch.randn(T, B, H, generator=g), torch.randn(T, B, E, generator=g), torch.rand(T, B, N_SCALARS, generator=g)
    acts = torch.randint(0, len(space), (T, B), generator=g)
    prev = torch.cat([torch.full((1, B), len(space)), acts[:-1]], dim=0)
    with torch.no_grad():
        logits = pol(h, e, s, prev, temperature=1.3)
        inc, _ = _run_steps(pol, h, e, s, acts, temperature=1.3)
    torch.testing.assert_close(inc, logits, atol=1e-5, rtol=0)
    p = logits.softmax(-1).view(T, B, 3, 2, 3).double()
    pk, pp, pq = p.sum((3, 4)), p.sum((2, 4)), p.sum((2, 3))
    outer = pk[..., :, None, None] * pp[..., None, :, None] * pq[..., None, None, :]
    torch.testing.assert_close(p, outer, atol=1e-6, rtol=0)
    assert pk.std() > 0 and pp.std() > 0 and pq.std() > 0
    torch.manual_seed(0)
    joint = SOLPolicy(H, E, len(space), d_model=32, n_heads=4, action_dim=8, max_len=16).eval()
    with torch.no_grad():
        pj = joint(h, e, s, prev).softmax(-1).view(T, B, 3, 2, 3).double()
    outer_j = pj.sum((3, 4))[..., :, None, None] * pj.sum((2, 4))[..., None, :, None] * pj.sum((2, 3))[..., None, None, :]
    assert (pj - outer_j).abs().max() > 1e-4


def test_from_config_factorised_head() -> None:
    from utils.actions import ActionSpace
    cfg = Config()
    cfg.policy_d_model, cfg.policy_n_heads, cfg.policy_head = 32, 4, "factorised"
    space = ActionSpace.build([0.5, 1.0], ["s40", "s100"], ["q16"])
    pol = SOLPolicy.from_config(cfg, H, E, space)
    assert pol.pi.out_features == 5 and pol.budget_head[-1].out_features == 5
    with pytest.raises(ValueError, match="factorised"):
        SOLPolicy.from_config(cfg, H, E, A)
    with pytest.raises(ValueError, match="level_map"):
        SOLPolicy(H, E, A, d_model=32, n_heads=4, level_map=torch.ones(A + 1, 3))


def test_level_indices_invert_index() -> None:
    from utils.actions import ActionSpace
    space = ActionSpace.build([0.1, 0.6, 1.0], ["s40", "s100"], ["q5", "q7", "q16"])
    lv = space.level_indices()
    for a in range(len(space)):
        i_k, i_p, i_q = lv[a].tolist()
        assert space.index(space.keep_values[i_k], space.prune_values[i_p], space.bit_values[i_q]) == a


def _contrast_space():
    from utils.actions import ActionSpace
    return ActionSpace.build([0.1, 0.6, 1.0], ["s40", "s80", "s100"], ["q5", "q16"])


def test_one_axis_contrast_rows_differ_on_one_axis_only() -> None:
    # every group of K rows whose logits are alike shares all levels but (at most) one axis, and each axis with
    # more than one level is the varying one in about a third of the groups
    from utils.schedulers import sample_one_axis_contrast
    space, K, G = _contrast_space(), 8, 3000
    lv = space.level_indices()
    logits = torch.randn(G, 1, len(space), generator=torch.Generator().manual_seed(3)).expand(G, K, -1).reshape(G * K, -1)
    a = sample_one_axis_contrast(logits, lv, K, torch.Generator().manual_seed(4))
    levels = lv[a].view(G, K, 3)
    varying = (levels != levels[:, :1]).any(1)  # [G, 3]
    assert int(varying.sum(-1).max()) == 1
    share = varying.float().mean(0)  # a group can also draw the same level K times (no axis varies)
    assert all(0.2 < float(s) < 0.34 for s in share)


def test_one_axis_contrast_restricted_to_some_axes() -> None:
    # axes=[0, 2]: with alike logits in a group, the ρ level is shared by every row of every group (ρ is never the
    # drawn axis), while κ and bits each vary in about half the groups
    from utils.schedulers import sample_one_axis_contrast
    space, K, G = _contrast_space(), 8, 3000
    lv = space.level_indices()
    logits = torch.randn(G, 1, len(space), generator=torch.Generator().manual_seed(13)).expand(G, K, -1).reshape(G * K, -1)
    a = sample_one_axis_contrast(logits, lv, K, torch.Generator().manual_seed(14), axes=[0, 2])
    levels = lv[a].view(G, K, 3)
    varying = (levels != levels[:, :1]).any(1)  # [G, 3]
    assert not bool(varying[:, 1].any()) and int(varying.sum(-1).max()) == 1
    share = varying.float().mean(0)
    assert 0.3 < float(share[0]) < 0.5 and 0.3 < float(share[2]) < 0.5, share


def test_one_axis_contrast_is_an_exact_draw_per_row() -> None:
    # rows of a group with DIFFERENT logits: each row position's empirical action frequencies over many groups
    # match its own softmax (the coupling changes the joint law of the rows, not any row's law)
    from utils.schedulers import sample_one_axis_contrast
    space, K, G = _contrast_space(), 4, 40000
    lv = space.level_indices()
    per_row = torch.randn(K, len(space), generator=torch.Generator().manual_seed(5)) * 1.5
    a = sample_one_axis_contrast(per_row.repeat(G, 1), lv, K, torch.Generator().manual_seed(6)).view(G, K)
    for k in range(K):
        freq = torch.bincount(a[:, k], minlength=len(space)).double() / G
        p = torch.softmax(per_row[k].double(), -1)
        assert (freq - p).abs().max() < 4.5 * (p * (1 - p) / G).sqrt().max()
    # and the coupling is real: with alike (not equal) logits, rows 0 and 1 share their levels on the two undrawn
    # axes far more often than independent draws from the same logits would
    near = per_row[:1] + 0.2 * torch.randn(K, len(space), generator=torch.Generator().manual_seed(7))
    b = sample_one_axis_contrast(near.repeat(G, 1), lv, K, torch.Generator().manual_seed(8)).view(G, K)
    same = float(((lv[b[:, 0]] == lv[b[:, 1]]).sum(-1) >= 2).double().mean())
    p0, p1 = torch.softmax(near[0], -1), torch.softmax(near[1], -1)
    indep = sum(float(p0[i] * p1[j]) for i in range(len(space)) for j in range(len(space))
                if int((lv[i] == lv[j]).sum()) >= 2)
    assert same > 0.9 and same > indep + 0.2


def test_one_axis_contrast_single_axis_and_checks() -> None:
    from utils.actions import ActionSpace
    from utils.schedulers import PolicyScheduler, sample_one_axis_contrast
    space = ActionSpace.build([1.0], ["s40", "s100"], ["q16"])  # one varying axis: independent draws per row
    logits = torch.zeros(6, len(space))
    a = sample_one_axis_contrast(logits, space.level_indices(), 3, torch.Generator().manual_seed(0))
    assert a.shape == (6,) and int(a.max()) < len(space)
    with pytest.raises(ValueError, match="groups"):
        sample_one_axis_contrast(logits, space.level_indices(), 4)
    with pytest.raises(ValueError, match="contrast"):
        PolicyScheduler(_policy(), greedy=False, contrast="bad")
    with pytest.raises(ValueError, match="action space"):
        PolicyScheduler(_policy(), greedy=False, contrast="one_axis")


def test_scheduler_episode_logp_equals_the_full_forward(tmp_path) -> None:
    """A recorded PolicyScheduler episode (budget terms computed once at start, knob table, feedback and
    logit bound on, K rollouts per input) gives, at every step, the log-probabilities that the full-sequence
    forward (the loss's path, budget terms recomputed per step) gives on the recorded inputs."""
    import numpy as np

    from utils.config import load_config
    from utils.data import load_blocks
    from utils.engine import run_episode
    from utils.lm import ControlledLM
    from utils.model import load_lm

    cfg = load_config("official_configs/tiny.yml", [f"block_cache_dir={tmp_path}"])
    model, tok = load_lm(cfg.model_name, "float32", "cpu")
    lm = ControlledLM.from_config(cfg, model, tok)
    torch.manual_seed(3)
    pol = SOLPolicy(lm.hidden_size, lm.hidden_size, len(lm.actions), d_model=32, n_heads=4, mlp_ratio=2,
                    action_dim=8, max_len=64, scalar_dim=10, budget_feedback_gain=5.0,
                    action_usage=lm.actions.nominal_usage(), logit_bound=2.0).eval()
    grid = torch.tensor([[0.2, 0.3, 0.4], [0.9, 0.95, 0.97]])
    pol.set_knob_table(grid, torch.tensor([[3.0, -2.0, 1.0], [-1.0, 4.0, 0.5]]))
    from utils.schedulers import PolicyScheduler

    sched = PolicyScheduler(pol, 1.3, greedy=False, generator=torch.Generator().manual_seed(2), record=True)
    blocks = torch.from_numpy(np.asarray(load_blocks(cfg, tok, "train")[:2], dtype=np.int64))
    with torch.no_grad():
        run_episode(lm, blocks, sched, torch.tensor([[0.5, 0.6, 0.5], [0.8, 0.4, 0.9]]), cfg.context_len,
                    group_size=3)
        tr = sched.trace()
        full = torch.log_softmax(pol(tr.h, tr.e, tr.scalars, tr.prev_actions, 1.3), -1)
    want = full.gather(-1, tr.actions[..., None])[..., 0]
    assert torch.allclose(tr.logp_old, want, atol=1e-5)


def test_bracket_levels_allow_only_the_fixed_baselines_two_levels_per_axis() -> None:
    # the allowed actions are exactly those whose every axis level is one of the two neighbours that
    # utils.baselines.bracket (the fixed baseline's rule) gives for the request, on or off the grid
    from utils.actions import ActionSpace
    from utils.baselines import axis_levels, bracket
    space = ActionSpace.build([0.1, 0.6, 1.0], ["s40", "s80", "s100"], ["q5", "q7", "q16"])
    pol = SOLPolicy(H, E, len(space), d_model=32, n_heads=4, action_dim=8, max_len=16,
                    action_usage=space.nominal_usage(), level_map=space.level_map(), bracket_levels=True).eval()
    g = torch.Generator().manual_seed(3)
    budgets = torch.cat([torch.rand(40, 3, generator=g, dtype=torch.float64), torch.tensor(
        [[0.6, 0.8, 7 / 16], [0.05, 1.0, 1.0], [0.2, 0.5, 6 / 16], [0.65, 0.8, 10 / 16]], dtype=torch.float64)])
    term = pol.bracket_term(budgets.float())
    assert term.shape == (len(budgets), len(space))
    lv = space.level_indices()
    for n, b in enumerate(budgets):
        ok = torch.ones(len(space), dtype=torch.bool)
        for ax, (levels, pos) in enumerate(axis_levels(space)):
            lo, hi, _ = bracket(levels, b[ax:ax + 1])
            ok &= (lv[:, ax] == pos[lo]) | (lv[:, ax] == pos[hi])
        assert torch.equal(term[n] == 0, ok), n
        assert bool((term[n][~ok] <= -1e4).all())
    # a request on a level allows that level only: 0.65 / 0.8 / 10 bits -> κ {0.6, 1} x s80 x {7, 16}
    allowed = [space.tags[a] for a in (term[-1] == 0).nonzero().flatten().tolist()]
    assert allowed == ["k060-s080-q7", "k060-s080-q16", "k100-s080-q7", "k100-s080-q16"]
    # greedy steps never leave the bracket, whatever the network prefers; off, the logits are unchanged
    h, e = torch.randn(T, 2, H, generator=g), torch.randn(T, 2, E, generator=g)
    s = torch.rand(T, 2, N_SCALARS, generator=g)
    s[..., 2:5] = budgets[-2:].float()  # StepScalars.BUDGETS
    with torch.no_grad():
        pol.pi.bias.normal_(generator=g)
        prev = torch.full((T, 2), len(space))
        masked = pol(h, e, s, prev)
        pol.bracket_levels = False
        free = pol(h, e, s, prev)
    chosen = masked.argmax(-1)
    assert bool((term[-2:].gather(1, chosen.T) == 0).all())
    torch.testing.assert_close(masked, free + term[-2:], atol=1e-3, rtol=0)
    assert bool((free.argmax(-1) != chosen).any())  # the mask did bind somewhere


def test_bracket_levels_from_config_and_cli_override() -> None:
    import argparse

    from utils.actions import ActionSpace
    from utils.cli import add_checkpoint_flags, checkpoint_overrides
    cfg = Config()
    cfg.policy_d_model, cfg.policy_n_heads, cfg.policy_bracket_levels = 32, 4, True
    space = ActionSpace.build([0.5, 1.0], ["s40", "s100"], ["q16"])
    assert SOLPolicy.from_config(cfg, H, E, space).bracket_levels
    with pytest.raises(ValueError, match="bracket_levels"):
        SOLPolicy(H, E, A, d_model=32, n_heads=4, bracket_levels=True)  # no action usage to bracket
    p = argparse.ArgumentParser()
    add_checkpoint_flags(p)
    for flag, want in ((["--policy_bracket_levels", "on"], True), (["--policy_bracket_levels", "off"], False),
                       ([], None)):
        a = p.parse_args(["--ckpt_dir", "x", *flag])
        assert checkpoint_overrides(a)["policy_bracket_levels"] is want
