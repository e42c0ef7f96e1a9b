"""Shared fixtures: the tiny random Llama of official_configs/tiny.yml with blocks of its test split."""
from __future__ import annotations

from pathlib import Path

import pytest

from utils.config import load_config
from utils.data import load_blocks
from utils.lm import ControlledLM
from utils.model import load_lm

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_test_split(tmp_path_factory):
    """(cfg, ControlledLM, test-split token blocks) for the tiny config, with a private block cache."""
    cache = tmp_path_factory.mktemp("blocks")
    cfg = load_config(REPO / "official_configs/tiny.yml", ["device=cpu", f"block_cache_dir={cache}", "max_blocks=8"])
    model, tok = load_lm(cfg.model_name, cfg.dtype, "cpu")
    lm = ControlledLM.from_config(cfg, model, tok)
    return cfg, lm, load_blocks(cfg, tok, "test")


@pytest.fixture(scope="module")
def tiny_ckpt_dir(tiny_test_split, tmp_path_factory):
    """A run directory with a randomly initialised policy in the trainer's checkpoint format (enough to
    exercise the evaluators end to end)."""
    import torch

    from utils.checkpoint import save_checkpoint
    from utils.config import config_to_dict
    from utils.policy import SOLPolicy

    cfg, lm, _ = tiny_test_split
    d = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    policy = SOLPolicy.from_config(cfg, lm.hidden_size, lm.hidden_size, lm.actions)
    save_checkpoint({"policy_state_dict": policy.state_dict(), "cfg": config_to_dict(cfg)}, d / "policy_latest.pt")
    return d


@pytest.fixture(scope="module")
def tiny_lm_with_ref():
    """(cfg, ControlledLM, an untouched SDPA copy of the model, an untrained policy in eval mode) on the tiny
    config: the streaming runtime and the lm-eval adapter are checked against the plain model."""
    import copy

    import torch

    from utils.policy import SOLPolicy

    cfg = load_config(REPO / "official_configs/tiny.yml", ["device=cpu"])
    model, tok = load_lm(cfg.model_name, cfg.dtype, "cpu")
    lm = ControlledLM.from_config(cfg, model, tok)
    ref = copy.deepcopy(model)
    ref.set_attn_implementation("sdpa")
    torch.manual_seed(0)
    policy = SOLPolicy.from_config(cfg, model.config.hidden_size, model.config.hidden_size, lm.actions).eval()
    return cfg, lm, ref, policy
