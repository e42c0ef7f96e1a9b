"""Policy checkpoints: atomic writes, lookup by mode, and rebuilding a policy with its training config.

A checkpoint `policy_{update}.pt` / `policy_latest.pt` holds the policy weights, the full config, the
optimizer and updater state, counters, RNG states and the data position, so `--resume` is exact.

`export_policy` writes a weights-only copy (a third of the size) that every evaluator and
`--checkpoint_path` accept, for shipping:

    python -m utils.checkpoint export checkpoints/RUN results/ckpt_joint [--mode latest]
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from utils.cli import SOLError
from utils.config import Config, config_from_dict
from utils.io import atomic_write


class CheckpointError(SOLError, RuntimeError):
    """A missing or unreadable checkpoint (one-line message)."""


def save_checkpoint(payload: dict[str, Any], path: str | Path) -> None:
    """torch.save to a temporary file in the same directory, then rename: never a half-written file."""
    atomic_write(path, lambda fh: torch.save(payload, fh), binary=True)


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


_EXPORT_KEYS = ("policy_state_dict", "cfg", "update_step", "batches_done", "total_updates", "action_tags",
                "policy_num_params")


def export_policy(ckpt_dir: str | Path, out_dir: str | Path, mode: str = "latest") -> Path:
    """Weights-only copy of `policy_{mode}.pt` as `out_dir/policy_latest.pt` (+ the run's config.yaml).

    Drops the optimizer, updater, sampler and RNG state, so it cannot `--resume`; evaluation, generation
    and `--checkpoint_path` warm starts need only what is kept.
    """
    out = Path(out_dir)
    if out.exists() and out.resolve() == Path(ckpt_dir).resolve():
        raise CheckpointError(f"export: {out_dir} is the run directory itself; its full checkpoints would be replaced")
    ckpt = load_checkpoint(ckpt_dir, mode)
    out.mkdir(parents=True, exist_ok=True)
    slim = {k: ckpt[k] for k in _EXPORT_KEYS if k in ckpt}
    slim["exported_from"] = f"{Path(ckpt_dir).name}/policy_{mode}.pt"
    path = out / "policy_latest.pt"
    save_checkpoint(slim, path)
    cfg_src = Path(ckpt_dir) / "config.yaml"
    if cfg_src.is_file():
        shutil.copyfile(cfg_src, out / "config.yaml")
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m utils.checkpoint", description="Checkpoint utilities.")
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export", help="weights-only copy of a run's checkpoint (for shipping)")
    e.add_argument("ckpt_dir", help="training run directory (policy_*.pt inside)")
    e.add_argument("out_dir", help="directory to write policy_latest.pt (+ config.yaml) into")
    e.add_argument("--mode", default="latest", help="latest or an update number")
    a = p.parse_args(argv)
    try:
        path = export_policy(a.ckpt_dir, a.out_dir, a.mode)
    except (CheckpointError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
