#!/bin/bash
# Joint GRPO policy priced per level on the 27-action grid with a factorised head
# (official_configs/cpu_smollm2_joint_factorised.yml: results/joint_levels's recipe plus policy_head: factorised,
# one logit per axis level), seed $SEED: train (bfloat16, as shipped) and export to
# results/joint_factorised/ckpt_seed$SEED, then the dev check (the 100-block dev tail of valid.txt; never test):
# 3 batches x 32 sequences x 16 steps at three points of the joint headline grid, fixed, fixed_ref and 4 random
# trials at the policy's realised usage. With SCORE=1 (after the dev choice) it scores the export once on the
# test split at the five joint headline points: 8 batches x 32 sequences x 16 steps, fixed, fixed_ref and 2
# random trials (DEV=0 skips the dev check).
#   SEED=1234 results/joint_factorised/run.sh                 # train + dev
#   TRAIN=0 DEV=0 SCORE=1 results/joint_factorised/run.sh     # test, once
#   TRAIN=0 MODE=55 results/joint_factorised/run.sh           # another update of the run: export it to ckpt_u55_seed$SEED,
#                                                           # fit its knob table (train blocks), then the dev check
# The steps are results/joint_levels/run.sh's, with this recipe's config and directory.
set -euo pipefail
cd "$(dirname "$0")/../.."
CONFIG=official_configs/cpu_smollm2_joint_factorised.yml D=results/joint_factorised exec results/joint_levels/run.sh
