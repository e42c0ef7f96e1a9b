#!/bin/bash
# The reference recipe (official_configs/cpu_smollm2_prune_reference.yml) for 3 epochs on our train split
# (WikiText-2 valid.txt minus its dev tail), GRPO only, no feedback in training; exported for eval-time feedback.
set -euo pipefail
cd "$(dirname "$0")/../.."
SEED=${SEED:-1234}
python train.py --config official_configs/cpu_smollm2_prune_reference.yml --set seed=$SEED --set epochs=3 \
  --set eval_every_updates=56 --output_dir checkpoints/prune_ref_long_seed$SEED
python -m utils.checkpoint export checkpoints/prune_ref_long_seed$SEED results/prune_ref_long/ckpt_seed$SEED
