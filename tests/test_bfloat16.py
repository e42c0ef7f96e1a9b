"""A bfloat16 frozen base: the controls stay correct and the policy stays in float32 (tiny random Llama).

* fake quantization of bf16 activations is computed in float32 (checked against a float64 computation);
* MLP channel top-k on bf16 activations, whose ties are frequent, keeps exactly the channels at or above the
  count-th largest |x| (checked against a sort in Python), never fewer than the count;
* an episode on a bf16 LM feeds the policy float32 inputs, scores in float32, and gives log-likelihoods close
  to the float32 LM's for the same actions.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from utils.config import load_config
from utils.data import load_blocks
from test_imitation import _Replay
from utils.engine import run_episode
from utils.lm import ControlledLM
from utils.mlp_controls import fake_quantize, prune_channels
from utils.model import load_lm
from utils.policy import SOLPolicy
from utils.schedulers import PolicyScheduler


def test_fake_quantize_bf16_is_computed_in_float32():
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 2, 64, generator=g) * 3).to(torch.bfloat16)
    bits = torch.tensor([4, 7, 16])
    out = fake_quantize(x, bits)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out[2], x[2])  # 16 bits: the identity
    for row, b in ((0, 4), (1, 7)):
        xd = x[row].double()
        qmax = 2 ** (b - 1) - 1
        scale = xd.abs().amax(-1, keepdim=True) / qmax
        ref = (torch.round(xd / scale).clamp(-qmax, qmax) * scale).to(torch.bfloat16)
        # float32 vs float64 arithmetic may round differently only at a bf16 rounding boundary: one ulp
        torch.testing.assert_close(out[row].float(), ref.float(), rtol=2 ** -7, atol=0)
        for tok in range(x.shape[1]):  # per-token scale: at most 2·qmax + 1 levels per token
            assert len(torch.unique(out[row, tok].float())) <= 2 * qmax + 1


@pytest.mark.parametrize("rho", [0.4, 0.5, 0.8])
def test_channel_topk_keeps_bf16_ties_at_the_threshold(rho):
    g = torch.Generator().manual_seed(1)
    D = 96
    levels = torch.tensor([0.5, 1.0, 1.5, 2.0, 3.0])
    x = (levels[torch.randint(len(levels), (2, 1, D), generator=g)]
         * torch.where(torch.rand(2, 1, D, generator=g) < 0.5, -1.0, 1.0)).to(torch.bfloat16)
    out, kept = prune_channels(x, torch.tensor([rho, rho]), (rho, 1.0))
    count = math.ceil(rho * D)
    for r in range(2):
        mags = sorted(x[r, 0].float().abs().tolist(), reverse=True)
        thr = mags[count - 1]
        expect = x[r, 0].float().abs() >= thr
        assert torch.equal(out[r, 0] != 0, expect)
        assert int(kept[r]) == int(expect.sum()) >= count


def test_episode_on_a_bf16_base(tmp_path):
    cfg = load_config("official_configs/tiny.yml", [f"block_cache_dir={tmp_path}"])
    out = {}
    for dtype in ("float32", "bfloat16"):
        model, tok = load_lm(cfg.model_name, dtype, "cpu")
        out[dtype] = ControlledLM.from_config(cfg, model, tok)
    blocks = torch.from_numpy(np.asarray(load_blocks(cfg, tok, "train")[:2], dtype=np.int64))
    lm16 = out["bfloat16"]
    assert next(lm16.model.parameters()).dtype == torch.bfloat16
    torch.manual_seed(0)
    policy = SOLPolicy.from_config(cfg, lm16.hidden_size, lm16.hidden_size, lm16.actions)
    sched = PolicyScheduler(policy, 1.0, greedy=False, generator=torch.Generator().manual_seed(2), record=True)
    budgets = torch.tensor([[0.5, 0.75, 0.5], [0.8, 0.6, 0.9]])
    with torch.no_grad():
        ep16 = run_episode(lm16, blocks, sched, budgets, cfg.context_len, group_size=3)
        tr = sched.trace()
        ep32 = run_episode(out["float32"], blocks, _Replay(tr.actions), budgets, cfg.context_len, group_size=3)
    for k in ("h", "e", "scalars", "logp_old"):
        assert getattr(tr, k).dtype == torch.float32, k
    assert ep16.logp.dtype == torch.float32
    assert len(set(tr.actions.flatten().tolist())) > 1
    # same actions, same tokens: bf16 rounding moves log p(y) a little (a random tiny model is ~uniform)
    assert (ep16.logp - ep32.logp).abs().mean() < 0.05
    eff = ep16.effective
    assert (ep16.usage["channel_keep"][eff] >= ep16.usage["prune"][eff] - 1e-6).all()  # ties only add channels


def test_decode_attention_over_a_padded_buffer_equals_the_prefix():
    """Low-precision decode attention multiplies by the whole (contiguous) cache buffer and masks the tail:
    the result is attention over the filled prefix."""
    from utils.controls import decode_attention

    g = torch.Generator().manual_seed(3)
    B, Hkv, grp, K, cap, D = 3, 2, 2, 21, 30, 16
    kbuf = torch.zeros(B, Hkv, cap, D, dtype=torch.bfloat16)
    vbuf = torch.zeros_like(kbuf)
    kbuf[:, :, :K] = torch.randn(B, Hkv, K, D, generator=g).to(torch.bfloat16)
    vbuf[:, :, :K] = torch.randn(B, Hkv, K, D, generator=g).to(torch.bfloat16)
    kbuf[:, :, K:] = 50.0  # whatever the tail holds must not leak in
    q = torch.randn(B, Hkv * grp, 1, D, generator=g).to(torch.bfloat16)
    keep_half = lambda q_, k_, logits: torch.arange(K)[None, None] % 2 == 0  # noqa: E731
    for keep_fn in (None, keep_half):
        ref, keep_ref = decode_attention(q, kbuf[:, :, :K], vbuf[:, :, :K], None, D ** -0.5, keep_fn)
        got, keep = decode_attention(q, kbuf[:, :, :K], vbuf[:, :, :K], None, D ** -0.5, keep_fn, (kbuf, vbuf))
        assert torch.equal(keep, keep_ref)
        torch.testing.assert_close(got.float(), ref.float(), atol=2e-2, rtol=0)
