"""utils.weight_arena: copies are exact and contiguous, small tensors share a 2 MiB-aligned chunk, a large one
gets its own, the kernel records the advice on their mappings, and the gathered layout uses it."""
import ctypes
import mmap

import pytest
import torch

from utils import weight_arena


def _advised(addr: int) -> bool:
    """Whether the mapping of this process that holds `addr` is advised MADV_HUGEPAGE (VmFlags `hg`)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(v, 16) for v in head.split("-"))
                inside = lo <= addr < hi
            elif inside and line.startswith("VmFlags:"):
                return "hg" in line.split()[1:]
    return False


def test_copy_is_exact_and_separate():
    t = torch.randn(96, 40).t()  # not contiguous, like every caller's transposed weight
    c = weight_arena.copy(t)
    assert c.is_contiguous() and c.shape == t.shape and torch.equal(c, t)
    c.add_(1.0)
    assert not torch.equal(c, t)  # its own storage
    assert torch.equal(weight_arena.copy(torch.arange(7.0)), torch.arange(7.0))


def test_off_switch_gives_plain_copy(monkeypatch):
    monkeypatch.setenv("SOL_HUGE_PAGES", "0")
    assert not weight_arena.enabled()
    t = torch.randn(5, 3).t()
    c = weight_arena.copy(t)
    assert c.is_contiguous() and torch.equal(c, t)


@pytest.mark.skipif(not weight_arena.enabled(), reason="no transparent huge pages here")
def test_chunks_are_aligned_shared_and_backed_by_huge_pages():
    weight_arena._STATE.pop("chunk", None)  # start a fresh chunk
    a = weight_arena.copy(torch.randn(100, 3))  # 1,200 bytes
    b = weight_arena.copy(torch.randn(10))
    assert a.data_ptr() % weight_arena.HUGE == 0  # the chunk's start
    assert b.data_ptr() == a.data_ptr() + 1216  # next 64-byte boundary of the same chunk
    big = weight_arena.copy(torch.ones(weight_arena.CHUNK // 4 + 1))  # larger than a chunk: its own
    assert big.data_ptr() % weight_arena.HUGE == 0 and big.untyped_storage().data_ptr() != a.untyped_storage().data_ptr()
    assert _advised(big.data_ptr()) and _advised(a.data_ptr())
    # a fresh mapping is not (a plain tensor would not do: malloc may hand out memory of a freed, advised chunk)
    plain = mmap.mmap(-1, 2 * weight_arena.HUGE)
    assert not _advised(ctypes.addressof(ctypes.c_char.from_buffer(plain)))


@pytest.mark.skipif(not weight_arena.enabled(), reason="no transparent huge pages here")
def test_gathered_layout_uses_the_arena():
    """The gathered execution's input-major weights (gate+up, q/k/v) land in advised memory, values unchanged."""
    from pathlib import Path

    from utils.config import load_config
    from utils.fast_decode import layout_attention
    from utils.gathered import layout_mlp
    from utils.model import load_lm

    cfg = load_config(Path(__file__).resolve().parents[1] / "official_configs/tiny.yml", ["device=cpu"])
    model, _ = load_lm(cfg.model_name, cfg.dtype, "cpu")
    layer = model.model.layers[0]
    gate, up = layer.mlp.gate_proj.weight.clone(), layer.mlp.up_proj.weight.clone()
    layout_mlp(layer.mlp)
    layout_attention(layer.self_attn)
    w = layer.mlp._sol_w_in
    assert _advised(w.data_ptr()) and _advised(layer.self_attn._sol_w_qkv.data_ptr())
    assert torch.equal(w, torch.cat([gate, up]).t())
