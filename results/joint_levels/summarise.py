"""Summarise a joint results directory's test (or dev) sweeps into a markdown table (issue 15's joint criterion):
    python results/joint_levels/summarise.py results/joint_levels [test|dev]
Per seed and requested (κ, ρ, bits): realised usage per axis, policy / fixed / fixed_ref / random PPL, and ΔNLL vs
matched fixed with its paired 95% interval."""
import csv
import sys
from pathlib import Path

here = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent
kind = sys.argv[2] if len(sys.argv) > 2 else "test"
files = sorted(here.glob(f"{kind}_ppl_seed*.csv"))
if not files:
    sys.exit(f"no {kind}_ppl_seed*.csv in {here}")
print("| seed | requested κ / ρ / bits | realised κ / ρ / bit ratio | policy PPL | fixed | fixed_ref | random mean (best) "
      "| ΔNLL vs fixed [95% CI] |")
print("|---|---|---|---|---|---|---|---|")
for f in files:
    seed = f.stem.split("seed")[-1]
    for r in csv.DictReader(open(f)):
        rnd = f"{float(r['random_ppl_mean']):.2f} ({float(r['random_ppl_best']):.2f})" if r.get("random_ppl_mean") else "n/a"
        print(f"| {seed} | {float(r['target_keep']):g} / {float(r['target_prune_keep']):g} / {int(float(r['target_quant_bits']))} "
              f"| {float(r['policy_keep']):.3f} / {float(r['policy_prune_keep']):.3f} / {float(r['policy_quant_ratio']):.3f} "
              f"| {float(r['policy_ppl']):.2f} | {float(r['fixed_ppl']):.2f} | {float(r['fixed_ref_ppl']):.2f} | {rnd} "
              f"| {float(r['delta_nll_mean']):+.3f} [{float(r['delta_nll_lo']):+.3f}, {float(r['delta_nll_hi']):+.3f}] |")
