"""One decode step of the SOL policy network at small batch: the budget-only logit terms (the budget head and
the knob offsets) recomputed at every step, against computed once per episode as `PolicyScheduler` does.

    python benchmarks/bench_policy_step.py                 # the shipped prune policy, batch 1, 2 threads
    python benchmarks/bench_policy_step.py --batch 4 --threads 1

Same process, shuffled order per round, median over rounds; each timed call runs a 16-step episode of the
policy alone (its weights stay in cache, unlike inside an LM decode step, where the LM's weights stream
through: `bench_gathered.py`'s policy table measures the share there). Run it alone on the machine.
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--ckpt_dir", default="results/prune_price_k16/ckpt_seed1234", help="policy checkpoint or export")
    p.add_argument("--batch", type=int, default=1, help="rows per step (default 1)")
    p.add_argument("--steps", type=int, default=16, help="policy steps per episode (default 16, the rollout length)")
    p.add_argument("--rounds", type=int, default=15, help="rounds, each timing both ways once (default 15)")
    p.add_argument("--episodes", type=int, default=10, help="episodes per timed call (default 10)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--execution", choices=["simulated", "gathered"], default="simulated",
                   help="load the policy as that execution does (gathered: every Linear on the native every-row "
                        "loop, `gathered.gemv_linear`; default simulated)")
    a = p.parse_args()
    if min(a.batch, a.steps, a.rounds, a.episodes, a.threads) < 1:
        p.error("--batch, --steps, --rounds, --episodes and --threads must be >= 1")
    from utils.checkpoint import load_policy_eval
    from utils.cli import SOLError
    from utils.records import StepScalars

    torch.set_num_threads(a.threads)
    try:
        _, _, policy = load_policy_eval(a.ckpt_dir, "latest", {"dtype": "float32"}, trust=False,
                                       execution=a.execution)
    except (SOLError, OSError) as e:
        sys.exit(f"error: {e}")
    g = torch.Generator().manual_seed(0)
    h, e = torch.randn(a.batch, policy.h_dim, generator=g), torch.randn(a.batch, policy.e_dim, generator=g)
    scalars = torch.rand(a.batch, StepScalars.DIM, generator=g)
    terms = policy.budget_terms(StepScalars.budgets(scalars))

    def episode(once: bool) -> None:
        state = policy.init_state(a.batch)
        for _ in range(a.steps):
            logits, state = policy.step(h, e, scalars, state, 0.6, terms if once else None)
            state = state.with_action(logits.argmax(-1))

    ms = {False: [], True: []}
    with torch.inference_mode():
        for once in (False, True):  # warm-up
            episode(once)
        for _ in range(a.rounds):
            for once in random.sample([False, True], 2):
                t0 = time.perf_counter()
                for _ in range(a.episodes):
                    episode(once)
                ms[once].append((time.perf_counter() - t0) / (a.episodes * a.steps) * 1e3)
    per, once = statistics.median(ms[False]), statistics.median(ms[True])
    print(f"\nPolicy decode step ({a.ckpt_dir}), {a.execution} execution, batch {a.batch}, {a.threads} threads, "
          f"median of {a.rounds} rounds\n")
    print("| budget-only logit terms | ms per step | × per step |")
    print("|---|---|---|")
    print(f"| every step | {per:.3f} | 1.00 |")
    print(f"| once per episode | {once:.3f} | {once / per:.2f} |")


if __name__ == "__main__":
    main()
