"""Where a gathered decode step's time goes with the one-call native step (SmolLM2 fp32, batch 1, alone on the
machine). Three measurements, each printed as it is done:
1. the native call alone (`decode_layers`), dense against s40, on the same cache state after a 384-token prompt
   (the new token overwritten each call), 50 calls per cell, alternating cells, 5 rounds; and the LM head product;
2. dense and s40 generations of 256 tokens after a 256-token prompt advanced in lockstep, each step timed whole
   and inside the native call, 3 rounds;
3. the per-step Python pieces of a controlled s40 step, each timed alone (µs).
Run alone: python results/bench_gathered/native_parts.py (needs the native kernel). (Part T: the call's signature
changed to take the token and the rotary tables; this script follows it.)"""
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from utils import fast_decode, native  # noqa: E402
from utils.actions import ActionSpace  # noqa: E402
from utils.lm import ControlledLM  # noqa: E402
from utils.model import SMOLLM2_ALIAS, load_lm  # noqa: E402

kernel = native.gather_kernel()
if kernel is None:
    sys.exit("native_parts.py: the native kernel is unavailable (no C++ compiler or ninja, or SOL_NATIVE_KERNEL=0)")
base, tok = load_lm(SMOLLM2_ALIAS, "float32")
SPACE = ActionSpace.build([0.25, 1.0], ["s40", "s100"], ["q16"])
lm = ControlledLM(base, tok, SPACE, "recency", Ts=4, Tw=2, execution="gathered")
S40 = torch.tensor([SPACE.index(1.0, 0.4, 16)])
m = base.model
H = base.config.hidden_size
KTH = H - -(-4 * H // 10) + 1  # s40: keep ceil(0.4 H) channels


def us(f, n=300) -> float:
    f()
    t0 = time.perf_counter()
    for _ in range(n):
        f()
    return (time.perf_counter() - t0) / n * 1e6


with torch.inference_mode():
    # 1. the native call alone
    cache, _, _ = lm.prefill(torch.randint(0, base.config.vocab_size, (1, 384), generator=torch.Generator().manual_seed(2)))
    weights, final_norm, eps, scaling = fast_decode._native_spec(base)
    slots, L = cache.next_slots(), cache.get_seq_length()
    tok5, cos, sin = torch.tensor([5]), *fast_decode._rope_tables(base, L + 1)
    nh, nkv = base.config.num_attention_heads, base.config.num_key_value_heads

    def call(kth: int) -> None:
        kernel.decode_layers(torch.empty(H), m.embed_tokens.weight, tok5, weights, slots, final_norm, cos, sin, L, nh,
                             nkv, eps, scaling, kth, 4, 0, 0, 0, False, 0, 0, [], 0, None)

    res = {0: [], KTH: []}
    for _ in range(5):
        acc = {0: 0.0, KTH: 0.0}
        for i in range(50):
            for kth in ((0, KTH) if i % 2 == 0 else (KTH, 0)):
                t0 = time.perf_counter()
                call(kth)
                acc[kth] += time.perf_counter() - t0
        for k in acc:
            res[k].append(acc[k] / 50 * 1e3)
    head = us(lambda: kernel.gemv(torch.randn(H), base.lm_head.weight.t()), 50) / 1e3
    print(f"1. native call alone, 384-token cache: dense {statistics.median(res[0]):.2f} ms, s40 "
          f"{statistics.median(res[KTH]):.2f} ms ({statistics.median(a / b for a, b in zip(res[0], res[KTH])):.2f}x); "
          f"LM head {head:.2f} ms", flush=True)

    # 2. lockstep generations, time inside the native call
    inside = [0.0]
    real = kernel.decode_layers

    class Timed:
        def __getattr__(self, name):
            return getattr(kernel, name)

        def decode_layers(self, *a):
            t0 = time.perf_counter()
            out = real(*a)
            inside[0] += time.perf_counter() - t0
            return out

    native._STATE["gather"] = Timed()
    cache, _, logits = lm.prefill(torch.randint(0, base.config.vocab_size, (1, 256), generator=torch.Generator().manual_seed(0)))
    acts = [None, S40]
    for r in range(4):  # the first round warms up
        caches = [lm.clone_cache(cache, spare=257) for _ in acts]
        toks, secs, nat = [logits.argmax(-1)] * 2, [0.0, 0.0], [0.0, 0.0]
        for t in range(256):
            for i in ((0, 1) if t % 2 == 0 else (1, 0)):
                inside[0] = 0.0
                t0 = time.perf_counter()
                toks[i] = lm.step(caches[i], toks[i], acts[i]).logits.argmax(-1)
                secs[i] += time.perf_counter() - t0
                nat[i] += inside[0]
        if r:
            print(f"2. lockstep round {r}: dense {secs[0] / 256e-3:.2f} ms/step ({nat[0] / 256e-3:.2f} in the native "
                  f"call), s40 {secs[1] / 256e-3:.2f} ({nat[1] / 256e-3:.2f}); ratio {secs[0] / secs[1]:.3f}, inside "
                  f"the call {nat[0] / nat[1]:.3f}", flush=True)
    native._STATE["gather"] = kernel

    # 3. the per-step Python pieces of a controlled s40 step
    ctl, (kt, pt, bt) = lm.controls, lm._act_tables
    cache, _, _ = lm.prefill(torch.randint(0, base.config.vocab_size, (1, 256), generator=torch.Generator().manual_seed(1)))
    ones = torch.ones(1)
    pieces = {
        "action tables": lambda: (kt[S40], pt[S40], bt[S40]),
        "Controls.set + clear": lambda: (ctl.set(kt[S40], pt[S40], bt[S40], 300, cache), ctl.clear()),
        "next_slots": cache.next_slots,
        "rotary tables": lambda: fast_decode._rope_tables(base, 301),
        "hidden buffer": lambda: torch.empty(H),
        "usage": lambda: lm._usage(1, ones, ones * 0.4, ones * 16, ones * 30, ones * 30 * H * 0.4, 300, True),
    }
    timed = {k: us(f) for k, f in pieces.items()}
    ctl.set(kt[S40], pt[S40], bt[S40], 300, cache)  # armed: the plan and the booking do their work
    timed["native_plan"] = us(lambda: (setattr(ctl, "_ch_plan", None), ctl.native_plan(H, torch.device("cpu"))))
    timed["native_done"] = us(lambda: ctl.native_done(30, nh, (KTH, 0, 0, 0), (30 * 231, 0, 0)))
    ctl.clear()
    print("3. per-step Python pieces, µs each: " + ", ".join(f"{k} {v:.0f}" for k, v in timed.items()))
