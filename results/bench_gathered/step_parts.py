"""Where a gathered decode step's time goes (SmolLM2 fp32, batch 1, 256-token prompt, 128 greedy steps, median of
3 runs): every native product timed inside real steps, by weight shape (q/k/v, o, gate+up or select + gather,
down, LM head), then the same steps with every native product replaced by a no-op returning zeros (what
everything else costs: SDPA, norms, rotary, the cache, the controls and their Python). Dense steps and s40 on
every step. Run alone: python results/bench_gathered/step_parts.py (needs the native kernel). It times the per-layer
path (`fast_decode.decode_hidden`, parts J-M), the one-call native step of part N on being switched off: that step
has no separate products to time."""
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

fast_decode.NATIVE_STEP = False
base, tok = load_lm(SMOLLM2_ALIAS, "float32")
SPACE = ActionSpace.build([0.25, 1.0], ["s40", "s60", "s80", "s100"], ["q16"])
lm = ControlledLM(base, tok, SPACE, "recency", Ts=4, Tw=2, execution="gathered")
S40 = SPACE.index(1.0, 0.4, 16)
prompt = torch.randint(0, base.config.vocab_size, (1, 256), generator=torch.Generator().manual_seed(2))
cache, _, logits = lm.prefill(prompt)
first = logits.argmax(-1)
T = 128
kernel = native.gather_kernel()
if kernel is None:
    sys.exit("step_parts.py: the native kernel is unavailable (no C++ compiler or ninja, or SOL_NATIVE_KERNEL=0)")
NAMES = {(576, 960): "q/k/v", (576, 576): "o", (576, 3072): "gate+up", (1536, 576): "down", (576, 49152): "LM head"}
acc: dict[str, float] = {}


class Timed:
    """The kernel with each call's wall time added up by product."""

    def gemv(self, x, w):
        t0 = time.perf_counter()
        out = kernel.gemv(x, w)
        name = NAMES.get(tuple(w.shape), str(tuple(w.shape)))
        acc[name] = acc.get(name, 0.0) + time.perf_counter() - t0
        return out

    def select_gather_gemv(self, x, kth, w):
        t0 = time.perf_counter()
        out = kernel.select_gather_gemv(x, kth, w)
        acc["select + gather"] = acc.get("select + gather", 0.0) + time.perf_counter() - t0
        return out


class NoOp:
    """Every product free: zeros of the right length (the count as select_gather_gemv reports it)."""

    def gemv(self, x, w):
        return torch.zeros(w.shape[1])

    def select_gather_gemv(self, x, kth, w):
        return torch.zeros(w.shape[1]), x.shape[0] - kth + 1


def run(action):
    c = lm.clone_cache(cache, spare=T + 1)
    t = first
    acts = None if action is None else torch.tensor([action])
    for _ in range(T):
        t = lm.step(c, t, acts).logits.argmax(-1)


def ms_per_step(action, runs=3):
    """(median ms per step, {product: ms per step} of that median run)."""
    res = []
    for _ in range(runs + 1):  # the first is a warm-up
        acc.clear()
        t0 = time.perf_counter()
        run(action)
        res.append((1e3 * (time.perf_counter() - t0) / T, {k: 1e3 * v / T for k, v in acc.items()}))
    return sorted(res[1:], key=lambda r: r[0])[runs // 2]


native._STATE["gather"] = Timed()
for label, action in (("dense", None), ("s40", S40)):
    total, parts = ms_per_step(action)
    print(f"{label}: {total:.2f} ms/step; products " + ", ".join(f"{k} {v:.2f}" for k, v in parts.items())
          + f"; products {sum(parts.values()):.2f}, the rest {total - sum(parts.values()):.2f}")
native._STATE["gather"] = NoOp()
for label, action in (("dense", None), ("s40", S40)):
    print(f"{label} with every product a no-op: {ms_per_step(action)[0]:.2f} ms/step")
