"""The damage probe: ridge regressions of a damage map on nested sets of policy-visible features.

Fitted on one map (train blocks) and scored on another (dev blocks), or 2-fold over the sequences of one
map; the ridge strength is chosen by an inner 2-fold split of the fitting sequences. Feature sets:
`position` (content-blind: a per-position mean), `+scalars` (the input token's surprisal and entropy),
`+hidden` (the LM hidden state), `+hidden+token` (and the token embedding). The report gives held-out
correlations with the damage and the damage of making each sequence's `frac` lowest-predicted steps cheap,
against random steps and the oracle.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from utils.cli import UsageError
from utils.stats import pearson, ranks

FEATURE_SETS = ("position", "+scalars", "+hidden", "+hidden+token")
LAMBDAS = (1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3, 1e4, 1e5)


def design(onehot: torch.Tensor, surprisal: torch.Tensor, entropy: torch.Tensor, hidden: torch.Tensor,
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
    return design(torch.eye(n_eff).expand(S, n_eff, n_eff), data["surprisal"][:, eff], data["entropy"][:, eff],
                   data["hidden"][:, eff], data["embed"][:, eff], kind)


def fit_ridge(X: torch.Tensor, y: torch.Tensor, lam: float, n_pos: int) -> tuple[torch.Tensor, ...]:
    """Ridge on standardised non-position columns (position one-hots unpenalised); returns (w, mu, sd)."""
    mu, sd = X.mean(0), X.std(0).clamp_min(1e-8)
    mu[:n_pos], sd[:n_pos] = 0.0, 1.0
    Z = (X - mu) / sd
    pen = torch.full((X.shape[1],), lam, dtype=X.dtype)
    pen[:n_pos] = 1e-6
    w = torch.linalg.solve(Z.T @ Z + torch.diag(pen), Z.T @ y)
    return w, mu, sd


def predict(X: torch.Tensor, model: tuple[torch.Tensor, ...]) -> torch.Tensor:
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
    return predict(X[test].reshape(-1, X.shape[-1]), m).reshape(len(test), -1), lam


def fit_probe(X: torch.Tensor, d: torch.Tensor, n_pos: int) -> tuple[tuple[torch.Tensor, ...], float]:
    """Ridge fit of damage `d` [S, T_eff] on `X` [S, T_eff, F]; λ by an inner 2-fold split over sequences.
    Returns (model for `predict`, λ)."""
    y = _clip(d, d.flatten())
    idx = torch.arange(X.shape[0])
    a, b = idx[::2], idx[1::2]

    def flat(i):
        return X[i].reshape(-1, X.shape[-1]), y[i].reshape(-1)

    best, best_lam = -math.inf, LAMBDAS[0]
    for lam in LAMBDAS:
        score = 0.0
        for fit_idx, val_idx in ((a, b), (b, a)):
            m = fit_ridge(*flat(fit_idx), lam, n_pos)
            score += pearson(predict(X[val_idx].reshape(-1, X.shape[-1]), m), d[val_idx].reshape(-1))
        if score > best:
            best, best_lam = score, lam
    return fit_ridge(*flat(idx), best_lam, n_pos), best_lam


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
        within = [pearson(ranks(pred[i]), ranks(d[i])) for i in range(S)]
        within = [w for w in within if not math.isnan(w)]
        rows.append(ProbeRow(kind, pearson(pred, d), pearson(ranks(pred.flatten()), ranks(d.flatten())),
                             sum(within) / len(within) if within else float("nan"),
                             float(d.gather(1, pick).sum(1).mean()), lams))
    oracle = float(d.sort(dim=1).values[:, :n].sum(1).mean())
    return ProbeReport(S, T_eff, frac, n, float(d.mean()), float(d.mean(1).mean() * n), oracle, rows)
