"""The policy's share of a gathered generation, split (part U): the shipped prune policy
(results/prune_price_k16/ckpt_seed1234, knob table) generating 128 tokens at ρ 0.7 after a 256-token random prompt,
SmolLM2-135M fp32, 3 rounds, alone on the machine; per step (ms): the scheduler's `choose` (what the benchmark's
policy share counts), inside it the LM embedding of the input token, `SOLPolicy.step`, the native policy call and
`_head_terms` (the budget terms after pi(ln_f(x))).
Run alone: python results/bench_gathered/policy_parts.py"""
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_gathered import TimedScheduler, _generation  # noqa: E402
from utils import fast_policy, native  # noqa: E402
from utils.runtime import load_eval_bundle  # noqa: E402
from utils.schedulers import PolicyScheduler  # noqa: E402

b = load_eval_bundle(str(ROOT / "results/prune_price_k16/ckpt_seed1234"), device="cpu", execution="gathered")
lm, policy = b.lm, b.policy
kernel = native.gather_kernel()
if kernel is None:
    sys.exit("policy_parts.py: the native kernel is unavailable")
acc: dict = {}


def timed(name: str, f):
    def wrapper(*a, **k):
        t0 = time.perf_counter()
        out = f(*a, **k)
        acc[name] = acc.get(name, 0.0) + time.perf_counter() - t0
        return out
    return wrapper


class Kernel:
    def __getattr__(self, name):
        return getattr(kernel, name)


k = Kernel()
k.policy_step = timed("native policy call", kernel.policy_step)
native._STATE["gather"] = k
policy._sol_fast_step = timed("native_step (call + buffers)", fast_policy.native_step)
policy.step = timed("SOLPolicy.step", policy.step)
policy._head_terms = timed("_head_terms", policy._head_terms)
lm.embed = timed("LM embedding of the token", lm.embed)
prompt = torch.randint(0, lm.model.config.vocab_size, (256,), generator=torch.Generator().manual_seed(0)).tolist()
for r in range(3):
    acc.clear()
    tps, share, _ = _generation(lm, lambda: TimedScheduler(PolicyScheduler(policy, 0.6, greedy=True)), prompt, 128,
                                (1.0, 0.7, 1.0), b.cfg.rollout_len)
    print(f"round {r + 1}: {1e3 / tps:.1f} ms per decode step, choose {share * 1e3 / tps:.3f} ms ({100 * share:.1f}%); "
          + ", ".join(f"{n} {v / 128 * 1e3:.3f}" for n, v in acc.items()), flush=True)
