"""Write HellaSwag validation as plain text for a perplexity check on another domain: one line per item, its
context followed by its gold ending (ActivityNet and WikiHow captions, nothing like WikiText-2's articles).

    python results/ood_hellaswag/make_text.py OUT.txt
"""
import bz2
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "data" / "hellaswag" / "hellaswag_val_full.txt.bz2"


def items(lines: list[str]):
    """The file holds six lines per item: context, gold index, four endings."""
    for i in range(0, len(lines) - 5, 6):
        ctx, gold, endings = lines[i], int(lines[i + 1]), lines[i + 2: i + 6]
        yield ctx.strip(), endings[gold].strip()


if __name__ == "__main__":
    lines = bz2.open(SRC, "rt", encoding="utf-8").read().split("\n")
    out = Path(sys.argv[1])
    out.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(out, "w", encoding="utf-8") as f:
        for ctx, end in items(lines):
            f.write(f"{ctx} {end}\n")
            n += 1
    print(f"{n} items -> {out}")
