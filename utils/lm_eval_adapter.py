"""lm-evaluation-harness adapter: an `lm_eval` `TemplateLM` whose log-likelihoods and generations run through
the SOL streaming runtime (`utils/runtime.py`), so every continuation token is one controlled decode step
under the policy, the fixed baseline or the dense model, with dense episode replay every `episode_len`.
lm-eval's `TemplateLM` does the request plumbing (`loglikelihood` → `_loglikelihood_tokens`, the empty-context
rule, moving trailing context whitespace into the continuation); what is ours is below.

Choices:
* Tokenisation. `loglikelihood` tokenises context + continuation *jointly* (trailing context whitespace
  moved to the continuation first, as lm-eval's HF model does) and, when the context's own ids are a
  prefix of the joint ids (the normal case), scores the rest: so context + continuation ids are exactly
  the model's tokenisation of the full text. When a token straddles the boundary (the context's last
  characters merge with the continuation's first), the continuation is tokenised on its own, so that
  every choice of a multiple-choice item is scored over exactly its own characters after the same
  context (lm-eval's HF model would score a span that starts inside the context). The reference always
  tokenises the two separately. No special tokens are added, except a BOS when the tokenizer itself adds
  one to plain text. An empty context becomes the prefix token (BOS if the tokenizer has one, else
  EOS), by `TemplateLM`'s rule.
* Truncation. Each context is left-truncated so that it and its own continuation fit the model's
  `max_position_embeddings` (or `max_length`); a continuation longer than that is an error.
* `loglikelihood_rolling` uses lm-eval's own rolling windows (prefix token, disjoint windows of
  `max_length`), each window scored with the same runtime; returns one float per document.
* `generate_until` is greedy unless the request asks for sampling (`do_sample`/`temperature` > 0), stops at
  any `until` string (default: the EOS text) or at `max_gen_toks` (request, else the adapter default), and
  also at the EOS token. No prompt rewriting (the reference's "Answer:" → `\\boxed{}` rewrite is not kept).
* Batching. `loglikelihood` packs the requests into batches of up to `batch_size` rows, one row per
  continuation, all decoded in one batched step per token: rows whose contexts have the same token
  length (no padding, so every row keeps its own positions), the choices of one item together,
  shortest contexts first (`plan_batches`). Rows are independent: own actions, own policy state, own
  budget deviations. Scores equal one-at-a-time scoring up to float noise (~1e-5: batched matmuls take
  other kernels), which a discrete choice at a threshold (a QUEST page or an MLP channel at the cut, a
  quantization rounding tie) can occasionally amplify on a single token, so keep `batch_size` fixed
  across runs you compare. Only the fixed baseline's dither sees the rows together (it balances usage
  across the rows of a step as well as over time, like the reference's micro-batched FixedHarnessLM).
  On a CPU a decode step is bound by reading the weights, so 32 rows cost about twice 4 rows
  (benchmarks/bench_downstream.py). Rolling windows and generations run one at a time.
  Rows with the same context share one dense prefill.
"""
from __future__ import annotations

import difflib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from tqdm import tqdm

from utils.cli import SOLError
from utils.engine import Scheduler
from utils.io import atomic_write_text
from utils.lm import ControlledLM
from utils.runtime import PrefixMemo, UsageTracker, generate, score_continuations, score_rows

REPO_ROOT = Path(__file__).resolve().parents[1]
LOCAL_TASKS_DIR = REPO_ROOT / "tasks"


class TaskNameError(SOLError, ValueError):
    """Unknown lm-eval task name (one-line message with close matches)."""


class SOLHarnessLM(TemplateLM):
    """An lm-eval model over a ControlledLM and one scheduler (None = plain dense steps, actions=None).

    One scheduler instance serves every request; the runtime calls its `start()` at each episode, so a
    fixed baseline's dither residual carries over the whole run. Usage is aggregated in `self.tracker`.
    """

    def __init__(self, lm: ControlledLM, scheduler: Scheduler | None, budgets: Sequence[float], episode_len: int,
                 *, batch_size: int = 1, max_length: int | None = None, max_gen_toks: int = 256,
                 tracker: UsageTracker | None = None, progress: bool = True, name: str = "sol", seed: int = 0) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self.lm, self.scheduler, self.episode_len = lm, scheduler, int(episode_len)
        self.budgets = tuple(float(b) for b in budgets)
        self.tokenizer = lm.tokenizer
        self.max_length = int(max_length or getattr(lm.model.config, "max_position_embeddings", 2048))
        self.max_gen_toks = int(max_gen_toks)
        self.tracker = tracker if tracker is not None else UsageTracker(lm.actions.tags)
        self.progress, self.name = progress, name
        self._memo = PrefixMemo()
        self._gen = torch.Generator().manual_seed(int(seed))
        self._device = lm.device
        self._add_bos = self._tokenizer_adds_bos()

    # ---- tokenisation ---------------------------------------------------------------------------------
    def _tokenizer_adds_bos(self) -> bool:
        bos = self.tokenizer.bos_token_id
        if bos is None:
            return False
        ids = self.tokenizer("a", add_special_tokens=True).input_ids
        return len(ids) > 0 and ids[0] == bos

    @property
    def prefix_token_id(self) -> int:
        """Token a document is conditioned on when there is no context (lm-eval HF convention)."""
        t = self.tokenizer
        return t.bos_token_id if t.bos_token_id is not None else t.eos_token_id

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    def tok_encode(self, text: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """Token ids of `text` without special tokens (a BOS is added by `_encode_pair` when the tokenizer
        adds one to plain text)."""
        return list(self.tokenizer(text, add_special_tokens=bool(add_special_tokens)).input_ids)

    def tok_decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def _bos(self) -> list[int]:
        return [self.tokenizer.bos_token_id] if self._add_bos else []

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """The (context ids, continuation ids) `loglikelihood` scores for one request: `TemplateLM`'s rule for an
        empty context, else `_encode_pair`."""
        if context == "":
            cont = self.tok_encode(continuation)
            return ([self.prefix_token_id], cont) if not cont or cont[0] != self.prefix_token_id else (cont[:1], cont[1:])
        return self._encode_pair(context, continuation)

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids) of a non-empty context by joint tokenisation, split at the common
        prefix; the continuation alone when a token straddles the boundary (see module doc)."""
        n_space = len(context) - len(context.rstrip())
        if n_space:
            context, continuation = context[:-n_space], context[-n_space:] + continuation
        whole = self.tok_encode(context + continuation)
        ctx = self.tok_encode(context)
        if whole[: len(ctx)] == ctx and len(whole) > len(ctx):
            return self._bos() + ctx, whole[len(ctx):]
        # a token straddles the boundary: score exactly the continuation's own characters instead
        return self._bos() + ctx, self.tok_encode(continuation)

    def _truncate(self, ctx: list[int], cont: list[int]) -> list[int]:
        """Left-truncate the context so that the processed tokens (ctx + cont[:-1]) fit max_length."""
        room = self.max_length + 1 - len(cont)
        if room < 1:
            raise ValueError(f"continuation of {len(cont)} tokens does not fit max_length={self.max_length}")
        return ctx[-room:]

    # ---- lm-eval API ----------------------------------------------------------------------------------
    def _bar(self, items: list, desc: str) -> Iterable:
        return tqdm(items, desc=f"{self.name} {desc}", disable=not self.progress, dynamic_ncols=True)

    def score_ids(self, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
        """Σ log p(cont | ctx) through the runtime (records usage)."""
        return self.score_batch(ctx, [cont])[0]

    def loglikelihood(self, requests, disable_tqdm: bool | None = None) -> list[tuple[float, bool]]:
        return super().loglikelihood(list(requests), disable_tqdm=not self.progress if disable_tqdm is None
                                     else disable_tqdm)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """Score tokenised requests `((context, continuation), context ids, continuation ids)` in batches of
        rows with equal context lengths (`plan_batches`), each context left-truncated to fit."""
        rows = [(self._truncate(ctx, cont) if cont else ctx, cont) for _, ctx, cont in requests]
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc=f"{self.name} loglikelihood", disable=disable_tqdm, dynamic_ncols=True)
        for i, (_, cont) in enumerate(rows):
            if not cont:  # nothing to score
                out[i] = (0.0, True)
                bar.update(1)
        for batch in plan_batches([(ctx, cont) for ctx, cont in rows], self.batch_size):
            scored = score_rows(self.lm, self.scheduler, [rows[i][0] for i in batch], [rows[i][1] for i in batch],
                                self.budgets, self.episode_len, memo=self._memo)
            for i, (logp, greedy, stats) in zip(batch, scored):
                self.tracker.add(stats)
                out[i] = (logp, greedy)
            bar.update(len(batch))
        bar.close()
        for (args, _, _), r in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood", args, r)
        return out

    def score_batch(self, ctx: list[int], conts: list[list[int]]) -> list[tuple[float, bool]]:
        """Σ log p(cont | ctx) for several continuations of one context, decoded as one batch."""
        res: list[tuple[float, bool] | None] = [(0.0, True) if not c else None for c in conts]
        live = [i for i, c in enumerate(conts) if c]
        if live:
            longest = max(len(conts[i]) for i in live)
            ctx = self._truncate(ctx, [0] * longest)
            scored = score_continuations(self.lm, self.scheduler, ctx, [conts[i] for i in live], self.budgets,
                                         self.episode_len, memo=self._memo)
            for i, (logp, greedy, stats) in zip(live, scored):
                self.tracker.add(stats)
                res[i] = (logp, greedy)
        return res

    def rolling_windows(self, text: str) -> list[tuple[list[int], list[int]]]:
        """lm-eval's disjoint rolling windows over the text, conditioned on the prefix token."""
        return [lm_utils.make_disjoint_window(w) for w in lm_utils.get_rolling_token_windows(
            token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
            max_seq_len=self.max_length, context_len=1)]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for req in self._bar(list(requests), "loglikelihood_rolling"):
            (text,) = req.args
            total = sum(self.score_ids(list(c), list(p))[0] for c, p in self.rolling_windows(text))
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            out.append(total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for req in self._bar(list(requests), "generate_until"):
            context, gen_kwargs = req.args
            text = self.generate_text(context, dict(gen_kwargs or {}))
            self.cache_hook.add_partial("generate_until", req.args, text)
            out.append(text)
        return out

    def generate_text(self, context: str, gen_kwargs: dict[str, Any]) -> str:
        until = gen_kwargs.pop("until", None)
        until = [until] if isinstance(until, str) else list(until or [])
        eos_text = self.tokenizer.decode([self.eot_token_id]) if self.eot_token_id is not None else None
        if not until and eos_text:
            until = [eos_text]
        max_new = int(gen_kwargs.pop("max_gen_toks", gen_kwargs.pop("max_new_tokens", self.max_gen_toks)))
        temperature = float(gen_kwargs.pop("temperature", 0.0) or 0.0)
        do_sample = bool(gen_kwargs.pop("do_sample", temperature > 0))
        if not do_sample:
            temperature = 0.0
        top_p = float(gen_kwargs.pop("top_p", 1.0) or 1.0)
        top_k = int(gen_kwargs.pop("top_k", 0) or 0)
        ctx = self._bos() + self.tok_encode(context) if context else [self.prefix_token_id]
        ctx = ctx[-max(1, self.max_length - max_new):]
        max_new = max(0, min(max_new, self.max_length - len(ctx) + 1))
        stops = [u for u in until if u]

        def stop_fn(ids: list[int]) -> bool:
            text = self.tok_decode(ids)
            return any(s in text for s in stops)

        ids, stats = generate(self.lm, self.scheduler, ctx, max_new, self.budgets, self.episode_len,
                              temperature=temperature, top_p=top_p, top_k=top_k, generator=self._gen,
                              stop_fn=stop_fn if stops else None,
                              stop_ids=[self.eot_token_id] if self.eot_token_id is not None else [])
        self.tracker.add(stats)
        text = self.tok_decode(ids)
        for s in stops:
            text = text.split(s)[0]
        return text

    def get_model_info(self) -> dict:
        return {"sol_scheduler": self.name, "sol_budgets": list(self.budgets), "sol_episode_len": self.episode_len}


def plan_batches(rows: Sequence[tuple[Sequence[int], Sequence[int]]], batch_size: int) -> list[list[int]]:
    """Indices of the non-empty (context, continuation) rows, packed into batches that `score_rows` can
    decode together: equal context lengths, at most `batch_size` rows each.

    Rows with the same context (the choices of one item) stay in one batch unless they alone exceed
    `batch_size`; items are taken shortest context first and, within a length, shortest longest
    continuation first, so the rows of a batch finish at nearly the same step. Every row still gets its
    own actions, policy state and budget deviations; only the packing (and so the float noise of the
    batched kernels, and the fixed baseline's dither across rows) depends on `batch_size`.
    """
    items: dict[tuple[int, ...], list[int]] = {}
    for i, (ctx, cont) in enumerate(rows):
        if cont:
            items.setdefault(tuple(ctx), []).append(i)
    order = sorted(items.values(), key=lambda ix: (len(rows[ix[0]][0]), max(len(rows[i][1]) for i in ix), ix[0]))
    batches: list[list[int]] = []
    cur: list[int] = []
    cur_len = -1
    for ix in order:
        n_ctx = len(rows[ix[0]][0])
        if cur and (n_ctx != cur_len or len(cur) + len(ix) > batch_size):
            batches.append(cur)
            cur = []
        cur_len = n_ctx
        for j in range(0, len(ix), batch_size):  # an item larger than a batch is split
            chunk = ix[j: j + batch_size]
            if cur and len(cur) + len(chunk) > batch_size:
                batches.append(cur)
                cur = []
            cur.extend(chunk)
    if cur:
        batches.append(cur)
    return batches


# ---- tasks ------------------------------------------------------------------------------------------------
def _names_cache_path() -> Path:
    import lm_eval

    root = Path(lm_eval.__file__).parent / "tasks"
    version = getattr(lm_eval, "__version__", "unknown")
    stamp = int(root.stat().st_mtime)
    base = Path(os.environ.get("SOL_CACHE", Path.home() / ".cache" / "sol")).expanduser()
    return base / f"lm_eval_task_names_{version}_{stamp}.json"


def builtin_task_names() -> set[str]:
    """Names of lm-eval's own tasks, groups and tags (indexing them takes ~15 s, so the list is cached)."""
    path = _names_cache_path()
    try:
        return set(json.loads(path.read_text()))
    except (OSError, ValueError):
        pass
    from lm_eval.tasks import TaskManager

    tm = TaskManager()
    names = sorted(set(tm.all_tasks) | set(tm.all_groups) | set(tm.all_tags))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(names))
    except OSError:
        pass
    return set(names)


def make_task_manager(task_names: Sequence[str], include_path: str | Path = LOCAL_TASKS_DIR):
    """A TaskManager that knows our shipped tasks (tasks/) and, only when a requested name is not one of
    them, lm-eval's own. Unknown names raise TaskNameError listing close matches."""
    from lm_eval.tasks import TaskManager

    names = [n for n in task_names if n]
    if not names:
        raise TaskNameError("no task given")
    local = TaskManager(include_path=str(include_path), include_defaults=False)
    local_names = set(local.all_tasks) | set(local.all_groups) | set(local.all_tags)
    missing = [n for n in names if n not in local_names]
    if not missing:
        return local
    builtin = builtin_task_names()
    unknown = [n for n in missing if n not in builtin]
    if unknown:
        pool = sorted(local_names | builtin)
        parts = []
        for n in unknown:
            close = difflib.get_close_matches(n, pool, n=5, cutoff=0.6)
            parts.append(f"{n!r}" + (f" (close: {', '.join(close)})" if close else ""))
        raise TaskNameError(f"unknown task {'; '.join(parts)}; local tasks: {', '.join(sorted(local_names))}")
    return TaskManager(include_path=str(include_path))


# ---- metrics ----------------------------------------------------------------------------------------------
_METRIC_ORDER = ("acc_norm,none", "acc_norm", "acc,none", "acc", "exact_match,none", "exact_match")


def task_accuracy(block: dict) -> tuple[str | None, float | None]:
    """(metric key, value) of one task's results: acc_norm first, then acc, then exact_match (reference
    order); else any acc/exact_match-like number; else the first number."""
    for k in _METRIC_ORDER:
        if isinstance(block.get(k), (int, float)):
            return k, float(block[k])
    numeric = [(k, v) for k, v in block.items() if isinstance(v, (int, float)) and "stderr" not in k
               and not isinstance(v, bool)]
    for k, v in numeric:
        if "acc" in k or "exact_match" in k:
            return k, float(v)
    return (numeric[0][0], float(numeric[0][1])) if numeric else (None, None)


def item_scores(results: dict, metric: dict[str, str]) -> dict[str, list[float]]:
    """Per-item values of each task's accuracy metric (`metric`: task -> key as in `accuracy_summary`, e.g.
    "acc_norm,none"), ordered by doc_id, from a run with `log_samples=True`: what a paired comparison of two
    methods over the same items needs. Tasks without logged samples are left out."""
    out = {}
    for task, rows in (results.get("samples") or {}).items():
        key = metric.get(task)
        if not key or not rows:
            continue
        name = key.split(",")[0]
        rows = sorted(rows, key=lambda r: r["doc_id"])
        if all(isinstance(r.get(name), (int, float)) for r in rows):
            out[task] = [float(r[name]) for r in rows]
    return out


def accuracy_summary(results: dict) -> dict:
    """{"per_task": {task: value}, "metric": {task: key}, "macro": mean over leaf tasks}. Group entries are
    reported but left out of the macro average (their subtasks are in it)."""
    per_task, metric = {}, {}
    groups = set((results.get("groups") or {}).keys())
    for task, block in (results.get("results") or {}).items():
        k, v = task_accuracy(block)
        if v is not None:
            per_task[task], metric[task] = v, k
    leaves = [v for t, v in per_task.items() if t not in groups] or list(per_task.values())
    return {"per_task": per_task, "metric": metric, "macro": sum(leaves) / len(leaves) if leaves else None}
