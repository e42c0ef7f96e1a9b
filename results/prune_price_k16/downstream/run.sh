#!/bin/bash
# HellaSwag (first 1000 items of the shipped validation, 0-shot, acc_norm) for the shipped prune policy
# (results/prune_price_k16, seed 1234: the config's own seed, what `make train` trains), with the fixed baseline
# at the policy's realised usage and the paired bootstrap 95% interval over items on the accuracy difference
# (`policy_minus_fixed` in the JSON). ~5 min per method alone on the 2-core machine (measured 2026-12-06).
#   P=0.5 results/prune_price_k16/downstream/run.sh
#   P=0.8 results/prune_price_k16/downstream/run.sh
set -euo pipefail
cd "$(dirname "$0")/../../.."
P=${P:-0.5}
D=results/prune_price_k16/downstream
python eval_downstream.py --ckpt_dir results/prune_price_k16/ckpt_seed1234 --tasks hellaswag_local --limit 1000 \
  --tgt_prune_keep $P --batch_size 32 --fixed_from_policy --no_progress \
  --export_sparsity_json $D/hellaswag1000_p${P/./p}.json 2>&1 | tee $D/hellaswag1000_p${P/./p}_log.txt
