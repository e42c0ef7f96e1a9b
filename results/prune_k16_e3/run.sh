#!/bin/bash
# Three epochs of the K = 16 price recipe (official_configs/cpu_smollm2_prune_price.yml, 168 updates instead of
# 112), seed 1235, dev only unless adopted. The question: results/prune_price_k16's dev placement correlation was
# still rising at update 112 for all three seeds (0.02-0.12 at update 56, 0.10-0.19 at 112); does a third epoch
# turn that into a larger gain over fixed?
#   results/prune_k16_e3/run.sh                                   # train + export (bfloat16, as shipped)
#   TRAIN=0 DEV=1 results/prune_k16_e3/run.sh                     # dev check (results/prune_price/dev.sh)
set -euo pipefail
cd "$(dirname "$0")/../.."
D=results/prune_k16_e3 SETS="--set epochs=3 ${SETS:-}" TAG=k16e3 SEED=${SEED:-1235} results/prune_price_k16/run.sh
