#!/bin/bash
# HellaSwag (first 1000 items of the shipped validation, 0-shot, acc_norm) for the price policy, seed 1234,
# with the fixed baseline at the policy's realised usage and the paired bootstrap interval on the accuracy
# difference (`policy_minus_fixed` in the JSON). ~13 min per method alone on the 2-core machine.
#   P=0.5 results/prune_price/downstream/run.sh
set -euo pipefail
cd "$(dirname "$0")/../../.."
P=${P:-0.5}
python eval_downstream.py --ckpt_dir results/prune_price/ckpt_seed1234 --tasks hellaswag_local --limit 1000 \
  --tgt_prune_keep $P --batch_size 32 --fixed_from_policy --no_progress \
  --export_sparsity_json results/prune_price/downstream/hellaswag1000_p${P/./p}.json
