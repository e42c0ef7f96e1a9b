"""Evaluation throughput: scored tokens per second for each method on the shared episode engine.

    python benchmarks/bench_eval.py --ckpt_dir results/ckpt_joint            # a trained checkpoint
    python benchmarks/bench_eval.py --config official_configs/cpu_smollm2_joint.yml   # untrained policy

Every method decodes the same `--batches` x `--batch_size` WikiText-2 test blocks (one dense prefill per
batch, shared), teacher-forced over rollout_len tokens; the policy runs argmax. Run it alone.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from utils.baselines import DACScheduler, EMCScheduler, FixedScheduler, RandomScheduler  # noqa: E402
from utils.config import load_config  # noqa: E402
from utils.data import load_blocks  # noqa: E402
from utils.engine import prefill_blocks, run_episode  # noqa: E402
from utils.checkpoint import load_policy_eval  # noqa: E402
from utils.lm import ControlledLM  # noqa: E402
from utils.model import load_lm  # noqa: E402
from utils.policy import SOLPolicy  # noqa: E402
from utils.schedulers import DenseScheduler, PolicyScheduler  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt_dir", help="trained run directory (policy_latest.pt)")
    src.add_argument("--config", help="config file: benchmark an untrained policy of that shape")
    p.add_argument("--batches", type=int, default=2, help="batches per method")
    p.add_argument("--batch_size", type=int, default=16, help="sequences per batch")
    p.add_argument("--targets", type=float, nargs=3, default=[0.5, 0.7, 0.5], metavar=("KEEP", "PRUNE", "QRATIO"),
                   help="requested usage for the policy and the baselines")
    args = p.parse_args(argv)
    if args.ckpt_dir:
        cfg, lm, policy = load_policy_eval(args.ckpt_dir)
    else:
        cfg = load_config(args.config)
        model, tok = load_lm(cfg.model_name, cfg.dtype, "cpu")
        lm = ControlledLM.from_config(cfg, model, tok)
        torch.manual_seed(0)
        policy = SOLPolicy.from_config(cfg, model.config.hidden_size, model.config.hidden_size, len(lm.actions)).eval()
    blocks = torch.from_numpy(load_blocks(cfg, lm.tokenizer, "test")[: args.batches * args.batch_size].astype("int64"))
    targets = tuple(args.targets)
    methods = {
        "dense": DenseScheduler(), "policy": PolicyScheduler(policy, 0.6, greedy=True),
        "fixed": FixedScheduler(targets), "random": RandomScheduler(targets, seed=0),
        "emc": EMCScheduler(targets), "dac": DACScheduler(targets),
    }
    budgets = torch.tensor([targets])
    seconds = dict.fromkeys(methods, 0.0)
    prefill_s, tokens = 0.0, 0
    for i in range(args.batches):
        b = blocks[i * args.batch_size:(i + 1) * args.batch_size]
        t0 = time.perf_counter()
        pf = prefill_blocks(lm, b, cfg.context_len)
        prefill_s += time.perf_counter() - t0
        for name, sched in methods.items():
            t0 = time.perf_counter()
            ep = run_episode(lm, None, sched, budgets.expand(b.shape[0], 3), cfg.context_len, prefill=pf)
            seconds[name] += time.perf_counter() - t0
        tokens += ep.logp.numel()
    print(f"\nEvaluation throughput, {cfg.model_name}, {cfg.sparsity_criteria}, context {cfg.context_len}, "
          f"{args.batches} x {args.batch_size} blocks x {cfg.rollout_len} scored tokens, "
          f"torch threads={torch.get_num_threads()}\n")
    print("| method | scored tokens/s | s per batch |")
    print("|---|---|---|")
    for name, s in seconds.items():
        print(f"| {name} | {tokens / s:.1f} | {s / args.batches:.2f} |")
    print(f"| (shared dense prefill) | | {prefill_s / args.batches:.2f} |")


if __name__ == "__main__":
    main()
