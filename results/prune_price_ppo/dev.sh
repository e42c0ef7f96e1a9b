#!/bin/bash
# Choosing on dev (the 100-block dev tail of valid.txt; never test): 3 batches x 32 sequences x 16 steps per
# point, fixed, fixed_ref and 4 random trials at the policy's realised usage.
#   CKPT=results/prune_price_ppo/ckpt_seed1234 CSV=results/prune_price_ppo/dev_ppl.csv results/prune_price_ppo/dev.sh
#   FB="--budget_feedback_gain 20 --policy_logit_bound 2" ...  # feedback added at evaluation only
set -euo pipefail
cd "$(dirname "$0")/../.."
for P in ${POINTS:-0.5 0.7 0.9}; do
  python eval_perplexity.py --ckpt_dir "$CKPT" --split dev --eval_batches 3 --batch_size 32 --tgt_prune_keep $P \
    --num_trials 4 --no_progress --csv_path "$CSV" ${FB:-} 2>/dev/null \
    | grep -E "^(policy|fixed|random |delta)" | sed "s/^/${TAG:-} rho $P: /"
done
