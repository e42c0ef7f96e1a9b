"""Typed records of a decode: the policy's step scalars and the per-step trace of what a policy saw and chose.

* `StepScalars`: the one column layout of the scalar vector the engine builds before every decode step and
  the policy reads (the reference's eight plus two of ours), with named accessors, so no module indexes
  columns by number.
* `StepTrace` / `TraceRecorder`: the policy inputs of every step of an episode (LM hidden state, token
  embedding, scalars, previous action), the action taken and its log-probability, time-major `[T, N, ...]`.
  The GRPO loss (`utils.grpo.RolloutBatch`), behaviour cloning (`utils.imitation`) and the placement check
  replay the policy on exactly these tensors.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import Tensor


class StepScalars:
    """Columns of the step scalars `[..., 10]`.

    0 t_frac = (t + 1) / T; 1 effective (1.0 when the step's usage counts towards the budget); 2:5 the row's
    budgets (C_tok, C_pru, C_q); 5:8 the running mean nominal usage of earlier effective steps minus the
    budgets; 8 surprisal and 9 entropy of the input token under the LM's previous distribution, in nats / 10.
    A policy reads the first `policy_scalar_dim` columns (8 = the reference's scalars)."""

    T_FRAC = 0
    EFFECTIVE = 1
    BUDGETS = slice(2, 5)
    DEVIATIONS = slice(5, 8)
    SURPRISAL = 8
    ENTROPY = 9
    REFERENCE_DIM = 8
    DIM = 10
    LM_FEATURE_SCALE = 10.0  # surprisal and entropy are stored in nats / 10

    @staticmethod
    def build(t: int, T: int, effective: bool, budgets: Tensor, usage_sum: Tensor, n_eff: int,
              prev_logits: Tensor | None = None, input_ids: Tensor | None = None) -> Tensor:
        """The scalars of decode step t of T for all N rows, float32 `[N, DIM]`.

        `usage_sum` [N, 3] sums the nominal usage of the `n_eff` earlier effective steps; surprisal
        −log p(x_t) and entropy come from the previous LM call's logits (`prev_logits` [N, V], the
        distribution `input_ids` x_t was drawn from), zeros when they are not given."""
        N = budgets.shape[0]
        dev = usage_sum / n_eff - budgets if n_eff > 0 else torch.zeros_like(budgets)
        head = torch.tensor([(t + 1) / T, float(effective)], device=budgets.device).expand(N, 2)
        if prev_logits is None or input_ids is None:
            lm_feats = torch.zeros(N, 2, device=budgets.device)
        else:
            logp = F.log_softmax(prev_logits.float(), dim=-1)
            surprisal = -logp.gather(-1, input_ids.reshape(N, 1).to(logp.device))[:, 0]
            entropy = -(logp.exp() * logp).sum(-1)
            lm_feats = torch.stack([surprisal, entropy], dim=-1).to(budgets.device) / StepScalars.LM_FEATURE_SCALE
        return torch.cat([head, budgets, dev, lm_feats.to(budgets.dtype)], dim=-1).float()

    @staticmethod
    def effective(s: Tensor) -> Tensor:
        return s[..., StepScalars.EFFECTIVE]

    @staticmethod
    def budgets(s: Tensor) -> Tensor:
        return s[..., StepScalars.BUDGETS]

    @staticmethod
    def deviations(s: Tensor) -> Tensor:
        return s[..., StepScalars.DEVIATIONS]

    @staticmethod
    def surprisal(s: Tensor) -> Tensor:
        """−log p of the input token under the LM, in nats."""
        return s[..., StepScalars.SURPRISAL] * StepScalars.LM_FEATURE_SCALE

    @staticmethod
    def entropy(s: Tensor) -> Tensor:
        """Entropy of the LM distribution the input token was drawn from, in nats."""
        return s[..., StepScalars.ENTROPY] * StepScalars.LM_FEATURE_SCALE


@dataclass
class StepTrace:
    """What a policy was fed and chose at every step of an episode, time-major."""

    h: Tensor  # [T, N, H] LM final-norm hidden state before the step
    e: Tensor  # [T, N, E] embedding of the token about to be processed
    scalars: Tensor  # [T, N, StepScalars.DIM]
    prev_actions: Tensor  # [T, N] long, the action applied at the previous step (BOS at t = 0)
    actions: Tensor  # [T, N] long, the action applied at this step
    logp_old: Tensor | None = None  # [T, N] log-probability of `actions` under the sampling policy

    def policy_inputs(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(h, e, scalars, prev_actions): the arguments of `SOLPolicy.forward`."""
        return self.h, self.e, self.scalars, self.prev_actions

    def map(self, fn) -> "StepTrace":
        """A trace with `fn` applied to every tensor."""
        return replace(self, **{f.name: None if getattr(self, f.name) is None else fn(getattr(self, f.name))
                                for f in fields(self)})

    def rows(self, start: int, stop: int) -> "StepTrace":
        """Rows start..stop−1, in their own storage (a pool may be saved while the full trace is freed)."""
        return self.map(lambda v: v[:, start:stop].clone())

    def select_rows(self, idx: Tensor) -> "StepTrace":
        return self.map(lambda v: v.index_select(1, idx.to(v.device)))

    @staticmethod
    def cat(traces: list["StepTrace"]) -> "StepTrace":
        """Traces of the same steps concatenated along rows."""
        first = traces[0]
        return StepTrace(**{f.name: None if getattr(first, f.name) is None
                            else torch.cat([getattr(t, f.name) for t in traces], dim=1) for f in fields(first)})


class TraceRecorder:
    """Collects one `StepTrace` step by step (each tensor cloned: LM outputs may be inference tensors,
    which autograd cannot save later)."""

    def __init__(self) -> None:
        self.steps: list[tuple[Tensor | None, ...]] = []

    def append(self, h: Tensor, e: Tensor, scalars: Tensor, prev_actions: Tensor, actions: Tensor,
               logp_old: Tensor | None = None) -> None:
        self.steps.append(tuple(None if v is None else v.clone()
                                for v in (h, e, scalars, prev_actions, actions, logp_old)))

    def stacked(self) -> StepTrace:
        """The recorded steps as one time-major trace."""
        if not self.steps:
            raise ValueError("no step was recorded")
        cols = list(zip(*self.steps))
        return StepTrace(*(None if c[0] is None else torch.stack(c) for c in cols))
