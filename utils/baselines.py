"""Content-blind and heuristic baseline schedulers, matched to a usage target (the reference's
fixed, random, EMC and DAC baselines, with the deviations noted in docs/deviations.md).

All targets are *usage ratios* per axis, in the units the budgets and the engine's nominal usage use:
(κ, ρ / P_MAX, bits / 16). Every scheduler mixes, per axis, the two grid levels that bracket its target
(lo <= target <= hi, clamped at the ends of the axis), so only *where* the cheap and the expensive steps go
differs between them:

* `FixedScheduler`: the reference's deterministic two-level dither. At each effective step the number of
  rows given `hi` comes from a running residual over every row-step this scheduler has seen (across
  batches and episodes), so the realised average stays within one row-step of the target; which rows get
  `hi` rotates with the step counter, offset per axis (0, 17, 37) to decorrelate the axes. With one row
  (streaming) it is a temporal dither. Deviation: the reference uses per-step rounding (no residual) for κ
  and the residual only for ρ and bits; we use the residual on all three axes, which is never worse and
  keeps κ matched when N = 1.
* `FixedRefScheduler`: the reference's own row pattern for the same counts (an extra column, see its doc).
* `RandomScheduler`: per row and axis, a count-matched schedule of k or k + 1 `hi` steps over the R
  effective steps of the episode (`CountSpreader`: the total over all rows tracks p_hi · R), randomly
  permuted per row (independent per axis, seeded).
* `EMCScheduler` / `DACScheduler`: per-row running controllers that aim at the required remaining average,
  pushed towards the denser level when a signal is high (entropy of the previous next-token distribution,
  resp. drift of the final hidden state), and kept inside the band from which the remaining steps can still
  reach the row's target; row targets are spread like the random baseline's counts, so the mean matches.

Non-effective steps (cache too short to sparsify) run dense and are not counted in any average.
`budget_matched_targets` gives the policy's realised global averages, the targets the baselines are run at.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F

from utils.actions import DENSE_BITS, ActionSpace
from utils.engine import Episode, Scheduler, StepObs

AXES = ("keep", "prune", "qratio")
ROTATION_OFFSETS = (0, 17, 37)  # reference: rows rotate with t, t + 17, t + 37 on the three axes
_EPS = 1e-9


# ---------------------------------------------------------------------------------------------------------
# level tables
# ---------------------------------------------------------------------------------------------------------

def axis_levels(actions: ActionSpace) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per axis: (usage levels sorted ascending [n] float64, their positions on the grid axis [n] long).

    Usage units: κ, ρ / P_MAX, bits / 16 (what the engine records as nominal usage).
    """
    raw = (
        [float(k) for k in actions.keep_values],
        [float(p) / actions.prune_max for p in actions.prune_values],
        [float(b) / DENSE_BITS for b in actions.bit_values],
    )
    out = []
    for vals in raw:
        v = torch.tensor(vals, dtype=torch.float64)
        order = torch.argsort(v)
        out.append((v[order], order))
    return out


def bracket(levels: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Neighbouring levels around each target: (lo index, hi index, p_hi) into the sorted `levels`.

    The target is clamped to [levels[0], levels[-1]]; on a grid level lo == hi and p_hi = 0;
    otherwise p_hi = (target - lo) / (hi - lo), so p_hi·hi + (1 - p_hi)·lo = target.
    """
    t = target.to(torch.float64).clamp(levels[0].item(), levels[-1].item())
    n = levels.numel()
    hi = torch.searchsorted(levels, t).clamp(max=n - 1)  # first level >= t
    exact = (levels[hi] - t).abs() <= _EPS
    lo = torch.where(exact, hi, (hi - 1).clamp(min=0))
    hi = torch.where(exact, lo, hi)
    span = levels[hi] - levels[lo]
    p_hi = torch.where(span > 0, (t - levels[lo]) / torch.where(span > 0, span, torch.ones_like(span)),
                       torch.zeros_like(t))
    return lo, hi, p_hi


def flat_index(actions: ActionSpace, i_k: torch.Tensor, i_p: torch.Tensor, i_q: torch.Tensor) -> torch.Tensor:
    """Flat action index from grid-axis positions (κ outer, ρ middle, bits inner)."""
    _, n_p, n_q = actions.axis_sizes()
    return (i_k * n_p + i_p) * n_q + i_q


def _check_targets(targets: Sequence[float]) -> tuple[float, float, float]:
    if len(targets) != 3:
        raise ValueError(f"targets must be (keep, prune_keep/P_MAX, bits/16), got {targets!r}")
    t = tuple(float(x) for x in targets)
    for name, v in zip(AXES, t):
        if not (0.0 <= v <= 1.0) or math.isnan(v):
            raise ValueError(f"target {name} must be a usage ratio in [0, 1], got {v}")
    return t  # type: ignore[return-value]


def budget_matched_targets(episodes: Iterable[Episode]) -> tuple[float, float, float]:
    """The realised global averages (κ̄, ρ̄/P_MAX, q̄) over all effective row-steps of `episodes`
    (dense 1.0 when there is none): the targets the baselines are matched to, as in the reference."""
    sums = torch.zeros(3, dtype=torch.float64)
    n = 0.0
    for ep in episodes:
        eff = ep.effective.to(torch.float64)[:, None]  # [T, 1]
        for a, k in enumerate(AXES):
            sums[a] += (ep.usage[k].detach().cpu().to(torch.float64) * eff).sum()
        n += float(eff.sum()) * ep.usage["keep"].shape[1]
    if n == 0:
        return (1.0, 1.0, 1.0)
    m = sums / n
    return (float(m[0]), float(m[1]), float(m[2]))


class CountSpreader:
    """Per-row integer counts of `hi` steps whose running total tracks p_hi·R over every row seen.

    Rounding each row's count to round(p_hi·R) leaves the mean usage up to half a level gap / R off the
    target (0.019 on the s40/s100 grid at R = 16); instead the total over all rows so far (across batches and
    episodes) is kept at round(p_hi·R·rows), and the rows of a batch share it as floor/ceil counts (the extra
    ones rotate over rows). So the mean over many rows is within one row-step of the target."""

    def __init__(self) -> None:
        self.rows = 0  # rows seen
        self.total = 0  # hi steps given

    def counts(self, p_hi: float, R: int, N: int) -> torch.Tensor:
        n_total = min(max(math.floor(p_hi * R * (self.rows + N) + 0.5) - self.total, 0), N * R)
        base, extra = divmod(n_total, N)
        out = torch.full((N,), base, dtype=torch.long)
        out[(torch.arange(N) + self.rows) % N < extra] += 1
        self.rows += N
        self.total += n_total
        return out


# ---------------------------------------------------------------------------------------------------------
# schedulers
# ---------------------------------------------------------------------------------------------------------

class _TwoLevelScheduler(Scheduler):
    """Shared set-up: per-axis level tables and the targets' two-level brackets for the LM's action grid."""

    uses_lm_scalars = False  # content-blind, or (EMC) reads the previous logits itself

    def __init__(self, targets: Sequence[float]) -> None:
        self.targets = _check_targets(targets)
        self._grid_key = None

    def _prepare(self, actions: ActionSpace) -> None:
        key = (actions.keep_values, actions.prune_values, actions.bit_values)
        if key == self._grid_key:
            return
        self._grid_key = key
        self.levels = axis_levels(actions)
        self.mix = []  # per axis: (lo value, hi value, lo grid pos, hi grid pos, p_hi)
        for a, (lv, pos) in enumerate(self.levels):
            lo, hi, p = bracket(lv, torch.tensor([self.targets[a]]))
            self.mix.append((float(lv[lo]), float(lv[hi]), int(pos[lo]), int(pos[hi]), float(p)))

    def start(self, lm, budgets: torch.Tensor, group_size: int) -> None:
        super().start(lm, budgets, group_size)
        self._prepare(lm.actions)

    def _dense(self, obs: StepObs) -> torch.Tensor:
        return torch.full_like(obs.input_ids, self.lm.actions.dense_idx)

    def mix_table(self) -> dict[str, tuple[float, float, float]]:
        """{axis: (lo, hi, p_hi)} after the first `start` (what the reference reports as mix_keep etc.)."""
        return {k: (m[0], m[1], m[4]) for k, m in zip(AXES, self.mix)}


class FixedScheduler(_TwoLevelScheduler):
    """Deterministic, content-blind two-level dither around `targets` (see the module docstring).

    State (step counter and residual) persists across `start()` calls; `reset()` clears it.
    """

    name = "fixed"

    def __init__(self, targets: Sequence[float]) -> None:
        super().__init__(targets)
        self.reset()

    def reset(self) -> None:
        self._step = 0  # effective steps seen
        self._rows = 0  # effective row-steps seen
        self._sum = [0.0, 0.0, 0.0]  # sum of chosen usage values per axis

    def choose(self, obs: StepObs) -> torch.Tensor:
        if not obs.effective:
            return self._dense(obs)
        N, dev = obs.input_ids.shape[0], obs.input_ids.device
        rows = torch.arange(N, device=dev)
        pos = []
        for a, (lo_v, hi_v, lo_i, hi_i, _) in enumerate(self.mix):
            if hi_v > lo_v:
                need = self.targets[a] * (self._rows + N) - self._sum[a]  # what this step must add
                n_hi = int(min(max(math.floor((need - N * lo_v) / (hi_v - lo_v) + 0.5), 0), N))
            else:
                n_hi = 0
            pos.append(torch.where(self._hi_rows(rows, n_hi, a, obs), hi_i, lo_i))
            self._sum[a] += n_hi * hi_v + (N - n_hi) * lo_v
        self._rows += N
        self._step += 1
        return flat_index(self.lm.actions, *pos)

    def _hi_rows(self, rows: torch.Tensor, n_hi: int, axis: int, obs: StepObs) -> torch.Tensor:
        """Which of the N rows get `hi` this step: a window of n_hi rows that moves by one row per step."""
        return (rows + self._step + ROTATION_OFFSETS[axis]) % rows.numel() < n_hi


class FixedRefScheduler(FixedScheduler):
    """The reference's fixed pattern, kept as an extra column for comparison with the paper's
    protocol: the same count of `hi` rows per step as `FixedScheduler` (running residual), but the window of
    `hi` rows jumps by ((t + offset)·n_hi) mod N at decode step t, so within an episode the rows take turns
    and every row gets the same number of cheap steps (±1), interleaved. Ours moves the window by one row per
    step, which gives each row one contiguous run of cheap steps; on WikiText-2 ours is the slightly stronger
    baseline (it is the main comparison)."""

    name = "fixed_ref"

    def _hi_rows(self, rows: torch.Tensor, n_hi: int, axis: int, obs: StepObs) -> torch.Tensor:
        N = rows.numel()
        start = ((obs.t + ROTATION_OFFSETS[axis]) * n_hi) % N
        return (rows - start) % N < n_hi


class RandomScheduler(_TwoLevelScheduler):
    """Count-matched random placement: per row and axis, round(p_hi·R) `hi` steps among the R effective
    steps of the episode, in a random order drawn from a generator seeded with `seed` (same seed, same
    schedules; the generator advances from episode to episode)."""

    name = "random"

    def __init__(self, targets: Sequence[float], seed: int = 1234) -> None:
        super().__init__(targets)
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)
        self._spread = [CountSpreader() for _ in AXES]

    def start(self, lm, budgets: torch.Tensor, group_size: int) -> None:
        super().start(lm, budgets, group_size)
        self._schedule: list[torch.Tensor] | None = None  # per axis [N, R] bool: hi at effective step j
        self._j = 0

    def _draw(self, N: int, R: int, device) -> list[torch.Tensor]:
        out = []
        for (lo_v, hi_v, _, _, p), spread in zip(self.mix, self._spread):
            n_hi = spread.counts(p, R, N) if hi_v > lo_v else torch.zeros(N, dtype=torch.long)
            ranks = torch.rand(N, R, generator=self.generator).argsort(dim=1).argsort(dim=1)  # a permutation per row
            out.append((ranks < n_hi[:, None]).to(device))
        return out

    def choose(self, obs: StepObs) -> torch.Tensor:
        if not obs.effective:
            return self._dense(obs)
        if self._schedule is None:  # effective steps form a suffix of the episode: R = T - first effective t
            self._schedule = self._draw(obs.input_ids.shape[0], obs.T - obs.t, obs.input_ids.device)
        j = self._j
        self._j += 1
        pos = [torch.where(s[:, j], m[3], m[2]) for s, m in zip(self._schedule, self.mix)]
        return flat_index(self.lm.actions, *pos)


class _SignalScheduler(_TwoLevelScheduler):
    """Per-row controller shared by EMC and DAC, as the reference.

    Per row and axis at each effective step: required remaining average c_req = (total − sum_done) /
    (R − done), clamped to the axis range and bracketed by neighbouring levels, where the row's total is
    R·lo + n·(hi − lo) with n from a `CountSpreader` (the reference uses target·R, rounded per row by the
    controller; the spread keeps the mean over rows on the target); p = p_hi(c_req) + γ·(signal − 0.5); `hi` if p >= 0.5; then clamped into the feasible band, i.e. the chosen value v must
    leave a remainder the other R − done − 1 steps can still reach with the axis's extreme levels
    (when neither neighbour is feasible, the one nearer to c_req). So each row reaches its total (exactly on a
    two-level axis), and the signal only decides where the dense steps go.
    `ema` > 0 smooths the signal over steps (reference option).
    """

    def __init__(self, targets: Sequence[float], gamma: float = 0.35, ema: float = 0.0) -> None:
        super().__init__(targets)
        if not 0.0 <= ema < 1.0:
            raise ValueError(f"ema must be in [0, 1), got {ema}")
        self.gamma, self.ema = float(gamma), float(ema)
        self._spread = [CountSpreader() for _ in AXES]

    def _row_totals(self, R: int, N: int, device) -> torch.Tensor:
        """[N, 3] each row's usage total over its R effective steps: R·lo + n·(hi − lo) with the spread counts n."""
        cols = []
        for (lo_v, hi_v, _, _, p), spread in zip(self.mix, self._spread):
            n = spread.counts(p, R, N) if hi_v > lo_v else torch.zeros(N, dtype=torch.long)
            cols.append(R * lo_v + n.double() * (hi_v - lo_v))
        return torch.stack(cols, dim=-1).to(device)

    def start(self, lm, budgets: torch.Tensor, group_size: int) -> None:
        super().start(lm, budgets, group_size)
        self._R: int | None = None
        self._done = 0
        self._sum: torch.Tensor | None = None
        self._smoothed: torch.Tensor | None = None
        self.signals: list[torch.Tensor] = []  # per step [N], for inspection

    def signal(self, obs: StepObs) -> torch.Tensor:
        """[N] in [0, 1]; high = hard/changing content = spend more. Called at every step (also non-effective)."""
        raise NotImplementedError

    def choose(self, obs: StepObs) -> torch.Tensor:
        s = self.signal(obs).detach().to(torch.float64).clamp(0.0, 1.0)
        if self.ema > 0 and self._smoothed is not None:
            s = self.ema * self._smoothed + (1.0 - self.ema) * s
        self._smoothed = s
        self.signals.append(s)
        if not obs.effective:
            return self._dense(obs)
        N, dev = obs.input_ids.shape[0], obs.input_ids.device
        if self._R is None:
            self._R = obs.T - obs.t
            self._sum = torch.zeros(N, 3, dtype=torch.float64, device=dev)
            self._total = self._row_totals(self._R, N, dev)
        rem = self._R - self._done
        s = s.to(dev)
        pos = []
        for a, (levels, grid_pos) in enumerate(self.levels):
            lv, gp = levels.to(dev), grid_pos.to(dev)
            need = self._total[:, a] - self._sum[:, a]  # what the remaining `rem` steps must add
            c_req = need / rem
            lo, hi, p_base = bracket(lv, c_req)
            want_hi = p_base + self.gamma * (s - 0.5) >= 0.5
            v_lo, v_hi = lv[lo], lv[hi]
            v_min = need - (rem - 1) * lv[-1]  # below this, the rest cannot catch up even at the top level
            v_max = need - (rem - 1) * lv[0]  # above this, the rest overshoots even at the bottom level
            lo_bad, hi_bad = v_lo < v_min - _EPS, v_hi > v_max + _EPS
            nearer_hi = (v_hi - c_req) < (c_req - v_lo)
            choose_hi = torch.where(lo_bad & hi_bad, nearer_hi,
                                    torch.where(lo_bad, True, torch.where(hi_bad, False, want_hi)))
            self._sum[:, a] += torch.where(choose_hi, v_hi, v_lo)
            pos.append(gp[torch.where(choose_hi, hi, lo)])
        self._done += 1
        return flat_index(self.lm.actions, *pos)


class EMCScheduler(_SignalScheduler):
    """Entropy-modulated control: signal = normalised entropy H(p)/log V of the previous step's next-token
    distribution (at t = 0 the prefill's last logits). `mix` < 1 blends in (1 − top-2 margin)."""

    name = "emc"

    def __init__(self, targets: Sequence[float], gamma: float = 0.35, ema: float = 0.0, mix: float = 1.0) -> None:
        super().__init__(targets, gamma, ema)
        self.mix_entropy = float(mix)

    def signal(self, obs: StepObs) -> torch.Tensor:
        logp = F.log_softmax(obs.prev_logits.float(), dim=-1)
        p = logp.exp()
        ent = -(p * logp).sum(-1) / math.log(logp.shape[-1])
        if self.mix_entropy >= 1.0:
            return ent
        top2 = p.topk(2, dim=-1).values
        return self.mix_entropy * ent + (1.0 - self.mix_entropy) * (1.0 - (top2[:, 0] - top2[:, 1]))


class DACScheduler(_SignalScheduler):
    """Drift-aware control: signal = 0.5·(1 − cos(h_{t−1}, h_{t−2})) between the final-norm hidden states of
    the last two LM calls (at t = 1 the pair is the first decode step's input and the last prefill token).

    At t = 0 only one hidden state exists (the engine does not expose the last prefill token, so the
    reference's embedding pair cannot be formed): the signal is the neutral 0.5, i.e. the step follows the
    count-matched interpolation alone. Mixing an input embedding with a final-norm hidden state would put
    a cosine of a different scale into the same threshold, so we do not.
    """

    name = "dac"

    def start(self, lm, budgets: torch.Tensor, group_size: int) -> None:
        super().start(lm, budgets, group_size)
        self._prev_hidden: torch.Tensor | None = None

    def signal(self, obs: StepObs) -> torch.Tensor:
        h = obs.hidden.float()
        if self._prev_hidden is None:
            s = torch.full((h.shape[0],), 0.5, device=h.device)
        else:
            s = 0.5 * (1.0 - F.cosine_similarity(h, self._prev_hidden, dim=-1))
        self._prev_hidden = h.clone()
        return s


__all__ = [
    "AXES", "CountSpreader", "DACScheduler", "EMCScheduler", "FixedRefScheduler", "FixedScheduler", "RandomScheduler", "axis_levels", "bracket",
    "budget_matched_targets", "flat_index",
]
