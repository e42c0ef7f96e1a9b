"""GRPO training of the SOL policy on teacher-forced episodes (the recipe behind `train.py`).

One loop, top to bottom: sample per-sequence budgets, run K policy rollouts per input through the shared
episode engine, turn log-likelihoods and budget misses into group-relative advantages, pool, update.
"""
from __future__ import annotations

import collections
import contextlib
import itertools
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from utils.checkpoint import CheckpointError, load_checkpoint, load_policy_weights, save_checkpoint
from utils.config import (AXIS_NAMES, Config, ConfigError, config_to_dict, default_device, resolved_alphas,
                          save_config)
from utils.data import BlockSampler, load_blocks
from utils.distributed import DistInfo, broadcast_object, cleanup, drain, gather_objects, init_distributed
from utils.ema import WeightEMA
from utils.engine import Episode, run_episode
from utils.grpo import (GRPOUpdater, RolloutBatch, TrainingDivergedError, axis_levels, budget_gaps, budget_penalty,
                        budget_prices, grpo_advantages, level_gains, level_prices, sample_budgets, slope_shrinks,
                        step_budget_costs, step_price_costs, task_reward, usage_slopes)
from utils.lm import ControlledLM
from utils.metrics import MetricsLogger
from utils.model import load_lm
from utils.policy import SOLPolicy, count_parameters
from utils.schedulers import PolicyScheduler


@dataclass
class TrainArgs:
    """Command-line options of train.py that are not config fields."""

    total_updates: int | None = None
    output_dir: str | None = None
    resume: str | None = None
    checkpoint_path: str | None = None
    wandb_project: str | None = None
    wandb_entity: str | None = None
    wandb_run_name: str | None = None
    trust_checkpoint: bool = False


def _rng_state(budget_gen: torch.Generator, action_gen: torch.Generator) -> dict[str, Any]:
    """Every RNG the loop draws from, as tensors and plain values (so the checkpoint loads weights_only)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"budget_gen": budget_gen.get_state(), "action_gen": action_gen.get_state(),
            "torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)}}


def _set_rng_state(s: dict[str, Any], budget_gen: torch.Generator, action_gen: torch.Generator) -> None:
    budget_gen.set_state(s["budget_gen"])
    action_gen.set_state(s["action_gen"])
    torch.set_rng_state(s["torch"])
    n = s["numpy"]
    if isinstance(n, dict):
        n = (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    np.random.set_state(n)  # a tuple in checkpoints of older versions (read with --trust_checkpoint)
    random.setstate(s["python"])


PID_FILE = ".trainer.pid"


class RunDirLock:
    """An exclusive `flock` on the run directory itself, held from set-up to the end of `train()`, so a second
    trainer on the same directory (fresh or --resume) stops with one line naming the holder's PID (kept in
    `.trainer.pid` while the lock is held). The kernel drops the lock when the process dies, even on SIGKILL."""

    def __init__(self, path: Path) -> None:
        import fcntl

        self.path = path
        self.fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            try:
                holder = (path / PID_FILE).read_text().strip() or "unknown"
            except OSError:
                holder = "unknown"
            raise CheckpointError(f"{path} is in use by a running trainer (PID {holder}); wait for it or pick "
                                  "another --output_dir") from None
        (path / PID_FILE).write_text(str(os.getpid()))

    def release(self) -> None:
        if self.fd is None:
            return
        (self.path / PID_FILE).unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = None


def _warm_start(policy: SOLPolicy, path: str, trust: bool = False) -> None:
    """Load policy weights for a warm start (`utils.checkpoint.load_policy_weights`: an exported directory or
    .safetensors, a SOL .pt, a bare state dict); bad or unsafe files raise CheckpointError."""
    state = load_policy_weights(path, trust)
    try:
        policy.load_state_dict(state)
    except RuntimeError as e:  # missing/unexpected keys or shape mismatch: another config's policy
        raise CheckpointError(f"--checkpoint_path: {path} does not fit this config's policy: "
                              f"{' '.join(str(e).split())[:300]}") from None


def episode_metrics(ep: Episode, r_task: torch.Tensor, penalty: torch.Tensor, tags: tuple[str, ...]) -> dict[str, float]:
    """Scalar summaries of one rollout batch for logging."""
    usage = ep.usage_means()
    gaps = budget_gaps(usage, ep.budgets)
    eff = ep.effective
    K = ep.group_size
    T, N = ep.actions.shape
    same = (ep.actions.view(T, N // K, K) == ep.actions.view(T, N // K, K)[..., :1]).all(-1)  # [T, B]
    frac = torch.bincount(ep.actions[eff].flatten(), minlength=len(tags)).float()
    frac = frac / frac.sum().clamp(min=1)
    m = {
        "reward/task_mean": r_task.mean().item(),
        "reward/penalty_mean": penalty.mean().item(),
        "reward/total_mean": (r_task - penalty[None]).mean().item(),
        "train/ppl_approx": math.exp(ep.nll.mean().item()),
        "train/dense_ppl": math.exp(-ep.dense_logp.mean().item()),
        "train/flops_ratio": (ep.usage["flops"][eff].sum() / (ep.dense_flops[eff].sum() * ep.actions.shape[1]).clamp(min=1)).item()
        if eff.any() else 1.0,
        "train/attn_keep_realised": ep.usage["attn_keep"][eff].mean().item() if eff.any() else 1.0,
        "train/channel_keep_realised": ep.usage["channel_keep"][eff].mean().item() if eff.any() else 1.0,
        # (step, group) cells where all K rollouts took the same action: no contrast for GRPO to learn from
        "train/no_contrast_frac": same[eff].float().mean().item() if eff.any() and K > 1 else 1.0,
    }
    for i, ax in enumerate(("tok", "prune", "qratio")):
        m[f"budgets/target_{ax}_mean"] = ep.budgets[:, i].mean().item()
        m[f"budgets/achieved_{ax}_mean"] = usage[:, i].mean().item()
        m[f"budgets/abs_gap_{ax}"] = gaps[:, i].abs().mean().item()
    for tag, f in zip(tags, frac.tolist()):
        m[f"action_frac/{tag}"] = f
    return m


BUDGET_WINDOW = 64  # rollout batches behind the requested-vs-achieved correlation


def budget_correlations(window: "collections.deque[torch.Tensor]") -> dict[str, float]:
    """Pearson correlation between requested and achieved budget per axis over the rollouts of the last
    `BUDGET_WINDOW` batches (each entry [N, 2, 3]: targets, achieved): near 0 while the policy ignores the
    knob, towards 1 once it follows it. Axes whose targets do not vary are left out."""
    if not window:
        return {}
    x = torch.cat(list(window)).double()
    out = {}
    for i, ax in enumerate(("tok", "prune", "qratio")):
        t, a = x[:, 0, i] - x[:, 0, i].mean(), x[:, 1, i] - x[:, 1, i].mean()
        den = float(t.norm() * a.norm())
        if float(t.norm()) > 1e-9:
            out[f"budgets/corr_target_achieved_{ax}"] = float((t * a).sum()) / den if den > 0 else 0.0
    return out


def mean_update_stats(step_stats: list[dict]) -> dict[str, float]:
    """Average the stats of the optimizer steps taken on one batch (empty when no step was taken)."""
    keys = step_stats[0].keys() if step_stats else ()
    out = {f"update/{k}": sum(s[k] for s in step_stats) / len(step_stats) for k in keys if k != "update"}
    if step_stats:
        out["update/steps_this_batch"] = len(step_stats)
    return out


@dataclass
class BatchRecord:
    """What one rollout batch produced in the training loop."""

    batch: int  # 1-based count of rollout batches done
    metrics: dict[str, float]  # `episode_metrics` + time/batch_s
    step_stats: list[dict]  # one dict per optimizer step this batch triggered
    updates: int  # optimizer updates done after this batch


class GRPOTrainer:
    """Sets up everything from a Config, then `train()` runs the loop."""

    def __init__(self, cfg: Config, args: TrainArgs) -> None:
        self.args = args
        resume_ckpt = None
        if args.resume:
            resume_ckpt = load_checkpoint(args.resume, "latest", trust=args.trust_checkpoint)
            if "optimizer" not in resume_ckpt:
                raise CheckpointError(f"{args.resume} holds a weights-only export, which cannot be resumed; "
                                      "use --checkpoint_path to warm start from it")
        self.cfg = cfg
        self.device = default_device(cfg)
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"device: {cfg.device} requested but CUDA is not available on this machine")
        self.dist: DistInfo = init_distributed(self.device)
        if self.device.startswith("cuda"):
            self.device = f"cuda:{self.dist.local_rank}"
        torch.manual_seed(cfg.seed)  # same policy init on every rank (DDP also broadcasts rank 0's)
        model, tok = load_lm(cfg.model_name, cfg.dtype, self.device)
        self.lm = ControlledLM.from_config(cfg, model, tok)
        self.actions = self.lm.actions
        if cfg.knob_calibration_blocks > 0:  # refuse before training, not after it
            from utils.knob_calibration import calibrated_axes

            if not calibrated_axes(self.actions):
                raise ConfigError("knob_calibration_blocks: the action grid has one level on every axis, so there "
                                  "is no knob to calibrate; set it to 0")
        self.blocks = load_blocks(cfg, tok, "train")
        self.dev_blocks = load_blocks(cfg, tok, "dev") if cfg.eval_every_updates > 0 else None
        self.sampler = BlockSampler(len(self.blocks), cfg.batch_size, cfg.seed, self.dist.rank,
                                    self.dist.world_size, cfg.epochs, cfg.train_fraction)
        H = model.config.hidden_size
        self.policy = SOLPolicy.from_config(cfg, H, model.get_input_embeddings().embedding_dim, self.actions).to(self.device)
        if args.checkpoint_path:
            if cfg.policy_init_from:
                raise ConfigError("--checkpoint_path and policy_init_from both set a new run's weights; give one")
            _warm_start(self.policy, args.checkpoint_path, args.trust_checkpoint)
        elif cfg.policy_init_from and resume_ckpt is None:
            from utils.policy_transfer import TransferError, transfer_from_checkpoint

            try:
                transfer_from_checkpoint(cfg.policy_init_from, self.policy, self.actions, args.trust_checkpoint)
            except TransferError as e:
                raise ConfigError(f"policy_init_from: {cfg.policy_init_from}: {e}") from None
        if not cfg.budget_feedback_in_training:
            self.policy.budget_feedback_gain = 0.0  # rollouts and loss; `_inference` restores it for dev checks
        groups: list = list(self.policy.parameters())
        self.contrast_axes = None
        if cfg.policy_train_axes:  # before DDP, which registers only the parameters that train
            from utils.policy_transfer import TransferError, train_only_axes

            try:
                head = train_only_axes(self.policy, self.actions, cfg.policy_train_axes)
            except TransferError as e:
                raise ConfigError(str(e)) from None
            groups = [{"params": head, "weight_decay": 0.0}]
            self.contrast_axes = [AXIS_NAMES.index(a) for a in cfg.policy_train_axes]
        self.train_policy = DDP(self.policy) if self.dist.enabled else self.policy
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        # the weight average that dev checks, checkpoints and exports read (None: the raw weights)
        self.ema = WeightEMA(self.policy, cfg.policy_ema_decay) if cfg.policy_ema_decay > 0 else None
        self.updater = GRPOUpdater(self.train_policy, self.optimizer, cfg,
                                   after_step=None if self.ema is None else lambda: self.ema.update(self.policy))
        self.alphas = resolved_alphas(cfg)
        self.budget_gen = torch.Generator().manual_seed(cfg.seed + 1000 * self.dist.rank)
        self.action_gen = torch.Generator(device=self.device).manual_seed(cfg.seed + 1000 * self.dist.rank + 1)
        self.batches_done = 0
        self.budget_window: collections.deque[torch.Tensor] = collections.deque(maxlen=BUDGET_WINDOW)
        self.price_window: collections.deque[torch.Tensor] = collections.deque(maxlen=cfg.budget_price_window)
        nominal = self.actions.nominal_usage()
        self.usage_lo, self.usage_hi = nominal.min(0).values, nominal.max(0).values
        # axes with more than two levels are priced per level (`level_prices`), from their own window of gains
        self.levels = axis_levels(nominal)
        self.multilevel = self.levels.isfinite().sum(-1) > 2
        self.level_window: collections.deque[torch.Tensor] = collections.deque(maxlen=cfg.budget_price_window)
        per_batch = cfg.batch_size * cfg.grpo_rollouts_per_input * cfg.rollout_len
        self.total_updates = args.total_updates or self._estimate_updates(per_batch)
        self.save_stride = max(1, self.total_updates // 10)
        if resume_ckpt is not None:
            self._restore(resume_ckpt)
        self.run_dir = self._make_run_dir(resume_ckpt is not None)

    def _estimate_updates(self, per_batch: int) -> int:
        cfg = self.cfg
        batches_per_cycle = max(1, math.ceil(cfg.ppo_target_batch_size / per_batch))
        cycles = len(self.sampler) // batches_per_cycle
        rollouts = batches_per_cycle * cfg.batch_size * cfg.grpo_rollouts_per_input
        mbs = math.ceil(rollouts / max(1, cfg.ppo_minibatch_size // cfg.rollout_len))
        return max(1, cycles * mbs * cfg.ppo_epochs // cfg.grad_accum_steps)

    def _make_run_dir(self, resuming: bool) -> Path | None:
        if resuming:
            path = Path(self.args.resume)
        elif self.args.output_dir:
            path = Path(self.args.output_dir)
        else:
            stamp = broadcast_object(time.strftime("%Y%m%d-%H%M%S"), self.dist)
            path = Path(self.cfg.output_dir) / f"{self.cfg.run_name}-{stamp}"
        self._created_dir = False
        self._lock = None
        if self.dist.is_main:
            if path.exists() and not path.is_dir():
                raise CheckpointError(f"--output_dir {path} exists and is not a directory")
            self._created_dir = not path.exists()
            path.mkdir(parents=True, exist_ok=True)
            # the lock first, so that a trainer still running there is named even after it has saved
            self._lock = RunDirLock(path)  # released when train() returns or fails
        try:
            if not resuming and (path / "policy_latest.pt").exists():  # every rank, so none goes on alone
                raise CheckpointError(f"{path} already holds a run; continue it with --resume {path} or pick "
                                      "another --output_dir")
            if self.dist.is_main:  # resumed, or fresh in a directory a kill left before its first checkpoint
                for pattern in (".*.tmp", "policy_*.pt.*.tmp", ".config-*.yml.tmp"):
                    for stale in path.glob(pattern):  # temporary files of writes a kill interrupted
                        stale.unlink(missing_ok=True)
            if self.dist.is_main and not resuming:
                save_config(self.cfg, path / "config.yaml")
        except BaseException:  # e.g. a full disk at config.yaml: no lock held, no empty directory left
            if self._lock is not None:
                self._lock.release()
            if self._created_dir:
                shutil.rmtree(path, ignore_errors=True)
            raise
        return path

    # ---- checkpoints ------------------------------------------------------------------------------
    def _rank_state(self) -> dict[str, Any]:
        """What differs between torchrun ranks: data position, RNGs, the pooled rollouts, the budget window."""
        return {"sampler": self.sampler.state_dict(), "rng": _rng_state(self.budget_gen, self.action_gen),
                "updater": self.updater.state_dict(), "budget_window": [w.clone() for w in self.budget_window],
                "price_window": [w.clone() for w in self.price_window],
                "level_window": [w.clone() for w in self.level_window]}

    def _payload(self, rank_states: list[dict[str, Any]]) -> dict[str, Any]:
        """The checkpoint: rank 0's state at the top level (as a single-process run writes it) and, under
        torchrun, every rank's in `rank_states`, so each rank resumes where it stopped."""
        ema = {} if self.ema is None else {"policy_raw_state_dict": self.policy.state_dict(),
                                            "ema_num_updates": self.ema.num_updates}
        return {
            "policy_state_dict": self.eval_policy.state_dict(),  # what evaluators and exports read
            **ema,  # with an EMA, the weights training continues from
            "cfg": config_to_dict(self.cfg),
            "optimizer": self.optimizer.state_dict(),
            **rank_states[0],
            "world_size": self.dist.world_size,
            "rank_states": rank_states if self.dist.enabled else None,
            "update_step": self.updater.num_updates,
            "batches_done": self.batches_done,
            "total_updates": self.total_updates,
            "action_tags": list(self.actions.tags),
            "policy_num_params": count_parameters(self.policy),
        }

    def save(self) -> None:
        """Write policy_{update}.pt and policy_latest.pt (rank 0; every rank must call it, to hand over its state)."""
        states = gather_objects(self._rank_state(), self.dist)
        if not self.dist.is_main:
            return
        payload = self._payload(states)
        u = self.updater.num_updates
        save_checkpoint(payload, self.run_dir / f"policy_{u}.pt")
        save_checkpoint(payload, self.run_dir / "policy_latest.pt")

    def _restore(self, ckpt: dict[str, Any]) -> None:
        saved_world = int(ckpt.get("world_size", ckpt["sampler"].get("world_size", 1)))
        if saved_world != self.dist.world_size:
            how = "python train.py" if saved_world == 1 else f"torchrun --nproc_per_node={saved_world} train.py"
            raise CheckpointError(f"{self.args.resume} was written by a run with {saved_world} process(es), this one "
                                  f"has {self.dist.world_size}; resume it exactly with `{how} --resume ...`, or warm "
                                  "start a new run from it with --checkpoint_path")
        mine = ckpt["rank_states"][self.dist.rank] if self.dist.enabled else ckpt
        if self.ema is not None:
            if "policy_raw_state_dict" not in ckpt:
                raise CheckpointError(f"{self.args.resume} was saved without a weight average; resume it with "
                                      "policy_ema_decay 0, or warm start a new run from it with --checkpoint_path")
            self.ema.load_state_dict({"weights": ckpt["policy_state_dict"], "num_updates": ckpt["ema_num_updates"]})
        self.policy.load_state_dict(ckpt.get("policy_raw_state_dict", ckpt["policy_state_dict"]))
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.updater.load_state_dict(mine["updater"])
        self.sampler.load_state_dict(mine["sampler"])
        _set_rng_state(mine["rng"], self.budget_gen, self.action_gen)
        self.batches_done = ckpt["batches_done"]
        self.budget_window.extend(mine.get("budget_window", []))
        self.price_window.extend(mine.get("price_window", []))
        self.level_window.extend(mine.get("level_window", []))
        if self.args.total_updates is None:
            self.total_updates = ckpt["total_updates"]
            self.save_stride = max(1, self.total_updates // 10)

    # ---- the loop ---------------------------------------------------------------------------------
    def batches_per_forward(self) -> int:
        """Rollout batches to decode together next: as many as `rollout_rows_per_forward` rows allow, but no more
        than the current update cycle still needs (so a chunk never spans an update and every batch of a chunk
        is sampled with the same policy weights)."""
        cfg = self.cfg
        rows = cfg.batch_size * cfg.grpo_rollouts_per_input
        per_batch = rows * cfg.rollout_len
        need = max(1, math.ceil((cfg.ppo_target_batch_size - self.updater.pool_size) / per_batch))
        return max(1, min(need, cfg.rollout_rows_per_forward // rows))

    def score(self, ep: Episode) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, float]]:
        """Advantages [T, N] of one rollout batch's episodes, with its task rewards [T, N], penalties [N] and
        price metrics. With `budget_credit: price` it also adds the batch's usage slopes to the price window."""
        cfg = self.cfg
        r_task = task_reward(ep.logp, ep.kl, cfg.task_w_kl)
        penalty = budget_penalty(ep.usage_means(), ep.budgets, self.alphas, cfg.budget_tolerance)
        charge, extra = penalty, {}
        usage = torch.stack([ep.usage[k] for k in ("keep", "prune", "qratio")], dim=-1)
        if cfg.budget_credit == "step":
            charge = step_budget_costs(usage, ep.budgets, ep.effective, self.alphas, cfg.budget_tolerance,
                                       ep.group_size)
        elif cfg.budget_credit == "price":
            slopes = usage_slopes(r_task, usage, ep.effective, ep.group_size)
            self.price_window.append(slopes.reshape(-1, 2, 3).cpu())
            pooled = torch.cat(list(self.price_window))
            prices = budget_prices(pooled, ep.budgets, self.usage_lo, self.usage_hi)
            _, shrink, _ = slope_shrinks(pooled)
            if bool(self.multilevel.any()):
                gains = level_gains(r_task, usage, ep.effective, ep.group_size, self.levels)
                self.level_window.append(gains.reshape(-1, *gains.shape[2:]).cpu())
                ml_prices, ml_shrink = level_prices(torch.cat(list(self.level_window)), ep.budgets, self.levels)
                prices = torch.where(self.multilevel.to(prices.device), ml_prices, prices)
                shrink = torch.where(self.multilevel, ml_shrink, shrink)
            charge = step_price_costs(usage, ep.budgets, ep.effective, prices)
            extra = {}
            for i, ax in enumerate(("tok", "prune", "qratio")):
                if float(self.usage_hi[i]) > float(self.usage_lo[i]):  # axes with one level have no price
                    extra[f"budgets/price_{ax}"] = prices[:, i].mean().item()
                    if math.isfinite(float(shrink[i])):  # NaN while the window holds too few cells
                        extra[f"budgets/price_shrink_{ax}"] = float(shrink[i])
        return grpo_advantages(r_task, charge, cfg, ep.group_size), r_task, penalty, extra

    def rollout_batches(self, idxs: list[np.ndarray]) -> list[tuple[RolloutBatch, dict[str, float]]]:
        """K policy rollouts for each block of every batch in `idxs`, decoded in ONE batched episode (one
        prefill, one forward per step over all rows), then split back and scored batch by batch exactly as if
        each had been decoded alone: returns, group normalisation and whitening are per rollout batch.

        Budgets are drawn batch by batch in order (the same draws as one batch at a time); the policy samples
        all rows of a step in one call, so the action RNG is consumed in a different order than with one
        batch per forward (deterministic for a fixed seed and knob)."""
        cfg, K = self.cfg, self.cfg.grpo_rollouts_per_input
        blocks = torch.from_numpy(np.concatenate([np.asarray(self.blocks[i], dtype=np.int64) for i in idxs]))
        budgets = torch.cat([sample_budgets(cfg, len(i), self.budget_gen) for i in idxs])
        sched = PolicyScheduler(self.policy, cfg.pi_temperature, greedy=False, generator=self.action_gen, record=True,
                                actions=self.actions, contrast=cfg.rollout_contrast, contrast_axes=self.contrast_axes)
        try:
            ep_all = run_episode(self.lm, blocks, sched, budgets, cfg.context_len, K, need_kl=cfg.task_w_kl > 0)
        except RuntimeError as e:  # torch.multinomial refuses non-finite probabilities
            if "probability tensor" not in str(e):
                raise
            raise TrainingDivergedError(f"after update {self.updater.num_updates}: the policy's action "
                                        "probabilities are not finite (its weights diverged)") from None
        tr_all = sched.trace()
        out, start = [], 0
        for i in idxs:
            stop = start + len(i) * K
            ep = ep_all.rows(start, stop)
            adv, r_task, penalty, price_metrics = self.score(ep)
            batch = RolloutBatch.from_trace(tr_all.rows(start, stop), adv.detach().clone())
            self.budget_window.append(torch.stack([ep.budgets, ep.usage_means()], dim=1).float().cpu())
            m = episode_metrics(ep, r_task, penalty, self.actions.tags)
            m.update(budget_correlations(self.budget_window))
            m.update(price_metrics)
            out.append((batch, m))
            start = stop
        return out

    def rollout_batch(self, idx: np.ndarray) -> tuple[RolloutBatch, dict[str, float]]:
        """K policy rollouts for each of the B blocks `idx`, scored into a RolloutBatch (one batch alone)."""
        return self.rollout_batches([idx])[0]

    def step_chunk(self, chunk: list[np.ndarray]) -> list["BatchRecord"]:
        """Decode the rollout batches of `chunk` together, then pool them into the updater one by one, in
        order (an update cycle runs when the pool fills). One record per batch."""
        t0 = time.time()
        rolled = self.rollout_batches(chunk)
        decode_s = (time.time() - t0) / len(chunk)
        out = []
        for batch, m in rolled:
            t1 = time.time()
            self.batches_done += 1
            step_stats = self.updater.add(batch)
            m["time/batch_s"] = decode_s + time.time() - t1
            out.append(BatchRecord(self.batches_done, m, step_stats, self.updater.num_updates))
        return out

    @property
    def eval_policy(self) -> SOLPolicy:
        """The weights evaluators get: the weight average when `policy_ema_decay` > 0, else the policy itself."""
        return self.policy if self.ema is None else self.ema.module

    @contextlib.contextmanager
    def _inference(self) -> Iterator[SOLPolicy]:
        """The policy as evaluators will run it: `eval_policy` in eval mode, with the config's budget feedback gain."""
        policy = self.eval_policy
        train_gain, was_training = policy.budget_feedback_gain, policy.training
        policy.budget_feedback_gain = float(self.cfg.budget_feedback_gain)
        policy.eval()
        try:
            yield policy
        finally:
            policy.train(was_training)
            policy.budget_feedback_gain = train_gain

    def dev_eval(self) -> dict[str, float]:
        """Policy (argmax) on the dev split at the default targets vs dense and the fixed baseline matched to
        the policy's realised usage: the learning-curve numbers (dev PPL gap to fixed, budget adherence)."""
        from utils.baselines import FixedScheduler
        from utils.evaluation import evaluate_matched
        from utils.schedulers import DenseScheduler

        cfg = self.cfg
        targets = (cfg.C_target, cfg.C_target_prune, cfg.C_target_quant_bits / 16)
        n = min(len(self.dev_blocks), cfg.dev_eval_blocks)
        bs = min(n, max(16, cfg.rollout_rows_per_forward // 2))  # policy and dense side by side
        with self._inference() as policy:
            res, matched = evaluate_matched(
                self.lm, self.dev_blocks[:n], bs, n // bs,
                {"policy": PolicyScheduler(policy, 1.0, greedy=True), "dense": DenseScheduler()},
                lambda t: {"fixed": FixedScheduler(t)}, targets, context_len=cfg.context_len,
                rows_per_forward=cfg.rollout_rows_per_forward)
        pol, fix, den = res["policy"], res["fixed"], res["dense"]
        out = {"dev/policy_ppl": pol.ppl, "dev/fixed_ppl": fix.ppl, "dev/dense_ppl": den.ppl,
               "dev/ppl_gap_policy_minus_fixed": pol.ppl - fix.ppl, "dev/policy_flops_ratio": pol.flops_ratio}
        for i, ax in enumerate(("tok", "prune", "qratio")):
            out[f"dev/target_{ax}"] = targets[i]
            out[f"dev/achieved_{ax}"] = matched[i]
        out.update(self.dev_placement(targets))
        return out

    def dev_placement(self, targets: tuple[float, float, float]) -> dict[str, float]:
        """Placement check on the first `dev_placement_blocks` dev blocks (`utils.placement`): does the
        policy keep dense where one cheap step hurts most? corr > 0 and cheap damage below random's mean
        that it places by content; corr ≈ 0 with a working knob, that it learned only the budget."""
        from utils.placement import cheapest_action, placement_report

        n = min(len(self.dev_blocks), self.cfg.dev_placement_blocks)
        if n == 0:
            return {}
        blocks = torch.as_tensor(np.asarray(self.dev_blocks[:n], dtype=np.int64))
        with self._inference() as policy:
            rep = placement_report(self.lm, policy, blocks, self.cfg.context_len, targets, n,
                                   cheapest_action(self.actions), self.cfg.rollout_rows_per_forward)
        return {"dev/placement_corr": rep.corr_spend_damage, "dev/placement_spearman": rep.spearman_spend_damage,
                "dev/placement_cheap_damage": rep.policy_cheap_damage,
                "dev/placement_cheap_damage_random": rep.random_cheap_damage}

    def fit_knob_calibration(self) -> Path:
        """Fit the final weights' knob calibration on the first `knob_calibration_blocks` train blocks at
        `knob_calibration_gain` (`utils.knob_calibration`) and write it beside the checkpoints, where the
        evaluators and `utils.checkpoint export` find it."""
        from utils.knob_calibration import (TABLE_FILE, calibrate_policy, offset_bounds, weights_fingerprint,
                                            write_calibration)

        cfg = self.cfg
        n = min(len(self.blocks), cfg.knob_calibration_blocks)
        blocks = torch.as_tensor(np.asarray(self.blocks[:n], dtype=np.int64))
        path = self.run_dir / TABLE_FILE
        print(f"\nfitting the knob calibration on {n} train blocks at feedback gain {cfg.knob_calibration_gain:g} "
              "(knob_calibration_blocks)", file=sys.stderr)
        with self._inference() as policy:
            try:
                grid, offsets, realised, axes = calibrate_policy(self.lm, policy, blocks, cfg.context_len,
                                                                 cfg.knob_calibration_gain, progress=True)
            finally:
                policy.set_knob_table(None, None)
            write_calibration(str(path), grid, offsets, realised, cfg.knob_calibration_gain,
                              policy.bracket_levels, {
                "weights_sha1": weights_fingerprint(policy.state_dict()), "ckpt_dir": str(self.run_dir),
                "mode": str(self.updater.num_updates), "split": "train", "blocks": n, "skip_blocks": 0,
                "axes": axes, "iters": 10, "max_offset": offset_bounds(self.lm.actions).tolist()})
        got = "; ".join(" ".join(f"{v:.3f}" for v in realised[:, j].tolist()) for j in axes)
        print(f"knob calibration (gain {cfg.knob_calibration_gain:g}, {n} train blocks) -> {path}; realised at "
              f"the grid points: {got}", file=sys.stderr)
        return path

    def train(self) -> Path | None:
        cfg, is_main = self.cfg, self.dist.is_main
        saved_any = self.args.resume is not None
        last_saved = self.updater.num_updates if saved_any else None  # update count of the newest checkpoint
        logger = None
        try:
            logger = MetricsLogger(self.run_dir, self.total_updates, is_main, self.args.wandb_project,
                                   self.args.wandb_entity, self.args.wandb_run_name or self.cfg.run_name,
                                   config_to_dict(cfg), initial_update=self.updater.num_updates,
                                   resume_at=(self.batches_done, self.updater.num_updates) if self.args.resume else None)
            batches = iter(self.sampler)
            while self.updater.num_updates < self.total_updates:
                chunk = list(itertools.islice(batches, self.batches_per_forward()))
                if not chunk:  # the data ran out
                    self.updater.flush()
                    break
                before = self.updater.num_updates
                for rec in self.step_chunk(chunk):
                    m = rec.metrics
                    if rec.batch % cfg.log_every == 0 or rec.step_stats:
                        logger.log({"batch": rec.batch, **m, **mean_update_stats(rec.step_stats)}, rec.updates)
                    logger.progress(len(rec.step_stats), reward=m["reward/total_mean"],
                                    gap_tok=m["budgets/abs_gap_tok"], gap_prune=m["budgets/abs_gap_prune"],
                                    gap_q=m["budgets/abs_gap_qratio"])
                # a chunk ends at an update at the latest (batches_per_forward), so this is the batch that made it
                every = cfg.eval_every_updates
                if every > 0 and is_main and before // every != self.updater.num_updates // every:
                    logger.log(self.dev_eval(), self.updater.num_updates)
                crossed = before // self.save_stride != self.updater.num_updates // self.save_stride
                if crossed or self.updater.num_updates >= self.total_updates:
                    self.save()
                    saved_any, last_saved = True, self.updater.num_updates
            # The data can run out before total_updates (and between two save strides): the last updates
            # must still reach policy_latest.pt. A run that saved nothing saves its (initial) policy.
            if last_saved != self.updater.num_updates:
                self.save()
                saved_any, last_saved = True, self.updater.num_updates
            if is_main and self.updater.num_updates > self.total_updates:
                print(f"note: stopped at update {self.updater.num_updates}, past --total_updates {self.total_updates}: "
                      "the optimizer steps of one rollout pool (ppo_epochs x minibatches / grad_accum_steps) are "
                      "taken together", file=sys.stderr)
            drain(self.dist)  # before rank 0's knob fit, so no rank waits at a barrier for minutes
            if cfg.knob_calibration_blocks > 0 and is_main:
                self.fit_knob_calibration()
        except BaseException as e:
            if is_main and not saved_any and getattr(self, "_created_dir", False):
                shutil.rmtree(self.run_dir, ignore_errors=True)  # nothing useful was written: leave no half run
            if isinstance(e, TrainingDivergedError):
                where = (f"the last checkpoint (update {last_saved}) is intact in {self.run_dir}" if saved_any
                         else "no checkpoint had been written, so no run directory is left")
                raise TrainingDivergedError(f"{e}; {where}") from None
            raise
        finally:
            if logger is not None:
                logger.close()
            cleanup(self.dist)
            if self._lock is not None:
                self._lock.release()
        return self.run_dir
