"""`ssl-bench report EXPERIMENT`: tables, tests and plots from run folders only.

It reads ``summary.json``, ``metrics_per_case.csv`` and ``config.json`` of each cell's run folder
(and any occlusion CSV there), never trains or evaluates, and can be rerun at any time. A cell
without ``summary.json`` is missing and shown as missing; nothing is filled in. A finished folder
that is not its cell is refused with one line naming the folder and the first difference: its
summary.json names another method, labeled count, seed or protocol, it has no ``config.json``, or
its stored settings differ from the cell's (``ssl_bench.experiments.same_run``: device, the fast-path
switches besides precision, teacher folder and log/checkpoint intervals do not count), as ``ssl-bench
sweep`` refuses it. So is a folder whose recorded split (labeled, unlabeled, validation and test ids, in
order) differs from what its data root's train.list and test.list give now, where that root is on this machine.

Precision (docs/methods.md Decision 7) is part of every row's identity: the tables come one per protocol
and precision (the heading names it, the CSVs have a ``precision`` column), so runs of different
precision are never averaged or paired. A run folder made before precision was recorded is named
below its table with what it computed (``ssl_bench.precision.recorded_precision``: bf16 autocast for a
CUDA run with the old fast path, otherwise tf32 — fp32 numerics on CPU).

What it writes to ``results/<experiment>/`` (atomically, ssl_bench.runs.atomic_write_text):

- ``table.md``, ``table.tex``, ``table.csv``: one table per protocol. Each row is a (method,
  labeled) pair with mean ± std over seeds (sample std, n−1) of Dice/Jaccard (%) and 95HD/ASD
  (voxels) under the method's own post-processing (Decisions 3; the LCC column says which), the
  paper's numbers (docs/methods.md §5.1) and ours − paper, the method's own paper figure (§5) where it
  has one, seed count, empty predictions, and training+evaluation minutes of the cell's runs
  (including a stage 1 reused from another run). The CSV has every number, for both
  post-processings. A second Markdown table gives Dice and 95HD without and with LCC.
- ``selection.csv`` and a "Model selection" section (ssl_bench/selection_report.py): honest, literature
  and val Dice side by side, and per (method, labeled) the last, val-selected and best-on-test Dice
  with their differences (best-on-test from the literature runs only; docs/methods.md Decision 8).
- ``wilcoxon.csv``: paired per-case Wilcoxon signed-rank tests (scipy.stats.wilcoxon, two-sided)
  of the reference method (``compare_to``, OMF) against every other method at the same labeled
  count and protocol; per-case Dice is first averaged over seeds. Posts: "own" (each method's
  own default, as tabulated), "raw" and "lcc" (both methods alike).
- ``dice_per_case_<protocol>.png/pdf``; ``ablation_<protocol>.png/pdf`` for Table 2;
  ``fig3.png/pdf`` and ``occlusion.csv`` when occlusion CSVs exist in the run folders.
- For Tables 1–2, ``REPRODUCTION.md`` one folder up: paper vs ours for every row of both tables.

Occlusion CSVs (written by ``ssl-bench occlusion`` into a run folder as ``occlusion*.csv`` or
``occlusion/*.csv``): one row per case and occlusion, columns ``ratio`` (or ``proportion``),
``dice``, and optionally ``variant``, ``repeat``, ``case``, ``post``, ``jaccard``, ``hd95``, ``asd``.
Per ratio: the case-mean Dice of each (seed, repeat), averaged over seeds, then mean ± std over
repeats (§3.7.8).
"""
from __future__ import annotations

import dataclasses

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np
import pandas as pd

from . import published
from .dataset_settings import run_defaults_from
from .errors import UserError
from .experiments import (DEFAULT_PRECISION, LA_TRAIN_CASES, PLANNED_METHODS, PROTOCOLS, Cell, Experiment,
                          load_experiment, same_run)
from .runs import atomic_savefig, atomic_write_text, read_json
from . import track_report

METRICS = ("dice", "jaccard", "hd95", "asd")
PERCENT = {"dice", "jaccard"}
REPRODUCTION_EXPERIMENTS = ("table1", "table2")
OCCLUSION_CSV = "occlusion_per_case.csv"  # written by `ssl-bench occlusion --out DIR`
FALLBACK_NOTE = "= honest"
FALLBACK_TEXT = ("literature (= honest): the method's reference evaluates the last checkpoint (§2.4), so the "
                 "literature protocol trains exactly what honest trains; these rows show the honest runs.")


@dataclass
class Run:
    cell: Cell
    summary: dict
    config: dict
    per_case: pd.DataFrame
    minutes: float
    gpu: str | None
    legacy_precision: str | None = None  # no precision recorded: what the run computed (recorded_precision)


@dataclass
class Row:
    protocol: str
    method: str
    labeled: int
    planned: list[int]  # seeds the experiment asks for
    runs: list[Run] = field(default_factory=list)
    note: str = ""
    precision: str = DEFAULT_PRECISION  # part of the row's identity (Decision 7)

    @property
    def post(self) -> str | None:
        return self.runs[0].summary["paper_post"] if self.runs else None

    @property
    def protocol_label(self) -> str:
        return f"{self.protocol} ({self.note})" if self.note else self.protocol


# -- reading run folders ----------------------------------------------------------------------------

def load_run(cell: Cell, runs_dir: Path) -> Run | None:
    d = cell.run_dir(runs_dir)
    if not (d / "summary.json").is_file():
        return None
    summary = read_json(d / "summary.json")
    for key in ("method", "labeled", "seed", "protocol"):
        if key in summary and summary[key] != getattr(cell, key):
            raise UserError(f"{d}: its summary.json has {key} {summary[key]!r}, the cell {cell.id} needs "
                            f"{getattr(cell, key)!r}; move the folder away")
    if not (d / "config.json").is_file():
        raise UserError(f"{d} has summary.json but no config.json, so its settings cannot be checked against the "
                        f"cell {cell.id}; move the folder away")
    config = read_json(d / "config.json")
    stored = config.get("config") if isinstance(config, dict) else None
    if not isinstance(stored, dict):
        raise UserError(f"{d}: its config.json has no 'config' settings; move the folder away")
    # the cell's own settings; device and teacher folder do not define a run (same_run skips them)
    # an imported data set's own patch and strides, as recorded by the run, are the cell's defaults
    imported = config.get("data", {}).get("imported") if isinstance(config.get("data"), dict) else None
    diff = same_run(stored, cell.config(dataset_defaults=run_defaults_from(imported, d / "config.json")).to_json())
    if diff:
        raise UserError(f"{d} is not the cell {cell.id} ({diff}); move it away or use another --runs-dir")
    _check_split(d, config)
    per_case = pd.read_csv(d / "metrics_per_case.csv") if (d / "metrics_per_case.csv").is_file() else pd.DataFrame(
        columns=["case", "post", *METRICS, "empty"])
    legacy = None
    if stored.get("precision") is None:
        from .precision import recorded_precision

        legacy = recorded_precision(stored, summary.get("device"))
    return Run(cell, summary, config, per_case, run_minutes(summary, config), summary.get("gpu"), legacy)


def _check_split(d: Path, config: dict) -> None:
    """The run's recorded split against what its data root's train.list and test.list give now (ssl_bench.data.check_split);
    not checked where that root is not on this machine (the report reads run folders only)."""
    root = config.get("data", {}).get("root") if isinstance(config.get("data"), dict) else None
    if not root or not (Path(root) / "train.list").is_file():
        return
    from .data import LAData, check_split

    check_split(config, LAData(root), f"{d} (config.json)", "restore train.list and test.list, or move the folder away")


def run_minutes(summary: dict, config: dict) -> float:
    """Training (every stage) plus evaluation wall time; a stage 1 adopted via --teacher counts with its own time."""
    timings = summary.get("timings", {})
    seconds = sum(v.get("train_s", 0.0) for k, v in timings.items() if k.startswith("stage"))
    ev = timings.get("eval", {})
    seconds += ev.get("inference_s", 0.0) + ev.get("metrics_s", 0.0)
    teacher = (config.get("config") or {}).get("teacher")
    if teacher and "stage1" not in timings and (Path(teacher) / "summary.json").is_file():
        seconds += read_json(Path(teacher) / "summary.json").get("timings", {}).get("stage1", {}).get("train_s", 0.0)
    return seconds / 60.0


def _selects_last(run: Run) -> bool:
    stages = (run.config.get("method") or {}).get("stages")
    return bool(stages) and all(s.get("literature_selection") is None for s in stages)


def precisions_of(exp: Experiment) -> list[str]:
    return list(dict.fromkeys(c.precision for c in exp.cells))


def collect(exp: Experiment, runs_dir) -> list[Row]:
    """One row per (protocol, precision, labeled, method), in table order: labeled, then the file's method order.

    ``runs_dir``: one folder or several (ssl_bench.track_report: a cell is looked for in each, found in one)."""
    dirs = track_report.runs_dirs(runs_dir)
    folders: dict[str, Path] = {}
    method_order = list(dict.fromkeys(c.method for c in exp.cells))
    pairs = sorted({(c.labeled, c.method) for c in exp.cells}, key=lambda p: (p[0], method_order.index(p[1])))
    protocols = [p for p in PROTOCOLS if any(c.protocol == p for c in exp.cells)]
    cache: dict[str, Run | None] = {}

    def runs_of(cells):
        for c in cells:
            if c.id not in cache:
                where = track_report.folder_of(c, dirs)
                cache[c.id] = load_run(c, where) if where is not None else None
                if where is not None:
                    folders[c.id] = c.run_dir(where)
        return [cache[c.id] for c in cells if cache[c.id] is not None]

    rows = []
    for protocol in protocols:
        for precision in precisions_of(exp):
            for labeled, method in pairs:
                key = (method, labeled, protocol, precision)
                cells = [c for c in exp.cells if (c.method, c.labeled, c.protocol, c.precision) == key]
                note = ""
                if not cells and protocol == "honest":  # a single-stage method's val run trains what honest does
                    val = [c for c in exp.cells
                           if (c.method, c.labeled, c.protocol, c.precision) == (method, labeled, "val", precision)]
                    derived = track_report.honest_from_val(runs_of(val), folders) if val else None
                    if derived:
                        rows.append(Row(protocol, method, labeled, [c.seed for c in val], derived,
                                        track_report.VAL_LAST_NOTE, precision))
                    continue
                if not cells:
                    honest = [c for c in exp.cells
                              if (c.method, c.labeled, c.protocol, c.precision) == (method, labeled, "honest", precision)]
                    if protocol != "literature" or not honest:
                        continue
                    found = runs_of(honest)
                    if found and not all(_selects_last(r) for r in found):
                        continue  # the reference selects on the test set, but the experiment did not ask for it
                    cells, note = honest, FALLBACK_NOTE
                row = Row(protocol, method, labeled, [c.seed for c in cells], runs_of(cells), note, precision)
                computed = {computed_precision(r) for r in row.runs}
                recorded = any(r.legacy_precision is None for r in row.runs)
                # only possible with folders made before precision was recorded; among those alone the table
                # names each folder's precision (legacy_notes) instead, as it always has shown them together
                if len(computed) > 1 and recorded:
                    detail = ", ".join(f"{r.cell.id} {computed_precision(r)}" for r in row.runs)
                    raise UserError(f"the runs of {method} L={labeled} {protocol} ({precision}) computed in different "
                                    f"precisions ({detail}) and cannot be averaged; move the older folders away")
                rows.append(row)
    return rows


def computed_precision(run: Run) -> str:
    """The precision a run recorded or, for a folder made before it was recorded, what it computed."""
    return run.legacy_precision or run.cell.precision


def legacy_notes(rows: list[Row]) -> str:
    """One line naming the runs made before precision was recorded, with what each computed."""
    found = sorted({(run.cell.id, run.legacy_precision) for row in rows for run in row.runs
                    if run.legacy_precision is not None})
    if not found:
        return ""
    parts = []
    for prec in sorted({p for _, p in found}):
        ids = ", ".join(i for i, p in found if p == prec)
        parts.append(f"{ids}: {prec}" + (" (bf16 autocast, the old CUDA fast path)" if prec == "bf16" else ""))
    return ("\nPrecision not recorded (run folders made before it was; docs/methods.md Decision 7), taken from what "
            "they computed: " + "; ".join(parts) + ".\n")


# -- numbers ------------------------------------------------------------------------------------

def metric_stats(row: Row, post: str, metric: str) -> tuple[float, float] | None:
    """Mean and sample std (n−1; nan for one seed) over seeds, in table units (% for Dice/Jaccard)."""
    vals = [r.summary["metrics"][post][metric] for r in row.runs if post in r.summary.get("metrics", {})]
    if not vals:
        return None
    scale = 100.0 if metric in PERCENT else 1.0
    arr = np.array(vals, dtype=np.float64) * scale
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else float("nan")


def last_stats(row: Row, post: str, metric: str) -> tuple[float, float] | None:
    """Like metric_stats, for the last weights a literature run also evaluates (summary "last"); None unless every run has them."""
    vals = [r.summary["last"]["metrics"][post][metric] for r in row.runs
            if post in ((r.summary.get("last") or {}).get("metrics") or {})]
    if not vals or len(vals) != len(row.runs):
        return None
    scale = 100.0 if metric in PERCENT else 1.0
    arr = np.array(vals, dtype=np.float64) * scale
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else float("nan")


def selection_table_rows(rows: list[Row], paper: str | None) -> list[list[str]]:
    """Literature runs: the test-selected checkpoint against the same runs' last weights (Decisions 2)."""
    out = []
    for row in rows:
        if not row.runs or row.note:
            continue
        sel, last = metric_stats(row, row.post, "dice"), last_stats(row, row.post, "dice")
        if last is None:
            continue
        its = sorted({r.summary["checkpoint"]["iteration"] for r in row.runs if "checkpoint" in r.summary})
        out.append([published.display_name(row.method, paper), str(row.labeled), row.precision, str(len(row.runs)),
                    ", ".join(str(i) for i in its), fmt_stats(sel), fmt_stats(last), fmt(sel[0] - last[0], signed=True)])
    return out


SELECTION_HEADER = ["Method", "Labeled", "Precision", "Seeds", "Selected iteration(s)", "Dice selected (%)", "Dice last (%)",
                    "Selected − last"]


def empty_counts(row: Row, post: str) -> tuple[int, int]:
    got = [r.summary["metrics"][post] for r in row.runs if post in r.summary.get("metrics", {})]
    return sum(int(m.get("n_empty", 0)) for m in got), sum(int(m.get("n_cases", 0)) for m in got)


def unlabeled_count(row: Row) -> int:
    if row.method in published.LABELED_ONLY:
        return 0
    for r in row.runs:
        n = (r.config.get("split") or {}).get("n_unlabeled")
        if n is not None:
            return int(n)
    return LA_TRAIN_CASES - row.labeled


def device_label(row: Row) -> str:
    gpus = {r.gpu or "cpu" for r in row.runs}
    return gpus.pop() if len(gpus) == 1 else "mixed"


def fmt(v: float | None, signed: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:+.2f}" if signed else f"{v:.2f}"


def fmt_stats(s: tuple[float, float] | None) -> str:
    if s is None:
        return "–"
    mean, std = s
    return fmt(mean) if math.isnan(std) else f"{mean:.2f} ± {std:.2f}"


def fmt_four(values) -> str:
    return " / ".join(fmt(v) for v in values)


# -- tables ---------------------------------------------------------------------------------------

MAIN_HEADER = ["Method", "Labeled", "Unlabeled", "Protocol", "Precision", "LCC", "Seeds", "Dice (%)", "Jaccard (%)", "95HD (vox)",
               "ASD (vox)", "Paper (§5.1) Dice / Jac / 95HD / ASD", "Ours − paper", "Own paper (§5)", "Empty",
               "Train+eval min (device)"]


#: the main table's columns of published numbers (left out where none can be shown)
PUBLISHED_COLUMNS = (11, 12, 13)


def main_table_rows(rows: list[Row], paper: str | None) -> list[list[str]]:
    hide_own = bool(imported_roots(rows))  # the own-paper figures are LA's too
    out = []
    for row in rows:
        fig = published.paper_figure(paper, row.method, row.labeled)
        own = None if hide_own else published.own_figure(row.method, row.labeled)
        n = len(row.runs)
        seeds = str(n) if n == len(row.planned) else f"{n}/{len(row.planned)}"
        cells = [published.display_name(row.method, paper), str(row.labeled), str(unlabeled_count(row)),
                 row.protocol_label, row.precision]
        if not row.runs:
            cells += ["–", seeds + " (missing)", "missing", "–", "–", "–"]
        else:
            post = row.post
            stats = [metric_stats(row, post, m) for m in METRICS]
            cells += ["yes" if post == "lcc" else "no", seeds] + [fmt_stats(s) for s in stats]
        cells.append(fmt_four(fig.value(m) for m in METRICS) if fig else "–")
        if fig and row.runs:
            cells.append(" / ".join(fmt(s[0] - fig.value(m), signed=True) if s else "–"
                                    for s, m in zip(stats, METRICS)))
        else:
            cells.append("–")
        cells.append(fmt_four(own.value(m) for m in METRICS) if own else "–")
        if row.runs:
            e, total = empty_counts(row, post)
            minutes = sum(r.minutes for r in row.runs)
            cells += [f"{e}/{total}", f"{minutes:.1f} ({device_label(row)})"]
        else:
            cells += ["–", "–"]
        out.append(cells)
    return out


def lcc_table_rows(rows: list[Row], paper: str | None) -> list[list[str]]:
    out = []
    for row in rows:
        cells = [published.display_name(row.method, paper), str(row.labeled), row.precision]
        for metric in ("dice", "hd95"):
            for post in ("raw", "lcc"):
                cells.append(fmt_stats(metric_stats(row, post, metric)) if row.runs else "–")
        for post in ("raw", "lcc"):
            if row.runs:
                e, total = empty_counts(row, post)
                cells.append(f"{e}/{total}")
            else:
                cells.append("–")
        out.append(cells)
    return out


LCC_HEADER = ["Method", "Labeled", "Precision", "Dice raw", "Dice LCC", "95HD raw", "95HD LCC", "Empty raw", "Empty LCC"]


def csv_table(rows: list[Row], paper: str | None) -> pd.DataFrame:
    hide_own = bool(imported_roots(rows))  # the own-paper figures are LA's too
    recs = []
    for row in rows:
        fig = published.paper_figure(paper, row.method, row.labeled)
        own = None if hide_own else published.own_figure(row.method, row.labeled)
        for post in ("raw", "lcc"):
            computed = sorted({computed_precision(r) for r in row.runs})
            rec = {"protocol": row.protocol, "precision": row.precision,
                   "computed_precision": "+".join(computed) if computed else None,
                   "precision_recorded": all(r.legacy_precision is None for r in row.runs) if row.runs else None,
                   "method": row.method, "labeled": row.labeled,
                   "unlabeled": unlabeled_count(row), "post": post, "own_post": post == row.post if row.runs else None,
                   "runs_protocol": ("val" if row.note == track_report.VAL_LAST_NOTE else "honest") if row.note
                   else row.protocol, "n_seeds": len(row.runs), "n_planned": len(row.planned),
                   "seeds": " ".join(str(r.cell.seed) for r in row.runs), "status": _status(row)}
            for m in METRICS:
                s = metric_stats(row, post, m) if row.runs else None
                rec[f"{m}_mean"] = s[0] if s else None
                rec[f"{m}_std"] = s[1] if s else None
                rec[f"paper_{m}"] = fig.value(m) if fig else None
                rec[f"diff_{m}"] = (s[0] - fig.value(m)) if (s and fig) else None
                rec[f"own_{m}"] = own.value(m) if own else None
                last = last_stats(row, post, m) if (row.runs and not row.note) else None
                rec[f"last_{m}_mean"] = last[0] if last else None
            e, total = empty_counts(row, post) if row.runs else (None, None)
            rec.update(n_empty=e, n_cases=total, own_source=own.source if own else None,
                       paper_note=fig.note if fig else None,
                       minutes_total=sum(r.minutes for r in row.runs) if row.runs else None,
                       device=device_label(row) if row.runs else None)
            recs.append(rec)
    df = pd.DataFrame.from_records(recs)
    for col in ("n_empty", "n_cases"):
        df[col] = df[col].astype("Int64")
    return df


def _status(row: Row) -> str:
    if not row.runs:
        return "missing"
    return "complete" if len(row.runs) == len(row.planned) else "partial"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "_": r"\_", "#": r"\#", "$": r"\$", "{": r"\{",
        "}": r"\}", "±": r"$\pm$", "−": r"$-$", "–": "--", "§": r"\S{}", "≥": r"$\geq$"}


def tex_escape(text: str) -> str:
    return "".join(_TEX.get(ch, ch) for ch in text)


def latex_table(header: list[str], rows: list[list[str]], caption: str) -> str:
    cols = "l" + "r" * (len(header) - 1)
    lines = [r"\begin{table}[t]", r"\centering", r"\scriptsize", f"\\caption{{{tex_escape(caption)}}}",
             f"\\begin{{tabular}}{{{cols}}}", r"\hline", " & ".join(tex_escape(h) for h in header) + r" \\", r"\hline"]
    lines += [" & ".join(tex_escape(c) for c in r) + r" \\" for r in rows]
    lines += [r"\hline", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


# -- paired tests ---------------------------------------------------------------------------------

def per_case_dice(row: Row, post: str) -> pd.Series:
    """Per-case Dice averaged over the row's seeds (index: case id)."""
    frames = [r.per_case[r.per_case["post"] == post][["case", "dice"]] for r in row.runs]
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.Series(dtype=float)
    return pd.concat(frames).groupby("case")["dice"].mean()


def wilcoxon_tests(rows: list[Row], reference: str | None) -> pd.DataFrame:
    from scipy.stats import wilcoxon

    recs = []
    if reference is None:
        return pd.DataFrame()
    for ref in (r for r in rows if r.method == reference and r.runs):
        for other in rows:
            if other is ref or not other.runs or \
                    (other.protocol, other.labeled, other.precision) != (ref.protocol, ref.labeled, ref.precision):
                continue  # paired only within one protocol, labeled count and precision
            for post in ("own", "raw", "lcc"):
                a = per_case_dice(ref, ref.post if post == "own" else post)
                b = per_case_dice(other, other.post if post == "own" else post)
                common = sorted(set(a.index) & set(b.index))
                rec = {"protocol": ref.protocol, "precision": ref.precision, "labeled": ref.labeled,
                       "reference": reference, "method": other.method,
                       "post": post, "reference_post": ref.post if post == "own" else post,
                       "method_post": other.post if post == "own" else post, "n_cases": len(common),
                       "reference_dice": float(a[common].mean()) if common else None,
                       "method_dice": float(b[common].mean()) if common else None,
                       "median_diff": float(np.median(a[common].values - b[common].values)) if common else None,
                       "statistic": None, "p_value": None}
                if common:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        res = wilcoxon(a[common].values, b[common].values)
                    rec["statistic"], rec["p_value"] = float(res.statistic), float(res.pvalue)
                recs.append(rec)
    return pd.DataFrame.from_records(recs)


def wilcoxon_markdown(tests: pd.DataFrame, paper: str | None) -> str:
    """One table per precision (pairs never mix precisions)."""
    if tests.empty:
        return "No paired test: the reference method has no complete runs.\n"
    parts = []
    for precision in dict.fromkeys(tests["precision"]):
        own = tests[(tests["post"] == "own") & (tests["precision"] == precision)]
        parts.append(f"Precision {precision}:\n\n" + _wilcoxon_table(own, paper))
    return "\n".join(parts)


def _wilcoxon_table(own: pd.DataFrame, paper: str | None) -> str:
    header = ["Protocol", "Labeled", "Method", "Cases", "Reference Dice (%)", "Method Dice (%)",
              "Median diff (pp)", "W", "p"]
    body = []
    for _, t in own.iterrows():
        body.append([t["protocol"], str(t["labeled"]), published.display_name(t["method"], paper), str(t["n_cases"]),
                     fmt(100 * t["reference_dice"]) if t["n_cases"] else "–",
                     fmt(100 * t["method_dice"]) if t["n_cases"] else "–",
                     fmt(100 * t["median_diff"], signed=True) if t["n_cases"] else "–",
                     fmt(t["statistic"]) if t["n_cases"] else "–",
                     f"{t['p_value']:.4g}" if t["n_cases"] else "–"])
    return markdown_table(header, body)


# -- occlusion (Fig. 3) ------------------------------------------------------------------------------

def occlusion_frame(exp: Experiment, source: Path) -> pd.DataFrame:
    """The rows of an ``ssl-bench occlusion`` per-case CSV that belong to the experiment's cells.

    Kept: the experiment's variant, its cells' (method, labeled, seed, protocol), and each run's own
    post-processing (the ``paper_post`` flag the occlusion command writes)."""
    path = Path(source)
    if path.is_dir() and not (path / OCCLUSION_CSV).is_file():  # one `ssl-bench occlusion --out` folder per run
        parts = sorted(path.glob(f"*/{OCCLUSION_CSV}"))
        return pd.concat([occlusion_frame(exp, p) for p in parts], ignore_index=True) if parts else pd.DataFrame()
    if path.is_dir():
        path = path / OCCLUSION_CSV
    if not path.is_file():
        return pd.DataFrame()
    try:
        df = pd.read_csv(path)
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise UserError(f"{path} is damaged ({type(exc).__name__}); rerun `ssl-bench occlusion`") from None
    need = {"method", "labeled", "ratio", "dice"}
    if not need <= set(df.columns):
        raise UserError(f"{path}: an occlusion CSV needs the columns {', '.join(sorted(need))} "
                        f"(it has {', '.join(df.columns)})")
    if "variant" in df.columns and exp.occlusion is not None:
        df = df[df["variant"].astype(str) == exp.occlusion.variant]
    precisions = precisions_of(exp)
    if "precision" not in df.columns:
        if len(precisions) > 1:
            raise UserError(f"{path}: the experiment has cells of several precisions ({', '.join(precisions)}) but the "
                            "occlusion CSV has no precision column, so its rows cannot be told apart")
        df = df.assign(precision=precisions[0])
    for col, default in (("seed", None), ("protocol", "honest"), ("repeat", 0)):
        if col not in df.columns:
            df = df.assign(**{col: default})
    wanted = {(c.method, c.labeled, c.protocol, c.precision) for c in exp.cells}
    seeds = {(c.method, c.labeled, c.protocol, c.precision, c.seed) for c in exp.cells}
    keep = [(m, int(n), p, q) in wanted and (s is None or pd.isna(s) or (m, int(n), p, q, int(s)) in seeds)
            for m, n, p, q, s in zip(df["method"], df["labeled"], df["protocol"], df["precision"].astype(str),
                                     df["seed"])]
    df = df[keep]
    if "paper_post" in df.columns:
        df = df[df["paper_post"].astype(str).str.lower().isin(("true", "1"))]
    return df.reset_index(drop=True)


def occlusion_summary(df: pd.DataFrame) -> pd.DataFrame:
    """Per (protocol, precision, method, labeled, ratio): mean ± std over repeats of the seed-averaged case-mean Dice."""
    if "precision" not in df.columns:
        df = df.assign(precision=DEFAULT_PRECISION)
    key = ["protocol", "precision", "method", "labeled", "ratio"]
    per_rep = df.groupby(key + ["repeat", "seed"])["dice"].mean().reset_index()
    per_rep = per_rep.groupby(key + ["repeat"])["dice"].agg(["mean", "count"])
    per_rep = per_rep.reset_index().rename(columns={"count": "n_seeds", "mean": "dice"})
    out = per_rep.groupby(key).agg(
        dice_mean=("dice", "mean"), dice_std=("dice", lambda s: s.std(ddof=1) if len(s) > 1 else float("nan")),
        n_repeats=("dice", "size"), n_seeds=("n_seeds", "max")).reset_index()
    return out


# -- plots ----------------------------------------------------------------------------------------

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="paper")
    return plt, sns


def save_figure(fig, stem: Path) -> list[Path]:
    """PNG and PDF, each written to a temporary file in the same folder and renamed into place."""
    written = []
    for ext in ("png", "pdf"):
        path = stem.with_suffix("." + ext)
        atomic_savefig(fig, path, dpi=150)
        written.append(path)
    return written


def plot_per_case(rows: list[Row], paper: str | None, stem: Path) -> list[Path]:
    recs = []
    for row in (r for r in rows if r.runs):
        for case, dice in per_case_dice(row, row.post).items():
            recs.append({"method": published.display_name(row.method, paper), "labeled": row.labeled,
                         "case": case, "Dice (%)": 100 * dice})
    if not recs:
        return []
    plt, sns = _plt()
    df = pd.DataFrame.from_records(recs)
    labeled = sorted(df["labeled"].unique())
    fig, axes = plt.subplots(1, len(labeled), figsize=(max(4.0, 1.1 * df["method"].nunique()) * len(labeled), 3.6),
                             squeeze=False, sharey=True)
    for ax, n in zip(axes[0], labeled):
        sub = df[df["labeled"] == n]
        with warnings.catch_warnings():  # seaborn 0.13 passes matplotlib's deprecated `vert`
            warnings.simplefilter("ignore", DeprecationWarning)
            sns.boxplot(data=sub, x="method", y="Dice (%)", ax=ax, color="#cfd8e6", fliersize=0)
        sns.stripplot(data=sub, x="method", y="Dice (%)", ax=ax, color="#1f3b73", size=3, jitter=0.2)
        ax.set_title(f"{n} labeled ({rows[0].protocol}, {rows[0].precision})")
        ax.set_xlabel("")
        ax.tick_params(axis="x", rotation=30)
    fig.suptitle("Per-case Dice (mean over seeds, each method's own post-processing)")
    written = save_figure(fig, stem)
    plt.close(fig)
    return written


def plot_ablation(rows: list[Row], paper: str | None, stem: Path) -> list[Path]:
    recs = [{"variant": published.display_name(row.method, paper), "labeled": row.labeled,
             "Dice (%)": 100 * r.summary["metrics"][row.post]["dice"]} for row in rows for r in row.runs]
    if not recs:
        return []
    plt, sns = _plt()
    df = pd.DataFrame.from_records(recs)
    order = list(dict.fromkeys(published.display_name(r.method, paper) for r in rows))
    labeled = sorted({r.labeled for r in rows})
    fig, axes = plt.subplots(1, len(labeled), figsize=(4.5 * len(labeled), 3.6), squeeze=False, sharey=True)
    for ax, n in zip(axes[0], labeled):
        sub = df[df["labeled"] == n]
        sns.barplot(data=sub, x="variant", y="Dice (%)", order=order, ax=ax, errorbar="sd", color="#7fa7d9", capsize=0.2)
        lo = min(sub["Dice (%)"].min() if len(sub) else 80.0, 80.0)
        for row in (r for r in rows if r.labeled == n):
            x = order.index(published.display_name(row.method, paper))
            fig_p = published.paper_figure(paper, row.method, n)
            if fig_p is not None:
                ax.plot(x, fig_p.dice, "kD", markersize=5)
            if not row.runs:
                ax.text(x, lo, "missing", ha="center", va="bottom", fontsize=8, color="#a00000")
        ax.set_title(f"{n} labeled ({rows[0].protocol}, {rows[0].precision}); bars: ours, mean ± sd over seeds; ◆ paper")
        ax.set_xlabel("")
        ax.tick_params(axis="x", rotation=30)
        ax.set_ylim(lo - 2, 100)
    written = save_figure(fig, stem)
    plt.close(fig)
    return written


def plot_fig3(summary: pd.DataFrame, paper: str | None, variant: str, stem: Path) -> list[Path]:
    plt, sns = _plt()
    labeled = sorted(summary["labeled"].unique())
    fig, axes = plt.subplots(1, len(labeled), figsize=(4.8 * len(labeled), 3.6), squeeze=False, sharey=True)
    for ax, n in zip(axes[0], labeled):
        sub = summary[summary["labeled"] == n]
        several = summary["precision"].nunique() > 1 if "precision" in summary.columns else False
        keys = ["method", "precision"] if "precision" in summary.columns else ["method"]
        for key, g in sub.groupby(keys, sort=False):
            method = key[0] if isinstance(key, tuple) else key
            label = published.display_name(method, paper) + (f" ({key[1]})" if several else "")
            g = g.sort_values("ratio")
            ax.errorbar(100 * g["ratio"], 100 * g["dice_mean"], yerr=100 * g["dice_std"].fillna(0), marker="o",
                        markersize=3, capsize=2, label=label)
        ax.set_title(f"{n} labeled")
        ax.set_xlabel("cube side / volume side (%)" if variant == "A" else "occluded proportion of the volume (%)")
        ax.set_ylabel("Dice (%)")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle("Dice under random cuboid occlusion (mean ± sd over repeats)")
    written = save_figure(fig, stem)
    plt.close(fig)
    return written


# -- the report -----------------------------------------------------------------------------------

def report_methods() -> set[str]:
    """Names an experiment may use in a report: the registry plus the planned ones (no training here)."""
    from .method import registry

    return set(PLANNED_METHODS) | set(registry())


def imported_roots(rows: list[Row]) -> list[str]:
    """Data roots of the runs trained on an imported data set (config.json ``data.imported`` set), sorted."""
    roots = set()
    for row in rows:
        for run in row.runs:
            data = run.config.get("data") if isinstance(run.config.get("data"), dict) else {}
            if data.get("imported") is not None:
                roots.add(str(data.get("root")))
    return sorted(roots)


UNIT_LABEL = {"voxel": ("vox", "voxels"), "mm": ("mm", "millimetres")}


def distance_units(rows: list[Row]) -> str:
    """The one unit of every run's 95HD/ASD (summary.json ``units``; older folders: voxels); mixed is refused."""
    units = sorted({r.summary.get("units") or "voxel" for row in rows for r in row.runs})
    if len(units) > 1:
        raise UserError(f"the runs of this experiment report 95HD/ASD in different units ({', '.join(units)}); "
                        f"give every cell the same `units` or report them separately")
    return units[0] if units else "voxel"


def main_header(units: str = "voxel") -> list[str]:
    short = UNIT_LABEL[units][0]
    return [h.replace("(vox)", f"({short})") for h in MAIN_HEADER]


def write_report(experiment, runs_dir="runs", out: Path | None = None, occlusion: Path | None = None,
                 echo=click.echo) -> dict:
    exp = experiment if isinstance(experiment, Experiment) else load_experiment(experiment, methods=report_methods())
    dirs = track_report.runs_dirs(runs_dir)
    runs_dir = dirs[0] if len(dirs) == 1 else dirs
    out = Path(out if out is not None else Path("results") / exp.name).resolve()
    exp = track_report.with_user_runs(exp, dirs)
    rows = collect(exp, runs_dir)
    imported = imported_roots(rows)
    if imported and exp.paper:  # the published numbers are LA's: never set beside another data set's runs
        echo(f"runs on an imported data set ({imported[0]}): the published LA numbers are not shown")
        exp = dataclasses.replace(exp, paper=None)
    protocols = list(dict.fromkeys(r.protocol for r in rows))
    precisions = precisions_of(exp)
    units = distance_units(rows)
    header = main_header(units)
    written: dict[str, Path] = {}

    csv_df = csv_table(rows, exp.paper)
    csv_df["distance_units"] = units
    atomic_write_text(out / "table.csv", csv_df.to_csv(index=False))
    written["table.csv"] = out / "table.csv"
    tests = wilcoxon_tests(rows, exp.compare_to)
    atomic_write_text(out / "wilcoxon.csv", tests.to_csv(index=False))
    written["wilcoxon.csv"] = out / "wilcoxon.csv"

    md = [f"# {exp.title}\n", ("" if not exp.description else f"\n{exp.description}\n\n"),
          f"Generated by `ssl-bench report {exp.name}` from the run folders in "
          f"{', '.join(f'`{_shown(d)}`' for d in dirs)} "
          f"(experiment file `{exp.path.name}`). Dice and Jaccard in %, 95HD and ASD in {UNIT_LABEL[units][1]}; mean ± sample std "
          "over seeds under each method's own post-processing (LCC column, docs/methods.md §2.2). "
          + ("Paper: the OMF paper's own table (§5.1); ours − paper in the same units; own paper: the method's "
             "own publication (§5). " if exp.paper else "")
          + "Empty: empty predictions / evaluated cases over all seeds. Train+eval min: training + evaluation wall time "
          "of the cell's runs together (a reused stage 1 included), on the device named. Missing cells are shown as "
          "missing. One table per protocol and precision (docs/methods.md Decision 7; `table.csv` has a precision "
          "column): runs of different precision are never averaged or paired.\n"]
    if imported:
        md.append(f"\nRuns trained on an imported data set ({', '.join(imported)}): the published numbers are LA's and "
                  "are not shown.\n")
    tex = []
    for protocol, precision in ((pr, pc) for pr in protocols for pc in precisions):
        prow = [r for r in rows if r.protocol == protocol and r.precision == precision]
        if not prow:
            continue
        suffix = "" if len(precisions) == 1 else f"_{precision}"
        body = main_table_rows(prow, exp.paper)
        shown_header = header
        if not exp.paper and imported:  # no published number can be shown: no column for one either
            keep = [i for i, h in enumerate(header) if i not in PUBLISHED_COLUMNS]
            shown_header, body = [header[i] for i in keep], [[r[i] for i in keep] for r in body]
        md += [f"\n## Protocol: {protocol} · precision {precision}\n\n", markdown_table(shown_header, body)]
        md.append(legacy_notes(prow))
        if any(r.note == FALLBACK_NOTE for r in prow):
            md.append("\n" + FALLBACK_TEXT + "\n")
        if any(r.note == track_report.VAL_LAST_NOTE for r in prow):
            md.append("\n" + track_report.VAL_LAST_TEXT + "\n")
        notes = sorted({f"{published.display_name(r.method, exp.paper)} {r.labeled}: {f.note}"
                        for r in prow for f in [published.paper_figure(exp.paper, r.method, r.labeled)]
                        if f is not None and f.note})
        if notes:
            md.append("\nNotes on the paper's numbers: " + "; ".join(notes) + ".\n")
        md += [f"\nWithout and with largest-connected-component post-processing ({protocol}) at precision {precision}:\n\n",
               markdown_table(LCC_HEADER, lcc_table_rows(prow, exp.paper))]
        selection = selection_table_rows(prow, exp.paper) if protocol == "literature" else []
        if selection:
            md += ["\nThe same literature runs at their test-selected checkpoint and at their last weights "
                   "(how much the selection on the test set adds; a second stage still starts from the first stage's "
                   "selection):\n\n", markdown_table(SELECTION_HEADER, selection)]
        tex.append(latex_table(shown_header, body, f"{exp.title}: protocol {protocol}, precision {precision}"))
        plots = [(f"dice_per_case_{protocol}{suffix}", plot_per_case)]
        if exp.paper == "table2":
            plots.append((f"ablation_{protocol}{suffix}", plot_ablation))
        for stem, plot in plots:
            for p in plot(prow, exp.paper, out / stem):
                written[p.name] = p
    from .selection_report import SELECTION_HEADER as SEL_HEADER, selection_section

    section, sel_body, sel_csv = selection_section(rows, exp.paper)  # honest, literature and val side by side
    md.append(section)
    if sel_body:
        tex.append(latex_table(SEL_HEADER, sel_body, f"{exp.title}: last, val-selected and best-on-test Dice (%)"))
    atomic_write_text(out / "selection.csv", sel_csv.to_csv(index=False))
    written["selection.csv"] = out / "selection.csv"
    md += [f"\n## Paired Wilcoxon signed-rank tests: {published.display_name(exp.compare_to or '-', exp.paper)} "
           "against every other method\n\nPer-case Dice averaged over seeds, each method's own post-processing, "
           "two-sided (scipy.stats.wilcoxon); `wilcoxon.csv` also has both methods raw and both with LCC.\n\n",
           wilcoxon_markdown(tests, exp.paper) if exp.compare_to else "No reference method (compare_to) set.\n"]
    if exp.order_against:
        order = track_report.ordering_frame(rows, tests, exp.order_against)
        atomic_write_text(out / "ordering.csv", order.to_csv(index=False))
        written["ordering.csv"] = out / "ordering.csv"
        md.append(track_report.ordering_markdown(order, exp.order_against, exp.compare_to))
        md.append(track_report.budget_markdown(rows))
    if exp.occlusion is not None:
        source = Path(occlusion).resolve() if occlusion is not None else out / "occlusion"
        md.append(occlusion_section(exp, source, out, written))
    figures = sorted(n for n in written if n.endswith(".png"))
    if figures:
        md.append("\n## Figures\n\n" + "".join(f"![{n}]({n})\n" for n in figures))
    atomic_write_text(out / "table.md", "".join(md))
    atomic_write_text(out / "table.tex", "\n".join(tex))
    written["table.md"], written["table.tex"] = out / "table.md", out / "table.tex"
    if exp.name in REPRODUCTION_EXPERIMENTS and exp.paper:
        sections = []
        for name in REPRODUCTION_EXPERIMENTS:
            other = exp if name == exp.name else _maybe_load(name)
            if other is not None:
                sections.append((other, collect(other, runs_dir)))
        path = out.parent / "REPRODUCTION.md"
        atomic_write_text(path, reproduction_markdown(sections, runs_dir))
        written["REPRODUCTION.md"] = path
    missing = sum(1 for r in rows if not r.runs)
    echo(f"report {exp.name}: {len(rows)} rows ({missing} missing) -> {out}")
    return written


def _shown(path: Path) -> str:
    """A folder as the report names it: relative to the working folder where it lies below it (the same text
    wherever the repository is checked out), else absolute."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _maybe_load(name: str) -> Experiment | None:
    try:
        return load_experiment(name, methods=report_methods())
    except UserError:
        return None


def occlusion_section(exp: Experiment, source: Path, out: Path, written: dict) -> str:
    occ = exp.occlusion
    head = (f"\n## Occlusion (Fig. 3): variant {occ.variant}, ratios {', '.join(f'{r:g}' for r in occ.ratios)}, "
            f"{occ.repeats} repeats\n\n")
    df = occlusion_frame(exp, source)
    if df.empty:
        return head + (f"No occlusion results for these runs in `{source}` yet: run `ssl-bench occlusion` on the "
                       f"experiment's run folders with `--out {source}` (see experiments/{exp.name}.toml).\n")
    summary = occlusion_summary(df)
    written["occlusion.csv"] = out / "occlusion.csv"
    order = list(dict.fromkeys(c.method for c in exp.cells))
    summary = summary.sort_values(["protocol", "labeled", "ratio"], kind="stable")
    summary = summary.iloc[np.argsort([order.index(m) for m in summary["method"]], kind="stable")]
    summary = summary.reset_index(drop=True)
    atomic_write_text(out / "occlusion.csv", summary.to_csv(index=False))
    for p in plot_fig3(summary, exp.paper, occ.variant, out / "fig3"):
        written[p.name] = p
    ratios = sorted(summary["ratio"].unique())
    header = ["Method", "Labeled", "Seeds"] + [f"{100 * r:g}%" for r in ratios]
    tables = []
    for precision in dict.fromkeys(summary["precision"]):
        body = []
        sub = summary[summary["precision"] == precision]
        for (method, labeled), g in sub.groupby(["method", "labeled"], sort=False):
            by = {r: (100 * m, 100 * s) for r, m, s in zip(g["ratio"], g["dice_mean"], g["dice_std"])}
            body.append([published.display_name(method, exp.paper), str(labeled), str(int(g["n_seeds"].max()))]
                        + [fmt_stats(by.get(r)) for r in ratios])
        tables.append(f"Precision {precision}:\n\n" + markdown_table(header, body))
    return head + "Dice (%) mean ± std over repeats (case mean per repeat, averaged over seeds).\n\n" + \
        "\n".join(tables)


def reproduction_markdown(sections: list[tuple[Experiment, list[Row]]], runs_dir: Path | None = None) -> str:
    """REPRODUCTION.md: for every row of Tables 1–2, the paper's numbers beside ours, by protocol and seed count."""
    lines = ["# Reproduction of the OMF paper's Tables 1–2\n\n",
             "Paper = the OMF paper (docs/methods.md §5.1). Ours = mean over seeds of Dice % / Jaccard % / 95HD / ASD "
             "(voxels) under the method's own post-processing (LCC column). `honest` evaluates the last checkpoint; "
             "`literature` repeats the reference's best-on-test selection (Decisions 2). Regenerated by "
             "`ssl-bench report table1` or `table2`" + (f" from `{runs_dir}`" if runs_dir else "") + ".\n"]
    for exp, all_rows in sections:
        for precision in dict.fromkeys(r.precision for r in all_rows):
            rows = [r for r in all_rows if r.precision == precision]
            lines.append(f"\n## {exp.title} · precision {precision}\n\n")
            header = ["Method", "Labeled", "Paper Dice / Jac / 95HD / ASD", "Protocol", "Seeds", "LCC",
                      "Ours Dice / Jac / 95HD / ASD", "Ours − paper (Dice)"]
            body = []
            pairs = list(dict.fromkeys((r.labeled, r.method) for r in rows))
            for labeled, method in pairs:
                fig = published.paper_figure(exp.paper, method, labeled)
                for row in (r for r in rows if (r.labeled, r.method) == (labeled, method)):
                    n = f"{len(row.runs)}/{len(row.planned)}"
                    paper_txt = fmt_four(fig.value(m) for m in METRICS) if fig else "–"
                    if row.runs:
                        means = [metric_stats(row, row.post, m)[0] for m in METRICS]
                        ours = fmt_four(means)
                        diff = fmt(means[0] - fig.dice, signed=True) if fig else "–"
                        lcc = "yes" if row.post == "lcc" else "no"
                    else:
                        ours, diff, lcc = "missing", "–", "–"
                    body.append([published.display_name(method, exp.paper), str(labeled), paper_txt, row.protocol_label,
                                 n, lcc, ours, diff])
            lines.append(markdown_table(header, body))
            lines.append(legacy_notes(rows))
    return "".join(lines)


@click.command("report")
@click.argument("experiment")
@click.option("--runs-dir", type=click.Path(path_type=Path), multiple=True, default=(Path("runs"),), show_default=True,
              help="where the run folders live (repeatable: the experiment's cells are looked for in each; the second "
                   "and later may also hold your own runs of other methods, trained with the experiment's settings)")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="output folder (default results/<experiment>)")
@click.option("--occlusion", type=click.Path(path_type=Path), default=None,
              help=f"occlusion results (a `ssl-bench occlusion --out` folder or its {OCCLUSION_CSV}) for an experiment "
                   "with an [occlusion] section (default: <out>/occlusion)")
def report_command(experiment, runs_dir, out, occlusion):
    """Tables (Markdown, LaTeX, CSV), paired tests and plots for EXPERIMENT from its run folders."""
    write_report(experiment, list(runs_dir), out, occlusion)
