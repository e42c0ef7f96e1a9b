"""A/B of the gather kernel's row prefetch (utils/csrc/gather_gemv.cpp `gather`): the loop as it was without it
(without.cpp, built as its own extension) and the project's kernel with it (`native.gather_kernel().gather_gemv`),
timed in one process on
SmolLM2's own weights, every layer in turn (30 layers, cache-cold): dense gate+up (576 rows), gate+up over 231
random rows (s40), and the down projection (1536 rows); 20 passes per cell, 7 interleaved rounds, µs per layer.
Run alone: python results/bench_gathered/prefetch_ab/ab.py"""
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils import cpp_extension

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))
from utils import native  # noqa: E402
from utils.gathered import layout_mlp  # noqa: E402
from utils.model import SMOLLM2_ALIAS, load_lm  # noqa: E402

kernel = native.gather_kernel()
if kernel is None:
    sys.exit("ab.py: the native kernel is unavailable (no C++ compiler or ninja, or SOL_NATIVE_KERNEL=0)")
old = cpp_extension.load(name="sol_prefetch_ab_without", sources=[str(HERE / "without.cpp")],
                         extra_cflags=["-O3", "-march=native", "-fopenmp"])
mods = {"without": old.run, "with": kernel.gather_gemv}
base, _ = load_lm(SMOLLM2_ALIAS, "float32")
for layer in base.model.layers:
    layout_mlp(layer.mlp)
mlps = [layer.mlp for layer in base.model.layers]
g = torch.Generator().manual_seed(0)
xs = [torch.randn(576, generator=g) for _ in mlps]
xa = [torch.randn(1536, generator=g) for _ in mlps]
every, every_a = torch.arange(576), torch.arange(1536)
s40 = [torch.sort(torch.randperm(576, generator=g)[:231]).values for _ in mlps]


def cell(mod, kind: str) -> float:
    t0 = time.perf_counter()
    for _ in range(20):
        for i, mlp in enumerate(mlps):
            if kind == "dense gate+up":
                mod(xs[i], every, mlp._sol_w_in)
            elif kind == "s40 gate+up":
                mod(xs[i], s40[i], mlp._sol_w_in)
            else:
                mod(xa[i], every_a, mlp._sol_w_down)
    return (time.perf_counter() - t0) / 20 / len(mlps) * 1e6


kinds = ("dense gate+up", "s40 gate+up", "down")
res: dict = {}
for _ in range(7):
    for n, mod in mods.items():
        for kind in kinds:
            res.setdefault((n, kind), []).append(cell(mod, kind))
print("| kernel | " + " | ".join(f"{k}, µs per layer" for k in kinds) + " |")
print("|---|" + "---|" * len(kinds))
for n in mods:
    print(f"| {n} prefetch | " + " | ".join(f"{statistics.median(res[n, k]):.1f}" for k in kinds) + " |")
