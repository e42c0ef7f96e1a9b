#!/bin/bash
# The price recipe (official_configs/cpu_smollm2_prune_price.yml) for three epochs instead of two (168 updates,
# 31 minutes alone), seed 1234, then the dev check of results/prune_price/dev.sh with the feedback added at
# evaluation. Its first 112 updates are the two-epoch run's (same data order, constant learning rate).
set -euo pipefail
cd "$(dirname "$0")/../.."
SEED=1234 NAME=prune_price_e3 EXTRA="--set epochs=3 --set eval_every_updates=56" results/prune_price/run.sh
CKPT=results/prune_price_e3/ckpt_seed1234 CSV=results/prune_price_e3/dev_ppl.csv TAG=price_e3 \
  FB="--budget_feedback_gain 20 --policy_logit_bound 2" results/prune_price/dev.sh
