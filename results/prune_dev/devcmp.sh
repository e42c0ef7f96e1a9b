#!/usr/bin/env bash
# dev-split comparison of the prune runs (choosing the recipe; never the test split)
# CKPTS="checkpoints/prune-blind" results/prune_dev/devcmp.sh   # other run directories
cd "$(dirname "$0")/../.."
mkdir -p results/prune_dev
CKPTS=${CKPTS:-"checkpoints/prune-step-a100 checkpoints/prune-step-a100-g0"}
for ck in $CKPTS; do
  CKPT_DIR=$ck CSV_PATH=results/prune_dev/dev_ppl.csv SPLIT=dev EVAL_BATCHES=4 BATCH_SIZE=16 NUM_TRIALS=2 \
    POINTS="1,0.5,16 1,0.7,16 1,0.9,16" EXTRA="--no_progress" ./eval_perplexity.sh 2>&1 | grep -E "^\[|policy |fixed |delta|random  "
done
for ck in $CKPTS; do
  echo "placement $ck"
  python -m utils.placement --ckpt_dir $ck --split dev --blocks 32 --tgt_prune_keep 0.7 --json results/prune_dev/placement_$(basename $ck).json 2>&1 | grep -v -i "loading\|warn"
done
