"""Where a gathered batch-1 decode step's time goes outside the native call, timed in place (part U): 2 rounds of a
dense and an s40 greedy generation of 256 tokens after a 256-token prompt (SmolLM2-135M fp32, recency, alone on the
machine), each step's pieces wrapped with timers (the wrappers add ~1 µs each): the native call, `Controls.set` /
`clear` / `native_plan` / `native_done` / `step_sums`, the cache's `next_slots` and `advance`, `_usage` and the
LM head (`logits`), µs per step. Unlike `native_parts.py` section 3, which times each piece warm in a loop, these
run right after the call's ~0.5 GB weight stream has evicted the caches.
Run alone: python results/bench_gathered/step_outside.py"""
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from utils import native  # noqa: E402
from utils.actions import ActionSpace  # noqa: E402
from utils.kv_cache import GrowableCache  # noqa: E402
from utils.lm import ControlledLM  # noqa: E402
from utils.model import SMOLLM2_ALIAS, load_lm  # noqa: E402

kernel = native.gather_kernel()
if kernel is None:
    sys.exit("step_outside.py: the native kernel is unavailable (no C++ compiler or ninja, or SOL_NATIVE_KERNEL=0)")
base, tok = load_lm(SMOLLM2_ALIAS, "float32")
SPACE = ActionSpace.build([0.25, 1.0], ["s40", "s100"], ["q16"])
lm = ControlledLM(base, tok, SPACE, "recency", Ts=4, Tw=2, execution="gathered")
S40 = torch.tensor([SPACE.index(1.0, 0.4, 16)])
acc: dict = {}


def timed(name: str, obj, attr: str) -> None:
    f = getattr(obj, attr)

    def wrapper(*a, **k):
        t0 = time.perf_counter()
        out = f(*a, **k)
        acc[name] = acc.get(name, 0.0) + time.perf_counter() - t0
        return out

    setattr(obj, attr, wrapper)


class Kernel:
    def __getattr__(self, name):
        return getattr(kernel, name)


k = Kernel()
k.decode_layers = kernel.decode_layers
timed("native call", k, "decode_layers")
native._STATE["gather"] = k
for n in ("set", "clear", "native_plan", "native_done", "step_sums"):
    timed(f"Controls.{n}", lm.controls, n)
timed("next_slots", GrowableCache, "next_slots")
timed("advance", GrowableCache, "advance")
timed("_usage", lm, "_usage")
timed("LM head (logits)", lm, "logits")
with torch.inference_mode():
    cache, _, logits = lm.prefill(torch.randint(0, base.config.vocab_size, (1, 256),
                                                generator=torch.Generator().manual_seed(0)))
    for r in range(2):
        for name, act in (("dense", None), ("s40", S40)):
            c, t = lm.clone_cache(cache, spare=257), logits.argmax(-1)
            acc.clear()
            t0 = time.perf_counter()
            for _ in range(256):
                t = lm.step(c, t, act).logits.argmax(-1)
            step = (time.perf_counter() - t0) / 256 * 1e3
            inside = acc.get("native call", 0.0) / 256 * 1e3
            rest = step - inside - acc.get("LM head (logits)", 0.0) / 256 * 1e3
            print(f"round {r + 1}, {name}: step {step:.2f} ms, native call {inside:.2f} ms, everything but the call "
                  f"and the LM head {rest:.2f} ms; µs per step: " +
                  ", ".join(f"{n} {v / 256 * 1e6:.0f}" for n, v in acc.items() if n != "native call"), flush=True)
