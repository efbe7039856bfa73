"""`ssl-bench report EXPERIMENT`: tables, tests and plots from run folders only.

The report never trains or evaluates and can be rerun at any time. Its parts:

- ssl_bench/report_rows.py reads each cell's run folder into rows (a finished folder that is not its cell, or a
  damaged record, is refused in one line) and computes every number: mean ± sample std (n−1) over seeds, empty
  counts, minutes, the paired Wilcoxon tests, the method ordering and the Fig. 3 table;
- ssl_bench/report_format.py formats numbers and tables (Markdown, LaTeX);
- ssl_bench/selection_report.py (the model-selection section) and ssl_bench/track_report.py (a reduced-scale
  track's runs and ordering page) add their sections;
- this module lays the tables out, draws the plots and writes everything (:func:`write_report`).

A cell without ``summary.json`` is missing and shown as missing, a row with fewer finished seeds than planned as
partial; nothing is filled in. A report with no finished cell at all is refused (run ``ssl-bench sweep`` first).
Precision (docs/methods.md Decision 7) is part of every row's identity: the tables come one per protocol and
precision (the CSVs have a ``precision`` column), so runs of different precision are never averaged or paired; a
run folder made before precision was recorded is named below its table with what it computed.

What it writes, only inside its output folder (default ``results/<experiment>/``), atomically, holding the
folder's one-writer lock (``.lock``: a second report on the same folder is refused):

- ``table.md``, ``table.tex``, ``table.csv``: one table per protocol and precision. Each row is a (method,
  labeled) pair with mean ± std over seeds of Dice/Jaccard (%) and 95HD/ASD under the method's own
  post-processing (Decisions 3; the LCC column says which), the paper's numbers (docs/methods.md §5.1) and
  ours − paper, the method's own paper figure (§5) where it has one, seed count, empty predictions, and
  training+evaluation minutes. The CSV has every number, for both post-processings. A second Markdown table
  gives Dice and 95HD without and with LCC.
- ``selection.csv`` and a "Model selection" section (ssl_bench/selection_report.py).
- ``wilcoxon.csv``: paired per-case Wilcoxon signed-rank tests (two-sided) of the reference method
  (``compare_to``) against every other method at the same labeled count, protocol and precision; per-case Dice
  is first averaged over seeds. Posts: "own", "raw" and "lcc". Its header is there when nothing is paired.
- ``ordering.csv`` and the ordering page where the experiment sets ``order_against`` (ssl_bench/track_report.py).
- ``dice_per_case_<protocol>.png/pdf``; ``ablation_<protocol>.png/pdf`` for Table 2; ``fig3.png/pdf`` and
  ``occlusion.csv`` (ssl_bench.report_rows.fig3_table, drawn by ssl_bench.occlusion_plots.draw_fig3, as
  ``ssl-bench occlusion`` does) when ``ssl-bench occlusion`` results exist for the experiment's runs.
- For Tables 1–2, ``REPRODUCTION.md``: paper vs ours for every row of both tables.
"""
from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import click
import pandas as pd

from . import published, track_report
from .curves import draw_curves, load_curves
from .errors import UserError
from .experiments import PLANNED_METHODS, Experiment, load_experiment
from .report_format import fmt, fmt_four, fmt_stats, latex_table, markdown_table
from .report_rows import (FALLBACK_NOTE, METRICS, OCCLUSION_CSV, Row, collect, computed_precision, device_label,
                          distance_units, empty_counts, fig3_table, imported_roots, last_stats, metric_stats,
                          occlusion_frame, ordering_frame, per_case_dice, precisions_of, row_status, unlabeled_count,
                          wilcoxon_tests)
from .runs import atomic_savefig, atomic_write_text, lock_folder
from .selection_report import SELECTION_HEADER as SEL_HEADER, selection_section

REPRODUCTION_EXPERIMENTS = ("table1", "table2")
REPRODUCTION = "REPRODUCTION.md"
FALLBACK_TEXT = ("literature (= honest): the method's reference evaluates the last checkpoint (§2.4), so the "
                 "literature protocol trains exactly what honest trains; these rows show the honest runs.")


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
            cells += ["yes" if post == "lcc" else "no", seeds + (" (partial)" if n < len(row.planned) else "")]
            cells += [fmt_stats(s) for s in stats]
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
                   "seeds": " ".join(str(r.cell.seed) for r in row.runs), "status": row_status(row)}
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


# -- paired tests ---------------------------------------------------------------------------------

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


# -- the report -----------------------------------------------------------------------------------

def report_methods() -> set[str]:
    """Names an experiment may use in a report: the registry plus the planned ones (no training here)."""
    from .method import registry

    return set(PLANNED_METHODS) | set(registry())


UNIT_LABEL = {"voxel": ("vox", "voxels"), "mm": ("mm", "millimetres")}


def main_header(units: str = "voxel") -> list[str]:
    short = UNIT_LABEL[units][0]
    return [h.replace("(vox)", f"({short})") for h in MAIN_HEADER]


def write_report(experiment, runs_dir="runs", out: Path | None = None, occlusion: Path | None = None,
                 echo=click.echo) -> dict:
    """Read every cell, then write the report into ``out`` only, holding its lock; returns {file name: path}.

    Everything that can refuse (the experiment, a run folder, no finished cell, mixed units, a damaged occlusion
    CSV) is read before the output folder is created or anything in it is written."""
    exp = experiment if isinstance(experiment, Experiment) else load_experiment(experiment, methods=report_methods())
    dirs = track_report.runs_dirs(runs_dir)
    runs_dir = dirs[0] if len(dirs) == 1 else dirs
    out = Path(out if out is not None else Path("results") / exp.name).resolve()
    exp = track_report.with_user_runs(exp, dirs)
    rows = collect(exp, runs_dir)
    if not any(r.runs for r in rows):
        raise UserError(f"no finished run of the {exp.name} experiment in {', '.join(str(d) for d in dirs)}: run "
                        f"`ssl-bench sweep {exp.name} --runs-dir {dirs[0]}` first")
    imported = imported_roots(rows)
    if imported and exp.paper:  # the published numbers are LA's: never set beside another data set's runs
        echo(f"runs on an imported data set ({imported[0]}): the published LA numbers are not shown")
        exp = dataclasses.replace(exp, paper=None)
    units = distance_units(rows)
    tests = wilcoxon_tests(rows, exp.compare_to)
    # a track's re-run records and training curves are read here too, before anything is written
    reruns = track_report.reproductions(dirs) if exp.order_against else {}
    curves = {stem: [load_curves(d) for d in folders]
              for stem, folders in track_report.curve_runs(rows, dirs).items()} if exp.order_against else {}
    occlusion_source = occlusion_rows = None
    if exp.occlusion is not None:
        occlusion_source = Path(occlusion).resolve() if occlusion is not None else out / "occlusion"
        occlusion_rows = occlusion_frame(exp, occlusion_source)
    sections = []
    if exp.name in REPRODUCTION_EXPERIMENTS and exp.paper:
        for name in REPRODUCTION_EXPERIMENTS:
            other = exp if name == exp.name else _maybe_load(name)
            if other is not None:
                sections.append((other, collect(other, runs_dir)))
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the output folder {out} ({exc.strerror or exc})") from None
    with lock_folder(out, busy=f"{out} is being written by another `ssl-bench report`"):
        written, md, tex = _write_tables(exp, rows, dirs, out, units, tests, imported, reruns, curves)
        if exp.occlusion is not None:
            md.append(occlusion_section(exp, occlusion_rows, occlusion_source, out, written))
        figures = sorted(n for n in written if n.endswith(".png"))
        if figures:
            md.append("\n## Figures\n\n" + "".join(f"![{n}]({n})\n" for n in figures))
        atomic_write_text(out / "table.md", "".join(md))
        atomic_write_text(out / "table.tex", "\n".join(tex))
        written["table.md"], written["table.tex"] = out / "table.md", out / "table.tex"
        if sections:
            atomic_write_text(out / REPRODUCTION, reproduction_markdown(sections, runs_dir))
            written[REPRODUCTION] = out / REPRODUCTION
    missing = sum(1 for r in rows if not r.runs)
    echo(f"report {exp.name}: {len(rows)} rows ({missing} missing) -> {out}")
    return written


def _write_tables(exp: Experiment, rows: list[Row], dirs: list[Path], out: Path, units: str, tests: pd.DataFrame,
                  imported: list[str], reruns: dict[str, dict], curves: dict[str, list[dict]]
                  ) -> tuple[dict, list[str], list[str]]:
    """The CSVs and plots into ``out``; returns what it wrote and table.md's and table.tex's parts so far.
    ``reruns``: the runs re-trained by scripts/reproduce_cell.py --save (track_report.reproductions); ``curves``:
    {file stem: the runs' curves} to draw (track_report.curve_runs, read by curves.load_curves)."""
    protocols = list(dict.fromkeys(r.protocol for r in rows))
    precisions = precisions_of(exp)
    header = main_header(units)
    written: dict[str, Path] = {}

    csv_df = csv_table(rows, exp.paper)
    csv_df["distance_units"] = units
    atomic_write_text(out / "table.csv", csv_df.to_csv(index=False))
    written["table.csv"] = out / "table.csv"
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
          "column): runs of different precision are never averaged or paired.\n", partial_note(rows, exp.name)]
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
        order = ordering_frame(rows, tests, exp.order_against)
        atomic_write_text(out / "ordering.csv", order.to_csv(index=False))
        written["ordering.csv"] = out / "ordering.csv"
        md.append(track_report.ordering_markdown(order, exp.order_against, exp.compare_to))
        md.append(track_report.budget_markdown(rows, exp, reruns))
        for stem, runs in curves.items():
            for path in draw_curves(runs, out / stem):
                written[path.name] = path
    return written, md, tex


def partial_note(rows: list[Row], name: str) -> str:
    """One paragraph under the title where some planned run has not finished (nothing where all have)."""
    status = [row_status(r) for r in rows]
    if all(s == "complete" for s in status):
        return ""
    return (f"\n**Partial results:** {status.count('complete')} of {len(rows)} rows are complete, "
            f"{status.count('partial')} partial (fewer finished seeds than planned, \"n/N (partial)\" in the Seeds "
            f"column: their numbers are over the finished seeds only) and {status.count('missing')} missing. "
            f"`ssl-bench sweep {name}` runs the rest.\n")


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


def occlusion_section(exp: Experiment, df: pd.DataFrame, source: Path, out: Path, written: dict) -> str:
    """Fig. 3 from the experiment's occlusion rows (report_rows.occlusion_frame): occlusion.csv, fig3.png/pdf and a
    table, all from report_rows.fig3_table, as ``ssl-bench occlusion`` draws it."""
    from .occlusion_plots import draw_fig3

    occ = exp.occlusion
    head = (f"\n## Occlusion (Fig. 3): variant {occ.variant}, ratios {', '.join(f'{r:g}' for r in occ.ratios)}, "
            f"{occ.repeats} repeats\n\n")
    if df.empty:
        return head + (f"No occlusion results for these runs in `{source}` yet: run `ssl-bench occlusion` on the "
                       f"experiment's run folders with `--out {source}` (see experiments/{exp.name}.toml).\n")
    summary = fig3_table(df, list(dict.fromkeys(c.method for c in exp.cells)))
    written["occlusion.csv"] = out / "occlusion.csv"
    atomic_write_text(out / "occlusion.csv", summary.to_csv(index=False))
    for p in draw_fig3(summary, occ.variant, out / "fig3", exp.paper):
        written[p.name] = p
    ratios = sorted(summary["ratio"].unique())
    header = ["Method", "Labeled", "Protocol", "Seeds"] + [f"{100 * r:g}%" for r in ratios]
    tables = []
    for precision in dict.fromkeys(summary["precision"]):
        body = []
        sub = summary[summary["precision"] == precision]
        for (method, labeled, protocol), g in sub.groupby(["method", "labeled", "protocol"], sort=False):
            by = {r: (100 * m, 100 * s) for r, m, s in zip(g["ratio"], g["dice_mean"], g["dice_std"])}
            body.append([published.display_name(method, exp.paper), str(labeled), protocol,
                         str(int(g["n_seeds"].max()))] + [fmt_stats(by.get(r)) for r in ratios])
        tables.append(f"Precision {precision}:\n\n" + markdown_table(header, body))
    return head + "Dice (%) mean ± std over repeats (case mean per repeat, averaged over seeds), from the occlusion " \
        f"results in `{_shown(source)}`.\n\n" + \
        "\n".join(tables)


def reproduction_markdown(sections: list[tuple[Experiment, list[Row]]], runs_dir: Path | None = None) -> str:
    """REPRODUCTION.md: for every row of Tables 1–2, the paper's numbers beside ours, by protocol and seed count.
    ``runs_dir``: the --runs-dir folder, or the list of them."""
    dirs = [] if runs_dir is None else [runs_dir] if isinstance(runs_dir, (str, Path)) else list(runs_dir)
    lines = ["# Reproduction of the OMF paper's Tables 1–2\n\n",
             "Paper = the OMF paper (docs/methods.md §5.1). Ours = mean over seeds of Dice % / Jaccard % / 95HD / ASD "
             "(voxels) under the method's own post-processing (LCC column). `honest` evaluates the last checkpoint; "
             "`literature` repeats the reference's best-on-test selection (Decisions 2). Regenerated by "
             "`ssl-bench report table1` or `table2`" + (" from " + ", ".join(f"`{d}`" for d in dirs) if dirs else "")
             + ".\n"]
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
