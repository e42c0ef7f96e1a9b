#!/bin/bash
# Parity with the reference (issue 15, item 0): the reference's Prune_S40S100 recipe scaled to SmolLM2 as the
# reference's own run on this CPU (context 256, batch 2, grad_accum 4, K 8), on the reference's data layout:
# train on WikiText-2 test.txt (newlines stripped), score on the first 2,000 lines of valid.txt.
# The frozen LM runs in bfloat16 (quality-equivalent to float32 on this model, results/check_dtype); DTYPE=float32
# on a CPU without bfloat16 instructions (no avx512_bf16 / AMX in lscpu), where bfloat16 is ~3x slower.
set -euo pipefail
cd "$(dirname "$0")/../.."
python results/parity_reference/make_data.py
SEED=${SEED:-1234}
python train.py --config official_configs/Prune_S40S100.yml --output_dir results/parity_reference/seed$SEED \
  --set model_name=smollm2-135m --set dataset_name=block_cache/parity/{split}.jsonl --set dataset_config=null \
  --set text_field=text --set context_len=256 --set batch_size=2 --set grad_accum_steps=4 \
  --set grpo_rollouts_per_input=8 --set train_fraction=1.0 --set dev_fraction=0 --set dtype=${DTYPE:-bfloat16} --set seed=$SEED
