"""Behaviour cloning: distil a teacher schedule into the SOL policy, on its own or as a warm start for GRPO.

    python -m utils.imitation --config official_configs/cpu_smollm2_prune_lmfeats.yml \\
        --teacher results/damage_probe/map_train256.pt --features +scalars --output_dir checkpoints/prune_bc
    python train.py --config official_configs/cpu_smollm2_prune_lmfeats.yml \\
        --checkpoint_path checkpoints/prune_bc/policy_latest.pt --output_dir checkpoints/prune_bc_grpo

Why: `python -m utils.damage_probe` found on dev that a linear read of what the policy sees (surprisal and
entropy of the input token) places cheap steps better than the fixed baseline, while GRPO from scratch, with
K = 8 noisy rollouts per input and a few hundred updates on CPU, did not find that schedule. Cloning hands the
policy the probe's schedule directly; GRPO can then refine it with the true reward.

1. Teacher episodes through the shared engine (`run_episode`): train blocks, each decoded under
   `budgets_per_block` budgets drawn as in training (`sample_budgets`, one per row), with the teacher (the
   budget-calibrated predicted-damage scheduler fitted on the teacher map) choosing every action and the
   policy's inputs recorded exactly as `PolicyScheduler(record=True)` records them. Before that, the
   teacher's budget -> threshold map is corrected in its own episodes (`calibrate_in_episode`, on train blocks
   after the cloning blocks): thresholds set on dense-episode predictions make it overspend, most at loose
   budgets, and the clone would inherit that.
2. Cross-entropy of the policy's teacher-forced logits against the teacher's actions on effective steps
   (AdamW, `epochs` passes in shuffled minibatches of rows), with a held-out share of blocks for the agreement.
3. A run directory in the trainer's format (`policy_latest.pt` + `config.yaml` + `imitation.json`) that
   eval_perplexity.sh, gen_policy_vs_dense.py and train.py --checkpoint_path read.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from utils.cli import OneLineErrorParser, SOLError, need
from utils.engine import Scheduler, StepObs, run_episode
from utils.records import StepScalars, StepTrace, TraceRecorder

class CloneRecorder(Scheduler):
    """Lets `teacher` choose every action and records what the policy would have been fed, in the layout of
    `PolicyScheduler.trace()`: its inputs, the previous action (BOS at t = 0) and the action."""

    name = "clone-recorder"

    def __init__(self, teacher: Scheduler, bos_id: int) -> None:
        self.teacher, self.bos_id = teacher, int(bos_id)

    def start(self, lm, budgets: torch.Tensor, group_size: int) -> None:
        super().start(lm, budgets, group_size)
        self.teacher.start(lm, budgets, group_size)
        self.prev = torch.full((budgets.shape[0],), self.bos_id, dtype=torch.long, device=budgets.device)
        self.recorder = TraceRecorder()

    def choose(self, obs: StepObs) -> torch.Tensor:
        a = self.teacher.choose(obs)
        self.recorder.append(obs.hidden.float(), self.lm.embed(obs.input_ids).float(), obs.scalars, self.prev, a)
        self.prev = a.long()
        return a

    def observe(self, out) -> None:
        self.teacher.observe(out)

    def trace(self) -> StepTrace:
        return self.recorder.stacked()


def teacher_episodes(lm, teacher: Scheduler, bos_id: int, blocks: np.ndarray, cfg, budgets_per_block: int,
                     batch_blocks: int, generator: torch.Generator, progress: bool = True
                     ) -> tuple[StepTrace, torch.Tensor]:
    """Decode `blocks` under the teacher, `budgets_per_block` rows per block with budgets drawn as in training.
    Returns the traces [T, N, ...] (rows block-major) and the effective-step mask [T]."""
    from tqdm import tqdm

    from utils.grpo import sample_budgets

    R = budgets_per_block
    parts: list[StepTrace] = []
    effective = None
    for i in tqdm(range(0, len(blocks), batch_blocks), desc="teacher episodes", disable=not progress):
        b = torch.from_numpy(np.asarray(blocks[i: i + batch_blocks], dtype=np.int64))
        rec = CloneRecorder(teacher, bos_id)
        with torch.no_grad():  # not inference_mode: the traces are autograd inputs later
            ep = run_episode(lm, b, rec, sample_budgets(cfg, b.shape[0] * R, generator), cfg.context_len, R)
        effective = ep.effective
        parts.append(rec.trace().map(lambda v: v.cpu()))
    return StepTrace.cat(parts), effective


def clone_loss(policy, tr: StepTrace, rows: torch.Tensor, effective: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy of the policy's logits (temperature 1) against the teacher's actions over the
    effective steps of `rows`, and the share of those steps where the policy's argmax agrees."""
    sel = tr.select_rows(rows)
    logits = policy(*sel.policy_inputs(), temperature=1.0)[effective]
    target = sel.actions[effective]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
    agree = (logits.argmax(-1) == target).float().mean()
    return ce, agree


def clone(policy, tr: StepTrace, effective: torch.Tensor, train_rows: torch.Tensor,
          val_rows: torch.Tensor, epochs: int, minibatch: int, lr: float, weight_decay: float, seed: int,
          progress: bool = True) -> list[dict]:
    """Fit the policy to the teacher's actions; one log row per epoch (train CE, held-out CE and agreement)."""
    from tqdm import tqdm

    opt = torch.optim.AdamW(policy.parameters(), lr=lr, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(seed)
    log = []
    for epoch in tqdm(range(1, epochs + 1), desc="cloning", disable=not progress):
        policy.train()
        total, n = 0.0, 0
        for idx in train_rows[torch.randperm(len(train_rows), generator=g)].split(minibatch):
            ce, _ = clone_loss(policy, tr, idx, effective)
            opt.zero_grad(set_to_none=True)
            ce.backward()
            opt.step()
            total, n = total + float(ce.detach()) * len(idx), n + len(idx)
        policy.eval()
        row = {"epoch": epoch, "train_ce": total / max(1, n)}
        if len(val_rows):
            with torch.no_grad():
                ce, agree = clone_loss(policy, tr, val_rows, effective)
            row.update(val_ce=float(ce), val_agreement=float(agree))
        log.append(row)
    return log


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = OneLineErrorParser(prog="python -m utils.imitation", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="training config of the policy to build (its grid and policy_*)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one config field")
    p.add_argument("--teacher", required=True,
                   help="damage map (python -m utils.damage_probe collect) to fit the teacher probe on")
    p.add_argument("--features", default="+scalars", choices=("position", "+scalars", "+hidden", "+hidden+token"),
                   help="the teacher probe's feature set (default +scalars: position, surprisal, entropy)")
    p.add_argument("--output_dir", required=True, help="run directory to create (policy_latest.pt, config.yaml, "
                                                       "imitation.json)")
    p.add_argument("--blocks", type=int, default=512, help="train blocks to decode under the teacher (default 512)")
    p.add_argument("--budgets_per_block", type=int, default=4,
                   help="budgets (rows) per block, drawn as in training (default 4)")
    p.add_argument("--batch_blocks", type=int, default=0,
                   help="blocks per batched episode (default 0: as many as the config's rollout_rows_per_forward "
                        "rows allow, budgets_per_block rows per block when cloning, 10 per block when calibrating)")
    p.add_argument("--calibrate_blocks", type=int, default=64,
                   help="train blocks (after the cloning blocks) on which the teacher's budget -> threshold map is "
                        "corrected in its own episodes at 10 quantile levels; 0 keeps the dense-episode map "
                        "(default 64)")
    p.add_argument("--track_budget", action="store_true",
                   help="closed-loop teacher: before each step its cheap fraction is re-set to what the row still "
                        "needs to meet its budget (PredictedDamageScheduler track=True)")
    p.add_argument("--holdout", type=float, default=0.1,
                   help="share of the blocks held out for the agreement with the teacher (default 0.1)")
    p.add_argument("--epochs", type=int, default=30, help="passes over the recorded steps (default 30)")
    p.add_argument("--minibatch", type=int, default=64, help="rows per optimizer step (default 64)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    p.add_argument("--seed", type=int, default=0, help="seed of budgets, split and shuffling (default 0)")
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def _run(a: argparse.Namespace) -> dict:
    from utils.checkpoint import save_checkpoint
    from utils.config import config_to_dict, default_device, load_config, save_config
    from utils.damage_map import load_damage_map
    from utils.probe_scheduler import calibrate_in_episode, fit_scheduler
    from utils.data import load_blocks
    from utils.lm import ControlledLM
    from utils.model import load_lm
    from utils.policy import SOLPolicy, count_parameters

    need(a.calibrate_blocks >= 0, f"--calibrate_blocks must be >= 0, got {a.calibrate_blocks}")
    need(a.blocks >= 2 and a.budgets_per_block >= 1 and a.batch_blocks >= 0 and a.epochs >= 1 and a.minibatch >= 1,
         "--blocks must be >= 2, --batch_blocks >= 0 and --budgets_per_block, --epochs, --minibatch >= 1")
    need(0.0 <= a.holdout < 1.0, f"--holdout must be in [0, 1), got {a.holdout}")
    need(os.path.isfile(a.config), f"config not found: {a.config}")
    out = Path(a.output_dir)
    need(not (out / "policy_latest.pt").exists(), f"{out} already holds a policy; pick another --output_dir")
    fit_map, meta = load_damage_map(a.teacher)
    cfg = load_config(a.config, a.set)
    need(not cfg.policy_bracket_levels, "policy_bracket_levels is on: a teacher action outside the two levels that "
         "bracket its budget would get a -1e4 logit and swamp the cloning loss; clone with it off (evaluators can "
         "turn it on with --policy_bracket_levels on)")

    def blocks_for(rows_per_block: int) -> int:  # blocks per batched episode
        return a.batch_blocks or max(1, cfg.rollout_rows_per_forward // rows_per_block)

    if a.features != "position" and cfg.policy_scalar_dim < 10:
        print(f"warning: the teacher reads surprisal and entropy but policy_scalar_dim={cfg.policy_scalar_dim} "
              "hides them from the policy (set 10)", file=sys.stderr)
    model, tok = load_lm(cfg.model_name, cfg.dtype, default_device(cfg))
    lm = ControlledLM.from_config(cfg, model, tok)
    acts = lm.actions
    need(meta.get("probe_tag") in acts.tags, f"the teacher map probes {meta.get('probe_tag')}, not an action of "
                                             f"this config's grid ({', '.join(acts.tags)})")
    need(fit_map["effective"].shape[0] == cfg.rollout_len,
         f"the teacher map has {fit_map['effective'].shape[0]} steps per episode; the config's rollout_len is "
         f"{cfg.rollout_len}")
    teacher, lam = fit_scheduler(fit_map, a.features, acts, acts.tags.index(meta["probe_tag"]))
    blocks = load_blocks(cfg, tok, "train")
    need(len(blocks) >= 2, "the train split has fewer than 2 blocks")
    cal_blocks, blocks = blocks[a.blocks: a.blocks + a.calibrate_blocks], blocks[: a.blocks]
    calibration = None
    if a.calibrate_blocks:
        need(len(cal_blocks) >= 1, f"the train split has no blocks left after --blocks {a.blocks} for calibration")
        levels = torch.linspace(0.1, 1.0, 10, dtype=torch.float64)
        teacher.calibration = calibrate_in_episode(
            lm, teacher, torch.from_numpy(np.asarray(cal_blocks, dtype=np.int64)), cfg.context_len, levels,
            blocks_for(len(levels)), progress=not a.no_progress)
        calibration = {"blocks": len(cal_blocks), "levels": teacher.calibration.levels.tolist(),
                       "cheap_shares": teacher.calibration.shares.tolist()}
    teacher.track = a.track_budget
    torch.manual_seed(cfg.seed)
    policy = SOLPolicy.from_config(cfg, lm.hidden_size, model.get_input_embeddings().embedding_dim, acts)
    gen = torch.Generator().manual_seed(a.seed)
    tr, eff = teacher_episodes(lm, teacher, policy.bos_id, blocks, cfg, a.budgets_per_block,
                               blocks_for(a.budgets_per_block), gen,
                               progress=not a.no_progress)
    R = a.budgets_per_block
    n_val = int(round(a.holdout * len(blocks)))
    need(n_val < len(blocks), f"--holdout {a.holdout} leaves no training block out of {len(blocks)}")
    order = torch.randperm(len(blocks), generator=gen)
    rows_of = lambda b: (b[:, None] * R + torch.arange(R)).reshape(-1)  # noqa: E731  block -> its R rows
    val_rows, train_rows = rows_of(order[:n_val]), rows_of(order[n_val:])
    policy = policy.to(tr.h.device)
    log = clone(policy, tr, eff, train_rows, val_rows, a.epochs, a.minibatch, a.lr, cfg.weight_decay, a.seed,
                progress=not a.no_progress)
    cheap = (tr.actions[eff] != acts.dense_idx).float().mean()
    cal = teacher.calibration
    cheap_rows = (tr.actions[eff] != acts.dense_idx).double().mean(0)  # [N]
    realised = cal.hi - cheap_rows * (cal.hi - cal.lo)
    requested = StepScalars.budgets(tr.scalars[0])[:, cal.axis].double()  # the row's budget on the axis
    teacher_gap = float((realised - requested).abs().mean())
    summary = {"teacher": a.teacher, "features": a.features, "probe": meta.get("probe_tag"), "ridge_lambda": lam,
               "blocks": len(blocks), "budgets_per_block": R, "held_out_blocks": n_val,
               "in_episode_calibration": calibration,
               "track_budget": a.track_budget, "teacher_cheap_share": float(cheap),
               "teacher_mean_abs_budget_gap": teacher_gap, "epochs": log}
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        save_config(cfg, out / "config.yaml")
        with open(out / "imitation.json", "w", encoding="utf-8") as fh:
            json.dump(summary, fh, indent=1)
        save_checkpoint({"policy_state_dict": policy.state_dict(), "cfg": config_to_dict(cfg), "update_step": 0,
                         "action_tags": list(acts.tags), "policy_num_params": count_parameters(policy),
                         "imitation": {k: v for k, v in summary.items() if k != "epochs"}}, out / "policy_latest.pt")
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    return summary


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)

    try:
        s = _run(a)
    except (SOLError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    last = s["epochs"][-1]
    held = (f", held-out CE {last['val_ce']:.4f}, agreement {last['val_agreement']:.3f}"
            if "val_ce" in last else "")
    print(f"cloned the {s['features']} probe teacher ({s['teacher_cheap_share']:.3f} of steps cheap, mean |budget "
          f"gap| {s['teacher_mean_abs_budget_gap']:.3f}) over "
          f"{s['blocks']} blocks x {s['budgets_per_block']} budgets: train CE {last['train_ce']:.4f}{held}; "
          f"saved {a.output_dir}/policy_latest.pt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
