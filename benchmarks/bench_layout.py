"""Batch-1 weight products of a decode step in three ways: which layout and kernel reads the weights fastest?

    python benchmarks/bench_layout.py                      # SmolLM2-135M's shapes, float32, every layer
    python benchmarks/bench_layout.py --model tiny --runs 3   # smoke run
    python benchmarks/bench_layout.py --rows 4                # a batch of 4 rows (native: gemm_rows)

For each product of a Llama layer (q/k/v joined, o, gate+up joined, down) and the LM head, one random-input row
(or --rows of them) times the model's own weights of every layer in turn (so nothing stays in cache, as inside a decode step):
`F.linear` on the stored output-major [out, in] weight (what the Hugging Face forward runs), a matmul on the
same weight laid out input-major [in, out] (`gathered.input_major`), and the native kernel's every-row loop on
the input-major weight (`gathered.dense_gemv`, utils/csrc/gather_gemv.cpp). The gathered execution uses the
fastest here (utils/fast_decode.py); its pruned gate+up product is the same native loop over the kept rows
only, so "× dense" in bench_gathered.py compares like with like. Milliseconds per decode step (all layers),
median of --runs interleaved rounds; "GB/s" is the weights' bytes over that time. Run it alone on the machine.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_gathered import MODELS, interleaved  # noqa: E402
from utils import gathered, native  # noqa: E402
from utils.model import load_lm  # noqa: E402


def products(model) -> dict[str, list[torch.Tensor]]:
    """Output-major weights of each product, one per layer (the LM head once): {name: [W [out, in]]}."""
    out: dict[str, list[torch.Tensor]] = {"q/k/v": [], "o": [], "gate+up": [], "down": []}
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        out["q/k/v"].append(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]).detach())
        out["o"].append(a.o_proj.weight.detach())
        out["gate+up"].append(torch.cat([m.gate_proj.weight, m.up_proj.weight]).detach())
        out["down"].append(m.down_proj.weight.detach())
    out["LM head"] = [model.get_output_embeddings().weight.detach()]
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--model", choices=sorted(MODELS), default="smollm2", help="whose weight shapes (default smollm2)")
    p.add_argument("--runs", type=int, default=9, help="interleaved rounds, at least 3 (default 9)")
    p.add_argument("--rows", type=int, default=1,
                   help="rows per product, 1 to 8 (default 1; above 1 the native cell is `gemm_rows`)")
    a = p.parse_args(argv)
    if a.runs < 3:
        p.error("--runs must be at least 3")
    if not 1 <= a.rows <= 8:
        p.error("--rows must be between 1 and 8")
    model, _ = load_lm(MODELS[a.model], "float32")
    kernel = native.gather_kernel()
    gen = torch.Generator().manual_seed(0)
    rows = []
    with torch.inference_mode():
        for name, ws in products(model).items():
            w_in = [w.t().contiguous() for w in ws]
            xs = [torch.randn(a.rows, 1, w.shape[1], generator=gen) for w in ws]
            cells = {"linear": lambda ws=ws, xs=xs: [F.linear(x, w) for x, w in zip(xs, ws)],
                     "matmul": lambda w_in=w_in, xs=xs: [x @ w for x, w in zip(xs, w_in)]}
            if kernel is not None:
                cells["native"] = lambda w_in=w_in, xs=xs: [gathered.dense_gemv(x, w) for x, w in zip(xs, w_in)]
            times = interleaved(cells, a.runs)
            ms = {c: 1e3 * statistics.median(v) for c, v in times.items()}
            gb = sum(w.numel() * w.element_size() for w in ws) / 1e9
            best = min(ms, key=ms.get)
            cell = lambda c: f"{ms[c]:.2f} ({gb / ms[c] * 1e3:.1f})" if c in ms else "-"
            rows.append(f"| {name} | {tuple(ws[0].shape)} × {len(ws)} | {cell('linear')} | {cell('matmul')} | "
                        f"{cell('native')} | {best} |")
    print(f"bench_layout: {a.model} float32, {a.rows} row(s), torch threads {torch.get_num_threads()}, median of "
          f"{a.runs} rounds; ms per decode step (GB/s)\n")
    print("| product | weight [out, in] × layers | F.linear, output-major | matmul, input-major | "
          "native loop, input-major | fastest |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
