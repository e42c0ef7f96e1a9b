"""What does sharing QUEST's page selection within a KV group cost in quality? per_head vs per_kv_head.

    python benchmarks/check_quest_tier.py                          # every dev block, pages 4 and 16
    python benchmarks/check_quest_tier.py --blocks 32 --pages 4    # a quick look

`quest_tier: per_kv_head` lets gathered execution read only the kept fraction of the cache (with GQA a
per-head selection makes each KV head read the union of its query heads' pages), but it ranks pages by the
group's mean Quest bound instead of each head's own. This scores, on the same dev blocks and positions
(teacher-forced, the T decode positions after a dense prefill of C tokens, as eval_perplexity.py does), the
joint CPU config's LM with QUEST attention at a constant κ on every step (ρ = 1, 16 bits: attention only),
for both rankings and each page size, with the paired per-sequence bootstrap interval of the mean NLL
difference per_kv_head − per_head. Dev split only (never test): this informs a choice. Run it alone.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from utils.baselines import FixedScheduler  # noqa: E402
from utils.config import load_config  # noqa: E402
from utils.data import load_blocks  # noqa: E402
from utils.evaluation import evaluate_methods, paired_bootstrap_ci  # noqa: E402
from utils.lm import ControlledLM  # noqa: E402
from utils.model import load_lm  # noqa: E402
from utils.schedulers import DenseScheduler  # noqa: E402

JOINT = "official_configs/cpu_smollm2_joint.yml"
TIERS = ("per_head", "per_kv_head")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", type=int, default=0, help="dev blocks to score (default 0 = every full batch)")
    p.add_argument("--batch_size", type=int, default=32, help="sequences per batched forward (default 32)")
    p.add_argument("--kappas", type=float, nargs="+", default=[0.25, 0.5],
                   help="attention keep fractions, each run on every step (default 0.25 0.5)")
    p.add_argument("--pages", type=int, nargs="+", default=[4, 16], help="QUEST page sizes (default 4 16)")
    p.add_argument("--dtype", default="float32", help="LM dtype (default float32)")
    a = p.parse_args(argv)
    if not all(0 < k < 1 for k in a.kappas) or min(a.pages) < 1:
        p.error("--kappas must lie in (0, 1) and --pages be >= 1")
    grid = f"keep_fracs={sorted(set(a.kappas) | {1.0})}"  # each κ a level of the grid: no dither between levels
    cfg = load_config(JOINT, [f"dtype={a.dtype}", "sparsity_criteria=quest", grid])
    model, tok = load_lm(cfg.model_name, a.dtype, "cpu")
    blocks = load_blocks(cfg, tok, "dev")
    n = min(a.blocks or len(blocks), len(blocks)) // a.batch_size * a.batch_size
    if n == 0:
        p.error(f"fewer than one batch of {a.batch_size} dev blocks")
    blocks = blocks[:n]
    res = {}
    with tqdm(total=(1 + len(a.pages) * len(TIERS)) * n // a.batch_size, desc="episodes", unit="episode",
              file=sys.stderr) as bar:
        tick = lambda name: bar.update(1)  # noqa: E731
        lm = ControlledLM.from_config(cfg, model, tok)
        res["dense"] = evaluate_methods(lm, blocks, a.batch_size, None, {"dense": DenseScheduler()},
                                        (1.0, 1.0, 1.0), context_len=cfg.context_len, on_episode=tick)["dense"]
        for page in a.pages:
            for tier in TIERS:
                c = load_config(JOINT, [f"dtype={a.dtype}", "sparsity_criteria=quest", grid,
                                        f"quest_page_size={page}", f"quest_tier={tier}"])
                lm = ControlledLM.from_config(c, *load_lm(c.model_name, a.dtype, "cpu"))  # its own hooks
                methods = {f"k{k}": FixedScheduler((k, 1.0, 1.0)) for k in a.kappas}
                budgets = {f"k{k}": (k, 1.0, 1.0) for k in a.kappas}
                out = evaluate_methods(lm, blocks, a.batch_size, None, methods, budgets, context_len=c.context_len,
                                       rows_per_forward=len(methods) * a.batch_size,
                                       on_episode=lambda name: None)
                bar.update(n // a.batch_size)
                for k in a.kappas:
                    res[page, tier, k] = out[f"k{k}"]
    T = res["dense"].seq_len
    print(f"\n{n} WikiText-2 dev blocks x {T} scored positions = {n * T} tokens; context {cfg.context_len}; "
          f"QUEST on every decode step, ρ = 1, 16 bits; {a.dtype}\n")
    print(f"dense PPL {res['dense'].ppl:.3f}\n")
    print("| page | κ | PPL per_head | PPL per_kv_head | ΔNLL per_kv_head − per_head [95% CI] | "
          "keys attended per_head / per_kv_head |")
    print("|---|---|---|---|---|---|")
    for page in a.pages:
        for k in a.kappas:
            h, g = res[page, "per_head", k], res[page, "per_kv_head", k]
            lo, hi = paired_bootstrap_ci(g.nll, h.nll, seq_len=T)
            print(f"| {page} | {k} | {h.ppl:.3f} | {g.ppl:.3f} | {float((g.nll - h.nll).mean()):+.4f} "
                  f"[{lo:+.4f}, {hi:+.4f}] | {h.attn_keep:.3f} / {g.attn_keep:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
