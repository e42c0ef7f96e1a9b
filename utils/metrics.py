"""Training metrics: JSON lines on disk, optional Weights & Biases, and a progress bar (rank 0 only)."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from utils.cli import SOLError
from utils.io import atomic_write_text


class WandbError(SOLError, RuntimeError):
    """Weights & Biases could not start a run (one-line message)."""


class MetricsLogger:
    """Writes one JSON object per record to `metrics.jsonl`; mirrors to wandb when a project is given."""

    def __init__(self, run_dir: Path | None, total_updates: int, enabled: bool = True,
                 wandb_project: str | None = None, wandb_entity: str | None = None,
                 wandb_run_name: str | None = None, config: dict | None = None, initial_update: int = 0,
                 resume_at: tuple[int, int] | None = None) -> None:
        """`resume_at` = (batches done, updates done) of the checkpoint a resumed run starts from: records
        logged after it (by the run that was stopped) are dropped, so every batch appears once. A fresh run
        (None) starts the file anew, dropping what a run killed before its first checkpoint left."""
        self.enabled = enabled
        self.file = None
        if enabled and run_dir is not None:
            path = run_dir / "metrics.jsonl"
            if resume_at is not None and path.exists():
                truncate_metrics(path, *resume_at)
            self.file = open(path, "a" if resume_at is not None else "w")
        self.bar = tqdm(total=total_updates, initial=initial_update, desc="updates", unit="upd",
                        dynamic_ncols=True, disable=not enabled)
        self.wandb = None
        if enabled and wandb_project:
            import wandb  # optional dependency; WANDB_MODE=offline works without a network

            try:
                self.wandb = wandb.init(project=wandb_project, entity=wandb_entity, name=wandb_run_name,
                                        config=config, job_type="train", dir=str(run_dir) if run_dir else None)
            except Exception as e:  # no login, no network in online mode, a bad entity
                self.close()
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise WandbError(f"--wandb_project {wandb_project}: wandb could not start a run ({first}); "
                                 "WANDB_MODE=offline logs without a network") from None
        self.t0 = time.time()

    def log(self, record: dict[str, Any], step: int) -> None:
        if not self.enabled:
            return
        record = {"update": step, "time_s": round(time.time() - self.t0, 3), **record}
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        if self.wandb is not None:
            self.wandb.log(record, step=step)

    def progress(self, n_new_updates: int, **postfix: float) -> None:
        if self.enabled:
            self.bar.update(n_new_updates)
            self.bar.set_postfix({k: f"{v:.3g}" for k, v in postfix.items()}, refresh=False)

    def close(self) -> None:
        if self.file:
            self.file.close()
        self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()


def truncate_metrics(path: Path, batches: int, updates: int) -> None:
    """Keep the records of `path` up to the first one past (batches, updates); rewrite it atomically."""
    keep = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a kill
            break
        if rec.get("batch", 0) > batches or rec.get("update", 0) > updates:
            break
        keep.append(line + "\n")
    atomic_write_text(path, "".join(keep))
