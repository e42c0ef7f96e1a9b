#!/bin/bash
# The shipped GRPO prune policies (results/prune_price_k16, same weights) with the inference-time budget feedback
# at gain 2 instead of 5, each with a knob table fitted at gain 2 on the same 48 train blocks. Float32.
#   SEED=1235 results/prune_k16_gain2/run.sh                    # fit the table + dev check
#   SEED=S DEV=0 SCORE=1 results/prune_k16_gain2/run.sh           # (a candidate only) test, once per seed
set -euo pipefail
cd "$(dirname "$0")/../.."
SEED=${SEED:-1235}
D=results/prune_k16_gain2
CKPT=results/prune_price_k16/ckpt_seed$SEED
TABLE=$D/knob_g2_seed$SEED.json
if [[ "${FIT:-1}" == 1 ]]; then
  python -m utils.knob_calibration --ckpt_dir $CKPT --dtype float32 --budget_feedback_gain 2 --blocks 48 \
    --out $TABLE --no_progress | tee $D/fit_seed$SEED.txt
fi
if [[ "${DEV:-1}" == 1 ]]; then
  rm -f $D/dev_seed$SEED.csv
  TAG=g2 CKPT=$CKPT CSV=$D/dev_seed$SEED.csv FB="--dtype float32 --knob_calibration $TABLE" \
    results/prune_price/dev.sh | tee $D/dev_seed$SEED.txt
fi
if [[ "${SCORE:-0}" == 1 ]]; then
  rm -f $D/test_ppl_seed$SEED.csv
  CKPT_DIR=$CKPT CSV_PATH=$D/test_ppl_seed$SEED.csv SPLIT=test EVAL_BATCHES=8 BATCH_SIZE=32 NUM_TRIALS=2 EMC_DAC=0 \
    POINTS="1,0.5,16 1,0.6,16 1,0.7,16 1,0.8,16 1,0.9,16" \
    EXTRA="--keep_prefill_mb 4096 --no_progress --dtype float32 --knob_calibration $TABLE" \
    ./eval_perplexity.sh 2>&1 | tee $D/test_seed$SEED.log
fi
