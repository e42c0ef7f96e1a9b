#!/bin/bash
# How strong must the budget feedback be? The parity policy (trained WITHOUT feedback on test.txt, see
# results/parity_reference) scored with eval-time feedback on WikiText-2 valid.txt (never its training data,
# not the test split): realised prune keep and PPL vs matched fixed for a few gains and two requests.
set -euo pipefail
cd "$(dirname "$0")/../.."
# Then (second block of log.txt) gain 20 with the network's logits bounded to [-2, 2]: BOUND=2 GAINS=20 ./run.sh
for G in ${GAINS:-0 5 10 30}; do for P in 0.55 0.85; do
  python eval_perplexity.py --ckpt_dir results/parity_reference/seed1234 --dataset_name wikitext2_local \
    --split validation --eval_batches 4 --batch_size 16 --tgt_prune_keep $P --num_trials 0 --no_progress \
    --budget_feedback_gain $G --policy_logit_bound ${BOUND:-0} --csv_path results/feedback_gain_probe/valid_ppl.csv 2>/dev/null \
    | grep -E "^(policy|fixed |delta)" | sed "s/^/gain $G bound ${BOUND:-0} target $P: /"
done; done
