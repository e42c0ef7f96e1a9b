"""Policy checkpoints: safe loading, atomic writes, lookup, and a weights-only export for sharing.

Two formats, neither of which can run code when read:

* training checkpoints `policy_{update}.pt` / `policy_latest.pt` (what `--resume` needs: weights, config,
  optimizer and updater state, counters, RNG states, data position) are plain tensors and Python scalars,
  read with `torch.load(weights_only=True)`, which refuses any other pickled object;
* exported policies (for shipping, evaluation and `--checkpoint_path`): `policy.safetensors` (the weights)
  with `policy.json` (config, counters, action tags) and `config.yaml` beside it:

    python -m utils.checkpoint export checkpoints/RUN results/ckpt_joint [--mode latest]

Checkpoints written by older versions pickled NumPy objects, which only a full unpickler reads; unpickling
a file from someone else can execute code, so that needs an explicit `--trust_checkpoint` (with a warning).
Exporting such a run once (`export ... --trust_checkpoint`) turns it into the safe format.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from utils.cli import TRUST_HELP, SOLError
from utils.config import Config, config_from_dict
from utils.io import atomic_write, atomic_write_text

WEIGHTS_FILE, META_FILE = "policy.safetensors", "policy.json"
EXPORT_FORMAT = "sol-policy/1"


class CheckpointError(SOLError, RuntimeError):
    """A missing, unreadable or unsafe checkpoint (one-line message)."""


def save_checkpoint(payload: dict[str, Any], path: str | Path) -> None:
    """torch.save to a temporary file in the same directory, then rename: never a half-written file.
    The payload must hold only tensors and plain Python values, so that `load_checkpoint` can read it
    without unpickling arbitrary objects."""
    atomic_write(path, lambda fh: torch.save(payload, fh), binary=True)


def find_checkpoint(ckpt_dir: str | Path, mode: str = "latest") -> Path:
    """The file holding checkpoint `mode` in ckpt_dir: `policy_{mode}.pt` (mode = 'latest' or an update
    number); for 'latest' in an exported directory, `policy.safetensors`."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {ckpt_dir}")
    path = d / f"policy_{mode}.pt"
    if path.is_file():
        return path
    if mode == "latest" and (d / WEIGHTS_FILE).is_file():
        return d / WEIGHTS_FILE
    have = sorted(p.name for p in d.glob("policy_*.pt")) + ([WEIGHTS_FILE] if (d / WEIGHTS_FILE).is_file() else [])
    raise CheckpointError(f"no checkpoint policy_{mode}.pt in {ckpt_dir}"
                          + (f" (found: {', '.join(have)})" if have else
                             f" (the directory has no policy_*.pt or {WEIGHTS_FILE})"))


def read_pt(path: str | Path, trust: bool = False, what: str = "checkpoint") -> Any:
    """`torch.load` of a .pt file without running code: weights_only=True, which reads tensors and plain
    Python values and refuses any other pickled global. `trust` reads an old-style file (pickled NumPy
    state) with the full unpickler instead, after a warning."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        if "Unsupported global: GLOBAL" not in msg:  # a corrupt or foreign file, not an unsafe one
            detail = next((ln.split("error:", 1)[1].strip() for ln in msg.splitlines() if "WeightsUnpickler error:" in ln
                           and ln.split("error:", 1)[1].strip()), "") or next((ln.strip() for ln in msg.splitlines()
                                                                              if "Unsupported" in ln), msg.splitlines()[0])
            raise CheckpointError(f"cannot read {what} {path}: not a checkpoint ({detail})") from None
        if not trust:
            glob = msg.split("Unsupported global: GLOBAL", 1)[1].split()[0]
            raise CheckpointError(
                f"{what} {path} holds a pickled {glob}, which only a full unpickler reads and which could run "
                "code; if you trust its source, pass --trust_checkpoint (or convert it once: python -m "
                "utils.checkpoint export DIR OUT --trust_checkpoint)") from None
    except Exception as e:  # corrupt or foreign file
        raise CheckpointError(f"cannot read {what} {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    warnings.warn(f"--trust_checkpoint: unpickling {path} with the full unpickler", stacklevel=2)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(f"cannot read {what} {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def read_exported(d: str | Path) -> dict[str, Any]:
    """An exported policy directory (`policy.safetensors` + `policy.json`) as a checkpoint dict."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    d = Path(d)
    try:
        meta = json.loads((d / META_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{d / WEIGHTS_FILE} has no {META_FILE} beside it (config and action tags)") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {d / META_FILE}: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT or "cfg" not in meta:
        raise CheckpointError(f"{d / META_FILE} is not a SOL policy description (format {EXPORT_FORMAT})")
    try:
        weights = load_file(str(d / WEIGHTS_FILE))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {d / WEIGHTS_FILE}: {e}") from None
    return {"policy_state_dict": weights, **{k: v for k, v in meta.items() if k != "format"}}


def load_checkpoint(ckpt_dir: str | Path, mode: str = "latest", trust: bool = False) -> dict[str, Any]:
    """Checkpoint `mode` of ckpt_dir as a dict with at least `policy_state_dict` and `cfg`, read safely
    on the CPU (see `read_pt`; `trust` opts in to old pickled files)."""
    path = find_checkpoint(ckpt_dir, mode)
    ckpt = read_exported(path.parent) if path.name == WEIGHTS_FILE else read_pt(path, trust)
    if not isinstance(ckpt, dict) or "policy_state_dict" not in ckpt or "cfg" not in ckpt:
        raise CheckpointError(f"{path} is not a SOL policy checkpoint (no policy_state_dict/cfg)")
    return ckpt


def load_policy_weights(path: str | Path, trust: bool = False) -> dict[str, torch.Tensor]:
    """Policy weights for a warm start (`--checkpoint_path`): an exported directory, its
    `policy.safetensors`, a SOL `.pt` checkpoint or a bare state dict saved with torch.save."""
    p = Path(path)
    if p.is_dir():
        return load_checkpoint(p, "latest", trust=trust)["policy_state_dict"]
    if not p.is_file():
        raise CheckpointError(f"--checkpoint_path: file not found: {path}")
    if p.suffix == ".safetensors":
        return read_exported(p.parent)["policy_state_dict"]
    state = read_pt(p, trust, what="--checkpoint_path")
    if isinstance(state, dict):
        state = state.get("policy_state_dict", state.get("state_dict", state))
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise CheckpointError(f"--checkpoint_path: {path} holds no policy state dict")
    return state


def checkpoint_config(ckpt: dict[str, Any], overrides: dict[str, Any] | None = None) -> Config:
    """The training config stored in a checkpoint, optionally with a few fields replaced."""
    d = dict(ckpt["cfg"])
    d.update(overrides or {})
    return config_from_dict(d)


def _layout_policy(policy: nn.Module) -> None:
    """The gathered execution's layout for the policy's batch-1 products: every Linear laid out input-major and run
    through `gathered.dense_gemv` (`gathered.gemv_linear`; same values, its weight a transposed view), which reads
    one float32 token's weights with the native every-row loop, as the LM's products in that execution. At batch 1
    the policy step is mostly its Linear layers (~80% of it through BLAS), and in generation their weights come
    from DRAM each step (the LM's stream evicts them), so its share of the decode time is mostly these reads; one
    float32 row's step runs as one native call (`utils.fast_policy`)."""
    from utils import fast_policy
    from utils.gathered import gemv_linear
    for m in list(policy.modules()):
        if isinstance(m, nn.Linear):
            gemv_linear(m)
    fast_policy.enable(policy)  # and its batch-1 float32 step as one native call


def load_policy_eval(ckpt_dir: str, mode: str = "latest", overrides: Mapping[str, object] | None = None,
                     device: str | None = None, trust: bool = False, execution: str = "simulated"):
    """(cfg, ControlledLM, SOLPolicy in eval mode) from a checkpoint (a run's or an export) and its stored
    config: the one loader of every evaluator, the generator and the benchmarks.

    `overrides` replace config fields (e.g. dataset_name); its key `knob_calibration` (a path, "none", or
    "auto", the default: the table beside the weights if it fits them, `_knob_table`) installs that knob
    offset table on the policy (`utils.knob_calibration`) and sets the feedback gain to the table's;
    `device` None resolves the config's `device` (auto = CUDA when available); `trust` reads old pickled
    checkpoints (`read_pt`); `execution`: "simulated" or "gathered" (see ControlledLM). Raises
    CheckpointError / ConfigError / ModelLoadError / ExecutionError with one-line messages.
    """
    from utils.config import default_device
    from utils.gathered import check_execution
    from utils.lm import ControlledLM
    from utils.model import load_lm
    from utils.policy import SOLPolicy

    check_execution(execution)  # before anything is loaded

    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    path = overrides.pop("knob_calibration", "auto")
    ckpt = load_checkpoint(ckpt_dir, mode, trust=trust)
    table = _knob_table(path, ckpt_dir, mode, ckpt, overrides)
    if table is not None:
        overrides["budget_feedback_gain"] = table[2]
    cfg = checkpoint_config(ckpt, overrides)
    dev = device or default_device(cfg)
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise CheckpointError(f"device {dev} requested but CUDA is not available on this machine")
    model, tok = load_lm(cfg.model_name, cfg.dtype, dev)
    lm = ControlledLM.from_config(cfg, model, tok, execution)
    policy = SOLPolicy.from_config(cfg, model.config.hidden_size, model.get_input_embeddings().embedding_dim,
                                   lm.actions)
    try:
        policy.load_state_dict(ckpt["policy_state_dict"])
    except RuntimeError as e:
        raise CheckpointError(f"policy weights in {ckpt_dir} do not fit its config: {str(e).splitlines()[0]}") from None
    bad = [k for k, v in ckpt["policy_state_dict"].items() if torch.is_tensor(v) and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"policy weights in {ckpt_dir} are not finite ({bad[0]}{' and others' if len(bad) > 1 else ''}); "
                              "the run that wrote them diverged")
    policy.to(dev).eval().requires_grad_(False)
    if execution == "gathered":
        _layout_policy(policy)
    if table is not None:
        fitted_masked = bool(table[3].get("policy_bracket_levels", False))  # tables before the flag: fitted without it
        if fitted_masked != policy.bracket_levels:
            _note(f"the knob calibration was fitted with the bracket mask {'on' if fitted_masked else 'off'} and the "
                  f"policy runs with it {'on' if policy.bracket_levels else 'off'}: the realised budget may differ "
                  "from the table's (refit it with the same --policy_bracket_levels)")
        try:
            policy.set_knob_table(table[0], table[1])
        except ValueError as e:
            raise CheckpointError(f"knob calibration: {e}") from None
    return cfg, lm, policy


def _knob_table(path: str, ckpt_dir: str, mode: str, ckpt: Mapping[str, Any], overrides: Mapping[str, object]):
    """The knob calibration `load_policy_eval` installs, as `load_calibration` returns it, or None.

    path: a file, "none", or "auto": `TABLE_FILE` beside the weights if there is one (what a training run
    with `knob_calibration_blocks` or `python -m utils.knob_calibration` writes), used only when it was
    fitted for these weights at the gain asked for (else a note says why it is left out). A file named
    explicitly must fit both, or this raises CheckpointError."""
    from utils.knob_calibration import TABLE_FILE, load_calibration, weights_fingerprint

    auto = path == "auto"
    if auto:
        path = os.path.join(ckpt_dir, TABLE_FILE)
        if not os.path.isfile(path):
            return None
    elif path == "none":
        return None
    table = load_calibration(path)
    fitted_for = table[3].get("weights_sha1")
    if fitted_for is not None and fitted_for != weights_fingerprint(ckpt["policy_state_dict"]):
        if auto:
            return _note(f"{path} was fitted for other weights than policy_{mode}: running without it")
        raise CheckpointError(f"the knob calibration {path} was fitted for other policy weights than {ckpt_dir} "
                              f"(policy_{mode}); fit one for these with python -m utils.knob_calibration")
    gain = float(overrides.get("budget_feedback_gain", table[2]))
    if gain != table[2]:
        if auto:
            return _note(f"{path} was fitted at feedback gain {table[2]:g}, not {gain:g}: running without it")
        raise CheckpointError(f"--budget_feedback_gain {gain:g} conflicts with the knob calibration {path}, "
                              f"fitted at gain {table[2]:g}; leave the gain out or fit a table at {gain:g}")
    if auto:
        _note(f"using the knob calibration {path} (feedback gain {table[2]:g}; --knob_calibration none runs "
              "without it)")
    return table


def _note(msg: str) -> None:
    print(f"note: {msg}", file=sys.stderr)


_EXPORT_KEYS = ("cfg", "update_step", "batches_done", "total_updates", "action_tags", "policy_num_params",
                "imitation")


def export_policy(ckpt_dir: str | Path, out_dir: str | Path, mode: str = "latest", trust: bool = False,
                  raw: bool = False) -> Path:
    """Write checkpoint `mode` of ckpt_dir as `out_dir/policy.safetensors` + `policy.json` (+ the run's
    config.yaml, and its knob calibration when that was fitted for these weights): weights and what
    evaluation needs, no optimizer, updater, sampler or RNG state, so it cannot `--resume`; evaluation,
    generation and `--checkpoint_path` warm starts accept it. out_dir may be ckpt_dir itself (the .pt files
    are left alone). A run with a weight average (`policy_ema_decay`) exports the average; `raw` exports the
    weights training had reached instead (to compare the two)."""
    from safetensors.torch import save

    from utils.knob_calibration import TABLE_FILE, load_calibration, weights_fingerprint

    ckpt = load_checkpoint(ckpt_dir, mode, trust=trust)
    key = "policy_state_dict"
    if raw:
        if "policy_raw_state_dict" not in ckpt:
            raise CheckpointError(f"--raw: {ckpt_dir} (policy_{mode}) holds no weight average, so its weights "
                                  "are already the raw ones; export it without --raw")
        key = "policy_raw_state_dict"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in ckpt[key].items()}
    meta = {"format": EXPORT_FORMAT, **{k: ckpt[k] for k in _EXPORT_KEYS if k in ckpt},
            "exported_from": ckpt.get("exported_from", f"{Path(ckpt_dir).name}/policy_{mode}.pt"),
            "weights": "raw" if raw else ckpt.get("weights", "average" if "policy_raw_state_dict" in ckpt else "raw")}
    path = atomic_write(out / WEIGHTS_FILE, lambda fh: fh.write(save(weights)), binary=True)
    atomic_write_text(out / META_FILE, json.dumps(meta, indent=1) + "\n")
    for name in ("config.yaml", TABLE_FILE):
        src = Path(ckpt_dir) / name
        if not src.is_file() or src.resolve() == (out / name).resolve():
            continue
        if name == TABLE_FILE and load_calibration(str(src))[3].get("weights_sha1") != weights_fingerprint(weights):
            continue  # fitted for another update's weights: useless beside these
        shutil.copyfile(src, out / name)
    return path


def main(argv: list[str] | None = None) -> int:
    from utils.cli import OneLineErrorParser

    p = OneLineErrorParser(prog="python -m utils.checkpoint", description="Checkpoint utilities.")
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export", help="weights-only safetensors copy of a run's checkpoint (for shipping)")
    e.add_argument("ckpt_dir", help="training run directory (policy_*.pt inside) or an exported one")
    e.add_argument("out_dir", help=f"directory to write {WEIGHTS_FILE} + {META_FILE} (+ config.yaml) into; "
                   "may be ckpt_dir itself")
    e.add_argument("--mode", default="latest", help="latest or an update number")
    e.add_argument("--trust_checkpoint", action="store_true", help=TRUST_HELP)
    e.add_argument("--raw", action="store_true", help="a run trained with policy_ema_decay > 0: export the raw "
                   "training weights instead of their average (the default)")
    a = p.parse_args(argv)
    try:
        path = export_policy(a.ckpt_dir, a.out_dir, a.mode, a.trust_checkpoint, a.raw)
    except (SOLError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB) and {path.parent / META_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
