#!/bin/bash
# Score a parity run as the reference scored its own (issue 15, item 0): the first 2,000 lines of valid.txt
# (the layout's "test" file), 16 batches x 16 sequences x 16 steps, requested 0.55 / 0.70 / 0.85,
# 4 random seeds; fixed and fixed_ref at the policy's realised usage.
set -euo pipefail
cd "$(dirname "$0")/../.."
SEED=${SEED:-1234}
for P in ${POINTS:-0.55 0.70 0.85}; do
  python eval_perplexity.py --ckpt_dir results/parity_reference/seed$SEED --split test --eval_batches 16 \
    --batch_size 16 --tgt_prune_keep $P --num_trials 4 --no_progress \
    --csv_path results/parity_reference/test_ppl.csv | tee -a results/parity_reference/eval_seed$SEED.log
done
