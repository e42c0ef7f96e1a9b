#!/bin/bash
# Joint GRPO policy with the per-step budget price on all three axes, two levels each
# (official_configs/cpu_smollm2_joint_price.yml), seed $SEED: train, export to results/joint_price/ckpt_seed$SEED,
# then the dev check (the 100-block dev tail of valid.txt; never test): 3 batches x 32 sequences x 16 steps at
# three points of the joint headline grid, fixed, fixed_ref and 4 random trials at the policy's realised
# usage, the integral feedback (gain 20) added at evaluation. With SCORE=1 (after the dev choice) it then scores
# the export once on the test split at the five joint headline points: 8 batches x 32 sequences x 16 steps,
# fixed, fixed_ref and 2 random trials (what README.md reports; DEV=0 skips the dev check).
#   SEED=1234 results/joint_price/run.sh            # train + dev
#   TRAIN=0 DEV=0 SCORE=1 results/joint_price/run.sh  # test, once
set -euo pipefail
cd "$(dirname "$0")/../.."
SEED=${SEED:-1234}
if [[ "${TRAIN:-1}" == 1 ]]; then
  python train.py --config official_configs/cpu_smollm2_joint_price.yml --set seed=$SEED \
    --output_dir checkpoints/joint_price_seed$SEED
  python -m utils.checkpoint export checkpoints/joint_price_seed$SEED results/joint_price/ckpt_seed$SEED
fi
if [[ "${DEV:-1}" == 1 ]]; then
  for P in ${POINTS:-0.2,0.5,6 0.5,0.7,8 0.8,0.9,12}; do
    IFS=, read -r K R Q <<< "$P"
    python eval_perplexity.py --ckpt_dir results/joint_price/ckpt_seed$SEED --split dev --eval_batches 3 \
      --batch_size 32 --tgt_keep $K --tgt_prune_keep $R --tgt_quant_bits $Q --num_trials 4 --no_progress \
      --csv_path results/joint_price/dev_ppl_seed$SEED.csv --budget_feedback_gain 20 --policy_logit_bound 2 \
      2>/dev/null | grep -E "^(policy|fixed|random |delta)" | sed "s/^/joint_price $P: /"
  done
fi
if [[ "${SCORE:-0}" == 1 ]]; then
  rm -f results/joint_price/test_ppl_seed$SEED.csv
  CKPT_DIR=results/joint_price/ckpt_seed$SEED CSV_PATH=results/joint_price/test_ppl_seed$SEED.csv SPLIT=test \
    EVAL_BATCHES=8 BATCH_SIZE=32 NUM_TRIALS=2 EMC_DAC=0 \
    POINTS="0.2,0.5,6 0.35,0.6,7 0.5,0.7,8 0.65,0.8,10 0.8,0.9,12" EXTRA="--keep_prefill_mb 4096 --no_progress" \
    ./eval_perplexity.sh
fi
