"""A/B of the weights in 2 MiB pages (`utils.weight_arena`) against 4 KiB pages, in one process (SmolLM2 fp32,
batch 1, alone on the machine). Two copies of the model are laid out for the gathered execution, one with
`SOL_HUGE_PAGES=0`. Printed as measured:
1. the LM head product and the native call alone (dense and s40, 384-token cache), each model in turn, 5 rounds;
2. four generations of 256 tokens after the same 256-token prompt (each model dense and s40) advanced in
   lockstep, one step of each in turn (the order rotating every step), 3 rounds after a warm-up round.
Run alone: python results/bench_gathered/huge_pages_ab.py (needs the native kernel; Linux with THP for a
difference)."""
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from utils import fast_decode, native, weight_arena  # noqa: E402
from utils.actions import ActionSpace  # noqa: E402
from utils.lm import ControlledLM  # noqa: E402
from utils.model import SMOLLM2_ALIAS, load_lm  # noqa: E402

kernel = native.gather_kernel()
if kernel is None or not weight_arena.enabled():
    sys.exit("huge_pages_ab.py: needs the native kernel and transparent huge pages")
SPACE = ActionSpace.build([0.25, 1.0], ["s40", "s100"], ["q16"])
S40 = torch.tensor([SPACE.index(1.0, 0.4, 16)])
lms = {}
for name, flag in (("2M", "1"), ("4K", "0")):
    os.environ["SOL_HUGE_PAGES"] = flag
    base, tok = load_lm(SMOLLM2_ALIAS, "float32")
    lms[name] = ControlledLM(base, tok, SPACE, "recency", Ts=4, Tw=2, execution="gathered")
os.environ.pop("SOL_HUGE_PAGES")
with open("/proc/self/smaps_rollup") as f:
    print("".join(line for line in f if line.startswith(("Rss", "AnonHugePages"))), end="")
H = base.config.hidden_size
KTH = H - -(-4 * H // 10) + 1  # s40: keep ceil(0.4 H) channels
nh, nkv = base.config.num_attention_heads, base.config.num_key_value_heads

with torch.inference_mode():
    # 1. LM head and native call alone
    calls = {}
    for name, lm in lms.items():
        b = lm.model
        cache, _, _ = lm.prefill(torch.randint(0, b.config.vocab_size, (1, 384), generator=torch.Generator().manual_seed(2)))
        weights, final_norm, eps, scaling = fast_decode._native_spec(b)
        slots, L = cache.next_slots(), cache.get_seq_length()
        cos, sin = fast_decode._rope_tables(b, L + 1)
        for kth in (0, KTH):
            calls[(name, "dense" if kth == 0 else "s40")] = (
                lambda b=b, w=weights, s=slots, fn=final_norm, c=cos, si=sin, L=L, e=eps, sc=scaling, k=kth:
                kernel.decode_layers(torch.empty(H), b.model.embed_tokens.weight, torch.tensor([5]), w, s, fn, c, si,
                                     L, nh, nkv, e, sc, k, 4, 0, 0, 0, False, 0, 0, [], 0, None))
        calls[(name, "LM head")] = lambda b=b: kernel.gemv(torch.randn(H), b.lm_head.weight.t())
    res = {k: [] for k in calls}
    for _ in range(5):
        for k, f in calls.items():
            f()
            t0 = time.perf_counter()
            for _ in range(30):
                f()
            res[k].append((time.perf_counter() - t0) / 30 * 1e3)
    print("1. alone, ms (median of 5 rounds of 30 calls): " + ", ".join(
        f"{n} {what} {statistics.median(v):.2f}" for (n, what), v in res.items()), flush=True)
    for what in ("dense", "s40", "LM head"):
        print(f"   {what}: 4K / 2M = {statistics.median(a / b for a, b in zip(res[('4K', what)], res[('2M', what)])):.3f}")

    # 2. lockstep generations
    runs = [(n, a) for n in lms for a in (None, S40)]
    starts = {}
    for n, lm in lms.items():
        starts[n] = lm.prefill(torch.randint(0, base.config.vocab_size, (1, 256), generator=torch.Generator().manual_seed(0)))
    for r in range(4):  # the first round warms up
        caches = [lms[n].clone_cache(starts[n][0], spare=257) for n, _ in runs]
        toks = [starts[n][2].argmax(-1) for n, _ in runs]
        secs = [0.0] * len(runs)
        for t in range(256):
            for j in range(len(runs)):
                i = (j + t) % len(runs)
                n, a = runs[i]
                t0 = time.perf_counter()
                toks[i] = lms[n].step(caches[i], toks[i], a).logits.argmax(-1)
                secs[i] += time.perf_counter() - t0
        if r:
            ms = [s / 256e-3 for s in secs]
            print(f"2. lockstep round {r}: 2M dense {ms[0]:.2f} ms/step, s40 {ms[1]:.2f} (ratio {ms[0] / ms[1]:.3f}); "
                  f"4K dense {ms[2]:.2f}, s40 {ms[3]:.2f} (ratio {ms[2] / ms[3]:.3f}); dense 4K / 2M "
                  f"{ms[2] / ms[0]:.3f}, s40 4K / 2M {ms[3] / ms[1]:.3f}", flush=True)
