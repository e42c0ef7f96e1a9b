#!/bin/bash
# Does the near-uniform start (policy_head_init_scale 0.01, results/prune_price_init) keep learning past two
# epochs? The default-init price recipe did not (results/prune_price_e3: dev placement decayed in epoch 3).
# Same recipe and seed as results/prune_price_init, four epochs (224 updates), dev only.
#   SEED=1235 results/prune_price_init_e4/run.sh                 # train (bfloat16, as shipped) + export
#   SEED=1235 TRAIN=0 DEV=1 results/prune_price_init_e4/run.sh   # dev check (results/prune_price/dev.sh)
set -euo pipefail
cd "$(dirname "$0")/../.."
SEED=${SEED:-1235}
D=results/prune_price_init_e4
CKPT=$D/ckpt_seed$SEED
if [[ "${TRAIN:-1}" == 1 ]]; then
  python train.py --config official_configs/cpu_smollm2_prune_price.yml --set grpo_rollouts_per_input=8 --set ppo_target_batch_size=2048 --set ppo_minibatch_size=512 --set seed=$SEED --set epochs=4 \
    --set policy_head_init_scale=0.01 --output_dir checkpoints/prune_price_init_e4_seed$SEED 2>&1 \
    | tr '\r' '\n' | grep -v "^updates: .*upd, reward" > $D/train_seed$SEED.log
  cp checkpoints/prune_price_init_e4_seed$SEED/metrics.jsonl $D/metrics_seed$SEED.jsonl
  python -m utils.checkpoint export checkpoints/prune_price_init_e4_seed$SEED $CKPT
fi
if [[ "${DEV:-0}" == 1 ]]; then
  rm -f $D/dev_seed$SEED.csv
  TAG="init_e4" CKPT=$CKPT CSV=$D/dev_seed$SEED.csv FB="--dtype float32" \
    results/prune_price/dev.sh | tee $D/dev_seed$SEED.txt
fi
