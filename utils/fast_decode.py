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
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import rotate_half

from utils.gathered import dense_gemv, gathered_mlp_forward, input_major


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
