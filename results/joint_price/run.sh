#!/bin/bash
# Joint GRPO policy with the per-step budget price on all three axes, two levels each
# (official_configs/cpu_smollm2_joint_price.yml), seed $SEED: train, export to results/joint_price/ckpt_seed$SEED,
# then the dev check (the 100-block dev tail of valid.txt; never test): 3 batches x 32 sequences x 16 steps at
# three points of the joint headline grid, fixed, fixed_ref and 4 random trials at the policy's realised
# usage, the integral feedback (gain 20) added at evaluation.
#   SEED=1234 results/joint_price/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
SEED=${SEED:-1234}
if [[ "${TRAIN:-1}" == 1 ]]; then
  python train.py --config official_configs/cpu_smollm2_joint_price.yml --set seed=$SEED \
    --output_dir checkpoints/joint_price_seed$SEED
  python -m utils.checkpoint export checkpoints/joint_price_seed$SEED results/joint_price/ckpt_seed$SEED
fi
for P in ${POINTS:-0.2,0.5,6 0.5,0.7,8 0.8,0.9,12}; do
  IFS=, read -r K R Q <<< "$P"
  python eval_perplexity.py --ckpt_dir results/joint_price/ckpt_seed$SEED --split dev --eval_batches 3 --batch_size 32 \
    --tgt_keep $K --tgt_prune_keep $R --tgt_quant_bits $Q --num_trials 4 --no_progress \
    --csv_path results/joint_price/dev_ppl_seed$SEED.csv --budget_feedback_gain 20 --policy_logit_bound 2 2>/dev/null \
    | grep -E "^(policy|fixed|random |delta)" | sed "s/^/joint_price $P: /"
done
