"""Damage probe: can the policy's own inputs predict where a cheap step hurts?

    python -m utils.damage_probe collect --config official_configs/cpu_smollm2_prune.yml --split train \\
        --blocks 384 --save map_train.pt
    python -m utils.damage_probe collect --config official_configs/cpu_smollm2_prune.yml --split dev --save map_dev.pt
    python -m utils.damage_probe fit --fit map_train.pt --eval map_dev.pt
    python -m utils.damage_probe schedule --fit map_train.pt --split dev --target 0.7

The placement report (utils/placement.py) found that the trained policy's schedule is set by position and
hardly by content. That has two possible causes: the content signal is not in what the policy sees, or it
is and GRPO does not extract it. This probe separates them without any RL.

1. Damage map (as in utils/placement.py): for every decode step t of every block, the NLL increase,
   summed over token t and the later tokens it reaches, of running step t alone with the probe action
   (default: the grid's cheapest) in an otherwise dense episode.
2. Features, from a dense episode over the same blocks, of exactly what the policy can see before step t:
   the previous LM call's final hidden state h_{t-1}, the input token's embedding e(x_t), the position t,
   and two scalars the LM head gives away: the surprisal of x_t and the entropy of the distribution it was
   drawn from (both from h_{t-1}).
3. Ridge regressions on nested feature sets, fitted on one map (train blocks) and scored on another (dev
   blocks), or 2-fold over the sequences of one map; the ridge strength is chosen by an inner 2-fold split
   of the fitting sequences:
   `position` (content-blind: a per-position mean), `+scalars`, `+hidden`, `+hidden+token`.
4. For each, held-out correlations with the damage and the damage (additive approximation) of making each
   sequence's `frac` lowest-predicted steps cheap, against random steps and the oracle (the truly least
   harmful steps). If `+hidden` beats `position` clearly, a content-aware schedule is learnable from the
   policy's inputs and the bottleneck is the training signal; if not, content-blind is about as good as
   these features allow.
5. `schedule` checks the additive approximation end to end: a scheduler that makes a step cheap when the
   probe's predicted damage is under a threshold (set on the fit map for the cheap fraction the requested
   usage implies) decodes held-out blocks, and the fixed baseline runs at its realised usage on the same
   blocks, as in `eval_perplexity.py`.

Fit on train blocks and score on dev blocks: this is for understanding and choosing, not for reporting on test.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import asdict, dataclass

import numpy as np
import torch

from utils.cli import OneLineErrorParser, SOLError, UsageError, check_output_file, need
from utils.engine import Scheduler, StepObs, prefill_blocks, run_episode
from utils.placement import _corr, _rank, cheapest_action, single_step_damage
from utils.records import StepScalars

FEATURE_SETS = ("position", "+scalars", "+hidden", "+hidden+token")
LAMBDAS = (1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3, 1e4, 1e5)


class DenseRecorder(Scheduler):
    """Dense actions everywhere; records the policy-visible inputs of each step."""

    name = "dense-recorder"

    def start(self, lm, budgets, group_size) -> None:
        super().start(lm, budgets, group_size)
        self.hidden, self.tokens, self.surprisal, self.entropy = [], [], [], []

    def choose(self, obs: StepObs) -> torch.Tensor:
        self.hidden.append(obs.hidden.float())
        self.tokens.append(obs.input_ids)
        self.surprisal.append(StepScalars.surprisal(obs.scalars))
        self.entropy.append(StepScalars.entropy(obs.scalars))
        return torch.full_like(obs.input_ids, self.lm.actions.dense_idx)


def collect(lm, blocks: torch.Tensor, context_len: int, batch_size: int, probe_idx: int,
            progress: bool = True, rows_per_forward: int = 0) -> dict[str, torch.Tensor]:
    """Damage map and policy-visible features of `blocks` [S, C+T+1]; every tensor is [S, T, ...] on CPU."""
    from tqdm import tqdm

    out: dict[str, list] = {k: [] for k in ("damage", "damage_local", "hidden", "embed", "surprisal", "entropy")}
    effective = None
    for i in tqdm(range(0, blocks.shape[0], batch_size), desc="damage map", disable=not progress):
        pf = prefill_blocks(lm, blocks[i: i + batch_size], context_len)
        loc, tot = single_step_damage(lm, pf, probe_idx, rows_per_forward)
        rec = DenseRecorder()
        B = tot.shape[1]
        ep = run_episode(lm, None, rec, torch.ones(B, 3), context_len, prefill=pf)
        effective = ep.effective.cpu()
        tok = torch.stack(rec.tokens, 1)
        out["damage"].append(tot.T.float().cpu())
        out["damage_local"].append(loc.T.float().cpu())
        out["hidden"].append(torch.stack(rec.hidden, 1).cpu())
        out["embed"].append(lm.embed(tok).float().cpu())
        out["surprisal"].append(torch.stack(rec.surprisal, 1).cpu())
        out["entropy"].append(torch.stack(rec.entropy, 1).cpu())
    res = {k: torch.cat(v) for k, v in out.items()}
    res["effective"] = effective
    return res


def _design(onehot: torch.Tensor, surprisal: torch.Tensor, entropy: torch.Tensor, hidden: torch.Tensor,
            embed: torch.Tensor, kind: str) -> torch.Tensor:
    """Feature columns of one feature set from per-step inputs (any leading shape)."""
    if kind not in FEATURE_SETS:
        raise UsageError(f"unknown feature set {kind!r}; expected one of {', '.join(FEATURE_SETS)}")
    parts = [onehot]  # position one-hot (carries the intercept)
    if kind != "position":
        s, e = surprisal, entropy
        parts.append(torch.stack([s, e, s * s, e * e, s * e], -1))
    if kind in ("+hidden", "+hidden+token"):
        parts.append(hidden)
    if kind == "+hidden+token":
        parts.append(embed)
    return torch.cat([x.double() for x in parts], -1)


def features(data: dict[str, torch.Tensor], kind: str) -> torch.Tensor:
    """Design matrix [S, T_eff, F] of one feature set, over the effective steps only."""
    eff = data["effective"]
    S = data["damage"].shape[0]
    n_eff = int(eff.sum())
    return _design(torch.eye(n_eff).expand(S, n_eff, n_eff), data["surprisal"][:, eff], data["entropy"][:, eff],
                   data["hidden"][:, eff], data["embed"][:, eff], kind)


def _fit_ridge(X: torch.Tensor, y: torch.Tensor, lam: float, n_pos: int) -> tuple[torch.Tensor, ...]:
    """Ridge on standardised non-position columns (position one-hots unpenalised); returns (w, mu, sd)."""
    mu, sd = X.mean(0), X.std(0).clamp_min(1e-8)
    mu[:n_pos], sd[:n_pos] = 0.0, 1.0
    Z = (X - mu) / sd
    pen = torch.full((X.shape[1],), lam, dtype=X.dtype)
    pen[:n_pos] = 1e-6
    w = torch.linalg.solve(Z.T @ Z + torch.diag(pen), Z.T @ y)
    return w, mu, sd


def _predict(X: torch.Tensor, model: tuple[torch.Tensor, ...]) -> torch.Tensor:
    w, mu, sd = model
    return ((X - mu) / sd) @ w


def _clip(y: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Clip targets to the 1st..99th percentile of `ref` (the damage has heavy tails)."""
    lo, hi = torch.quantile(ref, 0.01), torch.quantile(ref, 0.99)
    return y.clamp(float(lo), float(hi))


def fit_feature_set(X: torch.Tensor, d: torch.Tensor, train: torch.Tensor, test: torch.Tensor,
                    n_pos: int) -> tuple[torch.Tensor, float]:
    """Fit on the `train` sequences (λ by an inner 2-fold split of them), predict the `test` sequences."""
    m, lam = fit_probe(X[train], d[train], n_pos)
    return _predict(X[test].reshape(-1, X.shape[-1]), m).reshape(len(test), -1), lam


def fit_probe(X: torch.Tensor, d: torch.Tensor, n_pos: int) -> tuple[tuple[torch.Tensor, ...], float]:
    """Ridge fit of damage `d` [S, T_eff] on `X` [S, T_eff, F]; λ by an inner 2-fold split over sequences.
    Returns (model for `_predict`, λ)."""
    y = _clip(d, d.flatten())
    idx = torch.arange(X.shape[0])
    a, b = idx[::2], idx[1::2]

    def flat(i):
        return X[i].reshape(-1, X.shape[-1]), y[i].reshape(-1)

    best, best_lam = -math.inf, LAMBDAS[0]
    for lam in LAMBDAS:
        score = 0.0
        for fit_idx, val_idx in ((a, b), (b, a)):
            m = _fit_ridge(*flat(fit_idx), lam, n_pos)
            score += _corr(_predict(X[val_idx].reshape(-1, X.shape[-1]), m), d[val_idx].reshape(-1))
        if score > best:
            best, best_lam = score, lam
    return _fit_ridge(*flat(idx), best_lam, n_pos), best_lam


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
        X = _design(onehot, surprisal.cpu(), entropy.cpu(), obs.hidden.float().cpu(),
                    self.lm.embed(obs.input_ids).float().cpu(), self.kind)
        pred = _predict(X, self.model)
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
    cal = Calibration(_predict(X.reshape(-1, X.shape[-1]), model), *probe_axis(acts, cheap_idx))
    return PredictedDamageScheduler(model, kind, eff, cheap_idx, calibration=cal), lam


@dataclass
class ProbeRow:
    features: str
    pearson: float  # held-out, predicted vs true damage
    spearman: float
    within_seq_spearman: float  # mean over sequences of the rank correlation across its own steps
    cheap_damage: float  # nats per sequence when its `frac` lowest-predicted steps are cheap
    lambdas: list[float]  # ridge strength chosen in each fold


@dataclass
class ProbeReport:
    n_sequences: int
    steps: int
    frac: float
    cheap_per_seq: int
    damage_mean: float
    random_cheap_damage: float
    oracle_cheap_damage: float
    rows: list[ProbeRow]


def probe_report(data: dict[str, torch.Tensor], frac: float = 0.5, seed: int = 0,
                 eval_data: dict[str, torch.Tensor] | None = None) -> ProbeReport:
    """Held-out fit of every feature set and the placement it implies. With `eval_data`: fit on `data`,
    score `eval_data`; without: 2-fold over the sequences of `data` (each half predicted by a fit on the
    other)."""
    d_fit = data["damage"][:, data["effective"]].double()  # [S, T_eff]
    if eval_data is None:
        S = d_fit.shape[0]
        if S < 4:
            raise UsageError(f"the probe needs at least 4 sequences, got {S}")
        perm = torch.randperm(S, generator=torch.Generator().manual_seed(seed))
        halves = (perm[: S // 2], perm[S // 2:])
        splits = [(halves[0], halves[1]), (halves[1], halves[0])]
        d = d_fit
    else:
        if not torch.equal(eval_data["effective"], data["effective"]):
            raise UsageError("the fit and eval damage maps have different effective steps (another config?)")
        n_fit = d_fit.shape[0]
        if n_fit < 4:
            raise UsageError(f"the probe needs at least 4 fit sequences, got {n_fit}")
        d = eval_data["damage"][:, eval_data["effective"]].double()
        splits = [(torch.arange(n_fit), torch.arange(n_fit, n_fit + d.shape[0]))]
        d_fit = torch.cat([d_fit, d])
    S, T_eff = d.shape
    n = max(1, min(T_eff, round(frac * T_eff)))
    rows = []
    for kind in FEATURE_SETS:
        X = features(data, kind)
        if eval_data is not None:
            X = torch.cat([X, features(eval_data, kind)])
        pred = torch.empty_like(d_fit)
        lams = []
        for train, test in splits:
            p, lam = fit_feature_set(X, d_fit, train, test, T_eff)
            pred[test] = p
            lams.append(lam)
        if eval_data is not None:
            pred = pred[splits[0][1]]
        pick = pred.argsort(dim=1)[:, :n]
        within = [_corr(_rank(pred[i]), _rank(d[i])) for i in range(S)]
        within = [w for w in within if not math.isnan(w)]
        rows.append(ProbeRow(kind, _corr(pred, d), _corr(_rank(pred.flatten()), _rank(d.flatten())),
                             sum(within) / len(within) if within else float("nan"),
                             float(d.gather(1, pick).sum(1).mean()), lams))
    oracle = float(d.sort(dim=1).values[:, :n].sum(1).mean())
    return ProbeReport(S, T_eff, frac, n, float(d.mean()), float(d.mean(1).mean() * n), oracle, rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = OneLineErrorParser(prog="python -m utils.damage_probe", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, parser_class=OneLineErrorParser)
    c = sub.add_parser("collect", help="measure a damage map and the policy-visible features, save them (.pt)")
    c.add_argument("--config", required=True, help="config (model, data, action grid) to probe")
    c.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    c.add_argument("--split", default="dev", help="blocks to probe: train, dev or test (default dev)")
    c.add_argument("--blocks", type=int, default=100, help="sequences (default 100; cost: T+2 episodes per batch)")
    c.add_argument("--batch_size", type=int, default=16, help="sequences per batch (default 16)")
    c.add_argument("--probe", help="action tag of the cheap step (default: the grid's cheapest action)")
    c.add_argument("--save", required=True, help="output file (.pt)")
    f = sub.add_parser("fit", help="fit the probes on one saved map and score them on another (or 2-fold)")
    f.add_argument("--fit", required=True, help="damage map to fit on (from collect)")
    f.add_argument("--eval", help="damage map to score on (default: 2-fold over the --fit sequences)")
    f.add_argument("--frac", type=float, default=0.5, help="fraction of each sequence's steps made cheap (default 0.5)")
    f.add_argument("--seed", type=int, default=0, help="seed of the 2-fold split (without --eval)")
    f.add_argument("--json", dest="json_path", help="also write the report to this JSON file")
    r = sub.add_parser("schedule", help="run predicted-damage schedules (fitted on a saved map) against the fixed "
                                        "baseline at matched usage on held-out blocks")
    r.add_argument("--fit", required=True, help="damage map to fit on (from collect; its config is used)")
    r.add_argument("--split", default="dev", help="blocks to evaluate on (default dev)")
    r.add_argument("--blocks", type=int, default=96, help="sequences (default 96)")
    r.add_argument("--batch_size", type=int, default=16, help="sequences per batch (default 16)")
    r.add_argument("--target", type=float, required=True,
                   help="requested usage on the axis the probe action cuts, e.g. 0.7 = keep 70%% of MLP channels")
    r.add_argument("--features", nargs="+", default=["position", "+hidden"], choices=FEATURE_SETS,
                   help="feature sets to schedule with (default: position +hidden)")
    r.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    r.add_argument("--json", dest="json_path", help="also write the results to this JSON file")
    return p.parse_args(argv)


def _atomic_save(obj, path: str, as_json: bool) -> None:
    from utils.io import atomic_write

    if as_json:
        atomic_write(path, lambda fh: json.dump(obj, fh, indent=1))
    else:
        atomic_write(path, lambda fh: torch.save(obj, fh), binary=True)


def _collect(a: argparse.Namespace) -> None:
    from utils.config import default_device, load_config
    from utils.data import load_blocks
    from utils.lm import ControlledLM
    from utils.model import load_lm

    need(a.blocks >= 1 and a.batch_size >= 1, "--blocks and --batch_size must be >= 1")
    need(os.path.isfile(a.config), f"config not found: {a.config}")
    need(os.path.isdir(os.path.dirname(os.path.abspath(a.save))), f"output directory not found: {a.save}")
    cfg = load_config(a.config, a.set)
    model, tok = load_lm(cfg.model_name, cfg.dtype, default_device(cfg))
    lm = ControlledLM.from_config(cfg, model, tok)
    acts = lm.actions
    if a.probe is None:
        probe_idx = cheapest_action(acts)
    else:
        need(a.probe in acts.tags, f"--probe {a.probe!r} is not an action of this grid: {', '.join(acts.tags)}")
        probe_idx = acts.tags.index(a.probe)
    need(probe_idx != acts.dense_idx, "the probe action is the dense action: nothing to measure")
    blocks = torch.as_tensor(load_blocks(cfg, tok, a.split)[: a.blocks].copy())
    with torch.inference_mode():
        data = collect(lm, blocks, cfg.context_len, a.batch_size, probe_idx,
                       rows_per_forward=cfg.rollout_rows_per_forward)
    _atomic_save({**data, "probe_tag": acts.tags[probe_idx], "split": a.split, "config": a.config,
                  "overrides": list(a.set)}, a.save,
                 as_json=False)
    d = data["damage"][:, data["effective"]]
    print(f"{a.split}: {d.shape[0]} sequences x {d.shape[1]} effective steps, probe {acts.tags[probe_idx]}: "
          f"one cheap step costs {float(d.mean()):+.3f} ± {float(d.std()):.3f} nats; saved {a.save}")


def _load_map(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    need(os.path.isfile(path), f"damage map not found: {path}")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # corrupt or foreign file
        raise UsageError(f"cannot read damage map {path}: not a file saved by "
                         "`python -m utils.damage_probe collect`") from None
    need(isinstance(raw, dict), f"{path} is not a damage map saved by `python -m utils.damage_probe collect`")
    meta = {k: raw.pop(k) for k in ("probe_tag", "split", "config", "overrides") if k in raw}
    need(all(k in raw for k in ("damage", "hidden", "embed", "surprisal", "entropy", "effective")),
         f"{path} is not a damage map saved by `python -m utils.damage_probe collect`")
    return raw, meta


def _fit(a: argparse.Namespace) -> None:
    need(0.0 < a.frac < 1.0, f"--frac must be in (0, 1), got {a.frac}")
    data, meta = _load_map(a.fit)
    ev, ev_meta = _load_map(a.eval) if a.eval else (None, {})
    if ev is not None:
        need(meta.get("probe_tag") == ev_meta.get("probe_tag"),
             f"the maps probe different actions: {meta.get('probe_tag')} vs {ev_meta.get('probe_tag')}")
    rep = probe_report(data, a.frac, a.seed, eval_data=ev)
    where = (f"fit on {meta.get('split', '?')} ({data['damage'].shape[0]} seq), scored on {ev_meta.get('split', '?')}"
             if ev is not None else f"2-fold over {meta.get('split', '?')}")
    print(f"probe {meta.get('probe_tag', '?')}: {where}; {rep.n_sequences} sequences x {rep.steps} effective "
          f"steps scored; one cheap step costs {rep.damage_mean:+.3f} nats on average")
    print(f"making {rep.cheap_per_seq} of {rep.steps} steps cheap per sequence (additive approx, nats/seq): "
          f"random {rep.random_cheap_damage:.3f}, oracle {rep.oracle_cheap_damage:.3f}")
    print(f"{'features':<15} {'pearson':>8} {'spearman':>8} {'in-seq rho':>10} {'cheap dmg':>10}  lambda")
    for r in rep.rows:
        print(f"{r.features:<15} {r.pearson:>8.3f} {r.spearman:>8.3f} {r.within_seq_spearman:>10.3f} "
              f"{r.cheap_damage:>10.3f}  {r.lambdas}")
    if a.json_path:
        _atomic_save({"probe": meta.get("probe_tag"), "fit": a.fit, "eval": a.eval, **asdict(rep)}, a.json_path,
                     as_json=True)


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


def _schedule(a: argparse.Namespace) -> None:
    from utils.config import default_device, load_config
    from utils.data import load_blocks
    from utils.lm import ControlledLM
    from utils.model import load_lm

    need(a.blocks >= 1 and a.batch_size >= 1, "--blocks and --batch_size must be >= 1")
    need(a.split != "test", "schedule is for choosing and understanding: evaluate on train or dev, not test")
    data, meta = _load_map(a.fit)
    need(meta.get("config") and os.path.isfile(meta["config"]), f"the config of {a.fit} is not found: {meta.get('config')}")
    cfg = load_config(meta["config"], meta.get("overrides", []))
    model, tok = load_lm(cfg.model_name, cfg.dtype, default_device(cfg))
    lm = ControlledLM.from_config(cfg, model, tok)
    need(meta.get("probe_tag") in lm.actions.tags, f"the map's probe action {meta.get('probe_tag')} is not in the grid")
    blocks = torch.as_tensor(load_blocks(cfg, tok, a.split)[: a.blocks].copy())
    with torch.inference_mode():
        rows = schedule_eval(lm, data, lm.actions.tags.index(meta["probe_tag"]), blocks, cfg.context_len,
                             a.batch_size, a.target, list(a.features), a.seed)
    print(f"fit on {meta.get('split', '?')} ({data['damage'].shape[0]} seq); {a.split}: {rows[0]['n_tokens']} tokens; "
          f"target {a.target:g}; dense PPL {rows[0]['dense_ppl']:.3f}")
    print(f"{'schedule':<24} {'usage':>6} {'PPL':>8} {'fixed PPL':>9} {'dNLL':>8}  95% interval")
    for r in rows:
        print(f"{'predicted[' + r['features'] + ']':<24} {r['usage']:>6.3f} {r['ppl']:>8.3f} {r['fixed_ppl']:>9.3f} "
              f"{r['delta_nll']:>+8.4f}  [{r['delta_nll_lo']:+.4f}, {r['delta_nll_hi']:+.4f}]")
    if a.json_path:
        _atomic_save({"fit": a.fit, "split": a.split, "blocks": a.blocks, "target": a.target, "rows": rows},
                     a.json_path, as_json=True)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)

    run = {"collect": _collect, "fit": _fit, "schedule": _schedule}[a.command]
    try:
        check_output_file("--save", getattr(a, "save", None))  # before the expensive run, not after
        check_output_file("--json", getattr(a, "json_path", None))
        run(a)
    except (SOLError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
