"""Tests of utils/runtime.py: streaming scoring / generation with dense episode replay, on the tiny Llama."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from utils.engine import Scheduler
from utils.runtime import (PrefixMemo, RuntimeInputError, StreamStats, UsageTracker, dense_token_logprobs,
                           generate, make_scheduler, sample_next, score_continuation, score_continuations,
                           score_rows)
from utils.schedulers import DenseScheduler

ATOL = 1e-4


@pytest.fixture(scope="module")
def tiny(tiny_lm_with_ref):
    cfg, lm, ref, policy = tiny_lm_with_ref
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 5000, (40,), generator=g).tolist()
    return cfg, lm, ref, policy, ids


def plain_logprobs(ref, ctx, cont):
    """log p(cont_i | ctx, cont_<i) from one forward of the plain model."""
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logits = ref(ids).logits[0, len(ctx) - 1: -1].float()
    return F.log_softmax(logits, -1).gather(-1, torch.tensor(cont)[:, None])[:, 0]


class Spy(Scheduler):
    """Wraps a scheduler and records starts and observations."""

    def __init__(self, inner):
        self.inner, self.starts, self.obs = inner, 0, []

    def start(self, lm, budgets, group_size):
        super().start(lm, budgets, group_size)
        self.starts += 1
        self.inner.start(lm, budgets, group_size)

    def choose(self, obs):
        self.obs.append(obs)
        return self.inner.choose(obs)

    def observe(self, out):
        self.inner.observe(out)


@pytest.mark.parametrize("episode_len", [3, 5, 100])
@pytest.mark.parametrize("kind", ["dense", "plain"])
def test_dense_scoring_equals_plain_model(tiny, episode_len, kind):
    _, lm, ref, _, ids = tiny
    ctx, cont = ids[:15], ids[15:32]  # 17 continuation tokens: crosses episode boundaries for E = 3, 5
    sched = make_scheduler(kind, lm)
    logp, greedy, stats = score_continuation(lm, sched, ctx, cont, (0.5, 0.5, 0.5), episode_len)
    expected = plain_logprobs(ref, ctx, cont)
    assert math.isclose(logp, float(expected.sum()), abs_tol=ATOL)
    torch.testing.assert_close(torch.tensor(stats.logp), expected, atol=ATOL, rtol=0)
    assert stats.n_steps == len(cont)
    assert not greedy  # random tokens are not the argmax of a random model
    if kind == "dense":
        assert stats.n_eff == len(cont) and set(stats.keep) == {1.0} and set(stats.qratio) == {1.0}


def test_single_token_context_and_greedy_flag(tiny):
    _, lm, ref, _, ids = tiny
    # a continuation made of the model's own greedy tokens is greedy
    ctx = ids[:1]
    out, _ = generate(lm, None, ctx, 6, (1, 1, 1), 4)
    logp, greedy, stats = score_continuation(lm, DenseScheduler(), ctx, out, (1, 1, 1), 4)
    assert greedy
    assert math.isclose(logp, float(plain_logprobs(ref, ctx, out).sum()), abs_tol=ATOL)
    assert stats.kv_len == list(range(1, 7))


def test_refresh_every_episode_len_steps(tiny, monkeypatch):
    _, lm, _, policy, ids = tiny
    ctx, cont = ids[:12], ids[12:35]  # 23 steps
    E = 5
    replays = []
    real_prefill = lm.prefill

    def counting_prefill(input_ids, cache=None):
        if cache is not None:
            replays.append((cache.get_seq_length(), input_ids.shape[1]))
        return real_prefill(input_ids, cache=cache)

    monkeypatch.setattr(lm, "prefill", counting_prefill)
    spy = Spy(make_scheduler("policy", lm, policy))
    _, _, stats = score_continuation(lm, spy, ctx, cont, (0.3, 0.6, 0.5), E)
    assert stats.refresh_steps == [5, 10, 15, 20]
    # each replay restores the pre-episode dense cache and re-runs exactly that episode's E input tokens
    assert replays == [(len(ctx) - 1 + i - E, E) for i in (5, 10, 15, 20)]
    assert spy.starts == 5 == stats.n_episodes
    # scalars: t_frac = (t + 1) / E within each episode, running deviations reset at each episode start
    ts = [o.t for o in spy.obs]
    assert ts == [i % E for i in range(len(cont))]
    for i, o in enumerate(spy.obs):
        assert o.T == E
        assert math.isclose(float(o.scalars[0, 0]), (i % E + 1) / E, rel_tol=1e-6)
        torch.testing.assert_close(o.scalars[0, 2:5], torch.tensor([0.3, 0.6, 0.5]))
        if i % E == 0:
            assert torch.all(o.scalars[0, 5:8] == 0)
        # the LM-derived columns: surprisal of the input token and entropy of its distribution, nats / 10
        logp = torch.log_softmax(o.prev_logits[0].double(), -1)
        assert math.isclose(float(o.scalars[0, 8]), -float(logp[o.input_ids[0]]) / 10, rel_tol=1e-4)
        assert math.isclose(float(o.scalars[0, 9]), -float((logp.exp() * logp).sum()) / 10, rel_tol=1e-4)


def test_policy_scoring_consistent(tiny):
    _, lm, ref, policy, ids = tiny
    ctx, cont = ids[:20], ids[20:38]
    sched = make_scheduler("policy", lm, policy, policy_temperature=0.6)
    logp, _, stats = score_continuation(lm, sched, ctx, cont, (0.25, 0.5, 0.25), 6)
    assert math.isfinite(logp) and math.isclose(logp, sum(stats.logp), rel_tol=1e-9)
    assert stats.refresh_steps == [6, 12]
    assert all(0 <= a < len(lm.actions) for a in stats.actions)
    # the context is never truncated: kv length grows by one per step across episode boundaries
    assert stats.kv_len == [len(ctx) + i for i in range(len(cont))]
    # deterministic (greedy actions): the same call gives the same score
    logp2, _, _ = score_continuation(lm, make_scheduler("policy", lm, policy, policy_temperature=0.6),
                                     ctx, cont, (0.25, 0.5, 0.25), 6)
    assert logp == logp2


def test_fixed_scheduler_keeps_full_context(tiny):
    pytest.importorskip("utils.baselines")
    _, lm, ref, _, ids = tiny
    ctx, cont = ids[:16], ids[16:36]
    # dense targets: a fixed baseline that never sparsifies must reproduce the plain model exactly, which
    # it could not if the context were cut at episode boundaries (the reference kept ~15 tokens)
    fixed = make_scheduler("fixed", lm, fixed_targets=(1.0, 1.0, 1.0))
    logp, _, stats = score_continuation(lm, fixed, ctx, cont, (1, 1, 1), 4)
    assert math.isclose(logp, float(plain_logprobs(ref, ctx, cont).sum()), abs_tol=ATOL)
    assert stats.refresh_steps == [4, 8, 12, 16]
    assert stats.kv_len == [len(ctx) + i for i in range(len(cont))]
    # sparse targets: still the full context after every boundary, and the dither tracks the targets
    fixed = make_scheduler("fixed", lm, fixed_targets=(0.5, 0.75, 0.625))
    _, _, stats = score_continuation(lm, fixed, ctx, cont, (0.5, 0.75, 0.625), 4)
    assert stats.kv_len == [len(ctx) + i for i in range(len(cont))]
    tr = UsageTracker()
    tr.add(stats)
    k, p, q = tr.realised_nominal
    assert abs(k - 0.5) < 0.05 and abs(p - 0.75) < 0.05 and abs(q - 0.625) < 0.05


def test_prefix_memo_reuse_is_exact(tiny):
    _, lm, _, policy, ids = tiny
    memo = PrefixMemo()
    ctx = ids[:18]
    for cont in (ids[18:24], ids[24:33]):
        a = score_continuation(lm, make_scheduler("policy", lm, policy), ctx, cont, (0.3, 0.6, 0.5), 4, memo=memo)
        b = score_continuation(lm, make_scheduler("policy", lm, policy), ctx, cont, (0.3, 0.6, 0.5), 4)
        assert a[0] == pytest.approx(b[0], abs=1e-5) and a[2].actions == b[2].actions


@pytest.mark.parametrize("kind", ["policy", "dense"])
def test_batched_rows_equal_separate_calls(tiny, kind):
    """Rows never interact (exactly equal here; on larger models batched kernels add ~1e-5 float noise)."""
    _, lm, ref, policy, ids = tiny
    ctx = ids[:14]
    conts = [ids[14:25], ids[25:28], [], ids[28:40]]  # ragged, one empty, crossing episode boundaries (E = 4)
    budgets = (0.25, 0.5, 0.25)
    batched = score_continuations(lm, make_scheduler(kind, lm, policy), ctx, conts, budgets, 4)
    for cont, (logp, greedy, stats) in zip(conts, batched):
        one = score_continuation(lm, make_scheduler(kind, lm, policy), ctx, cont, budgets, 4)
        assert logp == pytest.approx(one[0], abs=ATOL) and greedy == one[1]
        assert stats.actions == one[2].actions and stats.kv_len == one[2].kv_len
        assert stats.refresh_steps == one[2].refresh_steps and stats.n_episodes == one[2].n_episodes
        torch.testing.assert_close(torch.tensor(stats.attn_keep), torch.tensor(one[2].attn_keep))
        if kind == "dense" and cont:
            assert logp == pytest.approx(float(plain_logprobs(ref, ctx, cont).sum()), abs=ATOL)
    assert batched[2][0] == 0.0 and batched[2][2].n_steps == 0


@pytest.mark.parametrize("kind", ["policy", "dense"])
def test_rows_with_different_contexts_equal_separate_calls(tiny, kind):
    """score_rows: rows after different contexts of one length (two rows share one), ragged continuations
    crossing episode boundaries; every row equals its own separate call, and no row sees another's context."""
    _, lm, ref, policy, ids = tiny
    ctxs = [ids[:12], ids[5:17], ids[:12], ids[20:32]]
    conts = [ids[12:21], ids[30:33], ids[33:40], ids[0:10]]
    budgets = (0.25, 0.5, 0.25)
    memo = PrefixMemo()
    batched = score_rows(lm, make_scheduler(kind, lm, policy), ctxs, conts, budgets, 4, memo=memo)
    assert len(memo.key) == 3  # three distinct contexts, one dense prefill row each
    for ctx, cont, (logp, greedy, stats) in zip(ctxs, conts, batched):
        one = score_continuation(lm, make_scheduler(kind, lm, policy), ctx, cont, budgets, 4)
        assert logp == pytest.approx(one[0], abs=ATOL) and greedy == one[1]
        assert stats.actions == one[2].actions and stats.refresh_steps == one[2].refresh_steps
        if kind == "dense":
            assert logp == pytest.approx(float(plain_logprobs(ref, ctx, cont).sum()), abs=ATOL)
    with pytest.raises(RuntimeInputError, match="same length"):
        score_rows(lm, None, [ids[:12], ids[:11]], [ids[12:14], ids[12:14]], budgets, 4)


def test_generate_greedy_dense_matches_argmax_loop(tiny):
    _, lm, ref, _, ids = tiny
    prompt = ids[:10]
    out, stats = generate(lm, DenseScheduler(), prompt, 9, (1, 1, 1), 4)
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(9):
            seq.append(int(ref(torch.tensor([seq])).logits[0, -1].argmax()))
    assert out == seq[10:]
    assert stats.refresh_steps == [4, 8] and stats.n_steps == 9
    torch.testing.assert_close(torch.tensor(stats.logp), dense_token_logprobs(lm, prompt, out), atol=ATOL, rtol=0)


def test_generate_stops(tiny):
    _, lm, _, policy, ids = tiny
    prompt = ids[:10]
    full, _ = generate(lm, None, prompt, 8, (1, 1, 1), 4)
    out, stats = generate(lm, None, prompt, 8, (1, 1, 1), 4, stop_ids=[full[2]])
    assert out == full[: full.index(full[2]) + 1]
    out, _ = generate(lm, None, prompt, 8, (1, 1, 1), 4, stop_fn=lambda g: len(g) >= 5)
    assert out == full[:5]
    g = torch.Generator().manual_seed(3)
    out, stats = generate(lm, make_scheduler("policy", lm, policy, greedy=False, seed=1), prompt, 7,
                          (0.25, 0.5, 0.25), 3, temperature=1.0, top_k=20, generator=g)
    assert len(out) == 7 and stats.refresh_steps == [3, 6]


def test_sample_next_filters():
    logits = torch.tensor([0.0, 3.0, 1.0, 2.0])
    assert sample_next(logits) == 1
    g = torch.Generator().manual_seed(0)
    assert {sample_next(logits, 1.0, top_k=1, generator=g) for _ in range(20)} == {1}
    assert {sample_next(logits, 1.0, top_p=0.5, generator=g) for _ in range(20)} == {1}
    assert {sample_next(logits, 5.0, top_k=2, generator=g) for _ in range(200)} == {1, 3}


def test_usage_tracker_aggregates_over_effective_steps():
    s = StreamStats(keep=[1.0, 0.5, 0.25], prune=[1.0, 0.5, 0.5], qratio=[1.0, 0.25, 0.5],
                    attn_keep=[1.0, 0.6, 0.3], channel_keep=[1.0, 0.5, 0.5], flops=[10.0, 6.0, 4.0],
                    dense_flops=[10.0, 10.0, 10.0], effective=[False, True, True], actions=[7, 1, 2],
                    kv_len=[3, 4, 5], logp=[-1.0, -1.0, -1.0], refresh_steps=[2], n_episodes=2)
    tr = UsageTracker(("a0", "a1", "a2", "a3", "a4", "a5", "a6", "a7"))
    tr.add(s)
    tr.add(s)
    out = tr.summary()
    assert out["n_steps"] == 6 and out["effective_steps"] == 4 and out["n_requests"] == 2
    assert out["keep_avg_eff"] == pytest.approx(0.375) and out["keep_avg_all"] == pytest.approx(1.75 / 3)
    assert out["prune_avg_eff"] == pytest.approx(0.5) and out["quant_ratio_avg_eff"] == pytest.approx(0.375)
    assert out["attn_keep_realised_eff"] == pytest.approx(0.45)
    assert out["flops_ratio"] == pytest.approx(20 / 30)
    assert out["action_hist"] == {"a1": 2, "a2": 2} and out["dense_refreshes"] == 2 and out["episodes"] == 4
    assert tr.realised_nominal == pytest.approx((0.375, 0.5, 0.375))
    assert UsageTracker().summary()["keep_avg_eff"] == 1.0  # nothing recorded: dense


def test_bad_inputs(tiny):
    _, lm, _, _, ids = tiny
    with pytest.raises(RuntimeInputError):
        score_continuation(lm, None, [], ids[:3], (1, 1, 1), 4)
    with pytest.raises(RuntimeInputError):
        score_continuation(lm, None, ids[:3], ids[3:6], (1, 1, 1), 0)
    with pytest.raises(RuntimeInputError):
        make_scheduler("nope", lm)


# ---------------------------------------------------------------------------------------------------------
# one decode loop: a teacher-forced episode and streaming scoring give the same numbers
# ---------------------------------------------------------------------------------------------------------

class _ReplayActions(Scheduler):
    """Takes actions[t] at step t (the same schedule for any driver of the loop)."""

    def __init__(self, actions: torch.Tensor) -> None:
        self.actions = actions

    def choose(self, obs):
        return self.actions[obs.t].expand(obs.input_ids.shape[0]).clone()


@pytest.mark.parametrize("kind", ["replay", "policy"])
def test_streaming_scoring_and_an_episode_share_the_decode_loop(tiny, kind):
    """The same block decoded by `run_episode` (C context tokens, T teacher-forced steps) and by streaming
    scoring (context = its first C + 1 tokens, continuation = the next T, episode_len = T) gives the same
    actions, per-token log-likelihoods and usage: both drive `engine.DecodeLoop`."""
    from utils.engine import run_episode
    from utils.schedulers import PolicyScheduler

    cfg, lm, _, policy, ids = tiny
    C, T = 12, 10
    block = torch.tensor(ids[: C + T + 1])
    budgets = torch.tensor([[0.5, 0.7, 0.5]])
    acts = torch.randint(0, len(lm.actions.tags), (T,), generator=torch.Generator().manual_seed(3))

    def make():
        return _ReplayActions(acts) if kind == "replay" else PolicyScheduler(policy, 0.6, greedy=True)

    with torch.no_grad():
        ep = run_episode(lm, block[None], make(), budgets, C)
    (logp, _, st), = score_continuations(lm, make(), block[: C + 1].tolist(), [block[C + 1:].tolist()],
                                         tuple(budgets[0].tolist()), episode_len=T)
    assert st.actions == ep.actions[:, 0].tolist()
    assert len(set(st.actions)) > 1  # a schedule that actually varies
    torch.testing.assert_close(torch.tensor(st.logp), ep.logp[:, 0].float(), atol=ATOL, rtol=0)
    assert math.isclose(logp, float(ep.logp.sum()), abs_tol=10 * ATOL)
    assert st.effective == ep.effective.tolist()
    for k in ("keep", "prune", "qratio", "channel_keep", "attn_keep"):
        torch.testing.assert_close(torch.tensor(getattr(st, k)), ep.usage[k][:, 0].float(), atol=1e-6, rtol=0)
