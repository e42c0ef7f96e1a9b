#!/usr/bin/env bash
# Working examples of every entry point on the CPU defaults (SmolLM2-135M + shipped WikiText-2/HellaSwag).
# Each step is small so the whole script runs in a few minutes; scale the numbers up for real results.
#   ./scripts.sh                                    # SmolLM2 joint config
#   CONFIG=official_configs/tiny.yml ./scripts.sh   # the tiny random model (seconds)
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python}
CONFIG=${CONFIG:-official_configs/cpu_smollm2_joint.yml}
RUN=${RUN:-checkpoints/demo-$(date +%Y%m%d-%H%M%S)}
UPDATES=${UPDATES:-10}

# 1. GRPO training (single process), then continue it exactly with --resume
$PYTHON train.py --config "$CONFIG" --total_updates "$UPDATES" --output_dir "$RUN"
$PYTHON train.py --resume "$RUN" --total_updates $((UPDATES + 2))
# the same under torchrun (DDP over the policy; gloo on CPU, NCCL on GPUs):
#   torchrun --nproc_per_node=2 train.py --config "$CONFIG" --total_updates "$UPDATES"

# 2. perplexity on WikiText-2 test: policy vs dense, fixed, random (2 trials), EMC and DAC, matched usage
$PYTHON eval_perplexity.py --ckpt_dir "$RUN" --eval_batches 1 --batch_size 4 --tgt_keep 0.5 --tgt_prune_keep 0.7 \
    --tgt_quant_bits 8 --num_trials 2 --do_emc_and_driftaware --csv_path "$RUN/ppl_eval.csv"
#    a grid of targets into one CSV:  CKPT_DIR="$RUN" EVAL_BATCHES=1 ./eval_perplexity.sh

# 3. plots from the CSV
$PYTHON -m utils.plots pareto "$RUN/ppl_eval.csv" --out "$RUN/pareto.png"
$PYTHON -m utils.plots adherence "$RUN/ppl_eval.csv" --out "$RUN/adherence.png"

# 4. downstream accuracy on the shipped HellaSwag (offline task), policy + fixed matched to it, and dense
$PYTHON eval_downstream.py --ckpt_dir "$RUN" --tasks hellaswag_local --limit 10 --tgt_keep 0.5 --tgt_prune_keep 0.7 \
    --tgt_quant_bits 8 --fixed_from_policy --export_sparsity_json "$RUN/downstream_policy.json"
$PYTHON eval_downstream.py --ckpt_dir "$RUN" --tasks hellaswag_local --limit 10 --only_dense \
    --export_sparsity_json "$RUN/downstream_dense.json"
#    a sweep of budget points:  CKPT_DIR="$RUN" LIMIT=100 ./eval_downstream.sh

# 5. generation side by side
$PYTHON gen_policy_vs_dense.py --ckpt_dir "$RUN" --input_sentence "The history of the Roman Empire" \
    --generation_tokens 32 --tgt_keep 0.5 --tgt_prune_keep 0.7 --tgt_quant_bits 8

# 6. benchmarks (run alone on a quiet machine)
#   $PYTHON benchmarks/bench_decode_step.py
#   $PYTHON benchmarks/bench_train.py --config "$CONFIG"
#   $PYTHON benchmarks/bench_eval.py --ckpt_dir "$RUN"
echo "scripts.sh: all examples ran; outputs in $RUN"
