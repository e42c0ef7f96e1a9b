"""Training throughput: where the wall time of a GRPO rollout batch goes.

    python benchmarks/bench_train.py                                   # cpu_smollm2_joint.yml, 3 batches
    python benchmarks/bench_train.py --config official_configs/tiny.yml --updates 2
    python benchmarks/bench_train.py --set batch_size=4 --set rollout_len=32 --threads 2

Builds the trainer exactly as train.py does (GRPOTrainer), then runs `--updates` rollout batches through the
training step (`rollout_batch` + `GRPOUpdater.add`, which pools and runs an update cycle when the pool is
full; with the CPU configs one batch is one pool, so one batch = one cycle), without checkpoints or logging.
Timing wrappers are installed on this trainer only:

* LM forwards: `ControlledLM.prefill_hidden` (the dense prefill over C + T tokens), `ControlledLM.step` (one
  batched controlled decode step, LM head included) and `ControlledLM.logits` called outside them
  (the dense reference logits and the first step's logits); nested calls are counted once;
* policy: `PolicyScheduler.choose` (incremental policy forward + sampling for all rows of one step);
* update: `GRPOUpdater.add` (pooling, PPO minibatch forwards/backwards, optimizer steps);
* other: the rest of the batch's wall time (budget sampling, cache expansion, per-step log-softmax over the
  vocabulary, rewards and advantages, metrics).

Throughput: input sequences/s = B / batch time; decode tokens/s = B·K·T / batch time (every rollout row
decodes T tokens). The summary is over the batches after the first (a warm-up) when there are two or more.
Peak RSS is the process's ru_maxrss. Run it alone: on 2 cores another heavy process distorts the numbers.
"""
from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from utils.config import ConfigError, load_config  # noqa: E402
from utils.schedulers import PolicyScheduler  # noqa: E402
from utils.trainer import GRPOTrainer, TrainArgs  # noqa: E402

BUCKETS = ("lm_prefill", "lm_step", "lm_logits", "policy", "update")


class Timers:
    """Accumulates wall time per bucket; a call nested inside a timed call of the same group is not counted."""

    def __init__(self, sync) -> None:
        self.sync = sync
        self.t: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._active: set[str] = set()

    def wrap(self, fn, bucket: str, group: str):
        def timed(*args, **kwargs):
            if group in self._active:
                return fn(*args, **kwargs)
            self._active.add(group)
            self.sync()
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.sync()
                self.t[bucket] += time.perf_counter() - t0
                self.calls[bucket] += 1
                self._active.discard(group)
        return timed

    def take(self) -> tuple[dict[str, float], dict[str, int]]:
        t, c = dict(self.t), dict(self.calls)
        self.t.clear()
        self.calls.clear()
        return t, c


def peak_rss_mib() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux (bytes on macOS)
    return kb / (1024 * 1024) if sys.platform == "darwin" else kb / 1024


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="official_configs/cpu_smollm2_joint.yml", help="training config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    p.add_argument("--updates", "--batches", dest="batches", type=int, default=3,
                   help="rollout batches to time (the first is reported as warm-up when there are >= 2)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    args = p.parse_args(argv)
    if args.batches < 1:
        p.error("--updates must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        cfg = load_config(args.config, args.set)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory(prefix="bench_train-") as tmp:
        t_setup = time.perf_counter()
        trainer = GRPOTrainer(cfg, TrainArgs(total_updates=10 ** 9, output_dir=tmp))
        t_setup = time.perf_counter() - t_setup
        cuda = str(trainer.device).startswith("cuda")
        timers = Timers(torch.cuda.synchronize if cuda else (lambda: None))
        lm = trainer.lm
        lm.prefill_hidden = timers.wrap(lm.prefill_hidden, "lm_prefill", "lm")
        lm.step = timers.wrap(lm.step, "lm_step", "lm")
        lm.logits = timers.wrap(lm.logits, "lm_logits", "lm")
        updater = trainer.updater
        updater.add = timers.wrap(updater.add, "update", "update")
        original_choose = PolicyScheduler.choose
        PolicyScheduler.choose = timers.wrap(original_choose, "policy", "policy")

        B, K, T = cfg.batch_size, cfg.grpo_rollouts_per_input, cfg.rollout_len
        rows = []
        try:
            sampler = iter(trainer.sampler)
            for i in range(args.batches):
                idx = next(sampler, None)
                if idx is None:
                    print(f"(the sampler ran out after {i} batches)", file=sys.stderr)
                    break
                n_before = updater.num_updates
                timers.sync()
                t0 = time.perf_counter()
                batch, _ = trainer.rollout_batch(idx)
                updater.add(batch)
                timers.sync()
                wall = time.perf_counter() - t0
                t, calls = timers.take()
                rows.append({"wall": wall, **{b: t.get(b, 0.0) for b in BUCKETS},
                             "steps": calls.get("lm_step", 0), "updates": updater.num_updates - n_before})
        finally:
            PolicyScheduler.choose = original_choose
        if not rows:
            print("error: no rollout batch ran", file=sys.stderr)
            return 2

    steady = rows[1:] if len(rows) >= 2 else rows
    tot = {k: sum(r[k] for r in steady) for k in ("wall", *BUCKETS, "updates")}
    lm_t = tot["lm_prefill"] + tot["lm_step"] + tot["lm_logits"]
    other = tot["wall"] - lm_t - tot["policy"] - tot["update"]
    n = len(steady)
    print(f"\nTraining throughput: {cfg.model_name} ({Path(args.config).name}{' + ' + ', '.join(args.set) if args.set else ''}), "
          f"device {trainer.device}, torch threads {torch.get_num_threads()}")
    print(f"B={B} inputs x K={K} rollouts x T={T} decode steps, context C={cfg.context_len}, "
          f"{len(trainer.actions)} actions, criteria {cfg.sparsity_criteria}; policy "
          f"{sum(q.numel() for q in trainer.policy.parameters()):,} params; set-up {t_setup:.1f} s")
    print(f"summary over {n} batch(es){' after a warm-up batch' if len(rows) >= 2 else ' (no warm-up excluded)'}, "
          f"{tot['updates']} optimizer update(s)\n")
    print("| metric | value |")
    print("|---|---|")
    print(f"| wall time per batch | {tot['wall'] / n:.3f} s |")
    print(f"| input sequences/s | {B * n / tot['wall']:.3f} |")
    print(f"| decode tokens/s (B·K·T / time) | {B * K * T * n / tot['wall']:.1f} |")
    print(f"| LM forwards (prefill + steps + LM head) | {lm_t / n:.3f} s ({100 * lm_t / tot['wall']:.1f}%) |")
    print(f"| · dense prefill (C + T tokens) | {tot['lm_prefill'] / n:.3f} s ({100 * tot['lm_prefill'] / tot['wall']:.1f}%) |")
    print(f"| · controlled decode steps | {tot['lm_step'] / n:.3f} s ({100 * tot['lm_step'] / tot['wall']:.1f}%) |")
    print(f"| · LM head outside steps | {tot['lm_logits'] / n:.3f} s ({100 * tot['lm_logits'] / tot['wall']:.1f}%) |")
    print(f"| policy (PolicyScheduler.choose) | {tot['policy'] / n:.3f} s ({100 * tot['policy'] / tot['wall']:.1f}%) |")
    print(f"| update (GRPOUpdater.add) | {tot['update'] / n:.3f} s ({100 * tot['update'] / tot['wall']:.1f}%) |")
    print(f"| other | {other / n:.3f} s ({100 * other / tot['wall']:.1f}%) |")
    print(f"| peak RSS | {peak_rss_mib():.0f} MiB |")
    print("\nper batch:\n")
    print("| batch | wall s | LM s | policy s | update s | other s | decode steps | updates |")
    print("|---|---|---|---|---|---|---|---|")
    for i, r in enumerate(rows, 1):
        lm_r = r["lm_prefill"] + r["lm_step"] + r["lm_logits"]
        print(f"| {i}{' (warm-up)' if i == 1 and len(rows) >= 2 else ''} | {r['wall']:.3f} | {lm_r:.3f} | "
              f"{r['policy']:.3f} | {r['update']:.3f} | {r['wall'] - lm_r - r['policy'] - r['update']:.3f} | "
              f"{r['steps']} | {r['updates']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
