#!/usr/bin/env bash
# The gathered-execution benchmark (issue 16), SmolLM2-135M float32, batch 1, alone on the 2-core machine.
# Part A: MLP gate+up, end to end (256-token prompt), the shipped prune policy; 256 new tokens.
# Part B: attention at kappa 0.25 with 2048- and 8192-token prompts and the joint row; 64 new tokens (the
# 256 of part A took too long at 8192 tokens within one session).
set -euo pipefail
cd "$(dirname "$0")/../.."
PART=${PART:-A}
if [[ $PART == A ]]; then  # the MLP table with 9 interleaved rounds (it is cheap), the decode tables with 3
  python benchmarks/bench_gathered.py --model smollm2 --dtype float32 --runs 9 --skip e2e attention policy joint
  python benchmarks/bench_gathered.py --model smollm2 --dtype float32 --tokens 256 --runs 3 --e2e_prompt 256 \
    --skip mlp attention joint
else
  python benchmarks/bench_gathered.py --model smollm2 --dtype float32 --tokens 64 --runs 3 \
    --prompt_lens 2048 8192 --skip mlp e2e policy
fi
