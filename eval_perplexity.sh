#!/usr/bin/env bash
# Sweep eval_perplexity.py over a grid of requested (token keep, prune keep, quant bits) targets.
# Each point appends one CSV row (policy, dense, fixed, random at the policy's realised usage); then draw
#   python -m utils.plots pareto "$CSV_PATH" --out results/pareto.png
#   python -m utils.plots adherence "$CSV_PATH" --out results/adherence.png
# Every variable below can be overridden from the environment, e.g.
#   CKPT_DIR=checkpoints/sol-2026... EVAL_BATCHES=2 KEEPS="0.3 0.6" ./eval_perplexity.sh
set -euo pipefail
cd "$(dirname "$0")"

CKPT_DIR=${CKPT_DIR:-results/ckpt_joint}        # training run directory (policy_latest.pt inside)
MODE=${MODE:-latest}                            # latest or an update number
CSV_PATH=${CSV_PATH:-results/ppl_eval.csv}      # rows are appended; header written once
SPLIT=${SPLIT:-test}                            # held-out WikiText-2 test split by default
EVAL_BATCHES=${EVAL_BATCHES:-7}                 # 7 x 16 sequences x rollout_len tokens, as the reference
BATCH_SIZE=${BATCH_SIZE:-16}
NUM_TRIALS=${NUM_TRIALS:-1}                     # random-baseline trials per point (best-of-N is plotted)
SEED=${SEED:-1234}
EMC_DAC=${EMC_DAC:-0}                           # 1: also run the EMC and DAC heuristic controllers
SAMPLES=${SAMPLES:-0}                           # >0: a random subset of that many grid points (seeded shuffle)
PYTHON=${PYTHON:-python}
EXTRA=${EXTRA:-}                                # more eval_perplexity.py flags, e.g. "--device cpu"

# target grid (the reference sweeps kappa 0.15..0.95, rho 0.4..1.0, bits 5..13: 567 points), or an explicit
# list of points that replaces the grid, e.g. POINTS="0.2,0.5,5 0.5,0.7,8 0.8,0.9,12" (keep,prune_keep,bits)
POINTS=${POINTS:-}
KEEPS=${KEEPS:-"0.2 0.4 0.6 0.8 1.0"}
PRUNES=${PRUNES:-"0.5 0.7 0.85 1.0"}
BITS=${BITS:-"4 6 8 16"}

if [[ ! -d "$CKPT_DIR" ]]; then
  echo "error: checkpoint directory $CKPT_DIR not found; train one first (make train) or set CKPT_DIR=<run dir>" >&2
  exit 2
fi

points=()
if [[ -n "$POINTS" ]]; then
  for pt in $POINTS; do
    IFS=, read -r k p b <<<"$pt"
    if [[ -z "$k" || -z "$p" || -z "$b" ]]; then
      echo "error: POINTS entry '$pt' is not keep,prune_keep,bits" >&2
      exit 2
    fi
    points+=("$k $p $b")
  done
else
  for k in $KEEPS; do for p in $PRUNES; do for b in $BITS; do points+=("$k $p $b"); done; done; done
fi
if (( SAMPLES > 0 )); then  # Fisher-Yates with a fixed seed, as the reference
  RANDOM=12345
  for (( i=${#points[@]}-1; i>0; i-- )); do
    j=$(( RANDOM % (i + 1) )); tmp=${points[i]}; points[i]=${points[j]}; points[j]=$tmp
  done
  points=("${points[@]:0:SAMPLES}")
fi

n=${#points[@]}
echo "sweeping $n target points of $CKPT_DIR ($MODE) -> $CSV_PATH"
emc_flag=()
[[ "$EMC_DAC" == 1 ]] && emc_flag=(--do_emc_and_driftaware)
start=$(date +%s)
i=0
for pt in "${points[@]}"; do
  read -r k p b <<<"$pt"
  i=$(( i + 1 ))
  echo "[$i/$n] tgt_keep=$k tgt_prune_keep=$p tgt_quant_bits=$b"
  # shellcheck disable=SC2086
  "$PYTHON" eval_perplexity.py --ckpt_dir "$CKPT_DIR" --mode "$MODE" --split "$SPLIT" \
    --eval_batches "$EVAL_BATCHES" --batch_size "$BATCH_SIZE" --num_trials "$NUM_TRIALS" --seed "$SEED" \
    --tgt_keep "$k" --tgt_prune_keep "$p" --tgt_quant_bits "$b" --csv_path "$CSV_PATH" "${emc_flag[@]}" $EXTRA
  now=$(date +%s)
  elapsed=$(( now - start ))
  eta=$(( elapsed * (n - i) / i ))
  printf '[%d/%d] done; elapsed %dm%02ds, ETA %dm%02ds\n' "$i" "$n" $((elapsed / 60)) $((elapsed % 60)) \
    $((eta / 60)) $((eta % 60))
done
echo "all $n points written to $CSV_PATH"
