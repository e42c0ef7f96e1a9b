#!/bin/bash
# Choosing on dev (the dev tail of valid.txt; never test): 2 batches x 32 sequences per point, 4 random trials.
set -euo pipefail
cd "$(dirname "$0")/../.."
SEED=${SEED:-1234}
for P in ${POINTS:-0.5 0.7 0.9}; do
  python eval_perplexity.py --ckpt_dir results/prune_feedback/ckpt_seed$SEED --split dev --eval_batches 2 \
    --batch_size 32 --tgt_prune_keep $P --num_trials 4 --no_progress --csv_path results/prune_feedback/dev_ppl.csv \
    2>/dev/null | grep -E "^(policy|fixed|random |delta)" | sed "s/^/seed $SEED rho $P: /"
done
