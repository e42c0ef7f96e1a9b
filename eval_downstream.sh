#!/usr/bin/env bash
# Downstream accuracy sweep (lm-eval harness) of a trained SOL policy over a few budget points, each with
# the fixed baseline matched to the policy's realised usage, plus one dense-only run. One key-metrics JSON
# per point in $OUT_DIR ({"policy": ..., "fixed_baseline": ...}; dense_only.json holds "dense_baseline").
# Points whose JSON exists are skipped, so a stopped sweep resumes. Every variable below can be overridden
# from the environment, e.g.
#   CKPT_DIR=checkpoints/sol-2026... LIMIT=200 TASKS=hellaswag_local,tiny_mc_local ./eval_downstream.sh
set -euo pipefail
cd "$(dirname "$0")"

LIMIT=${LIMIT:-100}                             # documents per task ("" = the whole task; HellaSwag has 10,042)
CKPT_DIR=${CKPT_DIR:-results/ckpt_joint}        # training run directory (policy_latest.pt inside)
MODE=${MODE:-latest}                            # latest or an update number
TASKS=${TASKS:-hellaswag_local}                 # tasks/ configs (offline) or lm-eval task names (online)
NUM_FEWSHOT=${NUM_FEWSHOT:-0}
EPISODE_LEN=${EPISODE_LEN:-16}                  # dense replay every 16 scored tokens, as the reference
POLICY_TEMPERATURE=${POLICY_TEMPERATURE:-0.6}
SEED=${SEED:-1234}
OUT_DIR=${OUT_DIR:-results/downstream_$(basename "$CKPT_DIR")}
PYTHON=${PYTHON:-python}
EXTRA=${EXTRA:-}                                # more eval_downstream.py flags, e.g. "--device cpu"

# budget points: "token_keep prune_keep quant_bits"
POINTS=${POINTS:-"0.3 0.6 6;0.5 0.75 8;0.8 0.9 12"}

if [[ ! -d "$CKPT_DIR" ]]; then
  echo "error: checkpoint directory $CKPT_DIR not found; train one first (make train) or set CKPT_DIR=<run dir>" >&2
  exit 2
fi
mkdir -p "$OUT_DIR"
common=(--ckpt_dir "$CKPT_DIR" --mode "$MODE" --tasks "$TASKS" --num_fewshot "$NUM_FEWSHOT"
        --episode_len "$EPISODE_LEN" --seed "$SEED")
[[ -n "$LIMIT" ]] && common+=(--limit "$LIMIT")

if [[ ! -f "$OUT_DIR/dense_only.json" ]]; then
  echo "== dense"
  # shellcheck disable=SC2086
  $PYTHON eval_downstream.py "${common[@]}" --only_dense --export_sparsity_json "$OUT_DIR/dense_only.json" $EXTRA
fi

IFS=';' read -ra points <<< "$POINTS"
for pt in "${points[@]}"; do
  read -r k p b <<< "$pt"
  name="policy_k${k//./p}_p${p//./p}_b${b//./p}.json"
  if [[ -f "$OUT_DIR/$name" ]]; then
    echo "== $name exists, skipped"
    continue
  fi
  echo "== policy at keep $k, prune keep $p, $b bits (+ matched fixed baseline)"
  # shellcheck disable=SC2086
  $PYTHON eval_downstream.py "${common[@]}" --tgt_keep "$k" --tgt_prune_keep "$p" --tgt_quant_bits "$b" \
    --greedy_policy --policy_temperature "$POLICY_TEMPERATURE" --fixed_from_policy \
    --export_sparsity_json "$OUT_DIR/$name" $EXTRA
done
echo "key metrics in $OUT_DIR"
