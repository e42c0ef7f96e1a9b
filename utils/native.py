"""The optional native (C++) kernel of the gathered execution, built once on first use.

`gather_kernel()` compiles `utils/csrc/gather_gemv.cpp`, `utils/csrc/decode_step.cpp` (the one-call batch-1
decode step of `utils.fast_decode`) and `utils/csrc/policy_step.cpp` (the policy's, `utils.fast_policy`) as one
module with torch's JIT extension builder (a C++ compiler and ninja; ~40 s the first time, then loaded from
torch's extension cache, `TORCH_EXTENSIONS_DIR`) and returns the module, or None when it cannot be built or
`SOL_NATIVE_KERNEL=0` is set. None only means the slower fallback: `utils.gathered.gather_gemv` then runs the
same sum with `embedding_bag`, and both agree to float rounding.
It also does the batch-1 channel selection (|x| at or above the kth smallest) in the same call, which saves
the four ATen ops the selection otherwise takes per layer, and the dense batch-1 products of the gathered
decode step (`gemv`, every row: faster than the BLAS product there, so dense and pruned steps share a kernel).
Each thread streams a contiguous block of the kept rows, whole rows, into its own accumulator. On the 2-core
CPU (SmolLM2 gate+up, `results/bench_gathered/part_f.md`) selection + gather takes about ρ of the dense
product's time.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from types import ModuleType

import torch

SOURCES = [Path(__file__).resolve().parent / "csrc" / name
           for name in ("gather_gemv.cpp", "decode_step.cpp", "policy_step.cpp")]
_STATE: dict[str, ModuleType | None] = {}


def native_enabled() -> bool:
    """False when the environment switches the native kernel off (`SOL_NATIVE_KERNEL=0`)."""
    return os.environ.get("SOL_NATIVE_KERNEL", "1") != "0"


def gather_kernel() -> ModuleType | None:
    """The compiled module (`.gather_gemv(x, idx, w)`, `.select_gather_gemv(x, kth, w)`, `.gemv(x, w)`,
    `.decode_layers(...)`, `.policy_step(...)`),
    or None if it is switched off or cannot be built (one note on stderr, once per process)."""
    if not native_enabled():
        return None
    if "gather" not in _STATE:
        _STATE["gather"] = _build()
    return _STATE["gather"]


NAME = "sol_gather_gemv"


def _built_before(cpp_extension) -> bool:
    """Whether torch's extension cache already holds a build of the kernel (then loading takes well under a
    second; a changed source is still rebuilt, silently)."""
    try:
        return any(Path(cpp_extension._get_build_directory(NAME, verbose=False)).glob(f"{NAME}*.so"))
    except Exception:  # a private torch helper: if it moves, only the note below is lost
        return True


def _build() -> ModuleType | None:
    from torch.utils import cpp_extension

    if not _built_before(cpp_extension):
        print("[sol] building the native gather kernel for the gathered execution (once, ~30-40 s; cached in "
              "torch's extension folder, TORCH_EXTENSIONS_DIR)", file=sys.stderr, flush=True)
    try:
        return cpp_extension.load(name=NAME, sources=[str(p) for p in SOURCES], verbose=False,
                                  extra_cflags=["-O3", "-march=native", "-fopenmp"])
    except Exception as exc:  # no compiler, no ninja, a failed build: the embedding_bag path still works
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"[sol] note: native gather kernel unavailable ({first[:160]}); using embedding_bag and the "
              "per-layer decode step (set SOL_NATIVE_KERNEL=0 to skip the build)", file=sys.stderr)
        return None
