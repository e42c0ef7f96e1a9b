"""Integration tests on the embedded SmolLM2-135M (converted once from the shipped GGUF into $SOL_CACHE)."""
from __future__ import annotations

import time

import pytest
import torch

from utils.actions import ActionSpace
from utils.lm import ControlledLM
from utils.model import SMOLLM2_ALIAS, ModelLoadError, _atomic_dir, _convert_in_child, load_lm, smollm2_dir

pytestmark = pytest.mark.smollm2


@pytest.fixture(scope="module")
def smol():
    smollm2_dir()  # convert once if needed, so the timed load below reads the cache
    t0 = time.time()
    model, tok = load_lm(SMOLLM2_ALIAS)
    return model, tok, time.time() - t0


def test_loads_real_llama_from_cache(smol):
    model, tok, seconds = smol
    c = model.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.vocab_size) == (
        30, 576, 9, 3, 49152)
    assert (smollm2_dir() / "model.safetensors").is_file()
    assert seconds < 30  # the converted cache loads in seconds; the GGUF conversion is not redone
    assert not any(p.requires_grad for p in model.parameters())
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.inference_mode():
        nxt = model(ids).logits[0, -1].argmax()
    assert "Paris" in tok.decode(nxt)  # a real model, not random weights


def test_failed_conversion_is_one_line_and_leaves_nothing(tmp_path):
    """The GGUF conversion runs in a child process; its failure surfaces as one ModelLoadError line and the
    atomic write leaves no directory, finished or temporary, behind."""
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf file")
    final = tmp_path / "cache" / "converted"
    with pytest.raises(ModelLoadError, match=r"converting broken.gguf failed: ") as err:
        _atomic_dir(final, lambda tmp: _convert_in_child(bad, tmp))
    assert "\n" not in str(err.value)
    assert list((tmp_path / "cache").iterdir()) == []


def test_dense_step_matches_model_and_sparse_step_differs(smol):
    model, tok, _ = smol
    acts = ActionSpace.build([0.3, 1.0], ["s60", "s100"], ["q5", "q16"])
    lm = ControlledLM(model, tok, acts, "quest", Ts=4, Tw=2, page_size=4)
    text = "The quick brown fox jumps over the lazy dog. " * 6
    ids = tok(text, return_tensors="pt").input_ids[:, :48]
    with torch.inference_mode():
        ref = model(ids).logits[0, -1].float()
    cache, _, _ = lm.prefill(ids[:, :-1])
    dense = lm.step(lm.clone_cache(cache), ids[:, -1], torch.tensor([acts.dense_idx]))
    assert torch.allclose(dense.logits[0], ref, atol=1e-4)
    plain = lm.step(lm.clone_cache(cache), ids[:, -1], None)
    assert torch.allclose(plain.logits[0], ref, atol=1e-4)
    sparse = lm.step(lm.clone_cache(cache), ids[:, -1], torch.tensor([acts.index(0.3, 0.6, 5)]))
    assert (sparse.logits[0] - ref).abs().max() > 1e-2
    assert sparse.usage.flops[0] < dense.usage.flops[0]


def test_shipped_joint_checkpoint_runs_out_of_the_box():
    """results/ckpt_joint (weights only) loads with its stored config and drives a short policy episode whose
    realised usage follows the requested token budget direction (a trained knob, not a random policy)."""
    from pathlib import Path

    from utils.engine import run_episode
    from utils.checkpoint import load_policy_eval
    from utils.schedulers import PolicyScheduler

    ckpt = Path(__file__).resolve().parents[1] / "results" / "ckpt_joint"
    cfg, lm, policy = load_policy_eval(str(ckpt), device="cpu")
    assert cfg.model_name == SMOLLM2_ALIAS and len(lm.actions) == 27
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(100, 20000, (2, 64 + 8 + 1), generator=g)
    keeps = []
    for k in (0.2, 0.9):
        ep = run_episode(lm, blocks, PolicyScheduler(policy), torch.tensor([[k, 0.7, 0.5]] * 2), context_len=64)
        keeps.append(float(ep.usage_means()[:, 0].mean()))
    assert keeps[0] < keeps[1]


def test_shipped_prune_checkpoint_follows_its_budget():
    """results/ckpt_prune (two prune levels) loads and its argmax schedule tracks the requested channel keep:
    a tight request prunes more steps than a loose one, and each lands near its target."""
    from pathlib import Path

    from utils.engine import run_episode
    from utils.checkpoint import load_policy_eval
    from utils.schedulers import PolicyScheduler

    ckpt = Path(__file__).resolve().parents[1] / "results" / "ckpt_prune"
    cfg, lm, policy = load_policy_eval(str(ckpt), device="cpu")
    assert lm.actions.tags == ("k100-s040-q16", "k100-s100-q16")
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(100, 20000, (4, 64 + 16 + 1), generator=g)
    got = {}
    for rho in (0.5, 0.9):
        ep = run_episode(lm, blocks, PolicyScheduler(policy), torch.tensor([[1.0, rho, 1.0]] * 4), context_len=64)
        got[rho] = float(ep.usage_means()[:, 1].mean())
    assert got[0.5] < got[0.9]
    assert abs(got[0.5] - 0.5) < 0.1 and abs(got[0.9] - 0.9) < 0.1


def test_shipped_cloned_prune_checkpoint_follows_its_budget_on_real_text():
    """results/ckpt_prune_bc_cal (the headline: reads surprisal and entropy) loads and, on real dev text,
    a tight request prunes more steps than a loose one, each near its target."""
    from pathlib import Path

    from utils.data import load_blocks
    from utils.engine import run_episode
    from utils.checkpoint import load_policy_eval
    from utils.schedulers import PolicyScheduler

    ckpt = Path(__file__).resolve().parents[1] / "results" / "ckpt_prune_bc_cal"
    cfg, lm, policy = load_policy_eval(str(ckpt), device="cpu")
    assert lm.actions.tags == ("k100-s040-q16", "k100-s100-q16") and cfg.policy_scalar_dim == 10
    blocks = torch.from_numpy(load_blocks(cfg, lm.tokenizer, "dev")[:8].astype("int64"))
    got = {}
    for rho in (0.5, 0.9):
        ep = run_episode(lm, blocks, PolicyScheduler(policy), torch.tensor([[1.0, rho, 1.0]] * len(blocks)),
                         context_len=cfg.context_len)
        got[rho] = float(ep.usage_means()[:, 1].mean())
    assert got[0.5] < got[0.9]
    assert abs(got[0.5] - 0.5) < 0.1 and abs(got[0.9] - 0.9) < 0.1
