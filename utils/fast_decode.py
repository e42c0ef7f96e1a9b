"""The gathered execution's decode step without the Hugging Face module stack.

At batch 1 on a CPU a SmolLM2 decode step through `LlamaModel.forward` spends over 40% of its time outside the
weight products: module calls, RMSNorm as seven ATen ops, three separate q/k/v products, mask building and
reshapes (docs/usage.md, "What limits end to end at batch 1"). Those costs are the same for a dense and a pruned
step, so they cap what skipping work can buy. `decode_hidden` runs the same layers for one token per row with
fewer, larger ops: `F.rms_norm`, one q/k/v product over weights laid out side by side once (`layout_attention`),
the model's own rotary embedding applied to q and k in one pass, the cache's own `update`, the controlled attention
exactly as the Hugging Face layers call it (the model's registered attention function), and the gathered MLP
(`gathered.gathered_mlp_forward`) followed by the controls' MLP-output quantization, called directly rather than
through the module and its hooks. Every weight (q/k/v, o, gate/up, down, the LM head) is laid out input-major
(`gathered.input_major`) and each batch-1 float32 product runs the native every-row loop (`gathered.dense_gemv`),
which on the 2-core CPU reads most of them 1.6-3.5x faster than `F.linear` does (benchmarks/bench_layout.py). Same math,
so the same logits to float rounding (tests/test_gathered.py); only the gathered execution uses it, for decode steps
(one token per row, no mask).

At batch 1 in float32 a step whose action allows it (`Controls.native_plan`) goes further: `_native_step` runs every
layer in one C++ call (utils/csrc/decode_step.cpp), which removes the per-op dispatch that was still ~12 of ~36 ms
of a dense step here (results/bench_gathered/step_parts.py); `decode_hidden` below it is the path for everything else.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import rotate_half

from utils import native
from utils.gathered import dense_gemv, gathered_mlp_forward, input_major

# The one-call native step for batch-1 float32 steps (`_native_step`); SOL_NATIVE_DECODE=0 keeps the per-layer ops.
NATIVE_STEP = os.environ.get("SOL_NATIVE_DECODE", "1") != "0"
MLP_INPUT_HOOK = None  # tests: called with each native step's MLP inputs [layers, H] (the per-layer path's x)


def layout_attention(attn: nn.Module) -> None:
    """Lay q_proj, k_proj and v_proj out once as one input-major [H, Nq + 2 Nkv] weight `_sol_w_qkv` (bias
    `_sol_b_qkv` or None) and o_proj as `_sol_w_o` [Nq, H] (`_sol_b_o`); the Linear weights become views of them
    (no second copy), so every other use of the module is unchanged."""
    if hasattr(attn, "_sol_w_qkv"):
        return
    for name, linears in (("qkv", [attn.q_proj, attn.k_proj, attn.v_proj]), ("o", [attn.o_proj])):
        w, b = input_major(linears)
        attn.register_buffer(f"_sol_w_{name}", w, persistent=False)
        attn.register_buffer(f"_sol_b_{name}", b, persistent=False)


def layout_lm_head(model: nn.Module) -> None:
    """Lay the LM head out input-major ([H, V]; the largest matrix of a small model, read once per step). A tied
    input embedding is re-tied to the new view, so nothing is duplicated."""
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if getattr(head, "_sol_input_major", False):
        return
    tied = emb.weight is head.weight
    input_major([head])
    if tied:
        emb.weight = head.weight
    head._sol_input_major = True


def _rms(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """LlamaRMSNorm: normalised in float32, cast back, then scaled (its exact order of operations); one op in
    float32, where the cast is a no-op."""
    if x.dtype == torch.float32 and norm.weight.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), norm.weight, eps=norm.variance_epsilon)
    return norm.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=norm.variance_epsilon).to(x.dtype)


@torch.inference_mode()
def decode_hidden(model: nn.Module, input_ids: torch.Tensor, cache) -> torch.Tensor:
    """Final-norm hidden states [B, 1, H] of one decode token per row (`input_ids` [B, 1]) on top of `cache`
    (which grows by that token), through every layer of the Llama `model` (a CausalLM laid out by
    `layout_attention` and `gathered.layout_mlp`), with the attention function the model has selected
    (`utils.controls` registers and selects its own), called as the Hugging Face layers call it."""
    hidden = _native_step(model, input_ids, cache)
    if hidden is not None:
        return hidden
    attention_fn = ALL_ATTENTION_FUNCTIONS[model.config._attn_implementation]
    m = model.model
    past = cache.get_seq_length()
    h = m.embed_tokens(input_ids)
    B = h.shape[0]
    cos, sin = m.rotary_emb(h, torch.full((1, 1), past, device=h.device, dtype=torch.long))
    cos, sin = cos[:, None], sin[:, None]  # [1, 1, 1, D]: broadcast over rows and heads
    for layer in m.layers:
        attn, mlp = layer.self_attn, layer.mlp
        D = attn.head_dim
        qkv = dense_gemv(_rms(layer.input_layernorm, h), attn._sol_w_qkv, attn._sol_b_qkv)
        nq = attn.q_proj.weight.shape[0]
        nkv = attn.k_proj.weight.shape[0]
        # q and k side by side: one rotation for both (the same elementwise ops as apply_rotary_pos_emb)
        qk = qkv[..., :nq + nkv].view(B, 1, -1, D).transpose(1, 2)
        qk = qk * cos + rotate_half(qk) * sin
        q, k = qk[:, :nq // D], qk[:, nq // D:]
        v = qkv[..., nq + nkv:].view(B, 1, -1, D).transpose(1, 2)
        k, v = cache.update(k, v, attn.layer_idx)
        o, _ = attention_fn(attn, q, k, v, None, scaling=attn.scaling)
        h = h + dense_gemv(o.reshape(B, 1, -1), attn._sol_w_o, attn._sol_b_o)
        h = h + mlp._sol_controls.quantize_output(gathered_mlp_forward(mlp, _rms(layer.post_attention_layernorm, h)))
    return _rms(m.norm, h)


def _native_spec(model: nn.Module) -> tuple | None:
    """(the six weights of every layer in order, the final norm's weight, eps, scaling) for the native step, or
    None when the model is not a float32 Llama it can run (another architecture, biases, another activation,
    mixed norms' eps).
    Cached on the model; rebuilt if its weights were replaced since."""
    m = model.model
    spec = getattr(model, "_sol_native_spec", None)
    if spec is not None and (spec is False or spec[0][1] is m.layers[0].self_attn._sol_w_qkv):
        return spec or None
    weights, eps, scaling = [], set(), set()
    ok = getattr(model.config, "model_type", None) == "llama" and getattr(model.config, "hidden_act", None) == "silu"
    ok = ok and "dynamic" not in getattr(m.rotary_emb, "rope_type", "default")  # static frequencies: `_rope_tables`
    for layer in m.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if not hasattr(mlp, "_sol_w_in") or any(
                getattr(mod, b) is not None for mod, b in ((attn, "_sol_b_qkv"), (attn, "_sol_b_o"),
                                                           (mlp, "_sol_b_in"), (mlp, "_sol_b_down"))):
            ok = False
            break
        weights += [layer.input_layernorm.weight, attn._sol_w_qkv, attn._sol_w_o, layer.post_attention_layernorm.weight,
                    mlp._sol_w_in, mlp._sol_w_down]
        eps |= {layer.input_layernorm.variance_epsilon, layer.post_attention_layernorm.variance_epsilon}
        scaling.add(attn.scaling)
    eps.add(m.norm.variance_epsilon)
    ok = ok and len(eps) == 1 and len(scaling) == 1 and all(
        w.dtype == torch.float32 and w.device.type == "cpu" and w.is_contiguous() for w in weights + [m.norm.weight])
    model._sol_native_spec = (weights, m.norm.weight, eps.pop(), scaling.pop()) if ok else False
    return model._sol_native_spec or None


def _rope_tables(model: nn.Module, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotary embedding's cos and sin of positions 0 .. at least n-1, [positions, head_dim] each, computed by
    the model's own `rotary_emb` for all positions at once and cached on the model (doubled when outgrown), so a
    native step reads its row instead of running the module."""
    tab = getattr(model, "_sol_rope", None)
    if tab is None or tab[0].shape[0] < n:
        m, size = model.model, max(2 * n, 1024)
        x = torch.zeros(1, 1, model.config.hidden_size, dtype=torch.float32, device=m.embed_tokens.weight.device)
        cos, sin = m.rotary_emb(x, torch.arange(size, device=x.device)[None])
        tab = model._sol_rope = (cos[0].contiguous(), sin[0].contiguous())
    return tab


def _native_step(model: nn.Module, input_ids: torch.Tensor, cache) -> torch.Tensor | None:
    """`decode_hidden` for one row in float32 on a CPU as one native call over every layer
    (utils/csrc/decode_step.cpp: the same math, no per-op dispatch), when the step's controls allow it
    (`Controls.native_plan`: dense, recency or QUEST attention, every or the top-|x| MLP input channels, any
    MLP-output bit-width) and the cache can take the token in place (`GrowableCache.next_slots`). None otherwise."""
    if not NATIVE_STEP or input_ids.shape[0] != 1 or input_ids.device.type != "cpu" or input_ids.dtype != torch.long:
        return None
    spec = _native_spec(model)
    kernel = native.gather_kernel() if spec is not None else None
    if kernel is None or not hasattr(cache, "next_slots"):
        return None
    m = model.model
    ctl = m.layers[0].mlp._sol_controls
    plan = ctl.native_plan(model.config.hidden_size, input_ids.device)
    if plan is None:
        return None
    past = cache.get_seq_length()
    slots = cache.next_slots()
    if slots is None:
        return None
    pages = [layer.page_buffer(ctl.page_size) for layer in cache.layers] if plan[2] else []
    weights, final_norm, eps, scaling = spec
    cos, sin = _rope_tables(model, past + 1)
    h = torch.empty(model.config.hidden_size, dtype=torch.float32)
    n_heads, n_kv = model.config.num_attention_heads, model.config.num_key_value_heads
    record = None if MLP_INPUT_HOOK is None else h.new_empty(len(m.layers), h.shape[0])
    stats = kernel.decode_layers(h, m.embed_tokens.weight, input_ids, weights, slots, final_norm, cos, sin, past,
                                 n_heads, n_kv, eps, scaling, plan[0], ctl.Ts, plan[1],
                                 ctl.page_size if plan[2] else 0, plan[2], ctl.quest_tier == "per_kv_head",
                                 *((ctl.Ts, ctl.Tw + 1) if ctl.quest_keep_sink_window else (0, 0)), pages, plan[3],
                                 record)
    cache.advance()
    ctl.native_done(len(m.layers), n_heads, plan, stats)
    if record is not None:
        MLP_INPUT_HOOK(record)
    return h.view(1, 1, -1)
