"""Is bfloat16 good enough as the frozen base? Dense, fixed and policy perplexity in float32 vs bfloat16.

    python benchmarks/check_dtype.py                                   # full WikiText-2 test split
    python benchmarks/check_dtype.py --blocks 64 --batch_size 32       # a quick look

For each LM dtype, on the same test blocks and positions (teacher-forced, the T decode positions of each
block after a dense prefill of C tokens, as eval_perplexity.py scores them), three methods through the shared
episode engine:

* dense;
* the fixed baseline of the prune CPU config at rho = `--rho` (s40/s100 dither, MLP channel top-k);
* the fixed baseline of the joint CPU config at (kappa, rho, bits) = `--joint` (QUEST pages, channel top-k and
  fake quantization together);
* with `--ckpt_dir` (default: the shipped prune headline policy), that policy at rho = `--rho` (argmax).

It prints PPL per dtype, the paired per-sequence bootstrap interval of the mean NLL difference (bf16 − fp32),
and the realised usage of each method in each dtype (top-k ties, which bfloat16 makes more frequent, keep
more than the nominal count). The policy network itself always runs in float32. Run it alone.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from utils.baselines import FixedScheduler  # noqa: E402
from utils.config import load_config  # noqa: E402
from utils.data import load_blocks  # noqa: E402
from utils.checkpoint import load_policy_eval  # noqa: E402
from utils.evaluation import evaluate_methods, paired_bootstrap_ci  # noqa: E402
from utils.lm import ControlledLM  # noqa: E402
from utils.model import load_lm  # noqa: E402
from utils.schedulers import DenseScheduler, PolicyScheduler  # noqa: E402

PRUNE = "official_configs/cpu_smollm2_prune.yml"
JOINT = "official_configs/cpu_smollm2_joint.yml"


def run_dtype(dtype: str, blocks, a, tick) -> dict:
    """method -> MethodResult, for one LM dtype (the prune methods share each batch's prefill)."""
    if a.ckpt_dir:  # the policy's own config (same s40/s100 grid as the prune config) drives the prune methods
        prune_cfg, lm, policy = load_policy_eval(a.ckpt_dir, overrides={"dtype": dtype}, device="cpu")
    else:
        prune_cfg = load_config(PRUNE, [f"dtype={dtype}"])
        model, tok = load_lm(prune_cfg.model_name, dtype, "cpu")
        lm, policy = ControlledLM.from_config(prune_cfg, model, tok), None
    methods = {"dense": DenseScheduler(), "fixed_prune": FixedScheduler((1.0, a.rho, 1.0))}
    budgets = {"dense": (1.0, 1.0, 1.0), "fixed_prune": (1.0, a.rho, 1.0)}
    if policy is not None:
        methods["policy_prune"] = PolicyScheduler(policy, 1.0, greedy=True)
        budgets["policy_prune"] = (1.0, a.rho, 1.0)
    out = evaluate_methods(lm, blocks, a.batch_size, None, methods, budgets, context_len=prune_cfg.context_len,
                           rows_per_forward=len(methods) * a.batch_size, on_episode=tick)  # all in one forward
    joint_cfg = load_config(JOINT, [f"dtype={dtype}"])
    jlm = ControlledLM.from_config(joint_cfg, *load_lm(joint_cfg.model_name, dtype, "cpu"))  # its own hooks
    k, r, b = a.joint
    out.update(evaluate_methods(jlm, blocks, a.batch_size, None, {"fixed_joint": FixedScheduler((k, r, b / 16))},
                                (k, r, b / 16), context_len=joint_cfg.context_len, on_episode=tick))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", type=int, default=0, help="test blocks to score (0 = every full batch of the split)")
    p.add_argument("--batch_size", type=int, default=64, help="sequences per batched forward (default 64)")
    p.add_argument("--rho", type=float, default=0.6, help="prune keep of the fixed prune baseline (default 0.6)")
    p.add_argument("--joint", type=float, nargs=3, default=(0.5, 0.6, 7.0), metavar=("KAPPA", "RHO", "BITS"),
                   help="targets of the fixed joint baseline (default 0.5 0.6 7)")
    p.add_argument("--ckpt_dir", default="results/ckpt_prune_bc_cal",
                   help="a prune policy to score at --rho in both dtypes ('' to skip)")
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated; the first is the reference")
    a = p.parse_args(argv)
    cfg = load_config(PRUNE)
    _, tok = load_lm(cfg.model_name, "float32", "cpu")
    blocks = load_blocks(cfg, tok, "test")
    n = (a.blocks or len(blocks)) // a.batch_size * a.batch_size
    if n == 0:
        p.error(f"fewer than one batch of {a.batch_size} blocks")
    blocks = blocks[:n]
    dtypes = a.dtypes.split(",")
    res, secs = {}, {}
    per_dtype = n // a.batch_size * (3 + bool(a.ckpt_dir))
    with tqdm(total=per_dtype * len(dtypes), desc="episodes", unit="episode", file=sys.stderr) as bar:
        for d in dtypes:
            t0 = time.perf_counter()
            res[d] = run_dtype(d, blocks, a, lambda name: bar.update(1))
            secs[d] = time.perf_counter() - t0
    ref = dtypes[0]
    T = res[ref]["dense"].seq_len
    print(f"\n{n} WikiText-2 test blocks x {T} scored positions = {n * T} tokens; batch {a.batch_size}; "
          f"fixed prune rho {a.rho}, fixed joint {tuple(a.joint)}; policy {a.ckpt_dir or '-'}\n")
    print("| method | dtype | PPL | ΔNLL vs " + ref + " [95% CI] | realised κ / ρ / bits | keys attended | "
          "channels kept |")
    print("|---|---|---|---|---|---|---|")
    for m in res[ref]:
        for d in dtypes:
            r = res[d][m]
            if d == ref:
                delta = "-"
            else:
                lo, hi = paired_bootstrap_ci(r.nll, res[ref][m].nll, seq_len=T)
                delta = f"{float((r.nll - res[ref][m].nll).mean()):+.4f} [{lo:+.4f}, {hi:+.4f}]"
            u = r.usage
            print(f"| {m} | {d} | {r.ppl:.3f} | {delta} | {u[0]:.3f} / {u[1]:.3f} / {16 * u[2]:.2f} | "
                  f"{r.attn_keep:.4f} | {r.channel_keep:.4f} |")
    print("\nwall time: " + ", ".join(f"{d} {secs[d]:.0f} s" for d in dtypes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
