#!/bin/bash
# The price recipe (official_configs/cpu_smollm2_prune_price.yml, knob table fitted by the trainer) with the
# policy's two logit layers initialised 100x smaller (policy_head_init_scale 0.01): does a near-uniform start
# shrink the spread between training seeds? Same seeds as results/prune_price, so data order, budgets and
# rollout draws are the shipped runs'; only the initial weights of pi and the budget head's last layer differ.
#   SEED=S results/prune_price_init/run.sh                       # train (bfloat16, as shipped) + export
#   SEED=S TRAIN=0 DEV=1 results/prune_price_init/run.sh         # dev check (results/prune_price/dev.sh)
#   SEED=S TRAIN=0 SCORE=1 NUM_TRIALS=2 EMC_DAC=0 results/prune_price_init/run.sh   # test, once per seed
set -euo pipefail
cd "$(dirname "$0")/../.."
SEED=${SEED:-1234}
DTYPE=${DTYPE:-float32}  # evaluation dtype, as results/prune_price_knob
D=results/prune_price_init
CKPT=$D/ckpt_seed$SEED
if [[ "${TRAIN:-1}" == 1 ]]; then
  python train.py --config official_configs/cpu_smollm2_prune_price.yml --set grpo_rollouts_per_input=8 --set ppo_target_batch_size=2048 --set ppo_minibatch_size=512 --set seed=$SEED \
    --set policy_head_init_scale=0.01 --output_dir checkpoints/prune_price_init_seed$SEED 2>&1 \
    | tr '\r' '\n' | grep -v "^updates: .*upd, reward" > $D/train_seed$SEED.log
  cp checkpoints/prune_price_init_seed$SEED/metrics.jsonl $D/metrics_seed$SEED.jsonl
  python -m utils.checkpoint export checkpoints/prune_price_init_seed$SEED $CKPT
fi
if [[ "${DEV:-0}" == 1 ]]; then
  rm -f $D/dev_seed$SEED.csv
  TAG="init" CKPT=$CKPT CSV=$D/dev_seed$SEED.csv FB="--dtype $DTYPE" \
    results/prune_price/dev.sh | tee $D/dev_seed$SEED.txt
fi
if [[ "${SCORE:-0}" == 1 ]]; then
  rm -f $D/test_ppl_seed$SEED.csv
  CKPT_DIR=$CKPT CSV_PATH=$D/test_ppl_seed$SEED.csv SPLIT=test \
    EVAL_BATCHES=8 BATCH_SIZE=32 NUM_TRIALS=${NUM_TRIALS:-8} EMC_DAC=${EMC_DAC:-1} \
    POINTS="1,0.5,16 1,0.6,16 1,0.7,16 1,0.8,16 1,0.9,16" \
    EXTRA="--keep_prefill_mb 4096 --no_progress --dtype $DTYPE" \
    ./eval_perplexity.sh 2>&1 | tee $D/test_seed$SEED.log
fi
