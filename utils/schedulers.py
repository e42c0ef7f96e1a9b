"""Schedulers: who picks each row's action at each decode step. Everything else is the shared engine.

* `DenseScheduler`: always the dense action (1, s100, q16).
* `PolicyScheduler`: the learned policy, sampling (training) or argmax (evaluation), with optional
  per-axis logit biases; it can record what the GRPO loss needs, and in training it can draw the K rollouts of
  an input so that they differ on one axis per step (`contrast="one_axis"`, `sample_one_axis_contrast`).
The content-blind baselines (fixed, random, EMC, DAC) live in `utils/baselines.py`.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from utils.actions import ActionSpace
from utils.engine import Scheduler, StepObs
from utils.policy import SOLPolicy, action_logit_bias, choose_actions
from utils.records import StepTrace, TraceRecorder


class DenseScheduler(Scheduler):
    name = "dense"
    uses_lm_scalars = False

    def choose(self, obs: StepObs) -> torch.Tensor:
        return torch.full_like(obs.input_ids, self.lm.actions.dense_idx)


def sample_one_axis_contrast(logits: torch.Tensor, levels: torch.Tensor, group_size: int,
                             generator: torch.Generator | None = None,
                             axes: Sequence[int] | None = None) -> torch.Tensor:
    """One action per row from Categorical(logits) `[N, A]`, with the rows of each group of `group_size` (the K
    rollouts of one input) coupled so that at this step they differ on (nearly) one axis only.

    Each group draws an axis uniformly among those with more than one level (`levels` `[A, 3]`,
    `ActionSpace.level_indices`), and among `axes` (indices 0 κ, 1 ρ, 2 bits) when given: a policy that trains
    only some axes' logits (`policy_train_axes`) learns nothing from a group that contrasts a frozen one. Every
    row then samples its levels on the other axes from its own marginal by
    inverse CDF with ONE uniform number shared by the group (common random numbers), and the drawn axis from
    its own conditional with its own randomness. Each row's action is thus distributed exactly as the policy
    says for that row (so log-probabilities, the PPO ratio and the policy gradient are unchanged), while rows
    whose marginals are alike (all of them at step 0, most later) share the other axes' levels: those levels
    get a zero group-centred advantage, and the drawn axis's contrast carries no noise from the other axes'
    levels at this step. Ours: the reference samples every rollout's whole action independently."""
    N, K = logits.shape[0], group_size
    if N % K:
        raise ValueError(f"{N} rows do not split into groups of {K}")
    lv = levels.to(logits.device)
    drawable = lv.amax(0) > 0  # the axes with more than one level
    if axes is not None:
        allowed = torch.zeros(3, dtype=torch.bool)
        allowed[list(axes)] = True
        drawable &= allowed.to(lv.device)
    multi = torch.nonzero(drawable).flatten()
    if K == 1 or multi.numel() == 0:
        return choose_actions(logits, False, generator)
    G, A = N // K, lv.shape[0]
    axis = multi[torch.randint(multi.numel(), (G,), generator=generator, device=logits.device)].repeat_interleave(K)
    others = lv[None].expand(N, A, 3).clone()
    others[torch.arange(N, device=logits.device), :, axis] = 0  # [N, A, 3]: each action's levels off the drawn axis
    strides = torch.tensor([(lv[:, 1].amax() + 1) * (lv[:, 2].amax() + 1), lv[:, 2].amax() + 1, 1],
                           device=logits.device)
    key = (others * strides).sum(-1)  # [N, A]: flat index of those levels, < A
    probs = torch.softmax(logits.detach().float(), dim=-1)
    marginal = torch.zeros_like(probs).scatter_add_(1, key, probs)  # [N, A] over keys
    cdf = marginal.cumsum(-1)
    u = torch.rand(G, generator=generator, device=logits.device).repeat_interleave(K)[:, None]
    shared = torch.searchsorted(cdf, u * cdf[:, -1:]).clamp_max(A - 1)  # [N, 1]: the row's key, common u
    return choose_actions(logits.masked_fill(key != shared, float("-inf")), False, generator)


class PolicyScheduler(Scheduler):
    """Actions from the SOL policy network, stepped incrementally with its own KV cache."""

    name = "policy"

    def __init__(self, policy: SOLPolicy, temperature: float = 1.0, greedy: bool = True,
                 generator: torch.Generator | None = None, biases: tuple[float, float, float] = (0.0, 0.0, 0.0),
                 actions: ActionSpace | None = None, record: bool = False, contrast: str = "all",
                 contrast_axes: Sequence[int] | None = None) -> None:
        self.policy, self.temperature, self.greedy, self.generator = policy, temperature, greedy, generator
        self.record = record
        if contrast not in ("all", "one_axis"):
            raise ValueError(f"contrast must be 'all' or 'one_axis', got {contrast!r}")
        if contrast == "one_axis" and actions is None:
            raise ValueError("contrast='one_axis' needs the action space")
        self.levels = actions.level_indices() if contrast == "one_axis" and not greedy else None
        self.contrast_axes = None if contrast_axes is None else tuple(contrast_axes)
        self.uses_lm_scalars = getattr(policy, "scalar_dim", 10) > 8  # the surprisal/entropy columns are read only then
        self.bias = None
        if any(b != 0.0 for b in biases):
            if actions is None:
                raise ValueError("logit biases need the action space")
            self.bias = action_logit_bias(actions.keep, actions.prune, actions.bits.float(), *biases)

    def start(self, lm, budgets: torch.Tensor, group_size: int) -> None:
        super().start(lm, budgets, group_size)
        self.group_size = group_size
        self.state = self.policy.init_state(budgets.shape[0], device=budgets.device)
        with torch.no_grad():  # constant over the episode: the decode loop feeds these budgets as the scalars'
            self.budget_terms = self.policy.budget_terms(budgets.float())
        self.recorder = TraceRecorder()

    @torch.no_grad()
    def choose(self, obs: StepObs) -> torch.Tensor:
        h = obs.hidden.float()
        e = self.lm.embed(obs.input_ids).float()
        logits, self.state = self.policy.step(h, e, obs.scalars, self.state, self.temperature, self.budget_terms)
        if self.bias is not None:
            logits = logits - self.bias.to(logits.device)
        if self.levels is not None and self.group_size > 1:
            a = sample_one_axis_contrast(logits, self.levels, self.group_size, self.generator, self.contrast_axes)
        else:
            a = choose_actions(logits, self.greedy, self.generator)
        if self.record:
            self.recorder.append(h, e, obs.scalars, self.state.last_action, a,
                                 F.log_softmax(logits, -1).gather(-1, a[:, None])[:, 0])
        self.state = self.state.with_action(a)
        return a

    def trace(self) -> StepTrace:
        """What the policy was fed and chose at every step of the episode (needs record=True)."""
        return self.recorder.stacked()
