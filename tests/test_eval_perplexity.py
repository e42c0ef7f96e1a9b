"""Tests of utils/evaluation.py, eval_perplexity.py and utils/plots.py on the tiny random Llama."""
from __future__ import annotations

import csv
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import eval_perplexity
from utils import plots
from utils.baselines import FixedScheduler, RandomScheduler
from utils.evaluation import (PPL_CSV_COLUMNS, append_csv_row, dense_teacher_forced_nll, evaluate_matched,
                              evaluate_methods, paired_bootstrap_ci)
from utils.policy import SOLPolicy
from utils.schedulers import DenseScheduler, PolicyScheduler

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tiny_test_split):
    return tiny_test_split


@pytest.fixture(scope="module")
def ckpt_dir(tiny_ckpt_dir):
    return tiny_ckpt_dir


# ------------------------------------------------------------------ evaluation library

def test_dense_equals_plain_forward_and_fixed_at_one_equals_dense(tiny):
    cfg, lm, blocks = tiny
    res = evaluate_methods(lm, blocks, 2, 3, {"dense": DenseScheduler(), "fixed1": lambda: FixedScheduler((1, 1, 1))},
                           (1.0, 1.0, 1.0), context_len=cfg.context_len)
    d = res["dense"]
    T = cfg.rollout_len
    assert d.n_tokens == 6 * T and d.seq_len == T
    ref = dense_teacher_forced_nll(lm, torch.from_numpy(np.asarray(blocks[:6], dtype=np.int64)), cfg.context_len)
    assert math.isclose(d.ppl, math.exp(float(ref.mean())), rel_tol=1e-5)
    torch.testing.assert_close(d.nll, ref, rtol=1e-4, atol=1e-4)  # same positions, same order
    assert torch.equal(res["fixed1"].nll, d.nll)
    assert d.usage == (1.0, 1.0, 1.0) and d.flops_ratio == pytest.approx(1.0) and d.attn_keep == pytest.approx(1.0)
    assert int(d.action_hist.sum()) == 6 * T and int(d.action_hist[lm.actions.dense_idx]) == 6 * T


def test_matched_two_phase_uses_policy_usage_and_prefill_reuse_is_exact(tiny, ckpt_dir):
    cfg, lm, blocks = tiny
    policy = SOLPolicy.from_config(cfg, lm.hidden_size, lm.hidden_size, lm.actions)
    policy.load_state_dict(torch.load(ckpt_dir / "policy_latest.pt", weights_only=False)["policy_state_dict"])
    policy.eval()
    runs = []
    for mb in (1e6, 0.0):  # keep every prefill / recompute every prefill
        res, targets = evaluate_matched(
            lm, blocks, 2, 2, {"policy": PolicyScheduler(policy, 0.6), "dense": DenseScheduler()},
            lambda t: {"fixed": FixedScheduler(t), "random": RandomScheduler(t, seed=5)},
            (0.5, 0.75, 0.5), context_len=cfg.context_len, keep_prefill_mb=mb)
        runs.append((res, targets))
        pol, fixed = res["policy"], res["fixed"]
        assert targets == pytest.approx(pol.usage)
        n = pol.n_effective
        for a, gap in enumerate((0.75, 0.5, 0.75)):
            assert abs(fixed.usage[a] - targets[a]) <= gap / n + 1e-6
            assert abs(res["random"].usage[a] - targets[a]) <= gap / (2 * cfg.rollout_len) + 1e-6
        assert 0 < pol.flops_ratio <= 1.0 and pol.n_tokens == fixed.n_tokens == 4 * cfg.rollout_len
    for k in runs[0][0]:
        assert torch.equal(runs[0][0][k].nll, runs[1][0][k].nll), k


def test_paired_bootstrap_ci():
    g = torch.Generator().manual_seed(1)
    b = torch.rand(4000, generator=g) * 5
    a = b + 0.3 + torch.randn(4000, generator=g)
    lo, hi = paired_bootstrap_ci(a, b, n_boot=1000, seed=0)
    assert lo < 0.3 < hi and lo > 0  # contains the true difference, excludes 0 (a clearly worse)
    lo_s, hi_s = paired_bootstrap_ci(a, b, n_boot=1000, seed=0, seq_len=16)
    assert lo_s < 0.3 < hi_s and lo_s > 0
    assert paired_bootstrap_ci(a, b, n_boot=500, seed=3) == paired_bootstrap_ci(a, b, n_boot=500, seed=3)
    c = b + torch.randn(4000, generator=g) * 0.5  # no real difference
    lo0, hi0 = paired_bootstrap_ci(c, b, n_boot=1000, seed=0)
    assert lo0 < 0 < hi0
    with pytest.raises(ValueError):
        paired_bootstrap_ci(a, b[:10])
    with pytest.raises(ValueError):
        paired_bootstrap_ci(a[:10], b[:10], seq_len=3)


# ------------------------------------------------------------------ CLI

def _run_cli(argv, capsys):
    rc = eval_perplexity.main([str(x) for x in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_end_to_end_appends_rows_with_one_header(ckpt_dir, tmp_path, capsys):
    csv_path = tmp_path / "ppl.csv"
    base = ["--ckpt_dir", ckpt_dir, "--eval_batches", 2, "--batch_size", 2, "--device", "cpu", "--no_progress",
            "--csv_path", csv_path]
    rc, out, err = _run_cli(base + ["--num_trials", 2, "--tgt_keep", 0.4], capsys)
    assert rc == 0, err
    for name in ("policy", "dense", "fixed", "random@1234", "random@1235"):
        assert any(line.startswith(name) for line in out.splitlines()), name
    rc, out, err = _run_cli(base + ["--do_emc_and_driftaware", "--tgt_quant_bits", 6], capsys)
    assert rc == 0, err
    assert any(line.startswith("emc") for line in out.splitlines())
    # per-axis level shares: three axes, each summing to 1, and the policy's mean bits equal its realised ratio
    levels = {ln.split()[0]: ln.split(" levels ", 1)[1] for ln in out.splitlines() if " levels " in ln}
    assert set(levels) == {"policy", "fixed"}
    axes = [[float(c.split(":")[1]) for c in part.split()[1:]] for part in levels["policy"].split("|")]
    bits = [int(c.split(":")[0][1:]) for c in levels["policy"].split("|")[2].split()[1:]]
    assert len(axes) == 3 and all(sum(ax) == pytest.approx(1.0, abs=2e-3) for ax in axes)
    ratio = float(next(ln for ln in out.splitlines() if ln.startswith("policy ")).split("quant_ratio")[1].split()[0])
    assert sum(s * b / 16 for s, b in zip(axes[2], bits)) == pytest.approx(ratio, abs=2e-3)
    lines = csv_path.read_text().splitlines()
    assert len(lines) == 3 and lines[0] == ",".join(PPL_CSV_COLUMNS)
    rows = list(csv.DictReader(csv_path.open()))
    r1, r2 = rows
    assert r1["target_keep"] == "0.4" and r1["target_prune_keep"] == "0.75" and r1["target_quant_bits"] == "8"
    assert r2["target_quant_bits"] == "6" and r2["target_keep"] == "0.5"  # defaults from the checkpoint config
    for col in ("policy_ppl", "policy_keep", "policy_prune_keep", "policy_quant_ratio", "policy_attn_keep_realised",
                "policy_flops_ratio", "fixed_ppl", "fixed_keep", "fixed_prune_keep", "fixed_quant_ratio",
                "fixed_flops_ratio", "dense_ppl", "random_ppl_mean", "random_ppl_best", "delta_nll_lo",
                "delta_nll_hi", "n_tokens"):
        assert math.isfinite(float(r1[col])), col
    assert r1["random_seeds"] == "1234|1235" and len(r1["random_ppl_trials"].split("|")) == 2
    assert float(r1["random_ppl_best"]) == min(map(float, r1["random_ppl_trials"].split("|")))
    assert r1["emc_ppl"] == "" and r1["dac_ppl"] == ""
    assert float(r2["emc_ppl"]) > 0 and float(r2["dac_ppl"]) > 0
    assert r1["n_tokens"] == str(2 * 2 * 8) and r1["split"] == "test" and r1["mode"] == "latest"
    assert float(r1["delta_nll_lo"]) <= float(r1["delta_nll_hi"])
    # the fixed baseline ran at the policy's realised usage
    for ax in ("keep", "prune_keep", "quant_ratio"):
        assert abs(float(r1[f"fixed_{ax}"]) - float(r1[f"policy_{ax}"])) <= 0.75 / 32 + 1e-5
    # dense is the same model on the same tokens in both invocations
    assert r1["dense_ppl"] == r2["dense_ppl"]


def test_cli_stochastic_policy_is_seeded_and_differs_from_argmax(ckpt_dir, capsys):
    base = ["--ckpt_dir", ckpt_dir, "--eval_batches", 1, "--batch_size", 2, "--device", "cpu", "--no_progress",
            "--num_trials", 0, "--policy_temperature", 2.0]

    def policy_line(extra):
        rc, out, err = _run_cli(base + extra, capsys)
        assert rc == 0, err
        return next(line for line in out.splitlines() if line.startswith("policy"))

    sampled = policy_line(["--stochastic_policy", "--seed", 7])
    assert policy_line(["--stochastic_policy", "--seed", 7]) == sampled
    assert policy_line([]) != sampled


def test_cli_bracket_levels_hold_a_request_on_the_grid_exactly(ckpt_dir, capsys):
    # on the tiny grid (κ {0.25, 1}, s50 / s100, q4 / q16) a request on a level brackets that level alone:
    # with --policy_bracket_levels on the policy takes it on every step, whatever its logits prefer
    base = ["--ckpt_dir", ckpt_dir, "--eval_batches", 1, "--batch_size", 2, "--device", "cpu", "--no_progress",
            "--num_trials", 0, "--tgt_keep", 0.25, "--tgt_prune_keep", 1.0, "--tgt_quant_bits", 4]

    def levels(extra):
        rc, out, err = _run_cli(base + extra, capsys)
        assert rc == 0, err
        return next(ln for ln in out.splitlines() if ln.startswith("policy levels"))

    on = levels(["--policy_bracket_levels", "on"])
    assert "0.25:1.000" in on and "s100:1.000" in on and "q4:1.000" in on, on
    off = levels(["--policy_bracket_levels", "off"])
    assert off == levels([]) and off != on  # off is the checkpoint's default, and the mask did bind


@pytest.mark.parametrize("extra, msg", [
    (["--tgt_keep", "1.5"], "--tgt_keep must be in [0, 1]"),
    (["--tgt_prune_keep", "-0.1"], "--tgt_prune_keep must be in [0, 1]"),
    (["--tgt_quant_bits", "1"], "--tgt_quant_bits must be in [2, 16]"),
    (["--tgt_quant_bits", "17"], "--tgt_quant_bits must be in [2, 16]"),
    (["--eval_batches", "0"], "--eval_batches"),
    (["--mode", "best"], "--mode"),
    (["--dataset_name", "/nonexistent/corpus.txt"], "data source not found"),
])
def test_cli_bad_inputs_one_line_error(ckpt_dir, extra, msg, capsys):
    rc, out, err = _run_cli(["--ckpt_dir", ckpt_dir, "--device", "cpu", "--no_progress"] + extra, capsys)
    assert rc == 2
    assert err.startswith("error: ") and msg in err and err.count("\n") == 1, err


def test_cli_missing_checkpoint_and_foreign_csv(ckpt_dir, tmp_path, capsys):
    rc, _, err = _run_cli(["--ckpt_dir", tmp_path / "nope"], capsys)
    assert rc == 2 and err.startswith("error: checkpoint directory not found") and err.count("\n") == 1
    rc, _, err = _run_cli(["--ckpt_dir", tmp_path, "--device", "cpu"], capsys)  # a directory without policy_*.pt
    assert rc == 2 and "policy_latest.pt" in err and err.count("\n") == 1
    foreign = tmp_path / "other.csv"
    foreign.write_text("a,b\n1,2\n")
    rc, _, err = _run_cli(["--ckpt_dir", ckpt_dir, "--device", "cpu", "--csv_path", foreign], capsys)
    assert rc == 2 and "different header" in err and err.count("\n") == 1
    assert foreign.read_text() == "a,b\n1,2\n"  # untouched


def test_cli_process_exit_code():
    p = subprocess.run([sys.executable, "eval_perplexity.py", "--ckpt_dir", "/nonexistent/run", "--tgt_keep", "0.5"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == ["error: checkpoint directory not found: "
                                                                   "/nonexistent/run"]


# ------------------------------------------------------------------ plots

def _write_csv(path: Path, n: int = 6, with_emc: bool = True) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        k, p, b = rng.uniform(0.2, 1), rng.uniform(0.5, 1), int(rng.choice([4, 8, 16]))
        nk = (k + p + b / 16) / 3
        row = {"target_keep": k, "target_prune_keep": p, "target_quant_bits": b,
               "policy_keep": k + 0.02, "policy_prune_keep": p - 0.01, "policy_quant_ratio": b / 16,
               "policy_net_keep": nk, "policy_ppl": 20 + 10 * (1 - nk) + rng.uniform(0, 1),
               "fixed_net_keep": nk, "fixed_ppl": 21 + 12 * (1 - nk),
               "random_keep": k, "random_prune_keep": p, "random_quant_ratio": b / 16,  # net keep derived
               "random_ppl_best": 21 + 11 * (1 - nk), "dense_ppl": 19.0, "n_tokens": 1792}
        if with_emc and i % 2:
            row.update(emc_net_keep=nk, emc_ppl=21 + 11.5 * (1 - nk))
        append_csv_row(str(path), {c: str(v) for c, v in row.items()})


def test_plots_write_pngs(tmp_path, capsys):
    csv_path = tmp_path / "r.csv"
    _write_csv(csv_path)
    for kind in ("pareto", "adherence"):
        out = tmp_path / f"{kind}.png"
        assert plots.main([kind, str(csv_path), "--out", str(out)]) == 0
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    assert plots.main(["pareto", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "x.png")]) == 2
    assert capsys.readouterr().err.startswith("error: CSV not found")


def test_results_table_rows_and_gap(tmp_path, capsys):
    """One Markdown row per CSV row, sorted by requested keep; max gap = the worst |achieved − requested| axis."""
    csv_path = tmp_path / "r.csv"
    _write_csv(csv_path, n=3)
    assert plots.main(["table", str(csv_path)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 + 3 and all(l.count("|") == lines[0].count("|") for l in lines)
    rows = plots.read_rows(csv_path)
    keeps = sorted(float(r["target_keep"]) for r in rows)
    assert [float(l.split("|")[1].split("/")[0]) for l in lines[2:]] == pytest.approx(keeps, abs=1e-5)
    assert all(l.rstrip(" |").endswith("0.020") for l in lines[2:])  # policy_keep = target + 0.02 is the worst
    with pytest.raises(SystemExit):
        plots.main(["pareto", str(csv_path)])  # figures need --out
    capsys.readouterr()
    bad = tmp_path / "bad.csv"
    append_csv_row(str(bad), {"target_keep": "0.5", "policy_ppl": "30"})
    assert plots.main(["table", str(bad)]) == 2
    assert capsys.readouterr().err.startswith("error: table: a row lacks")


def test_pareto_front():
    pts = [(0.5, 30.0), (0.6, 25.0), (0.6, 24.0), (0.7, 26.0), (0.8, 20.0), (0.4, 40.0)]
    assert plots.pareto_front(pts) == [5, 0, 2, 4]


def test_learning_curve_plot_from_metrics(tmp_path):
    import json

    from utils.plots import main as plots_main

    run = tmp_path / "run"
    run.mkdir()
    with open(run / "metrics.jsonl", "w") as f:
        for u in range(1, 41):
            rec = {"update": u, "reward/total_mean": -10 + u / 10}
            rec.update({f"budgets/abs_gap_{a}": 0.2 / u for a in ("tok", "prune", "qratio")})
            rec.update({"update/entropy": 0.6 - u / 100, "train/no_contrast_frac": u / 50,
                        "budgets/corr_target_achieved_prune": min(1.0, u / 20)})
            f.write(json.dumps(rec) + "\n")
            if u % 10 == 0:
                f.write(json.dumps({"update": u, "dev/policy_ppl": 20.0, "dev/fixed_ppl": 21.0,
                                    "dev/placement_corr": u / 50}) + "\n")
    out = tmp_path / "curve.png"
    assert plots_main(["curve", str(run), "--out", str(out)]) == 0
    assert out.stat().st_size > 10_000
    assert plots_main(["curve", str(tmp_path / "missing"), "--out", str(out)]) == 2


def test_dtype_flag_overrides_the_checkpoint_config(ckpt_dir, capsys, monkeypatch):
    """--dtype loads the frozen LM in that dtype instead of the checkpoint config's (same flag on every
    evaluator through add_checkpoint_flags); the bfloat16 PPL stays close to the float32 one."""
    import utils.model

    seen = []
    real = utils.model.load_lm
    monkeypatch.setattr(utils.model, "load_lm", lambda name, dtype="float32", device="cpu": seen.append(dtype) or
                        real(name, dtype, device))
    base = ["--ckpt_dir", ckpt_dir, "--eval_batches", 1, "--batch_size", 2, "--device", "cpu", "--no_progress"]
    ppl = {}
    for dt in ("float32", "bfloat16"):
        rc, out, err = _run_cli(base + ["--dtype", dt], capsys)
        assert rc == 0, err
        ppl[dt] = float(next(line for line in out.splitlines() if line.startswith("dense")).split()[2])
    assert seen == ["float32", "bfloat16"]
    assert abs(math.log(ppl["bfloat16"] / ppl["float32"])) < 0.05
    with pytest.raises(SystemExit) as e:  # argparse's choices: one line, exit code 2
        _run_cli(base + ["--dtype", "int8"], capsys)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--dtype" in err and len(err.strip().splitlines()) == 1


def test_bfloat16_warning_reads_the_cpu_flags():
    from utils.model import cpu_lacks_bf16

    assert cpu_lacks_bf16("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_vnni\n")
    assert not cpu_lacks_bf16("flags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n")
    assert not cpu_lacks_bf16("flags\t\t: fpu avx2 amx_bf16 amx_tile\n")
    assert not cpu_lacks_bf16("Features\t: fp asimd\n")  # not x86: cannot tell, no warning
    assert not cpu_lacks_bf16("")
