"""Streaming runtime: score a continuation, or generate text, one controlled decode step per token.

Built on the same single-step API (`ControlledLM.step`) and `Scheduler` interface as the episode engine,
so the policy, the fixed baseline and the dense model all go through one code path. Protocol (the reference
repository's `policy_runtime.py`, with the fixes listed in docs/deviations.md):

1. dense prefill of `context[:-1]`; the last context token is the first *controlled* token, so the first
   continuation token is already predicted under a scheduled action;
2. each continuation token (scoring) or each new token (generation) costs one `lm.step` with the
   scheduler's action, through the engine's one decode loop (`engine.DecodeLoop`, T = `episode_len`);
3. every `episode_len` controlled steps (when more follow) the dense cache saved before the episode is
   restored, the episode's input tokens are re-run densely in one multi-token forward (dense replay), and
   the scheduler is restarted (fresh policy state, budget running means reset). Every scheduler, the fixed
   baseline included, keeps its whole context here (the reference truncated the fixed baseline to ~15
   tokens at each boundary).

`score_rows` decodes several (context, continuation) rows as one batch (a row each, in lockstep; rows
never interact; the contexts must have equal lengths, so no padding changes any row's positions), and
`score_continuations` is its shared-context form. `UsageTracker` aggregates the per-step usage over many calls (nominal κ, ρ/P_MAX, bits/16 over effective
steps, realised attention / channel keep, analytic FLOPs vs a dense step, action histogram). The dense
replay is an evaluation protocol, not part of the controlled computation, so its FLOPs are not counted.

Also here: loading a policy checkpoint with its LM for the evaluation CLIs, building schedulers, and the
budget/target arguments the CLIs share.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from utils.cli import (MAX_BITS, SOLError, add_checkpoint_flags, add_target_flags, check_finite, check_mode,
                       check_targets, checkpoint_overrides)
from utils.engine import DecodeLoop, Scheduler
from utils.gathered import EXECUTIONS
from utils.lm import ControlledLM

_USAGE_LISTS = ("keep", "prune", "qratio", "attn_keep", "channel_keep", "flops")


class RuntimeInputError(SOLError, ValueError):
    """Bad runtime input (one-line message)."""


# ---- per-call statistics and their aggregation --------------------------------------------------------
@dataclass
class StreamStats:
    """Per-step record of one scoring / generation call (python scalars, one entry per controlled step)."""

    keep: list[float] = field(default_factory=list)  # nominal κ
    prune: list[float] = field(default_factory=list)  # nominal ρ / P_MAX
    qratio: list[float] = field(default_factory=list)  # bits / 16
    attn_keep: list[float] = field(default_factory=list)  # realised fraction of keys attended
    channel_keep: list[float] = field(default_factory=list)  # realised fraction of MLP channels kept
    flops: list[float] = field(default_factory=list)  # analytic FLOPs of the controlled step
    dense_flops: list[float] = field(default_factory=list)  # FLOPs of a dense step at the same position
    effective: list[bool] = field(default_factory=list)
    actions: list[int] = field(default_factory=list)  # chosen action index (-1: no scheduler, plain dense)
    kv_len: list[int] = field(default_factory=list)  # cache length incl. the current token
    logp: list[float] = field(default_factory=list)  # log p(token) under the controlled LM
    refresh_steps: list[int] = field(default_factory=list)  # step indices preceded by a dense replay
    n_episodes: int = 0
    decode_seconds: float = 0.0  # wall time after the prompt prefill (decode steps, scheduler, dense replays)

    @property
    def n_steps(self) -> int:
        return len(self.keep)

    @property
    def n_eff(self) -> int:
        return sum(self.effective)

    def _add(self, u: dict, r: int, effective: bool, action: int, kv_len: int, dense_flops: float,
             logp: float) -> None:
        """Record row r of one step; `u` maps the usage fields to per-row lists."""
        for k in _USAGE_LISTS:
            getattr(self, k).append(float(u[k][r]))
        self.dense_flops.append(dense_flops)
        self.effective.append(bool(effective))
        self.actions.append(action)
        self.kv_len.append(kv_len)
        self.logp.append(logp)


class UsageTracker:
    """Aggregates `StreamStats` over requests. Averages `*_eff` are over effective steps (over all steps
    when none was effective, as the reference); `*_all` over all controlled steps."""

    _AXES = ("keep", "prune", "qratio", "attn_keep", "channel_keep")

    def __init__(self, action_tags: Sequence[str] = ()) -> None:
        self.action_tags = tuple(action_tags)
        self.reset()

    def reset(self) -> None:
        self.n_requests = self.n_steps = self.n_eff = self.n_episodes = self.n_refresh = 0
        self.sum_all = dict.fromkeys(self._AXES, 0.0)
        self.sum_eff = dict.fromkeys(self._AXES, 0.0)
        self.flops = self.dense_flops = 0.0
        self.action_counts: dict[int, int] = {}

    def add(self, stats: StreamStats) -> None:
        self.n_requests += 1
        self.n_episodes += stats.n_episodes
        self.n_refresh += len(stats.refresh_steps)
        for i in range(stats.n_steps):
            eff = stats.effective[i]
            self.n_steps += 1
            self.n_eff += eff
            for k in self._AXES:
                v = getattr(stats, k)[i]
                self.sum_all[k] += v
                if eff:
                    self.sum_eff[k] += v
            if eff:
                a = stats.actions[i]
                self.action_counts[a] = self.action_counts.get(a, 0) + 1
        self.flops += sum(stats.flops)
        self.dense_flops += sum(stats.dense_flops)

    def mean(self, axis: str, effective: bool = True) -> float:
        if effective and self.n_eff > 0:
            return self.sum_eff[axis] / self.n_eff
        return self.sum_all[axis] / self.n_steps if self.n_steps else 1.0

    @property
    def realised_nominal(self) -> tuple[float, float, float]:
        """(κ̄, ρ̄/P_MAX, bits/16) over effective steps: what a matched fixed baseline targets."""
        return self.mean("keep"), self.mean("prune"), self.mean("qratio")

    def summary(self) -> dict:
        tag = lambda a: self.action_tags[a] if 0 <= a < len(self.action_tags) else str(a)  # noqa: E731
        hist = {tag(a): n for a, n in sorted(self.action_counts.items())}
        total = sum(hist.values())
        return {
            "n_requests": self.n_requests,
            "n_steps": self.n_steps,
            "effective_steps": self.n_eff,
            "episodes": self.n_episodes,
            "dense_refreshes": self.n_refresh,
            "keep_avg_all": self.mean("keep", False),
            "keep_avg_eff": self.mean("keep"),
            "prune_avg_all": self.mean("prune", False),
            "prune_avg_eff": self.mean("prune"),
            "quant_ratio_avg_all": self.mean("qratio", False),
            "quant_ratio_avg_eff": self.mean("qratio"),
            "attn_keep_realised_eff": self.mean("attn_keep"),
            "channel_keep_realised_eff": self.mean("channel_keep"),
            "flops_ratio": self.flops / self.dense_flops if self.dense_flops else 1.0,
            "action_hist": hist,
            "action_probs": {k: v / total for k, v in hist.items()} if total else {},
        }


# ---- dense prefix reuse -------------------------------------------------------------------------------
class PrefixMemo:
    """Remembers the dense prefill of the last set of context prefixes (multiple-choice tasks score several
    continuations after the same context; the dense prefill is deterministic, so reuse changes nothing)."""

    def __init__(self) -> None:
        self.key: tuple[tuple[int, ...], ...] | None = None
        self.value = None

    def get(self, lm: ControlledLM, prefixes: Sequence[Sequence[int]]):
        """(fresh cache copy, hidden [U, H], logits [U, V]) of the dense prefill of the U equal-length
        `prefixes`."""
        key = tuple(tuple(int(i) for i in ids) for ids in prefixes)
        if key != self.key:
            self.key, self.value = key, _dense_prefix(lm, key)
        cache, h, logits = self.value
        return lm.clone_cache(cache), h, logits


def _dense_prefix(lm: ControlledLM, prefixes: Sequence[Sequence[int]]):
    """Dense prefill of U equal-length prefixes as one batch: (cache, last hidden [U, H], logits [U, V])."""
    U, L = len(prefixes), len(prefixes[0])
    if L == 0:  # the first controlled token has no past: empty cache, zero features
        return (DynamicCache(config=lm.model.config), torch.zeros(U, lm.hidden_size, device=lm.device),
                torch.zeros(U, lm.vocab_size, device=lm.device))
    return lm.prefill(torch.tensor([list(p) for p in prefixes], dtype=torch.long, device=lm.device))


def _row_prefixes(lm: ControlledLM, contexts: list[list[int]], memo: PrefixMemo | None):
    """Dense prefill of every row's context[:-1] (rows with the same context share one prefill row), expanded
    to one cache row per context: (cache, hidden [N, H], logits [N, V])."""
    N = len(contexts)
    uniq: dict[tuple[int, ...], int] = {}
    rows = [uniq.setdefault(tuple(c[:-1]), len(uniq)) for c in contexts]
    prefixes = list(uniq)
    cache, h, logits = memo.get(lm, prefixes) if memo is not None else _dense_prefix(lm, prefixes)
    if len(prefixes) == 1:
        if N > 1:
            cache.batch_repeat_interleave(N)
            h, logits = h.expand(N, -1), logits.expand(N, -1)
    elif rows != list(range(N)):
        idx = torch.tensor(rows, dtype=torch.long, device=lm.device)
        cache.batch_select_indices(idx)
        h, logits = h[idx], logits[idx]
    return cache, h, logits


def _as_budgets(budgets, device, n: int = 1) -> torch.Tensor:
    b = torch.as_tensor(budgets, dtype=torch.float32, device=device).reshape(-1, 3)
    return b.expand(n, 3).contiguous() if b.shape[0] == 1 else b


# ---- the streaming loop -------------------------------------------------------------------------------
def _stream(lm: ControlledLM, scheduler: Scheduler | None, contexts: Sequence[Sequence[int]], budgets,
            episode_len: int, lengths: Sequence[int], pick: Callable[[int, torch.Tensor], list[int]],
            stop: Callable[[int, int], bool] | None = None, memo: PrefixMemo | None = None) -> list[StreamStats]:
    """Run N rows in lockstep, row r after its own context `contexts[r]` for up to `lengths[r]` controlled
    steps. The contexts must all have the same length (no padding: every row sees the same positions).

    `pick(i, logits[N, V])` returns the N tokens predicted at step i (the true continuation tokens when
    scoring, sampled ones when generating); each is scored and fed as that row's next input. `stop(r, y)`
    ends row r after token y. A finished row keeps stepping on a repeated token (its outputs are ignored
    and not recorded) until every row is done. `scheduler=None` = plain dense steps (actions=None).
    Rows are independent: every row has its own action, policy state and budget deviations.
    """
    ctxs = [[int(i) for i in c] for c in contexts]
    if len(ctxs) != len(lengths):
        raise RuntimeInputError(f"{len(ctxs)} contexts for {len(lengths)} rows")
    if any(not c for c in ctxs):
        raise RuntimeInputError("the context must hold at least one token")
    if len({len(c) for c in ctxs}) > 1:
        raise RuntimeInputError("rows decoded together need contexts of the same length")
    if episode_len < 1:
        raise RuntimeInputError(f"episode_len must be >= 1, got {episode_len}")
    E, N = int(episode_len), len(lengths)
    dev = lm.device
    b = _as_budgets(budgets, dev, N)
    stats = [StreamStats() for _ in range(N)]
    max_steps = max(lengths, default=0)
    if max_steps <= 0:
        return stats
    cache, h, logits = _row_prefixes(lm, ctxs, memo)
    t_start = time.perf_counter()
    ep_start = lm.clone_cache(cache) if max_steps > E else None  # dense cache before the episode
    ep_tokens: list[list[int]] = []
    x = [c[-1] for c in ctxs]
    done = [n <= 0 for n in lengths]
    for i in range(max_steps):
        if all(done):
            break
        t = i % E
        if t == 0:
            if i > 0:  # dense replay of the finished episode on top of its pre-episode dense cache
                replay = torch.tensor(ep_tokens, dtype=torch.long, device=dev).T  # [N, E]
                cache, h, logits = lm.prefill(replay, cache=ep_start)
                ep_start = lm.clone_cache(cache) if i + E < max_steps else None
                ep_tokens = []
                for r in range(N):
                    if not done[r]:
                        stats[r].refresh_steps.append(i)
            loop = DecodeLoop(lm, scheduler, b, E, kv_len=cache.get_seq_length())  # a new episode
            for r in range(N):
                if not done[r]:
                    stats[r].n_episodes += 1
        xin = torch.tensor(x, dtype=torch.long, device=dev)
        a, out = loop.step(cache, xin, h, logits)
        kv_len, u = loop.kv_len, out.usage
        ys = [int(y) for y in pick(i, out.logits)]
        logp = F.log_softmax(out.logits.float(), dim=-1).gather(-1, torch.tensor(ys, device=dev)[:, None])[:, 0]
        dense_flops = lm.dense_step_flops(kv_len)
        acts = a.tolist() if a is not None else [-1] * N
        logp_l = logp.tolist()
        ul = {k: getattr(u, k).reshape(-1).expand(N).tolist() for k in _USAGE_LISTS}
        for r in range(N):
            if done[r]:
                ys[r] = x[r]
                continue
            stats[r]._add(ul, r, u.effective, acts[r], kv_len, dense_flops, logp_l[r])
            if i + 1 >= lengths[r] or (stop is not None and stop(r, ys[r])):
                done[r] = True
        ep_tokens.append(x)
        x, h, logits = ys, out.hidden, out.logits
    seconds = time.perf_counter() - t_start
    for s in stats:
        s.decode_seconds = seconds
    return stats


def score_rows(lm: ControlledLM, scheduler: Scheduler | None, contexts: Sequence[Sequence[int]],
               conts: Sequence[Sequence[int]], budgets, episode_len: int,
               memo: PrefixMemo | None = None) -> list[tuple[float, bool, StreamStats]]:
    """Σ log p(conts[r] | contexts[r]) for N rows decoded as one batch (one row each, in lockstep; rows
    never interact, so the scores equal separate calls up to float noise). The contexts must have equal
    lengths; rows with the same context share one dense prefill."""
    conts = [[int(c) for c in cont] for cont in conts]
    greedy = [True] * len(conts)

    def pick(i: int, logits: torch.Tensor) -> list[int]:
        top = logits.argmax(-1).tolist()
        out = []
        for r, cont in enumerate(conts):
            if i < len(cont):
                greedy[r] = greedy[r] and top[r] == cont[i]
                out.append(cont[i])
            else:
                out.append(0)
        return out

    stats = _stream(lm, scheduler, contexts, budgets, episode_len, [len(c) for c in conts], pick, memo=memo)
    return [(float(sum(s.logp)), g, s) for s, g in zip(stats, greedy)]


def score_continuations(lm: ControlledLM, scheduler: Scheduler | None, context_ids: Sequence[int],
                        conts: Sequence[Sequence[int]], budgets, episode_len: int,
                        memo: PrefixMemo | None = None) -> list[tuple[float, bool, StreamStats]]:
    """`score_rows` for several continuations of one shared context."""
    return score_rows(lm, scheduler, [context_ids] * len(conts), conts, budgets, episode_len, memo)


def score_continuation(lm: ControlledLM, scheduler: Scheduler | None, context_ids: Sequence[int],
                       cont_ids: Sequence[int], budgets, episode_len: int,
                       memo: PrefixMemo | None = None) -> tuple[float, bool, StreamStats]:
    """Σ log p(cont | context) with one controlled step per continuation token.

    Returns (sum log-prob, is_greedy: every continuation token is the argmax of its controlled logits,
    per-step stats). `budgets` = requested (κ, ρ/P_MAX, bits/16).
    """
    return score_continuations(lm, scheduler, context_ids, [cont_ids], budgets, episode_len, memo)[0]


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                generator: torch.Generator | None = None) -> int:
    """Next token from logits [V]: argmax when temperature <= 0; else softmax(logits / T) filtered by top-k
    (when > 0) and then nucleus top-p (when < 1)."""
    if temperature is None or temperature <= 0:
        return int(logits.argmax())
    z = logits.float() / temperature
    if top_k and top_k > 0:
        kth = torch.topk(z, min(int(top_k), z.numel())).values[-1]
        z = z.masked_fill(z < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_z, order = torch.sort(z, descending=True)
        probs = torch.softmax(sorted_z, dim=-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix whose mass reaches top_p
        z = z.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    probs = torch.softmax(z, dim=-1)
    gen_dev = generator.device if generator is not None else probs.device
    return int(torch.multinomial(probs.to(gen_dev), 1, generator=generator))


def generate(lm: ControlledLM, scheduler: Scheduler | None, prompt_ids: Sequence[int], max_new_tokens: int,
             budgets, episode_len: int, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
             generator: torch.Generator | None = None, stop_fn: Callable[[list[int]], bool] | None = None,
             stop_ids: Sequence[int] = ()) -> tuple[list[int], StreamStats]:
    """Autoregressive generation with one controlled step per new token and dense replay every
    `episode_len` tokens. Stops after `max_new_tokens`, after a token in `stop_ids` (kept in the output),
    or when `stop_fn(generated_ids)` is true. Returns (generated ids, stats; stats.logp = controlled
    log-prob of each generated token)."""
    out: list[int] = []
    stop_set = {int(s) for s in stop_ids}

    def pick(i: int, logits: torch.Tensor) -> list[int]:
        y = sample_next(logits[0], temperature, top_p, top_k, generator)
        out.append(y)
        return [y]

    def stop(r: int, y: int) -> bool:
        return y in stop_set or (stop_fn is not None and bool(stop_fn(out)))

    (stats,) = _stream(lm, scheduler, [prompt_ids], budgets, episode_len, [int(max_new_tokens)], pick, stop)
    return out, stats


def dense_token_logprobs(lm: ControlledLM, prefix_ids: Sequence[int], cont_ids: Sequence[int]) -> torch.Tensor:
    """log p(cont_i | prefix, cont_<i) under the plain dense model, one forward; [len(cont)]."""
    prefix, cont = [int(i) for i in prefix_ids], [int(i) for i in cont_ids]
    if not prefix:
        raise RuntimeInputError("dense scoring needs at least one prefix token")
    if not cont:
        return torch.zeros(0)
    ids = torch.tensor([prefix + cont], dtype=torch.long, device=lm.device)
    logits = lm.prefill_all_logits(ids[:, :-1])[0, len(prefix) - 1:]
    return F.log_softmax(logits.float(), dim=-1).gather(-1, ids[0, len(prefix):, None])[:, 0].cpu()


# ---- checkpoint loading and schedulers for the CLIs -----------------------------------------------------
@dataclass
class EvalBundle:
    cfg: object
    lm: ControlledLM
    policy: torch.nn.Module
    ckpt_path: str


def load_eval_bundle(ckpt_dir: str, mode: str = "latest", device: str | None = None,
                     trust: bool = False, execution: str = "simulated",
                     overrides: Mapping[str, object] | None = None) -> EvalBundle:
    """The checkpoint's training config, the frozen LM wrapped as a ControlledLM (in `execution` mode) and
    the policy (eval), through the evaluators' shared loader (`utils.checkpoint.load_policy_eval`);
    `overrides` replace config fields (`utils.cli.checkpoint_overrides`: dtype, feedback gain, logit bound;
    None values keep the config's)."""
    from utils.checkpoint import find_checkpoint
    from utils.checkpoint import load_policy_eval

    cfg, lm, policy = load_policy_eval(ckpt_dir, mode, overrides, device=device, trust=trust,
                                       execution=execution)
    return EvalBundle(cfg, lm, policy, str(find_checkpoint(ckpt_dir, mode)))


def make_scheduler(kind: str, lm: ControlledLM, policy=None, *, policy_temperature: float = 0.6,
                   greedy: bool = True, seed: int = 0, biases=(0.0, 0.0, 0.0),
                   fixed_targets: tuple[float, float, float] | None = None) -> Scheduler | None:
    """Scheduler factory: 'policy', 'fixed' (targets = (κ, ρ/P_MAX, bits/16) usage ratios), 'dense'
    (DenseScheduler: the dense action, counted as controlled steps) or 'plain' (None: actions=None)."""
    from utils.schedulers import DenseScheduler, PolicyScheduler

    if kind == "policy":
        if policy is None:
            raise RuntimeInputError("the policy scheduler needs a policy")
        gen = torch.Generator(device=lm.device).manual_seed(int(seed))
        return PolicyScheduler(policy, temperature=policy_temperature, greedy=greedy, generator=gen,
                               biases=tuple(float(b) for b in biases), actions=lm.actions)
    if kind == "fixed":
        from utils.baselines import FixedScheduler

        if fixed_targets is None:
            raise RuntimeInputError("the fixed scheduler needs targets")
        return FixedScheduler(tuple(float(v) for v in fixed_targets))
    if kind == "dense":
        return DenseScheduler()
    if kind == "plain":
        return None
    raise RuntimeInputError(f"unknown scheduler kind {kind!r}; expected policy, fixed, dense or plain")


def add_policy_args(p: argparse.ArgumentParser) -> None:
    """Flags shared by eval_downstream.py and gen_policy_vs_dense.py (reference names)."""
    add_checkpoint_flags(p)
    p.add_argument("--episode_len", type=int, default=None,
                   help="controlled steps between dense replays (default: the checkpoint's rollout_len)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--greedy_policy", dest="greedy_policy", action="store_true", default=True,
                   help="argmax policy actions (default)")
    g.add_argument("--stochastic_policy", dest="greedy_policy", action="store_false",
                   help="sample policy actions from the tempered distribution")
    p.add_argument("--policy_temperature", type=float, default=0.6, help="policy logit temperature")
    p.add_argument("--sparsity_bias", type=float, default=None, help="logit bias against dense κ (default: cfg)")
    p.add_argument("--prune_bias", type=float, default=None, help="logit bias against dense ρ (default: cfg)")
    p.add_argument("--quant_bias", type=float, default=None, help="logit bias against high bits (default: cfg)")
    add_target_flags(p)
    p.add_argument("--seed", type=int, default=1234, help="random seed")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: the checkpoint's device / auto)")
    p.add_argument("--execution", choices=EXECUTIONS, default="simulated",
                   help="simulated (default; the reference: dense math, then keys masked and MLP channels zeroed) "
                        "or gathered (controlled decode steps read only the kept keys and MLP input channels: "
                        "same actions, same logits up to float rounding, faster at batch 1 on CPU)")


def check_policy_args(args) -> None:
    """Range checks before anything is loaded; raises RuntimeInputError with a one-line message."""
    check_targets(args.tgt_keep, args.tgt_prune_keep, args.tgt_quant_bits, RuntimeInputError)
    checkpoint_overrides(args, RuntimeInputError)
    check_finite({n: getattr(args, n) for n in ("sparsity_bias", "prune_bias", "quant_bias", "policy_temperature")},
                 RuntimeInputError)
    if args.episode_len is not None and args.episode_len < 1:
        raise RuntimeInputError(f"--episode_len must be >= 1, got {args.episode_len}")
    check_mode(args.mode, RuntimeInputError)
    if args.policy_temperature <= 0:
        raise RuntimeInputError(f"--policy_temperature must be > 0, got {args.policy_temperature}")
    if not Path(args.ckpt_dir).is_dir():
        raise RuntimeInputError(f"checkpoint directory not found: {args.ckpt_dir}")


def resolve_policy_settings(args, cfg) -> tuple[tuple[float, float, float], tuple[float, float, float], int]:
    """(budgets (κ, ρ, bits/16), biases, episode_len) from the CLI, else the checkpoint's eval_* / C_target*."""
    from utils.config import eval_targets

    keep, prune, bits = eval_targets(cfg, args.tgt_keep, args.tgt_prune_keep, args.tgt_quant_bits)
    biases = tuple(float(v if v is not None else d) for v, d in (
        (args.sparsity_bias, cfg.eval_sparsity_bias), (args.prune_bias, cfg.eval_prune_bias),
        (args.quant_bias, cfg.eval_quant_bias)))
    E = args.episode_len if args.episode_len is not None else cfg.rollout_len
    if E > cfg.policy_max_len:
        raise RuntimeInputError(f"--episode_len {E} exceeds the policy's policy_max_len={cfg.policy_max_len}")
    return (float(keep), float(prune), float(bits) / MAX_BITS), biases, int(E)
