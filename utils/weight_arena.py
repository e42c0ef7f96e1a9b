"""The gathered execution's weights in 2 MiB pages: fewer TLB misses for a decode step that reads every weight once.

A batch-1 decode step streams the whole model (SmolLM2-135M fp32: ~540 MB, ~130,000 pages of 4 KiB) and a pruned
step jumps between rows of 12 KiB, so on a CPU nearly every page it touches misses the TLB. Linux backs memory
that is advised `MADV_HUGEPAGE` with 2 MiB pages (transparent huge pages in `madvise` or `always` mode), which
cuts those misses 512-fold. `copy(t)` places a CPU tensor's values in such memory: tensors are carved
back to back out of 2 MiB-aligned chunks (64-byte aligned each, so small matrices share huge pages instead of
each wasting one), and a chunk is freed with the last tensor that views it (the chunk being filled is also held here). Elsewhere (another OS, a GPU tensor,
THP off, a refused advice, or `SOL_HUGE_PAGES=0`) it is a plain contiguous copy: only the speed differs, never a value.
Measured in `results/bench_gathered` (part Y).
"""
from __future__ import annotations

import ctypes
import os
import sys

import torch

HUGE = 2 << 20
CHUNK = 32 << 20  # tensors larger than a chunk get a chunk of their own
_MADV_HUGEPAGE = 14
_ALIGN = 64
_STATE: dict[str, object] = {}


def enabled() -> bool:
    """Whether `copy` uses huge pages here: Linux, transparent huge pages not `never`, `SOL_HUGE_PAGES` not 0."""
    if os.environ.get("SOL_HUGE_PAGES", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    if "thp" not in _STATE:
        try:
            with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
                _STATE["thp"] = "[never]" not in f.read()
        except OSError:
            _STATE["thp"] = False
    return bool(_STATE["thp"])


def _madvise(addr: int, length: int) -> bool:
    if "madvise" not in _STATE:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        _STATE["madvise"] = libc.madvise
    return _STATE["madvise"](addr, length, _MADV_HUGEPAGE) == 0  # type: ignore[operator]


def _new_chunk(nbytes: int) -> tuple[torch.Tensor, int] | None:
    """A fresh untouched byte buffer with a 2 MiB-aligned, huge-page-advised region of `nbytes` (rounded up to
    2 MiB) inside it, and that region's offset; None if the kernel refuses the advice."""
    size = -(-nbytes // HUGE) * HUGE
    raw = torch.empty(size + HUGE, dtype=torch.uint8)  # large: mmap-backed, no page touched yet
    off = -raw.data_ptr() % HUGE
    if _madvise(raw.data_ptr() + off, size):
        return raw, off
    _STATE["thp"] = False  # refused once: plain copies from now on
    return None


def _plain(t: torch.Tensor) -> torch.Tensor:
    return t.clone(memory_format=torch.contiguous_format)


def copy(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of `t`, in huge-page-advised memory when `enabled()` and `t` is on the CPU."""
    if t.device.type != "cpu" or t.is_quantized or not enabled():
        return _plain(t)
    nbytes = t.numel() * t.element_size()
    cur = _STATE.get("chunk")
    if nbytes > CHUNK:
        got = _new_chunk(nbytes)
        if got is None:
            return _plain(t)
        raw, start = got
    else:
        if cur is None or cur[1] + nbytes > cur[2]:  # type: ignore[index]
            got = _new_chunk(CHUNK)
            if got is None:
                return _plain(t)
            cur = [got[0], got[1], got[1] + CHUNK]
            _STATE["chunk"] = cur
        raw, start = cur[0], cur[1]  # type: ignore[index]
        cur[1] = start + -(-nbytes // _ALIGN) * _ALIGN  # type: ignore[index]
    out = raw[start:start + nbytes].view(t.dtype).view(t.shape)
    out.copy_(t)
    return out
