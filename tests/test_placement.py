"""Tests of utils/placement.py (the single-step damage map and the placement report) on the tiny Llama."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from utils import placement
from utils.engine import prefill_blocks, run_episode
from utils.policy import SOLPolicy


@pytest.fixture(scope="module")
def tiny(tiny_test_split):
    cfg, lm, blocks = tiny_test_split
    return cfg, lm, torch.from_numpy(np.asarray(blocks[:4], dtype=np.int64))


def _cheapest(lm) -> int:
    a = lm.actions
    return int((a.keep + a.prune / a.prune_max + a.bits.float() / 16).argmin())


def test_probe_touches_only_its_step_and_later_tokens(tiny):
    cfg, lm, blocks = tiny
    with torch.inference_mode():
        pf = prefill_blocks(lm, blocks, cfg.context_len)
        s = 3
        ep = run_episode(lm, None, placement.ProbeScheduler(s, _cheapest(lm)), torch.ones(4, 3), cfg.context_len,
                         prefill=pf)
    assert (ep.actions[:s] == lm.actions.dense_idx).all() and (ep.actions[s + 1:] == lm.actions.dense_idx).all()
    assert (ep.actions[s] == _cheapest(lm)).all()
    # tokens before the probed step are scored by the dense model (the prefill's teacher-forced pass)
    torch.testing.assert_close(ep.logp[:s], pf.dense_logp[:s], atol=1e-4, rtol=0)
    assert (ep.logp[s] - pf.dense_logp[s]).abs().max() > 1e-4


def test_damage_map_is_zero_for_the_dense_probe_and_consistent(tiny):
    cfg, lm, blocks = tiny
    with torch.inference_mode():
        pf = prefill_blocks(lm, blocks, cfg.context_len)
        loc0, tot0 = placement.single_step_damage(lm, pf, lm.actions.dense_idx)
        loc, tot = placement.single_step_damage(lm, pf, _cheapest(lm))
    T = cfg.rollout_len
    assert loc.shape == tot.shape == (T, 4)
    assert tot0.abs().max() < 1e-3 and loc0.abs().max() < 1e-4
    torch.testing.assert_close(tot[-1], loc[-1])  # the last step reaches no later token
    assert tot.abs().sum() > 0


def test_damage_map_batched_over_steps_equals_one_step_per_forward(tiny):
    """Probed episodes decoded side by side (rows_per_forward: 3 or all 8 steps per forward) give the damage of
    one probed episode per forward."""
    cfg, lm, blocks = tiny
    with torch.inference_mode():
        pf = prefill_blocks(lm, blocks, cfg.context_len)
        ref = placement.single_step_damage(lm, pf, _cheapest(lm))
        for rows in (12, 10 ** 6):
            got = placement.single_step_damage(lm, pf, _cheapest(lm), rows_per_forward=rows)
            for a, b in zip(got, ref):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_report_bounds(tiny):
    cfg, lm, blocks = tiny
    torch.manual_seed(0)
    policy = SOLPolicy.from_config(cfg, lm.hidden_size, lm.hidden_size, lm.actions).eval()
    with torch.inference_mode():
        rep = placement.placement_report(lm, policy, blocks, cfg.context_len, (0.5, 0.75, 0.5), 2, _cheapest(lm))
    assert rep.n_sequences == 4 and rep.probe == lm.actions.tags[_cheapest(lm)]
    # the oracle picks the least harmful steps: never worse than the policy's or a random choice of as many
    assert rep.oracle_cheap_damage <= rep.policy_cheap_damage + 1e-9
    assert rep.oracle_cheap_damage <= rep.random_cheap_damage + 1e-9
    assert 0.0 <= rep.policy_cheap_frac <= 1.0
    assert -1.0 <= rep.spearman_spend_damage <= 1.0
    # the per-step profiles average back to the scalars
    assert len(rep.policy_cheap_by_step) == len(rep.damage_by_step) == rep.steps
    assert abs(np.mean(rep.policy_cheap_by_step) - rep.policy_cheap_frac) < 1e-3
    assert abs(np.mean(rep.damage_by_step) - rep.damage_mean) < 1e-3


@pytest.fixture(scope="module")
def ckpt_dir(tiny_ckpt_dir):
    return tiny_ckpt_dir


def test_cli_end_to_end_and_bad_input(ckpt_dir, tmp_path, capsys):
    out = tmp_path / "rep.json"
    assert placement.main(["--ckpt_dir", str(ckpt_dir), "--split", "test", "--blocks", "2", "--batch_size", "2",
                           "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "corr(expected spend, damage)" in text and "oracle" in text
    rep = json.loads(out.read_text())
    assert rep["n_sequences"] == 2 and rep["split"] == "test"
    assert placement.main(["--ckpt_dir", str(tmp_path / "nope")]) == 2
    assert placement.main(["--ckpt_dir", str(ckpt_dir), "--probe", "k999-s000-q1"]) == 2
    assert placement.main(["--ckpt_dir", str(ckpt_dir), "--tgt_prune_keep", "1.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("error: ") for line in err)
