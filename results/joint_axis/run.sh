#!/bin/bash
# Joint GRPO policy with one axis contrasted per group (official_configs/cpu_smollm2_joint_axis.yml:
# results/joint_factorised's recipe plus rollout_contrast: one_axis), seed $SEED: train (bfloat16, as shipped) and
# export to results/joint_axis/ckpt_seed$SEED, then the dev check (the 100-block dev tail of valid.txt; never test):
# 3 batches x 32 sequences x 16 steps at three points of the joint headline grid, fixed, fixed_ref and 4 random
# trials at the policy's realised usage. With SCORE=1 (after the dev choice) it scores the export once on the
# test split at the five joint headline points: 8 batches x 32 sequences x 16 steps, fixed, fixed_ref and 2
# random trials (DEV=0 skips the dev check).
#   SEED=1234 results/joint_axis/run.sh                 # train + dev
#   TRAIN=0 DEV=0 SCORE=1 results/joint_axis/run.sh     # test, once
# The steps are results/joint_levels/run.sh's, with this recipe's config and directory.
set -euo pipefail
cd "$(dirname "$0")/../.."
CONFIG=official_configs/cpu_smollm2_joint_axis.yml D=results/joint_axis exec results/joint_levels/run.sh
