"""Run safety (issue 18): atomic writes and CSV appends, non-finite values refused, a diverging run stops with
its last good checkpoint, one validation of the targets, one-line errors."""
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
from utils.checkpoint import CheckpointError, save_checkpoint
from utils.evaluation import PPL_CSV_COLUMNS, append_csv_row, load_policy_eval
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
    ckpt = torch.load(out / "policy_latest.pt", map_location="cpu", weights_only=False)
    stopped_at = int(err[0].split("update ")[1].split(":")[0])
    assert ckpt["update_step"] == stopped_at - 1 >= 1
    assert all(bool(torch.isfinite(v).all()) for v in ckpt["policy_state_dict"].values())


def test_a_checkpoint_with_non_finite_weights_is_refused(tiny_ckpt_dir, tmp_path):
    ckpt = torch.load(Path(tiny_ckpt_dir) / "policy_latest.pt", map_location="cpu", weights_only=False)
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
        rc = train.main(argv)
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
