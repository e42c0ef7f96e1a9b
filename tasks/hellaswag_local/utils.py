"""Local HellaSwag validation for lm-eval, from `data/hellaswag/hellaswag_val_full.txt.bz2`.

File format (see data/README.md): 6 lines per item - `activity_label: ctx`, the gold label (0-3), then
the four endings. Preprocessing is lm-eval's own `hellaswag` `preprocess` (strip, " [title]" -> ". ",
drop [bracketed] artifacts, collapse double spaces), imported from the installed lm_eval.

lm-eval builds the query as `activity_label + ": " + ctx_a + " " + ctx_b.capitalize()`. The local file
stores `ctx = ctx_a + " " + ctx_b` with ctx_b still lower-case, and the ctx_a/ctx_b boundary is lost. We
recover it the way it almost always is: ctx_b is the unfinished last sentence, so when the text after the
last sentence end (". ", "! ", "? ") starts with a lower-case letter, that letter is upper-cased. (The
rest of ctx_b is left as is; `str.capitalize` would also lower-case it, which only differs for capitals
inside ctx_b, e.g. names.)
"""
from __future__ import annotations

import bz2
import os
import re
from pathlib import Path

import datasets

try:
    from lm_eval.tasks.hellaswag.utils import preprocess
except ImportError:  # pragma: no cover - same function, for lm-eval layouts without the module
    def preprocess(text):
        text = text.strip()
        text = text.replace(" [title]", ". ")
        text = re.sub("\\[.*?\\]", "", text)
        text = text.replace("  ", " ")
        return text

DEFAULT_FILE = Path(__file__).resolve().parents[2] / "data" / "hellaswag" / "hellaswag_val_full.txt.bz2"
_LAST_SENTENCE = re.compile(r"^(.*[.!?] )([a-z])", re.S)


def data_file() -> Path:
    return Path(os.environ.get("SOL_HELLASWAG_FILE", DEFAULT_FILE))


def read_items(path: str | Path) -> list[dict]:
    """Raw items {activity_label, ctx, label, endings} from the 6-lines-per-item file (.bz2 or plain)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"HellaSwag file not found: {path} (set SOL_HELLASWAG_FILE)")
    opener = bz2.open if path.suffix == ".bz2" else open
    with opener(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    while lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise ValueError(f"{path}: {len(lines)} lines, not a multiple of 6")
    items = []
    for i in range(0, len(lines), 6):
        head, label, endings = lines[i], lines[i + 1].strip(), lines[i + 2: i + 6]
        act, sep, ctx = head.partition(": ")
        if not sep:
            act, ctx = "", head
        if label not in ("0", "1", "2", "3"):
            raise ValueError(f"{path}: line {i + 2}: label {label!r} is not 0-3")
        items.append({"ind": i // 6, "activity_label": act, "ctx": ctx, "label": label, "endings": endings})
    return items


def capitalize_last_fragment(ctx: str) -> str:
    """Upper-case the first letter of the unfinished last sentence (lm-eval's ctx_b.capitalize())."""
    m = _LAST_SENTENCE.match(ctx)
    if m:
        return ctx[: m.start(2)] + m.group(2).upper() + ctx[m.end(2):]
    if ctx[:1].islower():  # the whole context is ctx_b (ctx_a empty)
        return ctx[0].upper() + ctx[1:]
    return ctx


def load_hellaswag(**kwargs) -> datasets.DatasetDict:
    """lm-eval `custom_dataset` hook: the validation split as a DatasetDict."""
    path = kwargs.get("data_file") or data_file()
    return datasets.DatasetDict({"validation": datasets.Dataset.from_list(read_items(path))})


def process_doc(doc: dict) -> dict:
    query = preprocess(doc["activity_label"] + ": " + capitalize_last_fragment(doc["ctx"]))
    return {"query": query, "choices": [preprocess(e) for e in doc["endings"]], "gold": int(doc["label"])}


def process_docs(dataset: datasets.Dataset) -> datasets.Dataset:
    return dataset.map(process_doc)
