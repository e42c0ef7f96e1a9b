"""Tests of utils/damage_probe.py: the recorded features against an independent dense forward, and the
held-out probe on synthetic damage maps whose answer is known."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from utils import damage_probe


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
        data = damage_probe.collect(lm, blocks, C, 2, cheap, progress=False)
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
    rep = damage_probe.probe_report(_synthetic(content=True), frac=0.5)
    rows = {r.features: r for r in rep.rows}
    assert rows["+hidden"].spearman > 0.9 and rows["position"].within_seq_spearman < 0.5
    # choosing by predicted damage nearly matches the oracle; position alone is no better than random + trend
    gap = rep.random_cheap_damage - rep.oracle_cheap_damage
    assert rows["+hidden"].cheap_damage - rep.oracle_cheap_damage < 0.1 * gap
    assert rows["position"].cheap_damage - rep.oracle_cheap_damage > 0.5 * gap
    assert rep.oracle_cheap_damage <= min(r.cheap_damage for r in rep.rows) + 1e-9


def test_probe_without_content_signal_gains_nothing_over_position():
    rep = damage_probe.probe_report(_synthetic(content=False), frac=0.5)
    rows = {r.features: r for r in rep.rows}
    # damage rises with position only: the per-position mean already ranks the steps
    assert rows["position"].within_seq_spearman > 0.9
    assert abs(rows["+hidden"].cheap_damage - rows["position"].cheap_damage) < 0.05 * abs(rep.random_cheap_damage)


def test_fit_on_one_map_score_on_another():
    fit, ev = _synthetic(seed=0), _synthetic(S=16, seed=1)
    rep = damage_probe.probe_report(fit, eval_data=ev)
    assert rep.n_sequences == 16
    assert {r.features: r for r in rep.rows}["+hidden"].spearman > 0.9
    bad = {**ev, "effective": torch.zeros(12, dtype=torch.bool)}
    with pytest.raises(ValueError, match="effective"):
        damage_probe.probe_report(fit, eval_data=bad)


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
    rc = damage_probe.main(["collect", "--config", "official_configs/tiny.yml", "--set", "device=cpu",
                            f"block_cache_dir={tmp_path}", "max_blocks=8", "--split", "test", "--blocks", "8",
                            "--batch_size", "4", "--save", str(path)])
    assert rc == 0 and path.is_file()
    saved = torch.load(path, weights_only=True)
    assert saved["split"] == "test" and saved["damage"].shape[0] == 8
    assert damage_probe.main(["fit", "--fit", str(path)]) == 0
    assert "2-fold over test" in capsys.readouterr().out
