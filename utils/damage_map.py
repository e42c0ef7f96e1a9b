"""Damage maps: what one cheap decode step costs at every position, with what the policy saw there.

For every decode step t of every block, the NLL increase, summed over token t and the later tokens it
reaches, of running step t alone with a probe action (default: the grid's cheapest) in an otherwise dense
episode (`utils.placement.single_step_damage`), together with the policy-visible inputs of a dense episode
over the same blocks: the previous LM call's final hidden state, the input token's embedding, and the
surprisal and entropy of the input token under the LM. Written by `python -m utils.damage_probe collect`,
read by the probe (`utils.probe_fit`), its scheduler (`utils.probe_scheduler`) and behaviour cloning.
"""
from __future__ import annotations

import os

import torch

from utils.cli import UsageError, need
from utils.engine import Scheduler, StepObs, prefill_blocks, run_episode
from utils.placement import single_step_damage
from utils.records import StepScalars

MAP_KEYS = ("damage", "hidden", "embed", "surprisal", "entropy", "effective")


class DenseRecorder(Scheduler):
    """Dense actions everywhere; records the policy-visible inputs of each step."""

    name = "dense-recorder"

    def start(self, lm, budgets, group_size) -> None:
        super().start(lm, budgets, group_size)
        self.hidden, self.tokens, self.surprisal, self.entropy = [], [], [], []

    def choose(self, obs: StepObs) -> torch.Tensor:
        self.hidden.append(obs.hidden.float())
        self.tokens.append(obs.input_ids)
        self.surprisal.append(StepScalars.surprisal(obs.scalars))
        self.entropy.append(StepScalars.entropy(obs.scalars))
        return torch.full_like(obs.input_ids, self.lm.actions.dense_idx)


def collect(lm, blocks: torch.Tensor, context_len: int, batch_size: int, probe_idx: int,
            progress: bool = True, rows_per_forward: int = 0) -> dict[str, torch.Tensor]:
    """Damage map and policy-visible features of `blocks` [S, C+T+1]; every tensor is [S, T, ...] on CPU."""
    from tqdm import tqdm

    out: dict[str, list] = {k: [] for k in ("damage", "damage_local", "hidden", "embed", "surprisal", "entropy")}
    effective = None
    for i in tqdm(range(0, blocks.shape[0], batch_size), desc="damage map", disable=not progress):
        pf = prefill_blocks(lm, blocks[i: i + batch_size], context_len)
        loc, tot = single_step_damage(lm, pf, probe_idx, rows_per_forward)
        rec = DenseRecorder()
        B = tot.shape[1]
        ep = run_episode(lm, None, rec, torch.ones(B, 3), context_len, prefill=pf)
        effective = ep.effective.cpu()
        tok = torch.stack(rec.tokens, 1)
        out["damage"].append(tot.T.float().cpu())
        out["damage_local"].append(loc.T.float().cpu())
        out["hidden"].append(torch.stack(rec.hidden, 1).cpu())
        out["embed"].append(lm.embed(tok).float().cpu())
        out["surprisal"].append(torch.stack(rec.surprisal, 1).cpu())
        out["entropy"].append(torch.stack(rec.entropy, 1).cpu())
    res = {k: torch.cat(v) for k, v in out.items()}
    res["effective"] = effective
    return res


def load_damage_map(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of a map saved by `collect`, read without unpickling objects; one-line errors."""
    need(os.path.isfile(path), f"damage map not found: {path}")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # corrupt or foreign file
        raise UsageError(f"cannot read damage map {path}: not a file saved by "
                         "`python -m utils.damage_probe collect`") from None
    need(isinstance(raw, dict), f"{path} is not a damage map saved by `python -m utils.damage_probe collect`")
    meta = {k: raw.pop(k) for k in ("probe_tag", "split", "config", "overrides") if k in raw}
    need(all(k in raw for k in MAP_KEYS),
         f"{path} is not a damage map saved by `python -m utils.damage_probe collect`")
    return raw, meta
