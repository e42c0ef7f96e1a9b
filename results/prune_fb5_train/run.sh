#!/bin/bash
# The shipped prune price recipe (official_configs/cpu_smollm2_prune_price.yml, K = 16) with the integral budget
# feedback on during training at gain 5 (budget_feedback_in_training: true, budget_feedback_gain: 5), the gain the
# knob table runs with at inference. The recipe trains without it because at gain 20 the K rollouts of an input
# followed nearly the same schedule; at gain 5 the network's own preference still decides most steps on dev
# (results/prune_price_g5). Seed $SEED (1235: the seed whose shipped run has a dev check), then the dev check of
# results/prune_price/dev.sh. Rule fixed before it ran: a lead for a multi-seed run if its dev PPL is lower than
# the shipped run's (results/prune_price_k16/dev_seed1235.txt) at >= 2 of 3 points with usage within 0.03.
#   SEED=1235 results/prune_fb5_train/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
D=results/prune_fb5_train SETS="--set budget_feedback_in_training=true --set budget_feedback_gain=5" TAG=fb5train \
  DEV=${DEV:-1} exec results/prune_price_k16/run.sh
