"""The gathered execution's decode step without the Hugging Face module stack.

At batch 1 on a CPU a SmolLM2 decode step through `LlamaModel.forward` spends over 40% of its time outside the
weight products: module calls, RMSNorm as seven ATen ops, three separate q/k/v products, mask building and
reshapes (docs/usage.md, "What limits end to end at batch 1"). Those costs are the same for a dense and a pruned
step, so they cap what skipping work can buy. `decode_hidden` runs the same layers for one token per row with
fewer, larger ops: `F.rms_norm`, one q/k/v product over weights laid out side by side once (`layout_qkv`; the
Linear weights become views of it), the model's own rotary embedding and `apply_rotary_pos_emb`, the cache's own
`update`, and the controlled attention and MLP exactly as the Hugging Face path calls them (the model's
registered attention function, the MLP module with its hooks). Same math, so the same logits to float rounding
(tests/test_gathered.py); only the gathered execution uses it, for decode steps (one token per row, no mask).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb


def layout_qkv(attn: nn.Module) -> None:
    """Lay q_proj, k_proj and v_proj out once as one [Nq + 2 Nkv, H] weight `_sol_w_qkv` (and bias `_sol_b_qkv`
    or None); the three Linear weights become row views of it (no second copy), so every other use of the module
    is unchanged."""
    if hasattr(attn, "_sol_w_qkv"):
        return
    projs = (attn.q_proj, attn.k_proj, attn.v_proj)
    with torch.no_grad():
        w = torch.cat([p.weight for p in projs], dim=0).contiguous()
        b = torch.cat([p.bias for p in projs]) if projs[0].bias is not None else None
        start = 0
        for p in projs:
            n = p.weight.shape[0]
            p.weight = nn.Parameter(w[start:start + n], requires_grad=False)
            if b is not None:
                p.bias = nn.Parameter(b[start:start + n], requires_grad=False)
            start += n
    attn.register_buffer("_sol_w_qkv", w, persistent=False)
    attn.register_buffer("_sol_b_qkv", b, persistent=False)


def _rms(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """LlamaRMSNorm in two ops: normalised in float32, cast back, then scaled (its exact order of operations)."""
    return norm.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=norm.variance_epsilon).to(x.dtype)


@torch.inference_mode()
def decode_hidden(model: nn.Module, input_ids: torch.Tensor, cache) -> torch.Tensor:
    """Final-norm hidden states [B, 1, H] of one decode token per row (`input_ids` [B, 1]) on top of `cache`
    (which grows by that token), through every layer of the Llama `model` (a CausalLM), with the attention
    function the model has selected (`utils.controls` registers and selects its own), called as the Hugging
    Face layers call it."""
    attention_fn = ALL_ATTENTION_FUNCTIONS[model.config._attn_implementation]
    m = model.model
    past = cache.get_seq_length()
    h = m.embed_tokens(input_ids)
    B = h.shape[0]
    cos, sin = m.rotary_emb(h, torch.full((1, 1), past, device=h.device, dtype=torch.long))
    for layer in m.layers:
        attn = layer.self_attn
        D = attn.head_dim
        qkv = F.linear(_rms(layer.input_layernorm, h), attn._sol_w_qkv, attn._sol_b_qkv)
        nq = attn.q_proj.weight.shape[0]
        nkv = attn.k_proj.weight.shape[0]
        q = qkv[..., :nq].view(B, 1, -1, D).transpose(1, 2)
        k = qkv[..., nq:nq + nkv].view(B, 1, -1, D).transpose(1, 2)
        v = qkv[..., nq + nkv:].view(B, 1, -1, D).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k, v = cache.update(k, v, attn.layer_idx)
        o, _ = attention_fn(attn, q, k, v, None, scaling=attn.scaling)
        h = h + attn.o_proj(o.reshape(B, 1, -1))
        h = h + layer.mlp(_rms(layer.post_attention_layernorm, h))
    return _rms(m.norm, h)
