#!/bin/bash
# For comparison with run.sh: the cloned prune policy (results/ckpt_prune_bc_cal, a behaviour clone of the
# surprisal/entropy damage-probe schedule, no GRPO) on the same HellaSwag text, points and baselines.
#   results/ood_hellaswag/run_clone.sh          # ~12 min alone (run.sh first: it writes the text)
set -euo pipefail
cd "$(dirname "$0")/../.."
D=results/ood_hellaswag
[[ -f $D/text/test.txt ]] || python $D/make_text.py $D/text/test.txt
rm -f $D/ppl_clone.csv
CKPT_DIR=results/ckpt_prune_bc_cal CSV_PATH=$D/ppl_clone.csv SPLIT=test \
  EVAL_BATCHES=8 BATCH_SIZE=32 NUM_TRIALS=2 EMC_DAC=0 \
  POINTS="1,0.5,16 1,0.7,16 1,0.9,16" \
  EXTRA="--dataset_name $D/text/{split}.txt --keep_prefill_mb 4096 --no_progress --dtype float32" \
  ./eval_perplexity.sh 2>&1 | tee $D/clone.log
