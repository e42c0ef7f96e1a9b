#!/bin/bash
# The shipped price policies (results/prune_price/ckpt_seed*, trained with budget_feedback_gain 20 at dev checks
# only: budget_feedback_in_training false) scored with the integral budget feedback at gain 5 instead of 20.
# Chosen on dev (seed 1234, float32): DEV=1 re-runs that sweep (gains 20, 0, 5) into dev_gain_sweep_seed1234.txt.
# SCORE=1 scores one seed once on the test split with the protocol of results/prune_price (8 batches x 32
# sequences x 16 steps per point, fixed, fixed_ref, NUM_TRIALS random trials; EMC/DAC with EMC_DAC=1):
#   SEED=1234 SCORE=1 NUM_TRIALS=2 EMC_DAC=0 results/prune_price_g5/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
SEED=${SEED:-1234}
GAIN=${GAIN:-5}
DTYPE=${DTYPE:-float32}  # this machine has no bfloat16 instructions (docs/throughput.md)
if [[ "${DEV:-0}" == 1 ]]; then
  rm -f results/prune_price_g5/dev_gain_sweep_seed$SEED.txt
  for G in 20 0 5; do
    rm -f results/prune_price_g5/dev_g$G.csv
    TAG="g$G" CKPT=results/prune_price/ckpt_seed$SEED CSV=results/prune_price_g5/dev_g$G.csv \
      FB="--dtype $DTYPE --budget_feedback_gain $G" results/prune_price/dev.sh \
      | tee -a results/prune_price_g5/dev_gain_sweep_seed$SEED.txt
  done
fi
if [[ "${SCORE:-0}" == 1 ]]; then
  rm -f results/prune_price_g5/test_ppl_seed$SEED.csv
  CKPT_DIR=results/prune_price/ckpt_seed$SEED CSV_PATH=results/prune_price_g5/test_ppl_seed$SEED.csv SPLIT=test \
    EVAL_BATCHES=8 BATCH_SIZE=32 NUM_TRIALS=${NUM_TRIALS:-8} EMC_DAC=${EMC_DAC:-1} \
    POINTS="1,0.5,16 1,0.6,16 1,0.7,16 1,0.8,16 1,0.9,16" \
    EXTRA="--keep_prefill_mb 4096 --no_progress --dtype $DTYPE --budget_feedback_gain $GAIN" \
    ./eval_perplexity.sh
fi
