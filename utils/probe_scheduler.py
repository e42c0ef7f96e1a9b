"""A supervised, content-aware schedule from the damage probe, with its budget calibration.

`PredictedDamageScheduler` makes a step cheap when the probe's predicted damage is under a threshold set
per row from the requested budget (`Calibration`, optionally corrected in the scheduler's own episodes);
`schedule_eval` runs it against the fixed baseline at its realised usage, as `eval_perplexity.py` does.
It is the teacher that `utils.imitation` clones into the policy.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from utils.cli import need
from utils.engine import Scheduler, StepObs, run_episode
from utils.probe_fit import design, features, fit_probe, predict
from utils.records import StepScalars


class PredictedDamageScheduler(Scheduler):
    """A supervised, content-aware schedule for a two-level grid: step t takes `cheap_idx` when the probe's
    predicted damage is at most the threshold, else the dense action. Sees exactly what the policy sees
    (previous hidden state, input token, position, surprisal and entropy).

    The threshold is either one number for all rows (`threshold`) or, with `calibration`, set per row from
    its requested budget: the quantile of the probe's predictions on the fit map at the cheap fraction the
    budget implies (`budget_thresholds`), so one fitted probe serves every budget.

    With `track=True` (needs `calibration`) the fraction is re-set before every effective step to what the
    row still needs: (cheap steps the budget asks for − cheap steps taken) / effective steps left. An
    open-loop threshold overspends wherever the text is harder than the fit map (the predictions run
    higher); tracking closes the loop, so the realised budget meets the request up to the rounding of the
    last step, and content still decides which steps are cheap. The policy sees the same running deviation
    (`step_scalars`' dev columns), so a clone can learn the feedback."""

    name = "predicted-damage"

    def __init__(self, model: tuple[torch.Tensor, ...], kind: str, effective: torch.Tensor, cheap_idx: int,
                 threshold: float | None = None, calibration: "Calibration | None" = None,
                 track: bool = False) -> None:
        if (threshold is None) == (calibration is None):
            raise ValueError("give exactly one of threshold and calibration")
        if track and calibration is None:
            raise ValueError("track needs a calibration")
        self.model, self.kind, self.cheap_idx = model, kind, int(cheap_idx)
        self.threshold, self.calibration, self.track = threshold, calibration, bool(track)
        self.pos_of = (effective.long().cumsum(0) - 1).tolist()  # step t -> effective-step index
        self.n_eff = int(effective.sum())
        self.predictions: list[torch.Tensor] = []  # [N] predicted damage of each effective step, in order

    def start(self, lm, budgets: torch.Tensor, group_size: int) -> None:
        super().start(lm, budgets, group_size)
        self.row_threshold = (torch.full((budgets.shape[0],), float(self.threshold), dtype=torch.float64)
                              if self.calibration is None else budget_thresholds(self.calibration, budgets.cpu()))
        if self.track:
            self.cheap_wanted = self.calibration.cheap_fraction(budgets[:, self.calibration.axis].cpu()) * self.n_eff
            self.cheap_taken = torch.zeros(budgets.shape[0], dtype=torch.float64)

    def choose(self, obs: StepObs) -> torch.Tensor:
        dense = torch.full_like(obs.input_ids, self.lm.actions.dense_idx)
        if not obs.effective:
            return dense
        N = obs.input_ids.shape[0]
        onehot = torch.zeros(N, self.n_eff, dtype=torch.float64)
        onehot[:, self.pos_of[obs.t]] = 1.0
        surprisal, entropy = StepScalars.surprisal(obs.scalars), StepScalars.entropy(obs.scalars)
        X = design(onehot, surprisal.cpu(), entropy.cpu(), obs.hidden.float().cpu(),
                    self.lm.embed(obs.input_ids).float().cpu(), self.kind)
        pred = predict(X, self.model)
        self.predictions.append(pred)
        if self.track:
            left = self.n_eff - self.pos_of[obs.t]
            thr = fraction_thresholds(self.calibration, (self.cheap_wanted - self.cheap_taken) / left)
            cheap_cpu = pred <= thr
            self.cheap_taken += cheap_cpu.double()
            cheap = cheap_cpu.to(obs.input_ids.device)
        else:
            cheap = (pred <= self.row_threshold).to(obs.input_ids.device)
        return torch.where(cheap, torch.full_like(dense, self.cheap_idx), dense)


@dataclass
class Calibration:
    """What turns a requested budget into a probe threshold: the probe's predictions on its fit map, and
    the one usage axis (0 tok, 1 prune, 2 bits) on which the cheap action sits at `lo` and dense at `hi`.

    Optionally an in-episode correction (`calibrate_in_episode`): the quantile `levels` of the fit
    predictions tried as thresholds and the cheap `shares` they gave in the scheduler's own episodes. The fit
    predictions come from dense episodes; once earlier steps were cheap the input's surprisal is higher, fewer
    steps fall under a threshold, and the schedule overspends. With the correction a requested cheap fraction
    is first mapped through the measured share → level curve."""

    fit_predictions: torch.Tensor  # [n] float64
    axis: int
    lo: float
    hi: float
    levels: torch.Tensor | None = None  # [L] increasing quantile levels in (0, 1]
    shares: torch.Tensor | None = None  # [L] non-decreasing realised cheap share at each level

    def cheap_fraction(self, target: torch.Tensor) -> torch.Tensor:
        """Share of steps that must be cheap for the mean usage on the axis to equal `target` (clamped)."""
        return ((self.hi - target.double()) / (self.hi - self.lo)).clamp(0.0, 1.0)

    def quantile_level(self, frac: torch.Tensor) -> torch.Tensor:
        """The quantile level of the fit predictions whose threshold gives the cheap fraction `frac`."""
        if self.levels is None:
            return frac
        xp = torch.cat([torch.zeros(1, dtype=torch.float64), self.shares.double()]).numpy()
        fp = torch.cat([torch.zeros(1, dtype=torch.float64), self.levels.double()]).numpy()
        xp = xp + 1e-12 * np.arange(len(xp))  # np.interp needs increasing abscissae; ties stay ties in effect
        return torch.from_numpy(np.interp(frac.double().numpy(), xp, fp))

    def corrected(self, levels: torch.Tensor, shares: torch.Tensor) -> "Calibration":
        """A copy with the in-episode correction `levels` → `shares` (made non-decreasing)."""
        return Calibration(self.fit_predictions, self.axis, self.lo, self.hi, levels.double().clone(),
                           torch.cummax(shares.double(), 0).values)


def budget_thresholds(cal: Calibration, budgets: torch.Tensor) -> torch.Tensor:
    """[N] thresholds for budgets [N, 3]: those of the cheap fractions the budgets imply."""
    return fraction_thresholds(cal, cal.cheap_fraction(budgets[:, cal.axis]))


def fraction_thresholds(cal: Calibration, frac: torch.Tensor) -> torch.Tensor:
    """[N] thresholds for cheap fractions [N]: the fit predictions' quantile at the level each fraction maps to
    (−inf at fraction ≤ 0, +inf at ≥ 1, so those two ends are exact)."""
    frac = frac.double()
    thr = torch.quantile(cal.fit_predictions, cal.quantile_level(frac).clamp(0.0, 1.0))
    thr = torch.where(frac >= 1 - 1e-6, torch.full_like(thr, math.inf), thr)  # float32 budgets: 0.4 -> 0.99999
    return torch.where(frac > 0, thr, torch.full_like(thr, -math.inf))


def level_budgets(cal: Calibration, levels: torch.Tensor) -> torch.Tensor:
    """[L, 3] budgets whose uncorrected cheap fraction is each of `levels` (dense on the other two axes)."""
    b = torch.ones(len(levels), 3)
    b[:, cal.axis] = (cal.hi - levels.double() * (cal.hi - cal.lo)).float()
    return b


def calibrate_in_episode(lm, sched: PredictedDamageScheduler, blocks: torch.Tensor, context_len: int,
                         levels: torch.Tensor, batch_size: int = 4, progress: bool = True) -> Calibration:
    """Measure the cheap share `sched` realises in its own episodes at each quantile level (every block is
    decoded once per level, one level per row) and return its calibration with that correction."""
    from tqdm import tqdm

    cal = sched.calibration
    if cal is None or cal.levels is not None or sched.track:
        raise ValueError("calibrate_in_episode needs an open-loop scheduler with an uncorrected calibration")
    L = len(levels)
    per_row = level_budgets(cal, levels)
    cheap, n = torch.zeros(L, dtype=torch.float64), 0
    for i in tqdm(range(0, len(blocks), batch_size), desc="in-episode calibration", disable=not progress):
        b = blocks[i: i + batch_size]
        with torch.inference_mode():
            ep = run_episode(lm, b, sched, per_row.repeat(b.shape[0], 1), context_len, L)
        eff = ep.effective.to(ep.actions.device)
        share = (ep.actions[eff] == sched.cheap_idx).double().mean(0).cpu()  # [B·L], block-major
        cheap += share.view(b.shape[0], L).sum(0)
        n += b.shape[0]
    return cal.corrected(levels, cheap / max(1, n))


def probe_axis(acts, cheap_idx: int) -> tuple[int, float, float]:
    """(axis, cheap value, dense value) of the single usage axis on which `cheap_idx` differs from dense."""
    net = lambda i: (float(acts.keep[i]), float(acts.prune[i] / acts.prune_max), float(acts.bits[i]) / 16.0)  # noqa: E731
    lo, hi = net(cheap_idx), net(acts.dense_idx)
    axes = [j for j in range(3) if abs(lo[j] - hi[j]) > 1e-9]
    need(len(axes) == 1, f"the probe action {acts.tags[cheap_idx]} must differ from dense on exactly one axis")
    return axes[0], lo[axes[0]], hi[axes[0]]


def fit_scheduler(fit_map: dict[str, torch.Tensor], kind: str, acts, cheap_idx: int
                  ) -> tuple[PredictedDamageScheduler, float]:
    """Fit the `kind` probe on a damage map and wrap it as a budget-calibrated scheduler; returns it and λ."""
    eff = fit_map["effective"]
    X = features(fit_map, kind)
    model, lam = fit_probe(X, fit_map["damage"][:, eff].double(), int(eff.sum()))
    cal = Calibration(predict(X.reshape(-1, X.shape[-1]), model), *probe_axis(acts, cheap_idx))
    return PredictedDamageScheduler(model, kind, eff, cheap_idx, calibration=cal), lam


def schedule_eval(lm, fit_map: dict[str, torch.Tensor], cheap_idx: int, blocks: torch.Tensor, context_len: int,
                  batch_size: int, target: float, kinds: list[str], seed: int = 0) -> list[dict]:
    """For each feature set: fit the probe on `fit_map`, set the threshold so that the cheap fraction the
    requested `target` implies is met on the fit map, run that schedule and dense on `blocks`, then the fixed
    baseline at the schedule's realised usage on the same blocks. Rows: PPLs, usage, ΔNLL and its interval."""
    from utils.baselines import FixedScheduler
    from utils.evaluation import evaluate_matched, paired_bootstrap_ci
    from utils.schedulers import DenseScheduler

    ax, lo, hi = probe_axis(lm.actions, cheap_idx)
    frac = (hi - target) / (hi - lo)
    need(0.0 < frac < 1.0, f"--target {target} is outside ({lo:g}, {hi:g}) on the probe's axis")
    budgets = [1.0, 1.0, 1.0]
    budgets[ax] = target
    rows = []
    for kind in kinds:
        sched, lam = fit_scheduler(fit_map, kind, lm.actions, cheap_idx)
        thr = float(budget_thresholds(sched.calibration, torch.tensor([budgets]))[0])
        name = f"predicted[{kind}]"
        res, tgt = evaluate_matched(lm, blocks, batch_size, None, {name: sched, "dense": DenseScheduler()},
                                    lambda t: {"fixed": FixedScheduler(t)}, tuple(budgets), context_len=context_len,
                                    match=name)
        pr, fx, dn = res[name], res["fixed"], res["dense"]
        ci = paired_bootstrap_ci(pr.nll, fx.nll, seed=seed, seq_len=pr.seq_len)
        rows.append({"features": kind, "lambda": lam, "threshold": thr, "cheap_frac_requested": frac,
                     "usage": pr.usage[ax], "fixed_usage": fx.usage[ax], "ppl": pr.ppl, "fixed_ppl": fx.ppl,
                     "dense_ppl": dn.ppl, "delta_nll": pr.mean_nll - fx.mean_nll, "delta_nll_lo": ci[0],
                     "delta_nll_hi": ci[1], "n_tokens": pr.n_tokens})
    return rows
