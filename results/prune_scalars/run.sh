#!/bin/bash
# The shipped prune price recipe (official_configs/cpu_smollm2_prune_price.yml, K = 16) with the policy blind to
# the LM's hidden state and to the next token's embedding (policy_use_hidden / policy_use_token false): it still
# reads the ten scalars, among them the input token's surprisal and entropy under the LM. Why: the damage probe
# found those two scalars carry most of the predictable part of a cheap step's damage, and the hidden-state policy
# places its cheap steps no better on its own training blocks than on dev: the question is whether GRPO learns
# placement faster from a few scalars than from a 576-d state. Same seeds and data order as
# results/prune_price_k16, whose script runs it. Float32: this machine has no bfloat16 instructions.
# The rule, fixed before the dev run, is in README.md.
#   SEED=1235 results/prune_scalars/run.sh                   # train + export + dev check
#   SEED=S TRAIN=0 DEV=0 SCORE=1 NUM_TRIALS=2 EMC_DAC=0 results/prune_scalars/run.sh   # test, once per seed
set -euo pipefail
cd "$(dirname "$0")/../.."
D=results/prune_scalars TAG=scalars DEV=${DEV:-1} SETS="--set dtype=float32 --set policy_use_hidden=false \
--set policy_use_token=false" exec results/prune_price_k16/run.sh
