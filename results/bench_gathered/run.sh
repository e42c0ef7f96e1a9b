#!/usr/bin/env bash
# The gathered-execution benchmark (issue 16), SmolLM2-135M float32, batch 1, alone on the 2-core machine.
# Part A (part_a.md): MLP gate+up, end to end (256-token prompt), the cloned prune policy; 256 new tokens.
# Part B (part_b.md, measured before quest_tier existed: QUEST per_head only; today's script adds per_kv_head):
# attention at kappa 0.25 with 2048- and 8192-token prompts (QUEST page 4, as the joint config) and the joint
# row; 64 new tokens (256 take too long at 8192 tokens within one session).
# Part C (this machine, 2026-12-06; part_c.md): the MLP table, then recency and QUEST at kappa 0.25 with an
# 8192-token prompt only, QUEST with both page rankings at page 4 and at page 16 (the QUEST paper's page size).
# Part D (2026-12-06, a later session on the same CPU model, part_d.md): the MLP table, end to end and the policy
# table with the shipped GRPO prune policy (results/prune_price_k16/ckpt_seed1234, the bench's default now), then
# recency and QUEST (per_kv_head, page 16) at kappa 0.25 with an 8192-token prompt.
# Part E (2026-12-06, a later session, part_e.md): the MLP table with the native gather kernel (utils/native.py)
# beside the embedding_bag gather, end to end and the policy table, as part D's first two commands; then recency and
# QUEST (per_kv_head, page 16) at kappa 0.25 and the joint row at 8192 tokens (that third command was run on its own
# right after the first two and appended to part_e.md).
# Part F (2026-12-06, a later session, part_f.md): the native kernel with the kept rows split over the threads (it
# split the output columns before): the MLP table, end to end and the policy table as part E, then the joint row
# (recency kappa 0.25 + s40) at 8192 tokens.
# Part G (same session, right after part F, part_g.md): the end-to-end table alone, now with the gate+up share of
# a dense step timed in the same rounds and the bound that share allows.
# Part H (same session, part_h.md): gathered decode steps through utils/fast_decode.py (the same layers without the
# Hugging Face module stack): the end-to-end table with the gate+up share, the policy table, the joint row.
# Part I (a later session, part_i.md): the policy table after the budget-only logit terms moved out of the policy's
# decode step (computed once per episode), then benchmarks/bench_policy_step.py (the step alone, both ways).
# Part J (2026-12-06/07, a later session, part_j.md): every batch-1 weight product of the gathered execution input-major
# through the native every-row loop (dense steps too; benchmarks/bench_layout.py first), the LM head included: the
# MLP table, the layout table, end to end and the policy table, then recency and QUEST (per_kv_head, page 16) at
# kappa 0.25 with 2048- and 8192-token prompts and the joint row.
# Part K (same session, right after part J, part_k.md): recency attention over the sinks and the recent slice without
# joining them (two SDPA spans merged by their log-sum-exps) and the policy's widening Linear layers input-major in the
# gathered execution: the policy table, recency and QUEST at 2048 and 8192 and the joint row; then where a step's time
# goes (step_parts.py) and the hand-written lean loop with the same native products (plain_step.py --native).
# (Parts G and H printed "at most" before the e2e bound; the script says "about" since: the products timed alone do
# not run exactly as they do inside a step.)
# Part L (same session, after part K, part_l.md): a controlled step that keeps every MLP channel (κ-only actions, the
# policy's dense choices) runs its gate+up product on the native loop like a dense step (it ran through BLAS in parts
# J and K): the policy table, recency and QUEST at 2048 and 8192 and the joint row, as part K's first two commands.
# Part M (same session, after part L, part_m.md): the end-to-end table again (a second run of part J's, on the final code).
# Part N (2026-12-07, a later session, part_n.md): the one-call native decode step (utils/csrc/decode_step.cpp: every
# layer of a batch-1 float32 dense, recency or top-|x| MLP step in one C++ call) and the policy's Linear layers on the
# native loop: the end-to-end table, now with a lockstep ratio (s40 and dense generations advanced side by side, one
# step of each in turn), and the policy table.
# Part O (same session, after part N, part_o.md): the final code of that session (QUEST in the native step too; the
# kernel prefetches the next rows): the end-to-end table with the lockstep ratio, the policy table, recency and QUEST
# (per_kv_head, page 16) at kappa 0.25 with 2048- and 8192-token prompts and the joint row.
# Part P (same session, right after part O, part_p.md): the end-to-end table alone again, 5 rounds (a second sample of
# both ratios on the final code).
# Part Q (same session, after part P, part_q.md): the policy table with its cells timed in turn within each round
# (dense steps and each rho once per round, order rotated; ratios are medians of the rounds' ratios), as the e2e
# table does: timed one cell after another, its rows had moved with the machine's drift.
# Part R (same session, after part Q, part_r.md): batches of 2 and 4 rows with an action per row (s40 on every row,
# s40 on the even rows only), 64 new tokens per row, both executions against their own dense steps.
# Part S (same session, after part R, part_s.md): the measurements behind docs/usage.md's "What limits end to end"
# and the kernel's prefetch, as committed scripts: native_parts.py (the native call alone, dense vs s40; lockstep
# generations split inside/outside the call; the per-step Python pieces), prefetch_ab/ab.py (the gather loop with and
# without the row prefetch), and the policy step alone in both executions (bench_policy_step.py).
# Part T (2026-12-07, a later session, part_t.md): the gather kernel's threads take contiguous blocks of rows (eight at a
# time for short rows), attention's exponentials vectorised, the token's embedding and rotary row read inside the native
# call, and the policy's batch-1 step as one native call (utils/fast_policy.py): the kernel A/B against commit 2f29920
# (kernel_ab/ab.py), native_parts.py, the end-to-end table (5 rounds), the policy table, the policy step alone.
# Part U (same session, right after part T and the SiLU change, part_u.md): the MLP table (9 interleaved rounds), then
# recency and QUEST (per_kv_head, page 16) at kappa 0.25 with 2048- and 8192-token prompts and the joint row.
# Part U2 (same session, right after part U, part_u2.md): where a step's time goes outside the native call, timed in
# place (step_outside.py), and the policy's share split (policy_parts.py).
# Part V (same session, after part U2, part_v.md): batches of more than one row with the native multi-row product
# (`gemm_rows`): the layout table at 4 rows, then part R's batch table (2 and 4 rows).
# Part W (same session, after part V, part_w.md): part R's batch table again, the gate+up of 2-8 rows now one native
# pass over the union of their kept channels (`gathered.union_gate_up`).
# Part W2 (same session, right after part W, part_w2.md): the same table with the union pass only where the rows' kept
# channels add up to at most one dense pass (`Controls.gather_limit`, as the per-row gathers before it), the masked
# dense product through the multi-row loop otherwise.
# Part X (same session, the final code, part_x.md): a second sample of the end-to-end table (5 rounds) and
# native_parts.py.
# Part Y (2026-12-07, part_y.md): the weights in 2 MiB pages (utils/weight_arena.py) against 4 KiB pages in one
# process (huge_pages_ab.py), then the end-to-end table (5 rounds) and native_parts.py with huge pages (the default).
# Part Z (2026-12-07, a later session, part_z.md): after the batch-1 step's planning moved to the host (ae63f48):
# step_outside.py, the end-to-end table (5 rounds), the MLP table, native_parts.py, the gather loop's variants
# (rows_ab/ab.py), the end-to-end and policy tables together (5 rounds), then the two end-to-end protocols in one
# process (protocol_ab.py).
set -euo pipefail
cd "$(dirname "$0")/../.."
PART=${PART:-A}
B="python benchmarks/bench_gathered.py --model smollm2 --dtype float32"
if [[ $PART == A ]]; then  # the MLP table with 9 interleaved rounds (it is cheap), the decode tables with 3
  $B --runs 9 --skip e2e attention policy joint
  $B --tokens 256 --runs 3 --e2e_prompt 256 --skip mlp attention joint
elif [[ $PART == B ]]; then
  $B --tokens 64 --runs 3 --prompt_lens 2048 8192 --skip mlp e2e policy
elif [[ $PART == C ]]; then
  $B --runs 9 --skip e2e attention policy joint
  $B --tokens 64 --runs 3 --prompt_lens 8192 --criteria recency quest --page_size 4 --skip mlp e2e policy joint
  $B --tokens 64 --runs 3 --prompt_lens 8192 --criteria quest --page_size 16 --skip mlp e2e policy joint
elif [[ $PART == E ]]; then
  $B --runs 9 --skip e2e attention policy joint
  $B --tokens 256 --runs 3 --e2e_prompt 256 --skip mlp attention joint
  $B --tokens 64 --runs 3 --prompt_lens 8192 --criteria recency quest --quest_tiers per_kv_head --page_size 16 \
    --skip mlp e2e policy
elif [[ $PART == F ]]; then
  $B --runs 9 --skip e2e attention policy joint
  $B --tokens 256 --runs 3 --e2e_prompt 256 --skip mlp attention joint
  $B --tokens 64 --runs 3 --prompt_lens 8192 --skip mlp e2e policy attention
elif [[ $PART == G ]]; then
  $B --tokens 256 --runs 3 --e2e_prompt 256 --skip mlp attention joint policy
elif [[ $PART == I ]]; then
  $B --tokens 256 --runs 3 --e2e_prompt 256 --skip mlp e2e attention joint
  python benchmarks/bench_policy_step.py
elif [[ $PART == J ]]; then
  $B --runs 9 --skip e2e attention policy joint
  python benchmarks/bench_layout.py
  $B --tokens 256 --runs 3 --e2e_prompt 256 --skip mlp attention joint
  $B --tokens 64 --runs 3 --prompt_lens 2048 8192 --criteria recency quest --quest_tiers per_kv_head --page_size 16 \
    --skip mlp e2e policy
elif [[ $PART == K ]]; then
  $B --tokens 256 --runs 3 --e2e_prompt 256 --skip mlp e2e attention joint
  $B --tokens 64 --runs 3 --prompt_lens 2048 8192 --criteria recency quest --quest_tiers per_kv_head --page_size 16 \
    --skip mlp e2e policy
  python results/bench_gathered/step_parts.py
  python results/bench_gathered/plain_step.py --native
elif [[ $PART == L ]]; then
  $B --tokens 256 --runs 3 --e2e_prompt 256 --skip mlp e2e attention joint
  $B --tokens 64 --runs 3 --prompt_lens 2048 8192 --criteria recency quest --quest_tiers per_kv_head --page_size 16 \
    --skip mlp e2e policy
elif [[ $PART == M ]]; then
  $B --tokens 256 --runs 3 --e2e_prompt 256 --skip mlp attention joint policy
elif [[ $PART == N ]]; then
  $B --tokens 256 --runs 3 --e2e_prompt 256 --skip mlp attention joint
elif [[ $PART == O ]]; then
  $B --tokens 256 --runs 3 --e2e_prompt 256 --skip mlp attention joint
  $B --tokens 64 --runs 3 --prompt_lens 2048 8192 --criteria recency quest --quest_tiers per_kv_head --page_size 16 \
    --skip mlp e2e policy
elif [[ $PART == P ]]; then
  $B --tokens 256 --runs 5 --e2e_prompt 256 --skip mlp attention joint policy
elif [[ $PART == Q ]]; then
  $B --tokens 256 --runs 3 --e2e_prompt 256 --skip mlp e2e attention joint
elif [[ $PART == R ]]; then
  $B --tokens 64 --runs 3 --e2e_prompt 256 --batches 2 4 --skip mlp e2e attention joint policy
elif [[ $PART == S ]]; then
  python results/bench_gathered/native_parts.py
  python results/bench_gathered/prefetch_ab/ab.py
  python benchmarks/bench_policy_step.py --execution simulated
  python benchmarks/bench_policy_step.py --execution gathered
elif [[ $PART == T ]]; then
  python results/bench_gathered/kernel_ab/ab.py
  python results/bench_gathered/native_parts.py
  $B --tokens 256 --runs 5 --e2e_prompt 256 --skip mlp attention joint policy
  $B --tokens 256 --runs 3 --e2e_prompt 256 --skip mlp e2e attention joint
  python benchmarks/bench_policy_step.py --execution gathered
elif [[ $PART == U ]]; then
  $B --runs 9 --skip e2e attention policy joint
  $B --tokens 64 --runs 3 --prompt_lens 2048 8192 --criteria recency quest --quest_tiers per_kv_head --page_size 16 \
    --skip mlp e2e policy
elif [[ $PART == U2 ]]; then
  python results/bench_gathered/step_outside.py
  python results/bench_gathered/policy_parts.py
elif [[ $PART == V ]]; then
  python benchmarks/bench_layout.py --rows 4
  $B --tokens 64 --runs 3 --e2e_prompt 256 --batches 2 4 --skip mlp e2e attention joint policy
elif [[ $PART == W || $PART == W2 ]]; then
  $B --tokens 64 --runs 3 --e2e_prompt 256 --batches 2 4 --skip mlp e2e attention joint policy
elif [[ $PART == X ]]; then
  $B --tokens 256 --runs 5 --e2e_prompt 256 --skip mlp attention joint policy
  python results/bench_gathered/native_parts.py
elif [[ $PART == Y ]]; then
  python results/bench_gathered/huge_pages_ab.py
  $B --tokens 256 --runs 5 --e2e_prompt 256 --skip mlp attention joint policy
  python results/bench_gathered/native_parts.py
elif [[ $PART == Z ]]; then
  python results/bench_gathered/step_outside.py
  $B --tokens 256 --runs 5 --e2e_prompt 256 --skip mlp attention joint policy
  $B --runs 5 --skip e2e attention policy joint
  python results/bench_gathered/native_parts.py
  python results/bench_gathered/rows_ab/ab.py
  $B --tokens 256 --runs 5 --e2e_prompt 256 --skip mlp attention joint
  python results/bench_gathered/protocol_ab.py
elif [[ $PART == H ]]; then
  $B --tokens 256 --runs 3 --e2e_prompt 256 --skip mlp attention joint
  $B --tokens 64 --runs 3 --prompt_lens 8192 --skip mlp e2e policy attention
else
  $B --runs 9 --skip e2e attention policy joint
  $B --tokens 256 --runs 3 --e2e_prompt 256 --skip mlp attention joint
  $B --tokens 64 --runs 3 --prompt_lens 8192 --criteria recency quest --quest_tiers per_kv_head --page_size 16 \
    --skip mlp e2e policy joint
fi
