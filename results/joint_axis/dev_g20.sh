#!/bin/bash
# Dev check of the joint_axis export without its knob table, at the training's feedback gain 20 (the setting of
# the in-training dev checks), at the same three points as run.sh's dev check. Dev split only.
set -euo pipefail
cd "$(dirname "$0")/../.."
SEED=${SEED:-1234}
D=results/joint_axis
rm -f $D/dev_g20_ppl_seed$SEED.csv $D/dev_g20_seed$SEED.txt
for P in 0.2,0.5,6 0.5,0.7,8 0.8,0.9,12; do
  IFS=, read -r K R Q <<< "$P"
  python eval_perplexity.py --ckpt_dir $D/ckpt_seed$SEED --split dev --eval_batches 3 --batch_size 32 \
    --tgt_keep $K --tgt_prune_keep $R --tgt_quant_bits $Q --num_trials 4 --no_progress --dtype float32 \
    --knob_calibration none --budget_feedback_gain 20 \
    --csv_path $D/dev_g20_ppl_seed$SEED.csv 2>/dev/null | grep -E "^(policy|fixed|random |delta)" \
    | sed "s/^/joint_axis g20 $P: /" | tee -a $D/dev_g20_seed$SEED.txt
done
