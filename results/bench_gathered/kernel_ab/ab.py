"""A/B of the native kernels (part T): the sources of commit 2f29920 (utils/csrc/gather_gemv.cpp and decode_step.cpp, read
from git history and built as their own extension) against the current ones. What changed: `gather` gives each thread
a contiguous block of the kept rows, eight rows at a time when a row holds at most 1024 values (it dealt the rows
round-robin to the threads, four at a time); attention takes its exponentials in one vectorisable pass per head; the
call reads the token's embedding and the rotary row itself. Both in one process, SmolLM2-135M fp32, batch 1, alone
on the machine:
1. each product alone over the 30 layers' own weights (cache-cold), 10 passes per cell, 7 interleaved rounds, µs per
   layer (LM head: per call);
2. the native decode call alone (`decode_layers`, 384-token cache), dense and s40, 40 calls per cell in rotated order,
   5 rounds, ms per call.
Whole steps (lockstep generations on the current code): results/bench_gathered/native_parts.py.
Run alone: python results/bench_gathered/kernel_ab/ab.py"""
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))
from utils import fast_decode, native  # noqa: E402
from utils.actions import ActionSpace  # noqa: E402
from utils.lm import ControlledLM  # noqa: E402
from utils.model import SMOLLM2_ALIAS, load_lm  # noqa: E402

OLD_REV = "2f29920"
new = native.gather_kernel()
if new is None:
    sys.exit("ab.py: the native kernel is unavailable (no C++ compiler or ninja, or SOL_NATIVE_KERNEL=0)")
tmp = Path(tempfile.mkdtemp(prefix="sol_kernel_ab_"))
for name in ("gather_gemv.cpp", "decode_step.cpp"):
    (tmp / name).write_text(subprocess.run(["git", "show", f"{OLD_REV}:utils/csrc/{name}"], cwd=ROOT, check=True,
                                           capture_output=True, text=True).stdout)
old = cpp_extension.load(name="sol_kernel_ab_2f29920", sources=[str(tmp / "gather_gemv.cpp"), str(tmp / "decode_step.cpp")],
                         extra_cflags=["-O3", "-march=native", "-fopenmp"])
kernels = {"2f29920": old, "now": new}

base, tok = load_lm(SMOLLM2_ALIAS, "float32")
m, H = base.model, base.config.hidden_size
SPACE = ActionSpace.build([0.25, 1.0], ["s40", "s100"], ["q16"])
lm = ControlledLM(base, tok, SPACE, "recency", Ts=4, Tw=2, execution="gathered")
KTH = H - -(-4 * H // 10) + 1  # s40: keep ceil(0.4 H) channels

with torch.inference_mode():
    # 1. the products alone
    weights, final_norm, eps, scaling = fast_decode._native_spec(base)
    mats = {"q/k/v": weights[1::6], "o": weights[2::6], "gate+up": weights[4::6], "down": weights[5::6]}
    g = torch.Generator().manual_seed(0)
    s40 = torch.sort(torch.randperm(H, generator=g)[: H - KTH + 1]).values
    head_w = base.lm_head.weight.t()  # input-major [H, V], laid out by the gathered ControlledLM
    assert head_w.is_contiguous()
    cells = [(n, ws, torch.arange(ws[0].shape[0])) for n, ws in mats.items()]
    cells += [("s40 gate+up", mats["gate+up"], s40), ("LM head", [head_w], torch.arange(H))]
    xs = {n: torch.randn(ws[0].shape[0], generator=g) for n, ws, _ in cells}
    res: dict = {}
    for _ in range(7):
        for n, ws, idx in cells:
            for k, mod in kernels.items():
                reps = 10 if len(ws) > 1 else 30
                t0 = time.perf_counter()
                for _ in range(reps):
                    for w in ws:
                        mod.gather_gemv(xs[n], idx, w)
                res.setdefault((n, k), []).append((time.perf_counter() - t0) / reps / len(ws) * 1e6)
    print("1. products alone, µs per layer (median of 7 rounds)\n")
    print("| product | MB read | " + " | ".join(kernels) + " | × |")
    print("|---|---|" + "---|" * (len(kernels) + 1))
    for n, ws, idx in cells:
        a, b = (statistics.median(res[n, k]) for k in kernels)
        print(f"| {n} | {idx.numel() * ws[0].shape[1] * 4 / 1e6:.2f} | {a:.1f} | {b:.1f} | {a / b:.2f} |")

    # 2. the native call alone
    cache, _, _ = lm.prefill(torch.randint(0, base.config.vocab_size, (1, 384), generator=torch.Generator().manual_seed(2)))
    slots, L = cache.next_slots(), cache.get_seq_length()
    tok5, cos_t, sin_t = torch.tensor([5]), *fast_decode._rope_tables(base, L + 1)
    nh, nkv = base.config.num_attention_heads, base.config.num_key_value_heads
    tail = (nh, nkv, eps, scaling)

    def run_old(kth: int) -> None:  # its signature: the embedding and the rotary row computed by the caller
        h = m.embed_tokens(tok5).reshape(-1).contiguous()
        old.decode_layers(h, weights, slots, final_norm, cos_t[L].contiguous(), sin_t[L].contiguous(), L, *tail, kth,
                          4, 0, 0, 0, False, 0, 0, [], 0, None)

    def run_new(kth: int) -> None:
        new.decode_layers(torch.empty(H), m.embed_tokens.weight, tok5, weights, slots, final_norm, cos_t, sin_t, L,
                          *tail, kth, 4, 0, 0, 0, False, 0, 0, [], 0, None)

    runners = {"2f29920": run_old, "now": run_new}
    calls = [(k, kth) for k in kernels for kth in (0, KTH)]
    res = {c: [] for c in calls}
    for r in range(5):
        acc = {c: 0.0 for c in calls}
        for i in range(40):
            for k, kth in calls[i % 4:] + calls[:i % 4]:
                t0 = time.perf_counter()
                runners[k](kth)
                acc[k, kth] += time.perf_counter() - t0
        for c in calls:
            res[c].append(acc[c] / 40 * 1e3)
    print("\n2. the native call alone, 384-token cache, ms (median of 5 rounds; the 2f29920 cells include its caller's embedding lookup)\n")
    print("| kernel | dense | s40 | × |\n|---|---|---|---|")
    for k in kernels:
        d, s = statistics.median(res[k, 0]), statistics.median(res[k, KTH])
        print(f"| {k} | {d:.2f} | {s:.2f} | {statistics.median(a / b for a, b in zip(res[k, 0], res[k, KTH])):.3f} |")
