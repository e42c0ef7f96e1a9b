#!/bin/bash
# GRPO prune policy with integral budget feedback on bounded logits (official_configs/cpu_smollm2_prune_feedback.yml),
# one training seed per call: trains on the shipped WikiText-2 valid.txt (its dev tail held out) and exports the
# weights to results/prune_feedback/ckpt_seed$SEED (TRAIN=0 skips this); with SCORE=1 it then scores the
# export once on the test split: the headline prune protocol, 8 batches x 32 sequences x 16 steps per point,
# fixed, fixed_ref, NUM_TRIALS random trials (default 8) and EMC/DAC (EMC_DAC=1, default).
#   SEED=1234 SCORE=1 results/prune_feedback/run.sh                       # what seed 1234 ran
#   SEED=1235 SCORE=1 NUM_TRIALS=2 EMC_DAC=0 results/prune_feedback/run.sh  # seeds 1235, 1236 (time)
set -euo pipefail
cd "$(dirname "$0")/../.."
SEED=${SEED:-1234}
if [[ "${TRAIN:-1}" == 1 ]]; then
  python train.py --config official_configs/cpu_smollm2_prune_feedback.yml --set seed=$SEED ${EXTRA:-} \
    --output_dir checkpoints/prune_feedback_seed$SEED
  python -m utils.checkpoint export checkpoints/prune_feedback_seed$SEED results/prune_feedback/ckpt_seed$SEED
fi
if [[ "${SCORE:-0}" == 1 ]]; then
  rm -f results/prune_feedback/test_ppl_seed$SEED.csv
  CKPT_DIR=results/prune_feedback/ckpt_seed$SEED CSV_PATH=results/prune_feedback/test_ppl_seed$SEED.csv SPLIT=test \
    EVAL_BATCHES=8 BATCH_SIZE=32 NUM_TRIALS=${NUM_TRIALS:-8} EMC_DAC=${EMC_DAC:-1} \
    POINTS="1,0.5,16 1,0.6,16 1,0.7,16 1,0.8,16 1,0.9,16" EXTRA="--keep_prefill_mb 4096 --no_progress" \
    ./eval_perplexity.sh
fi
