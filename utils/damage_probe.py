"""Damage probe: can the policy's own inputs predict where a cheap step hurts?

    python -m utils.damage_probe collect --config official_configs/cpu_smollm2_prune.yml --split train \\
        --blocks 384 --save map_train.pt
    python -m utils.damage_probe collect --config official_configs/cpu_smollm2_prune.yml --split dev --save map_dev.pt
    python -m utils.damage_probe fit --fit map_train.pt --eval map_dev.pt
    python -m utils.damage_probe schedule --fit map_train.pt --split dev --target 0.7

The placement report (utils/placement.py) found that the trained policy's schedule is set by position and
hardly by content. That has two possible causes: the content signal is not in what the policy sees, or it
is and GRPO does not extract it. This probe separates them without any RL.

1. Damage map (as in utils/placement.py): for every decode step t of every block, the NLL increase,
   summed over token t and the later tokens it reaches, of running step t alone with the probe action
   (default: the grid's cheapest) in an otherwise dense episode.
2. Features, from a dense episode over the same blocks, of exactly what the policy can see before step t:
   the previous LM call's final hidden state h_{t-1}, the input token's embedding e(x_t), the position t,
   and two scalars the LM head gives away: the surprisal of x_t and the entropy of the distribution it was
   drawn from (both from h_{t-1}).
3. Ridge regressions on nested feature sets, fitted on one map (train blocks) and scored on another (dev
   blocks), or 2-fold over the sequences of one map; the ridge strength is chosen by an inner 2-fold split
   of the fitting sequences:
   `position` (content-blind: a per-position mean), `+scalars`, `+hidden`, `+hidden+token`.
4. For each, held-out correlations with the damage and the damage (additive approximation) of making each
   sequence's `frac` lowest-predicted steps cheap, against random steps and the oracle (the truly least
   harmful steps). If `+hidden` beats `position` clearly, a content-aware schedule is learnable from the
   policy's inputs and the bottleneck is the training signal; if not, content-blind is about as good as
   these features allow.
5. `schedule` checks the additive approximation end to end: a scheduler that makes a step cheap when the
   probe's predicted damage is under a threshold (set on the fit map for the cheap fraction the requested
   usage implies) decodes held-out blocks, and the fixed baseline runs at its realised usage on the same
   blocks, as in `eval_perplexity.py`.

Fit on train blocks and score on dev blocks: this is for understanding and choosing, not for reporting on test.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict

import torch

from utils.cli import OneLineErrorParser, SOLError, check_output_file, need
from utils.damage_map import collect, load_damage_map
from utils.placement import probe_action
from utils.probe_fit import FEATURE_SETS, probe_report
from utils.probe_scheduler import schedule_eval


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = OneLineErrorParser(prog="python -m utils.damage_probe", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, parser_class=OneLineErrorParser)
    c = sub.add_parser("collect", help="measure a damage map and the policy-visible features, save them (.pt)")
    c.add_argument("--config", required=True, help="config (model, data, action grid) to probe")
    c.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    c.add_argument("--split", default="dev", help="blocks to probe: train, dev or test (default dev)")
    c.add_argument("--blocks", type=int, default=100, help="sequences (default 100; cost: T+2 episodes per batch)")
    c.add_argument("--batch_size", type=int, default=16, help="sequences per batch (default 16)")
    c.add_argument("--probe", help="action tag of the cheap step (default: the grid's cheapest action)")
    c.add_argument("--save", required=True, help="output file (.pt)")
    f = sub.add_parser("fit", help="fit the probes on one saved map and score them on another (or 2-fold)")
    f.add_argument("--fit", required=True, help="damage map to fit on (from collect)")
    f.add_argument("--eval", help="damage map to score on (default: 2-fold over the --fit sequences)")
    f.add_argument("--frac", type=float, default=0.5, help="fraction of each sequence's steps made cheap (default 0.5)")
    f.add_argument("--seed", type=int, default=0, help="seed of the 2-fold split (without --eval)")
    f.add_argument("--json", dest="json_path", help="also write the report to this JSON file")
    r = sub.add_parser("schedule", help="run predicted-damage schedules (fitted on a saved map) against the fixed "
                                        "baseline at matched usage on held-out blocks")
    r.add_argument("--fit", required=True, help="damage map to fit on (from collect; its config is used)")
    r.add_argument("--split", default="dev", help="blocks to evaluate on (default dev)")
    r.add_argument("--blocks", type=int, default=96, help="sequences (default 96)")
    r.add_argument("--batch_size", type=int, default=16, help="sequences per batch (default 16)")
    r.add_argument("--target", type=float, required=True,
                   help="requested usage on the axis the probe action cuts, e.g. 0.7 = keep 70%% of MLP channels")
    r.add_argument("--features", nargs="+", default=["position", "+hidden"], choices=FEATURE_SETS,
                   help="feature sets to schedule with (default: position +hidden)")
    r.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    r.add_argument("--json", dest="json_path", help="also write the results to this JSON file")
    return p.parse_args(argv)


def _atomic_save(obj, path: str, as_json: bool) -> None:
    from utils.io import atomic_write

    if as_json:
        atomic_write(path, lambda fh: json.dump(obj, fh, indent=1))
    else:
        atomic_write(path, lambda fh: torch.save(obj, fh), binary=True)


def _collect(a: argparse.Namespace) -> None:
    from utils.config import default_device, load_config
    from utils.data import load_blocks
    from utils.lm import ControlledLM
    from utils.model import load_lm

    need(a.blocks >= 1 and a.batch_size >= 1, "--blocks and --batch_size must be >= 1")
    need(os.path.isfile(a.config), f"config not found: {a.config}")
    need(os.path.isdir(os.path.dirname(os.path.abspath(a.save))), f"output directory not found: {a.save}")
    cfg = load_config(a.config, a.set)
    model, tok = load_lm(cfg.model_name, cfg.dtype, default_device(cfg))
    lm = ControlledLM.from_config(cfg, model, tok)
    acts = lm.actions
    probe_idx = probe_action(acts, a.probe)
    blocks = torch.as_tensor(load_blocks(cfg, tok, a.split)[: a.blocks].copy())
    with torch.inference_mode():
        data = collect(lm, blocks, cfg.context_len, a.batch_size, probe_idx,
                       rows_per_forward=cfg.rollout_rows_per_forward)
    _atomic_save({**data, "probe_tag": acts.tags[probe_idx], "split": a.split, "config": a.config,
                  "overrides": list(a.set)}, a.save,
                 as_json=False)
    d = data["damage"][:, data["effective"]]
    print(f"{a.split}: {d.shape[0]} sequences x {d.shape[1]} effective steps, probe {acts.tags[probe_idx]}: "
          f"one cheap step costs {float(d.mean()):+.3f} ± {float(d.std()):.3f} nats; saved {a.save}")




def _fit(a: argparse.Namespace) -> None:
    need(0.0 < a.frac < 1.0, f"--frac must be in (0, 1), got {a.frac}")
    data, meta = load_damage_map(a.fit)
    ev, ev_meta = load_damage_map(a.eval) if a.eval else (None, {})
    if ev is not None:
        need(meta.get("probe_tag") == ev_meta.get("probe_tag"),
             f"the maps probe different actions: {meta.get('probe_tag')} vs {ev_meta.get('probe_tag')}")
    rep = probe_report(data, a.frac, a.seed, eval_data=ev)
    where = (f"fit on {meta.get('split', '?')} ({data['damage'].shape[0]} seq), scored on {ev_meta.get('split', '?')}"
             if ev is not None else f"2-fold over {meta.get('split', '?')}")
    print(f"probe {meta.get('probe_tag', '?')}: {where}; {rep.n_sequences} sequences x {rep.steps} effective "
          f"steps scored; one cheap step costs {rep.damage_mean:+.3f} nats on average")
    print(f"making {rep.cheap_per_seq} of {rep.steps} steps cheap per sequence (additive approx, nats/seq): "
          f"random {rep.random_cheap_damage:.3f}, oracle {rep.oracle_cheap_damage:.3f}")
    print(f"{'features':<15} {'pearson':>8} {'spearman':>8} {'in-seq rho':>10} {'cheap dmg':>10}  lambda")
    for r in rep.rows:
        print(f"{r.features:<15} {r.pearson:>8.3f} {r.spearman:>8.3f} {r.within_seq_spearman:>10.3f} "
              f"{r.cheap_damage:>10.3f}  {r.lambdas}")
    if a.json_path:
        _atomic_save({"probe": meta.get("probe_tag"), "fit": a.fit, "eval": a.eval, **asdict(rep)}, a.json_path,
                     as_json=True)




def _schedule(a: argparse.Namespace) -> None:
    from utils.config import default_device, load_config
    from utils.data import load_blocks
    from utils.lm import ControlledLM
    from utils.model import load_lm

    need(a.blocks >= 1 and a.batch_size >= 1, "--blocks and --batch_size must be >= 1")
    need(a.split != "test", "schedule is for choosing and understanding: evaluate on train or dev, not test")
    data, meta = load_damage_map(a.fit)
    need(meta.get("config") and os.path.isfile(meta["config"]), f"the config of {a.fit} is not found: {meta.get('config')}")
    cfg = load_config(meta["config"], meta.get("overrides", []))
    model, tok = load_lm(cfg.model_name, cfg.dtype, default_device(cfg))
    lm = ControlledLM.from_config(cfg, model, tok)
    need(meta.get("probe_tag") in lm.actions.tags, f"the map's probe action {meta.get('probe_tag')} is not in the grid")
    blocks = torch.as_tensor(load_blocks(cfg, tok, a.split)[: a.blocks].copy())
    with torch.inference_mode():
        rows = schedule_eval(lm, data, lm.actions.tags.index(meta["probe_tag"]), blocks, cfg.context_len,
                             a.batch_size, a.target, list(a.features), a.seed)
    print(f"fit on {meta.get('split', '?')} ({data['damage'].shape[0]} seq); {a.split}: {rows[0]['n_tokens']} tokens; "
          f"target {a.target:g}; dense PPL {rows[0]['dense_ppl']:.3f}")
    print(f"{'schedule':<24} {'usage':>6} {'PPL':>8} {'fixed PPL':>9} {'dNLL':>8}  95% interval")
    for r in rows:
        print(f"{'predicted[' + r['features'] + ']':<24} {r['usage']:>6.3f} {r['ppl']:>8.3f} {r['fixed_ppl']:>9.3f} "
              f"{r['delta_nll']:>+8.4f}  [{r['delta_nll_lo']:+.4f}, {r['delta_nll_hi']:+.4f}]")
    if a.json_path:
        _atomic_save({"fit": a.fit, "split": a.split, "blocks": a.blocks, "target": a.target, "rows": rows},
                     a.json_path, as_json=True)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)

    run = {"collect": _collect, "fit": _fit, "schedule": _schedule}[a.command]
    try:
        check_output_file("--save", getattr(a, "save", None))  # before the expensive run, not after
        check_output_file("--json", getattr(a, "json_path", None))
        run(a)
    except (SOLError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
