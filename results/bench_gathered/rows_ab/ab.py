"""Part Z: variants of the gather loop (rows per pass R, prefetch distance in rows) on SmolLM2's gate+up, every layer
in turn (30 layers), dense (576 rows) and s40 (231 random rows per layer); 10 passes per cell, 7 interleaved rounds,
µs per layer. variants.cpp is a stand-alone copy of `gather` (utils/csrc/gather_gemv.cpp) templated on R and the
prefetch distance; variant 0 is the project's loop for rows of more than 1024 values.
Run alone: python results/bench_gathered/rows_ab/ab.py"""
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils import cpp_extension

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))
from utils.gathered import layout_mlp  # noqa: E402
from utils.model import SMOLLM2_ALIAS, load_lm  # noqa: E402

mod = cpp_extension.load(name="sol_rows_ab", sources=[str(HERE / "variants.cpp")],
                         extra_cflags=["-O3", "-march=native", "-fopenmp"])
base, _ = load_lm(SMOLLM2_ALIAS, "float32")
for layer in base.model.layers:
    layout_mlp(layer.mlp)
ws = [layer.mlp._sol_w_in for layer in base.model.layers]
g = torch.Generator().manual_seed(0)
xs = [torch.randn(576, generator=g) for _ in ws]
every = torch.arange(576)
s40 = [torch.sort(torch.randperm(576, generator=g)[:231]).values for _ in ws]
names = {0: "R4 d4 (current)", 1: "R8 d8", 2: "R4 d8", 3: "R2 d4", 4: "R4 d12", 5: "R4 no prefetch"}
for v in names:  # each variant is exact
    torch.testing.assert_close(mod.run(v, xs[0], s40[0], ws[0]), xs[0][s40[0]] @ ws[0][s40[0]], atol=1e-4, rtol=0)
res = {(v, k): [] for v in names for k in ("dense", "s40")}
for _ in range(7):
    for v in names:
        for k in ("dense", "s40"):
            t0 = time.perf_counter()
            for _ in range(10):
                for i in range(30):
                    mod.run(v, xs[i], every if k == "dense" else s40[i], ws[i])
            res[(v, k)].append((time.perf_counter() - t0) / 300 * 1e6)
for v, name in names.items():
    d, s = statistics.median(res[(v, "dense")]), statistics.median(res[(v, "s40")])
    print(f"{name:18s} dense {d:6.1f} µs/layer  s40 {s:6.1f}  dense / s40 {d / s:.2f}")
