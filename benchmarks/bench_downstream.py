"""Downstream (lm-eval) scoring throughput: HellaSwag items per second against the adapter's `batch_size`.

    python benchmarks/bench_downstream.py --ckpt_dir results/ckpt_prune --items 64 --batch_sizes 4 32 64

Scores the first `--items` HellaSwag validation items (4 choices each, hellaswag_local preprocessing,
0-shot) through `SOLHarnessLM.loglikelihood` with the policy (argmax) at `--targets`, once per batch size.
`batch_size` 4 decodes one item at a time (the adapter's packing before contexts of equal length were
batched together). Prints wall time, items/s, the speed-up over the first batch size, and how far the scores
move: max |Δ log p| against the first batch size and the fraction of items whose argmax choice changes
(float noise of batched kernels; see utils/lm_eval_adapter.py). Run it alone.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from utils.lm_eval_adapter import SOLHarnessLM, plan_batches  # noqa: E402
from utils.runtime import load_eval_bundle, make_scheduler  # noqa: E402


def hellaswag_requests(n: int) -> list[SimpleNamespace]:
    """lm-eval-style loglikelihood requests (args = (query, " " + ending)) for the first n items."""
    spec = importlib.util.spec_from_file_location("hs_local", ROOT / "tasks" / "hellaswag_local" / "utils.py")
    hs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hs)
    docs = [hs.process_doc(d) for d in hs.read_items(hs.data_file())[:n]]
    return [SimpleNamespace(args=(d["query"], " " + c)) for d in docs for c in d["choices"]]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt_dir", default="results/ckpt_prune", help="trained run directory (policy_latest.pt)")
    p.add_argument("--items", type=int, default=64, help="HellaSwag items scored per batch size")
    p.add_argument("--batch_sizes", type=int, nargs="+", default=[4, 32, 64], help="adapter batch sizes (rows)")
    p.add_argument("--targets", type=float, nargs=3, default=[1.0, 0.7, 1.0], metavar=("KEEP", "PRUNE", "QRATIO"),
                   help="requested usage (κ, ρ/P_MAX, bits/16)")
    args = p.parse_args(argv)
    b = load_eval_bundle(args.ckpt_dir)
    reqs = hellaswag_requests(args.items)
    rows = []
    print(f"{args.items} items ({len(reqs)} requests), checkpoint {b.ckpt_path}, targets {tuple(args.targets)}, "
          f"torch threads {torch.get_num_threads()}")
    print(f"{'batch_size':>10} {'batches':>8} {'seconds':>8} {'items/s':>8} {'speed-up':>8} {'max|dlogp|':>10} "
          f"{'choice changed':>14}")
    base = None
    for bs in args.batch_sizes:
        sched = make_scheduler("policy", b.lm, b.policy, seed=0)
        h = SOLHarnessLM(b.lm, sched, tuple(args.targets), b.cfg.rollout_len, batch_size=bs, progress=False)
        n_batches = len(plan_batches([h.encode_pair(*r.args) for r in reqs], bs))
        t0 = time.perf_counter()
        res = h.loglikelihood(reqs)
        sec = time.perf_counter() - t0
        logp = torch.tensor([r[0] for r in res]).reshape(args.items, 4)
        if base is None:
            base = (sec, logp)
        dmax = float((logp - base[1]).abs().max())
        changed = float((logp.argmax(1) != base[1].argmax(1)).float().mean())
        rows.append((bs, n_batches, sec))
        print(f"{bs:>10} {n_batches:>8} {sec:>8.1f} {args.items / sec:>8.2f} {base[0] / sec:>7.1f}x {dmax:>10.2e} "
              f"{changed:>14.3f}", flush=True)


if __name__ == "__main__":
    main()
