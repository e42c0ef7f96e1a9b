# The commands behind results/prune_bc_cal (cloning with the in-episode-corrected teacher; the shipped prune
# headline, results/ckpt_prune_bc_cal) and results/prune_bc_cal_grpo (the same clone, then 225 GRPO updates:
# worse on dev, not shipped), as run on the 2-core CPU machine. `make headline-prune-bc` runs the shipped chain.
set -e
CFG=official_configs/cpu_smollm2_prune_lmfeats.yml
# damage map of 256 train blocks (see results/damage_probe/run.sh; 14 min)
# python -m utils.damage_probe collect --config official_configs/cpu_smollm2_prune.yml --set dtype=float32 --split train --blocks 256 \
#   --save results/damage_probe/map_train256.pt
python -m utils.imitation --config $CFG --set dtype=float32 --teacher results/damage_probe/map_train256.pt --features +scalars \
  --output_dir checkpoints/prune_bc_cal --blocks 512                                    # 9 min (64 calibration blocks)
python train.py --config $CFG --set dtype=float32 --checkpoint_path checkpoints/prune_bc_cal/policy_latest.pt \
  --output_dir checkpoints/prune_bc_cal_grpo --total_updates 225                        # 14 min
for run in prune_bc_cal_grpo prune_bc_cal; do                                           # 6 min each
  CKPT_DIR=checkpoints/$run CSV_PATH=results/$run/dev96_ppl.csv SPLIT=dev EVAL_BATCHES=6 BATCH_SIZE=16 NUM_TRIALS=0 \
    POINTS="1,0.5,16 1,0.7,16 1,0.8,16 1,0.9,16" EXTRA="--no_progress" ./eval_perplexity.sh > results/$run/dev96_log.txt 2>&1
done
# the previous headline (results/ckpt_prune_bc: clone without the correction, then GRPO) at the loose end, for comparison
CKPT_DIR=results/ckpt_prune_bc CSV_PATH=results/prune_bc_grpo/dev96_loose_ppl.csv SPLIT=dev EVAL_BATCHES=6 BATCH_SIZE=16 \
  NUM_TRIALS=0 POINTS="1,0.8,16 1,0.9,16" EXTRA="--no_progress" ./eval_perplexity.sh > results/prune_bc_grpo/dev96_loose_log.txt 2>&1
python -m utils.checkpoint export checkpoints/prune_bc_cal results/ckpt_prune_bc_cal
CKPT_DIR=results/ckpt_prune_bc_cal CSV_PATH=results/headline_prune_bc_cal/test_ppl.csv SPLIT=test EVAL_BATCHES=8 BATCH_SIZE=32 \
  NUM_TRIALS=8 EMC_DAC=1 POINTS="1,0.5,16 1,0.6,16 1,0.7,16 1,0.8,16 1,0.9,16" \
  EXTRA="--keep_prefill_mb 4096 --no_progress" ./eval_perplexity.sh > results/headline_prune_bc_cal/test_log.txt 2>&1
# is the GRPO stage's overspend on dev argmax against sampling? sample at the training temperature (3 min)
CKPT_DIR=checkpoints/prune_bc_cal_grpo CSV_PATH=results/prune_bc_cal_grpo/dev96_sampled_t1.3_ppl.csv SPLIT=dev EVAL_BATCHES=6 \
  BATCH_SIZE=16 NUM_TRIALS=0 POINTS="1,0.5,16 1,0.9,16" EXTRA="--no_progress --stochastic_policy --policy_temperature 1.3" \
  ./eval_perplexity.sh > results/prune_bc_cal_grpo/dev96_sampled_t1.3_log.txt 2>&1
