"""Shared command-line plumbing of the top-level scripts: one-line errors, never a traceback for bad input."""
from __future__ import annotations

import argparse
import sys


class UsageError(ValueError):
    """A bad command-line value (one-line message)."""


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse that reports bad arguments as a single `error: ...` line and exits with code 2."""

    def error(self, message: str) -> None:
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def need(ok: bool, msg: str) -> None:
    """Raise UsageError(msg) unless ok: argument checks read as a list of requirements."""
    if not ok:
        raise UsageError(msg)
