"""The report's protocol comparison: what checkpoint selection is worth (docs/methods.md Decisions 2, 8, 9).

Two tables per precision, both in each method's own post-processing (the main table's LCC column):

- **Dice by protocol**: the honest, literature and val rows of a (method, labeled) pair side by side.
- **Selection**: per (method, labeled), the Dice of the *last* weights, of the *val-selected* checkpoint
  and of the *best-on-test* checkpoint, and their differences (percentage points, differences of the
  means over seeds).

  - last: the val runs' own last weights (summary.json ``last``; the selected checkpoint itself where no
    selection point fell inside the run), else, without val runs, the literature runs' last weights.
  - val-selected: the val runs' evaluated checkpoint.
  - best-on-test: ONLY the literature runs of the same method, labeled count and precision, where they
    did select on the test set (checkpoint ``best-on-test``). A val run never reads the test set before
    training ends, so it cannot know its best-on-test checkpoint; the column is empty where the
    reference evaluates its last checkpoint (§2.4), or the literature runs are missing.

``selection.csv`` holds the same numbers (means and sample stds over seeds).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from . import published
from .report_format import fmt, fmt_stats, markdown_table
from .report_rows import Row, metric_stats

PROTOCOL_HEADER = ["Method", "Labeled", "Precision", "Honest Dice (%)", "Literature Dice (%)", "Val Dice (%)",
                   "Seeds honest / literature / val"]
SELECTION_HEADER = ["Method", "Labeled", "Precision", "LCC", "Seeds val / literature", "Val-selected iteration(s)",
                    "Last (%)", "Val-selected (%)", "Best-on-test (%)", "Val − last", "Test − last", "Test − val"]

NOTE = ("Last: the val runs' own last weights (without val runs, the literature runs'). Val-selected: the checkpoint "
        "chosen on the validation cases (the last K of train.list), every 200 iterations in every stage. Best-on-test: "
        "only from the literature runs of the same method, labeled count and precision, where their reference selects "
        "on the test set (§2.4); a val run never reads the test set before training ends, so it has no best-on-test "
        "of its own, and the column is empty (–) without such runs. Differences in percentage points, between means "
        "over seeds; each method's own post-processing (LCC column).")


def _stats(values) -> tuple[float, float] | None:
    if not values:
        return None
    arr = np.array(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else float("nan")


def last_dice(run, post: str) -> float | None:
    """Dice of a run's last weights: its summary's ``last``, or its checkpoint when that is the last one."""
    last = (run.summary.get("last") or {}).get("metrics") or {}
    if post in last:
        return last[post]["dice"]
    if (run.summary.get("checkpoint") or {}).get("selection") == "last" and post in run.summary.get("metrics", {}):
        return run.summary["metrics"][post]["dice"]
    return None


def _selected_on_test(row: Row | None) -> bool:
    return bool(row and row.runs and not row.note and
                any((r.summary.get("checkpoint") or {}).get("selection") == "best-on-test" for r in row.runs))


def _groups(rows: list[Row]):
    """(method, labeled, precision) -> {protocol: row}, in table order."""
    out: dict[tuple, dict[str, Row]] = {}
    for row in rows:
        out.setdefault((row.method, row.labeled, row.precision), {})[row.protocol] = row
    return out


def selection_records(rows: list[Row]) -> list[dict]:
    recs = []
    for (method, labeled, precision), by in _groups(rows).items():
        val, lit = by.get("val"), by.get("literature")
        val = val if val and val.runs else None
        lit_sel = lit if _selected_on_test(lit) else None
        if val is None and lit_sel is None:
            continue
        post = (val or lit_sel).post
        source = val if val is not None else lit_sel
        lasts = [last_dice(r, post) for r in source.runs]
        last = _stats([100 * v for v in lasts]) if lasts and all(v is not None for v in lasts) else None
        chosen = metric_stats(val, post, "dice") if val is not None else None
        test = metric_stats(lit_sel, post, "dice") if lit_sel is not None else None
        its = sorted({r.summary["checkpoint"]["iteration"] for r in val.runs}) if val is not None else []

        def diff(a, b):
            return a[0] - b[0] if a and b else None

        recs.append({"method": method, "labeled": labeled, "precision": precision, "post": post,
                     "n_val": len(val.runs) if val else 0, "n_literature": len(lit_sel.runs) if lit_sel else 0,
                     "last_from": "val" if val is not None else "literature", "val_iterations": its,
                     "last": last, "val": chosen, "test": test,
                     "val_minus_last": diff(chosen, last), "test_minus_last": diff(test, last),
                     "test_minus_val": diff(test, chosen)})
    return recs


def selection_table_rows(recs: list[dict], paper: str | None) -> list[list[str]]:
    return [[published.display_name(r["method"], paper), str(r["labeled"]), r["precision"],
             "yes" if r["post"] == "lcc" else "no", f"{r['n_val']} / {r['n_literature']}",
             ", ".join(str(i) for i in r["val_iterations"]) or "–",
             fmt_stats(r["last"]), fmt_stats(r["val"]), fmt_stats(r["test"]),
             fmt(r["val_minus_last"], signed=True), fmt(r["test_minus_last"], signed=True),
             fmt(r["test_minus_val"], signed=True)] for r in recs]


def protocol_table_rows(rows: list[Row], paper: str | None) -> list[list[str]]:
    out = []
    for (method, labeled, precision), by in _groups(rows).items():
        if "val" not in by:
            continue  # only where the experiment asks for val: the per-protocol tables show the rest
        cells = [published.display_name(method, paper), str(labeled), precision]
        seeds = []
        for protocol in ("honest", "literature", "val"):
            row = by.get(protocol)
            if row is None:
                cells.append("–")
                seeds.append("–")
                continue
            stats = metric_stats(row, row.post, "dice") if row.runs else None
            cells.append(fmt_stats(stats) + (f" ({row.note})" if row.note and stats else "") if row.runs else "missing")
            seeds.append(f"{len(row.runs)}/{len(row.planned)}")
        out.append(cells + [" / ".join(seeds)])
    return out


def selection_csv(recs: list[dict]) -> pd.DataFrame:
    out = []
    for r in recs:
        rec = {k: r[k] for k in ("method", "labeled", "precision", "post", "n_val", "n_literature", "last_from")}
        rec["val_iterations"] = " ".join(str(i) for i in r["val_iterations"])
        for what in ("last", "val", "test"):
            s = r[what]
            rec[f"{what}_dice_mean"], rec[f"{what}_dice_std"] = (s if s else (None, None))
        rec.update({k: r[k] for k in ("val_minus_last", "test_minus_last", "test_minus_val")})
        out.append(rec)
    return pd.DataFrame.from_records(out, columns=[
        "method", "labeled", "precision", "post", "n_val", "n_literature", "last_from", "val_iterations",
        "last_dice_mean", "last_dice_std", "val_dice_mean", "val_dice_std", "test_dice_mean", "test_dice_std",
        "val_minus_last", "test_minus_last", "test_minus_val"])


def selection_section(rows: list[Row], paper: str | None) -> tuple[str, list[list[str]], pd.DataFrame]:
    """(Markdown section, selection-table body for LaTeX, selection.csv frame); the section is "" without val rows
    or test-selecting literature runs."""
    recs = selection_records(rows)
    protocol_rows = protocol_table_rows(rows, paper)
    if not recs and not protocol_rows:
        return "", [], selection_csv([])
    md = ["\n## Model selection: last, val-selected and best-on-test\n"]
    if protocol_rows:
        md += ["\nDice (%) by protocol, mean ± std over seeds, each method's own post-processing:\n\n",
               markdown_table(PROTOCOL_HEADER, protocol_rows)]
    body = selection_table_rows(recs, paper)
    if body:
        md += ["\n" + NOTE + "\n\n", markdown_table(SELECTION_HEADER, body)]
    return "".join(md), body, selection_csv(recs)
