"""Teacher-forced perplexity evaluation of several schedulers on the same blocks, as the reference
repository evaluates (akhauriyash/SOL).

Every batch is prefilled densely ONCE (`prefill_blocks`) and every method decodes from a clone of that
prefill with `run_episode`, so all methods score exactly the same positions with the same code path; only
the scheduler differs. Scored tokens are the T decode targets y_t = block[C + t + 1] of each block; the
prefill's own prediction of block[C] is not scored (as in the reference).

Baselines are matched to the policy's *realised* usage, which is only known after the policy has run on all
batches, so `evaluate_matched` works in two phases: (1) the policy (and any target-independent method, e.g.
dense) on every batch, (2) the baselines at the policy's realised global averages. Prefills from phase 1 are
kept for phase 2 while they fit in `keep_prefill_mb` (a 30-layer SmolLM2 batch of 16 × 512 tokens is ~380 MB
of cache); the batches that do not fit are prefilled again. The prefill is deterministic, so both routes give
identical results (tested).

Per-token NLLs are kept flat in the same order for every method: sequence-major, i.e. token (s, t) of the
s-th evaluated block is at s·T + t, so `paired_bootstrap_ci(..., seq_len=T)` can resample whole sequences.
"""
from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence, Union

import numpy as np
import torch

from utils.baselines import budget_matched_targets
from utils.cli import SOLError
from utils.data import eval_batches
from utils.engine import Episode, Prefill, Scheduler, StackedScheduler, prefill_blocks, run_episode
from utils.lm import ControlledLM

SchedulerSpec = Union[Scheduler, Callable[[], Scheduler]]
Budgets = Union[Sequence[float], torch.Tensor]


@dataclass
class MethodResult:
    """Everything one method produced over the evaluated batches."""

    name: str
    ppl: float  # exp(mean NLL over all scored tokens)
    nll: torch.Tensor  # [n_tokens] float64, sequence-major (s·T + t), same order for every method
    seq_len: int  # T, scored tokens per sequence
    usage: tuple[float, float, float]  # nominal (κ̄, ρ̄/P_MAX, q̄ = bits/16) over effective row-steps
    attn_keep: float  # realised fraction of keys attended, mean over effective row-steps
    channel_keep: float  # realised fraction of MLP input channels kept, mean over effective row-steps
    flops_ratio: float  # Σ analytic FLOPs / Σ dense FLOPs, all row-steps
    action_hist: torch.Tensor  # [A] counts of the actions chosen on effective row-steps
    n_tokens: int
    n_effective: int  # effective row-steps
    episodes: list[Episode] = field(default_factory=list, repr=False)  # kept only when asked

    @property
    def net_keep(self) -> float:
        """(κ̄ + ρ̄ + q̄) / 3, the x-axis of the Pareto plots."""
        return sum(self.usage) / 3.0

    @property
    def action_probs(self) -> torch.Tensor:
        h = self.action_hist.to(torch.float64)
        return h / h.sum() if h.sum() > 0 else h

    @property
    def mean_nll(self) -> float:
        return float(self.nll.mean())


class _Accumulator:
    def __init__(self, name: str, n_actions: int, keep_episodes: bool) -> None:
        self.name, self.keep_episodes = name, keep_episodes
        self.nll: list[torch.Tensor] = []
        self.usage_sum = torch.zeros(5, dtype=torch.float64)  # keep, prune, qratio, attn_keep, channel_keep
        self.n_eff = 0
        self.flops = 0.0
        self.dense_flops = 0.0
        self.hist = torch.zeros(n_actions, dtype=torch.long)
        self.T = 0
        self.episodes: list[Episode] = []

    def add(self, ep: Episode) -> None:
        T, N = ep.logp.shape
        self.T = T
        self.nll.append((-ep.logp).detach().to("cpu", torch.float64).transpose(0, 1).reshape(-1))
        eff = ep.effective.to(torch.bool).cpu()
        for i, k in enumerate(("keep", "prune", "qratio", "attn_keep", "channel_keep")):
            self.usage_sum[i] += ep.usage[k].detach().cpu().to(torch.float64)[eff].sum()
        self.n_eff += int(eff.sum()) * N
        self.flops += float(ep.usage["flops"].detach().cpu().to(torch.float64).sum())
        self.dense_flops += float(ep.dense_flops.to(torch.float64).sum()) * N
        acts = ep.actions.detach().cpu()[eff].reshape(-1)
        self.hist += torch.bincount(acts, minlength=self.hist.numel())
        if self.keep_episodes:
            self.episodes.append(ep)

    def result(self) -> MethodResult:
        nll = torch.cat(self.nll) if self.nll else torch.zeros(0, dtype=torch.float64)
        if self.n_eff > 0:
            m = (self.usage_sum / self.n_eff).tolist()
        else:
            m = [1.0] * 5
        return MethodResult(
            name=self.name, ppl=float(math.exp(nll.mean())) if nll.numel() else float("nan"), nll=nll,
            seq_len=self.T, usage=(m[0], m[1], m[2]), attn_keep=m[3], channel_keep=m[4],
            flops_ratio=self.flops / self.dense_flops if self.dense_flops > 0 else 1.0,
            action_hist=self.hist, n_tokens=int(nll.numel()), n_effective=self.n_eff, episodes=self.episodes)


def _budget_rows(budgets: Budgets, B: int, device) -> torch.Tensor:
    b = torch.as_tensor(budgets, dtype=torch.float32, device=device)
    if b.shape == (3,):
        return b.expand(B, 3).clone()
    if b.shape == (B, 3):
        return b
    raise ValueError(f"budgets must be (keep, prune, bits/16) or [B, 3], got shape {tuple(b.shape)}")


def _materialise(methods: Mapping[str, SchedulerSpec]) -> dict[str, Scheduler]:
    """Factories are called once per evaluation (a scheduler's state, e.g. the fixed residual, spans batches)."""
    return {name: m if isinstance(m, Scheduler) else m() for name, m in methods.items()}


def prefill_nbytes(pf: Prefill) -> int:
    """Memory held by a Prefill (cache tensors and the small per-batch tensors)."""
    n = 0
    for layer in getattr(pf.cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                n += t.numel() * t.element_size()
    for t in (pf.blocks, pf.hidden, pf.labels, pf.dense_logp, pf.dense_logprobs):
        if isinstance(t, torch.Tensor):
            n += t.numel() * t.element_size()
    return n


def _batches(blocks: np.ndarray | torch.Tensor, batch_size: int, n_batches: int | None) -> list[torch.Tensor]:
    if isinstance(blocks, torch.Tensor):
        blocks = blocks.cpu().numpy()
    out = [torch.from_numpy(np.asarray(b, dtype=np.int64)) for b in eval_batches(blocks, batch_size, n_batches)]
    if not out:
        raise ValueError(f"no full batch of {batch_size} among {len(blocks)} blocks")
    return out


def _run(lm: ControlledLM, batches: list[torch.Tensor], schedulers: Mapping[str, Scheduler],
         budgets: Budgets | Mapping[str, Budgets], context_len: int, prefills: list[Prefill | None] | None,
         keep_prefill_mb: float, on_episode: Callable[[str], None] | None, keep_episodes: bool,
         rows_per_forward: int = 0) -> tuple[dict[str, MethodResult], list[Prefill | None]]:
    accs = {name: _Accumulator(name, len(lm.actions), keep_episodes) for name in schedulers}
    names = list(schedulers)
    kept: list[Prefill | None] = []
    used = 0
    for i, blocks in enumerate(batches):
        pf = prefills[i] if prefills is not None and i < len(prefills) else None
        if pf is None:
            pf = prefill_blocks(lm, blocks, context_len)
        B = blocks.shape[0]
        rows = {n: _budget_rows(budgets[n] if isinstance(budgets, Mapping) else budgets, B, lm.device) for n in names}
        per = max(1, rows_per_forward // B)  # methods decoded side by side in one forward
        for j in range(0, len(names), per):
            group = names[j: j + per]
            if len(group) == 1:
                eps = [run_episode(lm, None, schedulers[group[0]], rows[group[0]], context_len, prefill=pf)]
            else:
                stack = StackedScheduler([schedulers[n] for n in group])
                M = len(group)
                ep = run_episode(lm, None, stack, torch.stack([rows[n] for n in group], 1).reshape(B * M, 3),
                                 context_len, M, prefill=pf)
                eps = [ep.select(stack.rows(m, B)) for m in range(M)]
            for name, ep in zip(group, eps):
                accs[name].add(ep)
                if on_episode is not None:
                    on_episode(name)
        size = prefill_nbytes(pf)
        if used + size <= keep_prefill_mb * 2 ** 20:
            kept.append(pf)
            used += size
        else:
            kept.append(None)
    return {name: a.result() for name, a in accs.items()}, kept


def evaluate_methods(lm: ControlledLM, blocks: np.ndarray | torch.Tensor, batch_size: int, n_batches: int | None,
                     methods: Mapping[str, SchedulerSpec], budgets: Budgets | Mapping[str, Budgets], *,
                     context_len: int, on_episode: Callable[[str], None] | None = None,
                     keep_episodes: bool = False, rows_per_forward: int = 0) -> dict[str, MethodResult]:
    """Run every method on the first `n_batches` full batches of `blocks` [N, C + T + 1].

    `methods`: name -> Scheduler (used as is, its state spans all batches) or a zero-argument factory
    (called once). `budgets`: the requested (κ, ρ, bits/16) each row's scheduler sees (in the policy's
    scalars), one tuple for all methods or a dict per method. Each batch is prefilled once for all methods.
    `on_episode(name)` is called after each (batch, method) episode (progress bars). With `rows_per_forward`
    >= 2·batch_size, several methods decode side by side in one batched forward (`StackedScheduler`); the
    results equal one method per forward to float rounding.
    """
    results, _ = _run(lm, _batches(blocks, batch_size, n_batches), _materialise(methods), budgets, context_len,
                      None, 0.0, on_episode, keep_episodes, rows_per_forward)
    return results


def evaluate_matched(lm: ControlledLM, blocks: np.ndarray | torch.Tensor, batch_size: int, n_batches: int | None,
                     first: Mapping[str, SchedulerSpec], make_baselines: Callable[[tuple[float, float, float]],
                                                                                 Mapping[str, SchedulerSpec]],
                     budgets: Budgets, *, context_len: int, match: str = "policy", keep_prefill_mb: float = 2048.0,
                     on_episode: Callable[[str], None] | None = None, rows_per_forward: int = 0,
                     ) -> tuple[dict[str, MethodResult], tuple[float, float, float]]:
    """Two phases: run `first` (must contain `match`, e.g. policy and dense) at the requested `budgets`, take
    `match`'s realised global usage (κ̄, ρ̄/P_MAX, q̄) as targets, then run `make_baselines(targets)` on the same
    batches with those targets as their budgets. Returns (all results, targets)."""
    if match not in first:
        raise ValueError(f"match={match!r} is not among the first-phase methods {list(first)}")
    batches = _batches(blocks, batch_size, n_batches)
    res1, kept = _run(lm, batches, _materialise(first), budgets, context_len, None, keep_prefill_mb, on_episode,
                      keep_episodes=False, rows_per_forward=rows_per_forward)
    m = res1[match]
    targets = (float(m.usage[0]), float(m.usage[1]), float(m.usage[2]))
    baselines = _materialise(make_baselines(targets))
    clash = set(baselines) & set(res1)
    if clash:
        raise ValueError(f"baseline names clash with first-phase methods: {sorted(clash)}")
    res2, _ = _run(lm, batches, baselines, targets, context_len, kept, 0.0, on_episode, keep_episodes=False,
                   rows_per_forward=rows_per_forward)
    return {**res1, **res2}, targets


def paired_bootstrap_ci(nll_a: torch.Tensor, nll_b: torch.Tensor, n_boot: int = 2000, seed: int = 0,
                        seq_len: int | None = None, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of mean(nll_a − nll_b) over paired positions.

    With `seq_len` (= T; inputs sequence-major) whole sequences are resampled: tokens of one sequence share a
    KV cache written under the same approximations, so they are not independent and token resampling would
    give too narrow an interval. Without it, token positions are resampled.
    """
    a = torch.as_tensor(nll_a, dtype=torch.float64).reshape(-1)
    b = torch.as_tensor(nll_b, dtype=torch.float64).reshape(-1)
    if a.shape != b.shape or a.numel() == 0:
        raise ValueError(f"paired NLLs must have the same non-zero length, got {a.numel()} and {b.numel()}")
    d = a - b
    if seq_len is not None:
        if d.numel() % seq_len:
            raise ValueError(f"{d.numel()} tokens are not whole sequences of {seq_len}")
        d = d.reshape(-1, seq_len).mean(1)  # equal lengths: the mean of sequence means is the token mean
    n = d.numel()
    g = torch.Generator().manual_seed(int(seed))
    chunk = max(1, (1 << 22) // n)
    means = []
    for start in range(0, n_boot, chunk):
        idx = torch.randint(n, (min(chunk, n_boot - start), n), generator=g)
        means.append(d[idx].mean(1))
    q = torch.tensor([(1 - level) / 2, 1 - (1 - level) / 2], dtype=torch.float64)
    lo, hi = torch.quantile(torch.cat(means), q).tolist()
    return float(lo), float(hi)


def dense_teacher_forced_nll(lm: ControlledLM, blocks: torch.Tensor, context_len: int) -> torch.Tensor:
    """NLL [B·T] (sequence-major) of the decode targets from one plain full forward of the unmodified model
    (no cache, no controls): the reference's `evaluate_dense_full` on the same positions."""
    C = context_len
    T = blocks.shape[1] - C - 1
    blocks = blocks.to(lm.device)
    logits = lm.prefill_all_logits(blocks[:, : C + T])[:, C: C + T]
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, blocks[:, C + 1: C + T + 1, None])[..., 0]
    return (-logp).to("cpu", torch.float64).reshape(-1)


# ---------------------------------------------------------------------------------------------------------
# the perplexity CSV: one row per eval_perplexity.py invocation
# ---------------------------------------------------------------------------------------------------------

_USAGE_COLS = ("keep", "prune_keep", "quant_ratio")
PPL_CSV_COLUMNS: tuple[str, ...] = (
    "timestamp", "ckpt_dir", "mode", "dataset_name", "split", "eval_batches", "batch_size", "n_tokens",
    "context_len", "rollout_len",
    "target_keep", "target_prune_keep", "target_quant_bits",
    "policy_ppl", "policy_keep", "policy_prune_keep", "policy_quant_ratio", "policy_net_keep",
    "policy_attn_keep_realised", "policy_channel_keep_realised", "policy_flops_ratio", "policy_action_probs",
    "fixed_ppl", "fixed_keep", "fixed_prune_keep", "fixed_quant_ratio", "fixed_net_keep",
    "fixed_attn_keep_realised", "fixed_channel_keep_realised", "fixed_flops_ratio",
    "fixed_ref_ppl", "fixed_ref_keep", "fixed_ref_prune_keep", "fixed_ref_quant_ratio", "fixed_ref_net_keep",
    "fixed_ref_flops_ratio", "delta_nll_ref_mean", "delta_nll_ref_lo", "delta_nll_ref_hi",
    "dense_ppl",
    "random_ppl_mean", "random_ppl_best", "random_ppl_trials", "random_seeds", "random_keep", "random_prune_keep",
    "random_quant_ratio", "random_net_keep", "random_flops_ratio",
    "emc_ppl", "emc_keep", "emc_prune_keep", "emc_quant_ratio", "emc_net_keep", "emc_flops_ratio",
    "dac_ppl", "dac_keep", "dac_prune_keep", "dac_quant_ratio", "dac_net_keep", "dac_flops_ratio",
    "delta_nll_mean", "delta_nll_lo", "delta_nll_hi",
    "action_tags", "sparsity_criteria", "policy_temperature", "biases", "seed", "elapsed_s",
)


class CSVHeaderError(SOLError, ValueError):
    """An existing CSV whose header differs from the columns we would append."""


def fmt(x) -> str:
    """CSV cell: '' for None, 6 significant digits for floats, str otherwise."""
    if x is None:
        return ""
    if isinstance(x, float):
        return f"{x:.6g}"
    return str(x)


def method_cells(prefix: str, r: MethodResult | None, realised: bool = False) -> dict[str, str]:
    """{prefix_ppl, prefix_keep, prefix_prune_keep, prefix_quant_ratio, prefix_net_keep, prefix_flops_ratio
    (+ realised attention/channel keep)} of one method; empty cells when it did not run."""
    vals: dict[str, object] = {f"{prefix}_ppl": None, f"{prefix}_net_keep": None, f"{prefix}_flops_ratio": None}
    vals.update({f"{prefix}_{c}": None for c in _USAGE_COLS})
    if r is not None:
        vals[f"{prefix}_ppl"] = r.ppl
        vals.update({f"{prefix}_{c}": u for c, u in zip(_USAGE_COLS, r.usage)})
        vals[f"{prefix}_net_keep"], vals[f"{prefix}_flops_ratio"] = r.net_keep, r.flops_ratio
    if realised:
        vals[f"{prefix}_attn_keep_realised"] = None if r is None else r.attn_keep
        vals[f"{prefix}_channel_keep_realised"] = None if r is None else r.channel_keep
    return {k: fmt(v) for k, v in vals.items()}


def check_csv_header(path: str, columns: Sequence[str] = PPL_CSV_COLUMNS) -> None:
    """Raise CSVHeaderError if `path` exists, is non-empty and its header is not exactly `columns`."""
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return
    with open(path, newline="", encoding="utf-8") as fh:
        header = next(csv.reader(fh), [])
    if list(header) != list(columns):
        extra = sorted(set(header) - set(columns))
        missing = sorted(set(columns) - set(header))
        raise CSVHeaderError(f"{path} has a different header (extra: {extra[:5]}, missing: {missing[:5]}, "
                             f"{len(header)} vs {len(columns)} columns); use another --csv_path")


def append_csv_row(path: str, row: Mapping[str, str], columns: Sequence[str] = PPL_CSV_COLUMNS) -> None:
    """Append one row (header first if the file is new or empty) so that it is whole or absent: under an
    exclusive lock on `path.lock` (concurrent evaluators append one after the other), the old content plus
    the new row is written beside the file and renamed over it (`utils.io.atomic_write`)."""
    import fcntl

    from utils.io import atomic_write_text

    unknown = set(row) - set(columns)
    if unknown:
        raise ValueError(f"row has columns not in the header: {sorted(unknown)}")
    if os.path.isdir(path):
        raise IsADirectoryError(f"--csv_path {path} is a directory")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(f"{path}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        check_csv_header(path, columns)
        old = open(path, encoding="utf-8", newline="").read() if os.path.exists(path) else ""
        if old and not old.endswith("\n"):
            raise CSVHeaderError(f"{path} ends in a partial line; repair or move it before appending")
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        if not old:
            w.writerow(columns)
        w.writerow([row.get(c, "") for c in columns])
        atomic_write_text(path, old + buf.getvalue())


__all__ = [
    "CSVHeaderError", "PPL_CSV_COLUMNS", "append_csv_row", "check_csv_header", "fmt", "method_cells",
    "MethodResult", "budget_matched_targets", "dense_teacher_forced_nll", "evaluate_matched", "evaluate_methods",
    "paired_bootstrap_ci", "prefill_nbytes",
]
