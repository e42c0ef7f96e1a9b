"""The episode engine: one code path for GRPO training and for every evaluator.

An episode over blocks [B, C + T + 1]: a dense prefill of the first C tokens, then T teacher-forced decode
steps over the true tokens x_t = block[C + t], each scored on y_t = block[C + t + 1]. The prefill cache is
repeated `group_size` times (K counterfactual rollouts per input for GRPO; 1 for evaluation) and all rows
decode in one batched forward per step. What differs between the learned policy, the fixed, random and
heuristic baselines and the dense model is only the `Scheduler` that picks each row's action per step.

The dense reference (the unmodified model's distribution at each decode position, used for the KL reward
and for logging) comes from the same prefill forward: the prefill runs over C + T tokens, which is the
dense teacher-forced rollout, and the cache is then cropped back to C.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from utils.attention import is_effective
from utils.lm import ControlledLM, StepOutput, StepUsage
from utils.records import StepScalars

USAGE_FIELDS = ("keep", "prune", "qratio", "attn_keep", "channel_keep", "flops")


@dataclass
class StepObs:
    """What a scheduler may look at before choosing the actions of decode step t (all rows)."""

    t: int
    T: int
    input_ids: torch.Tensor  # [N] token about to be processed
    hidden: torch.Tensor  # [N, H] final-norm hidden of the previous LM call
    prev_logits: torch.Tensor  # [N, V] logits of the previous LM call
    scalars: torch.Tensor  # [N, 10] policy scalar features (`step_scalars`)
    effective: bool  # False: this step runs dense whatever is chosen


class Scheduler:
    """Chooses one action index per row per decode step. Subclasses override `choose`."""

    name = "scheduler"
    uses_lm_scalars = True  # reads the surprisal/entropy scalars; False skips their full-vocabulary softmax

    def start(self, lm: ControlledLM, budgets: torch.Tensor, group_size: int) -> None:
        """Called once per episode before step 0; budgets [N, 3] = requested (κ, ρ, bits/16) per row, rows
        b·group_size … b·group_size + group_size − 1 decoding the same input. Subclasses that need the
        budgets or the grouping keep what they need; the base keeps the LM."""
        self.lm = lm

    def choose(self, obs: StepObs) -> torch.Tensor:
        raise NotImplementedError

    def observe(self, out: StepOutput) -> None:
        """Called after each decode step with its output (default: nothing)."""


class StackedScheduler(Scheduler):
    """Several schedulers decoded in ONE batched episode: over a prefill of B blocks repeated M = len(parts)
    times (`run_episode(..., group_size=M)`), rows b·M + m belong to part m. Each part sees only its own B
    rows, in block order, exactly as if it ran alone on the B blocks (its state, e.g. the fixed baseline's
    residual, carries across episodes as usual); `Episode.select(rows(m))` gives its episode back."""

    name = "stacked"

    def __init__(self, parts: list[Scheduler]) -> None:
        self.parts = list(parts)
        self.uses_lm_scalars = any(p.uses_lm_scalars for p in self.parts)

    def rows(self, m: int, n_blocks: int) -> torch.Tensor:
        return torch.arange(n_blocks) * len(self.parts) + m

    def start(self, lm: ControlledLM, budgets: torch.Tensor, group_size: int) -> None:
        super().start(lm, budgets, group_size)
        M = len(self.parts)
        if group_size != M:
            raise ValueError(f"a StackedScheduler of {M} parts needs group_size={M}, got {group_size}")
        self._idx = [self.rows(m, budgets.shape[0] // M).to(budgets.device) for m in range(M)]
        for part, idx in zip(self.parts, self._idx):
            part.start(lm, budgets[idx], 1)

    def choose(self, obs: StepObs) -> torch.Tensor:
        a = torch.empty_like(obs.input_ids)
        for part, idx in zip(self.parts, self._idx):
            a[idx] = part.choose(StepObs(obs.t, obs.T, obs.input_ids[idx], obs.hidden[idx], obs.prev_logits[idx],
                                         obs.scalars[idx], obs.effective))
        return a

    def observe(self, out: StepOutput) -> None:
        u = out.usage
        for part, idx in zip(self.parts, self._idx):
            part.observe(StepOutput(out.logits[idx], out.hidden[idx], StepUsage(
                u.keep[idx], u.prune[idx], u.qratio[idx], u.attn_keep[idx], u.channel_keep[idx], u.flops[idx],
                u.effective)))


@dataclass
class Episode:
    """Per-step records of one batch of episodes, time-major [T, N]."""

    actions: torch.Tensor
    logp: torch.Tensor  # log p(y_t) under the controlled LM
    usage: dict[str, torch.Tensor]  # USAGE_FIELDS -> [T, N]
    effective: torch.Tensor  # [T] bool
    budgets: torch.Tensor  # [N, 3]
    dense_logp: torch.Tensor  # [T, B] log p(y_t) under the dense model
    kl: torch.Tensor | None  # [T, N] KL(dense || controlled), when requested
    dense_flops: torch.Tensor  # [T] FLOPs of a dense step at each position
    group_size: int = 1
    extras: dict = field(default_factory=dict)

    def rows(self, start: int, stop: int) -> "Episode":
        """The episodes of rows start..stop−1 (whole groups: both multiples of `group_size`), e.g. one rollout
        batch out of several decoded together."""
        K = self.group_size
        if start % K or stop % K:
            raise ValueError(f"rows {start}:{stop} split a group of {K} rollouts")
        return Episode(
            actions=self.actions[:, start:stop], logp=self.logp[:, start:stop],
            usage={k: v[:, start:stop] for k, v in self.usage.items()}, effective=self.effective,
            budgets=self.budgets[start:stop], dense_logp=self.dense_logp[:, start // K: stop // K],
            kl=None if self.kl is None else self.kl[:, start:stop], dense_flops=self.dense_flops, group_size=K)

    def select(self, idx: torch.Tensor) -> "Episode":
        """The episodes of rows `idx` as episodes of their own (group size 1), e.g. one method's rows out of a
        `StackedScheduler` episode."""
        idx = idx.to(self.actions.device)
        blocks = torch.div(idx, self.group_size, rounding_mode="floor").to(self.dense_logp.device)
        return Episode(
            actions=self.actions[:, idx], logp=self.logp[:, idx], usage={k: v[:, idx] for k, v in self.usage.items()},
            effective=self.effective, budgets=self.budgets[idx], dense_logp=self.dense_logp[:, blocks],
            kl=None if self.kl is None else self.kl[:, idx], dense_flops=self.dense_flops, group_size=1)

    def usage_means(self) -> torch.Tensor:
        """[N, 3] nominal (κ, ρ/P_MAX, bits/16) averaged over effective steps (dense if none)."""
        usage = torch.stack([self.usage[k] for k in ("keep", "prune", "qratio")], dim=-1)  # [T, N, 3]
        if not bool(self.effective.any()):
            return torch.ones_like(usage[0])
        eff = self.effective.to(usage.device, usage.dtype)[:, None, None]
        return (usage * eff).sum(0) / eff.sum()

    @property
    def nll(self) -> torch.Tensor:
        return -self.logp


step_scalars = StepScalars.build  # the policy's scalars of one step; layout in utils.records.StepScalars


class DecodeLoop:
    """The one controlled decode loop: per step, the policy scalars from the row budgets and the usage of the
    episode so far, the scheduler's choice, one batched `ControlledLM.step`, the scheduler's observation and
    the usage sums. Teacher-forced episodes (`run_episode`: training and every evaluator) and streaming
    scoring and generation (`utils.runtime`) differ only in where each step's input token comes from and
    what they record, so both drive this object; one instance is one episode of up to T steps.

    `scheduler=None` runs plain dense steps (actions=None, no scalars). `kv_len` is the cache length before
    the first step."""

    def __init__(self, lm: ControlledLM, scheduler: "Scheduler | None", budgets: torch.Tensor, T: int,
                 kv_len: int, group_size: int = 1) -> None:
        self.lm, self.scheduler, self.budgets, self.T = lm, scheduler, budgets, T
        self.t, self.kv_len, self.n_eff = 0, kv_len, 0
        self.usage_sum = torch.zeros(budgets.shape[0], 3, device=budgets.device)
        if scheduler is not None:
            scheduler.start(lm, budgets, group_size)

    def step(self, cache, x: torch.Tensor, hidden: torch.Tensor, prev_logits: torch.Tensor
             ) -> tuple[torch.Tensor | None, StepOutput]:
        """Decode input tokens x [N] on `cache` (appended in place); hidden / prev_logits are the previous
        LM call's. Returns (the actions taken [N] or None, the step's output)."""
        lm, sched, t = self.lm, self.scheduler, self.t
        self.kv_len += 1  # the cache length including this step's token
        effective = is_effective(self.kv_len, lm.Ts, lm.Tw)
        a = None
        if sched is not None:
            scalars = step_scalars(t, self.T, effective, self.budgets, self.usage_sum, self.n_eff,
                                   prev_logits if sched.uses_lm_scalars else None, x)
            a = sched.choose(StepObs(t, self.T, x, hidden, prev_logits, scalars, effective)).reshape(-1)
        out = lm.step(cache, x, a)
        if sched is not None:
            sched.observe(out)
        u = out.usage
        if u.effective:
            self.usage_sum += torch.stack([u.keep, u.prune, u.qratio], dim=-1)
            self.n_eff += 1
        self.t += 1
        return a, out


@dataclass
class Prefill:
    """A dense prefill of B blocks, reusable by any number of schedulers (each run clones the cache)."""

    blocks: torch.Tensor  # [B, C + T + 1] on the LM device
    context_len: int
    cache: object  # DynamicCache holding the C context tokens
    hidden: torch.Tensor  # [B, H] final-norm hidden of the last context token
    labels: torch.Tensor  # [T, B] y_t = block[C + t + 1]
    dense_logp: torch.Tensor  # [T, B] log p(y_t) under the dense model
    dense_logprobs: torch.Tensor | None  # [T, B, V], kept only when a KL is needed


def prefill_blocks(lm: ControlledLM, blocks: torch.Tensor, context_len: int, keep_dense_dist: bool = False) -> Prefill:
    """Dense prefill over C + T tokens: the prefill of C plus the dense teacher-forced reference rollout
    in one forward; the cache is then cropped back to the C context tokens."""
    C = context_len
    T = blocks.shape[1] - C - 1
    if T < 1:
        raise ValueError(f"blocks of length {blocks.shape[1]} leave no decode step after context_len={C}")
    blocks = blocks.to(lm.device)
    cache, all_hidden = lm.prefill_hidden(blocks[:, : C + T])
    cache.crop(-T)  # drop the reference rollout tokens, keep the C prefill tokens
    labels = blocks[:, C + 1: C + T + 1].transpose(0, 1)
    dense_logprobs = F.log_softmax(lm.logits(all_hidden[:, C: C + T]).transpose(0, 1), dim=-1)  # [T, B, V]
    dense_logp = dense_logprobs.gather(-1, labels[..., None])[..., 0]
    return Prefill(blocks, C, cache, all_hidden[:, C - 1], labels, dense_logp,
                   dense_logprobs if keep_dense_dist else None)


def run_episode(lm: ControlledLM, blocks: torch.Tensor | None, scheduler: Scheduler, budgets: torch.Tensor,
                context_len: int, group_size: int = 1, need_kl: bool = False,
                prefill: Prefill | None = None) -> Episode:
    """Run one batch of teacher-forced episodes. blocks [B, C + T + 1]; budgets [B, 3] (per input, shared by
    its K rows) or [B·K, 3] (per row).

    Pass `prefill` (from `prefill_blocks`) to share one dense prefill between several schedulers.
    """
    if prefill is None:
        prefill = prefill_blocks(lm, blocks, context_len, keep_dense_dist=need_kl)
    if need_kl and prefill.dense_logprobs is None:
        raise ValueError("need_kl requires a prefill made with keep_dense_dist=True")
    blocks, C, K = prefill.blocks, prefill.context_len, group_size
    B, T = blocks.shape[0], prefill.labels.shape[0]
    labels, dense_logp, dense_logprobs = prefill.labels, prefill.dense_logp, prefill.dense_logprobs

    N = B * K
    cache = lm.expand_cache(prefill.cache, K, spare=T)
    hidden = prefill.hidden.repeat_interleave(K, dim=0)
    prev_logits = lm.logits(hidden)
    row_budgets = budgets.to(lm.device).float()
    if row_budgets.shape[0] != N:
        if row_budgets.shape[0] != B:
            raise ValueError(f"budgets for {row_budgets.shape[0]} rows; expected {B} (per input) or {N} (per row)")
        row_budgets = row_budgets.repeat_interleave(K, dim=0)
    loop = DecodeLoop(lm, scheduler, row_budgets, T, kv_len=C, group_size=K)

    acts, logps, kls, effs, dflops = [], [], [], [], []
    usage = {k: [] for k in USAGE_FIELDS}
    for t in range(T):
        x = blocks[:, C + t].repeat_interleave(K)
        y = labels[t].repeat_interleave(K)
        a, out = loop.step(cache, x, hidden, prev_logits)
        logprobs = F.log_softmax(out.logits, dim=-1)
        logps.append(logprobs.gather(-1, y[:, None])[:, 0])
        if need_kl:
            ref = dense_logprobs[t].repeat_interleave(K, dim=0)
            kls.append((ref.exp() * (ref - logprobs)).sum(-1))
        u = out.usage
        for k in USAGE_FIELDS:
            usage[k].append(getattr(u, k))
        acts.append(a)
        effs.append(u.effective)
        dflops.append(lm.dense_step_flops(loop.kv_len))
        hidden, prev_logits = out.hidden, out.logits
    return Episode(
        actions=torch.stack(acts), logp=torch.stack(logps),
        usage={k: torch.stack(v) for k, v in usage.items()},
        effective=torch.tensor(effs), budgets=row_budgets, dense_logp=dense_logp,
        kl=torch.stack(kls) if need_kl else None, dense_flops=torch.tensor(dflops), group_size=K)
