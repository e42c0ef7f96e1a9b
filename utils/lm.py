"""The controlled LM: dense prefill, one batched decode step with a per-row action, cache handling.

This is the single-step API the episode engine (training and every evaluator) is built on. A decode
step with `actions=None` is the unmodified model; with actions, each row gets its own (κ, ρ, bits).
Every prefill and dense step clears the controls first, so no setting can leak into a dense pass.
"""
from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import LlamaModel

from utils.actions import DENSE_BITS, ActionSpace
from utils.attention import is_effective
from utils import fast_decode, gathered
from utils.controls import Controls, install_controls
from utils.kv_cache import SPARE_TOKENS, GrowableCache

# transformers 5.x renamed past_key_values -> cache (the old name still works with a warning until 5.40).
_CACHE_KW = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


@dataclass
class StepUsage:
    """Per-row usage of one decode step: nominal (what budgets use) and realised (what happened)."""

    keep: torch.Tensor  # [B] nominal κ applied
    prune: torch.Tensor  # [B] nominal ρ / P_MAX
    qratio: torch.Tensor  # [B] bits / 16
    attn_keep: torch.Tensor  # [B] fraction of keys attended, mean over layers and heads
    channel_keep: torch.Tensor  # [B] fraction of MLP input channels kept, mean over layers
    flops: torch.Tensor  # [B] analytic FLOPs of the step
    effective: bool  # False: the step ran dense (cache too short for sparsity)


@dataclass
class StepOutput:
    logits: torch.Tensor  # [B, V] float32
    hidden: torch.Tensor  # [B, H] final-norm hidden state (the policy's LM feature)
    usage: StepUsage


class ControlledLM:
    """A frozen Llama with per-row efficiency controls installed.

    `execution`: "simulated" (default; the reference: dense math, then keys masked and channels zeroed) or
    "gathered" (inference: controlled decode steps read only the kept keys and MLP input channels,
    utils/gathered.py; same schedulers, same selections, same logits up to float rounding). Chosen at load:
    "gathered" lays the MLP gate/up weights out input-major in place.
    """

    def __init__(self, model: nn.Module, tokenizer, actions: ActionSpace, criteria: str = "recency",
                 Ts: int = 4, Tw: int = 1, page_size: int = 16, relevancy_tier: str = "per_head",
                 quest_keep_sink_window: bool = False, execution: str = "simulated",
                 quest_tier: str = "per_head") -> None:
        self.model, self.tokenizer, self.actions = model, tokenizer, actions
        self.Ts, self.Tw = Ts, Tw
        self.execution = execution
        self.controls = install_controls(model, Controls(
            criteria, Ts, Tw, page_size, relevancy_tier, quest_keep_sink_window, quest_tier,
            prune_enabled=actions.has_prune, quant_enabled=actions.has_quant,
            keep_levels=actions.keep_values + (1.0,), prune_levels=actions.prune_values + (1.0,),
            execution=execution))
        c = model.config
        self.n_layers, self.hidden_size, self.vocab_size = c.num_hidden_layers, c.hidden_size, c.vocab_size
        self.head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        self.n_heads, self.n_kv_heads, self.ffn = c.num_attention_heads, c.num_key_value_heads, c.intermediate_size
        self.device = next(model.parameters()).device
        self._act_tables = tuple(t.to(self.device) for t in (actions.keep, actions.prune, actions.bits))
        # (κ, ρ, bits) of each action as Python numbers: the gathered execution plans its steps on the host
        self._act_host = list(zip(actions.keep.tolist(), actions.prune.tolist(), actions.bits.tolist()))
        L, H = self.n_layers, self.hidden_size
        self._usage_div = torch.tensor([1.0, actions.prune_max, DENSE_BITS, L, L * H, 1.0], device=self.device)[:, None]

    @classmethod
    def from_config(cls, cfg, model: nn.Module, tokenizer, execution: str = "simulated") -> "ControlledLM":
        return cls(model, tokenizer, ActionSpace.from_config(cfg), cfg.sparsity_criteria, cfg.Ts, cfg.Tw,
                   cfg.quest_page_size, cfg.relevancy_tier, cfg.quest_keep_sink_window, execution,
                   getattr(cfg, "quest_tier", "per_head"))

    # ---- model calls --------------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """LM input embeddings of token ids (the policy's e(x_t))."""
        return self.model.get_input_embeddings()(input_ids)

    @torch.inference_mode()
    def _forward(self, input_ids: torch.Tensor, cache: DynamicCache | None, attention_mask=None):
        if self.execution == "gathered" and input_ids.shape[1] == 1 and attention_mask is None and cache is not None:
            # a decode step: the same layers without the Hugging Face module stack (utils/fast_decode.py)
            return cache, fast_decode.decode_hidden(self.model, input_ids, cache)
        past = cache.get_seq_length() if cache is not None else 0
        pos = torch.arange(past, past + input_ids.shape[1], device=input_ids.device)[None]
        out = self.model.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos,
                               use_cache=True, **{_CACHE_KW: cache})
        cache = getattr(out, _CACHE_KW)
        return cache, out.last_hidden_state

    def prefill_hidden(self, input_ids: torch.Tensor, cache: DynamicCache | None = None,
                       ) -> tuple[DynamicCache, torch.Tensor]:
        """Dense forward of [B, L] tokens (on top of `cache` if given, e.g. a dense replay).

        Returns (cache, final-norm hidden states [B, L, H]).
        """
        self.controls.clear()
        if cache is None:
            cache = GrowableCache()
        return self._forward(input_ids, cache)

    def prefill(self, input_ids: torch.Tensor, cache: DynamicCache | None = None,
                ) -> tuple[DynamicCache, torch.Tensor, torch.Tensor]:
        """Dense prefill; returns (cache, last-position hidden [B, H], its logits [B, V] float32)."""
        cache, hidden = self.prefill_hidden(input_ids, cache)
        h = hidden[:, -1]
        return cache, h, self.logits(h)

    def prefill_all_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Dense teacher-forced logits [B, L, V] of a whole sequence, no cache (for checks and dense scoring)."""
        self.controls.clear()
        with torch.inference_mode():
            out = self.model.model(input_ids=input_ids, use_cache=False)
            return self.logits(out.last_hidden_state)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """LM-head logits (float32) of final-norm hidden states."""
        with torch.inference_mode():
            head = self.model.lm_head
            if getattr(head, "_sol_input_major", False):  # the gathered execution (utils/fast_decode.py)
                return gathered.dense_gemv(h, head.weight.t(), head.bias).float()
            # as rows of one 2-D product: a 3-D bf16 input makes the CPU matmul copy the head once per batch row
            return head(h.reshape(-1, h.shape[-1])).float().reshape(*h.shape[:-1], -1)

    def step(self, cache: DynamicCache, input_ids: torch.Tensor, actions: torch.Tensor | None = None) -> StepOutput:
        """One batched decode step: token `input_ids` [B] under action index `actions` [B] (None = dense).

        The cache grows by one token per row. Steps whose cache is too short to be sparsified
        (kv_len <= Ts + Tw + 1) run dense and report dense usage.
        """
        B = input_ids.shape[0]
        kv_len = cache.get_seq_length() + 1
        effective = actions is not None and is_effective(kv_len, self.Ts, self.Tw)
        # the gathered execution plans on the host: the rows' (κ, ρ, bits) from one read of the action indices
        host = None
        if self.execution == "gathered":
            host = [self._act_host[a] for a in actions.tolist()] if effective else [(1.0, 1.0, DENSE_BITS)] * B
        if effective:
            kt, pt, bt = self._act_tables
            kappa, rho, bits = kt[actions], pt[actions], bt[actions]
            self.controls.set(kappa, rho, bits, kv_len, cache, host)
        else:
            self.controls.clear()
            self.controls.cache = cache  # dense low-precision decode attention reads its padded buffers
            kappa = rho = bits = None
        try:
            cache, hidden = self._forward(input_ids[:, None], cache)
        finally:
            key_frac, channels = self.controls.step_sums() if effective else (None, None)
            self.controls.clear()
        h = hidden[:, -1]
        usage = self._usage(B, kappa, rho, bits, key_frac, channels, kv_len, effective, host)
        return StepOutput(self.logits(h), h, usage)

    # ---- accounting ---------------------------------------------------------------------------------
    def _usage(self, B: int, kappa, rho, bits, key_frac_sum, channel_sum, kv_len: int, effective: bool,
               host=None) -> StepUsage:
        """The step's StepUsage from the rows' actions (None: dense) and the controls' sums over layers (numbers
        when every row has the same, [B] tensors otherwise; None: every key / channel). With `host` (the rows'
        (κ, ρ, bits) in Python) and number sums, every field comes from one tensor built on the host: the same
        float32 divisions (`_usage_div`), the FLOPs rounded from float64 once."""
        L, H = self.n_layers, self.hidden_size
        if not self.controls.prune_enabled:
            channel_sum = None
        kf = L if key_frac_sum is None else key_frac_sum
        ch = L * H if channel_sum is None else channel_sum
        if host is not None and not torch.is_tensor(kf) and not torch.is_tensor(ch):
            flops = self.step_flops(kf / L * kv_len, ch / (L * H) * H)
            cols = [(k, r, b, kf, ch, flops) for k, r, b in host]
            rows = torch.tensor(list(zip(*cols)), dtype=torch.float32, device=self.device) / self._usage_div
            return StepUsage(*rows.unbind(0), effective)
        ones = torch.ones(B, device=self.device)
        if kappa is None:
            kappa, rho, bits = ones, ones, torch.full((B,), DENSE_BITS, device=self.device)
        attn_keep = ones * (kf / L)
        channel_keep = ones * (ch / (L * H))
        flops = self.step_flops(attn_keep * kv_len, channel_keep * H)
        return StepUsage(kappa.float(), rho.float() / self.actions.prune_max, bits.float() / DENSE_BITS,
                         attn_keep, channel_keep, flops, effective)

    def step_flops(self, keys_per_layer, channels_per_layer):
        """Analytic FLOPs (2 per multiply-add) of one decode token: projections, attention over the
        attended keys, MLP with the kept input channels, and the LM head. Tensors broadcast per row."""
        H, d, Hq, Hkv, I, L = self.hidden_size, self.head_dim, self.n_heads, self.n_kv_heads, self.ffn, self.n_layers
        proj = 2 * H * (Hq * d + 2 * Hkv * d) + 2 * Hq * d * H
        attn = 4 * Hq * d * keys_per_layer
        mlp = 4 * I * channels_per_layer + 2 * I * H
        return L * (proj + attn + mlp) + 2 * H * self.vocab_size

    def dense_step_flops(self, kv_len: int) -> float:
        return float(self.step_flops(torch.tensor(float(kv_len)), torch.tensor(float(self.hidden_size))))

    # ---- caches -------------------------------------------------------------------------------------
    @staticmethod
    def clone_cache(cache: DynamicCache, spare: int = SPARE_TOKENS) -> DynamicCache:
        """An independent copy (decode steps append to caches in place) with room for `spare` more tokens."""
        return GrowableCache.repeated(cache, 1, spare)

    @staticmethod
    def expand_cache(cache: DynamicCache, k: int, spare: int = SPARE_TOKENS) -> DynamicCache:
        """A copy with each row repeated k times (rows b*k .. b*k+k-1 come from row b)."""
        return GrowableCache.repeated(cache, k, spare)

    @staticmethod
    def select_cache(cache: DynamicCache, idx: torch.Tensor) -> DynamicCache:
        out = copy.deepcopy(cache)
        out.batch_select_indices(idx)
        return out
