"""Part Z: why the two end-to-end protocols disagree (whole generations timed in turn: 1.25-1.27x; the two
generations advanced in lockstep: 1.18-1.21x). Hypothesis: on this CPU the 480 MiB L3 (shared with other tenants)
holds part of a step's ~0.5 GB of weights; an s40 step reads ~0.39 GB, and consecutive s40 steps keep mostly the
same MLP input channels, so in a run of s40 steps more of what it reads is still cached, while a dense step in
between (lockstep) evicts it. If so, an s40 step is slower in lockstep than in a run of s40 steps, by more than a
dense step is.

One process, SmolLM2-135M fp32, batch 1, greedy, 256-token prompt, recency execution gathered; 5 rounds, each:
128 dense steps in a row, 128 s40 steps in a row (each on its own copy of the prompt's cache), then 128 lockstep
pairs (dense, s40, dense, ...) on fresh copies; ms per step (median over the rounds of each round's mean).
Run alone: python results/bench_gathered/protocol_ab.py"""
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from utils.actions import ActionSpace  # noqa: E402
from utils.lm import ControlledLM  # noqa: E402
from utils.model import SMOLLM2_ALIAS, load_lm  # noqa: E402

base, tok = load_lm(SMOLLM2_ALIAS, "float32")
SPACE = ActionSpace.build([0.25, 1.0], ["s40", "s100"], ["q16"])
lm = ControlledLM(base, tok, SPACE, "recency", Ts=4, Tw=2, execution="gathered")
S40 = torch.tensor([SPACE.index(1.0, 0.4, 16)])
N = 128
res = {k: [] for k in ("dense, in a row", "s40, in a row", "dense, lockstep", "s40, lockstep")}
with torch.inference_mode():
    cache, _, logits = lm.prefill(torch.randint(0, base.config.vocab_size, (1, 256),
                                                generator=torch.Generator().manual_seed(0)))
    first = logits.argmax(-1)
    for _ in range(5):
        for name, act in (("dense", None), ("s40", S40)):
            c, t = lm.clone_cache(cache, spare=N + 1), first
            t0 = time.perf_counter()
            for _ in range(N):
                t = lm.step(c, t, act).logits.argmax(-1)
            res[f"{name}, in a row"].append((time.perf_counter() - t0) / N * 1e3)
        cs = {name: [lm.clone_cache(cache, spare=N + 1), first] for name in ("dense", "s40")}
        acc = {"dense": 0.0, "s40": 0.0}
        for _ in range(N):
            for name, act in (("dense", None), ("s40", S40)):
                c, t = cs[name]
                t0 = time.perf_counter()
                cs[name][1] = lm.step(c, t, act).logits.argmax(-1)
                acc[name] += time.perf_counter() - t0
        for name in acc:
            res[f"{name}, lockstep"].append(acc[name] / N * 1e3)
        print("round:", ", ".join(f"{k} {v[-1]:.2f} ms" for k, v in res.items()), flush=True)
med = {k: statistics.median(v) for k, v in res.items()}
print("medians, ms per step:", ", ".join(f"{k} {v:.2f}" for k, v in med.items()))
print(f"dense / s40: in a row {med['dense, in a row'] / med['s40, in a row']:.3f}, "
      f"lockstep {med['dense, lockstep'] / med['s40, lockstep']:.3f}; lockstep / in a row: "
      f"dense {med['dense, lockstep'] / med['dense, in a row']:.3f}, s40 {med['s40, lockstep'] / med['s40, in a row']:.3f}")
