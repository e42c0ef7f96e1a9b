"""The policy's one-call native step (utils/fast_policy.py, utils/csrc/policy_step.cpp) against its module path."""
import copy

import pytest
import torch

from utils import fast_policy, native
from utils.checkpoint import _layout_policy
from utils.policy import SOLPolicy
from utils.records import StepScalars

pytestmark = pytest.mark.skipif(native.gather_kernel() is None, reason="native kernel not built")


def _pair(n_layers: int, scalar_dim: int, **kw) -> tuple[SOLPolicy, SOLPolicy]:
    """A random policy (its head not shrunk, so the logits carry the whole network) and a gathered copy."""
    torch.manual_seed(7)
    ref = SOLPolicy(24, 20, 5, d_model=32, n_heads=4, n_layers=n_layers, mlp_ratio=3, action_dim=8, max_len=256,
                    scalar_dim=scalar_dim, **kw).eval()
    fast = copy.deepcopy(ref)
    _layout_policy(fast)
    return ref, fast


def _run(pol: SOLPolicy, xs, steps: int, branch_at: int | None = None):
    """Logits of `steps` greedy steps fed xs[t]; with branch_at, the state before that step is stepped twice more
    afterwards (a second continuation of an older state)."""
    state, out, saved = pol.init_state(1), [], None
    with torch.inference_mode():
        for t in range(steps):
            if t == branch_at:
                saved = state
            lg, state = pol.step(*xs[t], state)
            state = state.with_action(lg.argmax(-1))
            out.append(lg)
        if saved is not None:
            for t in range(branch_at, branch_at + 2):
                lg, saved = pol.step(*xs[t + 1], saved)
                saved = saved.with_action((lg.argmax(-1) + 1) % pol.n_actions)
                out.append(lg)
    return torch.cat(out), state


@pytest.mark.parametrize("n_layers,scalar_dim", [(1, 10), (2, 8)])
def test_native_policy_step_matches_modules(n_layers, scalar_dim):
    """Logits of 200 steps (the key/value buffers outgrow their capacity twice: 64, 192, then max_len), and of an older
    state stepped again after later steps were taken from it (its buffers are copied, not overwritten), agree with
    the module path to float rounding; the native step ran at every step, and not for a batch of 2."""
    ref, fast = _pair(n_layers, scalar_dim, budget_feedback_gain=0.5, logit_bound=2.0,
                      action_usage=torch.rand(5, 3, generator=torch.Generator().manual_seed(1)))
    g = torch.Generator().manual_seed(3)
    xs = [(torch.randn(1, 24, generator=g), torch.randn(1, 20, generator=g),
           torch.rand(1, StepScalars.DIM, generator=g)) for _ in range(202)]
    calls = []
    real = fast_policy.native_step

    def counted(*a):
        out = real(*a)
        calls.append(out is not None)
        return out

    fast._sol_fast_step = counted
    a, sa = _run(ref, xs, 200, branch_at=40)
    b, sb = _run(fast, xs, 200, branch_at=40)
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    assert len(calls) == 202 and all(calls)
    assert sb.step_idx == 200 and sb.kv_buffers.k[0].shape[1] == 256  # 64 -> 192 -> max_len
    for pk, qk in zip(sa.past_k + sa.past_v, sb.past_k + sb.past_v):
        torch.testing.assert_close(qk, pk, atol=1e-5, rtol=1e-5)
    calls.clear()
    with torch.inference_mode():
        fast.step(torch.randn(2, 24), torch.randn(2, 20), torch.rand(2, StepScalars.DIM), fast.init_state(2))
    assert calls == [False]


def test_native_policy_step_declines():
    """An ablated input or gradients enabled take the module path (native_step returns None)."""
    _, fast = _pair(1, 10)
    h, e, s = torch.randn(1, 24), torch.randn(1, 20), torch.rand(1, StepScalars.DIM)
    with torch.inference_mode():
        assert fast_policy.native_step(fast, h, e, s, fast.init_state(1)) is not None
    assert fast_policy.native_step(fast, h, e, s, fast.init_state(1)) is None  # grad enabled
    fast.use_token, fast._sol_native_policy = False, None
    with torch.inference_mode():
        assert fast_policy.native_step(fast, h, e, s, fast.init_state(1)) is None
