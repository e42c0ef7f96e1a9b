"""Loader of the tiny local multiple-choice task (tiny_mc.jsonl beside this file)."""
from __future__ import annotations

import json
from pathlib import Path

import datasets

DATA = Path(__file__).resolve().parent / "tiny_mc.jsonl"


def load_tiny_mc(**kwargs) -> datasets.DatasetDict:
    rows = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines() if line.strip()]
    return datasets.DatasetDict({"validation": datasets.Dataset.from_list(rows)})
