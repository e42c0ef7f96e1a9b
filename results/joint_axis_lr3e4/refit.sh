#!/bin/bash
# The knob table refitted with per-axis bisection ranges (utils.knob_calibration.offset_bounds: ±48 logits per
# unit of usage on bits, ±30 on rho, ±15 on kappa; before, ±12 on every axis, where the tightest bit request
# saturated at +12 and realised 0.434 for 0.381), same weights, same 48 train blocks, gain 5; then the dev
# check of results/joint_levels/run.sh with it (files *_refit_seed$SEED.*). The old table is kept beside it.
#   SEED=1234 results/joint_axis_lr3e4/refit.sh            # refit + dev check
#   SEED=1234 SCORE=1 results/joint_axis_lr3e4/refit.sh    # after the dev choice: score on test once (18 min alone;
#                                                            # test_ppl_refit_seed1234.csv, test_refit_seed1234.log)
set -euo pipefail
cd "$(dirname "$0")/../.."
SEED=${SEED:-1234}
CKPT=results/joint_axis_lr3e4/ckpt_seed$SEED
if [[ "${SCORE:-0}" == 1 ]]; then
  TRAIN=0 DEV=0 SCORE=1 SUFFIX=_refit SEED=$SEED CONFIG=official_configs/cpu_smollm2_joint_axis.yml \
    D=results/joint_axis_lr3e4 exec results/joint_levels/run.sh
fi
[[ -f $CKPT/knob_calibration_max12.json ]] || cp $CKPT/knob_calibration.json $CKPT/knob_calibration_max12.json
python -m utils.knob_calibration --ckpt_dir $CKPT --blocks 48 --budget_feedback_gain 5 --no_progress \
  | tee results/joint_axis_lr3e4/refit_seed$SEED.txt
TRAIN=0 SUFFIX=_refit SEED=$SEED CONFIG=official_configs/cpu_smollm2_joint_axis.yml D=results/joint_axis_lr3e4 \
  results/joint_levels/run.sh
