#!/bin/bash
# HellaSwag (first 1000 items of the shipped validation, 0-shot, acc_norm) for the price policy with its knob
# calibration (feedback gain 5 + results/prune_price_knob/knob_g5_seed$SEED.json), with the fixed baseline at the
# policy's realised usage and the paired bootstrap interval on the accuracy difference (`policy_minus_fixed` in
# the JSON). Same protocol as results/prune_price/downstream (gain 20), float32.
#   SEED=1234 P=0.5 results/prune_price_knob/downstream/run.sh
set -euo pipefail
cd "$(dirname "$0")/../../.."
P=${P:-0.5}
SEED=${SEED:-1234}
D=results/prune_price_knob/downstream
python eval_downstream.py --ckpt_dir results/prune_price/ckpt_seed$SEED --tasks hellaswag_local --limit 1000 \
  --tgt_prune_keep $P --batch_size 32 --fixed_from_policy --no_progress --dtype float32 \
  --knob_calibration results/prune_price_knob/knob_g5_seed$SEED.json \
  --export_sparsity_json $D/hellaswag1000_seed${SEED}_p${P/./p}.json 2>&1 | tee $D/hellaswag1000_seed${SEED}_p${P/./p}_log.txt
