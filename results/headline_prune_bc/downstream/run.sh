# HellaSwag (first 1000 items, 0-shot) for the cloned-then-GRPO prune policy at two budgets, each with the fixed
# baseline at the policy's realised usage. Dense on the same items: results/headline_prune/downstream/ (0.431).
set -e
D=results/headline_prune_bc/downstream
for p in 0.5 0.7; do
  python eval_downstream.py --ckpt_dir results/ckpt_prune_bc --tasks hellaswag_local --limit 1000 --tgt_prune_keep $p \
      --batch_size 32 --fixed_from_policy --export_sparsity_json $D/hellaswag1000_p${p/./p}.json
done
