"""Schedulers: who picks each row's action at each decode step. Everything else is the shared engine.

* `DenseScheduler`: always the dense action (1, s100, q16).
* `PolicyScheduler`: the learned policy, sampling (training) or argmax (evaluation), with optional
  per-axis logit biases; it can record what the GRPO loss needs.
The content-blind baselines (fixed, random, EMC, DAC) live in `utils/baselines.py`.
"""
from __future__ import annotations

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


class PolicyScheduler(Scheduler):
    """Actions from the SOL policy network, stepped incrementally with its own KV cache."""

    name = "policy"

    def __init__(self, policy: SOLPolicy, temperature: float = 1.0, greedy: bool = True,
                 generator: torch.Generator | None = None, biases: tuple[float, float, float] = (0.0, 0.0, 0.0),
                 actions: ActionSpace | None = None, record: bool = False) -> None:
        self.policy, self.temperature, self.greedy, self.generator = policy, temperature, greedy, generator
        self.record = record
        self.uses_lm_scalars = getattr(policy, "scalar_dim", 10) > 8  # the surprisal/entropy columns are read only then
        self.bias = None
        if any(b != 0.0 for b in biases):
            if actions is None:
                raise ValueError("logit biases need the action space")
            self.bias = action_logit_bias(actions.keep, actions.prune, actions.bits.float(), *biases)

    def start(self, lm, budgets: torch.Tensor, group_size: int) -> None:
        super().start(lm, budgets, group_size)
        self.state = self.policy.init_state(budgets.shape[0], device=budgets.device)
        self.recorder = TraceRecorder()

    @torch.no_grad()
    def choose(self, obs: StepObs) -> torch.Tensor:
        h = obs.hidden.float()
        e = self.lm.embed(obs.input_ids).float()
        logits, self.state = self.policy.step(h, e, obs.scalars, self.state, self.temperature)
        if self.bias is not None:
            logits = logits - self.bias.to(logits.device)
        a = choose_actions(logits, self.greedy, self.generator)
        if self.record:
            self.recorder.append(h, e, obs.scalars, self.state.last_action, a,
                                 F.log_softmax(logits, -1).gather(-1, a[:, None])[:, 0])
        self.state = self.state.with_action(a)
        return a

    def trace(self) -> StepTrace:
        """What the policy was fed and chose at every step of the episode (needs record=True)."""
        return self.recorder.stacked()
