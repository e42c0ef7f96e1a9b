"""Exponential moving average of the policy weights (Polyak averaging) for evaluation and export.

Between two saved checkpoints a GRPO policy trained on this CPU moves by about as much as it gains over the
fixed schedule (results/prune_price_ppo: dev ΔNLL −0.087 at one checkpoint, −0.020 at the next), so the
last raw weights are a noisy draw from where training has got to. An average of the recent weights smooths
that step-to-step noise at the cost of lagging behind by about 1 / (1 − decay) optimizer steps. (Measured on
the 112-step price recipe, results/prune_price_ema: the average was slightly worse than the raw weights.)
Training itself always continues from the raw weights; the average is only read (dev checks, checkpoints'
`policy_state_dict`, exports, evaluators).

The decay warms up as min(decay, (1 + n) / (10 + n)) after the n-th optimizer step (n = 0, 1, …), the
schedule of TensorFlow's ExponentialMovingAverage with num_updates, so early averages are not dominated
by the random initial weights.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


def ema_decay_at(decay: float, n: int) -> float:
    """The decay applied at the n-th (0-based) update: min(decay, (1 + n) / (10 + n))."""
    return min(float(decay), (1.0 + n) / (10.0 + n))


class WeightEMA:
    """A frozen copy of `module` whose floating-point parameters and buffers track an EMA of the module's.

    `update(module)` after every optimizer step: avg ← d·avg + (1 − d)·w with d = `ema_decay_at(decay, n)`.
    Non-floating buffers are copied as they are.
    """

    def __init__(self, module: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = float(decay)
        self.num_updates = 0
        self.module = copy.deepcopy(module).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        d = ema_decay_at(self.decay, self.num_updates)
        src = module.state_dict()
        for k, avg in self.module.state_dict().items():
            w = src[k].detach()
            if avg.is_floating_point():
                avg.lerp_(w.to(avg.dtype), 1.0 - d)
            else:
                avg.copy_(w)
        self.num_updates += 1

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "weights": self.module.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["weights"])
        self.num_updates = int(state["num_updates"])
