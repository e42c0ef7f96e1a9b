"""Shared command-line plumbing of the top-level scripts: one-line errors, never a traceback for bad input."""
from __future__ import annotations

import argparse
import math
import os
import sys

MIN_BITS, MAX_BITS = 2, 16  # the bit-width range of every target (as the config's C_target_quant_bits)
TRUST_HELP = ("read a checkpoint written by an older version of this project, which needs a full unpickler "
              "(that can run code: only for files from a source you trust)")


class SOLError(Exception):
    """Base of every error this project reports as one `error:` line (bad input, missing files, a diverged
    run): each entry point catches it (and OSError) once and prints the message, never a traceback."""


class UsageError(SOLError, ValueError):
    """A bad command-line value (one-line message)."""


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse that reports bad arguments as a single `error: ...` line and exits with code 2."""

    def error(self, message: str) -> None:
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def add_checkpoint_flags(p: argparse.ArgumentParser) -> None:
    """--ckpt_dir, --mode, --trust_checkpoint, --dtype, --budget_feedback_gain, --policy_logit_bound,
    --policy_bracket_levels, --knob_calibration: which policy an evaluator loads, and how (the same on every CLI;
    `checkpoint_overrides` reads them)."""
    p.add_argument("--ckpt_dir", required=True, help="a training run directory (policy_<mode>.pt inside) or an "
                   "exported policy (policy.safetensors, e.g. results/ckpt_prune_bc_cal)")
    p.add_argument("--mode", default="latest", help="checkpoint: latest or an update number (policy_<mode>.pt)")
    p.add_argument("--trust_checkpoint", action="store_true", help=TRUST_HELP)
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="the frozen LM's dtype (default: the checkpoint config's); float32 on a CPU without "
                   "bfloat16 instructions, where bfloat16 is slower")
    p.add_argument("--budget_feedback_gain", type=float,
                   help="the policy's integral budget feedback gain at inference (default: the checkpoint "
                   "config's; 0 = off; docs/grpo_recipe.md)")
    p.add_argument("--policy_logit_bound", type=float,
                   help="bound of the policy network's logits before the feedback (default: the checkpoint "
                   "config's; 0 = unbounded)")
    p.add_argument("--policy_bracket_levels", choices=("on", "off"),
                   help="on: the policy takes, on each axis, only the two levels that bracket the request there "
                   "(the fixed baseline's levels); off: any level (default: the checkpoint config's "
                   "policy_bracket_levels, off)")
    p.add_argument("--knob_calibration", metavar="JSON|auto|none", default="auto",
                   help="a knob offset table fitted on the train split by `python -m utils.knob_calibration` "
                   "(or by training with knob_calibration_blocks > 0); it sets the feedback gain to the one it was "
                   "fitted with. auto (default): CKPT_DIR/knob_calibration.json if it is there and was fitted for "
                   "these weights at the gain asked for; none: no table")


def checkpoint_overrides(a: argparse.Namespace, error: type[Exception] = UsageError) -> dict[str, object]:
    """The config fields that `add_checkpoint_flags`' options override (None = keep the checkpoint's), for
    `utils.checkpoint.load_policy_eval`, after checking them; raises `error` with a one-line message."""
    for name in ("budget_feedback_gain", "policy_logit_bound"):
        v = getattr(a, name)
        if v is not None and not (math.isfinite(v) and v >= 0):
            raise error(f"--{name} must be a finite number >= 0, got {v}")
    cal = getattr(a, "knob_calibration", None)
    if cal not in (None, "auto", "none") and not os.path.isfile(cal):
        raise error(f"--knob_calibration: file not found: {cal}")
    return {"dtype": a.dtype, "budget_feedback_gain": a.budget_feedback_gain,
            "policy_logit_bound": a.policy_logit_bound, "knob_calibration": cal,
            "policy_bracket_levels": None if getattr(a, "policy_bracket_levels", None) is None
            else a.policy_bracket_levels == "on"}


def add_target_flags(p: argparse.ArgumentParser) -> None:
    """--tgt_keep, --tgt_prune_keep, --tgt_quant_bits: the requested budget (`config.eval_targets` fills the
    ones not given; `check_targets` validates them), the same on every CLI."""
    p.add_argument("--tgt_keep", type=float, help="requested token keep κ in [0, 1] (default: the checkpoint "
                   "config's eval_C_tok, else C_target)")
    p.add_argument("--tgt_prune_keep", type=float, help="requested MLP channel keep ρ in [0, 1] (default: "
                   "eval_C_pru, else C_target_prune)")
    p.add_argument("--tgt_quant_bits", type=float, help=f"requested MLP-output bits in [{MIN_BITS}, {MAX_BITS}] "
                   "(default: eval_C_qbits, else C_target_quant_bits)")


def check_mode(mode: str, error: type[Exception] = UsageError) -> None:
    if not (mode == "latest" or str(mode).isdigit()):
        raise error(f"--mode must be latest or an update number, got {mode!r}")


def need(ok: bool, msg: str) -> None:
    """Raise UsageError(msg) unless ok: argument checks read as a list of requirements."""
    if not ok:
        raise UsageError(msg)


def check_targets(tgt_keep: float | None, tgt_prune_keep: float | None, tgt_quant_bits: float | None,
                  error: type[Exception] = UsageError) -> None:
    """The one validation of the requested targets shared by every entry point: keeps in [0, 1], bits in
    [MIN_BITS, MAX_BITS], all finite (None = not given). Raises `error` with a one-line message."""
    for name, v in (("tgt_keep", tgt_keep), ("tgt_prune_keep", tgt_prune_keep)):
        if v is not None and not (math.isfinite(v) and 0.0 <= v <= 1.0):
            raise error(f"--{name} must be in [0, 1], got {v}")
    if tgt_quant_bits is not None and not (math.isfinite(tgt_quant_bits) and MIN_BITS <= tgt_quant_bits <= MAX_BITS):
        raise error(f"--tgt_quant_bits must be in [{MIN_BITS}, {MAX_BITS}], got {tgt_quant_bits}")


def check_output_file(flag: str, path: str | None, error: type[Exception] = UsageError) -> None:
    """Before any expensive work: the output file's location must be usable (not a directory, its parent a
    directory or creatable, writable), so a long evaluation never fails at its last line."""
    import os

    if path is None:
        return
    if os.path.isdir(path):
        raise error(f"{flag} {path} is a directory; give a file path")
    parent = os.path.dirname(os.path.abspath(path))
    probe = parent
    while not os.path.exists(probe):  # the nearest existing ancestor decides whether it can be created
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise error(f"{flag} {path}: {probe} is not a directory")
    if not os.access(probe, os.W_OK):
        raise error(f"{flag} {path}: {probe} is not writable")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise error(f"{flag} {path} is not writable")


def check_finite(values: dict[str, float | None], error: type[Exception] = UsageError) -> None:
    """Every given value finite: nan/inf flags would otherwise pass range checks or silently bias a policy."""
    for name, v in values.items():
        if v is not None and not math.isfinite(v):
            raise error(f"--{name} must be a finite number, got {v}")
