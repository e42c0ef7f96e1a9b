"""Run safety (issue 18): atomic writes and CSV appends, non-finite values refused, a diverging run stops with
its last good checkpoint, one validation of the targets, one-line errors, checkpoints that cannot run code,
W&B offline, exact resume after SIGKILLs at random moments and under torchrun."""
from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest
import torch

import eval_perplexity
import train
from utils import io as sol_io
from utils.checkpoint import CheckpointError, load_policy_eval, save_checkpoint
from utils.evaluation import PPL_CSV_COLUMNS, append_csv_row
from utils.plots import PlotError, read_rows

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "official_configs" / "tiny.yml")


def _row(i: int) -> dict[str, str]:
    return {"timestamp": f"t{i}", "policy_ppl": str(20 + i), "fixed_ppl": str(21 + i)}


def test_csv_append_that_fails_half_way_leaves_the_file_whole(tmp_path, monkeypatch):
    path = tmp_path / "ppl.csv"
    append_csv_row(str(path), _row(0))
    before = path.read_bytes()

    def write_half_then_fail(path_, write, binary=False):  # the disk fills up in the middle of the new file
        class Half:
            def write(self, s):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        tmp = Path(path_).with_name(".half.tmp")
        tmp.write_text("timestamp,pol")  # what a plain append would have left in the real file
        try:
            write(Half())
        except OSError as e:
            tmp.unlink()
            raise OSError(e.errno, f"cannot write {path_}: no space left on device") from None

    monkeypatch.setattr(sol_io, "atomic_write", write_half_then_fail)
    with pytest.raises(OSError, match="no space left on device"):
        append_csv_row(str(path), _row(1))
    assert path.read_bytes() == before  # the old rows, whole; no partial row
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".tmp"] == []
    monkeypatch.undo()
    append_csv_row(str(path), _row(1))
    rows = read_rows(path)
    assert [r["timestamp"] for r in rows] == ["t0", "t1"] and len(rows[1]) == len(PPL_CSV_COLUMNS)


def test_atomic_write_real_failure_cleans_up_and_names_the_cause(tmp_path, monkeypatch):
    target = tmp_path / "out.json"
    target.write_text("old")

    def boom(fh):
        fh.write("partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match=r"cannot write .*out\.json: no space left on device"):
        sol_io.atomic_write(target, boom)
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]
    with pytest.raises(IsADirectoryError, match="is a directory"):
        sol_io.atomic_write(tmp_path, lambda fh: fh.write("x"))


def test_csv_reader_rejects_a_truncated_row_naming_file_and_line(tmp_path):
    path = tmp_path / "ppl.csv"
    append_csv_row(str(path), _row(0))
    with open(path, "a") as fh:  # what a non-atomic writer leaves on a full disk
        fh.write("t1,x,y\n")
    with pytest.raises(PlotError, match=r"ppl\.csv, line 3: 3 fields where the header has"):
        read_rows(path)
    with pytest.raises(Exception, match="partial line|different header"):
        with open(path, "a") as fh:
            fh.write("t2,cut")
        append_csv_row(str(path), _row(2))


def test_checkpoints_get_the_permissions_of_a_plain_file(tmp_path):
    path = tmp_path / "policy_latest.pt"
    save_checkpoint({"x": torch.ones(2)}, path)
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask  # not mkstemp's 0600


def test_a_diverging_run_stops_with_its_last_finite_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    rc = train.main(["--config", TINY, "--total_updates", "10", "--output_dir", str(out), "--set", "lr=1e3",
                     "--set", "ppo_minibatch_size=64", "--set", f"block_cache_dir={tmp_path / 'cache'}"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]  # not the progress bar
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: update ")
    assert "not finite" in err[0] and "is intact in" in err[0]
    ckpt = torch.load(out / "policy_latest.pt", map_location="cpu", weights_only=True)
    stopped_at = int(err[0].split("update ")[1].split(":")[0])
    assert ckpt["update_step"] == stopped_at - 1 >= 1
    assert all(bool(torch.isfinite(v).all()) for v in ckpt["policy_state_dict"].values())


def test_a_checkpoint_with_non_finite_weights_is_refused(tiny_ckpt_dir, tmp_path):
    ckpt = torch.load(Path(tiny_ckpt_dir) / "policy_latest.pt", map_location="cpu", weights_only=True)
    ckpt["policy_state_dict"]["pi.bias"][0] = float("nan")
    bad = tmp_path / "bad"
    bad.mkdir()
    save_checkpoint(ckpt, bad / "policy_latest.pt")
    with pytest.raises(CheckpointError, match="not finite"):
        load_policy_eval(str(bad), device="cpu")


@pytest.mark.parametrize("flag,value,fragment", [
    ("--prune_bias", "nan", "--prune_bias must be a finite number"),
    ("--policy_temperature", "nan", "--policy_temperature must be > 0"),
    ("--tgt_quant_bits", "1", "--tgt_quant_bits must be in [2, 16]"),
    ("--tgt_prune_keep", "nan", "--tgt_prune_keep must be in [0, 1]"),
])
def test_eval_perplexity_refuses_bad_numbers_in_one_line(tiny_ckpt_dir, flag, value, fragment, capsys):
    rc = eval_perplexity.main(["--ckpt_dir", str(tiny_ckpt_dir), flag, value])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and fragment in err[0], err


@pytest.mark.parametrize("flag,value,fragment", [
    ("--quant_bias", "inf", "--quant_bias must be a finite number"),
    ("--policy_temperature", "nan", "--policy_temperature must be a finite number"),
    ("--tgt_quant_bits", "1", "--tgt_quant_bits must be in [2, 16]"),
])
def test_runtime_clis_share_the_same_validation(tiny_ckpt_dir, flag, value, fragment):
    """eval_downstream.py and gen_policy_vs_dense.py both go through runtime.check_policy_args."""
    import argparse

    from utils.runtime import RuntimeInputError, add_policy_args, check_policy_args

    p = argparse.ArgumentParser()
    add_policy_args(p)
    args = p.parse_args(["--ckpt_dir", str(tiny_ckpt_dir), flag, value])
    with pytest.raises(RuntimeInputError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        check_policy_args(args)


def test_a_second_trainer_on_a_running_run_directory_is_refused(tmp_path, capsys):
    import json
    import signal
    import subprocess
    import sys
    import time

    out, cache = tmp_path / "run", tmp_path / "cache"
    argv = ["--config", TINY, "--total_updates", "6", "--output_dir", str(out), "--set", f"block_cache_dir={cache}"]
    first = subprocess.Popen([sys.executable, str(REPO / "train.py"), *argv], cwd=tmp_path,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (out / ".trainer.pid").exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert (out / ".trainer.pid").read_text() == str(first.pid)
        # paused while the second one starts, so the first cannot finish (and drop its lock) in between
        first.send_signal(signal.SIGSTOP)
        try:
            rc = train.main(argv)
        finally:
            first.send_signal(signal.SIGCONT)
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
        assert rc == 2 and len(err) == 1 and f"PID {first.pid}" in err[0] and "in use" in err[0]
    finally:
        first_err = first.communicate(timeout=300)[1]
    assert first.returncode == 0, first_err[-2000:]
    updates = [json.loads(line)["update"] for line in (out / "metrics.jsonl").read_text().splitlines()
               if '"update/loss"' in line]
    assert updates == sorted(set(updates)) and updates[-1] == 6  # the first run alone wrote its metrics
    assert not (out / ".trainer.pid").exists()


def test_output_paths_are_checked_before_any_work(tiny_ckpt_dir, tmp_path, capsys):
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("x")
    for target, fragment in ((tmp_path / "adir", "is a directory"), (tmp_path / "afile" / "x.csv", "is not a directory")):
        rc = eval_perplexity.main(["--ckpt_dir", str(tiny_ckpt_dir), "--csv_path", str(target)])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and fragment in err[0] and "--csv_path" in err[0], err


def test_plots_name_the_file_they_write_and_create_directories(tmp_path, capsys):
    from utils.plots import main as plots_main

    csv_path = tmp_path / "r.csv"
    for i, p in enumerate((0.5, 0.7)):
        append_csv_row(str(csv_path), {"target_keep": "1", "target_prune_keep": str(p), "target_quant_bits": "16",
                                       "policy_ppl": str(30 - i), "policy_keep": "1", "policy_prune_keep": str(p),
                                       "policy_quant_ratio": "1", "policy_net_keep": str((2 + p) / 3),
                                       "fixed_ppl": str(31 - i), "fixed_net_keep": str((2 + p) / 3),
                                       "dense_ppl": "20"})
    assert plots_main(["pareto", str(csv_path), "--out", str(tmp_path / "noext")]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {tmp_path / 'noext.png'}"
    assert (tmp_path / "noext.png").is_file() and not (tmp_path / "noext").exists()
    assert plots_main(["table", str(csv_path), "--out", str(tmp_path / "new" / "dir" / "t.md")]) == 0
    assert (tmp_path / "new" / "dir" / "t.md").read_text().startswith("|")


# ---------------------------------------------------------------------------------------------------------
# checkpoints are read without running code
# ---------------------------------------------------------------------------------------------------------

class _Payload:
    """Unpickling this object runs `open(path, 'w')`: the classic pickle attack, made harmless and visible."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _malicious_run(tmp_path: Path, tiny_ckpt_dir) -> tuple[Path, Path]:
    """A run directory whose policy_latest.pt carries the payload beside real-looking weights."""
    ckpt = torch.load(Path(tiny_ckpt_dir) / "policy_latest.pt", map_location="cpu", weights_only=True)
    evil = tmp_path / "evil"
    evil.mkdir()
    marker = tmp_path / "pwned"
    torch.save({**ckpt, "extra": _Payload(marker)}, evil / "policy_latest.pt")
    return evil, marker


def test_a_checkpoint_carrying_a_pickle_payload_is_refused_without_running_it(tmp_path, tiny_ckpt_dir, capsys):
    from utils.checkpoint import load_checkpoint, load_policy_weights

    evil, marker = _malicious_run(tmp_path, tiny_ckpt_dir)
    with pytest.raises(CheckpointError, match="--trust_checkpoint"):
        load_checkpoint(evil)
    with pytest.raises(CheckpointError, match="--trust_checkpoint"):
        load_policy_weights(evil / "policy_latest.pt")
    rc = eval_perplexity.main(["--ckpt_dir", str(evil), "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "could run code" in err[0] and str(evil) in err[0], err
    out = tmp_path / "warm"
    rc = train.main(["--config", TINY, "--total_updates", "1", "--output_dir", str(out),
                     "--checkpoint_path", str(evil / "policy_latest.pt"), "--set", f"block_cache_dir={tmp_path / 'c'}"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert rc == 2 and len(err) == 1 and "could run code" in err[0], err
    assert not marker.exists() and not out.exists()


def test_old_pickled_checkpoints_need_the_explicit_opt_in(tmp_path, tiny_ckpt_dir):
    """A checkpoint of an older version (NumPy RNG state pickled) is refused by default; with trust it loads,
    with a warning, and export turns it into the safe format, which then loads without trust."""
    import numpy as np

    from utils.checkpoint import export_policy, load_checkpoint

    ckpt = torch.load(Path(tiny_ckpt_dir) / "policy_latest.pt", map_location="cpu", weights_only=True)
    old = tmp_path / "old"
    old.mkdir()
    torch.save({**ckpt, "rng": {"numpy": np.random.get_state()}}, old / "policy_latest.pt")
    with pytest.raises(CheckpointError, match="numpy"):
        load_checkpoint(old)
    with pytest.warns(UserWarning, match="full unpickler"):
        assert isinstance(load_checkpoint(old, trust=True)["rng"]["numpy"], tuple)
    with pytest.warns(UserWarning):
        export_policy(old, tmp_path / "safe", trust=True)
    safe = load_checkpoint(tmp_path / "safe")
    assert all(torch.equal(safe["policy_state_dict"][k], v) for k, v in ckpt["policy_state_dict"].items())


def test_a_corrupt_checkpoint_is_one_line_not_a_trust_question(tmp_path):
    from utils.checkpoint import load_checkpoint

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "policy_latest.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="cannot read") as e:
        load_checkpoint(bad)
    assert "trust" not in str(e.value)


# ---------------------------------------------------------------------------------------------------------
# Weights & Biases
# ---------------------------------------------------------------------------------------------------------

def test_wandb_offline_run_holds_the_logged_keys(tmp_path, monkeypatch):
    import json

    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    assert train.main(["--config", TINY, "--total_updates", "2", "--output_dir", str(out), "--wandb_project", "sol-test",
                       "--set", f"block_cache_dir={tmp_path / 'cache'}"]) == 0
    runs = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1, list((out / "wandb").rglob("*"))
    raw = runs[0].read_bytes()
    keys = {k for line in (out / "metrics.jsonl").read_text().splitlines() for k in json.loads(line)}
    assert {"reward/task_mean", "update/loss", "budgets/abs_gap_prune"} <= keys
    assert [k for k in keys if k.encode() not in raw] == []  # every logged key is in the run's history records
    assert b"sol-test" in raw and b"grpo_rollouts_per_input" in raw  # project and config


def test_wandb_missing_is_one_line_before_anything_is_made(tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    out = tmp_path / "run"
    rc = train.main(["--config", TINY, "--total_updates", "2", "--output_dir", str(out), "--wandb_project", "p"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "wandb package" in err[0] and not out.exists()


def test_wandb_init_failure_is_one_line_and_leaves_no_run_directory(tmp_path, monkeypatch, capsys):
    wandb = pytest.importorskip("wandb")

    def refuse(**kwargs):
        raise wandb.errors.UsageError("api_key not configured (no-tty)\nmore detail")

    monkeypatch.setattr(wandb, "init", refuse)
    out = tmp_path / "run"
    rc = train.main(["--config", TINY, "--total_updates", "2", "--output_dir", str(out), "--wandb_project", "p",
                     "--set", f"block_cache_dir={tmp_path / 'cache'}"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert rc == 2 and len(err) == 1 and "api_key not configured" in err[0] and "offline" in err[0], err
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------------
# chaos: SIGKILL at random moments (inside a rollout, half-way through writing a checkpoint), then resume
# ---------------------------------------------------------------------------------------------------------

CHAOS = """
import io, os, signal, sys
sys.path.insert(0, {repo!r})
import torch
import utils.trainer as trainer
from utils.io import atomic_write
calls = {{"episode": 0, "save": 0}}
real_episode, real_save = trainer.run_episode, trainer.save_checkpoint
def run_episode(*args, **kwargs):
    calls["episode"] += 1
    if {kind!r} == "episode" and calls["episode"] == {at}:
        os.kill(os.getpid(), signal.SIGKILL)
    return real_episode(*args, **kwargs)
def save_checkpoint(payload, path):
    calls["save"] += 1
    if {kind!r} == "save" and calls["save"] == {at}:
        def half(fh):
            buf = io.BytesIO()
            torch.save(payload, buf)
            fh.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            fh.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        atomic_write(path, half, binary=True)
    return real_save(payload, path)
trainer.run_episode, trainer.save_checkpoint = run_episode, save_checkpoint
import train
sys.exit(train.main({argv!r}))
"""


def test_chaos_sigkill_at_random_moments_then_resume_is_exact(tmp_path):
    """Seeded: three kills, each at a random rollout forward or half-way through a random checkpoint write
    (leaving a torn temporary file); after each, the run is resumed (or restarted when no checkpoint exists
    yet). The final checkpoint and metrics equal an uninterrupted run's, and no temporary file is left."""
    import random
    import subprocess
    import sys

    from test_train import _check_resume_exact, run_main

    cache = str(tmp_path / "cache")
    sets = ("ppo_target_batch_size=256", "ppo_minibatch_size=64", "rollout_rows_per_forward=16")
    straight = run_main(tmp_path / "straight", cache, updates=8, sets=sets)
    run = tmp_path / "chaos"
    fresh = ["--config", TINY, "--total_updates", "8", "--output_dir", str(run), "--set", f"block_cache_dir={cache}",
             *[a for s in sets for a in ("--set", s)]]
    rng = random.Random(18)
    kills = []
    for _ in range(3):
        kind, at = rng.choice(("episode", "save")), rng.randint(1, 3)
        argv = ["--resume", str(run), "--total_updates", "8"] if (run / "policy_latest.pt").exists() else fresh
        proc = subprocess.run([sys.executable, "-c", CHAOS.format(repo=str(REPO), kind=kind, at=at, argv=argv)],
                              capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                              timeout=300)
        assert proc.returncode in (-9, 0), proc.stderr[-2000:]
        kills.append((kind, at, proc.returncode))
        if proc.returncode == 0:
            break
    assert any(rc == -9 for *_, rc in kills), kills
    if (run / "policy_latest.pt").exists():
        assert train.main(["--resume", str(run), "--total_updates", "8"]) == 0
    else:
        assert train.main(fresh) == 0
    _check_resume_exact(straight, run)
    assert not list(run.glob("*.tmp")) and not list(run.glob(".*.tmp")), kills


# ---------------------------------------------------------------------------------------------------------
# I/O failures: one line naming the path and the cause, before the expensive work where it can be known
# ---------------------------------------------------------------------------------------------------------

def _cli(name: str):
    import importlib

    return importlib.import_module(name).main


def _one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "upd" not in line[:12]]
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
    return err[0]


IO_CASES = {
    "train_output_dir_is_a_file": ("train", lambda t, c: ["--config", TINY, "--output_dir", str(t / "afile")],
                                   "exists and is not a directory"),
    "eval_csv_is_a_directory": ("eval_perplexity", lambda t, c: ["--ckpt_dir", c, "--csv_path", str(t / "adir")],
                                "--csv_path"),
    "downstream_json_is_a_directory": ("eval_downstream", lambda t, c: ["--ckpt_dir", c, "--export_sparsity_json",
                                                                        str(t / "adir")], "--export_sparsity_json"),
    "placement_json_under_a_file": ("utils.placement", lambda t, c: ["--ckpt_dir", c, "--json",
                                                                     str(t / "afile" / "r.json")], "is not a directory"),
    "probe_json_is_a_directory": ("utils.damage_probe", lambda t, c: ["fit", "--fit", str(t / "map.pt"), "--json",
                                                                      str(t / "adir")], "--json"),
    "checkpoint_export_onto_a_file": ("utils.checkpoint", lambda t, c: ["export", c, str(t / "afile")], "afile"),
}


@pytest.mark.parametrize("case", sorted(IO_CASES))
def test_each_io_failure_is_one_line_naming_the_path(case, tiny_ckpt_dir, tmp_path, capsys):
    module, argv, fragment = IO_CASES[case]
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("x")
    rc = _cli(module)(argv(tmp_path, str(tiny_ckpt_dir)))
    line = _one_error_line(capsys)
    assert rc == 2 and fragment in line, line


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("module", ["train", "eval_perplexity", "eval_downstream", "gen_policy_vs_dense"])
def test_cuda_on_a_cpu_machine_is_one_line(module, tiny_ckpt_dir, tmp_path, capsys):
    argv = (["--config", TINY, "--set", "device=cuda", "--output_dir", str(tmp_path / "run")] if module == "train"
            else ["--ckpt_dir", str(tiny_ckpt_dir), "--device", "cuda"])
    rc = _cli(module)(argv)
    line = _one_error_line(capsys)
    assert rc == 2 and "CUDA is not available" in line, line
    assert not (tmp_path / "run").exists()


def test_a_full_disk_at_the_first_checkpoint_is_one_line_and_leaves_no_half_run(tmp_path, monkeypatch, capsys):
    def no_space(obj, fh, *a, **k):
        fh.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", no_space)
    out = tmp_path / "run"
    rc = train.main(["--config", TINY, "--total_updates", "2", "--output_dir", str(out),
                     "--set", f"block_cache_dir={tmp_path / 'cache'}"])
    line = _one_error_line(capsys)
    assert rc == 2 and "no space left on device" in line and str(out / "policy_2.pt") in line, line
    assert not out.exists()  # nothing useful was written


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through read-only permissions")
def test_a_read_only_output_location_is_refused_before_the_run(tiny_ckpt_dir, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        rc = eval_perplexity.main(["--ckpt_dir", str(tiny_ckpt_dir), "--csv_path", str(ro / "r.csv")])
        line = _one_error_line(capsys)
        assert rc == 2 and "not writable" in line and str(ro) in line, line
        rc = train.main(["--config", TINY, "--output_dir", str(ro / "run")])
        line = _one_error_line(capsys)
        assert rc == 2 and str(ro) in line, line
    finally:
        ro.chmod(0o755)


def test_a_failed_set_up_releases_the_run_lock_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    """A full disk at config.yaml: one line, no directory left, and the same process can then train there."""
    import utils.trainer as trainer_mod

    real = trainer_mod.save_config

    def no_space(cfg, path):
        raise OSError(errno.ENOSPC, f"cannot write {path}: no space left on device")

    out = tmp_path / "run"
    argv = ["--config", TINY, "--total_updates", "1", "--output_dir", str(out), "--set", f"block_cache_dir={tmp_path / 'c'}"]
    monkeypatch.setattr(trainer_mod, "save_config", no_space)
    assert train.main(argv) == 2
    assert "no space left on device" in _one_error_line(capsys) and not out.exists()
    monkeypatch.setattr(trainer_mod, "save_config", real)
    assert train.main(argv) == 0  # the lock of the failed set-up is gone


# ---------------------------------------------------------------------------------------------------------
# one CLI layer: the same bad target gives the same line everywhere; one target resolver
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flag,value", [("--tgt_prune_keep", "1.5"), ("--tgt_quant_bits", "1"), ("--tgt_keep", "nan")])
def test_every_entry_point_gives_the_same_line_for_the_same_bad_target(flag, value, tiny_ckpt_dir, capsys):
    lines = {}
    for module in ("eval_perplexity", "eval_downstream", "gen_policy_vs_dense", "utils.placement"):
        rc = _cli(module)(["--ckpt_dir", str(tiny_ckpt_dir), flag, value])
        lines[module] = (rc, _one_error_line(capsys))
    assert len(set(lines.values())) == 1, lines
    rc, line = next(iter(lines.values()))
    assert rc == 2 and line.startswith(f"error: {flag} must be in"), line


def test_eval_targets_fall_back_to_eval_fields_then_training_targets():
    from utils.config import eval_targets, load_config

    cfg = load_config(TINY, ["C_target=0.4", "C_target_prune=0.6", "C_target_quant_bits=8"])
    assert eval_targets(cfg) == (0.4, 0.6, 8.0)
    cfg = load_config(TINY, ["C_target=0.4", "eval_C_tok=0.3", "eval_C_pru=0.7", "eval_C_qbits=12"])
    assert eval_targets(cfg) == (0.3, 0.7, 12.0)
    assert eval_targets(cfg, 0.9, None, 6) == (0.9, 0.7, 6.0)
