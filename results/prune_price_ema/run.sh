#!/bin/bash
# The price recipe (official_configs/cpu_smollm2_prune_price.yml) with a moving average of the policy weights
# (policy_ema_decay 0.95, utils/ema.py), seed $SEED, the LM in float32 (this machine has no bfloat16
# instructions: bfloat16 ran ~2x slower). Training is the same as without the average (the raw weights do not
# depend on it), so the raw and averaged exports of this one run are a paired comparison of the average alone.
# Then the dev check of both (the 100-block dev tail of valid.txt; never test), feedback gain 20 as shipped.
#   SEED=1234 results/prune_price_ema/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
SEED=${SEED:-1234}
R=results/prune_price_ema
if [[ "${TRAIN:-1}" == 1 ]]; then
  python train.py --config official_configs/cpu_smollm2_prune_price.yml --set grpo_rollouts_per_input=8 --set ppo_target_batch_size=2048 --set ppo_minibatch_size=512 --set seed=$SEED --set dtype=float32 --set policy_head_init_scale=1 \
    --set policy_ema_decay=0.95 --output_dir checkpoints/prune_price_ema_seed$SEED
  python -m utils.checkpoint export checkpoints/prune_price_ema_seed$SEED $R/ckpt_seed$SEED
  python -m utils.checkpoint export --raw checkpoints/prune_price_ema_seed$SEED $R/ckpt_raw_seed$SEED
fi
if [[ "${DEV:-1}" == 1 ]]; then
  for W in "" raw_; do
    TAG="ema_${W:-avg_}seed$SEED" CKPT=$R/ckpt_${W}seed$SEED CSV=$R/dev_ppl.csv results/prune_price/dev.sh \
      | tee -a $R/dev_log.txt
  done
fi
