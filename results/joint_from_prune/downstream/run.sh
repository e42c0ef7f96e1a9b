#!/bin/bash
# HellaSwag (first 1000 items of the shipped validation, 0-shot, acc_norm) for the joint policy started from the prune
# policy (results/joint_from_prune/start/ckpt_seed1234, the one scored on test) at the middle joint headline point
# κ 0.5 / ρ 0.7 / 8 bits, with the fixed baseline at the policy's realised usage and the paired bootstrap 95% interval
# over items on the accuracy difference (`policy_minus_fixed` in the JSON). As results/joint_levels/downstream/run.sh.
set -euo pipefail
cd "$(dirname "$0")/../../.."
D=results/joint_from_prune/downstream
python eval_downstream.py --ckpt_dir results/joint_from_prune/start/ckpt_seed1234 --tasks hellaswag_local --limit 1000 \
  --tgt_keep 0.5 --tgt_prune_keep 0.7 --tgt_quant_bits 8 --batch_size 32 --fixed_from_policy --no_progress \
  --export_sparsity_json $D/hellaswag1000_k0p5_p0p7_q8.json 2>&1 | tee $D/hellaswag1000_k0p5_p0p7_q8_log.txt
