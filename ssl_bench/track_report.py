"""What the report adds for a reduced-scale track such as the CPU track (experiments/cpu.toml, Decision 10).

- **Your runs beside the committed ones.** ``ssl-bench report cpu --runs-dir results/cpu/runs --runs-dir runs``:
  the first folder holds the experiment's cells; every later one may also hold runs of other methods (a user's
  own, trained with the experiment's profile and settings). Each such run folder becomes a cell of the report;
  one whose settings differ from the experiment's is refused in one line, and a cell found in two folders too.
- **Honest from val.** Under ``val`` the validation cases stay in the unlabeled pool, so a single-stage method
  trains exactly what ``honest`` trains (tests/test_val_protocol.py). Where an experiment lists only the val
  cell of a single-stage method, its honest row is that run's last weights (``summary.json`` "last",
  ``metrics_per_case_last.csv``), labelled so (read by ``ssl_bench.report_rows.honest_from_val``).
- **The ordering page.** The methods ranked by our Dice beside the rank order of the paper's Table 1
  (Kendall's τ), with which differences from the reference method are significant (paired Wilcoxon). Only
  ranks of the paper appear, never its numbers beside ours: the track is not the paper. Its numbers come from
  ``ssl_bench.report_rows.ordering_frame``; this module writes the page.
- **Curves.** Per labeled count, the training curves of the first seed's val runs (losses, learning rate, the
  validation Dice at every selection point) in one figure, ``curves-L<n>-val`` (ssl_bench/curves.py).
- **Measured time.** Each run's training + evaluation wall time against the track's budget. A run re-trained at
  its recorded commit by ``scripts/reproduce_cell.py --save`` (``<runs-dir>/_reproductions/<run>.json``) shows its
  re-run's minutes and whether it was identical; the budget takes the quicker of the two measurements of an
  identical training (a run that shared its cores with other work counts slower than it trains alone).

This module reads run folders only through :class:`ssl_bench.run_folder.RunFolder` and imports no other report
module but ssl_bench/report_format.py, so ssl_bench/report_rows.py can use it (no import cycle).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd

from . import published
from .dataset_settings import run_defaults_from
from .errors import UserError
from .experiments import Cell, Experiment, same_run
from .report_format import markdown_table
from .run_folder import CONFIG, SUMMARY, RunFolder
from .runs import read_json, require_regular

VAL_LAST_NOTE = "= last of val"
VAL_LAST_TEXT = ("honest (= last of val): a single-stage method trains the same batches under val as under honest "
                 "(the validation cases stay in the unlabeled pool), so these rows are the val runs' last weights, "
                 f"evaluated on the test set after training ({SUMMARY} \"last\"); no second run was trained.")
#: the settings a user's run may differ in from the experiment's cells (what the cell ID is made of)
CELL_AXES = ("method", "labeled", "seed", "protocol")


def runs_dirs(runs_dir) -> list[Path]:
    """One --runs-dir or several, resolved, in the order given."""
    dirs = runs_dir if isinstance(runs_dir, (list, tuple)) else [runs_dir]
    return [Path(d).resolve() for d in dirs]


def folder_of(cell: Cell, dirs: list[Path]) -> Path | None:
    """The one --runs-dir holding a finished run of ``cell`` (None: none); a cell in two of them is refused."""
    found = [d for d in dirs if RunFolder(cell.run_dir(d)).is_finished()]
    if len(found) > 1:
        raise UserError(f"cell {cell.id} is in two --runs-dir folders ({found[0]} and {found[1]}); "
                        "keep it in one of them")
    return found[0] if found else None


def with_user_runs(exp: Experiment, dirs: list[Path]) -> Experiment:
    """The experiment plus a cell for every finished run folder in the second and later --runs-dir that is not
    one of its cells, checked to have been trained with the experiment's settings."""
    if len(dirs) < 2 or not exp.cells:
        return exp
    template = exp.cells[0]
    planned = {c.id for c in exp.plan()}
    precisions = {c.precision for c in exp.cells}
    added: list[Cell] = []
    for d in dirs[1:]:
        if not d.is_dir():
            raise UserError(f"--runs-dir {d} does not exist")
        for folder in sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))):
            if folder.name in planned or not RunFolder(folder).is_finished():
                continue
            added.append(_user_cell(folder, template, precisions, exp.name))
    if not added:
        return exp
    return dataclasses.replace(exp, cells=list(exp.cells) + added)


def _user_cell(folder: Path, template: Cell, precisions: set[str], name: str) -> Cell:
    run = RunFolder(folder)
    where = run.config_path
    if not run.has_config():
        raise UserError(f"{folder} has {SUMMARY} but no {CONFIG}; move it out of the --runs-dir")
    config = run.read_config()
    stored = config.get("config") if isinstance(config, dict) else None
    if not isinstance(stored, dict) or any(k not in stored for k in CELL_AXES):
        raise UserError(f"{where} is not a run's config (no {', '.join(CELL_AXES)}); move the folder away")
    precision = stored.get("precision", template.precision)
    if precision not in precisions:
        raise UserError(f"{folder} is not a run of the {name} experiment (precision is {precision!r} there, the "
                        f"experiment's is {', '.join(sorted(precisions))}); train it with the experiment's settings")
    try:
        cell = Cell(str(stored["method"]), int(stored["labeled"]), int(stored["seed"]), str(stored["protocol"]),
                    template.profile, dict(template.overrides), precision=precision)
    except (TypeError, ValueError):
        raise UserError(f"{where}: method, labeled, seed or protocol has a wrong type; move the folder away") from None
    imported = config.get("data", {}).get("imported") if isinstance(config.get("data"), dict) else None
    diff = same_run(stored, cell.config(dataset_defaults=run_defaults_from(imported, where)).to_json())
    if diff:
        raise UserError(f"{folder} is not a run of the {name} experiment ({diff}); train it with "
                        f"`--profile {template.profile}` on the experiment's data, or move it out of the --runs-dir")
    if cell.id != folder.name:
        raise UserError(f"{folder} holds the run {cell.id}; rename the folder to {cell.id} (the report finds runs by "
                        "their cell ID)")
    return cell


def ordering_markdown(df: pd.DataFrame, table: str, reference: str | None) -> str:
    from scipy.stats import kendalltau

    ref = published.display_name(reference or "-", table)
    out = [f"\n## Method ordering beside the paper's {table.replace('table', 'Table ')}\n\n"
           "Ranks only: the paper's numbers come from its full-scale protocol and are not comparable with this "
           f"reduced-scale track. τ: Kendall's rank correlation between our order and the paper's. Significant: "
           f"the paired Wilcoxon test against {ref} (per-case Dice, own post-processing) at p < 0.05.\n"]
    if df.empty:
        return "".join(out) + "\nNo finished run of a method the paper's table has.\n"
    for (protocol, precision, labeled), sub in df.groupby(["protocol", "precision", "labeled"], sort=False):
        if len(sub) >= 2:
            with np.errstate(all="ignore"):
                res = kendalltau(sub["rank"], sub["paper_rank"])
            tau = f"τ = {res.statistic:.2f} (p = {res.pvalue:.3f}, {len(sub)} methods)"
        else:
            tau = "τ: needs two methods"
        body = [[published.display_name(r.method, table), str(r.seeds), f"{r.dice:.2f}", str(r.rank),
                 str(r.paper_rank),
                 "reference" if r.method == reference else
                 ("-" if r.p_vs_reference is None else f"{r.p_vs_reference:.3g}{' *' if r.significant else ''}")]
                for r in sub.itertuples()]
        out += [f"\n### {labeled} labeled · {protocol} · {precision}: {tau}\n\n",
                markdown_table(["Method", "Seeds", "Our Dice (%)", "Our rank", "Paper rank", f"p vs {ref}"], body)]
    return "".join(out)


#: the CPU track's budget for one seed of Table 1's grid (docs/methods.md, Decision 10)
BUDGET_HOURS = 4


#: where scripts/reproduce_cell.py --save leaves a re-run's outcome and timing, in a runs folder: <run id>.json
REPRODUCTIONS = "_reproductions"
_RERUN_KEYS = ("run", "identical", "wall_s", "record_git", "reproduced_git")


def reproductions(dirs: list[Path]) -> dict[str, dict]:
    """The re-runs recorded by ``scripts/reproduce_cell.py --save`` in the runs folders, by run id (read with the
    run folders' own rules: a linked or damaged file is refused in one line)."""
    found: dict[str, dict] = {}
    for d in dirs:
        folder = require_regular(Path(d) / REPRODUCTIONS, folder=True, reading=True)
        if not folder.is_dir():
            continue
        for path in sorted(folder.glob("*.json")):
            rerun = read_json(require_regular(path, reading=True), "re-run scripts/reproduce_cell.py --save")
            if not isinstance(rerun, dict) or any(k not in rerun for k in _RERUN_KEYS) \
                    or rerun["run"] != path.stem or not isinstance(rerun["wall_s"], (int, float)):
                raise UserError(f"{path} is damaged (not a re-run record of {path.stem}); "
                                "re-run scripts/reproduce_cell.py --save")
            found.setdefault(path.stem, rerun)
    return found


def teacher_folder(run_dir: Path, config: dict) -> Path | None:
    """The finished run whose stage 1 a run reused (``--teacher``): the run of that name beside it (a campaign's
    records wherever they were cloned to), else the folder the run recorded; None: no teacher, or not here."""
    recorded = (config.get("config") or {}).get("teacher") if isinstance(config, dict) else None
    if not recorded:
        return None
    for candidate in (Path(run_dir).parent / Path(recorded).name, Path(recorded)):
        if RunFolder(candidate).is_finished():
            return candidate
    return None


def curve_runs(rows, dirs: list[Path]) -> dict[str, list[Path]]:
    """The run folders whose training curves the report draws: per labeled count, the first seed's val runs in the
    order of the table's rows, as {"curves-L<n>-val": [run folder, ...]} (a run without a log, e.g. imported, has
    no curves)."""
    found: dict[str, list[Path]] = {}
    for row in rows:
        if row.protocol != "val" or not row.runs:
            continue
        first = min(row.runs, key=lambda r: r.cell.seed).cell
        where = folder_of(first, dirs)
        if where is not None and RunFolder(first.run_dir(where)).has_log():
            found.setdefault(f"curves-L{first.labeled}-val", []).append(first.run_dir(where))
    return found


def run_seconds(timings: dict) -> float:
    """Training (every stage this run trained) plus evaluation, from a summary's "timings"."""
    seconds = sum(v.get("train_s", 0.0) for k, v in timings.items() if k.startswith("stage"))
    ev = timings.get("eval", {})
    return seconds + (ev.get("inference_s", 0.0) + ev.get("metrics_s", 0.0))  # as table.csv has always summed


def budget_markdown(rows, exp: Experiment | None = None, reruns: dict[str, dict] | None = None) -> str:
    """Measured wall time of the finished cells: per cell and in all (a reused stage 1 counted where it ran), and
    (given the experiment) one seed of Table 1's grid against the track's budget. ``reruns``
    (:func:`reproductions`): a run re-trained at its recorded commit also shows the re-run's minutes and whether
    it was identical; the grid's figure then takes each run's quicker measurement of an identical training."""
    reruns = reruns or {}
    seen, lines = set(), []

    def add(cid: str, timings: dict) -> None:
        if cid in seen:
            return
        seen.add(cid)
        rerun = reruns.get(cid)
        again = run_seconds(rerun.get("timings") or {}) / 60 if rerun else None
        lines.append((cid, run_seconds(timings) / 60, again, None if rerun is None else bool(rerun["identical"])))

    for row in rows:
        for run in row.runs:
            if run.teacher is not None:  # the stage 1 it reused, counted once, where it ran
                add(*run.teacher)
            add(run.cell.id, run.summary.get("timings", {}))
    if not lines:
        return ""
    total = sum(m for _, m, _, _ in lines)
    quicker = {cid: min(m, again) if again is not None and same else m for cid, m, again, same in lines}
    grid = ""
    if exp is not None:
        plan = exp.plan()
        first = min(c.seed for c in plan)
        grid_cells = [c for c in plan if c.seed == first and (c.method, c.labeled) in published.TABLE1]
        cells = {c.id for c in grid_cells} | {c.teacher for c in grid_cells if c.teacher}  # + the stage 1 reused
        done = [cid for cid, *_ in lines if cid in cells]
        if done:
            spent = sum(quicker[cid] for cid in done)
            rest = "" if len(done) == len(cells) else f", {len(cells) - len(done)} not yet"
            rerun_note = ("" if not any(cid in reruns for cid in done) else
                          " Where a run was re-trained at its recorded commit with identical numbers, the quicker "
                          "of its two measurements counts.")
            grid = (f" One seed of Table 1's grid (seed {first}: {len(cells)} runs, the stage-1 runs OMF reuses "
                    f"included) against the track's budget of {BUDGET_HOURS} h: {spent:.0f} min ({spent / 60:.2f} h) "
                    f"for the {len(done)} finished{rest}. Each is the wall time of the run as it happened, on the "
                    "device its record names: a run that shared its cores with other work counts slower than it "
                    f"trains alone.{rerun_note}")
    intro = ("\n## Measured time\n\nTraining + evaluation wall time of each finished run, as recorded in its "
             f"{SUMMARY} (a stage 1 reused from another run counts there, once). In all: {total:.0f} min "
             f"({total / 60:.2f} h) for {len(lines)} runs.{grid}\n\n")
    if not reruns:
        return intro + "| Run | Minutes |\n|---|---|\n" + "".join(f"| {cid} | {m:.1f} |\n" for cid, m, _, _ in sorted(lines))
    body = "".join(f"| {cid} | {m:.1f} | " + ("" if again is None else f"{again:.1f}") + " | "
                   + ("" if same is None else "identical" if same else "**differs**") + " |\n"
                   for cid, m, again, same in sorted(lines))
    return (intro + f"Re-run: the run re-trained by `scripts/reproduce_cell.py --save` at its recorded commit "
            f"(`{REPRODUCTIONS}/` in the runs folder: the commit, the load average before and after, the CPU "
            "time), and whether its log and per-case metrics were identical to the record's.\n\n"
            "| Run | Minutes | Re-run minutes | Re-run |\n|---|---|---|---|\n" + body)
