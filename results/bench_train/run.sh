#!/usr/bin/env bash
# Training throughput table of docs/throughput.md (run alone on the 2-core CPU machine; ~12 min).
set -euo pipefail
cd "$(dirname "$0")/../.."
python benchmarks/bench_train.py | tee results/bench_train/bench_train.md
