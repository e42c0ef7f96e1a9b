# HellaSwag (first 1000 items, 0-shot) for the shipped cloned prune policy (results/ckpt_prune_bc_cal) at ρ 0.7 and 0.5,
# each with the fixed baseline at the policy's realised usage. Dense on the same items: results/headline_prune/downstream/ (0.431).
set -e
D=results/headline_prune_bc_cal/downstream
python eval_downstream.py --ckpt_dir results/ckpt_prune_bc_cal --tasks hellaswag_local --limit 1000 --tgt_prune_keep 0.7 \
    --batch_size 32 --fixed_from_policy --export_sparsity_json $D/hellaswag1000_p0p7.json > $D/hellaswag1000_log.txt 2>&1
python eval_downstream.py --ckpt_dir results/ckpt_prune_bc_cal --tasks hellaswag_local --limit 1000 --tgt_prune_keep 0.5 \
    --batch_size 32 --fixed_from_policy --export_sparsity_json $D/hellaswag1000_p0p5.json > $D/hellaswag1000_log_p0p5.txt 2>&1
