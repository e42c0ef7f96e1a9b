"""Generate with the SOL policy beside the dense model and compare.

    python gen_policy_vs_dense.py --ckpt_dir results/ckpt_joint --input_sentence "The capital of France is" \\
        --generation_tokens 64 --tgt_keep 0.65 --tgt_prune_keep 0.7 --tgt_quant_bits 8

One LM in memory: the dense continuation runs the same ControlledLM with no actions (plain decode steps),
the policy continuation picks an action per token (KV cache, dense episode replay every --episode_len
tokens, utils/runtime.py). Prints both continuations with their character counts, the mean per-token
log-prob of each continuation under the dense model (one dense forward each, on the generated token ids),
and the policy's achieved token keep, prune keep and quant ratio (averages over effective steps).
Also prints the decode speed of both continuations (tokens/s after the prompt prefill; the policy's includes
its network and the dense replays; both run in the same --execution mode).
Generation stops after --generation_tokens tokens or at the tokenizer's EOS token.
"""
from __future__ import annotations

import argparse
import random
import sys

from utils.cli import OneLineErrorParser, SOLError, need


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from utils.runtime import add_policy_args

    p = OneLineErrorParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_policy_args(p)
    p.add_argument("--input_sentence", default="The quick brown fox jumps over the lazy dog. Once upon a time,",
                   help="the prompt (plain text, no chat template)")
    p.add_argument("--generation_tokens", type=int, default=256, help="new tokens to generate (default 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="LM sampling temperature (0 = greedy)")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling mass (with --temperature > 0)")
    p.add_argument("--top_k", type=int, default=0, help="top-k sampling (0 = off; with --temperature > 0)")
    return p.parse_args(argv)


def _check_args(a: argparse.Namespace) -> None:
    from utils.runtime import check_policy_args

    check_policy_args(a)
    need(a.generation_tokens >= 1, f"--generation_tokens must be >= 1, got {a.generation_tokens}")
    need(a.temperature >= 0, f"--temperature must be >= 0, got {a.temperature}")
    need(0 < a.top_p <= 1, f"--top_p must be in (0, 1], got {a.top_p}")
    need(a.top_k >= 0, f"--top_k must be >= 0, got {a.top_k}")
    need(a.input_sentence != "", "--input_sentence is empty")


def _mean_logprob(lm, prompt_ids: list[int], ids: list[int]) -> float:
    from utils.runtime import dense_token_logprobs

    if not ids:
        return float("nan")
    return float(dense_token_logprobs(lm, prompt_ids, ids).mean())


def _tokens_per_s(n_tokens: int, seconds: float) -> float:
    """Generated tokens per second of decoding (nan when nothing was timed)."""
    return n_tokens / seconds if seconds > 0 else float("nan")


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    try:
        _check_args(a)
        import numpy as np
        import torch

        from utils.cli import checkpoint_overrides
        from utils.runtime import UsageTracker, generate, load_eval_bundle, make_scheduler, resolve_policy_settings

        random.seed(a.seed)
        np.random.seed(a.seed)
        torch.manual_seed(a.seed)
        b = load_eval_bundle(a.ckpt_dir, a.mode, a.device, a.trust_checkpoint, execution=a.execution,
                             overrides=checkpoint_overrides(a))
        budgets, biases, E = resolve_policy_settings(a, b.cfg)
    except (SOLError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    lm, tok = b.lm, b.lm.tokenizer
    prompt_ids = list(tok(a.input_sentence, add_special_tokens=False).input_ids)
    if tok.bos_token_id is not None and tok("a").input_ids[:1] == [tok.bos_token_id]:
        prompt_ids = [tok.bos_token_id] + prompt_ids  # the tokenizer wants a BOS
    max_new = min(a.generation_tokens, lm.model.config.max_position_embeddings - len(prompt_ids) + 1)
    stop_ids = [tok.eos_token_id] if tok.eos_token_id is not None else []
    sample = dict(temperature=a.temperature, top_p=a.top_p, top_k=a.top_k)

    print(f"checkpoint {b.ckpt_path}  model {b.cfg.model_name}  episode_len {E}  targets: keep {budgets[0]:.3f}  "
          f"prune_keep {budgets[1]:.3f}  quant_bits {16 * budgets[2]:.2f}  policy {'greedy' if a.greedy_policy else 'sampled'}"
          f"  execution {a.execution}")
    print(f"\nPrompt: {a.input_sentence}")

    gen = torch.Generator(device=lm.device).manual_seed(a.seed)
    dense_ids, dense_stats = generate(lm, make_scheduler("plain", lm), prompt_ids, max_new, (1.0, 1.0, 1.0), E,
                                      generator=gen, stop_ids=stop_ids, **sample)
    dense_text = tok.decode(dense_ids, skip_special_tokens=True)
    print(f"\nDense continuation:\n{dense_text}\n[chars: {len(dense_text)}]")

    gen = torch.Generator(device=lm.device).manual_seed(a.seed)
    sched = make_scheduler("policy", lm, b.policy, policy_temperature=a.policy_temperature,
                           greedy=a.greedy_policy, seed=a.seed, biases=biases)
    pol_ids, stats = generate(lm, sched, prompt_ids, max_new, budgets, E, generator=gen, stop_ids=stop_ids, **sample)
    pol_text = tok.decode(pol_ids, skip_special_tokens=True)
    print(f"\nPolicy continuation:\n{pol_text}\n[chars: {len(pol_text)}]")

    tracker = UsageTracker(lm.actions.tags)
    tracker.add(stats)
    s = tracker.summary()
    print(f"\nMean logprob under dense LM -> policy: {_mean_logprob(lm, prompt_ids, pol_ids):.4f}, "
          f"dense: {_mean_logprob(lm, prompt_ids, dense_ids):.4f}")
    print(f"Achieved Token-Keep-Rate: {100 * s['keep_avg_eff']:.1f}%")
    print(f"Achieved Prune-Keep: {100 * s['prune_avg_eff']:.1f}%")
    print(f"Achieved Quant-Ratio: {s['quant_ratio_avg_eff']:.3f} ({16 * s['quant_ratio_avg_eff']:.2f} bits)")
    print(f"Realised attention keep: {100 * s['attn_keep_realised_eff']:.1f}%  channel keep: "
          f"{100 * s['channel_keep_realised_eff']:.1f}%  FLOPs: {s['flops_ratio']:.3f}x dense  "
          f"steps: {s['n_steps']} ({s['effective_steps']} effective, {s['dense_refreshes']} dense replays)")
    print(f"Tokens/s -> policy: {_tokens_per_s(len(pol_ids), stats.decode_seconds):.1f}, "
          f"dense: {_tokens_per_s(len(dense_ids), dense_stats.decode_seconds):.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
