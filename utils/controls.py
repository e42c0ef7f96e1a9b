"""Install per-row efficiency controls on a Hugging Face Llama through supported extension points.

* Attention: a function registered in transformers' `AttentionInterface` under the name "sol" (with the
  SDPA mask builder registered for the same name, otherwise the causal mask silently disappears). With
  controls cleared, or for multi-token calls (prefill, dense replay), it is exactly SDPA. For a controlled
  single-token decode step it computes QKᵀ once, masks the keys each row/head may not see and finishes
  with softmax·V, so relevancy ranks the very logits it then uses.
* MLP: a forward pre-hook prunes the MLP input channels, a forward hook fake-quantizes the MLP output.
* `execution="gathered"` computes the same decode step from the kept keys and channels only (utils/gathered.py):
  the MLP forward is replaced by an input-major gather-GEMV, the attention gathers the kept keys.

One `Controls` object per model holds the per-row settings of the current step and accumulates the
realised usage (keys attended, channels kept) over layers: as tensors, without host syncs, in the simulated
execution; the gathered one plans each step on the host and keeps a sum as a number while every row has the same.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from utils import fast_decode, gathered
from utils.attention import (
    CRITERIA, ceil_count_host, protected_positions, quest_keep, quest_page_bounds, quest_pages_kept_host,
    quest_select_pages, recency_keep, recency_start_host, relevancy_keep, topk_by_threshold,
)
from utils.actions import DENSE_BITS
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
    logits = decode_logits(query, key, scaling, padded)
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


def decode_logits(query, key, scaling, padded=None) -> torch.Tensor:
    """Scaled logits [B, Hq, K] of one query token [B, Hq, 1, D] against keys [B, Hkv, K, D] (GQA groups
    shared; `padded` as in `decode_attention`)."""
    B, Hq, _, D = query.shape
    Hkv, K = key.shape[1], key.shape[2]
    kmat = key if padded is None else padded[0]
    return (query[:, :, 0].reshape(B, Hkv, Hq // Hkv, D) @ kmat.transpose(-1, -2)).reshape(B, Hq, -1)[..., :K] * scaling


def _allowed(attention_mask, K: int) -> torch.Tensor | None:
    """[B, 1, K] bool: the keys the attention mask lets the current (last) query see; None = all."""
    if attention_mask is None:
        return None
    allowed = attention_mask[:, :, -1, :K]
    return allowed if allowed.dtype == torch.bool else allowed == 0


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
        quest_tier: str = "per_head",
        prune_enabled: bool = True,
        quant_enabled: bool = True,
        keep_levels: Sequence[float] | None = None,
        prune_levels: Sequence[float] | None = None,
        execution: str = "simulated",
    ) -> None:
        """`keep_levels` / `prune_levels`: every κ / ρ a row can be given (the action grid's values); they
        let top-k selections use one O(n) selection per level instead of a sort (see topk_by_threshold).
        `execution`: "simulated" (dense math, then masks: the reference) or "gathered" (utils/gathered.py)."""
        self.execution = gathered.check_execution(execution)
        if criteria not in CRITERIA:
            raise ValueError(f"unknown sparsity_criteria {criteria!r}; expected one of {CRITERIA}")
        # gathered MLP: gather-GEMV while the rows' kept channels add up to at most `gather_limit` dense passes
        # (2-8 float32 rows: one native pass over the union of their kept channels, `gathered.union_gate_up`;
        # otherwise each row reads its own weight rows), else the masked dense product, which reads the matrix
        # once for the whole batch; all exact. Tunable: the per-row fp32 embedding bag streams at ~0.7x the dense
        # GEMV's bandwidth on the 2-core CPU, so its break-even there is below ρ = 1.
        self.gather_limit = 1.0
        self.kv_read_sum = 0.0
        self.criteria, self.Ts, self.Tw, self.page_size = criteria, Ts, Tw, page_size
        self.relevancy_tier, self.quest_keep_sink_window = relevancy_tier, quest_keep_sink_window
        self.quest_tier = quest_tier
        self.prune_enabled, self.quant_enabled = prune_enabled, quant_enabled
        self.keep_levels, self.prune_levels = keep_levels, prune_levels
        self.clear()

    def clear(self) -> None:
        """Back to the unmodified model (every prefill and dense pass starts here)."""
        self.active = False
        self.cache = None
        self.kappa = self.rho = self.bits = None
        self._recency = None
        self._key_frac = self._channels = None
        self._channels_host = 0
        self._quant_identity = False

    def set(self, kappa: torch.Tensor, rho: torch.Tensor, bits: torch.Tensor, kv_len: int, cache=None,
            host: Sequence[tuple[float, float, int]] | None = None) -> None:
        """Arm the controls for one decode step of B rows over a cache of kv_len keys (current included);
        `cache` (the step's KV cache) lets QUEST reuse the page summaries its layers keep. `host`: the rows'
        (κ, ρ, bits) as Python numbers, when the caller has them (the gathered execution plans on the host)."""
        self.active = True
        self.cache = cache
        self.kappa, self.rho, self.bits, self.kv_len = kappa, rho, bits, kv_len
        simulated_recency = self.criteria == "recency" and self.execution == "simulated"
        self._recency = recency_keep(kv_len, kappa, self.Ts, self.Tw) if simulated_recency else None
        self._quant_identity = False  # gathered: True when every row's bit-width is dense (set by _plan_gathered)
        # keys attended and MLP channels kept, summed over layers: a number while every row has the same sum (the
        # gathered batch-1 paths count on the host), a [B] tensor once a per-row count is added
        self._key_frac = self._channels = 0.0
        self._channels_host = 0  # counts of the batch-1 gathered MLP, folded in by `step_sums`
        # gathered only: fraction of the cache's key and value bytes each layer read, summed over layers
        # (kept past `clear`, for benchmarks: the physical bound of the step)
        self.kv_read_sum = 0.0
        if self.execution == "gathered":
            if host is None:
                host = [tuple(r) for r in torch.stack([kappa.float(), rho.float(), bits.float()], 1).tolist()]
            self._plan_gathered(host, kv_len)

    def _plan_gathered(self, host: Sequence[tuple[float, float, int]], kv_len: int) -> None:
        """What the gathered kernels need on the host, once per step (not once per layer), from the rows' (κ, ρ,
        bits): the κ values present in the batch (selections then run one threshold per present level), whether
        every row's MLP output stays unquantized, and the recency spans or QUEST's pages per row (`native_plan`).
        Computed in Python: a batch-1 step's plan costs ~20 tensor ops less (a few hundred µs on the 2-core CPU)."""
        kappas = [r[0] for r in host]
        self._rho_host = [r[1] for r in host]
        self._kappa_present = sorted(set(kappas))
        self._bits_host = [r[2] for r in host]
        self._quant_identity = min(self._bits_host) >= DENSE_BITS
        self._ch_plan = None  # (width, counts [B] or None, present counts, total): set by the first MLP call
        if self.criteria == "quest":
            self._quest_pages_host = [quest_pages_kept_host(k, kv_len, self.page_size) for k in kappas]
        elif self.criteria == "recency":
            start = [recency_start_host(kv_len, k, self.Ts, self.Tw) for k in kappas]
            self._rec_lo = min(start)
            dev = self.kappa.device
            self._rec_start = None if max(start) == self._rec_lo else torch.tensor(start, device=dev)
            frac = [(self.Ts + kv_len - s) / kv_len for s in start]  # recency_keep's mean, from its span
            self._rec_frac = frac[0] if self._rec_start is None else torch.tensor(frac, device=dev)

    @property
    def key_frac_sum(self) -> torch.Tensor | None:
        """Fraction of keys attended per row ([B]), summed over this step's layers so far (None when not armed)."""
        return None if self._key_frac is None else self._per_row(self._key_frac)

    @property
    def channel_sum(self) -> torch.Tensor | None:
        """Kept MLP input channels per row ([B]), summed over this step's layers so far (None when not armed)."""
        return None if self._channels is None else self._per_row(self._channels + self._channels_host)

    def _per_row(self, v) -> torch.Tensor:
        return v if torch.is_tensor(v) else torch.full(self.kappa.shape, float(v), device=self.kappa.device)

    def step_sums(self) -> tuple:
        """(keys attended, MLP channels kept) summed over this step's layers: each a number when every row has
        the same (then no tensor op was spent on it) or a [B] tensor; None when not armed."""
        if self._channels is not None and self._channels_host:
            self._channels = self._channels + self._channels_host
            self._channels_host = 0
        return self._key_frac, self._channels

    def token_keep(self, q: torch.Tensor, keys: torch.Tensor, logits: torch.Tensor,
                   layer_idx: int | None = None) -> torch.Tensor:
        """Boolean [B, Hq or 1, K] mask of the keys each row/head attends at this step."""
        if self.criteria == "recency":
            return self._recency[:, None, :]
        if self.criteria == "relevancy":
            return relevancy_keep(logits, self.kappa, self.Ts, self.Tw, self.relevancy_tier, self.keep_levels)
        bounds = self._page_bounds(keys, layer_idx)
        return quest_keep(q, keys, self.kappa, self.page_size, self.quest_keep_sink_window, self.Ts, self.Tw,
                          self.keep_levels, bounds, self.quest_tier)

    def _page_bounds(self, keys: torch.Tensor, layer_idx: int | None):
        """The cache layer's incrementally kept page max/min for `keys`, or None (then computed from keys)."""
        layers = getattr(self.cache, "layers", None)
        if layers is not None and layer_idx is not None and hasattr(layers[layer_idx], "page_bounds") \
                and layers[layer_idx].keys is keys:
            return layers[layer_idx].page_bounds(self.page_size)
        return None

    def sparse_decode_attention(self, query, key, value, attention_mask, scaling, layer_idx=None, padded=None):
        if self.execution == "gathered":
            return self.gathered_decode_attention(query, key, value, attention_mask, scaling, layer_idx, padded)
        out, keep = decode_attention(query, key, value, attention_mask, scaling,
                                     lambda q, k, logits: self.token_keep(q, k, logits, layer_idx), padded)
        self._key_frac += keep.float().mean(dim=(1, 2))
        return out, None

    def gathered_decode_attention(self, query, key, value, attention_mask, scaling, layer_idx=None, padded=None):
        """The controlled decode attention of `execution="gathered"`: same kept keys as
        `sparse_decode_attention`, only those read (utils/gathered.py)."""
        B, Hq, _, _ = query.shape
        K = key.shape[2]
        allowed = _allowed(attention_mask, K)
        if self.criteria == "recency":
            out = gathered.recency_attention(query, key, value, scaling, self.Ts, self._rec_lo, self._rec_start,
                                             allowed)
            self.kv_read_sum += (K if self._rec_lo <= self.Ts else self.Ts + K - self._rec_lo) / K
            if allowed is None:
                self._key_frac += self._rec_frac
            else:
                if self._recency is None:
                    self._recency = recency_keep(self.kv_len, self.kappa, self.Ts, self.Tw)
                self._key_frac += (self._recency[:, None, :] & allowed).expand(B, Hq, K).float().mean(dim=(1, 2))
        elif self.criteria == "relevancy":
            logits = decode_logits(query, key, scaling, padded)
            keep = relevancy_keep(logits, self.kappa, self.Ts, self.Tw, self.relevancy_tier, self._kappa_present)
            if allowed is not None:
                keep = keep & allowed
            out, n_read = gathered.relevancy_attention(logits, keep, value)
            self.kv_read_sum += 0.5 + 0.5 * n_read / K  # every key, the kept values
            self._key_frac += keep.float().mean(dim=(1, 2))
        else:
            bounds = self._page_bounds(key, layer_idx) or quest_page_bounds(key, self.page_size)
            pages = quest_select_pages(query[:, :, 0], K, self.kappa, self.page_size, *bounds, self._kappa_present,
                                       self.quest_tier)
            prot = protected_positions(K, self.Ts, self.Tw + 1, key.device) if self.quest_keep_sink_window else None
            out, kept, n_read = gathered.quest_attention(query, key, value, scaling, pages, self.page_size, prot,
                                                         allowed, padded)
            self._key_frac += kept / (Hq * K)
            self.kv_read_sum += n_read / K + 1 / self.page_size  # the kept pages and every page's key max/min
        return out, None

    def gate_up(self, x: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor | None) -> torch.Tensor:
        """gate/up pre-activations [B, T, 2I] of x [B, T, D] with each row's input channels pruned exactly as
        `prune_channels` does, computed from the kept rows of the input-major `w_in` (a gather-GEMV) when that
        reads less than a dense product; counts the kept channels."""
        B, T, D = x.shape
        _, count, choices, total = self._channel_plan(D, x.device, x.dtype)
        if choices[0] >= D:  # every row keeps every channel: the dense product, as an uncontrolled step runs it
            self._channels += D
            return gathered.dense_gemv(x, w_in, b_in)
        gather = T == 1 and total <= self.gather_limit * D
        if gather and B == 1:
            return self._gate_up_one_row(x, w_in, b_in, D - choices[0] + 1)
        if count is None:
            count = torch.tensor(self._ch_counts, device=x.device)
            self._ch_plan = (D, count, choices, total)
        score = x.detach().abs().amax(dim=1).float()
        keep = topk_by_threshold(score, torch.ones_like(score, dtype=torch.bool), count, choices)
        self._channels += keep.sum(-1)
        if gather:  # one native pass over the union of the rows' kept channels, else per-row bags
            union = gathered.union_gate_up(x[:, 0], keep, w_in, b_in)
            if union is not None:
                return union[:, None]
            return gathered.gathered_gate_up(x[:, 0], keep, w_in, b_in, self._bags)[:, None]
        # a multi-token call, or rows whose kept channels add up to more than `gather_limit` dense passes
        return gathered.dense_gemv(x * keep[:, None].to(x.dtype), w_in, b_in)

    def _channel_plan(self, D: int, device: torch.device, dtype: torch.dtype) -> tuple:
        """(D, kept channels per row [B] or None until a per-row selection needs them as a tensor, the distinct
        counts sorted, their sum) for MLP inputs of width D: on the host once per step, by the simulated mode's rule
        (`prune_channels`: ceil(ρ·D), at least one)."""
        if self._ch_plan is None or self._ch_plan[0] != D:
            self._ch_counts = [min(max(ceil_count_host(r, D), 1), D) for r in self._rho_host]
            self._ch_plan = (D, None, sorted(set(self._ch_counts)), sum(self._ch_counts))
            self._bags = gathered.default_bags(device, dtype)
        return self._ch_plan

    def native_plan(self, hidden: int, device: torch.device) -> tuple[int, int, int, int] | None:
        """(kth, lo, quest_keep, bits) of a batch-1 step for the one-call native decode step (`utils.fast_decode`),
        or None when this step needs the per-layer path (relevancy below κ = 1). kth: 0 keeps every MLP input channel, else the channels with |x| at or above the kth smallest |x|
        (`_gate_up_one_row`'s choice); lo: recency's recent span start (the keys [0, Ts) and [lo, K) are read;
        lo <= Ts reads every key); quest_keep: QUEST's pages per selection (`quest_pages_kept`), 0 when the step
        is not QUEST's; bits: the MLP output's bit-width (`fake_quantize`), 0 when it stays as it is.
        Uncontrolled steps: (0, 0, 0, 0)."""
        if not self.active:
            return 0, 0, 0, 0
        bits = 0 if not self.quant_enabled or self._quant_identity else int(self._bits_host[0])
        lo = quest = 0
        if self.criteria == "recency":
            lo = self._rec_lo
        elif min(self._kappa_present) < 1.0:  # QUEST and relevancy keep every key at κ = 1
            if self.criteria != "quest":
                return None
            quest = int(self._quest_pages_host[0])
        if not self.prune_enabled:
            return 0, lo, quest, bits
        choices = self._channel_plan(hidden, device, torch.float32)[2]
        return (0 if choices[0] >= hidden else hidden - choices[0] + 1), lo, quest, bits

    def native_done(self, n_layers: int, n_heads: int, plan: tuple[int, int, int, int],
                    stats: tuple[int, int, int]) -> None:
        """Book what a native decode step (planned by `native_plan`; `stats`: its kept MLP channels, kept keys
        summed over the n_heads query heads and tokens read per KV head, each summed over the n_layers layers)
        kept, as the per-layer path books it: the MLP input channels, the attended keys and the cache bytes read."""
        if not self.active:
            return
        if self.prune_enabled:
            self._channels_host += stats[0]
        K = self.kv_len
        if plan[2]:  # QUEST: the kept pages and every page's key max/min
            self._key_frac += stats[1] / (n_heads * K)
            self.kv_read_sum += stats[2] / K + n_layers / self.page_size
        elif self.criteria == "recency":
            lo = self._rec_lo
            self.kv_read_sum += n_layers * (K if lo <= self.Ts else self.Ts + K - lo) / K
            self._key_frac += n_layers * self._rec_frac
        else:
            self.kv_read_sum += n_layers
            self._key_frac += n_layers

    def _gate_up_one_row(self, x: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor | None,
                         kth: int) -> torch.Tensor:
        """`gate_up` of one token of one row, in as few ops as possible (it runs once per layer per step and
        its selection is most of what the gather saves over dense): `topk_by_threshold` with a known count is
        the rows at or above the kth smallest |x| (ties kept), then the gather-GEMV, both in one native call
        where the kernel is built (`gathered.select_gather_gemv`). The channel count is
        added on the host and folded into the step's sum once per step (`step_sums`). (A `topk` of count + 1
        with a tie check measured no faster on the 2-core CPU: 0.70-0.71 against 0.68 of the dense product's
        time at ρ 0.4, both DRAM-bound there.)"""
        out, n = gathered.select_gather_gemv(x.view(-1), kth, w_in, b_in, self._bags)
        self._channels_host += n
        return out.view(1, 1, -1)

    def mlp_pre_hook(self, module: nn.Module, args):
        if not (self.active and self.prune_enabled):
            return None
        x, kept = prune_channels(args[0], self.rho, self.prune_levels)
        self._channels += kept
        return (x,) + tuple(args[1:])

    def quantize_output(self, output: torch.Tensor) -> torch.Tensor:
        """The MLP output under the rows' bit-widths (fake quantization; the output itself when the controls are
        not armed, quantization is off, or, in the gathered execution, every row is at 16 bits, where
        `fake_quantize` is the identity)."""
        if not (self.active and self.quant_enabled) or self._quant_identity:
            return output
        return fake_quantize(output, self.bits)

    def mlp_post_hook(self, module: nn.Module, args, output):
        return self.quantize_output(output)


def install_controls(model: nn.Module, controls: Controls) -> Controls:
    """Attach `controls` to every attention and MLP module of a Llama and select the "sol" attention."""
    attn = [m for m in model.modules() if hasattr(m, "q_proj") and hasattr(m, "num_key_value_groups")]
    mlps = [m for m in model.modules() if hasattr(m, "gate_proj") and hasattr(m, "down_proj")]
    if not attn or len(attn) != len(mlps):
        raise ValueError("install_controls expects a Llama-style model (attention with q_proj, MLP with gate_proj)")
    for m in attn:
        m._sol_controls = controls
        if controls.execution == "gathered":
            fast_decode.layout_attention(m)  # one q/k/v product in the gathered decode step, input-major
    for m in mlps:
        if controls.execution == "gathered":
            gathered.install_gathered_mlp(m, controls)  # prunes inside its forward
        else:
            m.register_forward_pre_hook(controls.mlp_pre_hook)
        m.register_forward_hook(controls.mlp_post_hook)
    if controls.execution == "gathered":
        fast_decode.layout_lm_head(model)
    model.set_attn_implementation(ATTN_IMPL)
    return controls
