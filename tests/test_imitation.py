"""Tests of utils/imitation.py: the recorded traces are what the policy is fed in its own rollouts, cloning
makes the policy act like the teacher inside real episodes, and the CLI writes a loadable run or nothing."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from utils import damage_map, damage_probe, imitation, probe_scheduler
from utils.checkpoint import load_checkpoint
from utils.engine import Scheduler, run_episode
from utils.grpo import sample_budgets
from utils.policy import SOLPolicy
from utils.schedulers import PolicyScheduler


@pytest.fixture(scope="module")
def tiny(tiny_test_split):
    cfg, lm, blocks = tiny_test_split
    return cfg, lm, np.asarray(blocks, dtype=np.int64)


def _prune_probe(lm) -> int:
    return lm.actions.tags.index("k100-s050-q16")


class _Replay(Scheduler):
    """Plays back a recorded [T, N] action sequence."""

    def __init__(self, actions: torch.Tensor) -> None:
        self.actions = actions

    def choose(self, obs):
        return self.actions[obs.t]


def test_recorder_traces_equal_the_policy_scheduler_traces(tiny):
    cfg, lm, blocks = tiny
    torch.manual_seed(0)
    policy = SOLPolicy.from_config(cfg, lm.hidden_size, lm.hidden_size, lm.actions)
    b = torch.from_numpy(blocks[:2])
    budgets = torch.tensor([[0.5, 0.75, 0.5], [0.8, 0.6, 0.9]])
    ps = PolicyScheduler(policy, 1.0, greedy=False, generator=torch.Generator().manual_seed(1), record=True)
    with torch.no_grad():
        run_episode(lm, b, ps, budgets, cfg.context_len, group_size=3)
        ref = ps.trace()
        rec = imitation.CloneRecorder(_Replay(ref.actions), policy.bos_id)
        run_episode(lm, b, rec, budgets, cfg.context_len, group_size=3)
    got = rec.trace()
    assert len(set(ref.actions.flatten().tolist())) > 1  # a non-trivial schedule
    assert got.logp_old is None and ref.logp_old is not None
    for k in ("h", "e", "scalars", "prev_actions", "actions"):
        g, r = getattr(got, k), getattr(ref, k)
        if k == "scalars":  # the columns the policy reads (the engine skips the others for such a policy)
            g, r = g[..., :policy.scalar_dim], r[..., :policy.scalar_dim]
        torch.testing.assert_close(g, r, msg=k)


def test_engine_takes_per_row_budgets(tiny):
    cfg, lm, blocks = tiny
    b = torch.from_numpy(blocks[:2])
    rows = torch.tensor([[1.0, 0.5, 1.0], [1.0, 0.6, 1.0], [1.0, 0.7, 1.0], [1.0, 0.8, 1.0]])

    class Spy(Scheduler):
        def choose(self, obs):
            return torch.full_like(obs.input_ids, self.lm.actions.dense_idx)

    s = Spy()
    with torch.no_grad():
        ep = run_episode(lm, b, s, rows, cfg.context_len, group_size=2)
        torch.testing.assert_close(ep.budgets, rows)
        ep2 = run_episode(lm, b, s, rows[::2], cfg.context_len, group_size=2)  # per input: repeated
        torch.testing.assert_close(ep2.budgets, rows[::2].repeat_interleave(2, 0))
        with pytest.raises(ValueError, match="per row"):
            run_episode(lm, b, s, rows[:3], cfg.context_len, group_size=2)


def test_cloned_policy_acts_like_the_teacher_in_its_own_episodes(tiny):
    """After cloning a budget-calibrated teacher, the policy's argmax rollouts (fed back its own actions)
    choose what the teacher chooses at the same budgets on most steps, where the untrained policy does not."""
    cfg, lm, blocks = tiny
    cheap = _prune_probe(lm)
    with torch.inference_mode():
        fit_map = damage_map.collect(lm, torch.from_numpy(blocks[:8]), cfg.context_len, 4, cheap, progress=False)
    teacher, _ = probe_scheduler.fit_scheduler(fit_map, "position", lm.actions, cheap)
    torch.manual_seed(0)
    policy = SOLPolicy.from_config(cfg, lm.hidden_size, lm.hidden_size, lm.actions)
    gen = torch.Generator().manual_seed(0)
    tr, eff = imitation.teacher_episodes(lm, teacher, policy.bos_id, blocks[:8], cfg, 4, 4, gen, progress=False)
    assert tr.actions.shape == (cfg.rollout_len, 32)

    def agreement() -> float:
        b = torch.from_numpy(blocks[:8])
        budgets = sample_budgets(cfg, 8, torch.Generator().manual_seed(5))
        with torch.no_grad():
            want = run_episode(lm, b, teacher, budgets, cfg.context_len).actions
            policy.eval()
            got = run_episode(lm, b, PolicyScheduler(policy, 1.0, greedy=True), budgets, cfg.context_len).actions
        return float((want[eff] == got[eff]).float().mean())

    before = agreement()
    rows = torch.arange(32)
    log = imitation.clone(policy, tr, eff, rows, rows[:0], epochs=60, minibatch=8, lr=3e-3, weight_decay=0.0,
                          seed=0, progress=False)
    assert log[-1]["train_ce"] < 0.5 * log[0]["train_ce"]
    after = agreement()
    assert after >= 0.85 and after > before + 0.1, (before, after)


def test_cli_writes_a_loadable_run_or_nothing(tmp_path, capsys):
    base = ["--config", "official_configs/tiny.yml", "--set", "device=cpu", "--set", f"block_cache_dir={tmp_path}",
            "--set", "max_blocks=8", "--set", "policy_scalar_dim=10"]
    fit = tmp_path / "map.pt"
    assert damage_probe.main(["collect", "--config", "official_configs/tiny.yml", "--set", "device=cpu",
                              f"block_cache_dir={tmp_path}", "max_blocks=8", "--split", "train", "--blocks", "8", "--batch_size", "4", "--probe", "k100-s050-q16",
                              "--save", str(fit)]) == 0
    out = tmp_path / "run"
    args = [*base, "--teacher", str(fit), "--blocks", "6", "--calibrate_blocks", "2", "--epochs", "2", "--minibatch", "8",
            "--no_progress"]
    assert imitation.main([*args, "--output_dir", str(out)]) == 0
    ckpt = load_checkpoint(out)
    assert ckpt["imitation"]["features"] == "+scalars" and ckpt["cfg"]["policy_scalar_dim"] == 10
    assert (out / "config.yaml").is_file() and (out / "imitation.json").is_file()
    summary = json.loads((out / "imitation.json").read_text())
    cal = summary["in_episode_calibration"]
    assert cal["blocks"] == 2 and len(cal["levels"]) == len(cal["cheap_shares"]) == 10
    assert summary["track_budget"] is False and 0.0 <= summary["teacher_mean_abs_budget_gap"] <= 1.0
    capsys.readouterr()
    assert imitation.main([*args, "--output_dir", str(out)]) == 2  # refuses to overwrite
    bad = tmp_path / "bad"
    assert imitation.main([*base, "--teacher", str(tmp_path / "nope.pt"), "--output_dir", str(bad)]) == 2
    assert imitation.main([*base, "--set", "rollout_len=4", "--teacher", str(fit), "--output_dir", str(bad)]) == 2
    assert imitation.main([*args, "--holdout", "1.5", "--output_dir", str(bad)]) == 2
    assert imitation.main([*args, "--blocks", "8", "--output_dir", str(bad)]) == 2  # nothing left to calibrate on
    junk = tmp_path / "junk.pt"
    junk.write_text("not a tensor file")
    assert imitation.main([*base, "--teacher", str(junk), "--output_dir", str(bad)]) == 2
    assert imitation.main([*args, "--set", "policy_bracket_levels=true", "--output_dir", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 7 and "swamp the cloning loss" in err and "calibration" in err and "cannot read damage map" in err and "already holds" in err and "not found" in err and "rollout_len" in err
    assert not bad.exists()
