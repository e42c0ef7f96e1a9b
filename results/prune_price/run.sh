#!/bin/bash
# GRPO prune policy with the per-step budget price and integral budget feedback
# (official_configs/cpu_smollm2_prune_price.yml), one training seed per call: trains on the shipped WikiText-2
# valid.txt (its dev tail held out), exports to results/prune_price/ckpt_seed$SEED (TRAIN=0 skips this); with
# SCORE=1 it then scores the export once on the test split with the headline prune protocol: 8 batches x 32
# sequences x 16 steps per point, fixed, fixed_ref, NUM_TRIALS random trials (default 8), EMC/DAC (EMC_DAC=1),
# at the inference-time feedback gain GAIN (default 20, the config's; gain 5 is scored by
# results/prune_price_g5/run.sh).
#   SEED=1234 SCORE=1 results/prune_price/run.sh
# With PLACEMENT=1 (TRAIN=0) it writes the placement check of the export on 32 train and 32 dev blocks at ρ 0.7
# (placement_{train,dev}_p0.7.json: is the policy better placed on the text it trained on?).
# These seeds were trained before the config's policy_head_init_scale 0.01 (results/prune_price_init): it pins 1.
set -euo pipefail
cd "$(dirname "$0")/../.."
SEED=${SEED:-1234}
CONFIG=${CONFIG:-official_configs/cpu_smollm2_prune_price.yml}
NAME=${NAME:-prune_price}
if [[ "${TRAIN:-1}" == 1 ]]; then
  python train.py --config $CONFIG --set grpo_rollouts_per_input=8 --set ppo_target_batch_size=2048 --set ppo_minibatch_size=512 --set seed=$SEED --set policy_head_init_scale=1 ${EXTRA:-} --output_dir checkpoints/${NAME}_seed$SEED
  python -m utils.checkpoint export checkpoints/${NAME}_seed$SEED results/$NAME/ckpt_seed$SEED
fi
if [[ "${SCORE:-0}" == 1 ]]; then
  rm -f results/$NAME/test_ppl_seed$SEED.csv
  CKPT_DIR=results/$NAME/ckpt_seed$SEED CSV_PATH=results/$NAME/test_ppl_seed$SEED.csv SPLIT=test \
    EVAL_BATCHES=8 BATCH_SIZE=32 NUM_TRIALS=${NUM_TRIALS:-8} EMC_DAC=${EMC_DAC:-1} \
    POINTS="1,0.5,16 1,0.6,16 1,0.7,16 1,0.8,16 1,0.9,16" \
    EXTRA="--keep_prefill_mb 4096 --no_progress --budget_feedback_gain ${GAIN:-20} ${EVAL_EXTRA:-}" \
    ./eval_perplexity.sh
fi
if [[ "${PLACEMENT:-0}" == 1 ]]; then
  for S in train dev; do
    python -m utils.placement --ckpt_dir results/$NAME/ckpt_seed$SEED --split $S --blocks 32 --tgt_prune_keep 0.7 \
      --json results/$NAME/placement_${S}_p0.7.json
  done
fi
