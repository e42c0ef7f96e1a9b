#!/bin/bash
# K = 16 rollouts per input (instead of 8) in the price recipe (official_configs/cpu_smollm2_prune_price.yml, which
# now sets it): same 16 sequences per update (pool 4096 = 2 inputs x 16 rollouts x 16 steps x 8 batches, 4
# minibatches of 1024), same seeds and data order as results/prune_price_init. The --set flags below are the
# config's own values since it adopted K = 16; they stay so the command says what was run.
#   SEED=S results/prune_price_k16/run.sh                            # train (bfloat16, as shipped) + export
#   SEED=1235 TRAIN=0 DEV=1 results/prune_price_k16/run.sh           # dev check (results/prune_price/dev.sh)
#   SEED=S TRAIN=0 SCORE=1 NUM_TRIALS=2 EMC_DAC=0 results/prune_price_k16/run.sh   # test, once per seed
#   SEED=S TRAIN=0 SCORE=1 OUT=test_full results/prune_price_k16/run.sh   # the same policy rows again (deterministic),
#       with the full baseline protocol: best of 8 random trials, EMC and DAC (test_full_ppl_seedS.csv)
# Variants of the recipe reuse this script with their own D, SETS (extra training flags) and TAG (the dev lines'
# prefix), e.g. results/prune_lr3e4/run.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
SEED=${SEED:-1235}
D=${D:-results/prune_price_k16}
NAME=$(basename $D)
CKPT=$D/ckpt_seed$SEED
if [[ "${TRAIN:-1}" == 1 ]]; then
  python train.py --config official_configs/cpu_smollm2_prune_price.yml --set seed=$SEED \
    --set grpo_rollouts_per_input=16 --set ppo_target_batch_size=4096 --set ppo_minibatch_size=1024 ${SETS:-} \
    --output_dir checkpoints/${NAME}_seed$SEED 2>&1 \
    | tr '\r' '\n' | grep -v "^updates: .*upd, reward" > $D/train_seed$SEED.log
  cp checkpoints/${NAME}_seed$SEED/metrics.jsonl $D/metrics_seed$SEED.jsonl
  python -m utils.checkpoint export checkpoints/${NAME}_seed$SEED $CKPT
fi
if [[ "${DEV:-0}" == 1 ]]; then
  rm -f $D/dev_seed$SEED.csv
  TAG=${TAG:-k16} CKPT=$CKPT CSV=$D/dev_seed$SEED.csv FB="--dtype float32" \
    results/prune_price/dev.sh | tee $D/dev_seed$SEED.txt
fi
if [[ "${SCORE:-0}" == 1 ]]; then
  OUT=${OUT:-test}
  rm -f $D/${OUT}_ppl_seed$SEED.csv
  CKPT_DIR=$CKPT CSV_PATH=$D/${OUT}_ppl_seed$SEED.csv SPLIT=test \
    EVAL_BATCHES=8 BATCH_SIZE=32 NUM_TRIALS=${NUM_TRIALS:-8} EMC_DAC=${EMC_DAC:-1} \
    POINTS="1,0.5,16 1,0.6,16 1,0.7,16 1,0.8,16 1,0.9,16" \
    EXTRA="--keep_prefill_mb 4096 --no_progress --dtype float32" \
    ./eval_perplexity.sh 2>&1 | tee $D/${OUT}_seed$SEED.log
fi
