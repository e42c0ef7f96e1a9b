"""Placement diagnostic: does the policy spend its budget on the tokens where a cheap step hurts most?

    python -m utils.placement --ckpt_dir results/ckpt_prune --split dev --tgt_prune_keep 0.6

For every decode step s of every block, the counterfactual damage of ONE cheap step: the episode runs dense
except at step s, which takes the probe action (default: the grid's cheapest action). `damage_local[s, b]`
is the NLL increase of token s alone; `damage[s, b]` sums the increase over steps s..T-1, since the cheap
step's KV entries also reach later tokens. That costs T extra episodes per batch (same engine, same prefill).

Then the policy (argmax, as in evaluation) decodes the same blocks at the requested targets, and we report:

* the correlation between the policy's expected spend at each step (E_π[net usage], from its full action
  distribution) and the damage there: > 0 means it keeps dense where cheapness would hurt, i.e. its schedule
  depends on the content; a content-blind schedule has no reason to correlate;
* under the additive approximation (the damages of several cheap steps add up), the damage of the cheap
  steps the policy chose, against the expectation for random steps with the same count per sequence and
  against the oracle that picks each sequence's least harmful steps. The approximation is exact for one
  cheap step and only indicative for many; it is the right yardstick for a two-level, single-axis grid
  (`cpu_smollm2_prune.yml`), where every cheap step is the probe action;
* the schedule's shape: the policy's cheap fraction at each step position and its spread over sequences,
  beside the mean damage at each position. A schedule set by position alone (the same steps cheap in every
  sequence, spread 0) is content-blind however well it does.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass

import torch

from utils.cli import (OneLineErrorParser, SOLError, add_checkpoint_flags, add_target_flags, check_mode,
                       check_output_file, check_targets, checkpoint_overrides, need)
from utils.engine import Prefill, Scheduler, StepObs, prefill_blocks, run_episode
from utils.stats import pearson, spearman


class ProbeScheduler(Scheduler):
    """Dense everywhere except one decode step per row: row r takes `probe_idx` at step `step[r]` (an int
    probes the same step in every row)."""

    name = "probe"
    uses_lm_scalars = False

    def __init__(self, step: int | torch.Tensor, probe_idx: int) -> None:
        self.step, self.probe_idx = torch.as_tensor(step), int(probe_idx)

    def start(self, lm, budgets: torch.Tensor, group_size: int) -> None:
        super().start(lm, budgets, group_size)
        self._step = self.step.to(budgets.device)  # once per episode, not per decode step

    def choose(self, obs: StepObs) -> torch.Tensor:
        a = torch.full_like(obs.input_ids, self.lm.actions.dense_idx)
        return a.masked_fill_(self._step == obs.t, self.probe_idx)


def single_step_damage(lm, prefill: Prefill, probe_idx: int, rows_per_forward: int = 0
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(damage_local, damage) `[T, B]` of taking `probe_idx` at one step s (rows s), dense elsewhere.

    The T probed episodes of each block are decoded side by side, as many steps per forward as
    `rows_per_forward` rows allow (at least one step: B rows)."""
    T, B = prefill.labels.shape
    dense_nll = -prefill.dense_logp.double()
    per = max(1, min(T, rows_per_forward // B))
    local = torch.empty(T, B, dtype=torch.float64, device=dense_nll.device)
    total = torch.empty_like(local)
    for s0 in range(0, T, per):
        S = min(per, T - s0)
        steps = torch.arange(s0, s0 + S).repeat(B)  # row b·S + j probes step s0 + j
        ep = run_episode(lm, None, ProbeScheduler(steps, probe_idx), torch.ones(B, 3), prefill.context_len, S,
                         prefill=prefill)
        d = (ep.nll.double() - dense_nll.repeat_interleave(S, dim=1)).view(T, B, S)
        for j in range(S):
            s = s0 + j
            local[s], total[s] = d[s, :, j], d[s:, :, j].sum(0)
    return local, total


def cheapest_action(actions) -> int:
    """Index of the grid's cheapest action by net usage (κ + ρ/P_MAX + bits/16): the default probe."""
    return int((actions.keep + actions.prune / actions.prune_max + actions.bits.float() / 16.0).argmin())


def probe_action(actions, tag: str | None) -> int:
    """Index of the `--probe` action `tag` (None: the cheapest); one-line errors for a tag not in the grid
    or the dense action, which has nothing to measure."""
    if tag is None:
        idx = cheapest_action(actions)
    else:
        need(tag in actions.tags, f"--probe {tag!r} is not an action of this grid: {', '.join(actions.tags)}")
        idx = actions.tags.index(tag)
    need(idx != actions.dense_idx, "the probe action is the dense action: nothing to measure")
    return idx


@dataclass
class PlacementReport:
    n_sequences: int
    steps: int
    probe: str
    damage_mean: float  # nats, one cheap step, summed over the tokens it reaches
    damage_std: float
    damage_local_share: float  # mean local damage / mean total damage
    policy_cheap_frac: float  # fraction of effective row-steps the policy made cheaper than dense
    corr_spend_damage: float  # Pearson, policy expected spend vs damage
    spearman_spend_damage: float
    policy_cheap_damage: float  # additive approx, nats per sequence, on the policy's cheap steps
    random_cheap_damage: float  # expectation for the same number of random steps per sequence
    oracle_cheap_damage: float  # the same number of least harmful steps per sequence
    policy_cheap_frac_row_std: float  # std over sequences of each one's cheap fraction (0: same count everywhere)
    policy_cheap_by_step: list[float]  # fraction of sequences made cheap at each effective step
    damage_by_step: list[float]  # mean damage of one cheap step at each effective step


@torch.no_grad()
def placement_report(lm, policy, blocks: torch.Tensor, context_len: int, targets: tuple[float, float, float],
                     batch_size: int, probe_idx: int, rows_per_forward: int = 0) -> PlacementReport:
    """Damage map and policy schedule on `blocks` `[S, C+T+1]` (all batches), then the summary above."""
    from utils.schedulers import PolicyScheduler

    acts = lm.actions
    net = ((acts.keep + acts.prune / acts.prune_max + acts.bits.float() / 16.0) / 3.0).double()
    dmg, loc, spend, cheap = [], [], [], []
    for i in range(0, blocks.shape[0], batch_size):
        pf = prefill_blocks(lm, blocks[i: i + batch_size], context_len)
        d_loc, d = single_step_damage(lm, pf, probe_idx, rows_per_forward)
        sched = PolicyScheduler(policy, greedy=True, record=True)
        B = d.shape[1]
        ep = run_episode(lm, None, sched, torch.tensor(targets).expand(B, 3), context_len, prefill=pf)
        probs = torch.softmax(policy(*sched.trace().policy_inputs()).double(), dim=-1)
        eff = ep.effective.to(torch.bool).cpu()
        dmg.append(d[eff].cpu())
        loc.append(d_loc[eff].cpu())
        spend.append((probs.cpu() @ net)[eff])
        cheap.append(net[ep.actions.cpu()][eff] < net[acts.dense_idx])
    d, d_loc, s, c = (torch.cat(x, dim=1) for x in (dmg, loc, spend, cheap))  # [T_eff, S]
    n_cheap = c.sum(0)  # per sequence
    srt = d.sort(dim=0).values
    oracle = torch.stack([srt[: int(n), j].sum() for j, n in enumerate(n_cheap.tolist())])
    return PlacementReport(
        n_sequences=int(d.shape[1]), steps=int(d.shape[0]), probe=acts.tags[probe_idx],
        damage_mean=float(d.mean()), damage_std=float(d.std()),
        damage_local_share=float(d_loc.mean() / d.mean()) if float(d.mean()) != 0 else float("nan"),
        policy_cheap_frac=float(c.double().mean()),
        corr_spend_damage=pearson(s, d), spearman_spend_damage=spearman(s, d),
        policy_cheap_damage=float((d * c).sum(0).mean()),
        random_cheap_damage=float((d.mean(0) * n_cheap).mean()),
        oracle_cheap_damage=float(oracle.mean()),
        policy_cheap_frac_row_std=float(c.double().mean(0).std()) if c.shape[1] > 1 else 0.0,
        policy_cheap_by_step=[round(float(x), 4) for x in c.double().mean(1)],
        damage_by_step=[round(float(x), 4) for x in d.mean(1)],
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = OneLineErrorParser(prog="python -m utils.placement", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_flags(p)
    p.add_argument("--split", default="dev", help="blocks to probe (default dev: this is for choosing, not reporting)")
    p.add_argument("--blocks", type=int, default=32, help="sequences to probe (default 32; cost: T+1 episodes each)")
    p.add_argument("--batch_size", type=int, default=16, help="sequences per batch (default 16)")
    add_target_flags(p)
    p.add_argument("--probe", help="action tag of the cheap step (default: the grid's cheapest action)")
    p.add_argument("--json", dest="json_path", help="also write the report to this JSON file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    from utils.config import eval_targets
    from utils.data import load_blocks
    from utils.checkpoint import load_policy_eval

    try:
        need(os.path.isdir(a.ckpt_dir), f"checkpoint directory not found: {a.ckpt_dir}")
        need(a.blocks >= 1 and a.batch_size >= 1, "--blocks and --batch_size must be >= 1")
        check_mode(a.mode)
        check_targets(a.tgt_keep, a.tgt_prune_keep, a.tgt_quant_bits)
        check_output_file("--json", a.json_path)
        cfg, lm, policy = load_policy_eval(a.ckpt_dir, a.mode, checkpoint_overrides(a), trust=a.trust_checkpoint)
        probe_idx = probe_action(lm.actions, a.probe)
        keep, prune, bits = eval_targets(cfg, a.tgt_keep, a.tgt_prune_keep, a.tgt_quant_bits)
        targets = (keep, prune, bits / 16.0)
        blocks = torch.as_tensor(load_blocks(cfg, lm.tokenizer, a.split)[: a.blocks].copy())
        with torch.inference_mode():
            rep = placement_report(lm, policy, blocks, cfg.context_len, targets, a.batch_size, probe_idx,
                                   cfg.rollout_rows_per_forward)
    except (SOLError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"probe {rep.probe}: one cheap step costs {rep.damage_mean:+.3f} ± {rep.damage_std:.3f} nats "
          f"({rep.damage_local_share:.0%} of it on its own token); {rep.n_sequences} sequences x {rep.steps} steps")
    print(f"policy: cheap on {rep.policy_cheap_frac:.1%} of steps; corr(expected spend, damage) "
          f"Pearson {rep.corr_spend_damage:+.3f}, Spearman {rep.spearman_spend_damage:+.3f}")
    print(f"damage of the cheap steps per sequence (additive approx): policy {rep.policy_cheap_damage:.3f}, "
          f"random {rep.random_cheap_damage:.3f}, oracle {rep.oracle_cheap_damage:.3f} nats")
    print(f"schedule: std over sequences of the cheap fraction {rep.policy_cheap_frac_row_std:.3f}; by step:")
    print("  step        " + " ".join(f"{t:5d}" for t in range(rep.steps)))
    print("  policy cheap" + " ".join(f"{x:5.2f}" for x in rep.policy_cheap_by_step))
    print("  damage      " + " ".join(f"{x:5.2f}" for x in rep.damage_by_step))
    if a.json_path:
        from utils.io import atomic_write

        atomic_write(a.json_path, lambda fh: json.dump({"ckpt_dir": a.ckpt_dir, "mode": a.mode, "split": a.split,
                                                        "targets": targets, **asdict(rep)}, fh, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
