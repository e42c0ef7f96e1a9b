#!/bin/bash
# The price policies of results/prune_price (same weights, GRPO only) with the budget feedback at gain 5 plus a
# knob calibration table (utils.knob_calibration), fitted on train blocks only.
#   SEED=S FIT=1 results/prune_price_knob/run.sh    # fit knob_g5_seedS.json on 48 train blocks
#   SEED=S DEV=1 results/prune_price_knob/run.sh    # dev check (results/prune_price/dev.sh) -> dev_seedS.csv / .txt
#   SEED=S SCORE=1 NUM_TRIALS=2 EMC_DAC=0 results/prune_price_knob/run.sh   # test, once per seed
#   SEED=1234 FULL=1 results/prune_price_knob/run.sh   # the same policy on test with 8 random trials, EMC and DAC
set -euo pipefail
cd "$(dirname "$0")/../.."
SEED=${SEED:-1234}
GAIN=${GAIN:-5}
DTYPE=${DTYPE:-float32}  # this machine has no bfloat16 instructions (docs/throughput.md)
D=results/prune_price_knob
CKPT=results/prune_price/ckpt_seed$SEED
TABLE=$D/knob_g${GAIN}_seed$SEED.json
if [[ "${FIT:-0}" == 1 ]]; then
  python -m utils.knob_calibration --ckpt_dir $CKPT --dtype $DTYPE --budget_feedback_gain $GAIN \
    --blocks ${BLOCKS:-48} --iters ${ITERS:-8} --out $TABLE --no_progress | tee $D/fit_seed$SEED.txt
fi
if [[ "${DEV:-0}" == 1 ]]; then
  rm -f $D/dev_seed$SEED.csv
  TAG="knob" CKPT=$CKPT CSV=$D/dev_seed$SEED.csv FB="--dtype $DTYPE --knob_calibration $TABLE" \
    results/prune_price/dev.sh | tee $D/dev_seed$SEED.txt
fi
if [[ "${SCORE:-0}" == 1 ]]; then
  rm -f $D/test_ppl_seed$SEED.csv
  CKPT_DIR=$CKPT CSV_PATH=$D/test_ppl_seed$SEED.csv SPLIT=test \
    EVAL_BATCHES=8 BATCH_SIZE=32 NUM_TRIALS=${NUM_TRIALS:-8} EMC_DAC=${EMC_DAC:-1} \
    POINTS="1,0.5,16 1,0.6,16 1,0.7,16 1,0.8,16 1,0.9,16" \
    EXTRA="--keep_prefill_mb 4096 --no_progress --dtype $DTYPE --knob_calibration $TABLE" \
    ./eval_perplexity.sh 2>&1 | tee $D/test_seed$SEED.log
fi
if [[ "${FULL:-0}" == 1 ]]; then  # the baselines of the full protocol (the policy's own numbers are the same)
  rm -f $D/full_protocol_seed$SEED.csv
  CKPT_DIR=$CKPT CSV_PATH=$D/full_protocol_seed$SEED.csv SPLIT=test \
    EVAL_BATCHES=8 BATCH_SIZE=32 NUM_TRIALS=8 EMC_DAC=1 \
    POINTS="1,0.5,16 1,0.6,16 1,0.7,16 1,0.8,16 1,0.9,16" \
    EXTRA="--keep_prefill_mb 4096 --no_progress --dtype $DTYPE --knob_calibration $TABLE" \
    ./eval_perplexity.sh > $D/full_protocol_seed$SEED.log 2>&1
fi
