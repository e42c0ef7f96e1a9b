#!/bin/bash
# Shipped policies scored on text of another domain that no recipe was chosen on: HellaSwag validation contexts
# with their gold endings (make_text.py), the first 8 x 32 blocks of 272 tokens, teacher-forced exactly as the
# WikiText-2 test sweeps (fixed, fixed_ref and 2 random trials at the policy's realised usage; no EMC/DAC, for time).
#   results/ood_hellaswag/run.sh          # the GRPO-only prune policies, results/prune_price_k16 seeds 1234-1236, ~13 min each
#   results/ood_hellaswag/run.sh clone    # the cloned prune policy results/ckpt_prune_bc_cal, ~14 min
#   results/ood_hellaswag/run.sh joint    # the joint policy results/joint_axis_lr3e4 at the five joint points, ~24 min
#   results/ood_hellaswag/run.sh joint results/joint_from_prune/start/ckpt_seed1234 ppl_joint_from_prune
#                                         # another joint export, its own output name, the same points
set -euo pipefail
cd "$(dirname "$0")/../.."
D=results/ood_hellaswag
[[ -f $D/text/test.txt ]] || python $D/make_text.py $D/text/test.txt
PRUNE_POINTS="1,0.5,16 1,0.7,16 1,0.9,16"

sweep() {  # checkpoint, output name (CSV and log), points
  rm -f $D/$2.csv
  CKPT_DIR=$1 CSV_PATH=$D/$2.csv SPLIT=test EVAL_BATCHES=8 BATCH_SIZE=32 NUM_TRIALS=2 EMC_DAC=0 POINTS="$3" \
    EXTRA="--dataset_name $D/text/{split}.txt --keep_prefill_mb 4096 --no_progress --dtype float32" \
    ./eval_perplexity.sh 2>&1 | tee $D/$2.log
}

case "${1:-grpo}" in
  grpo) for SEED in ${SEEDS:-1234 1235 1236}; do
          sweep results/prune_price_k16/ckpt_seed$SEED ood_ppl_seed$SEED "$PRUNE_POINTS"
        done
        python results/prune_feedback/summarise.py $D ood ;;
  clone) sweep results/ckpt_prune_bc_cal ppl_clone "$PRUNE_POINTS" ;;
  joint) sweep ${2:-results/joint_axis_lr3e4/ckpt_seed1234} ${3:-ppl_joint} \
           "0.2,0.5,6 0.35,0.6,7 0.5,0.7,8 0.65,0.8,10 0.8,0.9,12" ;;
  *) echo "usage: $0 [grpo|clone|joint]" >&2; exit 2 ;;
esac
