#!/bin/bash
# The shipped GRPO prune policies (results/prune_price_k16, K = 16 price recipe, seeds 1234/1235/1236) scored on
# text of another domain that no recipe was chosen on: HellaSwag validation contexts with their gold endings
# (make_text.py), the first 8 x 32 blocks of 272 tokens, teacher-forced exactly as the WikiText-2 test runs
# (fixed, fixed_ref and 2 random trials at the policy's realised usage; no EMC/DAC, for time).
#   results/ood_hellaswag/run.sh                 # all three seeds, ~13 min each alone
set -euo pipefail
cd "$(dirname "$0")/../.."
D=results/ood_hellaswag
python $D/make_text.py $D/text/test.txt
for SEED in ${SEEDS:-1234 1235 1236}; do
  rm -f $D/ood_ppl_seed$SEED.csv
  CKPT_DIR=results/prune_price_k16/ckpt_seed$SEED CSV_PATH=$D/ood_ppl_seed$SEED.csv SPLIT=test \
    EVAL_BATCHES=8 BATCH_SIZE=32 NUM_TRIALS=2 EMC_DAC=0 \
    POINTS="1,0.5,16 1,0.7,16 1,0.9,16" \
    EXTRA="--dataset_name $D/text/{split}.txt --keep_prefill_mb 4096 --no_progress --dtype float32" \
    ./eval_perplexity.sh 2>&1 | tee $D/ood_seed$SEED.log
done
