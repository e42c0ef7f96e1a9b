"""Gathered execution: a controlled decode step that reads only what its action keeps.

The simulated execution (the reference's) runs the dense math and then masks keys and zeroes MLP input
channels, so a cheap step costs as much as a dense one. At batch 1 a CPU decode step is bound by the bytes
it reads (weights, then the KV cache), so this module computes the same result from the kept data only:

* MLP input channels (ρ): gate_proj and up_proj are laid out once, input-major, as one [H, 2I] matrix
  (a contiguous row of gate and up weights per input channel; the Linear weights become views of it, so
  nothing is duplicated). A step computes gate/up as Σ_c x_c · W_in[c] over the kept channels with
  `F.embedding_bag(..., per_sample_weights=x[kept], mode="sum")`: a fused gather-GEMV reading ρ of the rows.
  The kept list is split into bags (a bag runs on one thread; `default_bags`) and the partial sums added.
  At batch 1 in float32 a small C++ kernel (`utils.native`, built on first use) selects the channels and
  streams each kept row once (the kept rows split over the threads), in one call.
  Masking then a dense product saves nothing; `index_select` then a product copies the rows first and is
  several times slower than dense. (The input-channel sparse GEMV of activation sparsity, as in TEAL,
  Liu et al. 2024.)
* Attention keys (κ): recency hands SDPA the sinks and the contiguous window + recent slice of the cache;
  QUEST (Tang et al. 2024) scores pages from per-page key max/min that the cache keeps up to date as tokens
  arrive (`GrowableLayer.page_bounds`), then gathers, per KV head, the union of the pages its query heads
  selected (one `index_select` of key/value rows) and attends them with each head's own page mask (with
  `quest_tier: per_kv_head` the group shares its pages, so the union is the budget itself);
  relevancy must compute every logit to rank them, so only softmax·V runs over the gathered union of kept
  keys (its saving is at most the unread values, about half of the cache bytes).
* MLP-output bits stay simulated (fake quantization of an already computed output saves nothing).

Rows of a batch may carry different actions: the MLP uses one bag list per row (offsets), the attention
pads every (row, KV head) to the largest kept set and masks the rest, so results are exact at any batch size;
only batch 1 (and small batches) read less than dense. Every choice is made by the same selection functions
as the simulated mode (utils/attention.py, utils/mlp_controls.py), so both modes keep the same keys and
channels and agree to float rounding.
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from utils import native, weight_arena
from utils.cli import SOLError

EXECUTIONS = ("simulated", "gathered")


class ExecutionError(SOLError, ValueError):
    """A bad `execution` value (one-line message)."""


def check_execution(execution: str) -> str:
    """`execution` if it names an execution mode, else ExecutionError."""
    if execution not in EXECUTIONS:
        raise ExecutionError(f"unknown execution {execution!r}; expected one of {', '.join(EXECUTIONS)}")
    return execution


# ==== MLP: input-major gate/up and the gather-GEMV =======================================================

def input_major(linears: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Lay Linear layers that share an input out once, side by side and input-major: (W [in, Σ out] contiguous,
    row c holding input channel c's weights of every layer in turn; the biases joined, or None). Each Linear's
    weight becomes a transposed column-slice view of W (same values, no second copy), so every other use of the
    modules is unchanged and their products read W in this layout too; W sits in 2 MiB pages where the OS allows
    (`weight_arena`). Why: a gather-GEMV needs one contiguous
    row per input channel, and on the 2-core CPU the batch-1 product x·W reads an input-major matrix up to twice
    as fast as F.linear reads the output-major one when out >= in (benchmarks/bench_layout.py)."""
    with torch.no_grad():
        w = weight_arena.copy(torch.cat([p.weight for p in linears], dim=0).t())
        b = torch.cat([p.bias for p in linears]) if linears[0].bias is not None else None
        start = 0
        for p in linears:
            n = p.weight.shape[0]
            p.weight = nn.Parameter(w[:, start:start + n].t(), requires_grad=False)
            if b is not None:
                p.bias = nn.Parameter(b[start:start + n], requires_grad=False)
            start += n
    return w, b


def layout_mlp(mlp: nn.Module) -> None:
    """Lay gate_proj and up_proj out input-major once (`input_major`): buffer `_sol_w_in` [H, 2I] (row c = input
    channel c's gate weights then up weights) and `_sol_b_in` [2I] or None; down_proj too (`_sol_w_down` [I, H])."""
    if hasattr(mlp, "_sol_w_in"):
        return
    w_in, b_in = input_major([mlp.gate_proj, mlp.up_proj])
    mlp.register_buffer("_sol_w_in", w_in, persistent=False)
    mlp.register_buffer("_sol_b_in", b_in, persistent=False)
    w_down, b_down = input_major([mlp.down_proj])  # for `dense_gemv`
    mlp.register_buffer("_sol_w_down", w_down, persistent=False)
    mlp.register_buffer("_sol_b_down", b_down, persistent=False)


def gathered_gate_up(x: torch.Tensor, keep: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor | None = None,
                     n_bags: int = 1) -> torch.Tensor:
    """Σ over each row's kept channels of x[b, c] · w_in[c] (+ bias): [B, D] x, [B, D] bool keep -> [B, 2I].

    Equal to `(x * keep) @ w_in` without reading the dropped rows of w_in. One embedding bag per (row, chunk):
    each row's kept channels are split into `n_bags` chunks (bags are the unit of parallelism) and summed."""
    B, D = x.shape
    rows, cols = keep.nonzero(as_tuple=True)  # row-major: each row's channels are contiguous, in order
    weights = x[rows, cols]
    if B == 1 and n_bags == 1:
        out = F.embedding_bag(cols, w_in, torch.zeros(1, dtype=torch.long, device=x.device), mode="sum",
                              per_sample_weights=weights)
    else:
        n = keep.sum(-1)
        chunk = (n + n_bags - 1) // n_bags
        step = torch.arange(n_bags, device=x.device) * chunk[:, None]  # [B, n_bags]
        offsets = (n.cumsum(0) - n)[:, None] + torch.minimum(step, n[:, None])
        out = F.embedding_bag(cols, w_in, offsets.flatten(), mode="sum", per_sample_weights=weights)
        out = out.view(B, n_bags, -1)
        out = out.sum(1) if out.dtype == torch.float32 else out.sum(1, dtype=torch.float32).to(out.dtype)
    return out if b_in is None else out + b_in


def gather_gemv(x: torch.Tensor, idx: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor | None = None,
                n_bags: int = 1, native_ok: bool = True) -> torch.Tensor:
    """One row: Σ_i x[idx_i] · w_in[idx_i] (+ bias) for x [D] and kept channels idx [n] -> [2I]
    (`gathered_gate_up` of a single row, with no mask to decode).

    In float32 on a CPU the native kernel does it when it could be built (`utils.native`: each kept row
    streamed once, the kept rows split over the threads) and `native_ok`; otherwise, and in other dtypes,
    `embedding_bag` below.

    In float32 bag j sums every n_bags-th kept channel from the j-th on (`_bag_plan`), so each bag's rows
    spread over the whole matrix: on the 2-core CPU that ran ~15% faster than bags of consecutive channels
    (ascending indices with gaps, where the hardware prefetcher seems to fetch rows that are then skipped).
    In lower precision, where each bag's sum is rounded to the dtype, the bags stay consecutive: that order's
    rounding stays closest to the simulated mode's dense product (tests/test_gathered.py, bfloat16)."""
    if native_ok and x.dtype == torch.float32 and x.device.type == "cpu" and w_in.dtype == torch.float32:
        kernel = native.gather_kernel()
        if kernel is not None:
            out = kernel.gather_gemv(x.contiguous(), idx, w_in)
            return out if b_in is None else out + b_in
    order, offsets = _bag_plan(idx.shape[0], n_bags, x.device, strided=x.dtype == torch.float32)
    if order is not None:
        idx = idx.index_select(0, order)
    # the ATen op itself: F.embedding_bag's argument checks cost a few µs, which this per-layer call feels
    out = torch.embedding_bag(w_in, idx, offsets, False, 0, False, x.index_select(0, idx))[0]  # mode 0: sum
    if out.shape[0] > 1:
        out = out.sum(0) if out.dtype == torch.float32 else out.sum(0, dtype=torch.float32).to(out.dtype)
    else:
        out = out[0]
    return out if b_in is None else out + b_in


def dense_gemv(x: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., D] @ w_in [D, N] (+ bias) for an input-major (contiguous) w_in. Float32 on a CPU, where the native
    kernel is built: one row goes through its every-row loop (`gather_gemv` with nothing dropped: the same kernel
    as the pruned product, and faster than the BLAS product there, benchmarks/bench_layout.py), 2 to 8 rows
    through `gemm_rows` (each weight row read once for all of them; the BLAS product of so few rows read the
    weights 1.7-3.6x slower at 4 rows, benchmarks/bench_layout.py --rows 4); anything else is a matmul."""
    n_rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if 1 <= n_rows <= 8 and x.dtype == torch.float32 and x.device.type == "cpu" \
            and w_in.dtype == torch.float32 and w_in.is_contiguous():
        kernel = native.gather_kernel()
        if kernel is not None:
            if n_rows == 1:
                out = kernel.gemv(x.reshape(-1).contiguous(), w_in)
            else:
                out = kernel.gemm_rows(x.reshape(n_rows, -1).contiguous(), w_in)
            out = out if b_in is None else out + b_in
            return out.view(*x.shape[:-1], -1)
    rows = x.reshape(-1, x.shape[-1])  # one 2-D product: a 3-D low-precision input copies w_in once per batch row
    out = rows @ w_in if b_in is None else torch.addmm(b_in, rows, w_in)
    return out.view(*x.shape[:-1], -1)


def union_gate_up(x: torch.Tensor, keep: torch.Tensor, w_in: torch.Tensor,
                  b_in: torch.Tensor | None = None) -> torch.Tensor | None:
    """`gathered_gate_up` of 2 to 8 float32 rows on a CPU in one native pass (`gemm_rows` over the union of the rows'
    kept channels, each row's input zeroed outside its own): every weight row any row keeps is read once for all of
    them, so a small batch reads at most one dense pass (at s40, about the union's share), where per-row gathers read
    one pass per row. None where it does not apply (then the caller gathers per row or runs the masked product)."""
    B = x.shape[0]
    if not (2 <= B <= 8 and x.dtype == torch.float32 and x.device.type == "cpu" and w_in.dtype == torch.float32
            and w_in.is_contiguous()):
        return None
    kernel = native.gather_kernel()
    if kernel is None:
        return None
    idx = keep.any(0).nonzero().view(-1)
    out = kernel.gemm_rows((x * keep.to(x.dtype)).contiguous(), w_in, idx)
    return out if b_in is None else out + b_in


def gemv_linear(linear: nn.Linear) -> None:
    """Lay `linear` out input-major (`input_major`; buffer `_sol_w` [in, out]) and run its forward through
    `dense_gemv`: the native every-row loop for one float32 row on a CPU, the matmul of the same layout otherwise.
    Same values and parameters (the weight becomes a transposed view of the buffer)."""
    if hasattr(linear, "_sol_w"):
        return
    w, _ = input_major([linear])
    linear.register_buffer("_sol_w", w, persistent=False)
    linear.forward = types.MethodType(_gemv_linear_forward, linear)


def _gemv_linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
        return F.linear(x, self.weight, self.bias)  # the native loop has no backward
    return dense_gemv(x, self._sol_w, self.bias)


def select_gather_gemv(x: torch.Tensor, kth: int, w_in: torch.Tensor, b_in: torch.Tensor | None = None,
                       n_bags: int = 1) -> tuple[torch.Tensor, int]:
    """One row's channel selection and gather-GEMV: the channels whose |x| is at least the kth smallest |x|
    (ties at the threshold kept, as `topk_by_threshold` keeps them), x [D] -> (Σ over them of x_c · w_in[c]
    (+ bias) [2I], their count). The native kernel does both in one call where it is built (float32, CPU);
    otherwise `kthvalue`, a comparison, `nonzero` and `gather_gemv`."""
    if x.dtype == torch.float32 and x.device.type == "cpu" and w_in.dtype == torch.float32:
        kernel = native.gather_kernel()
        if kernel is not None:
            out, n = kernel.select_gather_gemv(x.contiguous(), kth, w_in)
            return (out if b_in is None else out + b_in), n
    score = x.abs()
    idx = (score >= score.kthvalue(kth).values).nonzero().view(-1)
    return gather_gemv(x, idx, w_in, b_in, n_bags, native_ok=False), idx.shape[0]


_PLANS: dict[tuple[int, int, str, bool], tuple[torch.Tensor | None, torch.Tensor]] = {}


def _bag_plan(n: int, n_bags: int, device: torch.device,
              strided: bool = True) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(order, offsets) that split n indices into `n_bags` bags. Strided: bag j holds positions j, j + n_bags,
    j + 2·n_bags, …, `order` listing them bag after bag; else consecutive equal chunks (order None, as it is
    for one bag: n_bags == 1 or n < 2·n_bags). `offsets`: each bag's start. Cached: a decode step asks for the
    same few every layer."""
    key = (n, n_bags, str(device), strided)
    if key not in _PLANS:
        if len(_PLANS) > 4096:
            _PLANS.clear()
        if n_bags == 1 or n < 2 * n_bags:
            plan = (None, torch.zeros(1, dtype=torch.long, device=device))
        elif not strided:
            plan = (None, torch.tensor(list(range(0, n, -(-n // n_bags))), dtype=torch.long, device=device))
        else:
            order = torch.cat([torch.arange(j, n, n_bags) for j in range(n_bags)])
            sizes = [len(range(j, n, n_bags)) for j in range(n_bags)]
            starts = [sum(sizes[:j]) for j in range(n_bags)]
            plan = (order.to(device), torch.tensor(starts, dtype=torch.long, device=device))
        _PLANS[key] = plan
    return _PLANS[key]


def default_bags(device: torch.device, dtype: torch.dtype = torch.float32) -> int:
    """Bags per row for `gathered_gate_up` and `gather_gemv` (CUDA parallelises inside a bag: 1). A bag is the
    embedding bag kernel's unit of work on a CPU. In float32 four per thread: on the 2-core CPU (SmolLM2 gate+up
    at ρ 0.4) one run had eight bags at 2.29× the dense product's speed against 2.07× with two, a later
    in-process comparison had 2, 4 and 8 bags level (1.9–2.1×), so the choice matters little there. In lower
    precision each bag's partial sum is rounded to the dtype before the bags are added, so there one bag per
    thread keeps the rounding as small as it was."""
    if device.type == "cuda":
        return 1
    return max(1, torch.get_num_threads()) * (4 if dtype == torch.float32 else 1)


def install_gathered_mlp(mlp: nn.Module, controls) -> None:
    """Replace `mlp.forward` by the gathered one (hooks keep running around it: the bit-width post-hook)."""
    layout_mlp(mlp)
    mlp._sol_controls = controls
    mlp.forward = types.MethodType(gathered_mlp_forward, mlp)


def gathered_mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """LlamaMLP.forward with gate and up computed from the input-major weights: dense (one fused product)
    unless the controls prune this call's channels (`Controls.gate_up`)."""
    ctl = self._sol_controls
    if ctl.active and ctl.prune_enabled:
        gu = ctl.gate_up(x, self._sol_w_in, self._sol_b_in)
    else:
        gu = dense_gemv(x, self._sol_w_in, self._sol_b_in)
    g, u = gu.chunk(2, dim=-1)
    return dense_gemv(self.act_fn(g) * u, self._sol_w_down, self._sol_b_down)


# ==== attention over the kept keys =======================================================================

def gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x[b, h, idx[b, h, t]] for x [B, H, K, D] (a view of a cache buffer is fine) and idx [B, H, T]:
    [B, H, T, D], one `index_select` of D-element rows from the memory x lives in (no copy of x)."""
    B, H, K, D = x.shape
    if x.stride(-1) != 1 or x.stride(-2) != D or x.stride(0) % D or x.stride(1) % D:
        x = x.contiguous()
    s0, s1 = x.stride(0) // D, x.stride(1) // D
    n_rows = (B - 1) * s0 + (H - 1) * s1 + K
    flat = x.as_strided((n_rows, D), (D, 1))
    base = (torch.arange(B, device=x.device) * s0)[:, None] + (torch.arange(H, device=x.device) * s1)[None, :]
    rows = (base[:, :, None] + idx).flatten()
    return flat.index_select(0, rows).view(B, H, idx.shape[-1], D)


def gather_pages(buf: torch.Tensor, pidx: torch.Tensor, page: int) -> torch.Tensor | None:
    """buf[b, h, p·page : (p+1)·page] for each page p of pidx [B, H, m], from a whole contiguous cache buffer
    buf [B, H, cap, D] (`GrowableLayer.padded`): [B, H, m·page, D], one `index_select` of page-sized rows
    (fewer, longer rows than `gather_rows`). None when the buffer does not tile into pages (cap % page) or is
    not contiguous. A partial last page brings positions past the filled length: the buffer keeps them finite
    and the caller masks them."""
    B, H, cap, D = buf.shape
    if cap % page or not buf.is_contiguous():
        return None
    per = cap // page
    rows = ((torch.arange(B * H, device=buf.device) * per).view(B, H, 1) + pidx).flatten()
    return buf.view(B * H * per, page * D).index_select(0, rows).view(B, H, -1, D)


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, keep: torch.Tensor | None,
           scaling: float) -> torch.Tensor:
    """softmax(q·kᵀ·scaling over `keep`)·v per KV group: q [B, Hkv, g, D], keys/values [B, Hkv, T, D],
    keep broadcastable to [B, Hkv, g, T] (None = all) -> [B, Hkv, g, Dv]. Float32 softmax as the simulated mode.
    In float32 SDPA does it, the g query heads of a KV head as g queries of one head (no causal mask): faster
    than the three ops on this CPU; in lower precision the ops below (SDPA's CPU kernel is slower there)."""
    if q.dtype == torch.float32:
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=keep, scale=scaling)
    logits = (q @ keys.transpose(-1, -2)) * scaling
    if keep is not None:
        logits = logits.masked_fill(~keep, float("-inf"))
    return torch.softmax(logits.float(), dim=-1).to(values.dtype) @ values


def recency_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float, Ts: int,
                      lo: int, start: torch.Tensor | None = None, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of one query [B, Hq, 1, D] over the keys [0, Ts) and [lo, K) only: the cache slice itself
    when the two touch, else the sinks and the recent slice joined (a copy of the kept keys only), handed
    to SDPA. `start` [B] (>= lo): rows that keep less than [lo, K) mask [lo, start); None = every row starts
    at lo. `allowed` [B, 1, K] bool: an attention mask. Returns [B, 1, Hq, D]."""
    B, Hq = query.shape[:2]
    Hkv, K = key.shape[1], key.shape[2]
    if lo > Ts and start is None and allowed is None and _FLASH_CPU is not None and query.dtype == torch.float32 \
            and query.device.type == "cpu":
        return _two_span_attention(query, key, value, scaling, Ts, lo)
    if lo <= Ts:
        k, v = key, value
    else:
        k = torch.cat([key[:, :, :Ts], key[:, :, lo:]], dim=2)
        v = torch.cat([value[:, :, :Ts], value[:, :, lo:]], dim=2)
    mask = None
    if start is not None or allowed is not None:
        pos = torch.arange(K, device=key.device)
        if lo > Ts:
            pos = torch.cat([pos[:Ts], pos[lo:]])
    if start is not None:
        mask = ((pos < Ts) | (pos >= start[:, None]))[:, None, None]  # [B, 1, 1, T]
    if allowed is not None:
        a = allowed[:, :, pos][:, :, None]
        mask = a if mask is None else mask & a
    out = F.scaled_dot_product_attention(query, k, v, attn_mask=mask, scale=scaling, enable_gqa=Hq != Hkv)
    return out.transpose(1, 2)


_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _two_span_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float, Ts: int,
                        lo: int) -> torch.Tensor:
    """`recency_attention` over [0, Ts) and [lo, K) without joining them: SDPA (the CPU flash kernel, which also
    returns each query's log-sum-exp) over the recent slice where it lies in the cache, the Ts sink logits by
    hand, and the two softmax parts merged by their log-sum-exps. Joining would copy the kept keys and values
    first (write and read again what the step is meant to read once), which at a 2,048-token cache costs about
    what skipping 75% of it saves. The g query heads of a KV head go in as g queries of one head. [B, 1, Hq, D]."""
    B, Hq, _, D = query.shape
    Hkv = key.shape[1]
    q = query[:, :, 0].reshape(B, Hkv, Hq // Hkv, D)
    out, lse = _FLASH_CPU(q, key[:, :, lo:], value[:, :, lo:], scale=scaling)[:2]  # [B, Hkv, g, D], [B, Hkv, g]
    sink = (q @ key[:, :, :Ts].transpose(-1, -2)) * scaling  # [B, Hkv, g, Ts]
    total = torch.logaddexp(lse, torch.logsumexp(sink, dim=-1))
    out = out * torch.exp(lse - total)[..., None] + torch.exp(sink - total[..., None]) @ value[:, :, :Ts]
    return out.reshape(B, Hq, 1, -1).transpose(1, 2)


def _union_index(union: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Positions of the True entries of union [B, H, N], in order, padded to the largest count with False
    ones: ([B, H, M] long, M)."""
    m = int(union.sum(-1).max())
    order = torch.sort(union.to(torch.uint8), dim=-1, descending=True, stable=True).indices
    return order[..., :m], m


def quest_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float,
                    pages: torch.Tensor, page: int, protected: torch.Tensor | None = None,
                    allowed: torch.Tensor | None = None,
                    padded: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over QUEST's selected pages only. `pages` [B, Hq, P]: each query head's kept pages, or
    [B, Hkv, P]: one selection per KV group (`quest_tier: per_kv_head`); `protected` [K] bool: positions kept
    for every head (keep_sink_window); `allowed` [B, 1, K]: a mask; `padded`: the whole key/value buffers
    (`GrowableLayer.padded`), from which whole pages are gathered when they tile it.

    Per KV head the union of its query heads' pages (and the protected ones) is gathered once; each query
    head then attends its own pages within it. Returns (output [B, 1, Hq, D], kept keys per row summed over
    the Hq heads [B], tokens read per (row, KV head): the largest union, every (row, head) being padded to it)."""
    B, Hq, _, D = query.shape
    Hkv, K = key.shape[1], key.shape[2]
    g, P = Hq // Hkv, pages.shape[-1]
    gs = pages.shape[1] // Hkv  # query heads per selection: g (per head) or 1 (shared by the group)
    sel = pages.view(B, Hkv, gs, P)
    union = sel.any(2)
    if protected is not None:
        union = union | F.pad(protected, (0, P * page - K)).view(P, page).any(-1)
    pidx, m = _union_index(union)  # [B, Hkv, m]
    tok = (pidx[..., None] * page + torch.arange(page, device=key.device)).flatten(-2)  # [B, Hkv, m·page]
    inside = tok < K  # the last page may be partial
    tok = tok.clamp(max=K - 1)
    keep = sel.gather(-1, pidx[:, :, None].expand(B, Hkv, gs, m)).repeat_interleave(page, dim=-1)
    if protected is not None:
        keep = keep | protected[tok][:, :, None]
    keep = keep & inside[:, :, None]
    if allowed is not None:
        keep = keep & allowed[:, 0].gather(-1, tok.flatten(1)).view(B, Hkv, 1, -1)
    q = query[:, :, 0].reshape(B, Hkv, g, D)
    kv = None if padded is None else (gather_pages(padded[0], pidx, page), gather_pages(padded[1], pidx, page))
    if kv is None or kv[0] is None or kv[1] is None:
        kv = gather_rows(key, tok), gather_rows(value, tok)
    out = attend(q, kv[0], kv[1], keep, scaling)
    return out.reshape(B, 1, Hq, -1), keep.sum(dim=(1, 2, 3)) * (g // gs), min(m * page, K)


def relevancy_attention(logits: torch.Tensor, keep: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, int]:
    """softmax·V over the kept keys only, from the full scaled logits [B, Hq, K] (relevancy ranks all of
    them) and the keep mask [B, Hq, K]: the V rows of the union of each KV group's kept keys are gathered.
    Returns (output [B, 1, Hq, Dv], value rows read per (row, KV head): the largest union)."""
    B, Hq, K = logits.shape
    Hkv = value.shape[1]
    g = Hq // Hkv
    kg = keep.reshape(B, Hkv, g, K)
    tok, m = _union_index(kg.any(2))  # [B, Hkv, m]
    at = tok[:, :, None].expand(B, Hkv, g, m)
    sub = logits.reshape(B, Hkv, g, K).gather(-1, at).masked_fill(~kg.gather(-1, at), float("-inf"))
    probs = torch.softmax(sub.float(), dim=-1).to(value.dtype)
    return (probs @ gather_rows(value, tok)).reshape(B, 1, Hq, -1), m
