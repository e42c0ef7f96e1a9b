"""Downstream accuracy (lm-evaluation-harness) of a trained SOL policy, with matched fixed / dense baselines.

    python eval_downstream.py --ckpt_dir results/ckpt_joint --tasks hellaswag_local --limit 200 \\
        --tgt_keep 0.5 --tgt_prune_keep 0.7 --tgt_quant_bits 8 --fixed_from_policy \\
        --export_sparsity_json results/downstream/policy_k0p5_p0p7_b8.json
    python eval_downstream.py --ckpt_dir results/ckpt_joint --only_dense --tasks hellaswag_local --limit 200

Every continuation token is scored by one controlled decode step (policy / fixed / dense actions) after a
dense prefill of the context, with a dense episode replay every `--episode_len` tokens (utils/runtime.py,
utils/lm_eval_adapter.py). Flow (as the reference repository's downstream evaluation): the policy at the requested targets; with
`--fixed_from_policy` the fixed baseline (content-blind two-level dither) matched to the policy's global
realised averages (κ̄, ρ̄/P_MAX, bits/16 over all effective steps); with `--dense_baseline` also the dense
model (added beside the other blocks, the reference dropped the fixed block). With the fixed baseline, the
JSON also holds `policy_minus_fixed`: per task, the mean per-item accuracy difference with a paired bootstrap
95% interval over the items (both methods scored the same items). `--only_dense` runs the dense
model alone. Accuracy per task = acc_norm, else acc, else exact_match (reference order).
`--stochastic_policy` samples the policy's actions (seeded by --seed) for log-likelihood tasks too (the
reference always used argmax there).

Tasks: our shipped configs in tasks/ (hellaswag_local: HellaSwag validation from data/, offline;
tiny_mc_local) and every lm-eval task name (those download their data, so they need the network).
`--export_sparsity_json PATH` writes the key metrics to PATH itself (the reference wrote key_metrics_NAME).
`--batch_size N`: up to N continuations are decoded together, one row each: rows whose contexts have the
same token length, the choices of one item kept together (no padding). Rows do not interact, so scores
depend on N only through float noise of batched kernels, which a discrete choice at a threshold can
occasionally amplify; the fixed baseline dithers across the rows of a step as well as over time. Keep N
fixed across runs you compare. Memory grows with N × context length (the KV cache of every row).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from utils.cli import OneLineErrorParser, SOLError, UsageError, check_output_file, need


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from utils.runtime import add_policy_args

    p = OneLineErrorParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_policy_args(p)
    p.add_argument("--tasks", default="hellaswag_local",
                   help="comma-separated task names: tasks/ configs (hellaswag_local, tiny_mc_local) or lm-eval's own")
    p.add_argument("--batch_size", type=int, default=32,
                   help="continuations decoded together as one batch, from contexts of equal token length "
                        "(default 32: 8 HellaSwag items)")
    p.add_argument("--limit", type=float, default=None,
                   help="documents per task (an integer), or a fraction of each task if < 1")
    p.add_argument("--num_fewshot", type=int, default=0, help="few-shot examples (default 0)")
    p.add_argument("--max_gen_toks", type=int, default=256,
                   help="generation length for generate_until tasks that do not set max_gen_toks")
    p.add_argument("--fixed_from_policy", action="store_true",
                   help="also run the fixed baseline at the policy's realised average usage")
    p.add_argument("--dense_baseline", action="store_true", help="also run the dense model")
    p.add_argument("--only_dense", action="store_true", help="run the dense model only")
    p.add_argument("--export_sparsity_json", metavar="PATH", help="write the key-metrics JSON here")
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def _check_args(a: argparse.Namespace) -> list[str]:
    from utils.runtime import check_policy_args

    check_policy_args(a)
    check_output_file("--export_sparsity_json", a.export_sparsity_json)
    need(a.batch_size >= 1, f"--batch_size must be >= 1, got {a.batch_size}")
    need(a.num_fewshot >= 0, f"--num_fewshot must be >= 0, got {a.num_fewshot}")
    need(a.max_gen_toks >= 1, f"--max_gen_toks must be >= 1, got {a.max_gen_toks}")
    if a.limit is not None:
        need(a.limit > 0, f"--limit must be > 0, got {a.limit}")
        need(a.limit < 1 or float(a.limit).is_integer(), f"--limit must be an integer or a fraction < 1, got {a.limit}")
        a.limit = a.limit if a.limit < 1 else int(a.limit)
    tasks = [t.strip() for t in a.tasks.split(",") if t.strip()]
    need(bool(tasks), "--tasks is empty")
    return tasks


def _quiet_lm_eval() -> None:
    """Drop lm-eval's per-task 'Custom kwargs can be passed to --metadata' notice (our tasks load local
    files through custom_dataset) and the datasets map bars; keep everything else."""
    class _Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "Custom kwargs can be passed" not in record.getMessage()

    for name in ("lm_eval", "lm_eval.api.task"):
        logging.getLogger(name).addFilter(_Drop())
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:
        pass


def _write_json(path: str, payload: dict) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    from utils.io import atomic_write

    atomic_write(p, lambda f: json.dump(payload, f, indent=2))


def key_block(harness, acc: dict, seconds: float) -> dict:
    """The key-metrics block of one run (averages over effective steps, as the reference)."""
    s = harness.tracker.summary()
    k, p, q = s["keep_avg_eff"], s["prune_avg_eff"], s["quant_ratio_avg_eff"]
    return {
        "accuracy": {"macro": acc["macro"], "per_task": acc["per_task"], "metric": acc["metric"]},
        "token_keep_avg": k, "token_sparsity_avg": 1.0 - k,
        "prune_keep_avg": p, "prune_rate_avg": 1.0 - p,
        "quant_ratio_avg": q, "avg_bits": 16.0 * q,
        "net_keep": (k + p + q) / 3.0,
        "attn_keep_realised": s["attn_keep_realised_eff"],
        "channel_keep_realised": s["channel_keep_realised_eff"],
        "flops_ratio": s["flops_ratio"],
        "n_steps": s["n_steps"], "effective_steps": s["effective_steps"], "n_requests": s["n_requests"],
        "episodes": s["episodes"], "dense_refreshes": s["dense_refreshes"],
        "targets": {"keep": harness.budgets[0], "prune_keep": harness.budgets[1], "quant_ratio": harness.budgets[2]},
        "episode_len": harness.episode_len,
        "action_hist": s["action_hist"],
        "seconds": round(seconds, 2),
    }


def _summary_line(name: str, block: dict) -> str:
    acc = block["accuracy"]
    tasks = "  ".join(f"{t} {v:.4f}" for t, v in acc["per_task"].items())
    macro = f"{acc['macro']:.4f}" if acc["macro"] is not None else "n/a"
    return (f"{name:<15} macro {macro}  [{tasks}]  keep {block['token_keep_avg']:.3f}  "
            f"prune_keep {block['prune_keep_avg']:.3f}  quant_ratio {block['quant_ratio_avg']:.3f}  "
            f"attn_keep(realised) {block['attn_keep_realised']:.3f}  FLOPs {block['flops_ratio']:.3f}x dense  "
            f"steps {block['n_steps']}")


class TaskDataError(SOLError, RuntimeError):
    """A task whose data could not be loaded (one line)."""


def run_harness(harness, tasks: list[str], tm, a: argparse.Namespace) -> tuple[dict, dict, float]:
    import lm_eval
    from lm_eval.utils import make_table

    from utils.lm_eval_adapter import accuracy_summary, item_scores

    t0 = time.time()
    try:
        res = lm_eval.simple_evaluate(
            model=harness, tasks=tasks, num_fewshot=a.num_fewshot, batch_size=a.batch_size, limit=a.limit,
            task_manager=tm, log_samples=True, random_seed=a.seed, numpy_random_seed=a.seed,
            torch_random_seed=a.seed, fewshot_random_seed=a.seed, confirm_run_unsafe_code=True)
    except (ConnectionError, OSError, FileNotFoundError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise TaskDataError(f"cannot load the data of {', '.join(tasks)} ({msg}); offline, use a tasks/ config "
                            "such as hellaswag_local") from None
    seconds = time.time() - t0
    print(make_table(res))
    acc = accuracy_summary(res)
    acc["items"] = item_scores(res, acc["metric"])
    return res, acc, seconds


def paired_difference(a: dict, b: dict, seed: int, n_boot: int = 2000) -> dict:
    """Per task: mean per-item accuracy difference a − b over the same items with a paired bootstrap 95%
    interval (items resampled), e.g. policy vs the fixed baseline at its realised usage."""
    import torch

    from utils.evaluation import paired_bootstrap_ci

    out = {}
    for task, xa in a["items"].items():
        xb = b["items"].get(task)
        if xb is None or len(xb) != len(xa):
            continue
        ta, tb = torch.tensor(xa, dtype=torch.float64), torch.tensor(xb, dtype=torch.float64)
        lo, hi = paired_bootstrap_ci(ta, tb, n_boot=n_boot, seed=seed)
        out[task] = {"diff": float((ta - tb).mean()), "lo": lo, "hi": hi, "n_items": len(xa),
                     "metric": a["metric"][task]}
    return out


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    known = (SOLError, OSError)
    try:
        tasks = _check_args(a)
        from utils.lm_eval_adapter import SOLHarnessLM, TaskNameError, make_task_manager
        from utils.cli import checkpoint_overrides
        from utils.runtime import UsageTracker, load_eval_bundle, make_scheduler, resolve_policy_settings

        try:
            tm = make_task_manager(tasks)
        except TaskNameError as e:
            raise UsageError(str(e)) from None
        _quiet_lm_eval()
        b = load_eval_bundle(a.ckpt_dir, a.mode, a.device, a.trust_checkpoint, execution=a.execution,
                             overrides=checkpoint_overrides(a))
        budgets, biases, E = resolve_policy_settings(a, b.cfg)
        lm = b.lm
        common = dict(batch_size=a.batch_size, max_gen_toks=a.max_gen_toks, progress=not a.no_progress, seed=a.seed)

        def harness(kind: str, bud, **kw) -> SOLHarnessLM:
            sched = make_scheduler(kind, lm, b.policy, policy_temperature=a.policy_temperature,
                                   greedy=a.greedy_policy, seed=a.seed, biases=biases, **kw)
            return SOLHarnessLM(lm, sched, bud, E, tracker=UsageTracker(lm.actions.tags), name=kind, **common)

        out: dict = {}

        def export() -> None:
            if a.export_sparsity_json:
                _write_json(a.export_sparsity_json, out)

        print(f"checkpoint {b.ckpt_path}  model {b.cfg.model_name}  tasks {','.join(tasks)}  episode_len {E}  "
              f"limit {a.limit}  num_fewshot {a.num_fewshot}  execution {a.execution}", flush=True)
        if a.only_dense:
            h = harness("dense", (1.0, 1.0, 1.0))
            _, acc, sec = run_harness(h, tasks, tm, a)
            out["dense_baseline"] = key_block(h, acc, sec)
            export()
        else:
            print(f"policy targets: keep {budgets[0]:.3f}  prune_keep {budgets[1]:.3f}  quant_ratio {budgets[2]:.3f} "
                  f"({16 * budgets[2]:.2f} bits)  biases {biases}  greedy {a.greedy_policy}", flush=True)
            h = harness("policy", budgets)
            _, acc, sec = run_harness(h, tasks, tm, a)
            out["policy"] = key_block(h, acc, sec)
            export()
            policy_acc = acc
            if a.fixed_from_policy:
                tgt = h.tracker.realised_nominal
                print(f"fixed baseline at the policy's realised usage: keep {tgt[0]:.3f}  prune_keep {tgt[1]:.3f}  "
                      f"quant_ratio {tgt[2]:.3f}", flush=True)
                hf = harness("fixed", tgt, fixed_targets=tgt)
                _, acc, sec = run_harness(hf, tasks, tm, a)
                out["fixed_baseline"] = key_block(hf, acc, sec)
                out["policy_minus_fixed"] = paired_difference(policy_acc, acc, a.seed)
                for task, d in out["policy_minus_fixed"].items():
                    print(f"{task}: policy - fixed accuracy {d['diff']:+.4f}, paired 95% CI [{d['lo']:+.4f}, "
                          f"{d['hi']:+.4f}] over {d['n_items']} items", flush=True)
                export()
            if a.dense_baseline:
                hd = harness("dense", (1.0, 1.0, 1.0))
                _, acc, sec = run_harness(hd, tasks, tm, a)
                out["dense_baseline"] = key_block(hd, acc, sec)
                export()
    except known as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print()
    for name, block in out.items():
        if "accuracy" in block:  # a method's key metrics (policy_minus_fixed is a comparison)
            print(_summary_line(name, block))
    if a.export_sparsity_json:
        print(f"key metrics: {a.export_sparsity_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
