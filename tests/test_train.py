"""End-to-end tests of train.py / utils/trainer.py on the tiny random Llama.

* a 2-update run writes its files, metrics with the documented keys and a complete checkpoint;
* `--resume` continues exactly: a run stopped at N updates and resumed to M ends with the same policy,
  optimizer state and logged metrics as a straight run to M (also with pooled cycles, pending accumulated
  gradients, several PPO epochs, a reference-policy KL, dropout and an epoch boundary);
* `--checkpoint_path` warm-starts from a checkpoint's weights;
* `torchrun --nproc_per_node=2` (gloo on CPU) completes with only rank 0 writing;
* bad input gives one `error:` line on stderr, exit code 2, no traceback and no run directory.

The in-process runs take a few seconds each; the subprocess ones pay ~5 s of imports (torch, transformers).
"""
from __future__ import annotations

import math

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import train
from utils.actions import ActionSpace
from utils.checkpoint import checkpoint_config
from utils.config import ConfigError, config_to_dict, load_config
from utils.model import load_lm
from utils.policy import SOLPolicy
from utils.trainer import GRPOTrainer, TrainArgs

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "official_configs" / "tiny.yml")
CKPT_KEYS = ("policy_state_dict", "cfg", "optimizer", "updater", "sampler", "rng", "update_step")
# Fields that differ between two identical runs (wall-clock timings).
TIMING_KEYS = ("time_s", "time/batch_s")


# ---------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def block_cache(tmp_path_factory) -> str:
    """One block cache for the module (the tokenized tiny training blocks are built once)."""
    return str(tmp_path_factory.mktemp("block_cache"))


def run_main(out: Path | None, block_cache: str, *extra: str, updates: int = 2, sets: tuple[str, ...] = ()) -> Path:
    """train.main in-process on the tiny config; returns the run directory."""
    argv = ["--config", TINY, "--total_updates", str(updates), "--set", f"block_cache_dir={block_cache}"]
    for s in sets:
        argv += ["--set", s]
    if out is not None:
        argv += ["--output_dir", str(out)]
    assert train.main(argv + list(extra)) == 0
    return out


def test_total_updates_stops_at_the_pool_that_reaches_it_and_says_so(tmp_path, block_cache, capsys):
    """tiny.yml with a 128-entry pool of 32-entry minibatches: each pool takes 128 / 32 = 4 optimizer steps at once,
    so --total_updates 3 ends at 4 with a note, and 4 ends at 4 without one."""
    sets = ("ppo_target_batch_size=128", "ppo_minibatch_size=32", "ppo_epochs=1", "grad_accum_steps=1")
    for n, noted in ((3, True), (4, False)):
        out = run_main(tmp_path / f"n{n}", block_cache, updates=n, sets=sets)
        assert load_ckpt(out / "policy_latest.pt")["update_step"] == 4
        assert ("stopped at update 4, past --total_updates 3" in capsys.readouterr().err) is noted


def resume_main(run_dir: Path, updates: int) -> None:
    assert train.main(["--resume", str(run_dir), "--total_updates", str(updates)]) == 0


def load_ckpt(path: Path) -> dict:
    """A training checkpoint, read as the project reads it: weights_only, no arbitrary unpickling."""
    return torch.load(path, map_location="cpu", weights_only=True)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def without_timings(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


def assert_state_dicts_equal(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), f"{what}: different keys"
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: {k} differs (max |diff| {(a[k] - b[k]).abs().max().item():.3g})"


def assert_optimizer_states_equal(a: dict, b: dict) -> None:
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for i in a["state"]:
        sa, sb = a["state"][i], b["state"][i]
        assert sa.keys() == sb.keys()
        for k in sa:
            va, vb = sa[k], sb[k]
            assert torch.equal(va, vb) if torch.is_tensor(va) else va == vb, f"optimizer state[{i}][{k}] differs"


# ---------------------------------------------------------------------------------------------------
# a plain run: files, metrics, checkpoint
# ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, block_cache) -> Path:
    """A 2-update tiny run (one rollout batch of 2 inputs x 4 rollouts x 8 steps = two minibatch updates)."""
    return run_main(tmp_path_factory.mktemp("runs") / "tiny2", block_cache)


def test_run_writes_checkpoints_config_and_metrics(tiny_run):
    names = sorted(p.name for p in tiny_run.iterdir())
    assert names == ["config.yaml", "metrics.jsonl", "policy_2.pt", "policy_latest.pt"], names

    ckpt = load_ckpt(tiny_run / "policy_latest.pt")
    for k in CKPT_KEYS:
        assert k in ckpt, f"checkpoint lacks {k}"
    assert ckpt["update_step"] == 2
    assert ckpt["updater"]["num_updates"] == 2
    assert ckpt["optimizer"]["state"], "optimizer state is empty after two updates"
    assert ckpt["sampler"]["batch"] == 1 and ckpt["sampler"]["epoch"] == 0
    assert {"budget_gen", "action_gen", "torch", "numpy", "python"} <= set(ckpt["rng"])
    assert_state_dicts_equal(ckpt["policy_state_dict"], load_ckpt(tiny_run / "policy_2.pt")["policy_state_dict"],
                             "policy_2.pt vs policy_latest.pt")
    # the saved config.yaml is the run's full config, and the checkpoint holds the same one
    cfg = load_config(str(tiny_run / "config.yaml"))
    assert config_to_dict(cfg) == ckpt["cfg"]
    assert cfg.model_name == "tiny-random-llama" and cfg.rollout_len == 8


def test_metrics_have_documented_keys(tiny_run):
    records = read_metrics(tiny_run)
    assert len(records) == 1  # one rollout batch, log_every = 1
    r = records[0]
    assert r["update"] == 2 and r["batch"] == 1
    for k in ("reward/task_mean", "reward/penalty_mean", "reward/total_mean", "update/clip_frac",
              "update/approx_kl", "update/entropy", "update/loss", "update/grad_norm"):
        assert k in r, k
    for ax in ("tok", "prune", "qratio"):
        for k in (f"budgets/target_{ax}_mean", f"budgets/achieved_{ax}_mean", f"budgets/abs_gap_{ax}"):
            assert k in r, k
    tags = ActionSpace.from_config(load_config(str(tiny_run / "config.yaml"))).tags
    fracs = [r[f"action_frac/{t}"] for t in tags]
    assert sum(fracs) == pytest.approx(1.0)
    assert not [k for k in r if k.startswith("action_frac/") and k[len("action_frac/"):] not in tags]
    for k, v in r.items():
        if isinstance(v, float):
            assert v == v and abs(v) != float("inf"), f"{k} = {v}"
    assert r["reward/penalty_mean"] >= 0.0 and 0.0 <= r["update/clip_frac"] <= 1.0 and r["update/entropy"] > 0.0


def test_checkpoint_loads_into_fresh_policy(tiny_run):
    ckpt = load_ckpt(tiny_run / "policy_latest.pt")
    cfg = checkpoint_config(ckpt)
    model, _ = load_lm(cfg.model_name, cfg.dtype, "cpu")
    actions = ActionSpace.from_config(cfg)
    assert list(actions.tags) == list(ckpt["action_tags"])
    torch.manual_seed(cfg.seed + 99)  # a different init, so the load has to change the parameters
    policy = SOLPolicy.from_config(cfg, model.config.hidden_size, model.get_input_embeddings().embedding_dim,
                                   len(actions))
    saved = ckpt["policy_state_dict"]
    assert any(not torch.equal(v, saved[k]) for k, v in policy.state_dict().items())
    policy.load_state_dict(saved)
    assert_state_dicts_equal(policy.state_dict(), saved, "reloaded policy")
    assert sum(p.numel() for p in policy.parameters()) == ckpt["policy_num_params"]


def test_data_running_out_still_saves_the_last_updates(tmp_path, block_cache):
    """3 batches of data (6 updates) with --total_updates 40 (save stride 4): the updates after the last stride
    crossing (5 and 6) must still be in policy_latest.pt when the sampler runs out."""
    run = run_main(tmp_path / "short", block_cache, updates=40, sets=("train_fraction=0.1",))
    ckpt = load_ckpt(run / "policy_latest.pt")
    assert ckpt["batches_done"] == 3 and ckpt["update_step"] == 6
    assert read_metrics(run)[-1]["update"] == 6
    assert sorted(p.name for p in run.glob("policy_*.pt")) == ["policy_4.pt", "policy_6.pt", "policy_latest.pt"]
    assert_state_dicts_equal(ckpt["policy_state_dict"], load_ckpt(run / "policy_6.pt")["policy_state_dict"], "final")


# ---------------------------------------------------------------------------------------------------
# exact resume
# ---------------------------------------------------------------------------------------------------

def _check_resume_exact(straight: Path, resumed: Path) -> None:
    a, b = load_ckpt(straight / "policy_latest.pt"), load_ckpt(resumed / "policy_latest.pt")
    assert a["update_step"] == b["update_step"] and a["batches_done"] == b["batches_done"]
    assert_state_dicts_equal(a["policy_state_dict"], b["policy_state_dict"], "policy")
    assert_optimizer_states_equal(a["optimizer"], b["optimizer"])
    assert a["sampler"] == b["sampler"]
    ua, ub = a["updater"], b["updater"]
    assert (ua["num_updates"], ua["accum_i"], ua["pool_size"]) == (ub["num_updates"], ub["accum_i"], ub["pool_size"])
    assert torch.equal(ua["generator"], ub["generator"])
    assert (ua["pending_grads"] is None) == (ub["pending_grads"] is None)
    for ga, gb in zip(ua["pending_grads"] or (), ub["pending_grads"] or ()):
        assert (ga is None and gb is None) or torch.equal(ga, gb)
    for k in ("budget_gen", "action_gen", "torch"):
        assert torch.equal(a["rng"][k], b["rng"][k]), f"rng {k} differs"
    # every logged number except wall-clock timings matches, batch by batch
    assert without_timings(read_metrics(straight)) == without_timings(read_metrics(resumed))


def test_resume_is_exact(tmp_path, tiny_run, block_cache):
    """Straight to 4 updates == 2 updates (the module's tiny run, copied) then --resume to 4."""
    straight = run_main(tmp_path / "A", block_cache, updates=4)
    resumed = tmp_path / "B"
    shutil.copytree(tiny_run, resumed)
    resume_main(resumed, 4)
    assert (resumed / "policy_4.pt").is_file() and (resumed / "policy_2.pt").is_file()
    _check_resume_exact(straight, resumed)


def test_resume_is_exact_with_pooling_accumulation_and_epoch_boundary(tmp_path, block_cache):
    """Pool of 2 batches, 8 backward passes per cycle (2 PPO epochs x 4 minibatches), an optimizer step every
    3 of them, so the checkpoint at update 2 holds a pending accumulated gradient; 3 batches per epoch, so the
    resumed part crosses into epoch 2; plus dropout (global torch RNG), a reference-policy KL and a dense KL."""
    sets = ("grad_accum_steps=3", "ppo_target_batch_size=128", "ppo_epochs=2", "policy_dropout=0.1",
            "kl_pi_ref_coef=0.1", "task_w_kl=0.1", "train_fraction=0.1", "epochs=2")
    straight = run_main(tmp_path / "A", block_cache, updates=5, sets=sets)
    resumed = run_main(tmp_path / "B", block_cache, updates=2, sets=sets)
    mid = load_ckpt(resumed / "policy_latest.pt")
    assert mid["updater"]["pending_grads"] is not None, "the test should stop with a pending accumulated gradient"
    assert mid["sampler"]["epoch"] == 0 and mid["batches_done"] == 2
    resume_main(resumed, 5)
    end = load_ckpt(resumed / "policy_latest.pt")
    assert end["batches_done"] == 4 and end["sampler"]["epoch"] == 1
    _check_resume_exact(straight, resumed)


# ---------------------------------------------------------------------------------------------------
# warm start
# ---------------------------------------------------------------------------------------------------

def test_warm_start_starts_from_checkpoint_weights(tmp_path, tiny_run, block_cache):
    src = tiny_run / "policy_2.pt"
    saved = load_ckpt(src)["policy_state_dict"]
    cfg = load_config(TINY, [f"block_cache_dir={block_cache}"])
    # 1) right after set-up: the weights are the checkpoint's; optimizer, counters and data start fresh
    trainer = GRPOTrainer(cfg, TrainArgs(total_updates=2, output_dir=str(tmp_path / "setup"), checkpoint_path=str(src)))
    assert_state_dicts_equal(trainer.policy.state_dict(), saved, "warm-started policy")
    assert trainer.updater.num_updates == 0 and not trainer.optimizer.state_dict()["state"]
    assert trainer.sampler.state_dict()["batch"] == 0
    # 2) end to end: with a reference-policy KL, pi_ref is the policy at the start of training, and it is
    #    saved in the checkpoint, so it must equal the warm-start weights; training then moves the policy.
    out = run_main(tmp_path / "warm", block_cache, "--checkpoint_path", str(src), sets=("kl_pi_ref_coef=0.1",))
    ckpt = load_ckpt(out / "policy_latest.pt")
    assert ckpt["update_step"] == 2
    assert_state_dicts_equal(ckpt["updater"]["ref_policy"], saved, "pi_ref of the warm-started run")
    assert any(not torch.equal(v, saved[k]) for k, v in ckpt["policy_state_dict"].items())


def test_policy_init_from_starts_the_joint_policy_from_a_one_axis_run(tmp_path, block_cache):
    """policy_init_from: a factorised policy on the tiny three-axis grid starts from a prune-only run's policy
    (utils.policy_transfer, tested against the source in tests/test_policy_transfer.py): its trunk is the source's,
    its prune level logits the source's, and a run trains from there; a grid it cannot start from is one error."""
    src = run_main(tmp_path / "prune", block_cache, updates=1, sets=(
        "keep_fracs=[1.0]", "quant_choices=[q16]", "budget_tok_list=[1.0]", "budget_q_ratio_list=[1.0]"))
    saved = load_ckpt(src / "policy_latest.pt")["policy_state_dict"]
    sets = [f"block_cache_dir={block_cache}", "policy_head=factorised", f"policy_init_from={src}"]
    tr = GRPOTrainer(load_config(TINY, sets), TrainArgs(total_updates=1, output_dir=str(tmp_path / "setup")))
    got = tr.policy.state_dict()
    assert_state_dicts_equal({k: got[k] for k in ("blocks.0.q.weight", "obs_proj.weight")},
                             {k: saved[k] for k in ("blocks.0.q.weight", "obs_proj.weight")}, "trunk")
    assert torch.equal(got["pi.weight"][2:4], saved["pi.weight"])  # levels κ 2, ρ 2 (s50, s100), bits 2
    out = run_main(tmp_path / "joint", block_cache, updates=1, sets=tuple(sets[1:]))
    assert load_ckpt(out / "policy_latest.pt")["update_step"] >= 1
    # policy_train_axes [tok, quant] (with the one-axis contrast and a weight average, as a user would run it): an
    # update moves the κ and bits head rows only; the trunk and ρ rows stay
    out = run_main(tmp_path / "joint_kq", block_cache, updates=1, sets=(
        *sets[1:], "policy_train_axes=[tok,quant]", "rollout_contrast=one_axis", "policy_ema_decay=0.5"))
    trained = load_ckpt(out / "policy_latest.pt")["policy_state_dict"]
    for k, v in got.items():
        if k.startswith(("pi.", "budget_head.2.")):
            assert torch.equal(trained[k][2:4], v[2:4]) and not torch.equal(trained[k][[0, 1, 4, 5]], v[[0, 1, 4, 5]])
        else:
            assert torch.equal(trained[k], v), k
    with pytest.raises(ConfigError, match="factorised"):
        load_config(TINY, [f"block_cache_dir={block_cache}", f"policy_init_from={src}"])


# ---------------------------------------------------------------------------------------------------
# torchrun, 2 processes, gloo on CPU
# ---------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_torchrun_two_ranks_only_rank0_writes(tmp_path, block_cache):
    """No --output_dir: each rank derives the run directory name from rank 0's broadcast timestamp. Each rank
    decodes its share of the update cycle (2 rollout batches per rank) in one batched forward."""
    parent = tmp_path / "runs"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "train.py"), "--config", TINY, "--total_updates", "4",
           "--set", f"block_cache_dir={block_cache}", "--set", f"output_dir={parent}", "--set", "run_name=ddp",
           "--set", "ppo_target_batch_size=128"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    run_dirs = list(parent.iterdir())
    assert len(run_dirs) == 1 and run_dirs[0].name.startswith("ddp-"), run_dirs
    run = run_dirs[0]
    assert sorted(x.name for x in run.iterdir()) == ["config.yaml", "metrics.jsonl", "policy_4.pt", "policy_latest.pt"]
    assert p.stdout.count("run directory:") == 1, p.stdout
    assert sorted(x.name for x in tmp_path.iterdir()) == ["runs"]  # nothing else written (e.g. ./checkpoints)
    ckpt = load_ckpt(run / "policy_latest.pt")
    assert ckpt["update_step"] == 4 and ckpt["sampler"]["world_size"] == 2
    assert not any(k.startswith("module.") for k in ckpt["policy_state_dict"])  # the unwrapped policy is saved
    records = read_metrics(run)
    assert len(records) == ckpt["batches_done"] == 2  # rank 0's lines only, once each
    assert len({r["batch"] for r in records}) == len(records)


def _torchrun(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "train.py"), *args]
    return subprocess.run(cmd, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_torchrun_resume_is_exact_and_needs_the_same_world_size(tmp_path, block_cache, capsys):
    """2 gloo ranks: straight to 6 updates == 3 updates, then `torchrun ... --resume` to 6 (each rank gets back
    its own data position, RNGs, pooled rollouts and budget window). A single-process --resume of the 2-rank
    run is one line naming both sizes."""
    sets = ["--set", f"block_cache_dir={block_cache}", "--set", "ppo_target_batch_size=128"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    for out, n in ((straight, 6), (resumed, 3)):
        p = _torchrun(tmp_path, "--config", TINY, "--total_updates", str(n), "--output_dir", str(out), *sets)
        assert p.returncode == 0, p.stderr[-3000:]
    mid = load_ckpt(resumed / "policy_latest.pt")
    assert mid["world_size"] == 2 and [s["sampler"]["world_size"] for s in mid["rank_states"]] == [2, 2]
    r0, r1 = mid["rank_states"]
    assert not torch.equal(r0["rng"]["budget_gen"], r1["rng"]["budget_gen"])  # each rank's own state is kept
    assert not torch.equal(r0["budget_window"][0], r1["budget_window"][0])
    assert train.main(["--resume", str(resumed), "--total_updates", "6"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "2 process(es), this one has 1" in err[0] and "--nproc_per_node=2" in err[0], err
    p = _torchrun(tmp_path, "--resume", str(resumed), "--total_updates", "6")
    assert p.returncode == 0, p.stderr[-3000:]
    _check_resume_exact(straight, resumed)
    a, b = load_ckpt(straight / "policy_latest.pt"), load_ckpt(resumed / "policy_latest.pt")
    for ra, rb in zip(a["rank_states"], b["rank_states"]):
        assert ra["sampler"] == rb["sampler"] and torch.equal(ra["rng"]["budget_gen"], rb["rng"]["budget_gen"])


# ---------------------------------------------------------------------------------------------------
# bad input: one line on stderr, exit code 2, no traceback, no run directory
# ---------------------------------------------------------------------------------------------------

BAD_CASES = ("unknown_yaml_key", "nonfinite_lr", "nan_list_value", "bad_flag", "unknown_key", "missing_data",
             "resume_no_checkpoint", "resume_missing_dir", "budget_out_of_range", "missing_config")


def _bad_cases(root: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (argv, expected fragment of the error line). `root` holds prepared inputs."""
    empty = root / "empty_run"
    empty.mkdir(exist_ok=True)
    base = ["--config", TINY, "--output_dir", "run"]
    bad_yaml = root / "typo.yml"
    bad_yaml.write_text(Path(TINY).read_text() + "\nlerning_rate: 1\n")
    cases = {
        "unknown_yaml_key": (["--config", str(bad_yaml), "--output_dir", "run"], "in " + str(bad_yaml)),
        "nonfinite_lr": (base + ["--set", "lr=inf"], "lr: must be a finite number"),
        "nan_list_value": (base + ["--set", "keep_fracs=[.nan,1.0]"], "keep_fracs: must be a finite number"),
        "bad_flag": (base + ["--bogus_flag"], "unrecognized arguments: --bogus_flag"),
        "unknown_key": (base + ["--set", "lerning_rate=1"], "lerning_rate"),
        "missing_data": (base + ["--set", "dataset_name=/nonexistent/x.txt"], "/nonexistent/x.txt"),
        "resume_no_checkpoint": (["--resume", str(empty)], "policy_latest.pt"),
        "resume_missing_dir": (["--resume", str(root / "no_such_run")], "no_such_run"),
        "budget_out_of_range": (base + ["--set", "budget_tok_max=1.5"], "budget_tok_max"),
        "missing_config": (["--config", str(root / "no_such.yml"), "--output_dir", "run"], "no_such.yml"),
    }
    assert tuple(cases) == BAD_CASES
    return cases


@pytest.fixture(scope="module")
def bad_results(tmp_path_factory, block_cache):
    """Run every bad-input case as its own `python train.py` process, two at a time (each pays ~5 s of imports)."""
    root = tmp_path_factory.mktemp("bad_inputs")
    cases = _bad_cases(root)

    def run(name):
        argv, _ = cases[name]
        cwd = root / f"cwd_{name}"  # its own working directory: a default ./checkpoints/... would show up there
        cwd.mkdir()
        extra = ["--set", f"block_cache_dir={block_cache}"] if "--resume" not in argv else []
        p = subprocess.run([sys.executable, str(REPO / "train.py"), *argv, *extra], cwd=cwd,
                           capture_output=True, text=True, timeout=180)
        return name, (p, cwd)

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(pool.map(run, cases))
    return cases, results, root


@pytest.mark.parametrize("name", BAD_CASES)
def test_bad_input_is_one_error_line(bad_results, name):
    cases, results, root = bad_results
    p, cwd = results[name]
    fragment = cases[name][1]
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    assert "Traceback" not in p.stderr, p.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    assert fragment in lines[0], lines[0]
    assert not p.stdout.strip(), p.stdout
    assert list(cwd.iterdir()) == [], f"left behind: {list(cwd.iterdir())}"  # no ./run nor ./checkpoints/...
    assert list((root / "empty_run").iterdir()) == []


def _foreign_checkpoint(d: Path) -> Path:
    path = d / "foreign.pt"
    torch.save({"policy_state_dict": {"w": torch.zeros(3)}}, path)
    return path


@pytest.mark.parametrize("name, argv, fragment", [
    ("zero_updates", ["--total_updates", "0"], "--total_updates"),
    ("missing_warm_start", ["--checkpoint_path", "{tmp}/no_such.pt"], "no_such.pt"),
    ("foreign_warm_start", ["--checkpoint_path", "{foreign}"], "does not fit"),
    ("resume_with_config", ["--resume", "{tmp}"], "--resume"),
    ("missing_init_source", ["--set", "policy_head=factorised", "--set", "policy_init_from={tmp}/no_such"], "no_such"),
    ("init_source_and_warm_start", ["--set", "policy_head=factorised", "--set", "policy_init_from={tmp}",
                                    "--checkpoint_path", "{foreign}"], "--checkpoint_path and policy_init_from"),
    ("init_needs_factorised_head", ["--set", "policy_init_from={tmp}"], "needs policy_head: factorised"),
    ("train_axes_unknown", ["--set", "policy_head=factorised", "--set", "policy_train_axes=[rho]"],
     "policy_train_axes"),
    ("train_axes_empty", ["--set", "policy_head=factorised", "--set", "policy_train_axes=[]"], "policy_train_axes"),
])
def test_more_bad_input_in_process(tmp_path, capsys, block_cache, name, argv, fragment):
    """The same contract for more cases, through train.main in-process (cheaper than a process each)."""
    foreign = _foreign_checkpoint(tmp_path)
    argv = [a.format(tmp=tmp_path, foreign=foreign) for a in argv]
    out = tmp_path / "run"
    rc = train.main(["--config", TINY, "--output_dir", str(out), "--set", f"block_cache_dir={block_cache}", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], err
    assert not out.exists()


def test_exported_checkpoint_evaluates_warm_starts_and_refuses_resume(tmp_path, tiny_run, block_cache, capsys):
    """An export is policy.safetensors + policy.json (+ config.yaml): the same weights and config, so evaluators
    load it and it warm starts a run (the directory or the .safetensors file); --resume on it is one line."""
    from safetensors.torch import load_file

    from utils.checkpoint import main as ckpt_main
    from utils.checkpoint import load_policy_eval
    out = tmp_path / "ship"
    assert ckpt_main(["export", str(tiny_run), str(out)]) == 0
    full = load_ckpt(tiny_run / "policy_latest.pt")
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "policy.json", "policy.safetensors"]
    assert_state_dicts_equal(load_file(str(out / "policy.safetensors")), full["policy_state_dict"], "safetensors")
    meta = json.loads((out / "policy.json").read_text())
    assert meta["cfg"] == json.loads(json.dumps(full["cfg"])) and meta["update_step"] == full["update_step"] == 2
    assert meta["action_tags"] == full["action_tags"]
    cfg, _, policy = load_policy_eval(str(out), device="cpu")
    assert cfg == checkpoint_config(full)
    assert_state_dicts_equal(policy.state_dict(), full["policy_state_dict"], "exported")
    for source in (out, out / "policy.safetensors"):
        warm = tmp_path / f"warm_{source.name}"
        run_main(warm, block_cache, "--checkpoint_path", str(source), sets=("kl_pi_ref_coef=0.1",), updates=1)
        assert_state_dicts_equal(load_ckpt(warm / "policy_latest.pt")["updater"]["ref_policy"],
                                 full["policy_state_dict"], "pi_ref (the start weights) of the warm-started run")
    assert train.main(["--resume", str(out)]) == 2
    assert "weights-only" in capsys.readouterr().err
    assert ckpt_main(["export", str(tmp_path / "nope"), str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()  # nothing half-made for a missing source
    assert ckpt_main(["export", str(tiny_run), str(tiny_run)]) == 0  # in place: the run's .pt files stay
    assert "optimizer" in load_ckpt(tiny_run / "policy_latest.pt")
    for name in ("policy.safetensors", "policy.json"):
        (tiny_run / name).unlink()  # the module's run is shared with other tests


def test_step_budget_credit_trains(tmp_path, block_cache):
    """budget_credit=step runs end to end and changes the policy (its advantages are not all zero)."""
    run = run_main(tmp_path / "step", block_cache, updates=2, sets=("budget_credit=step", "alpha_tok=50"))
    ckpt = load_ckpt(run / "policy_latest.pt")
    assert ckpt["update_step"] == 2 and checkpoint_config(ckpt).budget_credit == "step"


def test_price_budget_credit_trains_logs_its_price_and_resumes_exactly(tmp_path, block_cache):
    """budget_credit=price runs end to end, logs a finite price per axis, keeps its window of usage slopes in
    the checkpoint and resumes exactly (a window lost on resume changes the prices, so the policy)."""
    sets = ("budget_credit=price", "budget_price_window=3")
    straight = run_main(tmp_path / "A", block_cache, updates=4, sets=sets)
    rows = [r for r in read_metrics(straight) if "budgets/price_prune" in r]
    assert rows and all(math.isfinite(r["budgets/price_prune"]) for r in rows)
    shrinks = [r["budgets/price_shrink_prune"] for r in rows if "budgets/price_shrink_prune" in r]
    assert shrinks and all(0.0 <= x <= 1.0 for x in shrinks)
    ckpt = load_ckpt(straight / "policy_latest.pt")
    assert checkpoint_config(ckpt).budget_credit == "price" and 1 <= len(ckpt["price_window"]) <= 3
    resumed = run_main(tmp_path / "B", block_cache, updates=2, sets=sets)
    resume_main(resumed, 4)
    _check_resume_exact(straight, resumed)


@pytest.mark.parametrize("head,contrast", [("joint", "all"), ("factorised", "all"), ("factorised", "one_axis")])
def test_price_on_three_level_axes_trains_and_resumes_exactly(tmp_path, block_cache, head, contrast):
    """budget_credit=price with three levels on the token and prune axes: those axes are priced per level
    (`level_prices`, finite prices logged), the bits axis keeps the two-level price, the window of level
    gains is in the checkpoint and the run resumes exactly, with either policy head and either way of drawing
    the K rollouts (one_axis also draws its axes and common uniforms from the action RNG, which resume restores)."""
    # one_axis: about a third of the (step, input) cells contrast each axis, so the level rule needs more batches
    window, updates = (3, 8) if contrast == "all" else (8, 24)
    sets = ("budget_credit=price", f"budget_price_window={window}", "keep_fracs=[0.25, 0.5, 1.0]",
            "struct_prune_choices=[s50, s75, s100]", "grpo_rollouts_per_input=8", f"policy_head={head}",
            f"rollout_contrast={contrast}")
    straight = run_main(tmp_path / "A", block_cache, updates=updates, sets=sets)
    rows = read_metrics(straight)
    for ax in ("tok", "prune", "qratio"):
        got = [r[f"budgets/price_{ax}"] for r in rows if f"budgets/price_{ax}" in r]
        assert got and all(math.isfinite(x) for x in got)
    assert any(r.get("budgets/price_tok", 0.0) != 0.0 for r in rows)  # the level rule had enough cells
    ckpt = load_ckpt(straight / "policy_latest.pt")
    assert 1 <= len(ckpt["level_window"]) <= window and ckpt["level_window"][0].shape[1:] == (2, 3, 3)
    n_out = 3 + 3 + len(load_config(str(straight / "config.yaml"), []).quant_choices) if head == "factorised" else None
    assert n_out is None or ckpt["policy_state_dict"]["pi.weight"].shape[0] == n_out
    resumed = run_main(tmp_path / "B", block_cache, updates=updates // 2, sets=sets)  # a later rollout batch after it
    resume_main(resumed, updates)
    _check_resume_exact(straight, resumed)


def test_feedback_off_in_training_is_on_at_inference(tmp_path, block_cache):
    """budget_feedback_in_training=false: the rollouts' log-probabilities are the bounded network's without the
    feedback (the loss's forward reproduces them), dev checks run with the config's gain, which the saved
    config keeps for the evaluators."""
    import numpy as np
    sets = ["budget_feedback_gain=20", "policy_logit_bound=2", "budget_feedback_in_training=false"]
    cfg = load_config(TINY, [f"block_cache_dir={block_cache}", *sets])
    tr = GRPOTrainer(cfg, TrainArgs(total_updates=1, output_dir=str(tmp_path / "r")))
    assert tr.policy.budget_feedback_gain == 0.0
    batch, _ = tr.rollout_batch(np.arange(cfg.batch_size))
    args = (batch.h, batch.e, batch.scalars, batch.prev_actions)
    with torch.no_grad():
        logits = tr.policy(*args, temperature=cfg.pi_temperature)
        logp = torch.log_softmax(logits, -1).gather(-1, batch.actions[..., None])[..., 0]
        torch.testing.assert_close(logp, batch.logp_old, atol=1e-5, rtol=1e-5)
        with tr._inference() as pol:
            assert pol.budget_feedback_gain == 20.0 and not pol.training
            with_fb = pol(*args, temperature=cfg.pi_temperature)
    assert not torch.allclose(with_fb, logits)  # rows off budget are pushed by the feedback at inference
    assert tr.policy.budget_feedback_gain == 0.0 and tr.policy.training
    assert load_config(str(tmp_path / "r" / "config.yaml"), []).budget_feedback_gain == 20.0


def test_dev_eval_logs_learning_curve(tmp_path, block_cache):
    """eval_every_updates > 0 logs the dev-split policy/fixed/dense PPL and achieved usage at those updates."""
    run = run_main(tmp_path / "dev", block_cache, updates=4, sets=("eval_every_updates=2",))
    dev = [r for r in read_metrics(run) if "dev/policy_ppl" in r]
    assert [r["update"] for r in dev] == [2, 4]
    for r in dev:
        assert r["dev/dense_ppl"] > 1 and r["dev/fixed_ppl"] > 1
        assert abs(r["dev/ppl_gap_policy_minus_fixed"] - (r["dev/policy_ppl"] - r["dev/fixed_ppl"])) < 1e-6
        assert 0 < r["dev/achieved_tok"] <= 1 and r["dev/target_tok"] == 0.5
        # the placement check ran on the dev blocks: a correlation (nan only if the spend is constant)
        pc = r["dev/placement_corr"]
        assert math.isnan(pc) or -1.0 <= pc <= 1.0
        assert math.isfinite(r["dev/placement_cheap_damage_random"])
    batches = [r for r in read_metrics(run) if "reward/total_mean" in r]
    assert all(0.0 <= r["train/no_contrast_frac"] <= 1.0 for r in batches)
    assert all(-1.0 <= r["budgets/corr_target_achieved_prune"] <= 1.0 for r in batches)  # tiny.yml samples ρ


def test_weight_average_reads_like_the_raw_run_averaged_and_resumes_exactly(tmp_path, block_cache):
    """policy_ema_decay > 0 leaves training unchanged (the raw weights equal those of a run without it), saves
    the average as policy_state_dict (what evaluators and exports read) following the recursion
    avg_n = d_n avg_{n-1} + (1 - d_n) w_n over the saved raw weights, runs dev checks on the average, and
    resumes exactly."""
    from utils.ema import ema_decay_at

    one_step = ("grad_accum_steps=2",)  # one optimizer step per rollout batch, so every update is saved
    sets = ("policy_ema_decay=0.5", *one_step)
    plain = run_main(tmp_path / "plain", block_cache, updates=4, sets=one_step)
    ema = run_main(tmp_path / "ema", block_cache, updates=4, sets=sets)
    ck = {u: load_ckpt(ema / f"policy_{u}.pt") for u in (1, 2, 3, 4)}
    assert_state_dicts_equal(load_ckpt(plain / "policy_4.pt")["policy_state_dict"], ck[4]["policy_raw_state_dict"],
                             "raw weights of the EMA run vs the plain run")
    for u in (2, 3, 4):
        d = ema_decay_at(0.5, u - 1)
        assert ck[u]["ema_num_updates"] == u
        for k, avg in ck[u]["policy_state_dict"].items():
            if avg.is_floating_point():
                want = d * ck[u - 1]["policy_state_dict"][k] + (1 - d) * ck[u]["policy_raw_state_dict"][k]
                torch.testing.assert_close(avg, want, atol=1e-6, rtol=1e-6)
    assert not torch.equal(ck[4]["policy_state_dict"]["pi.weight"], ck[4]["policy_raw_state_dict"]["pi.weight"])
    resumed = run_main(tmp_path / "B", block_cache, updates=2, sets=sets)
    resume_main(resumed, 4)
    _check_resume_exact(ema, resumed)
    assert_state_dicts_equal(ck[4]["policy_raw_state_dict"], load_ckpt(resumed / "policy_4.pt")["policy_raw_state_dict"],
                             "raw weights after resume")
    # dev checks and evaluators get the average, not the raw weights
    cfg = load_config(TINY, [f"block_cache_dir={block_cache}", *sets])
    tr = GRPOTrainer(cfg, TrainArgs(resume=str(ema), total_updates=4))
    with tr._inference() as pol:
        assert pol is tr.ema.module and not pol.training
        assert_state_dicts_equal(pol.state_dict(), ck[4]["policy_state_dict"], "dev-check weights")
    tr._lock.release()
    # export writes the average by default and the raw weights with --raw (refused for a run without average)
    from utils.checkpoint import main as checkpoint_main, read_exported
    assert checkpoint_main(["export", str(ema), str(tmp_path / "x_avg")]) == 0
    assert checkpoint_main(["export", "--raw", str(ema), str(tmp_path / "x_raw")]) == 0
    avg, raw = read_exported(tmp_path / "x_avg"), read_exported(tmp_path / "x_raw")
    assert (avg["weights"], raw["weights"]) == ("average", "raw")
    assert_state_dicts_equal(avg["policy_state_dict"], ck[4]["policy_state_dict"], "exported average")
    assert_state_dicts_equal(raw["policy_state_dict"], ck[4]["policy_raw_state_dict"], "exported raw weights")
    assert checkpoint_main(["export", "--raw", str(plain), str(tmp_path / "x_plain")]) == 2
    assert not (tmp_path / "x_plain").exists()
    # a run saved without an average cannot be resumed with one (its average would be made up)
    with pytest.raises(Exception, match="without a weight average"):
        GRPOTrainer(cfg, TrainArgs(resume=str(plain), total_updates=6))
