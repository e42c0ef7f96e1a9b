"""End-to-end test of gen_policy_vs_dense.py on a tiny checkpoint (subprocess), and its input errors."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from utils.checkpoint import save_checkpoint
from utils.config import config_to_dict, load_config
from utils.model import load_lm
from utils.policy import SOLPolicy

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    cfg = load_config("official_configs/tiny.yml", ["device=cpu"])
    model, _ = load_lm(cfg.model_name, cfg.dtype, "cpu")
    n_actions = len(cfg.keep_fracs) * len(cfg.struct_prune_choices) * len(cfg.quant_choices)
    torch.manual_seed(0)
    policy = SOLPolicy.from_config(cfg, model.config.hidden_size, model.config.hidden_size, n_actions)
    d = tmp_path_factory.mktemp("ckpt")
    save_checkpoint({"policy_state_dict": policy.state_dict(), "cfg": config_to_dict(cfg)}, d / "policy_latest.pt")
    return d


def _run(args):
    return subprocess.run([sys.executable, str(REPO / "gen_policy_vs_dense.py"), *args], cwd=REPO,
                          capture_output=True, text=True, env=dict(os.environ), timeout=300)


def _main(args, capsys):
    """The script in-process (saves a 5 s interpreter start per case): (exit code, stdout, stderr)."""
    import gen_policy_vs_dense

    try:
        rc = gen_policy_vs_dense.main(list(args))
    except SystemExit as e:  # argparse
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_gen_prints_every_field(ckpt_dir):
    r = _run(["--ckpt_dir", str(ckpt_dir), "--input_sentence", "The capital of France is",
              "--generation_tokens", "10", "--episode_len", "4", "--tgt_keep", "0.25", "--seed", "3"])
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout
    assert "The capital of France is" in out
    assert re.search(r"Dense continuation:\n.*\n\[chars: \d+\]", out)
    assert re.search(r"Policy continuation:\n.*\n\[chars: \d+\]", out)
    m = re.search(r"Mean logprob under dense LM -> policy: (-?\d+\.\d+|nan), dense: (-?\d+\.\d+|nan)", out)
    assert m and float(m.group(2)) < 0
    k = re.search(r"Achieved Token-Keep-Rate: (\d+\.\d)%", out)
    p = re.search(r"Achieved Prune-Keep: (\d+\.\d)%", out)
    q = re.search(r"Achieved Quant-Ratio: (\d\.\d{3})", out)
    assert k and p and q
    assert 25.0 <= float(k.group(1)) <= 100.0 and 0.0 < float(q.group(1)) <= 1.0
    assert re.search(r"Tokens/s -> policy: \d+\.\d, dense: \d+\.\d", out)


def test_gen_sampling_is_seeded(ckpt_dir, capsys):
    args = ["--ckpt_dir", str(ckpt_dir), "--generation_tokens", "6", "--temperature", "0.9", "--top_k", "40",
            "--stochastic_policy", "--seed", "7"]
    (ra, a, _), (rb, b, _) = _main(args, capsys), _main(args, capsys)
    def untimed(out: str) -> str:  # everything after the prompt except the speed line (wall-clock timing)
        return out.split("Prompt:")[1].split("Tokens/s")[0]

    assert ra == rb == 0 and untimed(a) == untimed(b)


@pytest.mark.parametrize("extra, msg", [
    (["--tgt_keep", "1.5"], "--tgt_keep must be in [0, 1]"),
    (["--tgt_quant_bits", "0"], "--tgt_quant_bits must be in"),
    (["--generation_tokens", "0"], "--generation_tokens must be >= 1"),
    (["--episode_len", "1000"], "exceeds the policy's policy_max_len"),
    (["--bogus"], "unrecognized arguments"),
    (["--budget_feedback_gain", "-1"], "--budget_feedback_gain must be a finite number >= 0"),
    (["--policy_logit_bound", "nan"], "--policy_logit_bound must be a finite number >= 0"),
])
def test_gen_bad_inputs(ckpt_dir, extra, msg, capsys):
    rc, _, err = _main(["--ckpt_dir", str(ckpt_dir), *extra], capsys)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error:") and msg in lines[0]


def test_feedback_flags_reach_the_policy(ckpt_dir, capsys, monkeypatch):
    """--budget_feedback_gain / --policy_logit_bound (add_checkpoint_flags, on every evaluator) replace the
    checkpoint config's values in the loaded policy; without them the checkpoint's values stay."""
    from utils.policy import SOLPolicy

    seen = []
    real = SOLPolicy.from_config.__func__
    monkeypatch.setattr(SOLPolicy, "from_config", classmethod(
        lambda cls, cfg, *a, **k: seen.append((cfg.budget_feedback_gain, cfg.policy_logit_bound)) or
        real(cls, cfg, *a, **k)))
    base = ["--ckpt_dir", str(ckpt_dir), "--generation_tokens", "2", "--episode_len", "2"]
    assert _main(base, capsys)[0] == 0
    assert _main(base + ["--budget_feedback_gain", "7", "--policy_logit_bound", "1.5"], capsys)[0] == 0
    cfg = load_config("official_configs/tiny.yml", [])
    assert seen == [(cfg.budget_feedback_gain, cfg.policy_logit_bound), (7.0, 1.5)]


def test_gen_missing_checkpoint(tmp_path, capsys):
    r = _run(["--ckpt_dir", str(tmp_path / "nope")])  # the real exit path once, as a subprocess
    assert r.returncode == 2 and r.stderr.strip() == f"error: checkpoint directory not found: {tmp_path / 'nope'}"
    (tmp_path / "empty").mkdir()
    rc, _, err = _main(["--ckpt_dir", str(tmp_path / "empty")], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "policy_latest.pt" in err
