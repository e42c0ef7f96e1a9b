"""Per-step decode latency of the controlled LM: dense vs each sparsity criterion with pruning and quantization.

    python benchmarks/bench_decode_step.py                       # SmolLM2-135M, B in {1, 16}, ctx in {256, 1024}
    python benchmarks/bench_decode_step.py --model tiny-random-llama --steps 5

Each cell is the median over `--steps` single-token decode steps on a prefilled cache (the cache is cropped
back after every step, so every step sees the same length). "dense" is the unmodified model (SDPA);
the controlled rows use κ=0.5, s60 (keep 60% of MLP input channels) and q8 on every row.
Run it alone: on 2 cores a second heavy process distorts the numbers badly.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from utils.actions import ActionSpace  # noqa: E402
from utils.lm import ControlledLM  # noqa: E402
from utils.model import load_lm  # noqa: E402


def time_steps(lm: ControlledLM, cache, ids: torch.Tensor, actions: torch.Tensor | None, steps: int) -> float:
    """Median wall time (ms) of one decode step."""
    times = []
    for i in range(steps + 1):  # first step is a warm-up
        t0 = time.perf_counter()
        lm.step(cache, ids, actions)
        dt = time.perf_counter() - t0
        cache.crop(-1)
        if i:
            times.append(dt * 1e3)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="model_name (default: the embedded SmolLM2-135M)")
    p.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 16], help="rows per decode step")
    p.add_argument("--contexts", type=int, nargs="+", default=[256, 1024], help="prefilled cache lengths")
    p.add_argument("--steps", type=int, default=20, help="timed steps per cell (median reported)")
    p.add_argument("--page_size", type=int, default=4, help="QUEST page size")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_lm(args.model)
    acts = ActionSpace.build([0.5, 1.0], ["s60", "s100"], ["q8", "q16"])
    a_idx = acts.index(0.5, 0.6, 8)
    rows = []
    gen = torch.Generator().manual_seed(0)
    for criteria in ("dense", "recency", "relevancy", "quest"):
        lm = ControlledLM(model, tok, acts, "recency" if criteria == "dense" else criteria, Ts=4, Tw=2,
                          page_size=args.page_size)
        for B in args.batch_sizes:
            for C in args.contexts:
                ctx = torch.randint(0, model.config.vocab_size, (B, C), generator=gen)
                cache, _, _ = lm.prefill(ctx)
                ids = torch.randint(0, model.config.vocab_size, (B,), generator=gen)
                actions = None if criteria == "dense" else torch.full((B,), a_idx)
                rows.append((criteria, B, C, time_steps(lm, cache, ids, actions, args.steps)))
    dense = {(B, C): ms for crit, B, C, ms in rows if crit == "dense"}
    print(f"\nDecode-step latency, {args.model}, torch threads={torch.get_num_threads()}, "
          f"median of {args.steps} steps; controlled rows: κ=0.5, s60, q8 (QUEST page {args.page_size})\n")
    print("| method | batch | context | ms/step | × dense |")
    print("|---|---|---|---|---|")
    for crit, B, C, ms in rows:
        print(f"| {crit} | {B} | {C} | {ms:.1f} | {ms / dense[(B, C)]:.2f} |")


if __name__ == "__main__":
    main()
