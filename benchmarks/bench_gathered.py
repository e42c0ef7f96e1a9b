"""Gathered vs simulated execution (utils/gathered.py): what physically skipping the removed work buys.

    python benchmarks/bench_gathered.py                                  # SmolLM2-135M, float32
    python benchmarks/bench_gathered.py --model tiny --tokens 8 --prompt_lens 64 --e2e_prompt 16   # smoke run

Three tables, every cell the median of --runs runs (batch 1, greedy tokens):
1. MLP gate+up alone, per layer, on the model's own weights (all layers in turn, so nothing stays in cache),
   x random: the dense fused product x·W_in as a BLAS matmul and as the gathered execution runs it
   (`gathered.dense_gemv`: the native every-row loop where it builds), the simulated mode's masked dense product, the embedding_bag
   gather, the gather kernel alone (`gather_gemv`: the native one where it builds) and channel selection +
   gather (`Controls.gate_up`, what a controlled batch-1 step runs), at ρ = 0.4/0.6/0.8.
2. End-to-end decode tokens/s after an --e2e_prompt-token prompt, s40 (κ=1, ρ=0.4, 16 bits) on every step:
   both executions, against plain dense steps (actions=None) and against the stock Hugging Face forward
   (SDPA attention, DynamicCache) of an untouched copy of the model; plus the gathered s40/dense ratio with the two
   generations advanced in lockstep, one step of each in turn (steadier against the machine's drift, but on the
   2-core CPU it reads ~5% lower than whole generations: an s40 step right after a dense one is slower than one
   after another s40 step, results/bench_gathered/part_z.md).
3. Attention alone (ρ=1, 16 bits) at κ=0.25 with long prompts: recency, QUEST and relevancy, each execution
   against its own dense steps (the gathered execution's dense steps differ too: every weight product runs
   input-major through `gathered.dense_gemv`, benchmarks/bench_layout.py).

With --batches: batches of several rows, an action per row (s40 on every row, s40 on half the rows), against
dense steps of the same execution: the gathered execution is exact at any batch size and reads less mainly at
batch 1 (see `batch_table`).

"bound" is the bytes a step must read relative to a dense step (weights incl. the LM head, plus the KV
cache): what a perfect kernel would reach on a memory-bound CPU. For table 1 it is ρ; "KV read" is the
fraction of the cache's bytes the gathered step read: for QUEST the gathered pages (the union over the query
heads of a KV head; with --quest_tiers per_kv_head the group shares one selection, so the budget itself) plus
the page key max/min (1/page of the cache); for relevancy every key (all logits are
needed to rank them) plus the kept values. Tokens/s count
decode steps only (the prompt prefill is excluded). Run it alone: on 2 cores a second process distorts it.
"""
from __future__ import annotations

import argparse
import copy
import csv
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from utils import gathered, native  # noqa: E402
from utils.actions import ActionSpace  # noqa: E402
from utils.attention import ceil_count, topk_by_threshold  # noqa: E402
from utils.engine import Scheduler  # noqa: E402
from utils.lm import _CACHE_KW, ControlledLM  # noqa: E402
from utils.model import SMOLLM2_ALIAS, TINY_ALIAS, load_lm  # noqa: E402
from utils.runtime import generate  # noqa: E402

MODELS = {"tiny": TINY_ALIAS, "smollm2": SMOLLM2_ALIAS}
SPACE = ActionSpace.build([0.25, 1.0], ["s40", "s60", "s80", "s100"], ["q16"])


def median_time(fn, runs: int) -> float:
    """Median seconds of fn() over `runs` calls after one warm-up call."""
    return statistics.median(interleaved({"fn": fn}, runs)["fn"])


def interleaved(cells: dict, runs: int) -> dict:
    """Seconds of each cell's fn() in each of `runs` rounds, the cells timed in turn within a round (after one
    warm-up call each), so a drift of the shared machine's speed hits every cell of a round alike. A fn may
    return its own timing (float seconds) to leave its set-up out. {cell: [seconds per round]}."""
    for fn in cells.values():
        fn()
    times: dict = {c: [] for c in cells}
    for _ in range(runs):
        for c, fn in cells.items():
            t0 = time.perf_counter()
            t = fn()
            times[c].append(t if isinstance(t, float) else time.perf_counter() - t0)
    return times


def median_ratio(num: list[float], den: list[float]) -> float:
    """Median over rounds of num/den (both per round, as `interleaved` gives them)."""
    return statistics.median(n / d for n, d in zip(num, den))


# ---- bytes a decode step reads -----------------------------------------------------------------------
def step_bytes(model, kv_len: int, gate_up_keep: float = 1.0, kv_read: float = 1.0) -> float:
    """Bytes one batch-1 decode step reads: every Linear weight (gate/up scaled by `gate_up_keep`), the LM
    head, and `kv_read` of the KV cache of kv_len tokens."""
    c = model.config
    es = next(model.parameters()).element_size()
    D = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    H, I, L = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    attn = H * (c.num_attention_heads * D + 2 * c.num_key_value_heads * D) + c.num_attention_heads * D * H
    weights = L * (attn + I * H + 2 * I * H * gate_up_keep) + c.vocab_size * H
    kv = L * 2 * c.num_key_value_heads * kv_len * D
    return es * (weights + kv * kv_read)


# ---- table 1: the MLP gate+up product ---------------------------------------------------------------
def mlp_table(lm: ControlledLM, runs: int) -> list[str]:
    """Per-layer µs of the gate+up product: dense, the simulated masked product, the gather kernel alone and
    the controlled step's whole batch-1 path (`Controls.gate_up`: channel selection + gather). The cells are
    timed in turn within each of `runs` rounds (so a drift of the machine's speed hits them alike); each
    cell is the median over rounds, each ratio the median of the rounds' ratios."""
    mlps = [m for m in lm.model.modules() if hasattr(m, "_sol_w_in")]
    H, ctl = lm.hidden_size, lm.controls
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(1, 1, H, generator=gen).to(m._sol_w_in.dtype) for m in mlps]
    bags = gathered.default_bags(lm.device, mlps[0]._sol_w_in.dtype)
    per_layer = 1e6 / len(mlps)
    kernel = "native (utils/native.py)" if (mlps[0]._sol_w_in.dtype == torch.float32 and lm.device.type == "cpu"
                                            and native.gather_kernel() is not None) else "embedding_bag"
    rhos = (0.4, 0.6, 0.8)
    cells = {"blas": lambda: [x @ m._sol_w_in for x, m in zip(xs, mlps)],
             "dense": lambda: [gathered.dense_gemv(x, m._sol_w_in) for x, m in zip(xs, mlps)]}
    counts = {}
    for rho in rhos:
        count = ceil_count(torch.tensor([rho]), H).clamp(1, H)
        counts[rho] = count.item()
        keeps = []
        for x in xs:
            score = x[0].abs().float()
            keeps.append(topk_by_threshold(score, torch.ones_like(score, dtype=torch.bool), count, count.tolist()))
        idx = [k[0].nonzero().flatten() for k in keeps]
        cells[("masked", rho)] = lambda keeps=keeps: [(x * k.to(x.dtype)) @ m._sol_w_in
                                                       for x, k, m in zip(xs, keeps, mlps)]
        cells[("kernel", rho)] = lambda idx=idx: [gathered.gather_gemv(x.view(-1), i, m._sol_w_in, None, bags)
                                                  for x, i, m in zip(xs, idx, mlps)]
        cells[("bag", rho)] = lambda idx=idx: [gathered.gather_gemv(x.view(-1), i, m._sol_w_in, None, bags, False)
                                               for x, i, m in zip(xs, idx, mlps)]

        def full(rho=rho):
            ctl.set(torch.ones(1), torch.tensor([rho]), torch.tensor([16]), 2 * (lm.Ts + lm.Tw + 1))
            t0 = time.perf_counter()
            for x, m in zip(xs, mlps):
                ctl.gate_up(x, m._sol_w_in, None)
            t = time.perf_counter() - t0
            ctl.clear()
            return t
        cells[("full", rho)] = full
    with torch.inference_mode():
        times = {c: [t * per_layer for t in v] for c, v in interleaved(cells, runs).items()}
    med = {c: statistics.median(v) for c, v in times.items()}
    rows = []
    for rho in rhos:
        ratio = median_ratio(times[("full", rho)], times["dense"])
        blas = median_ratio(times[("full", rho)], times["blas"])
        rows.append(f"| ρ={rho} | {med['blas']:.1f} | {med['dense']:.1f} | {med[('masked', rho)]:.1f} | "
                    f"{med[('bag', rho)]:.1f} | {med[('kernel', rho)]:.1f} | "
                    f"{med[('full', rho)]:.1f} | {ratio:.2f} | {blas:.2f} | {counts[rho] / H:.2f} |")
    head = [f"\nMLP gate+up ({H} -> {2 * lm.ffn}), µs per layer over {len(mlps)} layers, median of {runs} "
            f"interleaved rounds, {bags} bag(s) per row; gather kernel: {kernel}\n",
            "| setting | dense x·W_in, BLAS | dense x·W_in, gathered execution | masked dense (simulated) | "
            "embedding_bag gather | gather kernel | select + gather | select + gather time ÷ dense (gathered execution) | "
            "÷ BLAS dense | bound |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    return head + rows


# ---- decode throughput -------------------------------------------------------------------------------
def lm_decode_run(lm: ControlledLM, prompt: torch.Tensor, tokens: int, action: int | list[int] | None):
    """(go, info): go() runs `tokens` greedy decode steps after a dense prefill of `prompt` [B, P] (the prefill
    done once, outside go), each step with `action` for every row, or one action per row (a list; None = dense);
    info() gives the last step's usage and its KV bytes read per layer relative to dense (gathered execution
    only, else 0)."""
    cache, _, logits = lm.prefill(prompt)
    first = logits.argmax(-1)
    acts = None if action is None else torch.tensor(action if isinstance(action, list) else [action] * len(prompt))
    last = []

    def go():
        c = lm.clone_cache(cache, spare=tokens + 1)
        tok = first
        for _ in range(tokens):
            out = lm.step(c, tok, acts)
            tok = out.logits.argmax(-1)
        last.append((out.usage, lm.controls.kv_read_sum / lm.n_layers))

    return go, lambda: last[-1]


def lm_tokens_per_s(lm: ControlledLM, prompt: torch.Tensor, tokens: int, action: int | None, runs: int):
    """(decode tokens/s, the last step's usage, its KV bytes read per layer relative to dense) of
    `lm_decode_run`, median of `runs`."""
    go, info = lm_decode_run(lm, prompt, tokens, action)
    tps = tokens / median_time(go, runs)
    return (tps, *info())


def lockstep_ratios(lm: ControlledLM, prompt: torch.Tensor, tokens: int, actions: tuple[int | None, int | None],
                    runs: int) -> list[float]:
    """Per round, the decode seconds of actions[0] over those of actions[1]: two greedy generations of `tokens`
    steps from the same prefill advanced in lockstep, one step of each in turn (the order swapped every step),
    each step timed. The machine's speed drifts by up to 25% from minute to minute here; two generations timed
    step by step side by side see the same drift, so their ratio is steadier than one of runs timed in turn."""
    cache, _, logits = lm.prefill(prompt)
    acts = [None if a is None else torch.tensor([a]) for a in actions]
    ratios = []
    for r in range(runs + 1):  # the first round warms up
        caches = [lm.clone_cache(cache, spare=tokens + 1) for _ in acts]
        toks, secs = [logits.argmax(-1)] * 2, [0.0, 0.0]
        for t in range(tokens):
            for i in ((0, 1) if t % 2 == 0 else (1, 0)):
                t0 = time.perf_counter()
                out = lm.step(caches[i], toks[i], acts[i])
                toks[i] = out.logits.argmax(-1)
                secs[i] += time.perf_counter() - t0
        if r:
            ratios.append(secs[0] / secs[1])
    return ratios


def hf_decode_run(model, prompt: torch.Tensor, tokens: int):
    """go() running `tokens` greedy decode steps of the stock Hugging Face forward (an untouched copy of the
    model) after its own prefill of `prompt`."""
    with torch.inference_mode():
        out = model(input_ids=prompt, use_cache=True)
    cache0, first = getattr(out, _CACHE_KW), out.logits[:, -1].argmax(-1)

    @torch.inference_mode()
    def go():
        c, tok = copy.deepcopy(cache0), first
        for _ in range(tokens):
            o = model(input_ids=tok[:, None], use_cache=True, **{_CACHE_KW: c})
            c, tok = getattr(o, _CACHE_KW), o.logits[:, -1].argmax(-1)

    return go


def make_lm(base, tok, criteria: str, execution: str, page: int, quest_tier: str = "per_head") -> ControlledLM:
    return ControlledLM(copy.deepcopy(base), tok, SPACE, criteria, Ts=4, Tw=2, page_size=page, execution=execution,
                        quest_tier=quest_tier)


def e2e_table(base, tok, prompt: torch.Tensor, tokens: int, runs: int, page: int) -> list[str]:
    """Tokens/s of stock HF, and of dense steps and s40 on every step in both executions, the five timed in
    turn within each round; each ratio is the median of the rounds' ratios. A sixth cell times one step's dense
    gate+up products alone (every layer's x·W_in, `tokens` times), which gives the bound this runtime allows:
    s40 can only remove about (1 − ρ) of the gate+up share of a step, whatever the rest of the step costs (about:
    the products timed alone do not run exactly as they do inside a step)."""
    s40 = SPACE.index(1.0, 0.4, 16)
    P = prompt.shape[1]
    dense_b = step_bytes(base, P + tokens // 2)
    cells, infos = {"hf": hf_decode_run(copy.deepcopy(base), prompt, tokens)}, {}
    for execution in ("simulated", "gathered"):
        lm = make_lm(base, tok, "recency", execution, page)
        for name, action in (("dense", None), ("s40", s40)):
            cells[execution, name], infos[execution, name] = lm_decode_run(lm, prompt, tokens, action)
    mlps = [m for m in lm.model.modules() if hasattr(m, "_sol_w_in")]
    xs = [torch.randn(1, lm.hidden_size, generator=torch.Generator().manual_seed(i)) for i in range(len(mlps))]

    @torch.inference_mode()
    def gate_up():
        for _ in range(tokens):
            for x, m in zip(xs, mlps):
                gathered.dense_gemv(x, m._sol_w_in)
    cells["gate_up"] = gate_up
    times = interleaved(cells, runs)
    tps = {c: tokens / statistics.median(v) for c, v in times.items()}
    ref = times["simulated", "dense"]
    rows = [f"| stock HF forward (sdpa) | - | {tps['hf']:.1f} | {median_ratio(ref, times['hf']):.2f} | 1.00 | 1.00 |"]
    for execution in ("simulated", "gathered"):
        usage = infos[execution, "s40"]()[0]
        bound = step_bytes(base, P + tokens // 2, gate_up_keep=usage.channel_keep.item()) / dense_b
        for name, label, b in (("dense", "dense steps", 1.0), ("s40", "s40 every step", bound)):
            t = times[execution, name]
            rows.append(f"| {label} | {execution} | {tps[execution, name]:.1f} | {median_ratio(ref, t):.2f} | "
                        f"{median_ratio(times['hf'], t):.2f} | {b:.2f} |")
    lock = lockstep_ratios(lm, prompt, tokens, (None, s40), runs)  # lm: the gathered one
    gd, gs = times["gathered", "dense"], times["gathered", "s40"]
    share = median_ratio(times["gate_up"], gd)  # gate+up's share of a gathered dense step
    keep = infos["gathered", "s40"]()[0].channel_keep.item()
    step_ms = 1e3 * statistics.median(gd) / tokens
    head = [f"\nEnd-to-end decode, prompt {P} tokens, {tokens} new tokens, median of {runs} interleaved rounds "
            f"(ratios: medians of the rounds' ratios; s40 gathered vs gathered dense steps: {median_ratio(gd, gs):.2f}). "
            f"The dense gate+up products are {share:.0%} of a gathered dense step ({step_ms:.1f} ms) here, so s40 "
            f"computed at exactly ρ of their time would give about {1 / (1 - share * (1 - keep)):.2f}× this runtime's "
            f"dense steps; the bytes bound (last column) assumes the rest of the step runs at memory speed too. "
            f"Lockstep (the gathered s40 and dense generations advanced side by side, one step of each in turn, "
            f"{runs} rounds): s40 {statistics.median(lock):.2f}× gathered dense steps "
            f"(rounds {', '.join(f'{x:.2f}' for x in lock)})\n",
            "| method | execution | tokens/s | × dense (simulated) | × stock HF | bound |",
            "|---|---|---|---|---|---|"]
    return head + rows


def attention_table(base, tok, prompt_lens: list[int], tokens: int, runs: int, page: int,
                    criteria_list: tuple[str, ...] = ("recency", "quest", "relevancy"),
                    quest_tiers: tuple[str, ...] = ("per_head",)) -> list[str]:
    k25 = SPACE.index(0.25, 1.0, 16)
    gen = torch.Generator().manual_seed(1)
    prompts = {P: torch.randint(0, base.config.vocab_size, (1, P), generator=gen) for P in prompt_lens}
    dense: dict[tuple[str, int], float] = {}  # dense steps per execution (gathered also lays the MLP out anew)
    rows = []
    cases = [(c, t) for c in criteria_list for t in (quest_tiers if c == "quest" else ("per_head",))]
    for criteria, tier in cases:
        res = {}
        for execution in ("simulated", "gathered"):
            lm = make_lm(base, tok, criteria, execution, page, tier)
            for P, prompt in prompts.items():
                if (execution, P) not in dense:
                    dense[execution, P] = lm_tokens_per_s(lm, prompt, tokens, None, runs)[0]
                res[execution, P] = lm_tokens_per_s(lm, prompt, tokens, k25, runs)
            del lm
        for P in prompt_lens:
            (sim, _, _), (gat, _, read) = res["simulated", P], res["gathered", P]
            ds, dg = dense["simulated", P], dense["gathered", P]
            kv = P + tokens // 2
            bound = step_bytes(base, kv, kv_read=read) / step_bytes(base, kv)
            label = criteria if criteria != "quest" else f"quest ({tier})"
            rows.append(f"| {label} | {P} | {ds:.1f} | {sim:.1f} | {dg:.1f} | {gat:.1f} | {sim / ds:.2f} | "
                        f"{gat / dg:.2f} | {read:.2f} | {bound:.2f} |")
    head = [f"\nAttention sparsity κ=0.25 (ρ=1, 16 bits), {tokens} new tokens, QUEST page {page}, "
            f"median of {runs} runs; × dense is against dense steps of the same execution\n",
            "| criterion | prompt | dense tok/s (sim.) | simulated tok/s | dense tok/s (gath.) | gathered tok/s | "
            "simulated × dense | gathered × dense | KV read (gathered) | bound |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    return head + rows


class TimedScheduler(Scheduler):
    """Wraps a scheduler and adds up the wall time of its `choose` calls (the policy's share of a step)."""

    def __init__(self, inner: Scheduler) -> None:
        self.inner, self.seconds = inner, 0.0
        self.name, self.uses_lm_scalars = inner.name, inner.uses_lm_scalars

    def start(self, lm, budgets, group_size) -> None:
        super().start(lm, budgets, group_size)
        self.inner.start(lm, budgets, group_size)

    def choose(self, obs):
        t0 = time.perf_counter()
        a = self.inner.choose(obs)
        self.seconds += time.perf_counter() - t0
        return a

    def observe(self, out) -> None:
        self.inner.observe(out)


def _generation(lm, make_sched, prompt: list[int], tokens: int, budgets, episode_len: int):
    """(tokens/s, scheduler share of the decode time, mean realised channel keep) of one greedy generation (it
    decodes exactly `tokens` tokens: no stop token)."""
    sched = make_sched()
    _, st = generate(lm, sched, prompt, tokens, budgets, episode_len)
    share = sched.seconds / st.decode_seconds if isinstance(sched, TimedScheduler) else 0.0
    keep = statistics.fmean(k for k, e in zip(st.channel_keep, st.effective) if e) if any(st.effective) else 1.0
    return st.n_steps / st.decode_seconds, share, keep


def policy_table(ckpt_dir: str, prompt: list[int], tokens: int, runs: int, dtype: str,
                 rhos=(0.5, 0.7, 0.9), ppl_csv: str | None = None) -> list[str]:
    """The shipped prune policy generating at requested ρ: tokens/s in both executions against plain dense
    steps of the same execution, the policy network's share of the decode time, and the test PPL of that
    budget point from the policy's results CSV (teacher-forced, same actions as either execution)."""
    from utils.runtime import load_eval_bundle
    from utils.schedulers import PolicyScheduler

    ppl = {}
    if ppl_csv and Path(ppl_csv).is_file():
        with open(ppl_csv, newline="") as fh:
            for r in csv.DictReader(fh):
                ppl[round(float(r["target_prune_keep"]), 3)] = (f"{float(r['policy_ppl']):.2f}",
                                                                 f"{float(r['fixed_ppl']):.2f}")
    rows = []
    for execution in ("simulated", "gathered"):
        cfg, lm, policy = (lambda b: (b.cfg, b.lm, b.policy))(load_eval_bundle(ckpt_dir, device="cpu",
                                                                               execution=execution))
        if str(next(lm.model.parameters()).dtype).split(".")[-1] != dtype:
            lm.model.to(getattr(torch, dtype))
        E = cfg.rollout_len
        cells = {None: (lambda: None, (1.0, 1.0, 1.0))}
        cells.update({rho: (lambda: TimedScheduler(PolicyScheduler(policy, 0.6, greedy=True)), (1.0, rho, 1.0))
                      for rho in rhos})
        order = list(cells)
        res: dict = {c: [] for c in cells}
        for r in range(runs + 1):  # the first round warms up; each round times every cell once, the order rotated
            for c in order[r % len(order):] + order[:r % len(order)]:
                out = _generation(lm, cells[c][0], prompt, tokens, cells[c][1], E)
                if r:
                    res[c].append(out)
        dense = [x[0] for x in res[None]]
        rows.append(f"| dense steps | {execution} | - | {statistics.median(dense):.1f} | 1.00 | - | - |")
        for rho in rhos:
            tps, share, keep = ([x[i] for x in res[rho]] for i in range(3))
            p, fx = ppl.get(round(rho, 3), ("-", "-"))
            rows.append(f"| policy ρ={rho} | {execution} | {statistics.median(keep):.3f} | {statistics.median(tps):.1f} | "
                        f"{median_ratio(tps, dense):.2f} | {100 * statistics.median(share):.1f}% | {p} (fixed {fx}) |")
        del lm
    head = [f"\nShipped prune policy ({ckpt_dir}), greedy generation of {tokens} tokens after a {len(prompt)}-token "
            f"prompt, dense replay every rollout_len steps, median of {runs} rounds (each round times dense steps and "
            f"every ρ once, in rotated order; × dense steps: the median of the rounds' ratios)\n",
            "| method | execution | realised channel keep | tokens/s | × dense steps (same execution) | policy share of "
            "decode time | test PPL (teacher-forced) |",
            "|---|---|---|---|---|---|---|"]
    return head + rows


def batch_table(base, tok, P: int, tokens: int, runs: int, page: int, batches: list[int]) -> list[str]:
    """Batches of B rows (recency, 16 bits): s40 on every row, and s40 on the even rows with dense odd rows
    (mixed), against dense steps of the same execution, the three timed in turn within each round; tokens/s
    counts every row's tokens. A gathered row reads its own kept rows of the gate+up weights, while a dense
    product reads the matrix once for all rows, so the gathered MLP gathers only while the rows' kept channels
    add up to at most one dense pass (`Controls.gather_limit`); otherwise it runs the masked dense product."""
    s40 = SPACE.index(1.0, 0.4, 16)
    rows = []
    for B in batches:
        prompt = torch.randint(0, base.config.vocab_size, (B, P), generator=torch.Generator().manual_seed(4))
        mixed = [s40 if r % 2 == 0 else SPACE.dense_idx for r in range(B)]
        for execution in ("simulated", "gathered"):
            lm = make_lm(base, tok, "recency", execution, page)
            cells = {name: lm_decode_run(lm, prompt, tokens, act)[0]
                     for name, act in (("dense", None), ("s40", s40), ("mixed", mixed))}
            times = interleaved(cells, runs)
            tps = {c: B * tokens / statistics.median(v) for c, v in times.items()}
            rows.append(f"| {B} | {execution} | {tps['dense']:.1f} | {tps['s40']:.1f} "
                        f"({median_ratio(times['dense'], times['s40']):.2f}×) | {tps['mixed']:.1f} "
                        f"({median_ratio(times['dense'], times['mixed']):.2f}×) |")
    head = [f"\nBatches with an action per row, prompt {P} tokens, {tokens} new tokens per row, median of {runs} "
            f"interleaved rounds (× dense steps of the same execution: medians of the rounds' ratios)\n",
            "| rows | execution | dense tok/s | s40 every row tok/s | s40 even rows, dense odd rows tok/s |",
            "|---|---|---|---|---|"]
    return head + rows


def joint_table(base, tok, P: int, tokens: int, runs: int, page: int) -> list[str]:
    """κ and ρ together on every step (κ=0.25 recency and ρ=0.4: the fixed joint corner) at a long prompt."""
    idx = SPACE.index(0.25, 0.4, 16)
    prompt = torch.randint(0, base.config.vocab_size, (1, P), generator=torch.Generator().manual_seed(3))
    rows = []
    for execution in ("simulated", "gathered"):
        lm = make_lm(base, tok, "recency", execution, page)
        d, _, _ = lm_tokens_per_s(lm, prompt, tokens, None, runs)
        j, usage, read = lm_tokens_per_s(lm, prompt, tokens, idx, runs)
        kv = P + tokens // 2
        bound = step_bytes(base, kv, gate_up_keep=usage.channel_keep.item(),
                           kv_read=read if execution == "gathered" else 1.0) / step_bytes(base, kv)
        rows.append(f"| κ=0.25 + s40 | {execution} | {d:.1f} | {j:.1f} | {j / d:.2f} | {bound:.2f} |")
        del lm
    head = [f"\nJoint κ and ρ on every step, recency, prompt {P}, {tokens} new tokens, median of {runs} runs\n",
            "| action | execution | dense tok/s | tok/s | × dense (same execution) | bound |", "|---|---|---|---|---|---|"]
    return head + rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="smollm2", help="tiny (random 2-layer) or smollm2")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="LM dtype (default float32)")
    p.add_argument("--tokens", type=int, default=256, help="decode steps per timed run (default 256)")
    p.add_argument("--runs", type=int, default=3, help="timed runs per cell, median reported (>= 3; default 3)")
    p.add_argument("--e2e_prompt", type=int, default=256,
                   help="prompt length of the end-to-end and policy tables (default 256)")
    p.add_argument("--prompt_lens", type=int, nargs="+", default=[2048, 8192],
                   help="prompt lengths of the attention table; the longest also for the joint row (default 2048 8192)")
    p.add_argument("--page_size", type=int, default=4, help="QUEST page size (default 4, as the configs)")
    p.add_argument("--criteria", nargs="+", choices=["recency", "quest", "relevancy"],
                   default=["recency", "quest", "relevancy"], help="attention criteria of table 3 (default all)")
    p.add_argument("--quest_tiers", nargs="+", choices=["per_head", "per_kv_head"], default=["per_head", "per_kv_head"],
                   help="QUEST page rankings of table 3: per_head (the reference) and/or per_kv_head (one selection "
                        "per KV group; default both)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    p.add_argument("--ckpt_dir", default="results/prune_price_k16/ckpt_seed1234",
                   help="prune policy for the policy table (default: seed 1234 of the GRPO recipe `make train` runs, "
                        "with its knob table)")
    p.add_argument("--ppl_csv", default="results/prune_price_k16/test_ppl_seed1234.csv",
                   help="that policy's test results, for the PPL column")
    p.add_argument("--skip", nargs="*", choices=["mlp", "e2e", "attention", "policy", "joint"], default=[],
                   help="tables to skip")
    p.add_argument("--batches", type=int, nargs="*", default=[],
                   help="also time batches of these many rows, an action per row (e.g. 2 4; default none)")
    a = p.parse_args(argv)
    if a.runs < 3 or a.tokens < 1 or a.e2e_prompt < 8 or min(a.prompt_lens) < 8:
        p.error("need --runs >= 3, --tokens >= 1 and prompts of at least 8 tokens")
    if any(b < 2 for b in a.batches):
        p.error("--batches takes row counts of at least 2 (batch 1 is the end-to-end table)")
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    base, tok = load_lm(MODELS[a.model], a.dtype)
    print(f"bench_gathered: {a.model} {a.dtype}, torch threads {torch.get_num_threads()}")

    def show(lines: list[str]) -> None:  # each table as soon as it is measured
        print("\n".join(lines), flush=True)

    if "mlp" not in a.skip:
        show(mlp_table(make_lm(base, tok, "recency", "gathered", a.page_size), a.runs))
    if "e2e" not in a.skip:
        prompt = torch.randint(0, base.config.vocab_size, (1, a.e2e_prompt), generator=torch.Generator().manual_seed(2))
        show(e2e_table(base, tok, prompt, a.tokens, a.runs, a.page_size))
    if a.batches:
        show(batch_table(base, tok, a.e2e_prompt, a.tokens, a.runs, a.page_size, a.batches))
    if "attention" not in a.skip:
        show(attention_table(base, tok, a.prompt_lens, a.tokens, a.runs, a.page_size, tuple(a.criteria),
                             tuple(a.quest_tiers)))
    if "joint" not in a.skip:
        show(joint_table(base, tok, max(a.prompt_lens), a.tokens, a.runs, a.page_size))
    if "policy" not in a.skip and a.model == "smollm2":
        text = " ".join(open(REPO / "data" / "wikitext-2" / "test.txt", encoding="utf-8").read().split()[:2000])
        prompt = tok(text, add_special_tokens=False).input_ids[: a.e2e_prompt]
        show(policy_table(a.ckpt_dir, prompt, a.tokens, a.runs, a.dtype, ppl_csv=a.ppl_csv))


if __name__ == "__main__":
    main()
