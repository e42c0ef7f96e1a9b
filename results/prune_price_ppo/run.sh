#!/bin/bash
# Issue 15: the price recipe (official_configs/cpu_smollm2_prune_price.yml) with 8x the optimizer steps per
# rollout pool: grad_accum_steps 1 (each of the pool's four 512-entry minibatches is a step) and ppo_epochs 2.
# The rollouts (the CPU cost) are unchanged; only the policy's optimisation is. Dev checks 4x per epoch.
# BOUND=1 also halves the network's logit bound (policy_logit_bound 1: more exploration left in training).
#   SEED=1234 results/prune_price_ppo/run.sh            # -> checkpoints/prune_price_ppo_seed1234
#   SEED=1234 BOUND=1 results/prune_price_ppo/run.sh    # -> checkpoints/prune_price_ppo_b1_seed1234
set -euo pipefail
cd "$(dirname "$0")/../.."
SEED=${SEED:-1234}
NAME=prune_price_ppo
EXTRA=""
if [[ -n "${BOUND:-}" ]]; then NAME=${NAME}_b$BOUND; EXTRA="--set policy_logit_bound=$BOUND"; fi
python train.py --config official_configs/cpu_smollm2_prune_price.yml --set grpo_rollouts_per_input=8 --set ppo_target_batch_size=2048 --set ppo_minibatch_size=512 --set seed=$SEED --set policy_head_init_scale=1 \
  --set grad_accum_steps=1 --set ppo_epochs=2 --set eval_every_updates=112 $EXTRA \
  --output_dir checkpoints/${NAME}_seed$SEED
