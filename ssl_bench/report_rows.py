"""The report's rows and numbers: run folders read into rows, and every statistic the tables show.

Nothing here formats or writes (ssl_bench/report.py does). Run folders are read through
:class:`ssl_bench.run_folder.RunFolder` only: each cell's ``summary.json``, ``config.json`` and
``metrics_per_case.csv`` (``metrics_per_case_last.csv`` for honest-from-val rows, ssl_bench/track_report.py).

- **Rows** (:func:`collect`): one per (protocol, precision, labeled, method), holding that cell's finished runs
  (:func:`read_cell_run`), each checked to be its cell: a finished folder that is not is refused in one line, and
  so is a damaged record (a summary.json without a key the tables read, a metrics CSV with a missing or
  non-numeric column).
- **Statistics**: mean and sample std (n−1) over seeds (:func:`metric_stats`, :func:`last_stats`), empty
  predictions (:func:`empty_counts`), minutes (:func:`run_minutes`), per-case Dice over seeds and the paired
  Wilcoxon tests (:func:`wilcoxon_tests`), the method ordering beside a paper table (:func:`ordering_frame`), and
  Fig. 3 (:func:`occlusion_frame`, :func:`fig3_table`; the one Fig. 3 table, also drawn by ``ssl-bench
  occlusion``).
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from . import published, track_report
from .dataset_settings import run_defaults_from
from .errors import UserError
from .experiments import DEFAULT_PRECISION, LA_TRAIN_CASES, PROTOCOLS, Cell, Experiment, same_run
from .run_folder import CONFIG, SUMMARY, RunFolder

METRICS = ("dice", "jaccard", "hd95", "asd")
PERCENT = {"dice", "jaccard"}
OCCLUSION_CSV = "occlusion_per_case.csv"  # written by `ssl-bench occlusion --out DIR`
FALLBACK_NOTE = "= honest"
#: the columns of wilcoxon.csv (also when nothing is paired)
WILCOXON_COLUMNS = ["protocol", "precision", "labeled", "reference", "method", "post", "reference_post",
                    "method_post", "n_cases", "reference_dice", "method_dice", "median_diff", "statistic", "p_value"]
#: the columns of ordering.csv (also when no method has a paper figure)
ORDERING_COLUMNS = ["protocol", "precision", "labeled", "method", "seeds", "dice", "paper_dice", "p_vs_reference",
                    "significant", "rank", "paper_rank"]
#: one Fig. 3 line per (protocol, precision, method, labeled), one point per ratio
FIG3_KEY = ["protocol", "precision", "method", "labeled", "ratio"]


@dataclass
class Run:
    cell: Cell
    summary: dict
    config: dict
    per_case: pd.DataFrame
    minutes: float
    gpu: str | None
    legacy_precision: str | None = None  # no precision recorded: what the run computed (recorded_precision)
    teacher: tuple[str, dict] | None = None  # the run whose stage 1 it reused (--teacher): (its name, its timings)


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

def read_cell_run(cell: Cell, runs_dir: Path) -> Run | None:
    """The finished run of ``cell`` in ``runs_dir`` (None: not finished), checked to be that cell's run."""
    folder = RunFolder(cell.run_dir(runs_dir))
    d = folder.path
    if not folder.is_finished():
        return None
    summary = folder.read_summary()
    for key in ("method", "labeled", "seed", "protocol"):
        if key in summary and summary[key] != getattr(cell, key):
            raise UserError(f"{d}: its {SUMMARY} has {key} {summary[key]!r}, the cell {cell.id} needs "
                            f"{getattr(cell, key)!r}; move the folder away")
    if not folder.has_config():
        raise UserError(f"{d} has {SUMMARY} but no {CONFIG}, so its settings cannot be checked against the "
                        f"cell {cell.id}; move the folder away")
    config = folder.read_config()
    stored = config.get("config") if isinstance(config, dict) else None
    if not isinstance(stored, dict):
        raise UserError(f"{d}: its {CONFIG} has no 'config' settings; move the folder away")
    # the cell's own settings; device and teacher folder do not define a run (same_run skips them)
    # an imported data set's own patch and strides, as recorded by the run, are the cell's defaults
    imported = config.get("data", {}).get("imported") if isinstance(config.get("data"), dict) else None
    diff = same_run(stored, cell.config(dataset_defaults=run_defaults_from(imported, folder.config_path)).to_json())
    if diff:
        raise UserError(f"{d} is not the cell {cell.id} ({diff}); move it away or use another --runs-dir")
    _check_split(folder, config)
    check_summary(summary, folder)
    per_case = read_per_case(folder)
    check_per_case(per_case, summary["metrics"], folder)
    legacy = None
    if stored.get("precision") is None:
        from .precision import recorded_precision

        legacy = recorded_precision(stored, summary.get("device"))
    teacher_dir = track_report.teacher_folder(d, config)
    teacher = None if teacher_dir is None else \
        (teacher_dir.name, RunFolder(teacher_dir).read_summary().get("timings", {}))
    return Run(cell, summary, config, per_case, run_minutes(summary, teacher), summary.get("gpu"), legacy, teacher)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_summary(summary: dict, folder: RunFolder) -> None:
    """Every key of a summary.json the tables read, with a value of its type; else one line naming the file."""
    def bad(what: str):
        raise UserError(f"{folder.summary_path} is damaged ({what}); delete it and run `ssl-bench eval {folder.path}` "
                        "to rewrite it")

    post = summary.get("paper_post")
    if not isinstance(post, str):
        bad("no 'paper_post'")
    blocks = {"metrics": summary["metrics"]}
    if post not in blocks["metrics"]:
        bad(f"no metrics for its paper_post {post!r}")
    last = summary.get("last")
    if last is not None:
        if not isinstance(last, dict) or not isinstance(last.get("metrics"), dict):
            bad("'last' has no 'metrics'")
        blocks["last.metrics"] = last["metrics"]
    for name, block in blocks.items():
        for p, m in block.items():
            if not isinstance(m, dict):
                bad(f"{name}.{p} is not an object")
            for key in METRICS:
                if not _number(m.get(key)):
                    bad(f"{name}.{p} has no number {key!r}")
            for key in ("n_empty", "n_cases"):
                if key in m and not _number(m[key]):
                    bad(f"{name}.{p}.{key} is not a number")
    checkpoint = summary.get("checkpoint")
    if not isinstance(checkpoint, dict) or not _number(checkpoint.get("iteration")):
        bad("no checkpoint iteration")
    timings = summary.get("timings", {})
    if not isinstance(timings, dict) or not all(isinstance(v, dict) for v in timings.values()):
        bad("'timings' is not an object of objects")


def check_per_case(df: pd.DataFrame, metrics: dict, folder: RunFolder, which: str = "selected") -> None:
    """The metrics CSV (its rows complete: RunFolder.read_metrics) against the summary it was written with: per post,
    as many rows as the summary's n_cases, and the same means. A CSV cut short, edited, or of another evaluation is one line."""
    path = folder.metrics_path(which)

    def bad(what: str):
        raise UserError(f"{path} is damaged or not this run's ({what}); run `ssl-bench eval {folder.path}` to "
                        "rewrite it and summary.json together")

    if df.empty:
        return  # no per-case file (an older run): the tables use the summary alone, the per-case plots skip it
    for post, m in metrics.items():
        rows = df[df["post"] == post]
        if "n_cases" in m and len(rows) != m["n_cases"]:
            bad(f"{len(rows)} {post} rows, the summary counts {m['n_cases']} cases")
        for key in METRICS:
            mean = float(np.mean(rows[key].to_numpy(np.float64))) if len(rows) else float(m[key])
            if not np.isclose(mean, float(m[key]), rtol=1e-9, atol=1e-12, equal_nan=True):
                bad(f"its mean {post} {key} is {mean:.6g}, the summary's {m[key]:.6g}")


def read_per_case(folder: RunFolder, which: str = "selected") -> pd.DataFrame:
    """A run's metrics CSV (empty where absent); one line naming the file if it is damaged."""
    df = folder.read_metrics(which)
    for col in METRICS:
        if len(df) and not pd.api.types.is_numeric_dtype(df[col]):
            raise UserError(f"{folder.metrics_path(which)} is damaged (its {col!r} column is not numeric); run "
                            f"`ssl-bench eval {folder.path}` to rewrite it")
    return df


def _check_split(folder: RunFolder, config: dict) -> None:
    """The run's recorded split against what its data root's train.list and test.list give now (ssl_bench.data.check_split);
    not checked where that root is not on this machine (the report reads run folders only)."""
    root = config.get("data", {}).get("root") if isinstance(config.get("data"), dict) else None
    if not root or not (Path(root) / "train.list").is_file():
        return
    from .data import LAData, check_split

    check_split(config, LAData(root), f"{folder.path} ({CONFIG})",
                "restore train.list and test.list, or move the folder away")


def run_minutes(summary: dict, teacher: tuple[str, dict] | None = None) -> float:
    """Training (every stage) plus evaluation wall time; a stage 1 adopted via --teacher (``teacher``: its name and
    timings, track_report.teacher_folder) counts with its own training time."""
    timings = summary.get("timings", {})
    seconds = track_report.run_seconds(timings)
    if teacher is not None and "stage1" not in timings:
        seconds += teacher[1].get("stage1", {}).get("train_s", 0.0)
    return seconds / 60.0


def honest_from_val(runs: list[Run], folders: dict[str, Path]) -> list[Run] | None:
    """The honest view of val runs of a single-stage method (their last weights; ssl_bench/track_report.py), or None
    where that is not the same training (a multi-stage method hands a selected stage on) or a run lacks its
    last-weights evaluation."""
    derived = []
    for run in runs:
        stages = (run.config.get("method") or {}).get("stages") or []
        last = run.summary.get("last") or {}
        folder = folders.get(run.cell.id)
        if len(stages) != 1 or "metrics" not in last or folder is None:
            return None
        folder = RunFolder(folder)
        if not folder.has_metrics("last"):
            return None
        summary = {**run.summary, "protocol": "honest", "metrics": last["metrics"],
                   "checkpoint": last.get("checkpoint")}
        per_case = read_per_case(folder, "last")
        check_per_case(per_case, last["metrics"], folder, "last")
        derived.append(dataclasses.replace(run, summary=summary, per_case=per_case))
    return derived or None


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
                cache[c.id] = read_cell_run(c, where) if where is not None else None
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
                    derived = honest_from_val(runs_of(val), folders) if val else None
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


def row_status(row: Row) -> str:
    """complete (every planned seed finished), partial (some) or missing (none)."""
    if not row.runs:
        return "missing"
    return "complete" if len(row.runs) == len(row.planned) else "partial"


def imported_roots(rows: list[Row]) -> list[str]:
    """Data roots of the runs trained on an imported data set (config.json ``data.imported`` set), sorted."""
    roots = set()
    for row in rows:
        for run in row.runs:
            data = run.config.get("data") if isinstance(run.config.get("data"), dict) else {}
            if data.get("imported") is not None:
                roots.add(str(data.get("root")))
    return sorted(roots)


def distance_units(rows: list[Row]) -> str:
    """The one unit of every run's 95HD/ASD (summary.json ``units``; older folders: voxels); mixed is refused."""
    units = sorted({r.summary.get("units") or "voxel" for row in rows for r in row.runs})
    if len(units) > 1:
        raise UserError(f"the runs of this experiment report 95HD/ASD in different units ({', '.join(units)}); "
                        f"give every cell the same `units` or report them separately")
    return units[0] if units else "voxel"


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


def empty_counts(row: Row, post: str) -> tuple[int, int]:
    """Empty predictions and evaluated cases, summed over the row's runs."""
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


# -- paired tests ---------------------------------------------------------------------------------

def per_case_dice(row: Row, post: str) -> pd.Series:
    """Per-case Dice averaged over the row's seeds (index: case id)."""
    frames = [r.per_case[r.per_case["post"] == post][["case", "dice"]] for r in row.runs]
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.Series(dtype=float)
    return pd.concat(frames).groupby("case")["dice"].mean()


def wilcoxon_tests(rows: list[Row], reference: str | None) -> pd.DataFrame:
    """The reference method against every other one at its protocol, labeled count and precision (WILCOXON_COLUMNS)."""
    from scipy.stats import wilcoxon

    recs = []
    if reference is None:
        return pd.DataFrame(columns=WILCOXON_COLUMNS)
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
    return pd.DataFrame.from_records(recs, columns=WILCOXON_COLUMNS)


def ordering_frame(rows: list[Row], tests: pd.DataFrame, table: str, alpha: float = 0.05) -> pd.DataFrame:
    """Per protocol and labeled count: each method's rank by our mean Dice (own post-processing) and by the
    paper's ``table``, and the paired Wilcoxon p-value against the reference method (ssl_bench/track_report.py)."""
    recs = []
    for row in rows:
        stats = metric_stats(row, row.post, "dice") if row.runs else None
        fig = published.paper_figure(table, row.method, row.labeled)
        if stats is None or fig is None or fig.dice is None:
            continue
        p = None
        if not tests.empty:
            hit = tests[(tests["protocol"] == row.protocol) & (tests["labeled"] == row.labeled)
                        & (tests["method"] == row.method) & (tests["post"] == "own")
                        & (tests["precision"] == row.precision)]
            if len(hit) and hit.iloc[0]["reference"] != row.method and hit.iloc[0]["p_value"] is not None:
                p = float(hit.iloc[0]["p_value"])
        recs.append({"protocol": row.protocol, "precision": row.precision, "labeled": row.labeled,
                     "method": row.method, "seeds": len(row.runs), "dice": stats[0], "paper_dice": fig.dice,
                     "p_vs_reference": p, "significant": p is not None and p < alpha})
    df = pd.DataFrame.from_records(recs)
    if df.empty:
        return pd.DataFrame(columns=ORDERING_COLUMNS)
    keys = ["protocol", "precision", "labeled"]
    df["rank"] = df.groupby(keys)["dice"].rank(ascending=False, method="min").astype(int)
    df["paper_rank"] = df.groupby(keys)["paper_dice"].rank(ascending=False, method="min").astype(int)
    return df.sort_values(keys + ["rank"]).reset_index(drop=True)


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
        df = own_post_rows(df)
    return df.reset_index(drop=True)


def own_post_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The rows of each run's own post-processing (an occlusion CSV's ``paper_post`` flag, Decisions 3)."""
    return df[df["paper_post"].astype(str).str.lower().isin(("true", "1"))]


def fig3_table(df: pd.DataFrame, method_order: list[str] | None = None) -> pd.DataFrame:
    """The Fig. 3 table (docs/methods.md §3.7.8), for ``ssl-bench report`` and ``ssl-bench occlusion`` alike.

    ``df``: occlusion per-case rows of each run's own post-processing (:func:`own_post_rows`). Per (protocol,
    precision, method, labeled, ratio): the case-mean Dice of each (seed, repeat); per repeat, its mean over the
    seeds; then the mean and the sample std (n−1; NaN with one repeat, as at ratio 0) of those over the repeats.
    Columns: FIG3_KEY, dice_mean, dice_std, n_repeats, n_seeds (the most seeds in one repeat). Rows by protocol,
    labeled and ratio, then in ``method_order`` (default: the order the methods first appear in ``df``).
    """
    if "precision" not in df.columns:
        df = df.assign(precision=DEFAULT_PRECISION)
    key = FIG3_KEY
    per_rep = df.groupby(key + ["repeat", "seed"])["dice"].mean().reset_index()
    per_rep = per_rep.groupby(key + ["repeat"])["dice"].agg(["mean", "count"])
    per_rep = per_rep.reset_index().rename(columns={"count": "n_seeds", "mean": "dice"})
    out = per_rep.groupby(key).agg(
        dice_mean=("dice", "mean"), dice_std=("dice", lambda s: s.std(ddof=1) if len(s) > 1 else float("nan")),
        n_repeats=("dice", "size"), n_seeds=("n_seeds", "max")).reset_index()
    order = list(method_order) if method_order is not None else list(dict.fromkeys(df["method"]))
    out = out.sort_values(["protocol", "labeled", "ratio"], kind="stable")
    out = out.iloc[np.argsort([order.index(m) for m in out["method"]], kind="stable")]
    return out.reset_index(drop=True)
