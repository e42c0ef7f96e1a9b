#!/bin/bash
# The best joint policy (results/joint_axis_lr3e4, 27 actions over kappa x rho x bits, knob table refitted with
# per-axis ranges, gain 5) on the same HellaSwag text, at the five joint headline points, with fixed, fixed_ref
# and 2 random trials at its realised usage, as its test sweep (results/joint_levels/run.sh, SCORE=1).
#   results/ood_hellaswag/run_joint.sh          # ~18 min alone (run.sh first: it writes the text)
set -euo pipefail
cd "$(dirname "$0")/../.."
D=results/ood_hellaswag
[[ -f $D/text/test.txt ]] || python $D/make_text.py $D/text/test.txt
rm -f $D/ppl_joint.csv
CKPT_DIR=results/joint_axis_lr3e4/ckpt_seed1234 CSV_PATH=$D/ppl_joint.csv SPLIT=test \
  EVAL_BATCHES=8 BATCH_SIZE=32 NUM_TRIALS=2 EMC_DAC=0 \
  POINTS="0.2,0.5,6 0.35,0.6,7 0.5,0.7,8 0.65,0.8,10 0.8,0.9,12" \
  EXTRA="--dataset_name $D/text/{split}.txt --keep_prefill_mb 4096 --no_progress --dtype float32" \
  ./eval_perplexity.sh 2>&1 | tee $D/joint.log
