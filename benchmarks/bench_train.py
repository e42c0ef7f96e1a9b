"""Training throughput: seconds per input sequence of a GRPO update cycle, by config, dtype and memory knob.

    python benchmarks/bench_train.py                          # prune + joint CPU configs, fp32 + bf16, knob 0 and 128
    python benchmarks/bench_train.py --dtypes float32 --knobs 0,128,256 --cycles 1
    python benchmarks/bench_train.py --configs official_configs/tiny.yml --shape "" --cycles 1 --knobs 0,64

Every cell builds the trainer exactly as train.py does (GRPOTrainer) in its own process (so peak RSS is per
cell) and runs `--warmup` + `--cycles` whole update cycles through the training loop's own step
(`GRPOTrainer.step_chunk`: the cycle's rollout batches decoded `rollout_rows_per_forward` rows at a time,
pooled, then the PPO update), without checkpoints or logging. The default `--shape` is the reference's
batch shape: B=2 inputs x K=8 rollouts x T=16 steps after a 256-token context, a pool of 2048 (step, rollout)
entries = 16 input sequences per update cycle. Knob 0 = one rollout batch (16 rows) per forward, as before.

Columns: s/seq = cycle wall time / input sequences; s/update = cycle wall time / optimizer steps; row-steps/s
= B·K·T per sequence / s/seq; then the shares of the wall time: dense prefill (C+T tokens), controlled decode
steps (`ControlledLM.step`, LM head included), LM head outside steps, policy (`PolicyScheduler.choose`), update
(`GRPOUpdater.add`: pooling + PPO minibatches + optimizer) and other (budgets, cache expansion, per-step
log-likelihoods, rewards, advantages, metrics). The floor is measured in the same run per dtype: a dense
prefill of 16 blocks of C+T tokens plus a dense decode of their K·T row-steps at 128 rows (no controls, no
policy, no update), per sequence; "x floor" is the trainer's ratio to it. The reference's own code on this
machine (measured once): 1.86 s/seq on the prune config, 5.2 s/seq on the joint QUEST config.
Run it alone: on 2 cores a second heavy process distorts the numbers badly.
"""
from __future__ import annotations

import argparse
import itertools
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from utils.config import ConfigError, load_config  # noqa: E402

BUCKETS = ("lm_prefill", "lm_step", "lm_logits", "policy", "update")
REFERENCE_S_PER_SEQ = {"cpu_smollm2_prune.yml": 1.86, "cpu_smollm2_joint.yml": 5.2}
SHAPE = "batch_size=2,grpo_rollouts_per_input=8,rollout_len=16,context_len=256,ppo_target_batch_size=2048"


class Timers:
    """Accumulates wall time per bucket; a call nested inside a timed call of the same group is not counted."""

    def __init__(self, sync) -> None:
        self.sync = sync
        self.t: dict[str, float] = defaultdict(float)
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
                self._active.discard(group)
        return timed

    def take(self) -> dict[str, float]:
        t = dict(self.t)
        self.t.clear()
        return t


def peak_rss_mib() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux (bytes on macOS)
    return kb / (1024 * 1024) if sys.platform == "darwin" else kb / 1024


def one_cell(config: str, sets: list[str], warmup: int, cycles: int) -> dict:
    """Time whole update cycles of one trainer; returns the summary as a dict."""
    from utils.schedulers import PolicyScheduler
    from utils.trainer import GRPOTrainer, TrainArgs

    cfg = load_config(config, sets)
    with tempfile.TemporaryDirectory(prefix="bench_train-") as tmp:
        trainer = GRPOTrainer(cfg, TrainArgs(total_updates=10 ** 9, output_dir=tmp))
        timers = Timers(torch.cuda.synchronize if str(trainer.device).startswith("cuda") else (lambda: None))
        lm, updater = trainer.lm, trainer.updater
        lm.prefill_hidden = timers.wrap(lm.prefill_hidden, "lm_prefill", "lm")
        lm.step = timers.wrap(lm.step, "lm_step", "lm")
        lm.logits = timers.wrap(lm.logits, "lm_logits", "lm")
        updater.add = timers.wrap(updater.add, "update", "update")
        original_choose = PolicyScheduler.choose
        PolicyScheduler.choose = timers.wrap(original_choose, "policy", "policy")
        batches = iter(trainer.sampler)
        rows = []
        try:
            for c in range(warmup + cycles):
                t0, n_seq, n_upd, forwards = time.perf_counter(), 0, updater.num_updates, 0
                while True:  # one update cycle: chunks until the pool has been consumed by an update
                    chunk = list(itertools.islice(batches, trainer.batches_per_forward()))
                    if not chunk:
                        raise RuntimeError("the training data ran out; lower --cycles")
                    trainer.step_chunk(chunk)
                    n_seq += sum(len(i) for i in chunk)
                    forwards += 1
                    if updater.num_updates > n_upd:
                        break
                wall = time.perf_counter() - t0
                if c >= warmup:
                    rows.append({"wall": wall, "seq": n_seq, "updates": updater.num_updates - n_upd,
                                 "forwards": forwards, **timers.take()})
                else:
                    timers.take()
        finally:
            PolicyScheduler.choose = original_choose
    tot = {k: sum(r.get(k, 0.0) for r in rows) for k in ("wall", "seq", "updates", "forwards", *BUCKETS)}
    per_seq_rows = cfg.grpo_rollouts_per_input * cfg.rollout_len
    out = {"s_per_seq": tot["wall"] / tot["seq"], "s_per_update": tot["wall"] / max(1, tot["updates"]),
           "row_steps_per_s": per_seq_rows * tot["seq"] / tot["wall"], "seq_per_cycle": tot["seq"] / len(rows),
           "forwards_per_cycle": tot["forwards"] / len(rows), "updates_per_cycle": tot["updates"] / len(rows),
           "peak_rss_mib": peak_rss_mib(), "threads": torch.get_num_threads()}
    other = tot["wall"] - sum(tot[b] for b in BUCKETS)
    for b in (*BUCKETS, "other"):
        out[f"share_{b}"] = (other if b == "other" else tot[b]) / tot["wall"]
    return out


def floor_cell(config: str, sets: list[str], repeats: int) -> dict:
    """Dense prefill of 16 blocks of C+T tokens + dense decode of their K·T row-steps at 128 rows, s/sequence."""
    from utils.data import load_blocks
    from utils.lm import ControlledLM
    from utils.model import load_lm

    cfg = load_config(config, sets)
    model, tok = load_lm(cfg.model_name, cfg.dtype, "cpu")
    lm = ControlledLM.from_config(cfg, model, tok)
    S, K, C, T = 16, cfg.grpo_rollouts_per_input, cfg.context_len, cfg.rollout_len
    blocks = torch.from_numpy(load_blocks(cfg, tok, "train")[:S].astype("int64"))
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        cache, _ = lm.prefill_hidden(blocks[:, : C + T])
        cache.crop(-T)
        cache = lm.expand_cache(cache, K)
        for t in range(T):
            lm.step(cache, blocks[:, C + t].repeat_interleave(K))
        times.append((time.perf_counter() - t0) / S)
    times = sorted(times[1:])
    return {"s_per_seq": times[len(times) // 2], "rows": S * K}


def _child(kind: str, config: str, sets: list[str], warmup: int, cycles: int) -> dict:
    cmd = [sys.executable, __file__, "--_cell", kind, "--configs", config, "--shape", "", "--warmup", str(warmup),
           "--cycles", str(cycles)] + [a for s in sets for a in ("--set", s)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"error: cell {kind} {config} {sets} failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="official_configs/cpu_smollm2_prune.yml,official_configs/cpu_smollm2_joint.yml",
                   help="comma-separated training configs")
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated LM dtypes")
    p.add_argument("--knobs", default="0,128", help="comma-separated rollout_rows_per_forward values")
    p.add_argument("--shape", default=SHAPE, help=f"comma-separated KEY=VALUE overrides for every cell (default: "
                   f"the reference's batch shape, {SHAPE}); '' for the config's own")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="one more override, repeatable")
    p.add_argument("--warmup", type=int, default=1, help="update cycles run before timing (default 1)")
    p.add_argument("--cycles", type=int, default=2, help="timed update cycles per cell (default 2)")
    p.add_argument("--floor_repeats", type=int, default=3, help="timed floor passes per dtype, median (default 3)")
    p.add_argument("--_cell", choices=("train", "floor"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.cycles < 1 or a.warmup < 0:
        p.error("--cycles must be >= 1 and --warmup >= 0")
    configs = [c for c in a.configs.split(",") if c]
    sets = [s for s in a.shape.split(",") if s] + a.set
    try:
        for c in configs:
            load_config(c, sets)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a._cell:
        res = one_cell(configs[0], sets, a.warmup, a.cycles) if a._cell == "train" else \
            floor_cell(configs[0], sets, a.floor_repeats)
        print(json.dumps(res))
        return 0

    dtypes = [d for d in a.dtypes.split(",") if d]
    knobs = [int(k) for k in a.knobs.split(",") if k]
    print(f"Training throughput ({', '.join(sets) or 'config shapes'}); torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {a.warmup} warm-up + {a.cycles} timed update cycle(s) per cell\n")
    print("| config | dtype | rows/forward | s/seq | x reference | s/update | row-steps/s | x floor | prefill | "
          "decode | LM head | policy | update | other | peak RSS |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    floors = {}
    for dtype in dtypes:
        floors[dtype] = _child("floor", configs[0], sets + [f"dtype={dtype}"], 0, 1)
        for config in configs:
            ref = REFERENCE_S_PER_SEQ.get(Path(config).name)
            for knob in knobs:
                r = _child("train", config, sets + [f"dtype={dtype}", f"rollout_rows_per_forward={knob}"],
                           a.warmup, a.cycles)
                K = load_config(config, sets).grpo_rollouts_per_input
                rows_fw = int(r["seq_per_cycle"] / r["forwards_per_cycle"] * K)
                sh = " | ".join(f"{100 * r[f'share_{b}']:.0f}%" for b in (*BUCKETS, "other"))
                speedup = f"{ref / r['s_per_seq']:.2f}x" if ref else "-"
                print(f"| {Path(config).name} | {dtype} | {rows_fw} | {r['s_per_seq']:.3f} | {speedup} | "
                      f"{r['s_per_update']:.2f} | "
                      f"{r['row_steps_per_s']:.0f} | {r['s_per_seq'] / floors[dtype]['s_per_seq']:.2f} | {sh} | "
                      f"{r['peak_rss_mib'] / 1024:.2f} GiB |", flush=True)
    print()
    for dtype, f in floors.items():
        print(f"floor ({dtype}): dense prefill of C+T tokens + dense decode of K·T row-steps at {f['rows']} rows: "
              f"{f['s_per_seq']:.3f} s/seq")
    return 0


if __name__ == "__main__":
    sys.exit(main())
