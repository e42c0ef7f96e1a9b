#!/bin/bash
# results/joint_axis's recipe (official_configs/cpu_smollm2_joint_axis.yml) at lr 6e-4: the reference's 1e-4 tied
# fixed on dev (../joint_axis), 3e-4 went below it at 2 of 3 dev points and tied it on test (../joint_axis_lr3e4);
# does a step twice as big again keep moving it? Seed $SEED: train, export to results/joint_axis_lr6e4/ckpt_seed$SEED
# (the knob table is fitted at the end of training, per-axis bisection ranges), then the dev check of
# results/joint_levels/run.sh (dev split only). SCORE=1 TRAIN=0 DEV=0 scores it on test once, after the dev choice.
#   SEED=1234 results/joint_axis_lr6e4/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
SETS="--set lr=6e-4" CONFIG=official_configs/cpu_smollm2_joint_axis.yml D=results/joint_axis_lr6e4 \
  exec results/joint_levels/run.sh
