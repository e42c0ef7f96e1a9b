"""GRPO objective for SOL: budgets, rewards, returns, penalty, advantages, PPO-clip loss, pooled updates.

Everything except `GRPOUpdater` is pure tensor math with no state. Tensors are time-major `[T, N]`, where
N = B·K and rows b·K … b·K+K−1 are the K rollouts of input b (the reference repository's GRPO).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from utils.cli import SOLError
from utils.records import StepTrace

_STD_FLOOR = 1e-6  # the reference's clamp on population std in z-scoring and whitening


# ---------------------------------------------------------------------------------------------------
# budgets and rewards
# ---------------------------------------------------------------------------------------------------

def sample_budgets(cfg: Any, n: int, generator: torch.Generator) -> Tensor:
    """Draw n per-sequence budgets `[n, 3]` = (tok keep, prune keep, bits/16), shared by each input's K rollouts.

    Per axis, in the reference's precedence: a non-empty `budget_*_list` → uniform choice; else both
    `budget_*_min` and `_max` set → U[min, max]; else the default (`C_target`, `C_target_prune`,
    `C_target_quant_bits / 16`). Only `generator` is consumed, so the draw is reproducible.
    """
    defaults = (
        ("tok", getattr(cfg, "C_target", None), "C_target"),
        ("prune", getattr(cfg, "C_target_prune", None), "C_target_prune"),
        ("q_ratio", None if getattr(cfg, "C_target_quant_bits", None) is None
         else float(cfg.C_target_quant_bits) / 16.0, "C_target_quant_bits"),
    )
    cols = []
    for axis, default, default_name in defaults:
        lst = getattr(cfg, f"budget_{axis}_list", None)
        lo, hi = getattr(cfg, f"budget_{axis}_min", None), getattr(cfg, f"budget_{axis}_max", None)
        if lst:
            vals = torch.tensor([float(v) for v in lst], dtype=torch.float32)
            cols.append(vals[torch.randint(len(vals), (n,), generator=generator)])
        elif lo is not None and hi is not None:
            u = torch.rand(n, generator=generator, dtype=torch.float32)
            cols.append(float(lo) + (float(hi) - float(lo)) * u)
        else:
            if default is None:
                raise ValueError(f"budget axis '{axis}': no budget_{axis}_list/min/max and {default_name} is None")
            cols.append(torch.full((n,), float(default), dtype=torch.float32))
    return torch.stack(cols, dim=1)


def task_reward(logp_true: Tensor, kl_dense: Optional[Tensor], task_w_kl: float) -> Tensor:
    """Per-step task reward r_t = (1−w)·log p_sparse(y_t) − w·KL(p_dense ‖ p_sparse); KL is needed only when w > 0."""
    w = float(task_w_kl)
    if w == 0.0:
        return logp_true.clone()
    if kl_dense is None:
        raise ValueError("task_w_kl > 0 needs the dense KL (kl_dense)")
    return (1.0 - w) * logp_true - w * kl_dense


def aggregate_returns(r: Tensor, reward_agg: Optional[str], gamma: float) -> Tensor:
    """Returns-to-go along T: sum → G_t = r_t + γ·G_{t+1}; max → M_t = max(r_t, γ·M_{t+1}).

    As the reference, aggregation is skipped (r returned unchanged) when `reward_agg` is None or γ ∉ [0, 1)
    (so γ = 1 disables it). The scan runs over time only; all rows are processed together.
    """
    if reward_agg is None or not (0.0 <= float(gamma) < 1.0):
        return r.clone()
    if reward_agg not in ("sum", "max"):
        raise ValueError(f"reward_agg must be None, 'sum' or 'max', got {reward_agg!r}")
    g = float(gamma)
    out = torch.empty_like(r)
    run = r[-1]
    out[-1] = run
    for t in range(r.shape[0] - 2, -1, -1):
        run = r[t] + g * run if reward_agg == "sum" else torch.maximum(r[t], g * run)
        out[t] = run
    return out


def budget_gaps(usage_mean: Tensor, targets: Tensor) -> Tensor:
    """Signed per-axis gaps `[N, 3]` = episode-mean usage − requested budget (positive = over budget)."""
    return usage_mean - targets


def budget_penalty(usage_mean: Tensor, targets: Tensor, alphas: tuple[float, float, float],
                   tolerance: float) -> Tensor:
    """Per-rollout penalty `[N]` = Σ_axis α·max(|gap| − tol, 0)²: a two-sided squared dead zone, as the reference."""
    phi = (budget_gaps(usage_mean, targets).abs() - float(tolerance)).clamp_min(0.0).pow(2)
    a = torch.as_tensor(alphas, dtype=phi.dtype, device=phi.device)
    return (phi * a).sum(dim=-1)


def step_budget_costs(usage: Tensor, targets: Tensor, effective: Tensor, alphas: tuple[float, float, float],
                      tolerance: float, group_size: int) -> Tensor:
    """Per-step budget costs `[T, N]` for `budget_credit: step` (ours, not in the reference).

    The reference charges every step of a rollout its whole-episode penalty, so a step's advantage carries
    the noise of all the other steps' actions. Here each step pays for its own usage at the marginal price
    of the penalty: c_t = Σ_axis λ_axis·(u_t − b), with λ = dP/dū = 2α·max(|ḡ| − tol, 0)·sign(ḡ), ḡ the mean
    gap of the rollout's group (its input's K rollouts), held constant. Summed over the steps this is the
    gradient of T·P, the reference's total charge, so the two options share a scale. Inside the dead
    zone the price is 0 and only the task reward speaks. `usage` `[T, N, 3]`, `targets` `[N, 3]`.
    """
    T, N, _ = usage.shape
    K = int(group_size)
    eff = effective.to(usage.device, usage.dtype)[:, None, None]
    n_eff = eff.sum().clamp_min(1.0)
    gap = (usage * eff).sum(0) / n_eff - targets  # [N, 3]
    g = gap.reshape(N // K, K, 3).mean(dim=1, keepdim=True).expand(N // K, K, 3).reshape(N, 3)
    a = torch.as_tensor(alphas, dtype=usage.dtype, device=usage.device)
    price = 2.0 * a * (g.abs() - float(tolerance)).clamp_min(0.0) * g.sign()  # [N, 3]
    return step_price_costs(usage, targets, effective, price)


def step_price_costs(usage: Tensor, targets: Tensor, effective: Tensor, prices: Tensor) -> Tensor:
    """Per-step costs `[T, N]` = Σ_axis price_axis·(u_t − b) on effective steps (0 elsewhere).

    `usage` `[T, N, 3]`, `targets` and `prices` `[N, 3]` (nats per unit of nominal usage). Subtracted from the
    reward, a step under budget earns price·(b − u_t) and one over budget pays price·(u_t − b)."""
    eff = effective.to(usage.device, usage.dtype)[:, None, None]
    return ((usage - targets[None]) * eff * prices[None]).sum(dim=-1)


def usage_slopes(r: Tensor, usage: Tensor, effective: Tensor, group_size: int) -> Tensor:
    """Counterfactual value of usage per (step, input) and axis, with its sampling variance: `[T, B, 2, 3]`
    (`[..., 0, :]` slopes, `[..., 1, :]` variances), for `budget_credit: price` (ours).

    The K rollouts of an input read the same tokens and differ only in their actions, so at a step where some
    were cheap and some dense, slope = cov_K(r_t, u_t) / var_K(u_t) estimates the log-likelihood one unit of
    usage buys there (on a two-level axis: the damage of the cheap level / the level gap). Its variance is the
    least-squares one, σ̂² / Σ_K (u − ū)² with σ̂² the residual variance on K − 2 degrees of freedom (the
    other steps' actions make it noisy). NaN where the K rollouts used the same level (no contrast), the step is
    not effective or K < 3. `r` `[T, N]`, `usage` `[T, N, 3]`.
    """
    T, N, _ = usage.shape
    K = int(group_size)
    u = usage.reshape(T, N // K, K, 3).double()
    y = r.reshape(T, N // K, K, 1).double()
    du, dy = u - u.mean(2, keepdim=True), y - y.mean(2, keepdim=True)
    sxx, sxy = du.pow(2).sum(2), (du * dy).sum(2)
    slope = sxy / sxx.clamp_min(1e-12)
    resid = (dy - slope[:, :, None] * du).pow(2).sum(2) / max(K - 2, 1)
    var = resid / sxx.clamp_min(1e-12)
    ok = (sxx > 1e-12) & effective.to(sxx.device)[:, None, None] & (K > 2)
    nan = torch.full_like(slope, float("nan"))
    return torch.stack([torch.where(ok, slope, nan), torch.where(ok, var, nan)], dim=2).to(r.dtype)


def slope_shrinks(slopes: Tensor, min_cells: int = 16) -> tuple[Tensor, Tensor, Tensor]:
    """Per axis `[3]`: the pooled slopes' mean, the factor sqrt(1 − mean noise variance / total variance)
    that shrinks them towards it (`budget_prices`), and the number of finite cells; mean and factor are NaN
    where fewer than `min_cells` cells are finite. `slopes` `[M, 2, 3]` as in `budget_prices`."""
    s, v = slopes[:, 0].double().cpu(), slopes[:, 1].double().cpu()
    ok = torch.isfinite(s) & torch.isfinite(v)
    n = ok.sum(0)
    mu = torch.full((3,), float("nan"), dtype=torch.float64)
    shrink = mu.clone()
    for j in range(3):
        sj, vj = s[ok[:, j], j], v[ok[:, j], j]
        if sj.numel() < max(2, int(min_cells)):
            continue
        total = sj.var(unbiased=True)
        mu[j] = sj.mean()
        shrink[j] = (1.0 - vj.mean() / total).clamp(0.0, 1.0).sqrt() if float(total) > 0 else 0.0
    return mu, shrink, n


def budget_prices(slopes: Tensor, targets: Tensor, lo: Tensor, hi: Tensor, min_cells: int = 16) -> Tensor:
    """Per-row price of one unit of usage `[N, 3]`, set so that the budget is what the price can afford.

    Under a reward r_t − λ·(u_t − b) a two-level axis is worth its dense level exactly at the steps whose
    usage slope exceeds λ. The budget b allows the dense level on a share q = (b − lo) / (hi − lo) of the
    steps, so λ(b) is the (1 − q)-quantile of the steps' slopes: a tight budget prices usage at a high
    quantile, a loose one at a low quantile. It is the per-budget Lagrange multiplier of "maximise
    log-likelihood subject to mean usage b", read off the counterfactual rollouts instead of found by dual
    ascent. `slopes` `[M, 2, 3]` pools `usage_slopes` cells (NaN = no estimate). Each cell's slope is the
    true one plus sampling noise, which widens the pooled distribution and would push the prices of loose
    and tight budgets outside the range of the true slopes; so the quantiles are taken of the slopes shrunk
    towards their mean by sqrt(1 − mean noise variance / total variance) (`slope_shrinks`), which restores
    the true slopes' variance. Axes with one level, or fewer than `min_cells` finite cells, get price 0.
    `lo`, `hi` `[3]`: the smallest and largest nominal usage of each axis."""
    out = torch.zeros(targets.shape, dtype=torch.float32)
    mu, shrink, _ = slope_shrinks(slopes, min_cells)
    for j in range(targets.shape[1]):  # 3 axes
        span = float(hi[j]) - float(lo[j])
        if span <= 0 or not bool(torch.isfinite(mu[j])):
            continue
        s, v = slopes[:, 0, j].double().cpu(), slopes[:, 1, j].double().cpu()
        s = s[torch.isfinite(s) & torch.isfinite(v)]
        q_dense = ((targets[:, j].double().cpu() - float(lo[j])) / span).clamp(0.0, 1.0)
        out[:, j] = (mu[j] + shrink[j] * (torch.quantile(s, 1.0 - q_dense) - mu[j])).float()
    return out.to(targets.device)


def axis_levels(nominal: Tensor) -> Tensor:
    """Each axis's levels, ascending, NaN-padded to the longest axis: `[3, L]` from the action grid's nominal
    usage `[A, 3]` (`ActionSpace.nominal_usage`)."""
    cols = [torch.unique(nominal[:, j].float()) for j in range(nominal.shape[1])]
    out = torch.full((len(cols), max(c.numel() for c in cols)), float("nan"))
    for j, c in enumerate(cols):
        out[j, :c.numel()] = c
    return out


def level_gains(r: Tensor, usage: Tensor, effective: Tensor, group_size: int, levels: Tensor) -> Tensor:
    """Counterfactual value of each level per (step, input) and axis, against the axis's top level, with its
    sampling variance: `[T, B, 2, 3, L]` (`[..., 0, :, :]` gains, `[..., 1, :, :]` variances), for
    `budget_credit: price` on axes with more than two levels (ours; `usage_slopes` is the two-level case).

    The K rollouts of an input read the same tokens, so at one step the mean reward of those that used level ℓ
    minus the mean of those that used the top level estimates what stepping down to ℓ costs there (0 at the
    top). Its variance is σ̂²·(1/n_ℓ + 1/n_top), σ̂² the pooled within-level variance on K − (levels used)
    degrees of freedom (the other steps' and axes' actions make it noisy). On a two-level axis the gain is
    −slope × level gap of `usage_slopes`, with the same variance × gap². NaN where ℓ or the top level went
    unused, the step is not effective or no degree of freedom is left. `r` `[T, N]`, `usage` `[T, N, 3]`
    (nominal), `levels` `[3, L]` (`axis_levels`)."""
    T, N, A = usage.shape
    K = int(group_size)
    lv = levels.to(usage.device, torch.float64)
    u = usage.reshape(T, N // K, K, A, 1).double()
    onehot = ((u - lv).abs() < 1e-6).double()  # [T, B, K, 3, L]; NaN padding never matches
    y = r.reshape(T, N // K, K, 1, 1).double()
    n = onehot.sum(2)  # [T, B, 3, L]
    mean = (onehot * y).sum(2) / n.clamp_min(1)
    resid = ((y - (onehot * mean[:, :, None]).sum(-1, keepdim=True)) ** 2).sum(2)[..., 0]  # [T, B, 3]
    dof = K - (n > 0).sum(-1)
    s2 = resid / dof.clamp_min(1)
    top = (lv.isfinite().sum(-1) - 1).clamp_min(0)  # index of each axis's top level [3]
    pick = top.view(1, 1, A, 1).expand(T, N // K, A, 1)
    n_top, mean_top = n.gather(-1, pick), mean.gather(-1, pick)
    gain = mean - mean_top
    var = s2[..., None] * (1.0 / n.clamp_min(1) + 1.0 / n_top.clamp_min(1))
    ok = (n > 0) & (n_top > 0) & (dof > 0)[..., None] & effective.to(n.device)[:, None, None, None]
    nan = torch.full_like(gain, float("nan"))
    return torch.stack([torch.where(ok, gain, nan), torch.where(ok, var, nan)], dim=2).to(r.dtype)


def level_prices(gains: Tensor, targets: Tensor, levels: Tensor, min_cells: int = 16,
                 iters: int = 60) -> tuple[Tensor, Tensor]:
    """Per-row price of one unit of usage `[N, 3]` on axes with more than two levels (0 on the others), and
    each such axis's mean shrink factor `[3]` (NaN elsewhere): `budget_prices` for any number of levels.

    Under a reward r_t − λ·(u_t − b) a step is worth the level ℓ that maximises gain_ℓ − λ·u_ℓ, so a price
    λ makes the pooled cells spend U(λ) = mean over cells of u at that level, which can only fall as λ rises;
    λ(b) is where U crosses b (bisection, `iters` halvings, per row). With two levels this is the quantile
    rule of `budget_prices`; with more, a concave quality per axis makes the middle levels win wherever
    their marginal damage is below the price, which one linear slope per axis cannot say. Gains are shrunk
    towards their pooled mean per level by sqrt(1 − mean noise variance / total variance), as the slopes
    are. `gains` `[M, 2, 3, L]` pools `level_gains` cells (a cell counts on an axis when every level has a
    finite gain); axes with fewer than `min_cells` such cells get price 0."""
    N = targets.shape[0]
    out = torch.zeros(N, targets.shape[1], dtype=torch.float32)
    shrinks = torch.full((targets.shape[1],), float("nan"), dtype=torch.float64)
    g, v = gains[:, 0].double().cpu(), gains[:, 1].double().cpu()  # [M, 3, L]
    b = targets.double().cpu()
    for j in range(targets.shape[1]):
        lv = levels[j][levels[j].isfinite()].double().cpu()
        if lv.numel() < 3:
            continue
        L = lv.numel()
        ok = (g[:, j, :L].isfinite() & v[:, j, :L].isfinite()).all(-1)
        gj, vj = g[ok, j, :L], v[ok, j, :L]
        if gj.shape[0] < max(2, int(min_cells)):
            continue
        mu = gj.mean(0)
        total = gj.var(0, unbiased=True)
        f = torch.where(total > 0, (1.0 - vj.mean(0) / total.clamp_min(1e-300)).clamp(0.0, 1.0).sqrt(),
                        torch.zeros_like(total))
        f[L - 1] = 1.0  # the top level's gain is 0 by construction
        gj = mu + f * (gj - mu)
        shrinks[j] = f[:L - 1].mean()
        # every price at which some cell switches level lies between the extreme pairwise breakpoints
        du = lv[None, :] - lv[:, None]
        brk = (gj[:, None, :] - gj[:, :, None]) / du.masked_fill(du == 0, float("nan"))  # [M, L, L]
        brk = brk[brk.isfinite()]
        lo = (brk.min() if brk.numel() else torch.tensor(0.0, dtype=torch.float64)) - 1.0
        hi = (brk.max() if brk.numel() else torch.tensor(0.0, dtype=torch.float64)) + 1.0
        lo_n, hi_n = lo.expand(N).clone(), hi.expand(N).clone()
        for _ in range(int(iters)):
            lam = 0.5 * (lo_n + hi_n)  # [N]
            choice = (gj[:, None, :] - lam[None, :, None] * lv).argmax(-1)  # [M, N]
            spend = lv[choice].mean(0)
            cheaper = spend < b[:, j]  # too expensive a price: lower it
            hi_n = torch.where(cheaper, lam, hi_n)
            lo_n = torch.where(cheaper, lo_n, lam)
        out[:, j] = (0.5 * (lo_n + hi_n)).float()
    return out.to(targets.device), shrinks


def shaped_rewards(x: Tensor, penalty: Tensor, level: str) -> Tensor:
    """Subtract the penalty: a per-rollout `[N]` one at every step, or per-step costs `[T, N]` as they are.

    process: R_t = x_t − penalty. outcome: X = Σ_t (x_t − penalty) per rollout, broadcast over t. The
    reference's outcome score is Σ_t R_t where x_t = G_0 at every t when aggregation is on (so X = T·(G_0 −
    penalty)) and x_t = r_t when it is off; `grpo_advantages` builds that x for you.
    """
    R = x - (penalty.unsqueeze(0) if penalty.dim() == 1 else penalty)
    if level == "process":
        return R
    if level == "outcome":
        return R.sum(dim=0, keepdim=True).expand_as(R).contiguous()
    raise ValueError(f"grpo_level must be 'process' or 'outcome', got {level!r}")


def _normalise_groups(x: Tensor, norm: str) -> Tensor:
    """Centre (or z-score) along the last dim, which holds one group of K rollouts."""
    mu = x.mean(dim=-1, keepdim=True)
    if norm == "center":
        return x - mu
    if norm == "zscore":
        return (x - mu) / x.std(dim=-1, unbiased=False, keepdim=True).clamp_min(_STD_FLOOR)
    raise ValueError(f"grpo_norm must be 'center' or 'zscore', got {norm!r}")


def group_advantages(R: Tensor, group_size: int, level: str, norm: str) -> Tensor:
    """Group-relative advantages `[T, N]` (critic-free baseline = the mean of the input's K rollouts).

    process: normalise per (t, input) across its K rows. outcome: normalise the per-rollout score across K
    and broadcast over t. The score is the mean over t of R, which equals X for the broadcast output of
    `shaped_rewards` (the reference sums instead; for non-broadcast R that only rescales by T).
    """
    T, N = R.shape
    K = int(group_size)
    if K < 1 or N % K:
        raise ValueError(f"N={N} rows is not a multiple of group_size={K}")
    if level == "process":
        return _normalise_groups(R.reshape(T, N // K, K), norm).reshape(T, N)
    if level == "outcome":
        score = _normalise_groups(R.mean(dim=0).reshape(N // K, K), norm).reshape(1, N)
        return score.expand(T, N).contiguous()
    raise ValueError(f"grpo_level must be 'process' or 'outcome', got {level!r}")


def whiten(A: Tensor) -> Tensor:
    """Global whitening (A − mean)/max(std_pop, 1e-6) over the whole tensor (one rollout batch)."""
    return (A - A.mean()) / A.std(unbiased=False).clamp_min(_STD_FLOOR)


def grpo_advantages(r_task: Tensor, penalty: Tensor, cfg: Any, group_size: int) -> Tensor:
    """Reference pipeline, reward → advantage: returns, outcome x = G_0, penalty, group norm, optional whitening.

    `penalty` is the per-rollout episode penalty `[N]` (the reference) or per-step costs `[T, N]`
    (`step_budget_costs`); either is subtracted after the return aggregation, never discounted."""
    x = aggregate_returns(r_task, cfg.reward_agg, cfg.reward_gamma)
    aggregated = cfg.reward_agg is not None and 0.0 <= float(cfg.reward_gamma) < 1.0
    if cfg.grpo_level == "outcome" and aggregated:
        x = x[:1].expand_as(x)
    R = shaped_rewards(x, penalty, cfg.grpo_level)
    A = group_advantages(R, group_size, cfg.grpo_level, cfg.grpo_norm)
    return whiten(A) if cfg.adv_whiten_global else A


# ---------------------------------------------------------------------------------------------------
# loss
# ---------------------------------------------------------------------------------------------------

def ppo_loss(logits_new: Tensor, actions: Tensor, logp_old: Tensor, adv: Tensor, clip: float,
             entropy_coef: float, ref_logits: Optional[Tensor] = None,
             kl_ref_coef: float = 0.0) -> tuple[Tensor, dict]:
    """PPO-clip surrogate − entropy bonus (+ KL(π_new ‖ π_ref)), each a mean over all (t, rollout) entries.

    `logits_new` `[T, M, A]` are already temperature-scaled by the policy. Returns the loss and float stats
    (computed outside the graph): loss, policy_loss, entropy, approx_kl = mean(logp_old − logp_new),
    clip_frac = fraction with |ratio − 1| > ε, kl_ref.
    """
    logp_all = F.log_softmax(logits_new.float(), dim=-1)
    logp_new = logp_all.gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)
    ratio = torch.exp(logp_new - logp_old)
    surr = torch.minimum(ratio * adv, ratio.clamp(1.0 - clip, 1.0 + clip) * adv)
    policy_loss = -surr.mean()
    p_all = logp_all.exp()
    entropy = -(p_all * logp_all).sum(dim=-1).mean()
    loss = policy_loss - float(entropy_coef) * entropy
    kl_ref = torch.zeros((), dtype=loss.dtype, device=loss.device)
    if ref_logits is not None and kl_ref_coef > 0.0:
        logq = F.log_softmax(ref_logits.detach().float(), dim=-1)
        kl_ref = (p_all * (logp_all - logq)).sum(dim=-1).mean()
        loss = loss + float(kl_ref_coef) * kl_ref
    with torch.no_grad():
        stats = {
            "loss": loss.item(),
            "policy_loss": policy_loss.item(),
            "entropy": entropy.item(),
            "approx_kl": (logp_old - logp_new).mean().item(),
            "clip_frac": ((ratio - 1.0).abs() > clip).float().mean().item(),
            "kl_ref": kl_ref.item(),
        }
    return loss, stats


# ---------------------------------------------------------------------------------------------------
# pooled update cycles
# ---------------------------------------------------------------------------------------------------

@dataclass
class RolloutBatch:
    """One rollout batch (B inputs × K rollouts), time-major, all detached."""
    h: Tensor             # [T, N, h_dim] LM hidden fed to the policy at each step
    e: Tensor             # [T, N, e_dim] embedding of the token about to be processed
    scalars: Tensor       # [T, N, StepScalars.DIM]
    prev_actions: Tensor  # [T, N] long
    actions: Tensor       # [T, N] long
    logp_old: Tensor      # [T, N]
    adv: Tensor           # [T, N]


    @classmethod
    def from_trace(cls, trace: StepTrace, adv: Tensor) -> "RolloutBatch":
        """A sampled policy's trace (`PolicyScheduler.trace()`, with its log-probabilities) and its advantages."""
        if trace.logp_old is None:
            raise ValueError("a rollout batch needs the sampling policy's log-probabilities (record them)")
        return cls(trace.h, trace.e, trace.scalars, trace.prev_actions, trace.actions, trace.logp_old, adv)


_FIELDS = ("h", "e", "scalars", "prev_actions", "actions", "logp_old", "adv")


class TrainingDivergedError(SOLError, RuntimeError):
    """The loss or the gradient went non-finite: training stops before the bad step reaches the weights."""
_STAT_KEYS = ("loss", "policy_loss", "entropy", "approx_kl", "clip_frac", "kl_ref")


class GRPOUpdater:
    """Pools rollout batches and runs PPO/GRPO update cycles with gradient accumulation, as the reference.

    A cycle starts when the pooled (t, rollout) entries reach `ppo_target_batch_size`: the pool is
    concatenated along N, split into minibatches of max(1, ppo_minibatch_size // T) whole rollouts in a
    random order, and passed over `ppo_epochs` times (reshuffled each pass; the reference ignores
    ppo_epochs and does one pass). Every `grad_accum_steps` backward calls give one optimizer step; the
    accumulation counter carries across cycles, as in the reference.

    `grad_sync`, if given, is called with the parameter list before clipping at each optimizer step (for
    example to all-reduce gradients of a policy that is not DDP-wrapped); `after_step`, if given, after
    each optimizer step that passed the finiteness checks (e.g. to update a weight average). Under DDP every
    rank must make the same number of backward calls, which holds when all ranks pool equally sized batches.
    """

    def __init__(self, policy: nn.Module, optimizer: torch.optim.Optimizer, cfg: Any,
                 ref_policy: Optional[nn.Module] = None,
                 grad_sync: Optional[Callable[[list], None]] = None,
                 after_step: Optional[Callable[[], None]] = None) -> None:
        self.policy, self.optimizer, self.cfg, self.grad_sync = policy, optimizer, cfg, grad_sync
        self.after_step = after_step
        self.kl_ref_coef = float(getattr(cfg, "kl_pi_ref_coef", 0.0) or 0.0)
        if self.kl_ref_coef > 0.0 and ref_policy is None:
            ref_policy = copy.deepcopy(getattr(policy, "module", policy))  # π_ref = the policy at start
        self.ref_policy = ref_policy if self.kl_ref_coef > 0.0 else None
        if self.ref_policy is not None:
            self.ref_policy.requires_grad_(False)
        self.grad_accum = max(1, int(cfg.grad_accum_steps))
        self.generator = torch.Generator().manual_seed(int(getattr(cfg, "seed", 0)))
        self.num_updates = 0
        self.accum_i = 0
        self._pool: list[RolloutBatch] = []
        self._pool_size = 0
        self._acc_stats: dict[str, float] = {}  # stat sums over the minibatches of the pending step
        self._acc_n = 0

    @property
    def pool_size(self) -> int:
        """Pooled (t, rollout) entries waiting for the next update cycle."""
        return self._pool_size

    def _params(self) -> list[nn.Parameter]:
        return [p for p in self.policy.parameters() if p.requires_grad]

    def add(self, batch: RolloutBatch) -> list[dict]:
        """Pool one batch; run an update cycle when the pool is full. Returns one stats dict per optimizer step."""
        T, N = batch.actions.shape
        if self._pool and self._pool[0].actions.shape[0] != T:
            raise ValueError(f"rollout length changed from {self._pool[0].actions.shape[0]} to {T} within a pool")
        self._pool.append(RolloutBatch(**{f: getattr(batch, f).detach() for f in _FIELDS}))
        self._pool_size += T * N
        if self._pool_size < int(self.cfg.ppo_target_batch_size):
            return []
        pooled = RolloutBatch(**{f: torch.cat([getattr(b, f) for b in self._pool], dim=1) for f in _FIELDS})
        self._pool, self._pool_size = [], 0
        return self._update_cycle(pooled)

    def _update_cycle(self, data: RolloutBatch) -> list[dict]:
        T, n_rows = data.actions.shape
        mb = max(1, int(self.cfg.ppo_minibatch_size) // T)
        temp = float(self.cfg.pi_temperature)
        if self.accum_i % self.grad_accum == 0:
            self.optimizer.zero_grad(set_to_none=True)
        out: list[dict] = []
        for _ in range(max(1, int(self.cfg.ppo_epochs))):
            perm = torch.randperm(n_rows, generator=self.generator).to(data.actions.device)
            for idx in perm.split(mb):
                sel = {f: getattr(data, f).index_select(1, idx) for f in _FIELDS}
                logits = self.policy(sel["h"], sel["e"], sel["scalars"], sel["prev_actions"], temperature=temp)
                ref_logits = None
                if self.ref_policy is not None:
                    with torch.no_grad():
                        ref_logits = self.ref_policy(sel["h"], sel["e"], sel["scalars"], sel["prev_actions"],
                                                     temperature=temp)
                loss, stats = ppo_loss(logits, sel["actions"], sel["logp_old"], sel["adv"],
                                       float(self.cfg.ppo_clip), float(self.cfg.entropy_coef),
                                       ref_logits, self.kl_ref_coef)
                if not math.isfinite(stats["loss"]):
                    self.optimizer.zero_grad(set_to_none=True)
                    raise TrainingDivergedError(f"update {self.num_updates + 1}: the loss is {stats['loss']}; "
                                                "training stopped before it reached the weights")
                (loss / self.grad_accum).backward()
                for k in _STAT_KEYS:
                    self._acc_stats[k] = self._acc_stats.get(k, 0.0) + stats[k]
                self._acc_n += 1
                self.accum_i += 1
                if self.accum_i % self.grad_accum == 0:
                    out.append(self._step(sel))
        return out

    def _step(self, probe: Optional[dict] = None) -> dict:
        """Sync, clip, step, zero the gradient; return the pending minibatches' mean stats.

        Raises TrainingDivergedError, before the update is counted (so it is never checkpointed), when the
        gradient norm is not finite or the stepped policy's logits on `probe` (the last minibatch) are not."""
        params = self._params()
        if self.grad_sync is not None:
            self.grad_sync(params)
        max_norm = self.cfg.max_grad_norm
        max_norm = float(max_norm) if max_norm is not None and max_norm > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        if not math.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingDivergedError(f"update {self.num_updates + 1}: the gradient norm is {grad_norm}; "
                                        "training stopped before it reached the weights")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if probe is not None:
            was_training = self.policy.training
            self.policy.eval()  # no dropout draw: the check must not move the RNG
            with torch.no_grad():
                logits = self.policy(probe["h"], probe["e"], probe["scalars"], probe["prev_actions"],
                                     temperature=float(self.cfg.pi_temperature))
            self.policy.train(was_training)
            if not bool(torch.isfinite(logits).all()):
                raise TrainingDivergedError(f"update {self.num_updates + 1}: the stepped policy's logits are not "
                                            f"finite (lr {self.optimizer.param_groups[0]['lr']:g}); training "
                                            "stopped before the update was counted")
        if self.after_step is not None:
            self.after_step()
        self.num_updates += 1
        n = max(1, self._acc_n)
        stats = {k: v / n for k, v in self._acc_stats.items()}
        stats.update(grad_norm=grad_norm, update=self.num_updates, minibatches=self._acc_n,
                     lr=float(self.optimizer.param_groups[0]["lr"]))
        self._acc_stats, self._acc_n = {}, 0
        return stats

    def flush(self) -> list[dict]:
        """End of training: one more step on any pending accumulated gradient (as the reference).

        A partially filled pool (< ppo_target_batch_size entries) is dropped, as in the reference.
        """
        self._pool, self._pool_size = [], 0
        if self.accum_i % self.grad_accum == 0:
            return []
        self.accum_i = 0
        return [self._step()]

    def state_dict(self) -> dict:
        """Counters, shuffle RNG, pooled rollouts and any pending accumulated gradient (so a resume is exact)."""
        pending = self.accum_i % self.grad_accum != 0
        return {
            "num_updates": self.num_updates,
            "accum_i": self.accum_i,
            "generator": self.generator.get_state(),
            "pool": [{f: getattr(b, f) for f in _FIELDS} for b in self._pool],
            "pool_size": self._pool_size,
            "acc_stats": dict(self._acc_stats),
            "acc_n": self._acc_n,
            "pending_grads": [None if p.grad is None else p.grad.detach().clone() for p in self._params()]
            if pending else None,
            "ref_policy": None if self.ref_policy is None else self.ref_policy.state_dict(),
        }

    def load_state_dict(self, d: dict) -> None:
        """Restore what `state_dict` saved (tensors keep the device they were loaded on)."""
        self.num_updates = int(d["num_updates"])
        self.accum_i = int(d["accum_i"])
        self.generator.set_state(d["generator"])
        self._pool = [RolloutBatch(**b) for b in d["pool"]]
        self._pool_size = int(d["pool_size"])
        self._acc_stats, self._acc_n = dict(d.get("acc_stats", {})), int(d.get("acc_n", 0))
        if d.get("pending_grads") is not None:
            for p, g in zip(self._params(), d["pending_grads"]):
                p.grad = None if g is None else g.to(p.device, p.dtype).clone()
        if d.get("ref_policy") is not None and self.ref_policy is not None:
            self.ref_policy.load_state_dict(d["ref_policy"])
