"""Tests of utils/damage_probe.py: the recorded features against an independent dense forward, and the
held-out probe on synthetic damage maps whose answer is known."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from utils import damage_map, damage_probe, engine, probe_fit, probe_scheduler


@pytest.fixture(scope="module")
def tiny(tiny_test_split):
    cfg, lm, blocks = tiny_test_split
    return cfg, lm, torch.from_numpy(np.asarray(blocks[:4], dtype=np.int64))


def test_features_are_the_dense_policy_inputs(tiny):
    cfg, lm, blocks = tiny
    C, T = cfg.context_len, cfg.rollout_len
    acts = lm.actions
    cheap = int((acts.keep + acts.prune / acts.prune_max + acts.bits.float() / 16).argmin())
    with torch.inference_mode():
        data = damage_map.collect(lm, blocks, C, 2, cheap, progress=False)
        _, hidden = lm.prefill_hidden(blocks[:, : C + T])  # independent: one dense forward
        logp = F.log_softmax(lm.logits(hidden[:, C - 1: C + T - 1]), -1)
    S = blocks.shape[0]
    assert data["damage"].shape == (S, T) and data["hidden"].shape == (S, T, lm.hidden_size)
    torch.testing.assert_close(data["hidden"], hidden[:, C - 1: C + T - 1].float(), atol=1e-4, rtol=1e-4)
    x = blocks[:, C: C + T]
    torch.testing.assert_close(data["surprisal"], -logp.gather(-1, x[..., None])[..., 0], atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(data["embed"], lm.embed(x).float())
    assert data["effective"].dtype == torch.bool and data["effective"].shape == (T,)
    assert (data["damage"][:, data["effective"]].abs().sum() > 0)


def _synthetic(S=64, T=12, H=8, seed=0, content=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(S, T, H, generator=g)
    pos = torch.linspace(0, 1, T)
    damage = pos.expand(S, T).clone()
    if content:
        damage = damage + 2.0 * hidden[..., 0]
    damage = damage + 0.05 * torch.randn(S, T, generator=g)
    return {"damage": damage, "damage_local": damage, "hidden": hidden, "embed": torch.randn(S, T, H, generator=g),
            "surprisal": torch.rand(S, T, generator=g), "entropy": torch.rand(S, T, generator=g),
            "effective": torch.ones(T, dtype=torch.bool)}


def test_probe_finds_content_signal_in_the_hidden_state():
    rep = probe_fit.probe_report(_synthetic(content=True), frac=0.5)
    rows = {r.features: r for r in rep.rows}
    assert rows["+hidden"].spearman > 0.9 and rows["position"].within_seq_spearman < 0.5
    # choosing by predicted damage nearly matches the oracle; position alone is no better than random + trend
    gap = rep.random_cheap_damage - rep.oracle_cheap_damage
    assert rows["+hidden"].cheap_damage - rep.oracle_cheap_damage < 0.1 * gap
    assert rows["position"].cheap_damage - rep.oracle_cheap_damage > 0.5 * gap
    assert rep.oracle_cheap_damage <= min(r.cheap_damage for r in rep.rows) + 1e-9


def test_probe_without_content_signal_gains_nothing_over_position():
    rep = probe_fit.probe_report(_synthetic(content=False), frac=0.5)
    rows = {r.features: r for r in rep.rows}
    # damage rises with position only: the per-position mean already ranks the steps
    assert rows["position"].within_seq_spearman > 0.9
    assert abs(rows["+hidden"].cheap_damage - rows["position"].cheap_damage) < 0.05 * abs(rep.random_cheap_damage)


def test_fit_on_one_map_score_on_another():
    fit, ev = _synthetic(seed=0), _synthetic(S=16, seed=1)
    rep = probe_fit.probe_report(fit, eval_data=ev)
    assert rep.n_sequences == 16
    assert {r.features: r for r in rep.rows}["+hidden"].spearman > 0.9
    bad = {**ev, "effective": torch.zeros(12, dtype=torch.bool)}
    with pytest.raises(ValueError, match="effective"):
        probe_fit.probe_report(fit, eval_data=bad)


def test_cli_fit_and_bad_input(tmp_path, capsys):
    fit, ev = tmp_path / "fit.pt", tmp_path / "ev.pt"
    torch.save({**_synthetic(), "probe_tag": "k050-s040-q4", "split": "train"}, fit)
    torch.save({**_synthetic(S=16, seed=1), "probe_tag": "k050-s040-q4", "split": "dev"}, ev)
    js = tmp_path / "rep.json"
    assert damage_probe.main(["fit", "--fit", str(fit), "--eval", str(ev), "--json", str(js)]) == 0
    out = capsys.readouterr().out
    assert "+hidden+token" in out and "fit on train" in out and js.is_file()
    assert damage_probe.main(["fit", "--fit", str(fit)]) == 0  # 2-fold
    assert damage_probe.main(["fit", "--fit", str(tmp_path / "missing.pt")]) == 2
    assert damage_probe.main(["fit", "--fit", str(fit), "--frac", "1.5"]) == 2
    torch.save({"damage": torch.zeros(2)}, tmp_path / "junk.pt")
    assert damage_probe.main(["fit", "--fit", str(tmp_path / "junk.pt")]) == 2
    assert damage_probe.main(["collect", "--config", str(tmp_path / "nope.yml"), "--save", str(tmp_path / "m.pt")]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 4 and "not found" in err and "not a damage map" in err
    assert not list(tmp_path.glob("*.tmp*")) and not (tmp_path / "m.pt").exists()


def test_cli_collect_then_fit_on_the_tiny_model(tmp_path, capsys):
    path = tmp_path / "map.pt"
    # the config's own `device: auto` (resolved like the other CLIs: cpu here)
    rc = damage_probe.main(["collect", "--config", "official_configs/tiny.yml", "--set",
                            f"block_cache_dir={tmp_path}", "max_blocks=8", "--split", "test", "--blocks", "8",
                            "--batch_size", "4", "--save", str(path)])
    assert rc == 0 and path.is_file()
    saved = torch.load(path, weights_only=True)
    assert saved["split"] == "test" and saved["damage"].shape[0] == 8
    assert damage_probe.main(["fit", "--fit", str(path)]) == 0
    assert "2-fold over test" in capsys.readouterr().out


def _prune_only_probe(lm) -> int:
    a = lm.actions
    return a.tags.index(next(t for t in a.tags if t.startswith("k100") and t.endswith("q16") and "s100" not in t))


def test_predicted_damage_scheduler_sees_the_probe_features(tiny):
    """Inside an episode the scheduler rebuilds the features from its observations; under dense actions its
    predictions equal the probe's predictions on the collected features (an independent path)."""
    cfg, lm, blocks = tiny
    cheap = _prune_only_probe(lm)
    with torch.inference_mode():
        data = damage_map.collect(lm, blocks, cfg.context_len, 4, cheap, progress=False)
        eff = data["effective"]
        X = probe_fit.features(data, "+hidden+token")
        model, _ = probe_fit.fit_probe(X, data["damage"][:, eff].double(), int(eff.sum()))
        expect = probe_fit.predict(X.reshape(-1, X.shape[-1]), model).reshape(X.shape[:2])
        pf = engine.prefill_blocks(lm, blocks, cfg.context_len)
        never = probe_scheduler.PredictedDamageScheduler(model, "+hidden+token", eff, cheap, -math.inf)
        ep = engine.run_episode(lm, None, never, torch.ones(4, 3), cfg.context_len, prefill=pf)
        always = probe_scheduler.PredictedDamageScheduler(model, "+hidden+token", eff, cheap, math.inf)
        ep2 = engine.run_episode(lm, None, always, torch.ones(4, 3), cfg.context_len, prefill=pf)
    torch.testing.assert_close(torch.stack(never.predictions, 1), expect, atol=1e-3, rtol=1e-3)
    assert (ep.actions == lm.actions.dense_idx).all()
    torch.testing.assert_close(ep.logp, pf.dense_logp, atol=1e-4, rtol=0)
    assert (ep2.actions[eff] == cheap).all() and (ep2.actions[~eff] == lm.actions.dense_idx).all()


def test_cli_schedule_matches_fixed_usage_and_refuses_test(tmp_path, capsys):
    cfg_args = ["--config", "official_configs/tiny.yml", "--set", "device=cpu", f"block_cache_dir={tmp_path}",
                "max_blocks=8", "--blocks", "8", "--batch_size", "4"]
    multi, single = tmp_path / "multi.pt", tmp_path / "single.pt"
    assert damage_probe.main(["collect", *cfg_args, "--split", "test", "--save", str(multi)]) == 0
    assert damage_probe.main(["collect", *cfg_args, "--split", "test", "--probe", "k100-s050-q16",
                              "--save", str(single)]) == 0
    js = tmp_path / "sched.json"
    rc = damage_probe.main(["schedule", "--fit", str(single), "--split", "train", "--blocks", "8", "--batch_size", "4",
                            "--target", "0.75", "--features", "position", "+scalars", "--json", str(js)])
    assert rc == 0
    rows = json.loads(js.read_text())["rows"]
    assert [r["features"] for r in rows] == ["position", "+scalars"]
    for r in rows:
        assert 0.5 <= r["usage"] <= 1.0 and abs(r["fixed_usage"] - r["usage"]) < 0.05
        assert r["delta_nll_lo"] <= r["delta_nll"] <= r["delta_nll_hi"] and math.isfinite(r["ppl"])
    base = ["schedule", "--fit", str(single), "--blocks", "8", "--batch_size", "4"]
    assert damage_probe.main([*base, "--split", "test", "--target", "0.75"]) == 2
    assert damage_probe.main([*base, "--target", "1.5"]) == 2
    assert damage_probe.main(["schedule", "--fit", str(multi), "--target", "0.75"]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 3 and "not test" in err and "exactly one axis" in err


def test_budget_thresholds_give_the_requested_cheap_share_on_the_fit_predictions():
    preds = torch.randn(4000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    cal = probe_scheduler.Calibration(preds, axis=1, lo=0.4, hi=1.0)
    budgets = torch.tensor([[1.0, r, 1.0] for r in (1.0, 0.9, 0.7, 0.5, 0.4, 0.2)])
    thr = probe_scheduler.budget_thresholds(cal, budgets)
    share = (preds[None, :] <= thr[:, None]).double().mean(1)
    want = torch.tensor([0.0, 1 / 6, 0.5, 5 / 6, 1.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(share, want, atol=2e-3, rtol=0)
    assert thr[0] == -math.inf


def test_quantile_level_inverts_the_measured_share_curve():
    """With a correction, a requested cheap fraction maps to the level whose measured share it is, linearly
    between measured points; fraction 1 is exact (+inf threshold) even where the top level fell short."""
    preds = torch.linspace(0, 1, 1001, dtype=torch.float64)
    cal = probe_scheduler.Calibration(preds, axis=1, lo=0.4, hi=1.0)
    cor = cal.corrected(torch.tensor([0.5, 1.0]), torch.tensor([0.25, 0.6]))
    lv = cor.quantile_level(torch.tensor([0.0, 0.125, 0.25, 0.425, 0.6, 0.9], dtype=torch.float64))
    torch.testing.assert_close(lv, torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0, 1.0], dtype=torch.float64))
    thr = probe_scheduler.budget_thresholds(cor, torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.4, 1.0], [1.0, 0.85, 1.0]]))
    assert thr[0] == -math.inf and thr[1] == math.inf and abs(float(thr[2]) - 0.5) < 1e-6  # float32 budgets
    # a non-monotone measurement is made non-decreasing
    assert probe_scheduler.Calibration(preds, 1, 0.4, 1.0).corrected(
        torch.tensor([0.5, 1.0]), torch.tensor([0.25, 0.125])).shares.tolist() == [0.25, 0.25]


def test_in_episode_calibration_reproduces_its_measured_share(tiny):
    """Asking the corrected teacher for a cheap fraction it measured at some level reruns that level's
    thresholds, so on the same blocks it realises exactly that share (an independent end-to-end check)."""
    cfg, lm, blocks = tiny
    cheap = _prune_only_probe(lm)
    with torch.inference_mode():
        data = damage_map.collect(lm, blocks, cfg.context_len, 4, cheap, progress=False)
    sched, _ = probe_scheduler.fit_scheduler(data, "+scalars", lm.actions, cheap)
    levels = torch.tensor([0.25, 0.5, 0.75, 1.0], dtype=torch.float64)
    cor = probe_scheduler.calibrate_in_episode(lm, sched, blocks, cfg.context_len, levels, batch_size=2,
                                            progress=False)
    assert cor.levels.tolist() == levels.tolist() and cor.fit_predictions is sched.calibration.fit_predictions
    j = int(torch.nonzero(cor.shares > 0).min())
    sched.calibration = cor
    budget = probe_scheduler.level_budgets(cor, torch.tensor([float(cor.shares[j])], dtype=torch.float64))
    with torch.inference_mode():
        ep = engine.run_episode(lm, blocks, sched, budget.repeat(len(blocks), 1), cfg.context_len)
    realised = (ep.actions[ep.effective] == cheap).double().mean()
    assert abs(float(realised) - float(cor.shares[j])) < 1e-9
    with pytest.raises(ValueError):
        probe_scheduler.calibrate_in_episode(lm, sched, blocks, cfg.context_len, levels)


def test_budget_tracking_teacher_meets_every_row_budget_to_within_one_step(tiny):
    """Closed loop: whatever the content, each row ends within one cheap step of what its budget asks for
    (none at the dense budget, all at the cheapest); and tracking needs a calibration."""
    cfg, lm, blocks = tiny
    cheap = _prune_only_probe(lm)
    with torch.inference_mode():
        data = damage_map.collect(lm, blocks, cfg.context_len, 4, cheap, progress=False)
    sched, _ = probe_scheduler.fit_scheduler(data, "+scalars", lm.actions, cheap)
    cal = sched.calibration
    rho = torch.tensor([1.0, 0.95, 0.85, 0.75, 0.62, 0.5], dtype=torch.float64)
    rho = rho * (cal.hi - cal.lo) + cal.lo  # cheap fractions 0 .. 1 on the grid's prune axis
    budgets = torch.ones(len(rho), 3)
    budgets[:, cal.axis] = rho.float()
    rows = budgets.repeat(len(blocks), 1)
    sched.track = True
    with torch.inference_mode():
        ep = engine.run_episode(lm, blocks, sched, rows, cfg.context_len, len(rho))
    eff = ep.effective
    taken = (ep.actions[eff] == cheap).double().sum(0).cpu()
    wanted = cal.cheap_fraction(rows[:, cal.axis]) * int(eff.sum())
    assert ((taken - wanted).abs() < 1 + 1e-4).all()
    assert (taken[wanted == 0] == 0).all() and (taken[wanted == int(eff.sum())] == int(eff.sum())).all()
    with pytest.raises(ValueError):
        probe_scheduler.PredictedDamageScheduler(sched.model, "+scalars", eff, cheap, threshold=0.0, track=True)
    with pytest.raises(ValueError):  # the correction must be measured open-loop
        probe_scheduler.calibrate_in_episode(lm, sched, blocks, cfg.context_len, torch.tensor([0.5, 1.0]))
