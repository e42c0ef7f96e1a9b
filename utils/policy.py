"""The SOL policy: a tiny causal transformer over decode steps that picks one efficiency action per token.

Faithful to the reference repository's `RecurrentActorCriticPolicy` (akhauriyash/SOL), minus its value head (training is critic-free) and minus its duplicate construction of `action_emb` and
`obs_proj` (that quirk only shifted the initialisation RNG). Two execution paths compute the same logits:

* `step()` - incremental, with its own per-layer KV cache in a `PolicyState`; used for rollouts and generation.
* `forward()` - all T steps at once under a causal mask, from stored `[T, B, ...]` inputs; used for the loss
  (DDP wraps `forward`).

Ours, off by default: an integral budget feedback term of the logits (the row's usage surplus so far times each
action's usage, `budget_feedback`) and a bound on the network's own logits, so that the budget holds by
construction (docs/grpo_recipe.md), and a fitted knob offset (`set_knob_table`, fitted by
`utils.knob_calibration`): a logit term of the requested budget alone that makes the network's own
realised usage match the request, so the feedback is left only the drift to correct. Also here: the
eval-time per-axis logit bias, action selection and a parameter counter.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from utils.records import StepScalars

N_SCALARS = StepScalars.DIM  # the step scalars' layout: utils.records.StepScalars
SCALAR_PROJ_DIM = 64
BUDGET_HIDDEN = 32


@dataclass
class PolicyState:
    """Incremental state of one batch of policy sequences.

    `past_k` / `past_v` hold, per layer, the keys/values of all earlier steps, `[B, n_heads, t, d_head]`.
    `step_idx` is the policy-local step about to be processed (the position-embedding index).
    `last_action` is the action chosen at the previous step (`n_actions`, the BOS id, at t = 0).
    `n_eff` counts, per row, the effective steps already taken (what turns the mean deviation into a surplus).
    `step()` never changes `last_action`: after choosing actions `a`, call `state = state.with_action(a)`.
    States are treated as immutable: the methods return new objects (tensors are shared, not copied).
    """

    past_k: list[Tensor]
    past_v: list[Tensor]
    step_idx: int
    last_action: Tensor
    n_eff: Tensor  # [B] float
    # the native batch-1 step's key/value buffers behind past_k/past_v (utils.fast_policy), or None
    kv_buffers: Optional[Any] = None

    @property
    def batch_size(self) -> int:
        return int(self.last_action.shape[0])

    def with_action(self, action: Tensor) -> "PolicyState":
        """The same state with `last_action` set to the action just chosen (fed back at the next step)."""
        action = action.to(device=self.last_action.device, dtype=torch.long).reshape(-1)
        if action.shape[0] != self.batch_size:
            raise ValueError(f"with_action: got {action.shape[0]} actions for a batch of {self.batch_size}")
        return replace(self, last_action=action)

    def select(self, idx: Tensor) -> "PolicyState":
        """Keep / reorder / repeat batch rows: `idx` is a long index tensor or a boolean mask over rows."""
        idx = torch.as_tensor(idx, device=self.last_action.device)
        if idx.dtype == torch.bool:
            idx = idx.nonzero(as_tuple=True)[0]
        idx = idx.long()
        return PolicyState(
            past_k=[k.index_select(0, idx) for k in self.past_k],
            past_v=[v.index_select(0, idx) for v in self.past_v],
            step_idx=self.step_idx,
            last_action=self.last_action.index_select(0, idx),
            n_eff=self.n_eff.index_select(0, idx),
        )

    def repeat_interleave(self, k: int) -> "PolicyState":
        """Each row repeated k times in place (row i -> rows i*k .. i*k+k-1), e.g. to fan out K rollouts."""
        idx = torch.arange(self.batch_size, device=self.last_action.device).repeat_interleave(k)
        return self.select(idx)


class _Block(nn.Module):
    """Pre-LN causal transformer block: x += Attn(LN(x)); x += FFN(LN(x))."""

    def __init__(self, d_model: int, n_heads: int, mlp_ratio: int, dropout: float) -> None:
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"policy_d_model ({d_model}) must be divisible by policy_n_heads ({n_heads})")
        self.n_heads, self.d_head, self.dropout = n_heads, d_model // n_heads, dropout
        self.ln1 = nn.LayerNorm(d_model)
        self.q = nn.Linear(d_model, d_model, bias=False)
        self.k = nn.Linear(d_model, d_model, bias=False)
        self.v = nn.Linear(d_model, d_model, bias=False)
        self.o = nn.Linear(d_model, d_model, bias=False)
        self.ln2 = nn.LayerNorm(d_model)
        self.ffn = nn.Sequential(
            nn.Linear(d_model, mlp_ratio * d_model), nn.GELU(), nn.Linear(mlp_ratio * d_model, d_model)
        )

    def _heads(self, x: Tensor) -> Tensor:  # [B, T, d] -> [B, H, T, dh]
        b, t, _ = x.shape
        return x.view(b, t, self.n_heads, self.d_head).transpose(1, 2)

    def forward(
        self, x: Tensor, past_k: Optional[Tensor] = None, past_v: Optional[Tensor] = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """x: [B, T, d]. Without a cache: causal over the T steps. With a cache: T new steps attend to
        the cached ones plus causally to each other. Returns (x, all keys, all values)."""
        b, t, d = x.shape
        hx = self.ln1(x)
        q, k, v = self._heads(self.q(hx)), self._heads(self.k(hx)), self._heads(self.v(hx))
        if past_k is not None and past_k.shape[2] > 0:
            k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
        p = self.dropout if self.training else 0.0
        n_past = k.shape[2] - t
        if t == 1:  # one query sees everything cached: no mask needed
            att = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        elif n_past == 0:
            att = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        else:  # several new steps on top of a cache: explicit offset causal mask
            mask = torch.ones(t, k.shape[2], dtype=torch.bool, device=x.device).tril(diagonal=n_past)
            att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        x = x + self.o(att.transpose(1, 2).reshape(b, t, d))
        x = x + self.ffn(self.ln2(x))
        return x, k, v


class SOLPolicy(nn.Module):
    """Causal-transformer policy over decode steps; outputs per-action logits (no value head)."""

    def __init__(
        self,
        h_dim: int,
        e_dim: int,
        n_actions: int,
        d_model: int = 512,
        n_heads: int = 4,
        n_layers: int = 1,
        mlp_ratio: int = 4,
        action_dim: int = 32,
        max_len: int = 1024,
        scalar_dim: int = 8,
        dropout: float = 0.0,
        use_hidden: bool = True,
        use_token: bool = True,
        budget_feedback_gain: float = 0.0,
        action_usage: Optional[Tensor] = None,
        logit_bound: float = 0.0,
        head_init_scale: float = 1.0,
        level_map: Optional[Tensor] = None,
        level_bias: Optional[Tensor] = None,
        bracket_levels: bool = False,
    ) -> None:
        super().__init__()
        if not 1 <= scalar_dim <= N_SCALARS:
            raise ValueError(f"policy_scalar_dim must be in 1..{N_SCALARS}, got {scalar_dim}")
        if n_actions < 1 or n_layers < 1 or max_len < 1:
            raise ValueError("n_actions, policy_n_layers and policy_max_len must be >= 1")
        self.h_dim, self.e_dim, self.n_actions = h_dim, e_dim, n_actions
        self.d_model, self.n_heads, self.n_layers = d_model, n_heads, n_layers
        self.max_len, self.scalar_dim = max_len, scalar_dim
        self.use_hidden, self.use_token = bool(use_hidden), bool(use_token)
        self.bos_id = n_actions
        self.action_emb = nn.Embedding(n_actions + 1, action_dim)
        self.scalar_proj = nn.Sequential(
            nn.Linear(scalar_dim, SCALAR_PROJ_DIM), nn.GELU(), nn.LayerNorm(SCALAR_PROJ_DIM)
        )
        self.obs_proj = nn.Linear(h_dim + e_dim + SCALAR_PROJ_DIM + action_dim, d_model)
        self.pos_emb = nn.Embedding(max_len, d_model)
        self.blocks = nn.ModuleList(_Block(d_model, n_heads, mlp_ratio, dropout) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        if level_map is not None and (level_map.ndim != 2 or level_map.shape[0] != n_actions):
            raise ValueError(f"level_map must be [{n_actions}, levels], got {tuple(level_map.shape)}")
        # factorised head: the layers write one logit per axis level, mapped to actions in _head
        self.register_buffer("level_map", None if level_map is None else level_map.detach().float().clone(),
                             persistent=False)
        n_out = n_actions if level_map is None else level_map.shape[1]
        self.pi = nn.Linear(d_model, n_out)
        nn.init.zeros_(self.pi.bias)
        if level_bias is not None:  # an initial preference per output (e.g. the middle levels, from_config)
            if tuple(level_bias.shape) != (n_out,):
                raise ValueError(f"level_bias must be [{n_out}], got {tuple(level_bias.shape)}")
            with torch.no_grad():
                self.pi.bias.copy_(level_bias)
        self.budget_head = nn.Sequential(
            nn.Linear(3, BUDGET_HIDDEN), nn.GELU(), nn.Linear(BUDGET_HIDDEN, n_out)
        )
        if not head_init_scale >= 0:
            raise ValueError(f"head_init_scale must be >= 0, got {head_init_scale}")
        if head_init_scale != 1.0:  # the two layers that write the logits; 1 leaves PyTorch's draw untouched
            with torch.no_grad():
                for p in (self.pi.weight, self.budget_head[-1].weight, self.budget_head[-1].bias):
                    p.mul_(head_init_scale)
        self.budget_feedback_gain, self.logit_bound = float(budget_feedback_gain), float(logit_bound)
        if not self.budget_feedback_gain >= 0 or not self.logit_bound >= 0:
            raise ValueError(f"budget_feedback_gain and logit_bound must be >= 0, got {budget_feedback_gain}, "
                             f"{logit_bound}")
        if action_usage is None:
            if self.budget_feedback_gain > 0:
                raise ValueError("budget feedback needs the actions' nominal usage (action_usage [A, 3])")
            action_usage = torch.zeros(n_actions, 3)
        if tuple(action_usage.shape) != (n_actions, 3):
            raise ValueError(f"action_usage must be [{n_actions}, 3], got {tuple(action_usage.shape)}")
        # not a parameter and not in the state dict: it follows from the action grid of the config
        self.register_buffer("action_usage", action_usage.detach().float().clone(), persistent=False)
        self.bracket_levels = bool(bracket_levels)
        if self.bracket_levels and not bool(self.action_usage.abs().sum() > 0):
            raise ValueError("bracket_levels needs the actions' nominal usage (action_usage [A, 3])")
        # the knob table (set_knob_table): not in the state dict either, it is fitted after training
        self.register_buffer("knob_grid", None, persistent=False)
        self.register_buffer("knob_offsets", None, persistent=False)

    @classmethod
    def from_config(cls, cfg: Any, h_dim: int, e_dim: int, actions: Any) -> "SOLPolicy":
        """Build from a `Config` (fields `policy_*`, `budget_feedback_gain`) for an `ActionSpace` (or a bare
        action count, which allows neither budget feedback nor a factorised head)."""
        usage = None if isinstance(actions, int) else actions.nominal_usage()
        level_map = level_bias = None
        if getattr(cfg, "policy_head", "joint") == "factorised":
            if isinstance(actions, int):
                raise ValueError("policy_head: factorised needs the action grid, not a bare action count")
            level_map = actions.level_map()
            middle = getattr(cfg, "policy_middle_level_bias", 0.0)
            if middle:
                level_bias = actions.middle_levels().float() * middle
        elif getattr(cfg, "policy_middle_level_bias", 0.0):
            raise ValueError("policy_middle_level_bias needs policy_head: factorised (one logit per axis level)")
        return cls(
            h_dim, e_dim, actions if isinstance(actions, int) else len(actions), action_usage=usage,
            budget_feedback_gain=getattr(cfg, "budget_feedback_gain", 0.0),
            logit_bound=getattr(cfg, "policy_logit_bound", 0.0),
            d_model=cfg.policy_d_model, n_heads=cfg.policy_n_heads, n_layers=cfg.policy_n_layers,
            mlp_ratio=cfg.policy_mlp_ratio, action_dim=cfg.policy_action_dim, max_len=cfg.policy_max_len,
            scalar_dim=cfg.policy_scalar_dim, dropout=cfg.policy_dropout,
            use_hidden=cfg.policy_use_hidden, use_token=cfg.policy_use_token,
            head_init_scale=getattr(cfg, "policy_head_init_scale", 1.0), level_map=level_map, level_bias=level_bias,
            bracket_levels=getattr(cfg, "policy_bracket_levels", False),
        )

    # ---- shared pieces -----------------------------------------------------------------------------
    def _encode(self, h: Tensor, e: Tensor, scalars: Tensor, prev_actions: Tensor, pos: Tensor) -> Tensor:
        """Observation embedding, any leading shape: concat(h, e, scalar_proj, action_emb) -> obs_proj + pos.

        An input switched off (`use_hidden` / `use_token` false) is fed as zeros, so the layer shapes and
        checkpoints stay the same and the ablated policy differs only in what it can see."""
        dt = self.obs_proj.weight.dtype
        s = self.scalar_proj(scalars[..., : self.scalar_dim].to(dt))
        h = h.detach().to(dt) if self.use_hidden else torch.zeros(h.shape, dtype=dt, device=h.device)
        e = e.detach().to(dt) if self.use_token else torch.zeros(e.shape, dtype=dt, device=e.device)
        x = torch.cat([h, e, s, self.action_emb(prev_actions.long())], dim=-1)
        return self.obs_proj(x) + self.pos_emb(pos)

    def budget_feedback(self, scalars: Tensor, n_eff: Tensor) -> Tensor:
        """The fixed (not learned) integral feedback term of the logits, `[..., A]`: −g · S · u(a).

        S = n_eff · dev is each row's cumulative usage surplus over its budget, per axis, over its earlier
        effective steps (dev, the running mean deviation, is a scalar input; n_eff [...] the count of those
        steps), and u(a) the nominal usage of action a. Overspending by one dense step's worth at ρ 0.7 on
        the s40/s100 grid moves the logit gap by g · 0.3 · 0.6. Zero when the gain is 0."""
        if self.budget_feedback_gain == 0.0:
            return torch.zeros((), dtype=scalars.dtype, device=scalars.device)
        surplus = StepScalars.deviations(scalars).float() * n_eff.unsqueeze(-1).float()
        return -self.budget_feedback_gain * (surplus @ self.action_usage.T)

    def set_knob_table(self, grid: Optional[Tensor], offsets: Optional[Tensor]) -> None:
        """Install (or, with None, remove) the knob offset table: `grid` [m, 3] requested budgets, each
        column strictly increasing, and `offsets` [m, 3] their per-axis offsets c (logits per unit of usage).

        A row whose requested budget is r gets the logit term −Σ_j c_j(r_j) · u_j(a), c_j interpolated
        linearly in column j of the grid (held at the ends), u(a) the action's nominal usage: the same form
        as the feedback's −g · S · u(a), with a constant in place of the surplus, so c > 0 favours cheaper
        actions on that axis. It depends on the request only, never on the content."""
        if grid is None or offsets is None:
            if grid is not None or offsets is not None:
                raise ValueError("set_knob_table: give both grid and offsets, or neither")
            self.knob_grid = self.knob_offsets = None
            return
        grid, offsets = grid.detach().float(), offsets.detach().float()
        if grid.ndim != 2 or grid.shape[1] != 3 or grid.shape[0] < 2 or offsets.shape != grid.shape:
            raise ValueError(f"set_knob_table: grid and offsets must both be [m >= 2, 3], got "
                             f"{tuple(grid.shape)} and {tuple(offsets.shape)}")
        if not bool((grid[1:] > grid[:-1]).all()) or not bool(torch.isfinite(offsets).all()):
            raise ValueError("set_knob_table: every grid column must increase strictly and the offsets be finite")
        dev = self.action_usage.device
        self.knob_grid, self.knob_offsets = grid.to(dev), offsets.to(dev)

    def knob_term(self, budgets: Tensor) -> Tensor:
        """The knob offsets' logit term for requested budgets [..., 3] -> [..., A] (zero without a table)."""
        if self.knob_grid is None:
            return torch.zeros((), dtype=budgets.dtype, device=budgets.device)
        g, f = self.knob_grid.T.contiguous(), self.knob_offsets.T  # [3, m]
        x = budgets.reshape(-1, 3).float().T.contiguous()  # [3, N]
        hi = torch.searchsorted(g, x).clamp(1, g.shape[1] - 1)
        g0, g1, f0, f1 = g.gather(1, hi - 1), g.gather(1, hi), f.gather(1, hi - 1), f.gather(1, hi)
        w = ((x - g0) / (g1 - g0)).clamp(0.0, 1.0)
        c = (f0 + w * (f1 - f0)).T  # [N, 3]
        return -(c @ self.action_usage.T).reshape(*budgets.shape[:-1], -1)

    def bracket_term(self, budgets: Tensor) -> Tensor:
        """−1e4 on every action that leaves, on some axis, the two levels bracketing the request on that axis (the
        levels the fixed baseline dithers between; one level when the request is on it, the nearest end level
        when it is off the grid), 0 elsewhere: budgets [..., 3] -> [..., A]; zero without `bracket_levels`.

        Quality is concave in each axis, so spreading an axis over three levels where fixed takes its two
        neighbours costs more than a content placement gains (results/joint_from_prune); with the term the
        policy only chooses *which* steps take the upper level, as fixed does by rotation."""
        if not self.bracket_levels:
            return torch.zeros((), dtype=budgets.dtype, device=budgets.device)
        u = self.action_usage  # [A, 3]
        b = budgets.float().unsqueeze(-2)  # [..., 1, 3]
        eps = 1e-6
        inf = torch.tensor(float("inf"), device=u.device)
        lo = torch.where(u <= b + eps, u, -inf).amax(-2)  # [..., 3]: the highest level at or below the request
        hi = torch.where(u >= b - eps, u, inf).amin(-2)  # the lowest level at or above it
        lo = torch.where(torch.isinf(lo), u.amin(0), lo)  # below the grid: its lowest level only
        hi = torch.where(torch.isinf(hi), u.amax(0), hi)  # above it: its highest
        on = ((u - lo.unsqueeze(-2)).abs() <= eps) | ((u - hi.unsqueeze(-2)).abs() <= eps)  # [..., A, 3]
        return torch.where(on.all(-1), 0.0, -1e4)

    def budget_terms(self, budgets: Tensor) -> tuple[Tensor, Tensor]:
        """The two logit terms that depend on the requested budgets [..., 3] alone: the budget head's output
        (before the bound), and the knob offsets' term plus the bracket mask (`bracket_term`). Constant over an
        episode, so a decode loop computes them once (`step(..., budget_terms=...)`) instead of at every step."""
        return self.budget_head(budgets.to(self.pi.weight.dtype)), self.knob_term(budgets) + self.bracket_term(budgets)

    def _head(self, x: Tensor, scalars: Tensor, n_eff: Tensor, temperature: float,
              budget_terms: Optional[tuple[Tensor, Tensor]] = None) -> Tensor:
        """Final LN -> pi, plus the budget head on the raw (C_tok, C_pru, C_q), bounded to [-c, c] when
        `logit_bound` c > 0 (with a factorised head: each level's logit bounded, then summed over the action's
        levels), plus the budget feedback and the knob offsets, all / temperature."""
        return self._head_terms(self.pi(self.ln_f(x)), scalars, n_eff, temperature, budget_terms)

    def _head_terms(self, pi_out: Tensor, scalars: Tensor, n_eff: Tensor, temperature: float,
                    budget_terms: Optional[tuple[Tensor, Tensor]] = None) -> Tensor:
        """`_head` after pi(ln_f(x)) (`pi_out`): the budget head, the bound, the level map, the feedback and the
        knob offsets, / temperature."""
        if scalars.shape[-1] < StepScalars.REFERENCE_DIM:
            raise ValueError(f"scalars need >= {StepScalars.REFERENCE_DIM} columns (utils.records.StepScalars), "
                             f"got {scalars.shape[-1]}")
        budget_out, knob = self.budget_terms(StepScalars.budgets(scalars)) if budget_terms is None else budget_terms
        raw = pi_out + budget_out
        if self.logit_bound > 0:
            raw = self.logit_bound * torch.tanh(raw / self.logit_bound)
        if self.level_map is not None:
            raw = raw @ self.level_map.to(raw.dtype).T
        fixed = self.budget_feedback(scalars, n_eff) + knob
        return (raw + fixed.to(raw.dtype)) / temperature

    # ---- incremental path --------------------------------------------------------------------------
    def init_state(self, batch_size: int, device: Optional[torch.device | str] = None) -> PolicyState:
        """Empty caches, step 0, previous action = BOS."""
        device = self.pi.weight.device if device is None else torch.device(device)
        dt = self.pi.weight.dtype
        d_head = self.d_model // self.n_heads
        empty = lambda: torch.zeros(batch_size, self.n_heads, 0, d_head, device=device, dtype=dt)  # noqa: E731
        return PolicyState(
            past_k=[empty() for _ in range(self.n_layers)],
            past_v=[empty() for _ in range(self.n_layers)],
            step_idx=0,
            last_action=torch.full((batch_size,), self.bos_id, dtype=torch.long, device=device),
            n_eff=torch.zeros(batch_size, device=device),
        )

    def step(
        self, h: Tensor, e: Tensor, scalars: Tensor, state: PolicyState, temperature: float = 1.0,
        budget_terms: Optional[tuple[Tensor, Tensor]] = None,
    ) -> tuple[Tensor, PolicyState]:
        """One decode step for a batch: inputs [B, ...] -> logits [B, A] and the advanced state.

        The returned state has the new keys/values and `step_idx + 1`, but still the OLD `last_action`:
        the caller must do `state = new_state.with_action(chosen)` before the next step. `budget_terms`:
        `self.budget_terms(budgets)` of the rows' requested budgets, if the caller has it (they must be the
        budget columns of `scalars`); computed here otherwise.
        """
        if state.step_idx >= self.max_len:
            raise ValueError(f"policy step {state.step_idx} exceeds policy_max_len={self.max_len}")
        fast = getattr(self, "_sol_fast_step", None)  # the gathered execution's native batch-1 step
        out = fast(self, h, e, scalars, state) if fast is not None else None
        if out is not None:
            pi_out, new_state = out
            logits = self._head_terms(pi_out, scalars, state.n_eff, temperature, budget_terms)
            n_eff = state.n_eff + StepScalars.effective(scalars).to(state.n_eff)
            return logits, replace(new_state, n_eff=n_eff)
        pos = torch.full_like(state.last_action, state.step_idx)
        x = self._encode(h, e, scalars, state.last_action, pos).unsqueeze(1)  # [B, 1, d]
        new_k, new_v = [], []
        for blk, pk, pv in zip(self.blocks, state.past_k, state.past_v):
            x, k, v = blk(x, pk, pv)
            new_k.append(k)
            new_v.append(v)
        logits = self._head(x.squeeze(1), scalars, state.n_eff, temperature, budget_terms)
        n_eff = state.n_eff + StepScalars.effective(scalars).to(state.n_eff)
        return logits, PolicyState(new_k, new_v, state.step_idx + 1, state.last_action, n_eff)

    # ---- full-sequence path ------------------------------------------------------------------------
    def forward(
        self, h: Tensor, e: Tensor, scalars: Tensor, prev_actions: Tensor, temperature: float = 1.0
    ) -> Tensor:
        """All T steps at once (positions 0..T-1): inputs [T, B, ...], prev_actions [T, B] (BOS at t = 0)
        -> logits [T, B, A]. Equal to T calls of `step()` fed the same inputs."""
        t = prev_actions.shape[0]
        if t > self.max_len:
            raise ValueError(f"sequence of {t} policy steps exceeds policy_max_len={self.max_len}")
        pos = torch.arange(t, device=prev_actions.device).unsqueeze(1).expand_as(prev_actions)
        x = self._encode(h, e, scalars, prev_actions, pos).transpose(0, 1)  # [B, T, d]
        for blk in self.blocks:
            x, _, _ = blk(x)
        eff = StepScalars.effective(scalars).float()
        n_eff = eff.cumsum(0) - eff  # effective steps before each step
        return self._head(x.transpose(0, 1), scalars, n_eff, temperature)


# ---- eval helpers ----------------------------------------------------------------------------------
def _minmax(x: Tensor) -> Tensor:
    """Min-max normalise to [0, 1] over the action list; a constant axis becomes all zeros."""
    x = x.to(torch.float32)
    span = x.max() - x.min()
    return (x - x.min()) / span if span > 0 else torch.zeros_like(x)


def action_logit_bias(
    kappa: Tensor, rho: Tensor, bits: Tensor, sparsity_bias: float, prune_bias: float, quant_bias: float
) -> Tensor:
    """Per-action eval bias s*n(kappa) + p*n(rho) + q*n(bits), shape [A].

    Callers SUBTRACT it from the tempered logits, so a positive bias makes denser / higher-bit actions
    less likely (the reference's eval-time bias). Training never uses it.
    """
    return sparsity_bias * _minmax(kappa) + prune_bias * _minmax(rho) + quant_bias * _minmax(bits)


def choose_actions(logits: Tensor, greedy: bool, generator: Optional[torch.Generator] = None) -> Tensor:
    """Argmax, or a sample from Categorical(logits) via multinomial on softmax. logits [..., A] -> long [...]."""
    if greedy:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.detach().float(), dim=-1)
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (optionally only those with requires_grad)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


__all__ = [
    "PolicyState", "SOLPolicy", "action_logit_bias", "choose_actions", "count_parameters", "N_SCALARS",
]
