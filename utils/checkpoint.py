"""Policy checkpoints: atomic writes, lookup by mode, and rebuilding a policy with its training config.

A checkpoint `policy_{update}.pt` / `policy_latest.pt` holds the policy weights, the full config, the
optimizer and updater state, counters, RNG states and the data position, so `--resume` is exact.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from utils.config import Config, config_from_dict


class CheckpointError(RuntimeError):
    """A missing or unreadable checkpoint (one-line message)."""


def save_checkpoint(payload: dict[str, Any], path: str | Path) -> None:
    """torch.save to a temporary file in the same directory, then rename: never a half-written file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def find_checkpoint(ckpt_dir: str | Path, mode: str = "latest") -> Path:
    """`policy_{mode}.pt` in ckpt_dir (mode = 'latest' or an update number)."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {ckpt_dir}")
    path = d / f"policy_{mode}.pt"
    if not path.is_file():
        have = sorted(p.name for p in d.glob("policy_*.pt"))
        raise CheckpointError(f"no checkpoint policy_{mode}.pt in {ckpt_dir}"
                              + (f" (found: {', '.join(have)})" if have else " (the directory has no policy_*.pt)"))
    return path


def load_checkpoint(ckpt_dir: str | Path, mode: str = "latest", map_location: str = "cpu") -> dict[str, Any]:
    path = find_checkpoint(ckpt_dir, mode)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # corrupt or foreign file
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from None
    if "policy_state_dict" not in ckpt or "cfg" not in ckpt:
        raise CheckpointError(f"{path} is not a SOL policy checkpoint (no policy_state_dict/cfg)")
    return ckpt


def checkpoint_config(ckpt: dict[str, Any], overrides: dict[str, Any] | None = None) -> Config:
    """The training config stored in a checkpoint, optionally with a few fields replaced."""
    d = dict(ckpt["cfg"])
    d.update(overrides or {})
    return config_from_dict(d)
