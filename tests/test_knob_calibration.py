"""Knob calibration (utils.knob_calibration, SOLPolicy.set_knob_table): the offset term against numpy's
interpolation, its place in the logits, the bisection against an independent evaluation, and the loaders'
handling of a table."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from utils.actions import ActionSpace
from utils.config import load_config
from utils.engine import run_episode
from utils.policy import N_SCALARS, SOLPolicy
from utils.schedulers import PolicyScheduler

SPACE = ActionSpace.build([0.25, 1.0], ["s50", "s100"], ["q4", "q16"])
GRID = torch.tensor([[0.3, 0.6, 0.4], [0.5, 0.7, 0.6], [0.9, 0.9, 0.8]])
OFFSETS = torch.tensor([[1.0, 4.0, -2.0], [0.0, 2.0, 0.5], [-3.0, -1.0, 1.5]])


def _policy(gain: float = 0.0, seed: int = 0) -> SOLPolicy:
    torch.manual_seed(seed)
    return SOLPolicy(12, 8, len(SPACE), d_model=16, n_heads=2, mlp_ratio=2, action_dim=4, max_len=32,
                     budget_feedback_gain=gain, action_usage=SPACE.nominal_usage()).eval()


def test_knob_term_is_minus_interpolated_offsets_dot_usage():
    pol = _policy()
    budgets = torch.tensor([[0.3, 0.6, 0.4], [0.4, 0.65, 0.7], [0.1, 1.0, 0.5], [0.95, 0.8, 0.79]])
    assert float(pol.knob_term(budgets).abs().max()) == 0.0  # no table, no term
    pol.set_knob_table(GRID, OFFSETS)
    got = pol.knob_term(budgets)
    u = SPACE.nominal_usage().numpy()
    for i, r in enumerate(budgets.numpy()):
        c = [np.interp(r[j], GRID[:, j].numpy(), OFFSETS[:, j].numpy()) for j in range(3)]  # held at the ends
        for a in range(len(SPACE)):
            assert abs(float(got[i, a]) + float(np.dot(c, u[a]))) < 1e-5
    pol.set_knob_table(None, None)
    assert float(pol.knob_term(budgets).abs().max()) == 0.0


@pytest.mark.parametrize("grid, offsets", [(GRID[:1], OFFSETS[:1]), (GRID.flip(0), OFFSETS),
                                           (GRID, OFFSETS[:, :2]), (GRID, OFFSETS * float("nan"))])
def test_bad_tables_are_refused(grid, offsets):
    with pytest.raises(ValueError, match="set_knob_table"):
        _policy().set_knob_table(grid, offsets)


def test_offsets_enter_before_the_temperature_in_step_and_forward():
    """Both paths add the term of each row's requested budget (scalar columns 2:5) to the logits before the
    temperature, so the greedy actions do not depend on the temperature."""
    g = torch.Generator().manual_seed(1)
    T, B = 5, 3
    h, e = torch.randn(T, B, 12, generator=g), torch.randn(T, B, 8, generator=g)
    s = torch.rand(T, B, N_SCALARS, generator=g)
    prev = torch.cat([torch.full((1, B), len(SPACE)), torch.randint(0, len(SPACE), (T - 1, B), generator=g)])
    plain, pol = _policy(), _policy()
    pol.set_knob_table(GRID, OFFSETS)
    with torch.no_grad():
        want = (plain(h, e, s, prev, 1.0) + pol.knob_term(s[..., 2:5])) / 0.7
        torch.testing.assert_close(pol(h, e, s, prev, 0.7), want, atol=1e-5, rtol=0)
        state, inc = pol.init_state(B), []
        for t in range(T):
            logits, state = pol.step(h[t], e[t], s[t], state, 0.7)
            inc.append(logits)
            state = state.with_action(prev[t + 1] if t + 1 < T else prev[0])
    torch.testing.assert_close(torch.stack(inc), want, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def tiny():
    from utils.data import load_blocks
    from utils.lm import ControlledLM
    from utils.model import load_lm

    cfg = load_config("official_configs/tiny.yml", ["device=cpu", "max_blocks=8", "sparsity_criteria=recency",
                                                    "keep_fracs=[1.0]", "quant_choices=[q16]"])
    model, tok = load_lm(cfg.model_name, cfg.dtype, "cpu")
    lm = ControlledLM.from_config(cfg, model, tok)
    blocks = torch.as_tensor(np.asarray(load_blocks(cfg, tok, "train")[:4], dtype=np.int64))
    torch.manual_seed(0)
    pol = SOLPolicy.from_config(cfg, lm.hidden_size, lm.hidden_size, lm.actions).eval()
    return cfg, lm, blocks, pol


def test_bisection_meets_the_request_as_closely_as_one_step_allows(tiny):
    """On a two-level ρ grid (s50 / s100) without feedback, each point's realised usage, measured again in an
    independent episode with the fitted table, is within one step's usage change of the request; the
    realised usage falls as the offset rises (the bisection's premise)."""
    from utils.knob_calibration import budget_grid, calibrated_axes, fit_knob_offsets

    cfg, lm, blocks, pol = tiny
    assert calibrated_axes(lm.actions) == [1]
    grid = budget_grid(lm.actions, 3)
    torch.testing.assert_close(grid[:, 1], torch.tensor([0.625, 0.75, 0.875]))
    assert (grid[:, [0, 2]] == 1.0).all()
    offsets, realised = fit_knob_offsets(lm, pol, blocks, cfg.context_len, grid, [1], iters=16,
                                         max_offset=30.0, batch_size=3, progress=False)
    assert (offsets[:, [0, 2]] == 0).all()
    n_steps = len(blocks) * cfg.rollout_len
    assert ((realised[:, 1] - grid[:, 1]).abs() <= 0.5 / n_steps + 1e-6).all(), (realised, grid)
    with torch.inference_mode():  # the installed table, in one fresh episode per point
        ep = run_episode(lm, blocks, PolicyScheduler(pol, greedy=True, actions=lm.actions), grid.repeat(len(blocks), 1),
                         cfg.context_len, group_size=3)
    again = ep.usage_means().view(len(blocks), 3, 3).mean(0)
    torch.testing.assert_close(again, realised, atol=1e-6, rtol=0)
    usage = []
    for c in (-30.0, 0.0, 30.0):
        pol.set_knob_table(torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]), torch.tensor([[0.0, c, 0.0]] * 2))
        with torch.inference_mode():
            ep = run_episode(lm, blocks, PolicyScheduler(pol, greedy=True, actions=lm.actions),
                             torch.tensor([[1.0, 0.75, 1.0]]).expand(len(blocks), 3), cfg.context_len)
        usage.append(float(ep.usage_means()[:, 1].mean()))
    pol.set_knob_table(None, None)
    assert usage[0] == 1.0 and usage[2] == 0.5 and usage[0] >= usage[1] >= usage[2]


def _tiny_checkpoint(tmp_path, sets: list[str]):
    """A checkpoint directory holding a freshly initialised policy for the tiny model (config tiny.yml + `sets`)."""
    from utils.checkpoint import save_checkpoint
    from utils.config import config_to_dict
    from utils.model import load_lm

    cfg = load_config("official_configs/tiny.yml", ["device=cpu", "max_blocks=8", *sets])
    model, _ = load_lm(cfg.model_name, cfg.dtype, "cpu")
    torch.manual_seed(0)
    pol = SOLPolicy.from_config(cfg, model.config.hidden_size, model.config.hidden_size, ActionSpace.from_config(cfg))
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    save_checkpoint({"policy_state_dict": pol.state_dict(), "cfg": config_to_dict(cfg)}, ckpt / "policy_latest.pt")
    return ckpt


def test_cli_writes_a_table_that_the_loader_installs_with_its_gain(tmp_path, capsys):
    """`python -m utils.knob_calibration` writes the table; `load_policy_eval` with `knob_calibration`
    installs it and takes the gain it was fitted at; another explicit gain or a malformed file is a one-line
    error."""
    from utils.checkpoint import CheckpointError, load_policy_eval
    from utils.cli import UsageError
    from utils.knob_calibration import main

    ckpt = _tiny_checkpoint(tmp_path, ["budget_feedback_gain=3"])
    out = tmp_path / "knob.json"
    args = ["--ckpt_dir", str(ckpt), "--out", str(out), "--blocks", "2", "--points", "3", "--iters", "2", "--no_progress"]
    assert main(args + ["--budget_feedback_gain", "2"]) == 0
    doc = json.loads(out.read_text())
    assert doc["budget_feedback_gain"] == 2.0 and doc["axes"] == [0, 1, 2] and len(doc["offsets"]) == 3
    assert "realised" in capsys.readouterr().out

    _, _, loaded = load_policy_eval(str(ckpt), overrides={"knob_calibration": str(out)})
    assert loaded.budget_feedback_gain == 2.0
    torch.testing.assert_close(loaded.knob_offsets, torch.tensor(doc["offsets"]))
    _, _, plain = load_policy_eval(str(ckpt))
    assert plain.budget_feedback_gain == 3.0 and plain.knob_grid is None
    with pytest.raises(CheckpointError, match="conflicts with the knob calibration"):
        load_policy_eval(str(ckpt), overrides={"knob_calibration": str(out), "budget_feedback_gain": 5.0})
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**doc, "offsets": doc["offsets"][:1]}))
    with pytest.raises(UsageError, match="malformed"):
        load_policy_eval(str(ckpt), overrides={"knob_calibration": str(bad)})
    assert main(args + ["--knob_calibration", str(out)]) == 2
    assert main(["--ckpt_dir", str(ckpt), "--out", str(out), "--points", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("error: ") for line in err)


def test_a_table_records_the_bracket_mask_and_the_loader_notes_a_mismatch(tmp_path, capsys):
    """The mask changes what an offset realises, so a table says whether it was fitted with it, and loading it
    for a policy run the other way prints a note (and still installs it)."""
    from utils.checkpoint import load_policy_eval
    from utils.knob_calibration import main

    ckpt = _tiny_checkpoint(tmp_path, [])
    args = ["--ckpt_dir", str(ckpt), "--blocks", "2", "--points", "3", "--iters", "2", "--no_progress"]
    masked, plain = tmp_path / "masked.json", tmp_path / "plain.json"
    assert main(args + ["--out", str(masked), "--policy_bracket_levels", "on"]) == 0
    assert main(args + ["--out", str(plain)]) == 0
    assert json.loads(masked.read_text())["policy_bracket_levels"] is True
    assert json.loads(plain.read_text())["policy_bracket_levels"] is False
    capsys.readouterr()
    for table, on, noted in ((masked, True, False), (masked, False, True), (plain, True, True), (plain, False, False)):
        _, _, loaded = load_policy_eval(str(ckpt), overrides={"knob_calibration": str(table),
                                                               "policy_bracket_levels": on})
        assert loaded.bracket_levels is on and loaded.knob_grid is not None
        assert ("fitted with the bracket mask" in capsys.readouterr().err) is noted


def test_training_writes_a_table_that_evaluators_and_export_pick_up(tmp_path, capsys):
    """`knob_calibration_blocks` > 0: the run ends by fitting its final weights' table beside them. Every
    evaluator's loader then installs it by default (with a note), `none` leaves it out, and a table that does
    not fit (another gain asked for, another update's weights) is left out by default and refused when named;
    an export carries it only with the weights it was fitted for."""
    import train
    from utils.checkpoint import CheckpointError, load_checkpoint, load_policy_eval
    from utils.checkpoint import main as ckpt_main
    from utils.knob_calibration import TABLE_FILE, main as knob_main, weights_fingerprint

    run = tmp_path / "run"
    assert train.main(["--config", "official_configs/tiny.yml", "--output_dir", str(run), "--total_updates", "4",
                       "--set", f"block_cache_dir={tmp_path / 'cache'}", "--set", "knob_calibration_blocks=2",
                       "--set", "knob_calibration_gain=2", "--set", "budget_feedback_gain=3"]) == 0
    doc = json.loads((run / TABLE_FILE).read_text())
    final, first = load_checkpoint(str(run)), load_checkpoint(str(run), "2")
    assert doc["budget_feedback_gain"] == 2.0 and doc["blocks"] == 2 and doc["split"] == "train"
    assert doc["weights_sha1"] == weights_fingerprint(final["policy_state_dict"])
    assert weights_fingerprint(first["policy_state_dict"]) != doc["weights_sha1"]
    capsys.readouterr()

    _, _, pol = load_policy_eval(str(run))
    assert pol.budget_feedback_gain == 2.0
    torch.testing.assert_close(pol.knob_offsets, torch.tensor(doc["offsets"]))
    assert "note: using the knob calibration" in capsys.readouterr().err
    _, _, plain = load_policy_eval(str(run), overrides={"knob_calibration": "none"})
    assert plain.knob_grid is None and plain.budget_feedback_gain == 3.0
    _, _, other_gain = load_policy_eval(str(run), overrides={"budget_feedback_gain": 7.0})
    assert other_gain.knob_grid is None and other_gain.budget_feedback_gain == 7.0
    _, _, early = load_policy_eval(str(run), mode="2")
    assert early.knob_grid is None and early.budget_feedback_gain == 3.0
    err = capsys.readouterr().err
    assert "fitted at feedback gain 2, not 7" in err and "fitted for other weights than policy_2" in err
    with pytest.raises(CheckpointError, match="fitted for other policy weights"):
        load_policy_eval(str(run), mode="2", overrides={"knob_calibration": str(run / TABLE_FILE)})

    assert ckpt_main(["export", str(run), str(tmp_path / "ship")]) == 0
    assert ckpt_main(["export", "--mode", "2", str(run), str(tmp_path / "ship1")]) == 0
    assert (tmp_path / "ship" / TABLE_FILE).read_text() == (run / TABLE_FILE).read_text()
    assert not (tmp_path / "ship1" / TABLE_FILE).exists()
    _, _, shipped = load_policy_eval(str(tmp_path / "ship"))
    torch.testing.assert_close(shipped.knob_offsets, pol.knob_offsets)

    # the tool writes the same file by default, at the config's knob_calibration_gain
    assert knob_main(["--ckpt_dir", str(tmp_path / "ship1"), "--blocks", "2", "--points", "3", "--iters", "2",
                      "--no_progress"]) == 0
    assert json.loads((tmp_path / "ship1" / TABLE_FILE).read_text())["budget_feedback_gain"] == 2.0
    _, _, refit = load_policy_eval(str(tmp_path / "ship1"))
    assert refit.knob_grid is not None and refit.budget_feedback_gain == 2.0


def test_training_refuses_a_calibration_with_nothing_to_calibrate(tmp_path, capsys):
    """A one-level action grid has no knob: the run stops with one line before training, leaving no directory."""
    import train

    out = tmp_path / "run"
    assert train.main(["--config", "official_configs/tiny.yml", "--output_dir", str(out), "--total_updates", "2",
                       "--set", f"block_cache_dir={tmp_path / 'cache'}", "--set", "knob_calibration_blocks=2",
                       "--set", "keep_fracs=[1.0]", "--set", "struct_prune_choices=[s100]",
                       "--set", "quant_choices=[q16]"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "knob_calibration_blocks" in err[0], err
    assert not out.exists()


def test_offset_bounds_widen_each_axis_to_its_closest_levels():
    """±max_offset at least; on an axis with more than one level, gap_logits over its smallest level gap."""
    from utils.knob_calibration import offset_bounds

    joint = ActionSpace.build([0.1, 0.6, 1.0], ["s40", "s80", "s100"], ["q5", "q7", "q16"])
    # gaps: kappa 0.5 / 0.4, rho 0.4 / 0.2, bits 2/16 / 9/16 -> 6 / 0.4, 6 / 0.2, 6 / 0.125
    assert torch.allclose(offset_bounds(joint, 12.0, 6.0), torch.tensor([15.0, 30.0, 48.0]))
    prune = ActionSpace.build([1.0], ["s40", "s100"], ["q16"])  # 6 / 0.6 = 10 < 12: stays 12
    assert torch.allclose(offset_bounds(prune, 12.0, 6.0), torch.tensor([12.0, 12.0, 12.0]))
    assert torch.allclose(offset_bounds(prune, 12.0, 9.0), torch.tensor([12.0, 15.0, 12.0]))
