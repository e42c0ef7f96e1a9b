"""Knob calibration: fit, on the train split, the logit offset per requested budget that makes a trained
policy's own realised usage equal the request.

    python -m utils.knob_calibration --ckpt_dir RUN --budget_feedback_gain 5     # -> RUN/knob_calibration.json
    python eval_perplexity.py --ckpt_dir RUN ...       # uses it (and its gain) by default; --knob_calibration none: not
    python -m utils.knob_calibration --ckpt_dir results/prune_price/ckpt_seed1234 --budget_feedback_gain 5 \\
        --dtype float32 --out results/prune_price_knob/knob_g5_seed1234.json      # elsewhere: name it explicitly
    python eval_perplexity.py --ckpt_dir results/prune_price/ckpt_seed1234 --knob_calibration \\
        results/prune_price_knob/knob_g5_seed1234.json ...

Without --budget_feedback_gain the table is fitted at the checkpoint config's `knob_calibration_gain` (5 by
default). Training writes the table itself when the config sets `knob_calibration_blocks`. A table holds the
SHA-1 of the weights it was fitted for; the loader leaves a table beside other weights out.

Why: a GRPO policy learns where to spend (its placement) better than it learns the budget knob, and the
integral feedback that holds the budget by construction (`SOLPolicy.budget_feedback`) overrides the
placement when its gain is high enough to hold a badly calibrated knob (docs/grpo_recipe.md). The offset
table (`SOLPolicy.set_knob_table`) moves the network's dense-vs-cheap threshold by a constant per request,
which keeps its ranking of the steps, so a weak feedback is left only the drift between texts to correct.
The same trick as the damage-probe clone's in-episode budget map (`utils.probe_scheduler`), done in the
policy's own greedy episodes, with the feedback gain it will be evaluated with.

The fit: one grid of requested budgets per axis (`--points` evenly spaced inside the axis's range, the axes
stepped together), every train block decoded once per grid point (one point per row, one shared dense
prefill), and one bisection per (point, axis) on the offset: a larger offset can only make that axis
cheaper. `--iters` bisections over [-max_offset, max_offset] plus a last pass that measures the result.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Mapping, Sequence

import torch

from utils.cli import (OneLineErrorParser, SOLError, UsageError, add_checkpoint_flags, check_mode,
                       check_output_file, checkpoint_overrides, need)
from utils.engine import prefill_blocks, run_episode

FORMAT = "sol-knob-calibration-v1"
TABLE_FILE = "knob_calibration.json"  # in a run or export directory: what the evaluators pick up by default


def weights_fingerprint(state_dict: Mapping[str, torch.Tensor]) -> str:
    """SHA-1 of a policy state dict (names and float32 values): ties a table to the weights it was fitted
    for, whatever directory, update number or export they are read from."""
    import hashlib

    h = hashlib.sha1()
    for name, t in sorted((k, v) for k, v in state_dict.items() if torch.is_tensor(v)):
        h.update(name.encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def calibrated_axes(actions) -> list[int]:
    """The usage axes (0 κ, 1 ρ, 2 bits) on which the action grid offers more than one level."""
    u = actions.nominal_usage()
    return [j for j in range(3) if float(u[:, j].max() - u[:, j].min()) > 1e-9]


def budget_grid(actions, points: int) -> torch.Tensor:
    """[points, 3] requested budgets: on each varying axis, `points` values evenly inside (min, max) usage,
    the ends excluded (all-cheap and all-dense need no calibration); 1.0 (dense) on the others."""
    u = actions.nominal_usage()
    frac = torch.arange(1, points + 1, dtype=torch.float32) / (points + 1)
    grid = torch.ones(points, 3)
    for j in calibrated_axes(actions):
        lo, hi = float(u[:, j].min()), float(u[:, j].max())
        grid[:, j] = lo + frac * (hi - lo)
    return grid


def offset_bounds(actions, max_offset: float = 12.0, gap_logits: float = 6.0) -> torch.Tensor:
    """[3] the bisection's range ± per axis, in logits per unit of usage: at least `max_offset`, widened to
    `gap_logits` logits between the axis's two closest levels. An offset c moves a level's logit by c × its
    usage, so on the bits axis (5 / 7 / 16 bits: levels 0.125 apart) ±12 moves q5 against q7 by only 1.5
    logits, less than a bounded network's own preference can be (results/joint_axis_lr3e4: its tightest bit
    request saturated at +12 and realised 0.434 for 0.381)."""
    u = actions.nominal_usage()
    bounds = torch.full((3,), float(max_offset))
    for j in calibrated_axes(actions):
        levels = torch.unique(u[:, j])
        gap = float((levels[1:] - levels[:-1]).min())
        bounds[j] = max(float(max_offset), gap_logits / gap)
    return bounds


def table_grid(grid: torch.Tensor) -> torch.Tensor:
    """The grid as `set_knob_table` needs it: columns that do not vary are replaced by 0..1 (their offsets
    are zero, so the values do not matter, only that they increase)."""
    out = grid.clone()
    for j in range(3):
        if not bool((out[1:, j] > out[:-1, j]).all()):
            out[:, j] = torch.linspace(0.0, 1.0, out.shape[0])
    return out


def fit_knob_offsets(lm, policy, blocks: torch.Tensor, context_len: int, grid: torch.Tensor,
                     axes: Sequence[int], iters: int = 10, max_offset: float | Sequence[float] = 12.0,
                     batch_size: int = 16, progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Bisect, per grid point and axis, the offset at which the policy's greedy mean usage over `blocks`
    equals the requested budget, inside ±`max_offset` (one value, or one per axis: `offset_bounds`). Returns
    (offsets [m, 3], realised usage at them [m, 3]); offsets are 0 on the axes not in `axes`. Leaves the
    fitted table installed on `policy`."""
    from tqdm import tqdm

    from utils.schedulers import PolicyScheduler

    m = grid.shape[0]
    mask = torch.zeros(3, dtype=torch.bool)
    mask[list(axes)] = True
    bound = torch.as_tensor(max_offset, dtype=torch.float32).expand(3)
    lo, hi = -bound.expand(m, 3).clone(), bound.expand(m, 3).clone()
    tgrid = table_grid(grid)
    with torch.inference_mode():
        prefills = [prefill_blocks(lm, blocks[i: i + batch_size], context_len)
                    for i in tqdm(range(0, len(blocks), batch_size), desc="prefill", disable=not progress)]
    realised = torch.zeros(m, 3)
    for it in tqdm(range(iters + 1), desc="knob bisection", disable=not progress):
        mid = torch.where(mask, (lo + hi) / 2, torch.zeros(()))
        policy.set_knob_table(tgrid, mid)
        total, n = torch.zeros(m, 3, dtype=torch.float64), 0
        for pf in prefills:
            b = pf.blocks.shape[0]
            sched = PolicyScheduler(policy, greedy=True, actions=lm.actions)
            with torch.inference_mode():
                ep = run_episode(lm, None, sched, grid.repeat(b, 1), context_len, group_size=m, prefill=pf)
            total += ep.usage_means().double().cpu().view(b, m, 3).sum(0)
            n += b
        realised = (total / n).float()
        if it < iters:  # larger offset -> cheaper: overspent -> raise the lower end
            over = realised > grid
            lo, hi = torch.where(over, mid, lo), torch.where(over, hi, mid)
    return mid, realised


def calibrate_policy(lm, policy, blocks: torch.Tensor, context_len: int, gain: float, points: int = 9,
                     iters: int = 10, max_offset: float = 12.0, gap_logits: float = 6.0, batch_size: int = 16,
                     progress: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """Set the policy's feedback gain to `gain` and fit its table on `blocks` (`fit_knob_offsets` over
    `budget_grid`, within `offset_bounds`): (grid, offsets, realised, calibrated axes). The table is left
    installed."""
    axes = calibrated_axes(lm.actions)
    need(len(axes) >= 1, "the action grid has a single level on every axis: nothing to calibrate")
    policy.budget_feedback_gain = float(gain)
    grid = budget_grid(lm.actions, points)
    offsets, realised = fit_knob_offsets(lm, policy, blocks, context_len, grid, axes, iters,
                                         offset_bounds(lm.actions, max_offset, gap_logits), batch_size, progress)
    return grid, offsets, realised, axes


def write_calibration(path: str, grid: torch.Tensor, offsets: torch.Tensor, realised: torch.Tensor,
                      gain: float, bracket_levels: bool, meta: dict) -> None:
    """Write the table as JSON (atomically): what `load_calibration` and `--knob_calibration` read.
    `bracket_levels`: whether the policy's bracket mask was on during the fit (`load_policy_eval` notes a
    mismatch: the mask changes what a given offset realises)."""
    from utils.io import atomic_write

    doc = {"format": FORMAT, "budget_feedback_gain": float(gain), "policy_bracket_levels": bool(bracket_levels),
           "grid": grid.tolist(), "offsets": offsets.tolist(), "realised": realised.tolist(), **meta}
    atomic_write(path, lambda fh: json.dump(doc, fh, indent=1))


def load_calibration(path: str) -> tuple[torch.Tensor, torch.Tensor, float, dict]:
    """(grid [m, 3] as `set_knob_table` takes it, offsets [m, 3], the feedback gain it was fitted with, the
    whole document: where and for which weights it was fitted) from a file `write_calibration` wrote; raises
    UsageError with a one-line message on anything else."""
    try:
        with open(path) as fh:
            doc = json.load(fh)
        need(isinstance(doc, dict) and doc.get("format") == FORMAT, f"{path} is not a knob calibration ({FORMAT})")
        grid, offsets = torch.tensor(doc["grid"], dtype=torch.float32), torch.tensor(doc["offsets"], dtype=torch.float32)
        gain = float(doc["budget_feedback_gain"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"cannot read the knob calibration {path}: {e}") from None
    need(grid.ndim == 2 and grid.shape[1] == 3 and grid.shape[0] >= 2 and offsets.shape == grid.shape
         and bool(torch.isfinite(offsets).all()) and math.isfinite(gain) and gain >= 0,
         f"the knob calibration {path} is malformed (grid/offsets must be [m >= 2, 3], finite; gain >= 0)")
    return table_grid(grid), offsets, gain, doc


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = OneLineErrorParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                           epilog=__doc__.split("\n\n", 1)[1])
    add_checkpoint_flags(p)
    p.add_argument("--out", help=f"where to write the table (JSON; default CKPT_DIR/{TABLE_FILE}, which every "
                   "evaluator then uses by default; elsewhere, pass it to their --knob_calibration)")
    p.add_argument("--split", default="train", choices=("train",),
                   help="blocks to fit on: train only (dev chooses between tables, test scores them)")
    p.add_argument("--blocks", type=int, default=48, help="train blocks decoded once per grid point (default 48)")
    p.add_argument("--skip_blocks", type=int, default=0, help="start at this train block (default 0)")
    p.add_argument("--points", type=int, default=9, help="grid points per axis inside its range (default 9)")
    p.add_argument("--iters", type=int, default=10, help="bisection steps per point (default 10: ~0.02 logits "
                   "per unit of usage over ±12)")
    p.add_argument("--max_offset", type=float, default=12.0,
                   help="bisection range ± in logits per unit of usage, at least (default 12)")
    p.add_argument("--gap_logits", type=float, default=6.0,
                   help="widen an axis's range to this many logits between its two closest levels (default 6: "
                   "±48 on 5/7/16 bits, ±12 on s40/s100)")
    p.add_argument("--batch_size", type=int, default=16, help="blocks per decode batch (rows = blocks x points; default 16)")
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    from utils.checkpoint import load_policy_eval
    from utils.data import load_blocks

    try:
        need(os.path.isdir(a.ckpt_dir), f"checkpoint directory not found: {a.ckpt_dir}")
        need(a.blocks >= 1 and a.batch_size >= 1 and a.points >= 2 and a.iters >= 1 and a.skip_blocks >= 0,
             "--blocks, --batch_size and --iters must be >= 1, --points >= 2, --skip_blocks >= 0")
        need(math.isfinite(a.max_offset) and a.max_offset > 0, f"--max_offset must be > 0, got {a.max_offset}")
        need(math.isfinite(a.gap_logits) and a.gap_logits >= 0, f"--gap_logits must be >= 0, got {a.gap_logits}")
        need(a.knob_calibration in (None, "auto", "none"),
             "--knob_calibration: this tool fits a table; it does not read one")
        check_mode(a.mode)
        a.out = a.out or os.path.join(a.ckpt_dir, TABLE_FILE)
        check_output_file("--out", a.out)
        overrides = {**checkpoint_overrides(a), "knob_calibration": "none"}
        cfg, lm, policy = load_policy_eval(a.ckpt_dir, a.mode, overrides, trust=a.trust_checkpoint)
        blocks = torch.as_tensor(load_blocks(cfg, lm.tokenizer, a.split)[a.skip_blocks: a.skip_blocks + a.blocks].copy())
        need(len(blocks) >= 1, f"the {a.split} split has no blocks after --skip_blocks {a.skip_blocks}")
        gain = cfg.knob_calibration_gain if a.budget_feedback_gain is None else a.budget_feedback_gain
        grid, offsets, realised, axes = calibrate_policy(lm, policy, blocks, cfg.context_len, gain, a.points, a.iters,
                                                         a.max_offset, a.gap_logits, a.batch_size,
                                                         progress=not a.no_progress)
        write_calibration(a.out, grid, offsets, realised, gain, policy.bracket_levels, {
            "weights_sha1": weights_fingerprint(policy.state_dict()), "ckpt_dir": a.ckpt_dir, "mode": a.mode,
            "split": a.split, "blocks": len(blocks), "skip_blocks": a.skip_blocks, "axes": axes, "iters": a.iters,
            "max_offset": offset_bounds(lm.actions, a.max_offset, a.gap_logits).tolist()})
    except (SOLError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    names = ("kappa", "rho", "bits/16")
    print(f"knob calibration at feedback gain {gain:g} on {len(blocks)} {a.split} blocks -> {a.out}")
    for j in axes:
        print(f"  {names[j]}: requested " + " ".join(f"{v:.3f}" for v in grid[:, j].tolist()))
        print(f"  {' ' * len(names[j])}  realised  " + " ".join(f"{v:.3f}" for v in realised[:, j].tolist()))
        print(f"  {' ' * len(names[j])}  offset    " + " ".join(f"{v:+.3f}" for v in offsets[:, j].tolist()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
