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


def budget_markdown(rows, exp: Experiment | None = None) -> str:
    """Measured wall time of the finished cells: per cell and in all (a reused stage 1 counted where it ran), and
    (given the experiment) one seed of Table 1's grid against the track's budget."""
    seen, total, lines = set(), 0.0, []
    for row in rows:
        for run in row.runs:
            if run.cell.id in seen:
                continue
            seen.add(run.cell.id)
            timings = run.summary.get("timings", {})
            seconds = sum(v.get("train_s", 0.0) for k, v in timings.items() if k.startswith("stage"))
            seconds += timings.get("eval", {}).get("inference_s", 0.0) + timings.get("eval", {}).get("metrics_s", 0.0)
            total += seconds / 60
            lines.append((run.cell.id, seconds / 60))
    if not lines:
        return ""
    grid = ""
    if exp is not None:
        plan = exp.plan()
        first = min(c.seed for c in plan)
        grid_cells = [c for c in plan if c.seed == first and (c.method, c.labeled) in published.TABLE1]
        cells = {c.id for c in grid_cells} | {c.teacher for c in grid_cells if c.teacher}  # + the stage 1 reused
        done = [m for cid, m in lines if cid in cells]
        if done:
            spent = sum(done)
            rest = "" if len(done) == len(cells) else f", {len(cells) - len(done)} not yet"
            grid = (f" One seed of Table 1's grid (seed {first}: {len(cells)} runs, the stage-1 runs OMF reuses "
                    f"included) against the track's budget of {BUDGET_HOURS} h: {spent:.0f} min ({spent / 60:.2f} h) "
                    f"for the {len(done)} finished{rest}. Each is the wall time of the run as it happened, on the "
                    "device its record names: a run that shared its cores with other work counts slower than it "
                    "trains alone.")
    body = "".join(f"| {cid} | {m:.1f} |\n" for cid, m in sorted(lines))
    return ("\n## Measured time\n\nTraining + evaluation wall time of each finished run, as recorded in its "
            f"{SUMMARY} (a stage 1 reused from another run counts there, once). In all: {total:.0f} min "
            f"({total / 60:.2f} h) for {len(lines)} runs.{grid}\n\n| Run | Minutes |\n|---|---|\n" + body)
