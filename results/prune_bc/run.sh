# The commands behind results/prune_bc (cloning only) and results/prune_bc_grpo (cloning, then GRPO), as run
# on the 2-core CPU machine. The clone predates the in-episode budget correction, hence --calibrate_blocks 0
# (the default now corrects it; `make headline-prune-bc` runs the corrected clone, results/prune_bc_cal/run.sh).
set -e
CFG=official_configs/cpu_smollm2_prune_lmfeats.yml
# damage map of 256 train blocks (see results/damage_probe/run.sh; 14 min)
# python -m utils.damage_probe collect --config official_configs/cpu_smollm2_prune.yml --set dtype=float32 --split train --blocks 256 \
#   --save results/damage_probe/map_train256.pt
python -m utils.imitation --config $CFG --set dtype=float32 --teacher results/damage_probe/map_train256.pt --features +scalars \
  --output_dir checkpoints/prune_bc --blocks 512 --calibrate_blocks 0 --no_progress                                  # 11 min
python train.py --config $CFG --set dtype=float32 --checkpoint_path checkpoints/prune_bc/policy_latest.pt \
  --output_dir checkpoints/prune_bc_grpo --total_updates 225                                    # 14 min
for run in prune_bc prune_bc_grpo; do                                                           # 3 min each
  CKPT_DIR=checkpoints/$run CSV_PATH=results/$run/dev96_ppl.csv SPLIT=dev EVAL_BATCHES=6 BATCH_SIZE=16 NUM_TRIALS=0 \
    POINTS="1,0.5,16 1,0.7,16" EXTRA="--no_progress" ./eval_perplexity.sh > results/$run/dev96_log.txt 2>&1
done
python -m utils.checkpoint export checkpoints/prune_bc_grpo results/ckpt_prune_bc
CKPT_DIR=results/ckpt_prune_bc CSV_PATH=results/headline_prune_bc/test_ppl.csv SPLIT=test EVAL_BATCHES=8 BATCH_SIZE=32 \
  NUM_TRIALS=8 EMC_DAC=1 POINTS="1,0.5,16 1,0.6,16 1,0.7,16 1,0.8,16 1,0.9,16" \
  EXTRA="--keep_prefill_mb 4096 --no_progress" ./eval_perplexity.sh > results/headline_prune_bc/test_log.txt 2>&1
