"""Summarise the per-seed test sweeps of a results directory (default results/prune_feedback; e.g.
`python results/prune_feedback/summarise.py results/prune_price`) into its summary.md (issue 15's success criteria).
A second argument names other sweeps of the same directory: `... results/prune_price_k16 test_full` reads
test_full_ppl_seed*.csv into summary_test_full.md.

Per requested ρ: realised keep (mean and spread over seeds), ΔNLL vs matched fixed per seed with its paired 95%
interval, how many seeds' intervals exclude zero, and the policy against best-of-N random, EMC, DAC, fixed_ref.
"""
import csv
import math
import statistics
import sys
from pathlib import Path

here = Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else Path(__file__).resolve().parent
prefix = sys.argv[2] if len(sys.argv) > 2 else "test"
runs = {p.stem.split("seed")[-1]: list(csv.DictReader(open(p)))
        for p in sorted(here.glob(f"{prefix}_ppl_seed*.csv"))}
if not runs:
    sys.exit(f"no {prefix}_ppl_seed*.csv yet")


def nll(ppl: str) -> float:
    return math.log(float(ppl))


lines = ["| requested ρ | realised (mean ± sd) | dense PPL | ΔNLL vs fixed per seed [95% CI] | CI < 0 | "
         "target (−min(0.05, 0.3·excess)) | vs best random | vs EMC | vs DAC | vs fixed_ref |",
         "|---|---|---|---|---|---|---|---|---|---|"]
points = sorted({r["target_prune_keep"] for rows in runs.values() for r in rows}, key=float)
for p in points:
    rows = [(s, r) for s, rs in runs.items() for r in rs if r["target_prune_keep"] == p]
    real = [float(r["policy_prune_keep"]) for _, r in rows]
    d = [(float(r["delta_nll_mean"]), float(r["delta_nll_lo"]), float(r["delta_nll_hi"])) for _, r in rows]
    excess = statistics.mean(nll(r["fixed_ppl"]) - nll(r["dense_ppl"]) for _, r in rows)
    target = -min(0.05, 0.3 * excess)

    def vs(col: str) -> str:
        v = [nll(r["policy_ppl"]) - nll(r[col]) for _, r in rows if r.get(col)]
        return " / ".join(f"{x:+.3f}" for x in v) if v else "n/a"

    lines.append(
        f"| {float(p):.2f} | {statistics.mean(real):.3f} ± {statistics.pstdev(real):.3f} | "
        f"{float(rows[0][1]['dense_ppl']):.2f} | "
        + " / ".join(f"{m:+.3f} [{lo:+.3f}, {hi:+.3f}]" for m, lo, hi in d)
        + f" | {sum(hi < 0 for _, _, hi in d)}/{len(d)} | {target:+.3f} | {vs('random_ppl_best')} | {vs('emc_ppl')} | "
        f"{vs('dac_ppl')} | {vs('fixed_ref_ppl')} |")
seeds = ", ".join(runs)
out = here / ("summary.md" if prefix == "test" else f"summary_{prefix}.md")
out.write_text(f"Seeds: {seeds} (one value per seed, in that order). ΔNLL in nats per token; negative = policy "
               "better.\n\n" + "\n".join(lines) + "\n")
print(out.read_text())
