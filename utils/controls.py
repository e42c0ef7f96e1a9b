"""Install per-row efficiency controls on a Hugging Face Llama through supported extension points.

* Attention: a function registered in transformers' `AttentionInterface` under the name "sol" (with the
  SDPA mask builder registered for the same name, otherwise the causal mask silently disappears). With
  controls cleared, or for multi-token calls (prefill, dense replay), it is exactly SDPA. For a controlled
  single-token decode step it computes QKᵀ once, masks the keys each row/head may not see and finishes
  with softmax·V, so relevancy ranks the very logits it then uses.
* MLP: a forward pre-hook prunes the MLP input channels, a forward hook fake-quantizes the MLP output.

One `Controls` object per model holds the per-row settings of the current step and accumulates the
realised usage (keys attended, channels kept) over layers, as tensors, without host syncs.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from utils.attention import CRITERIA, quest_keep, recency_keep, relevancy_keep
from utils.mlp_controls import fake_quantize, prune_channels

ATTN_IMPL = "sol"


def _sol_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    ctl: Controls | None = getattr(module, "_sol_controls", None)
    decode = ctl is not None and query.shape[2] == 1
    padded = None
    if decode and query.dtype != torch.float32 and ctl.cache is not None:
        layer = ctl.cache.layers[module.layer_idx]
        if getattr(layer, "keys", None) is key and hasattr(layer, "padded"):
            padded = layer.padded()
    if decode and ctl.active:
        return ctl.sparse_decode_attention(query, key, value, attention_mask, scaling, module.layer_idx, padded)
    if decode and query.dtype != torch.float32:
        # SDPA's CPU kernel for one query token in bfloat16 is ~2x slower than matmul-softmax-matmul
        # (SmolLM2, 128 rows, 272 keys: 0.69 vs 0.31 s per step), so dense decode steps take the same path
        return decode_attention(query, key, value, attention_mask, scaling, None, padded)[0], None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def decode_attention(query, key, value, attention_mask, scaling, keep_fn, padded=None):
    """Attention of one query token [B, Hq, 1, D] over all keys [B, Hkv, K, D] (GQA groups shared), restricted
    to the keys `keep_fn(q, key, logits)` keeps ([B, Hq or 1, K] bool; None keeps all) and the mask allows.
    `padded`: contiguous key/value buffers whose first K positions are `key`/`value` (`GrowableLayer.padded`);
    the products then run over the whole buffer, the tail getting probability 0.
    Returns (output [B, 1, Hq, D], kept-key mask [B, Hq, K])."""
    B, Hq, _, D = query.shape
    Hkv, K = key.shape[1], key.shape[2]
    g = Hq // Hkv
    q = query[:, :, 0]
    kmat = key if padded is None else padded[0]
    logits = (q.reshape(B, Hkv, g, D) @ kmat.transpose(-1, -2)).reshape(B, Hq, -1)[..., :K] * scaling
    keep = torch.ones(1, 1, K, dtype=torch.bool, device=q.device) if keep_fn is None else keep_fn(q, key, logits)
    if attention_mask is not None:
        allowed = attention_mask[:, :, -1, :K]
        keep = keep & (allowed if allowed.dtype == torch.bool else allowed == 0)
    keep = keep.expand(B, Hq, K)
    probs = torch.softmax(logits.masked_fill(~keep, float("-inf")).float(), dim=-1).to(value.dtype)
    if padded is None:
        out = probs.reshape(B, Hkv, g, K) @ value  # [B, Hkv, g, D]
    else:
        vbuf = padded[1]
        full = probs.new_zeros(B, Hq, vbuf.shape[2])
        full[..., :K] = probs
        out = full.reshape(B, Hkv, g, -1) @ vbuf
    return out.reshape(B, 1, Hq, D), keep


AttentionInterface.register(ATTN_IMPL, _sol_attention)
AttentionMaskInterface.register(ATTN_IMPL, sdpa_mask)


class Controls:
    """Per-row settings for the next single-token forward, plus realised-usage accumulators."""

    def __init__(
        self,
        criteria: str,
        Ts: int,
        Tw: int,
        page_size: int,
        relevancy_tier: str = "per_head",
        quest_keep_sink_window: bool = False,
        prune_enabled: bool = True,
        quant_enabled: bool = True,
        keep_levels: Sequence[float] | None = None,
        prune_levels: Sequence[float] | None = None,
    ) -> None:
        """`keep_levels` / `prune_levels`: every κ / ρ a row can be given (the action grid's values); they
        let top-k selections use one O(n) selection per level instead of a sort (see topk_by_threshold)."""
        if criteria not in CRITERIA:
            raise ValueError(f"unknown sparsity_criteria {criteria!r}; expected one of {CRITERIA}")
        self.criteria, self.Ts, self.Tw, self.page_size = criteria, Ts, Tw, page_size
        self.relevancy_tier, self.quest_keep_sink_window = relevancy_tier, quest_keep_sink_window
        self.prune_enabled, self.quant_enabled = prune_enabled, quant_enabled
        self.keep_levels, self.prune_levels = keep_levels, prune_levels
        self.clear()

    def clear(self) -> None:
        """Back to the unmodified model (every prefill and dense pass starts here)."""
        self.active = False
        self.cache = None
        self.kappa = self.rho = self.bits = None
        self._recency = None
        self.key_frac_sum = self.channel_sum = None

    def set(self, kappa: torch.Tensor, rho: torch.Tensor, bits: torch.Tensor, kv_len: int, cache=None) -> None:
        """Arm the controls for one decode step of B rows over a cache of kv_len keys (current included);
        `cache` (the step's KV cache) lets QUEST reuse the page summaries its layers keep."""
        self.active = True
        self.cache = cache
        self.kappa, self.rho, self.bits, self.kv_len = kappa, rho, bits, kv_len
        self._recency = recency_keep(kv_len, kappa, self.Ts, self.Tw) if self.criteria == "recency" else None
        self.key_frac_sum = torch.zeros(kappa.shape[0], device=kappa.device)
        self.channel_sum = torch.zeros(kappa.shape[0], device=kappa.device)

    def token_keep(self, q: torch.Tensor, keys: torch.Tensor, logits: torch.Tensor,
                   layer_idx: int | None = None) -> torch.Tensor:
        """Boolean [B, Hq or 1, K] mask of the keys each row/head attends at this step."""
        if self.criteria == "recency":
            return self._recency[:, None, :]
        if self.criteria == "relevancy":
            return relevancy_keep(logits, self.kappa, self.Ts, self.Tw, self.relevancy_tier, self.keep_levels)
        bounds = None
        layers = getattr(self.cache, "layers", None)
        if layers is not None and layer_idx is not None and hasattr(layers[layer_idx], "page_bounds") \
                and layers[layer_idx].keys is keys:
            bounds = layers[layer_idx].page_bounds(self.page_size)
        return quest_keep(q, keys, self.kappa, self.page_size, self.quest_keep_sink_window, self.Ts, self.Tw,
                          self.keep_levels, bounds)

    def sparse_decode_attention(self, query, key, value, attention_mask, scaling, layer_idx=None, padded=None):
        out, keep = decode_attention(query, key, value, attention_mask, scaling,
                                     lambda q, k, logits: self.token_keep(q, k, logits, layer_idx), padded)
        self.key_frac_sum += keep.float().mean(dim=(1, 2))
        return out, None

    def mlp_pre_hook(self, module: nn.Module, args):
        if not (self.active and self.prune_enabled):
            return None
        x, kept = prune_channels(args[0], self.rho, self.prune_levels)
        self.channel_sum += kept
        return (x,) + tuple(args[1:])

    def mlp_post_hook(self, module: nn.Module, args, output):
        if not (self.active and self.quant_enabled):
            return None
        return fake_quantize(output, self.bits)


def install_controls(model: nn.Module, controls: Controls) -> Controls:
    """Attach `controls` to every attention and MLP module of a Llama and select the "sol" attention."""
    attn = [m for m in model.modules() if hasattr(m, "q_proj") and hasattr(m, "num_key_value_groups")]
    mlps = [m for m in model.modules() if hasattr(m, "gate_proj") and hasattr(m, "down_proj")]
    if not attn or len(attn) != len(mlps):
        raise ValueError("install_controls expects a Llama-style model (attention with q_proj, MLP with gate_proj)")
    for m in attn:
        m._sol_controls = controls
    for m in mlps:
        m.register_forward_pre_hook(controls.mlp_pre_hook)
        m.register_forward_hook(controls.mlp_post_hook)
    model.set_attn_implementation(ATTN_IMPL)
    return controls
