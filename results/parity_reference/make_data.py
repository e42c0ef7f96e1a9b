"""The reference's data layout for the parity run (issue 15, item 0), written as JSONL under block_cache/parity/.

The reference trained on WikiText-2 test.txt read by the `datasets` text loader (one row per line, newline
stripped, empty rows dropped) and scored on the first 2,000 rows of valid.txt. JSONL keeps each line without
its newline, so our loader joins them exactly as the reference's does.
"""
import json
import sys
from pathlib import Path

root = Path(__file__).resolve().parents[2]
src, out = root / "data" / "wikitext-2", root / "block_cache" / "parity"
out.mkdir(parents=True, exist_ok=True)
for name, lines in (("train", (src / "test.txt").read_text(encoding="utf-8").splitlines()),
                    ("test", (src / "valid.txt").read_text(encoding="utf-8").splitlines()[:2000])):
    rows = [line for line in lines if line.strip()]
    with open(out / f"{name}.jsonl", "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps({"text": r}) + "\n" for r in rows)
    print(f"{out / name}.jsonl: {len(rows)} rows", file=sys.stderr)
