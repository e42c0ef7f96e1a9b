#!/bin/bash
# Joint GRPO policy priced per level on the 27-action grid (official_configs/cpu_smollm2_joint_levels.yml: the
# prune price recipe with K = 16, near-uniform start and the knob table at gain 5, on κ {0.1, 0.6, 1} x ρ {0.4,
# 0.8, 1} x bits {5, 7, 16}, QUEST page 4), seed $SEED: train (bfloat16, as shipped) and export to
# results/joint_levels/ckpt_seed$SEED, then the dev check (the 100-block dev tail of valid.txt; never test):
# 3 batches x 32 sequences x 16 steps at three points of the joint headline grid, fixed, fixed_ref and 4 random
# trials at the policy's realised usage. With SCORE=1 (after the dev choice) it scores the export once on the
# test split at the five joint headline points: 8 batches x 32 sequences x 16 steps, fixed, fixed_ref and 2
# random trials (DEV=0 skips the dev check).
#   SEED=1234 results/joint_levels/run.sh                 # train + dev
#   TRAIN=0 DEV=0 SCORE=1 results/joint_levels/run.sh     # test, once
#   TRAIN=0 MODE=55 results/joint_levels/run.sh           # another update of the run: export it to ckpt_u55_seed$SEED,
#                                                           # fit its knob table (train blocks), then the dev check
# Other joint recipes reuse this script with their own CONFIG and D (e.g. results/joint_factorised/run.sh), and SETS
# for extra training arguments (e.g. SETS="--set lr=3e-4", results/joint_axis_lr3e4/run.sh); EVAL_FLAGS for
# extra evaluator flags, with SUFFIX naming their files (e.g. results/joint_from_prune/run.sh BRACKET=1).
set -euo pipefail
cd "$(dirname "$0")/../.."
SEED=${SEED:-1234}
D=${D:-results/joint_levels}
CONFIG=${CONFIG:-official_configs/cpu_smollm2_joint_levels.yml}
NAME=$(basename $D)
MODE=${MODE:-latest}
TAG=$([[ $MODE == latest ]] && echo "" || echo "_u$MODE")
CKPT=$D/ckpt${TAG}_seed$SEED
if [[ "${TRAIN:-1}" == 1 ]]; then
  python train.py --config $CONFIG --set seed=$SEED ${SETS:-} \
    --output_dir checkpoints/${NAME}_seed$SEED 2>&1 \
    | tr '\r' '\n' | grep -v "^updates: .*upd, reward" > $D/train_seed$SEED.log
  cp checkpoints/${NAME}_seed$SEED/metrics.jsonl $D/metrics_seed$SEED.jsonl
  python -m utils.checkpoint export checkpoints/${NAME}_seed$SEED $CKPT
elif [[ $MODE != latest && ! -d $CKPT ]]; then
  python -m utils.checkpoint export checkpoints/${NAME}_seed$SEED $CKPT --mode $MODE
  python -m utils.knob_calibration --ckpt_dir $CKPT --no_progress
fi
TAG=$TAG${SUFFIX:-}  # SUFFIX: a name for the dev / test files of another table or setting of the same weights
if [[ "${DEV:-1}" == 1 ]]; then
  rm -f $D/dev_ppl${TAG}_seed$SEED.csv $D/dev${TAG}_seed$SEED.txt
  for P in ${POINTS:-0.2,0.5,6 0.5,0.7,8 0.8,0.9,12}; do
    IFS=, read -r K R Q <<< "$P"
    python eval_perplexity.py --ckpt_dir $CKPT --split dev --eval_batches 3 --batch_size 32 \
      --tgt_keep $K --tgt_prune_keep $R --tgt_quant_bits $Q --num_trials 4 --no_progress --dtype float32 ${EVAL_FLAGS:-} \
      --csv_path $D/dev_ppl${TAG}_seed$SEED.csv 2>/dev/null | grep -E "^(policy|fixed|random |delta)" \
      | sed "s/^/$NAME$TAG $P: /" | tee -a $D/dev${TAG}_seed$SEED.txt
  done
fi
if [[ "${SCORE:-0}" == 1 ]]; then
  rm -f $D/test_ppl${TAG}_seed$SEED.csv
  CKPT_DIR=$CKPT CSV_PATH=$D/test_ppl${TAG}_seed$SEED.csv SPLIT=test EVAL_BATCHES=8 BATCH_SIZE=32 NUM_TRIALS=2 \
    EMC_DAC=0 POINTS="0.2,0.5,6 0.35,0.6,7 0.5,0.7,8 0.65,0.8,10 0.8,0.9,12" \
    EXTRA="--keep_prefill_mb 4096 --no_progress --dtype float32 ${EVAL_FLAGS:-}" ./eval_perplexity.sh 2>&1 | tee $D/test${TAG}_seed$SEED.log
fi
