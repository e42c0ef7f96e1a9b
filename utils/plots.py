"""Figures from the perplexity CSV written by eval_perplexity.py (one row per requested target point).

    python -m utils.plots pareto results/ppl_eval.csv --out results/pareto.png
    python -m utils.plots adherence results/ppl_eval.csv --out results/adherence.png

* `pareto`: PPL against net keep = (κ̄ + ρ̄ + q̄)/3 for the policy, fixed, best-of-N random and, when present,
  EMC and DAC; dense as a horizontal line. Each method's Pareto front (sorted by net keep, the points whose
  PPL is lower than that of every cheaper point) is drawn as a line; dominated points are faded.
* `adherence`: per axis, the requested target against the policy's achieved (nominal) usage, with the
  identity line and a ±0.03 band.
* `table`: the CSV as a Markdown table (one row per point), for the README; `--out` optional (stdout).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path
from typing import Sequence

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from utils.cli import OneLineErrorParser, SOLError

# (label, ppl column, prefix of the usage columns, colour, marker)
METHODS = (
    ("SOL policy", "policy_ppl", "policy", "tab:red", "o"),
    ("fixed (uniform)", "fixed_ppl", "fixed", "tab:blue", "s"),
    ("random (best of N)", "random_ppl_best", "random", "tab:green", "^"),
    ("EMC (entropy)", "emc_ppl", "emc", "tab:purple", "D"),
    ("DAC (drift)", "dac_ppl", "dac", "tab:brown", "v"),
)
BAND = 0.03


class PlotError(SOLError, ValueError):
    """Unreadable or unsuitable CSV (one-line message)."""


def read_rows(path: str | Path) -> list[dict[str, str]]:
    """The rows of a results CSV as strings, refusing a damaged file with its line number.

    The csv module, not pandas: `pandas.read_csv` fills the missing fields of a short row (what a full disk
    leaves behind a non-atomic writer) with empty strings or NaN, indistinguishable from empty cells, so it
    cannot tell a damaged row from a sparse one."""
    p = Path(path)
    if not p.is_file():
        raise PlotError(f"CSV not found: {path}")
    with open(p, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header = next(reader, [])
        rows = []
        for row in reader:
            if len(row) != len(header):  # e.g. a row cut short by a full disk under a non-atomic writer
                raise PlotError(f"{path}, line {reader.line_num}: {len(row)} fields where the header has "
                                f"{len(header)}; the file is damaged")
            rows.append(dict(zip(header, row)))
    if not rows:
        raise PlotError(f"{path} has no data rows")
    return rows


def _save(fig, out: str | Path, **kw) -> Path:
    """Lay out, write (creating the directory) and close a figure; returns the path."""
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, **kw)
    plt.close(fig)
    return out


def _num(s: str | None) -> float | None:
    if s is None or s.strip() == "":
        return None
    try:
        v = float(s)
    except ValueError:
        return None
    return v if math.isfinite(v) else None


def _net_keep(row: dict[str, str], prefix: str) -> float | None:
    v = _num(row.get(f"{prefix}_net_keep"))
    if v is not None:
        return v
    parts = [_num(row.get(f"{prefix}_{c}")) for c in ("keep", "prune_keep", "quant_ratio")]
    return None if any(x is None for x in parts) else sum(parts) / 3.0  # type: ignore[arg-type]


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points on the lower-left front (both coordinates minimised): sorted by x, each point
    whose y is strictly lower than that of every point with a smaller x (ties in x: the lowest y)."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best = [], math.inf
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def method_points(rows: list[dict[str, str]], ppl_col: str, prefix: str) -> list[tuple[float, float]]:
    pts = []
    for r in rows:
        x, y = _net_keep(r, prefix), _num(r.get(ppl_col))
        if x is not None and y is not None:
            pts.append((x, y))
    return pts


def plot_pareto(rows: list[dict[str, str]], out: str | Path, title: str | None = None) -> Path:
    if "policy_ppl" not in rows[0]:
        raise PlotError("CSV has no policy_ppl column; is it an eval_perplexity.py CSV?")
    fig, ax = plt.subplots(figsize=(7.5, 5.0), dpi=150)
    drawn = 0
    for label, ppl_col, prefix, colour, marker in METHODS:
        pts = method_points(rows, ppl_col, prefix)
        if not pts:
            continue
        front = pareto_front(pts)
        on = set(front)
        off = [p for i, p in enumerate(pts) if i not in on]
        if off:
            ax.scatter([p[0] for p in off], [p[1] for p in off], color=colour, marker=marker, alpha=0.25, s=22,
                       linewidths=0)
        fx, fy = [pts[i][0] for i in front], [pts[i][1] for i in front]
        ax.plot(fx, fy, color=colour, marker=marker, ms=5, lw=1.6, label=f"{label} ({len(pts)} pts)")
        drawn += 1
    dense = [v for v in (_num(r.get("dense_ppl")) for r in rows) if v is not None]
    if dense:
        d = sum(dense) / len(dense)
        ax.axhline(d, color="black", ls="--", lw=1.0, label=f"dense (PPL {d:.3g})")
    if drawn == 0:
        plt.close(fig)
        raise PlotError("no row has both a PPL and a usage for any method")
    ax.set_xlabel("net keep rate  (κ̄ + ρ̄ + q̄) / 3   (lower = cheaper)")
    ax.set_ylabel("perplexity (lower = better)")
    n_tok = _num(rows[0].get("n_tokens"))
    sub = f"{len(rows)} target points" + (f", {int(n_tok)} tokens each" if n_tok else "")
    ax.set_title(title or f"Quality vs efficiency: Pareto fronts ({sub})", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _save(fig, out)


ADHERENCE_AXES = (
    ("token keep κ", "target_keep", 1.0, "policy_keep"),
    ("MLP channel keep ρ (/P_MAX)", "target_prune_keep", 1.0, "policy_prune_keep"),
    ("quant ratio bits/16", "target_quant_bits", 1.0 / 16.0, "policy_quant_ratio"),
)


def plot_adherence(rows: list[dict[str, str]], out: str | Path, title: str | None = None) -> Path:
    fig, axes = plt.subplots(1, 3, figsize=(12.0, 4.2), dpi=150)
    any_pts = False
    for ax, (label, req_col, scale, got_col) in zip(axes, ADHERENCE_AXES):
        pts = [(req * scale, got) for req, got in ((_num(r.get(req_col)), _num(r.get(got_col))) for r in rows)
               if req is not None and got is not None]
        lo, hi = 0.0, 1.0
        ax.fill_between([lo, hi], [lo - BAND, hi - BAND], [lo + BAND, hi + BAND], color="0.85",
                        label=f"±{BAND:g}")
        ax.plot([lo, hi], [lo, hi], color="black", lw=0.8, ls="--", label="requested = achieved")
        if pts:
            any_pts = True
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], color="tab:red", s=18, label="SOL policy")
            mae = sum(abs(g - q) for q, g in pts) / len(pts)
            inside = sum(abs(g - q) <= BAND for q, g in pts) / len(pts)
            ax.set_title(f"{label}\nmean |gap| {mae:.3f}, {100 * inside:.0f}% within ±{BAND:g}", fontsize=9)
        else:
            ax.set_title(f"{label}\n(no data)", fontsize=9)
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_xlabel("requested")
        ax.set_ylabel("achieved (mean over effective steps)")
        ax.set_aspect("equal")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    if not any_pts:
        plt.close(fig)
        raise PlotError("no row has both a requested target and a policy usage")
    fig.suptitle(title or f"Budget adherence of the policy ({len(rows)} target points)", fontsize=11)
    return _save(fig, out)


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a training run's metrics.jsonl."""
    p = Path(path)
    if p.is_dir():
        p = p / "metrics.jsonl"
    if not p.is_file():
        raise PlotError(f"metrics file not found: {path}")
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def _smooth(y: np.ndarray, w: int) -> np.ndarray:
    if len(y) < w or w <= 1:
        return y
    return np.convolve(y, np.ones(w) / w, mode="valid")


def plot_curve(records: list[dict], out: str | Path, title: str | None = None, window: int = 20) -> Path:
    """Learning curve of a run. Top: total reward, |budget gap| per axis, the dev-split PPL gap to fixed.
    Bottom, the learning diagnostics: tempered policy entropy and the no-contrast share (all K rollouts
    alike: nothing for GRPO to compare), the requested-vs-achieved budget correlation (is the knob
    learned?), and the dev placement correlation of spend with single-step damage (is content learned?).
    Panels whose metrics a run did not log (older runs) stay empty."""
    batches = [r for r in records if "reward/total_mean" in r]
    dev = [r for r in records if "dev/policy_ppl" in r]
    if not batches:
        raise PlotError("no training records (reward/total_mean) in the metrics file")

    def series(key: str, rows: list[dict] = batches) -> tuple[np.ndarray, np.ndarray]:
        pts = [(r["update"], r[key]) for r in rows if key in r and r[key] is not None and np.isfinite(r[key])]
        if not pts:
            return np.array([]), np.array([])
        xs, ys = (np.array(v, dtype=float) for v in zip(*pts))
        w = window if len(ys) >= window else 1
        return xs[w - 1:], _smooth(ys, w)

    fig, axes = plt.subplots(2, 3, figsize=(15, 8.4))
    top, bottom = axes
    top[0].plot(*series("reward/total_mean"))
    top[0].set(xlabel="update", ylabel=f"reward (moving mean of {window} batches)", title="reward")
    for ax_name, color in (("tok", "C0"), ("prune", "C1"), ("qratio", "C2")):
        top[1].plot(*series(f"budgets/abs_gap_{ax_name}"), color=color, label=ax_name)
    top[1].axhline(0.03, color="grey", ls="--", lw=1, label="0.03")
    top[1].set(xlabel="update", ylabel="|achieved − requested| (episode mean)", title="budget gap per axis")
    top[1].legend()
    if dev:
        xd = [r["update"] for r in dev]
        top[2].plot(xd, [r["dev/policy_ppl"] - r["dev/fixed_ppl"] for r in dev], marker="o")
        top[2].axhline(0, color="grey", lw=1)
    top[2].set(xlabel="update", ylabel="dev PPL: policy − fixed (matched usage)", title="dev-split quality gap")
    upd = [r for r in batches if "update/entropy" in r]
    bottom[0].plot(*series("update/entropy", upd), label="tempered policy entropy")
    bottom[0].plot(*series("train/no_contrast_frac"), label="no-contrast share")
    bottom[0].set(xlabel="update", title="exploration (entropy, nats) and contrast", ylim=(0, None))
    bottom[0].legend()
    for ax_name, color in (("tok", "C0"), ("prune", "C1"), ("qratio", "C2")):
        xs, ys = series(f"budgets/corr_target_achieved_{ax_name}")
        if len(xs):
            bottom[1].plot(xs, ys, color=color, label=ax_name)
    bottom[1].axhline(0, color="grey", lw=1)
    bottom[1].set(xlabel="update", ylabel="corr(requested, achieved), last batches", title="budget knob",
                  ylim=(-1.05, 1.05))
    if bottom[1].get_legend_handles_labels()[0]:
        bottom[1].legend()
    pl = [r for r in dev if "dev/placement_corr" in r]
    if pl:
        bottom[2].plot([r["update"] for r in pl], [r["dev/placement_corr"] for r in pl], marker="o",
                       label="corr(spend, damage)")
        bottom[2].axhline(0, color="grey", lw=1)
        bottom[2].legend()
    bottom[2].set(xlabel="update", title="dev placement: spends where cheap steps hurt?", ylim=(-1.05, 1.05),
                  ylabel="correlation")
    fig.suptitle(title or "training curve")
    return _save(fig, out, dpi=120)


def _cell(row: dict[str, str], col: str, fmt: str = "{:.2f}") -> str:
    v = _num(row.get(col))
    return "–" if v is None else fmt.format(v)


def results_table(rows: list[dict[str, str]]) -> str:
    """Markdown table: requested point, the policy's realised usage and FLOPs, every method's PPL, the
    policy − fixed per-token NLL difference with its bootstrap 95% interval, and the worst adherence gap."""
    head = ("| requested κ / ρ / bits | realised κ / ρ / bits | FLOPs vs dense | dense | **policy** | fixed "
            "| random best (mean, N) | EMC | DAC | ΔNLL policy − fixed [95% CI] | max gap |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in sorted(rows, key=lambda r: (_num(r.get("target_keep")) or 0.0, _num(r.get("target_prune_keep")) or 0.0)):
        tk, tp, tb = (_num(r.get(c)) for c in ("target_keep", "target_prune_keep", "target_quant_bits"))
        k, p, q = (_num(r.get(f"policy_{c}")) for c in ("keep", "prune_keep", "quant_ratio"))
        gaps = [abs(a - b) for a, b in ((k, tk), (p, tp), (q, None if tb is None else tb / 16.0))
                if a is not None and b is not None]
        if None in (tk, tp, tb, k, p, q):
            raise PlotError("table: a row lacks the target_* or policy_keep/prune_keep/quant_ratio columns")
        n_trials = len([t for t in (r.get("random_ppl_trials") or "").split("|") if t])
        rand = (f"{_cell(r, 'random_ppl_best')} ({_cell(r, 'random_ppl_mean')}, {n_trials})" if n_trials else "–")
        lines.append(
            f"| {tk:g} / {tp:g} / {tb:g} | {k:.3f} / {p:.3f} / {16 * q:.2f} | {_cell(r, 'policy_flops_ratio', '{:.3f}')} "
            f"| {_cell(r, 'dense_ppl')} | **{_cell(r, 'policy_ppl')}** | {_cell(r, 'fixed_ppl')} | {rand} "
            f"| {_cell(r, 'emc_ppl')} | {_cell(r, 'dac_ppl')} "
            f"| {_cell(r, 'delta_nll_mean', '{:+.4f}')} [{_cell(r, 'delta_nll_lo', '{:+.4f}')}, "
            f"{_cell(r, 'delta_nll_hi', '{:+.4f}')}] | {max(gaps) if gaps else float('nan'):.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = OneLineErrorParser(prog="python -m utils.plots", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", choices=("pareto", "adherence", "curve", "table"), help="which figure (or table)")
    p.add_argument("csv", help="CSV written by eval_perplexity.py (curve: a run directory or its metrics.jsonl)")
    p.add_argument("--out", help="output image (.png, .pdf, .svg); for table a .md file (default stdout)")
    p.add_argument("--title", help="figure title")
    a = p.parse_args(argv)
    if a.kind != "table" and not a.out:
        p.error("--out is required for figures")
    if a.out and a.kind != "table" and not Path(a.out).suffix:
        a.out += ".png"  # what matplotlib would write anyway; now the message names the real file
    try:
        if a.out:
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        if a.kind == "table":
            text = results_table(read_rows(a.csv))
            if not a.out:
                sys.stdout.write(text)
                return 0
            Path(a.out).write_text(text)
            out = Path(a.out)
        elif a.kind == "curve":
            out = plot_curve(read_metrics(a.csv), a.out, a.title)
        else:
            rows = read_rows(a.csv)
            out = (plot_pareto if a.kind == "pareto" else plot_adherence)(rows, a.out, a.title)
    except (PlotError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
