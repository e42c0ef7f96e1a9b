"""Teacher-forced perplexity of a trained SOL policy against dense, fixed and random baselines.

    python eval_perplexity.py --ckpt_dir results/ckpt_joint --tgt_keep 0.5 --tgt_prune_keep 0.7 \\
        --tgt_quant_bits 8 --num_trials 4 --csv_path results/ppl_eval.csv

Flow (as the reference repository's perplexity evaluation): the policy (argmax, temperature 0.6) decodes the held-out blocks at the requested
targets; then dense, fixed (deterministic two-level dither), fixed_ref (the reference's row pattern for the
same counts), random (count-matched random placement, N trials with seeds seed+i) and optionally the EMC/DAC heuristics run on the same blocks at the policy's
*realised* average usage (κ̄, ρ̄/P_MAX, q̄ = bits/16). One line per method on stdout, one CSV row per
invocation (appended; header written once). The logic lives in utils/evaluation.py and utils/baselines.py.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

from utils.cli import (OneLineErrorParser, SOLError, UsageError, add_checkpoint_flags, add_target_flags, check_finite,
                       check_mode, check_output_file, check_targets, checkpoint_overrides)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = OneLineErrorParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_flags(p)
    p.add_argument("--dataset_name", help="data source (default: the checkpoint config's, i.e. shipped WikiText-2)")
    p.add_argument("--dataset_config", help="datasets config name for a hub dataset (e.g. wikitext-2-raw-v1)")
    p.add_argument("--split", default="test", help="split to evaluate (default test; train/dev/validation)")
    p.add_argument("--eval_batches", type=int, default=7, help="number of batches (default 7, as the reference)")
    p.add_argument("--batch_size", type=int, default=16, help="sequences per batch (default 16)")
    add_target_flags(p)
    p.add_argument("--num_trials", type=int, default=1, help="random-baseline trials, seeds seed..seed+N-1 (0: none)")
    p.add_argument("--seed", type=int, default=1234, help="first random-baseline seed (default 1234)")
    p.add_argument("--sparsity_bias", type=float,
                   help="policy logit bias against high κ (default: cfg eval_sparsity_bias, 0)")
    p.add_argument("--prune_bias", type=float,
                   help="policy logit bias against high ρ (default: cfg eval_prune_bias, 0)")
    p.add_argument("--quant_bias", type=float,
                   help="policy logit bias against high bits (default: cfg eval_quant_bias, 0)")
    p.add_argument("--policy_temperature", type=float, default=0.6, help="policy logit temperature (reference 0.6)")
    p.add_argument("--stochastic_policy", action="store_true",
                   help="sample the policy's actions at --policy_temperature (seeded by --seed) instead of argmax")
    p.add_argument("--do_emc_and_driftaware", action="store_true",
                   help="also run the entropy (EMC) and hidden-drift (DAC) heuristic controllers")
    p.add_argument("--gamma", type=float, default=0.35, help="EMC/DAC signal strength (default 0.35)")
    p.add_argument("--csv_path", help="append one row of results to this CSV")
    p.add_argument("--device", help="cpu, cuda, cuda:N (default: the checkpoint config's device, auto)")
    p.add_argument("--rows_per_forward", type=int,
                   help="decode this many rows per batched forward: methods (policy, dense, each baseline) run "
                        "side by side, floor(N / batch_size) at a time; 0 = one method per forward (default: the "
                        "checkpoint config's rollout_rows_per_forward, 128). Same numbers to float rounding")
    p.add_argument("--keep_prefill_mb", type=float, default=2048.0,
                   help="memory for reusing the policy's prefills in the baseline phase (others are recomputed)")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def _check_args(a: argparse.Namespace) -> None:
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise UsageError(msg)

    check_targets(a.tgt_keep, a.tgt_prune_keep, a.tgt_quant_bits)
    check_output_file("--csv_path", a.csv_path)
    check_finite({n: getattr(a, n) for n in ("sparsity_bias", "prune_bias", "quant_bias", "gamma",
                                             "keep_prefill_mb")})
    need(a.eval_batches >= 1, f"--eval_batches must be >= 1, got {a.eval_batches}")
    need(a.batch_size >= 1, f"--batch_size must be >= 1, got {a.batch_size}")
    need(a.num_trials >= 0, f"--num_trials must be >= 0, got {a.num_trials}")
    need(a.policy_temperature > 0 and math.isfinite(a.policy_temperature),
         f"--policy_temperature must be > 0, got {a.policy_temperature}")
    need(a.gamma >= 0, f"--gamma must be >= 0, got {a.gamma}")
    checkpoint_overrides(a)
    need(a.keep_prefill_mb >= 0, f"--keep_prefill_mb must be >= 0, got {a.keep_prefill_mb}")
    need(a.rows_per_forward is None or a.rows_per_forward >= 0,
         f"--rows_per_forward must be >= 0, got {a.rows_per_forward}")
    check_mode(a.mode)
    need(os.path.isdir(a.ckpt_dir), f"checkpoint directory not found: {a.ckpt_dir}")


def _line(name: str, r) -> str:
    k, p, q = r.usage
    return (f"{name:<10} PPL {r.ppl:10.4f}  keep {k:.3f}  prune_keep {p:.3f}  quant_ratio {q:.3f}  "
            f"net_keep {r.net_keep:.3f}  attn_keep(realised) {r.attn_keep:.3f}  FLOPs {r.flops_ratio:.3f}x dense")


def _levels(name: str, r, actions) -> str:
    """Per-axis level shares of a method's steps, e.g. `κ 0.1:0.000 0.6:0.875 1:0.125`."""
    names = ([f"{k:g}" for k in actions.keep_values], [f"s{round(p * 100)}" for p in actions.prune_values],
             [f"q{b}" for b in actions.bit_values])
    axes = [f"{ax} " + " ".join(f"{n}:{s:.3f}" for n, s in zip(ns, shares.tolist()))
            for ax, ns, shares in zip(("κ", "ρ", "bits"), names, actions.level_shares(r.action_probs))]
    return f"{name + ' levels':<16} " + " | ".join(axes)


def run(a: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from utils.baselines import DACScheduler, EMCScheduler, FixedRefScheduler, FixedScheduler, RandomScheduler
    from utils.checkpoint import load_policy_eval
    from utils.config import eval_targets
    from utils.data import load_blocks
    from utils.evaluation import (append_csv_row, check_csv_header, evaluate_matched, fmt,
                                  method_cells, paired_bootstrap_ci)
    from utils.schedulers import DenseScheduler, PolicyScheduler

    t_start = time.time()
    if a.csv_path:
        check_csv_header(a.csv_path)  # fail before any work, not after
    cfg, lm, policy = load_policy_eval(a.ckpt_dir, a.mode, {"dataset_name": a.dataset_name,
                                                           "dataset_config": a.dataset_config,
                                                           **checkpoint_overrides(a)}, a.device,
                                       a.trust_checkpoint)
    tk, tp, tb = eval_targets(cfg, a.tgt_keep, a.tgt_prune_keep, a.tgt_quant_bits)
    biases = tuple(float(getattr(a, n) if getattr(a, n) is not None else getattr(cfg, f"eval_{n}"))
                   for n in ("sparsity_bias", "prune_bias", "quant_bias"))

    blocks = load_blocks(cfg, lm.tokenizer, a.split)
    n_full = len(blocks) // a.batch_size
    if n_full == 0:
        raise UsageError(f"split '{a.split}' has {len(blocks)} blocks, fewer than one batch of {a.batch_size}")
    n_batches = min(a.eval_batches, n_full)
    if n_batches < a.eval_batches:
        print(f"warning: split '{a.split}' has only {n_full} full batches of {a.batch_size}; evaluating {n_batches}",
              file=sys.stderr)

    seeds = [a.seed + i for i in range(a.num_trials)]
    per_batch = 2 + 2 + len(seeds) + (2 if a.do_emc_and_driftaware else 0)
    bar = tqdm(total=n_batches * per_batch, desc="eval", unit="episode", file=sys.stderr, disable=a.no_progress,
               dynamic_ncols=True)

    def baselines(targets):
        m = {"fixed": FixedScheduler(targets), "fixed_ref": FixedRefScheduler(targets)}
        for s in seeds:
            m[f"random_{s}"] = RandomScheduler(targets, seed=s)
        if a.do_emc_and_driftaware:
            m["emc"] = EMCScheduler(targets, gamma=a.gamma)
            m["dac"] = DACScheduler(targets, gamma=a.gamma)
        return m

    def tick(name: str) -> None:
        bar.set_postfix_str(name, refresh=False)
        bar.update(1)

    gen = torch.Generator(device=lm.device).manual_seed(a.seed) if a.stochastic_policy else None
    policy_sched = PolicyScheduler(policy, temperature=a.policy_temperature, greedy=not a.stochastic_policy,
                                   generator=gen, biases=biases, actions=lm.actions)
    try:
        res, targets = evaluate_matched(
            lm, blocks, a.batch_size, n_batches, {"policy": policy_sched, "dense": DenseScheduler()}, baselines,
            (tk, tp, tb / 16.0), context_len=cfg.context_len, keep_prefill_mb=a.keep_prefill_mb, on_episode=tick,
            rows_per_forward=cfg.rollout_rows_per_forward if a.rows_per_forward is None else a.rows_per_forward)
    finally:
        bar.close()

    pol, fixed, dense = res["policy"], res["fixed"], res["dense"]
    rand = [res[f"random_{s}"] for s in seeds]
    print(f"targets    keep {tk:.3f}  prune_keep {tp:.3f}  quant_bits {tb:g} (ratio {tb / 16:.3f}); "
          f"{pol.n_tokens} tokens ({n_batches} x {a.batch_size} sequences x {pol.seq_len} steps), split {a.split}")
    print(_line("policy", pol))
    print(f"matched    keep {targets[0]:.3f}  prune_keep {targets[1]:.3f}  quant_ratio {targets[2]:.3f} "
          "(baselines run at the policy's realised usage)")
    print(_line("dense", dense))
    print(_line("fixed", fixed))
    print(_line("fixed_ref", res["fixed_ref"]))
    print(_levels("policy", pol, lm.actions))
    print(_levels("fixed", fixed, lm.actions))
    for s, r in zip(seeds, rand):
        print(_line(f"random@{s}", r))
    for name in ("emc", "dac"):
        if name in res:
            print(_line(name, res[name]))
    lo, hi = paired_bootstrap_ci(pol.nll, fixed.nll, seed=a.seed, seq_len=pol.seq_len)
    d_mean = float((pol.nll - fixed.nll).mean())
    print(f"delta NLL policy - fixed: {d_mean:+.4f} nats/token, 95% CI [{lo:+.4f}, {hi:+.4f}] "
          f"(paired bootstrap over sequences)")
    ref = res["fixed_ref"]
    ref_lo, ref_hi = paired_bootstrap_ci(pol.nll, ref.nll, seed=a.seed, seq_len=pol.seq_len)
    ref_mean = float((pol.nll - ref.nll).mean())
    print(f"delta NLL policy - fixed_ref: {ref_mean:+.4f} nats/token, 95% CI [{ref_lo:+.4f}, {ref_hi:+.4f}]")
    if rand:
        best = min(rand, key=lambda r: r.ppl)
        print(f"random     PPL mean {sum(r.ppl for r in rand) / len(rand):.4f}  best {best.ppl:.4f} "
              f"over {len(rand)} trial(s)")

    if a.csv_path:
        row = {
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"), "ckpt_dir": a.ckpt_dir, "mode": a.mode,
            "dataset_name": cfg.dataset_name, "split": a.split, "eval_batches": n_batches, "batch_size": a.batch_size,
            "n_tokens": pol.n_tokens, "context_len": cfg.context_len, "rollout_len": cfg.rollout_len,
            "target_keep": fmt(float(tk)), "target_prune_keep": fmt(float(tp)), "target_quant_bits": fmt(float(tb)),
            **method_cells("policy", pol, realised=True),
            "policy_action_probs": "|".join(f"{p:.4f}" for p in pol.action_probs.tolist()),
            **method_cells("fixed", fixed, realised=True),
            **method_cells("fixed_ref", ref),
            "delta_nll_ref_mean": fmt(ref_mean), "delta_nll_ref_lo": fmt(ref_lo), "delta_nll_ref_hi": fmt(ref_hi),
            "dense_ppl": fmt(dense.ppl),
            "random_ppl_mean": fmt(sum(r.ppl for r in rand) / len(rand)) if rand else "",
            "random_ppl_best": fmt(min(r.ppl for r in rand)) if rand else "",
            "random_ppl_trials": "|".join(fmt(r.ppl) for r in rand),
            "random_seeds": "|".join(map(str, seeds)),
            **{f"random_{c}": fmt(sum(r.usage[i] for r in rand) / len(rand)) if rand else ""
               for i, c in enumerate(("keep", "prune_keep", "quant_ratio"))},
            "random_net_keep": fmt(sum(r.net_keep for r in rand) / len(rand)) if rand else "",
            "random_flops_ratio": fmt(sum(r.flops_ratio for r in rand) / len(rand)) if rand else "",
            **method_cells("emc", res.get("emc")), **method_cells("dac", res.get("dac")),
            "delta_nll_mean": fmt(d_mean), "delta_nll_lo": fmt(lo), "delta_nll_hi": fmt(hi),
            "action_tags": "|".join(lm.actions.tags), "sparsity_criteria": cfg.sparsity_criteria,
            "policy_temperature": fmt(float(a.policy_temperature)), "biases": "|".join(fmt(b) for b in biases),
            "seed": a.seed, "elapsed_s": fmt(round(time.time() - t_start, 1)),
        }
        append_csv_row(a.csv_path, {k: str(v) for k, v in row.items()})
        print(f"appended one row to {a.csv_path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    try:
        _check_args(a)  # cheap checks before the heavy imports
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        return run(a)
    except (SOLError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
