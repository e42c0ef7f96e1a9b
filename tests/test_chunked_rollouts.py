"""Decoding an update cycle's rollout batches together (`rollout_rows_per_forward`) on the tiny random Llama.

* row independence: a cycle decoded in one forward gives, batch by batch, the log-likelihoods, usages, policy
  inputs and advantages of the same rows decoded one batch at a time with the same actions;
* knob 0 is the one-batch-at-a-time trainer: a hand-written per-batch loop gives the same parameters;
* a chunked run is deterministic, and it really decodes several batches per forward;
* a chunked run killed with SIGKILL inside a cycle resumes to the parameters and metrics of a straight run
  (metrics.jsonl cut back to the checkpoint, temporary files removed); a fresh run into a killed run's
  directory starts its metrics anew.
"""
from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_train import TINY, _check_resume_exact, block_cache, load_ckpt, read_metrics, run_main  # noqa: F401
from utils.config import load_config
from utils.engine import Scheduler, run_episode
from utils.grpo import sample_budgets
from utils.trainer import GRPOTrainer, TrainArgs

REPO = Path(__file__).resolve().parents[1]
# 4 rollout batches (2 inputs x 4 rollouts x 8 steps = 64 entries each) per update cycle of 256 entries,
# minibatches of 8 rollouts -> 4 optimizer updates per cycle.
POOLED = ("ppo_target_batch_size=256", "ppo_minibatch_size=64")


class Replay(Scheduler):
    """Replays given actions [T, N] and records what the policy would have been fed."""

    def __init__(self, actions: torch.Tensor) -> None:
        self.actions = actions
        self.hidden, self.scalars = [], []

    def choose(self, obs):
        self.hidden.append(obs.hidden.float().clone())
        self.scalars.append(obs.scalars.clone())
        return self.actions[obs.t]


def _trainer(tmp_path: Path, block_cache: str, *sets: str) -> GRPOTrainer:
    cfg = load_config(TINY, [f"block_cache_dir={block_cache}", *POOLED, *sets])
    return GRPOTrainer(cfg, TrainArgs(total_updates=100, output_dir=str(tmp_path / "run")))


def _params(run: Path) -> dict[str, torch.Tensor]:
    return load_ckpt(run / "policy_latest.pt")["policy_state_dict"]


def test_cycle_in_one_forward_equals_batch_by_batch(tmp_path, block_cache):
    tr = _trainer(tmp_path, block_cache, "task_w_kl=0.1", "budget_credit=step")
    assert tr.batches_per_forward() == 4
    chunk = list(itertools.islice(iter(tr.sampler), 4))
    gen_state = tr.budget_gen.get_state()
    together = tr.rollout_batches(chunk)  # one episode of 4 x 8 rows
    tr.budget_gen.set_state(gen_state)
    K, C = tr.cfg.grpo_rollouts_per_input, tr.cfg.context_len
    all_blocks = torch.from_numpy(tr.blocks[list(itertools.chain(*chunk))].astype("int64"))
    all_budgets = torch.cat([sample_budgets(tr.cfg, len(i), tr.budget_gen) for i in chunk])
    tr.budget_gen.set_state(gen_state)
    ep_all = run_episode(tr.lm, all_blocks, Replay(torch.cat([b.actions for b, _ in together], 1)), all_budgets, C, K,
                         need_kl=True)
    for j, (idx, (batch, metrics)) in enumerate(zip(chunk, together)):
        blocks = torch.from_numpy(tr.blocks[idx].astype("int64"))
        budgets = sample_budgets(tr.cfg, len(idx), tr.budget_gen)  # the draws rollout_batches made, in order
        replay = Replay(batch.actions)
        ep = run_episode(tr.lm, blocks, replay, budgets, C, K, need_kl=True)
        adv, r_task, _, _ = tr.score(ep)
        part = ep_all.rows(j * len(idx) * K, (j + 1) * len(idx) * K)
        for name in ("logp", "kl", "dense_logp", "budgets"):
            torch.testing.assert_close(getattr(part, name), getattr(ep, name), atol=1e-5, rtol=0)
        for name in ep.usage:
            torch.testing.assert_close(part.usage[name], ep.usage[name], atol=1e-5, rtol=1e-6)
        torch.testing.assert_close(batch.h, torch.stack(replay.hidden), atol=1e-5, rtol=0)
        d = tr.policy.scalar_dim  # the columns the policy reads (the others are not computed for it)
        torch.testing.assert_close(batch.scalars[..., :d], torch.stack(replay.scalars)[..., :d], atol=1e-5, rtol=0)
        torch.testing.assert_close(batch.adv, adv, atol=1e-5, rtol=0)
        torch.testing.assert_close(metrics["reward/task_mean"], r_task.mean().item(), atol=1e-5, rtol=0)
        usage = ep.usage_means()
        for i, ax in enumerate(("tok", "prune", "qratio")):
            torch.testing.assert_close(metrics[f"budgets/achieved_{ax}_mean"], usage[:, i].mean().item(), atol=1e-6,
                                       rtol=0)
        torch.testing.assert_close(metrics["train/attn_keep_realised"],
                                   ep.usage["attn_keep"][ep.effective].mean().item(), atol=1e-6, rtol=0)


def test_episode_rows_refuses_to_split_a_group(tmp_path, block_cache):
    tr = _trainer(tmp_path, block_cache)
    idx = next(iter(tr.sampler))
    blocks = torch.from_numpy(tr.blocks[idx].astype("int64"))
    ep = run_episode(tr.lm, blocks, Replay(torch.zeros(8, 8, dtype=torch.long)), torch.ones(2, 3), tr.cfg.context_len, 4)
    assert ep.rows(4, 8).dense_logp.shape == (8, 1)
    with pytest.raises(ValueError, match="split a group"):
        ep.rows(2, 6)


def test_knob_zero_is_the_one_batch_at_a_time_loop(tmp_path, block_cache):
    """train() with rollout_rows_per_forward=0 == a plain loop of rollout_batch + updater.add per batch."""
    run = run_main(tmp_path / "knob0", block_cache, updates=4, sets=(*POOLED, "rollout_rows_per_forward=0"))
    tr = _trainer(tmp_path, block_cache, "rollout_rows_per_forward=0")
    assert tr.batches_per_forward() == 1
    for idx in tr.sampler:
        batch, _ = tr.rollout_batch(idx)
        tr.updater.add(batch)
        if tr.updater.num_updates >= 4:
            break
    mine, theirs = tr.policy.state_dict(), _params(run)
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_chunked_run_is_deterministic_and_chunks(tmp_path, block_cache):
    sets = (*POOLED, "rollout_rows_per_forward=32")
    a = run_main(tmp_path / "a", block_cache, updates=8, sets=sets)
    b = run_main(tmp_path / "b", block_cache, updates=8, sets=sets)
    pa, pb = _params(a), _params(b)
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    one = run_main(tmp_path / "one", block_cache, updates=8, sets=(*POOLED, "rollout_rows_per_forward=0"))
    # same data and budgets, other action draws: the parameters differ, the logged budgets do not
    assert any(not torch.equal(pa[k], v) for k, v in _params(one).items())
    ma, mo = read_metrics(a), read_metrics(one)
    assert [r["budgets/target_prune_mean"] for r in ma] == [r["budgets/target_prune_mean"] for r in mo]


KILLER = """
import os, signal, sys
sys.path.insert(0, {repo!r})
import utils.trainer as trainer
calls = 0
real = trainer.run_episode
def run_episode(*args, **kwargs):
    global calls
    calls += 1
    if calls == {kill_at}:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)
trainer.run_episode = run_episode
import train
sys.exit(train.main({argv!r}))
"""


def test_resume_after_sigkill_inside_a_chunked_cycle(tmp_path, block_cache):
    """2 batches per forward, 2 forwards per cycle, a checkpoint after every cycle (12 updates, stride 1). The
    run is killed as its 4th forward starts: inside cycle 2, after cycle 2's first two batches were pooled and
    logged. The resumed run must equal a straight run (parameters, optimizer, RNG, metrics)."""
    sets = (*POOLED, "rollout_rows_per_forward=16")
    straight = run_main(tmp_path / "straight", block_cache, updates=12, sets=sets)
    killed = tmp_path / "killed"
    argv = ["--config", TINY, "--total_updates", "12", "--output_dir", str(killed),
            "--set", f"block_cache_dir={block_cache}"] + [a for s in sets for a in ("--set", s)]
    proc = subprocess.run([sys.executable, "-c", KILLER.format(repo=str(REPO), kill_at=4, argv=argv)],
                          capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == -9, proc.stderr[-2000:]
    ckpt = load_ckpt(killed / "policy_latest.pt")
    assert ckpt["update_step"] == 4 and ckpt["batches_done"] == 4
    assert max(r["batch"] for r in read_metrics(killed)) == 6  # two batches past the checkpoint were logged
    assert train_main_resume(killed, 12) == 0
    _check_resume_exact(straight, killed)
    assert not list(killed.glob("*.tmp")) and not list(killed.glob(".*.tmp"))


def test_fresh_run_into_a_killed_directory_drops_its_stale_metrics(tmp_path, block_cache):
    """A run killed before its first checkpoint leaves metrics.jsonl behind; a fresh run there starts it anew."""
    run = tmp_path / "again"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"update": 0, "batch": 1, "stale": true}\n{"update": 1, "batch"')
    run_main(run, block_cache, updates=2)
    records = read_metrics(run)
    assert records and not any("stale" in r for r in records)
    assert [r["batch"] for r in records] == list(range(1, len(records) + 1))


def train_main_resume(run: Path, updates: int) -> int:
    import train

    return train.main(["--resume", str(run), "--total_updates", str(updates)])
