"""The SOL policy's batch-1 float32 decode step as one native call (utils/csrc/policy_step.cpp), for the gathered
execution.

In generation the policy steps between two LM steps, whose weight stream has evicted everything it touches, so its
~40 ATen ops each pay cold caches on top of their dispatch: ~1.6 ms a step, about three times the time its ~15 MB
of weights take to read (results/bench_gathered, part S). `enable(policy)` (called by the gathered execution's
policy layout, `utils.checkpoint._layout_policy`) makes `SOLPolicy.step` run one row's observation embedding,
blocks and `pi(ln_f(x))` in one call; the budget terms after it stay in Python (`SOLPolicy._head_terms`). The keys
and values go into buffers with spare room (`PolicyKV`), appended in place while the state is the newest of its
chain, and `past_k` / `past_v` stay views of them, so every other use of the state is unchanged. Anything else
(batches, gradients, training, bf16, an ablated input, no native kernel) takes the module path; both agree to
float rounding (tests/test_fast_policy.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from utils import native
from utils.policy import PolicyState, SOLPolicy

CAP_STEP = 64  # buffer capacities are multiples of this


@dataclass
class PolicyKV:
    """Per block, key and value buffers [n_heads, capacity, d_head], and `filled`: a one-element list (shared by
    every state of the chain) holding how many steps they hold; a state may append in place only if its
    `step_idx` equals it (it is the newest state), otherwise its step copies into fresh buffers."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    filled: list[int]


def enable(policy: SOLPolicy) -> None:
    """Route `policy.step` for one float32 row on a CPU through the native step (its Linear layers must already be
    laid out input-major, `utils.gathered.gemv_linear`)."""
    policy._sol_fast_step = native_step


def _spec(policy: SOLPolicy) -> tuple[list[torch.Tensor], float] | None:
    """(the weights in `policy_step`'s order, the LayerNorms' eps), or None when the native step cannot run this
    policy (a Linear not laid out, another dtype or device, an ablated input, unequal eps). Cached on the policy."""
    spec = getattr(policy, "_sol_native_policy", None)
    if spec is not None:
        return spec or None
    sp_lin, sp_ln = policy.scalar_proj[0], policy.scalar_proj[2]
    linears = [sp_lin, policy.obs_proj, policy.pi] + [m for blk in policy.blocks
                                                      for m in (blk.q, blk.k, blk.v, blk.o, blk.ffn[0], blk.ffn[2])]
    norms = [sp_ln, policy.ln_f] + [m for blk in policy.blocks for m in (blk.ln1, blk.ln2)]
    ok = (policy.use_hidden and policy.use_token and all(hasattr(m, "_sol_w") for m in linears)
          and all(isinstance(blk.ffn[1], nn.GELU) and blk.ffn[1].approximate == "none" for blk in policy.blocks)
          and isinstance(policy.scalar_proj[1], nn.GELU) and policy.scalar_proj[1].approximate == "none"
          and len({m.eps for m in norms}) == 1 and all(m.elementwise_affine and m.bias is not None for m in norms))
    w: list[torch.Tensor] = []
    if ok:
        w = [sp_lin._sol_w, sp_lin.bias, sp_ln.weight, sp_ln.bias, policy.action_emb.weight, policy.obs_proj._sol_w,
             policy.obs_proj.bias, policy.pos_emb.weight]
        for blk in policy.blocks:
            w += [blk.ln1.weight, blk.ln1.bias, blk.q._sol_w, blk.k._sol_w, blk.v._sol_w, blk.o._sol_w, blk.ln2.weight,
                  blk.ln2.bias, blk.ffn[0]._sol_w, blk.ffn[0].bias, blk.ffn[2]._sol_w, blk.ffn[2].bias]
        w += [policy.ln_f.weight, policy.ln_f.bias, policy.pi._sol_w, policy.pi.bias]
        ok = all(t is not None and t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous()
                 for t in w) and not any(b.q.bias is not None or b.k.bias is not None or b.v.bias is not None
                                         or b.o.bias is not None for b in policy.blocks)
    policy._sol_native_policy = (w, float(norms[0].eps)) if ok else False
    return policy._sol_native_policy or None


def _buffers(policy: SOLPolicy, state: PolicyState) -> PolicyKV:
    """The state's key/value buffers with room for step `state.step_idx`: its own while it is the newest of its chain
    and they have room, else fresh ones holding its keys and values."""
    t, buf = state.step_idx, state.kv_buffers
    if isinstance(buf, PolicyKV) and buf.filled[0] == t and buf.k[0].shape[1] > t:
        return buf
    cap = min(policy.max_len, -(-2 * (t + 1) // CAP_STEP) * CAP_STEP)
    d_head = policy.d_model // policy.n_heads
    new = PolicyKV([], [], [t])
    for past, dst in ((state.past_k, new.k), (state.past_v, new.v)):
        for p in past:
            b = torch.empty(policy.n_heads, cap, d_head, dtype=torch.float32)
            b[:, :t] = p[0]
            dst.append(b)
    return new


def native_step(policy: SOLPolicy, h: torch.Tensor, e: torch.Tensor, scalars: torch.Tensor,
                state: PolicyState) -> tuple[torch.Tensor, PolicyState] | None:
    """(pi(ln_f(x)) [1, n_out], the advanced state but for n_eff) of one row's decode step in one native call, or
    None when it cannot run here (then `SOLPolicy.step` runs its modules)."""
    if (h.shape[0] != 1 or policy.training or torch.is_grad_enabled() or h.device.type != "cpu"
            or h.dtype != torch.float32 or e.dtype != torch.float32):
        return None
    spec = _spec(policy)
    kernel = native.gather_kernel() if spec is not None else None
    if kernel is None:
        return None
    w, eps = spec
    buf = _buffers(policy, state)
    t = state.step_idx
    out = kernel.policy_step(h[0].contiguous(), e[0].contiguous(), scalars[0].float().contiguous(), state.last_action,
                             t, w, policy.n_heads, eps, buf.k, buf.v)
    buf.filled[0] = t + 1
    past_k = [k.narrow(1, 0, t + 1)[None] for k in buf.k]
    past_v = [v.narrow(1, 0, t + 1)[None] for v in buf.v]
    return out[None], PolicyState(past_k, past_v, t + 1, state.last_action, state.n_eff, buf)
