#!/usr/bin/env bash
# float32 vs bfloat16 frozen base on the full WikiText-2 test split (docs/throughput.md); ~36 min alone.
set -euo pipefail
cd "$(dirname "$0")/../.."
python benchmarks/check_dtype.py | tee results/check_dtype/check_dtype.md
