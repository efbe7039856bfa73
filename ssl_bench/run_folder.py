"""One run folder: its layout and every read and write of it. The schema is written down here, once.

A run folder is self-describing; every file is plain data (torch files load with ``weights_only=True``)::

    config.json              every setting, the method's stage defaults, split, data checksums, provenance
    log.jsonl                one line per logged iteration: stage, iteration, lr, losses, it/s; at each selection
                             point val_dice_raw (`val`) or test_dice_raw (`literature`)
    .lock                    the one-writer lock (fcntl.flock) of run, --resume, eval and occlusion's reads
    checkpoints/last.pt      full state for --resume (weights, optimisers, RNG and sampler state)
    checkpoints/previous.pt  the checkpoint before it, kept while the run is in progress (a damaged last.pt falls
                             back to it, which is then kept as last.pt.damaged); removed when the run finishes
    checkpoints/stageK_best.pt  a selecting protocol's running best of stage K (Decision 9)
    stages/stageK.pt         the weights stage K hands on: its last, or its best on val (`val`) / on test (`literature`);
                             ``adopted_from`` when stage 1 came from another run (``--teacher``)
    stages/stageK_last.pt    stage K's last weights, beside a selected stageK.pt, so both can be reported
    metrics_per_case.csv     per test case and post-processing (raw, lcc): dice, jaccard, hd95, asd, empty
    metrics_per_case_last.csv  the same for the last weights (where stages/stageK_last.pt exists)
    summary.json             means ± std, protocol, selected checkpoints, empty counts, units, timings; "last"

Where each is written and read (every access goes through :class:`RunFolder`; no other module spells a
file name, which ``tests/test_run_folder.py`` checks):

- written by the loop (:mod:`ssl_bench.trainer`): config.json (once; the record is made by
  :meth:`ssl_bench.run_setup.RunSetup.config_record`), log.jsonl, checkpoints/, stages/;
- written by evaluation (:mod:`ssl_bench.evaluation`, also ``ssl-bench eval``): the metrics CSVs, summary.json;
- the lock: taken by ``run`` / ``--resume`` (:func:`ssl_bench.runs.prepare_run_dir`) and ``eval``;
- read by ``--resume`` (config, checkpoints, stages, log), ``--teacher`` (another folder's config and stage 1),
  ``eval`` and ``occlusion`` (:func:`ssl_bench.evaluation.load_run`: config, stages), ``sweep`` (config and
  summary: is the cell done, and is it this cell), ``report`` and the track report (config, summary, metrics),
  ``curves`` (log, config), the contract kit (stages, checkpoints).
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import stat
from pathlib import Path

from .errors import UserError
from .runs import (LAST, LOCK_NAME, PREVIOUS, DamagedFileError, FolderLock, atomic_torch_save, atomic_write_json,
                   atomic_write_text, load_torch, lock_folder, open_append, read_json, refuse_if_locked,
                   require_regular, save_checkpoint)

CONFIG = "config.json"
LOG = "log.jsonl"
SUMMARY = "summary.json"
METRICS = "metrics_per_case.csv"
METRICS_LAST = "metrics_per_case_last.csv"
CHECKPOINTS = "checkpoints"
STAGES = "stages"
LOCK = LOCK_NAME

#: the columns of a metrics CSV, in order
METRIC_COLUMNS = ("case", "post", "dice", "jaccard", "hd95", "asd", "empty")
#: what a checkpoint and a stage file must hold
CHECKPOINT_KEYS = ("stage", "iteration", "nets", "optimizers", "stream", "torch_rng")
STAGE_KEYS = ("weights", "iteration", "selection")
RETRAIN = "retrain the run (`ssl-bench run ... --overwrite`) or restore the file from a copy of the run folder"
RESTART = ("move it away to restart the interrupted stage from its beginning, or start over with "
           "`ssl-bench run ... --overwrite`")


def _notice(text: str) -> None:
    import sys

    print(f"ssl-bench: {text}", file=sys.stderr, flush=True)


def _require(obj: dict, keys, path: Path, what_to_do: str, kind: str) -> dict:
    missing = [k for k in keys if k not in obj]
    if missing:
        raise DamagedFileError(path, f"not a {kind}: no {missing[0]!r}", what_to_do)
    return obj


def load_stage_file(path: Path, what_to_do: str = RETRAIN) -> dict:
    """A stage file (the weights a stage hands on), loaded as plain data; one UserError if unsafe or damaged."""
    handed = load_torch(path, what_to_do, kind="stage file")
    _require(handed, STAGE_KEYS, path, what_to_do, "stage file")
    if not isinstance(handed["weights"], dict):
        raise DamagedFileError(path, "its weights are not a state dict", what_to_do)
    return handed


def load_checkpoint_file(path: Path, what_to_do: str) -> dict:
    return _require(load_torch(path, what_to_do, kind="checkpoint"), CHECKPOINT_KEYS, path, what_to_do, "checkpoint")


def metrics_csv_text(rows: list[dict]) -> str:
    """A metrics CSV: the header, then one line per (case, post); floats as ``repr`` (round-trips exactly)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(METRIC_COLUMNS), lineterminator="\n")
    w.writeheader()
    floats = ("dice", "jaccard", "hd95", "asd")
    for r in rows:
        w.writerow({c: (repr(float(r[c])) if c in floats else r[c]) for c in METRIC_COLUMNS})
    return buf.getvalue()


# ---------------------------------------------------------------------------------- the files' rules

#: what to do about a damaged run-folder JSON file, and the keys it must have
_RUN_JSON = {
    CONFIG: ("it cannot be rebuilt: restore it from a copy of the run folder, or delete the folder and retrain the run "
             "(`ssl-bench run ... --overwrite` replaces only a folder whose config.json is intact)", ("config",)),
    SUMMARY: ("delete it and run `ssl-bench eval` on the run folder to rewrite it (its training timings are lost)",
              ("metrics",)),
}


#: what a run folder holds at its top level, and whether each is a folder; ssl-bench writes or replaces them
RUN_ENTRIES = {LOCK: False, LOG: False, CONFIG: False, SUMMARY: False, METRICS: False, METRICS_LAST: False,
               CHECKPOINTS: True, STAGES: True}


def require_run_entries(folder: Path) -> None:
    """Every entry of ``folder`` that a run, --resume or eval writes is the folder's own (:func:`require_regular`);
    the files inside checkpoints/ and stages/ are checked again as they are written (:func:`atomic_torch_save`)."""
    folder = Path(folder)
    for name, is_folder in RUN_ENTRIES.items():
        require_regular(folder / name, folder=is_folder)



# ---------------------------------------------------------------------------------- creating, reusing, replacing

def _has_content(folder: Path) -> bool:
    # the lock, and what a write killed before config.json existed leaves (atomic_write's temporary file), are no run
    return any(p.name != LOCK and not p.name.startswith(f".{CONFIG}.") for p in folder.iterdir())


def _within(a: Path, b: Path) -> bool:
    return a == b or b in a.parents


def is_run_config(path: Path) -> bool:
    """Whether ``path`` is a config.json that ssl-bench wrote for a run: a regular file (not a link) holding a JSON
    object whose "config" section names the run's "method"."""
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return False
        obj = json.loads(Path(path).read_bytes().decode("utf-8"))
    except (OSError, ValueError):
        return False
    config = obj.get("config") if isinstance(obj, dict) else None
    return isinstance(config, dict) and isinstance(config.get("method"), str) and bool(config["method"])


def check_overwrite(out: Path, data_root: Path | None = None) -> None:
    """``--overwrite`` empties ``out`` only if it is a run folder (an intact config.json written by ssl-bench) that is
    neither the data root nor inside it nor above it, and not a symbolic link; otherwise one UserError, nothing deleted."""
    given = Path(out)
    if given.is_symlink():
        raise UserError(f"--overwrite refuses {given}: it is a symbolic link (to {os.readlink(given)}), and emptying it "
                        f"would delete the files it points to; pass the run folder itself")
    out = given.resolve()
    if data_root is not None:
        root = Path(data_root).resolve()
        where = ("is the data folder" if out == root else f"is inside the data folder {root}" if _within(out, root)
                 else f"holds the data folder {root}" if _within(root, out) else None)
        if where:
            raise UserError(f"--overwrite refuses to empty {out}: it {where}; choose another --out")
    if not is_run_config(out / CONFIG):
        raise UserError(f"--overwrite refuses to empty {out}: it is not a run folder (no intact config.json written "
                        f"by ssl-bench); choose another --out, or move its files away yourself")


def prepare_run_dir(out: Path, resume: bool, overwrite: bool, data_root: Path | None = None) -> FolderLock:
    """An existing run folder is only reused with --resume or replaced with --overwrite, and by one process at a time.

    --overwrite replaces only a run folder, never the data (``data_root``), and never through a link
    (:func:`check_overwrite`). Every entry a run writes must be the folder's own (:func:`require_run_entries`).
    Returns the folder's lock, held by the caller while it writes (``with prepare_run_dir(...):``).
    """
    given = Path(out)
    out = given.resolve()
    if resume and overwrite:
        raise UserError("--resume and --overwrite exclude each other")
    if out.exists() and not out.is_dir():
        raise UserError(f"output path exists and is not a folder: {out}")
    if resume:
        if not (out / CONFIG).is_file():
            raise UserError(f"nothing to resume: {out} has no config.json")
        lock = lock_folder(out)
        try:
            require_run_entries(out)
        except BaseException:
            lock.release()
            raise
        return lock
    if out.exists() and _has_content(out):
        if not overwrite:
            refuse_if_locked(out)
            raise UserError(f"output folder {out} already exists; pass --resume to continue it or --overwrite to replace it")
        check_overwrite(given, data_root)
        lock = lock_folder(out)  # never empties a folder that a live process is writing
        try:
            check_overwrite(given, data_root)  # as it is now that we hold it
            for p in out.iterdir():
                if p.name == LOCK:
                    continue
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()  # a link itself, never what it points to
        except BaseException:
            lock.release()
            raise
        return lock
    out.mkdir(parents=True, exist_ok=True)
    lock = lock_folder(out)
    if _has_content(out):  # another process wrote it between our check and our lock
        lock.release()
        raise UserError(f"output folder {out} already exists; pass --resume to continue it or --overwrite to replace it")
    return lock


class RunFolder:
    """The files of one run folder (see the module docstring). Stage numbers ``k`` count from 1, as the files do."""

    def __init__(self, path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    # -- where --------------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.path / CONFIG

    @property
    def log_path(self) -> Path:
        return self.path / LOG

    @property
    def summary_path(self) -> Path:
        return self.path / SUMMARY

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def stages(self) -> Path:
        return self.path / STAGES

    def metrics_path(self, which: str = "selected") -> Path:
        """``which``: "selected" (the protocol's weights) or "last"."""
        return self.path / (METRICS if which == "selected" else METRICS_LAST)

    def stage_path(self, k: int, which: str = "selected") -> Path:
        return self.stages / (f"stage{k}.pt" if which == "selected" else f"stage{k}_last.pt")

    def best_path(self, k: int) -> Path:
        return self.checkpoints / f"stage{k}_best.pt"

    # -- state: every entry read is the folder's own, never a link (one UserError naming it) ------------
    @staticmethod
    def own(path: Path) -> Path:
        """``path`` (a file of this folder, or one inside checkpoints/ or stages/) checked for reading: it and the
        folder it sits in are absent or the run folder's own (:func:`~ssl_bench.runs.require_regular`)."""
        path = Path(path)
        if path.parent.name in (CHECKPOINTS, STAGES):
            require_regular(path.parent, folder=True, reading=True)
        return require_regular(path, reading=True)

    def has_config(self) -> bool:
        return self.own(self.config_path).is_file()

    def is_finished(self) -> bool:
        """Evaluated: summary.json is there (a sweep skips the cell, a report reads it)."""
        return self.own(self.summary_path).is_file()

    def has_stage(self, k: int, which: str = "selected") -> bool:
        return self.own(self.stage_path(k, which)).is_file()

    def has_metrics(self, which: str = "selected") -> bool:
        return self.own(self.metrics_path(which)).is_file()

    def has_log(self) -> bool:
        return self.own(self.log_path).is_file()

    def finished_stages(self) -> set[int]:
        require_regular(self.stages, folder=True, reading=True)
        return {int(m.group(1)) for p in self.stages.glob("stage*.pt") if (m := re.fullmatch(r"stage(\d+)", p.stem))}

    # -- JSON ------------------------------------------------------------------------------------
    def read_config(self, what_to_do: str | None = None) -> dict:
        return read_json(self.own(self.config_path), what_to_do or _RUN_JSON[CONFIG][0], _RUN_JSON[CONFIG][1])

    def write_config(self, config: dict) -> None:
        atomic_write_json(self.config_path, config)

    def read_summary(self, what_to_do: str | None = None) -> dict:
        return read_json(self.own(self.summary_path), what_to_do or _RUN_JSON[SUMMARY][0], _RUN_JSON[SUMMARY][1])

    def write_summary(self, summary: dict) -> None:
        atomic_write_json(self.summary_path, summary)

    def summary_device(self) -> str | None:
        """The device a finished run used (its summary.json), for folders made before precision was recorded."""
        try:
            summary = self.read_summary()
        except (UserError, OSError):
            return None
        return summary.get("device") if isinstance(summary, dict) else None

    # -- metrics --------------------------------------------------------------------------------
    def write_metrics(self, rows: list[dict], which: str = "selected") -> None:
        atomic_write_text(self.metrics_path(which), metrics_csv_text(rows))

    def read_metrics(self, which: str = "selected"):
        """The metrics CSV as a DataFrame (an empty one with the columns when absent); one line if damaged."""
        import pandas as pd

        path = self.metrics_path(which)
        if not self.has_metrics(which):
            return pd.DataFrame(columns=list(METRIC_COLUMNS))
        try:
            df = pd.read_csv(path)
        except (ValueError, OSError, UnicodeDecodeError) as exc:
            raise UserError(f"{path} is damaged ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                            f"run `ssl-bench eval {self.path}` to rewrite it") from None
        missing = [c for c in METRIC_COLUMNS if c not in df.columns]
        if missing:
            raise UserError(f"{path} is damaged (no {missing[0]!r} column); run `ssl-bench eval {self.path}` to "
                            f"rewrite it")
        if df[["case", "post", "empty"]].isna().any().any():  # a row cut short lacks its last column
            raise UserError(f"{path} is damaged (a row with a missing value); run `ssl-bench eval {self.path}` to "
                            f"rewrite it")
        return df

    # -- log -------------------------------------------------------------------------------------
    def open_log(self):
        """The log for appending (never through a link)."""
        return open_append(self.log_path)

    def read_log(self) -> list[dict]:
        """Every complete line of log.jsonl (a line cut by an interruption is skipped)."""
        rows = []
        for line in self.own(self.log_path).read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return rows

    def truncate_log(self, state: dict | None) -> None:
        """Keep the lines a resumed run stands on: up to the checkpoint ``state``, or (none) finished stages only."""
        log = self.log_path
        if not self.has_log():
            return
        keep_until = (state["stage"] + 1, state["iteration"]) if state else None
        lines = []
        for line in log.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by the interruption
            if keep_until is None or (row["stage"], row["iteration"]) <= keep_until:
                lines.append(line)
        if keep_until is None:
            # completed stages are kept; the interrupted stage restarts from its beginning
            done = self.finished_stages()
            lines = [ln for ln in lines if json.loads(ln)["stage"] in done]
        atomic_write_text(log, "".join(ln + "\n" for ln in lines))

    # -- stage files -----------------------------------------------------------------------------
    def load_stage(self, k: int, which: str = "selected", what_to_do: str = RETRAIN) -> dict:
        return load_stage_file(self.own(self.stage_path(k, which)), what_to_do)

    def save_stage(self, k: int, handed: dict, which: str = "selected") -> None:
        atomic_torch_save(handed, self.stage_path(k, which))

    def load_best(self, k: int) -> dict:
        return load_stage_file(self.own(self.best_path(k)))

    # -- checkpoints -----------------------------------------------------------------------------
    def save_checkpoint(self, state: dict) -> None:
        save_checkpoint(state, self.checkpoints)

    def last_checkpoint(self, what_to_do: str) -> dict:
        return load_checkpoint_file(self.own(self.checkpoints / LAST), what_to_do)

    def load_checkpoint(self) -> dict | None:
        """The newest readable checkpoint generation (None: none written yet); says which one it used.

        A damaged ``last.pt`` falls back to ``previous.pt`` and is kept aside as ``last.pt.damaged``; a
        file that would run code is refused outright.
        """
        folder = self.checkpoints
        last, prev = self.own(folder / LAST), self.own(folder / PREVIOUS)
        damaged = None
        if last.is_file():
            try:
                hint = RESTART if prev.is_file() else f"there is no earlier checkpoint: {RESTART}"
                state = load_checkpoint_file(last, hint)
            except DamagedFileError as exc:
                if not prev.is_file():
                    raise
                damaged = exc
            else:
                _notice(f"resuming from {CHECKPOINTS}/{LAST} (stage {state['stage'] + 1}, iteration {state['iteration']})")
                return state
        if not prev.is_file():
            return None
        try:
            state = load_checkpoint_file(prev, RESTART)
        except DamagedFileError as exc:
            if damaged is None:
                raise UserError(f"{exc} (and {last} is missing)") from None
            raise UserError(f"both checkpoints of {self.path} are damaged: {LAST} ({damaged.reason}) and {PREVIOUS} "
                            f"({exc.reason}); {RESTART.replace('move it away', 'move both away')}") from None
        if damaged is not None:
            os.replace(last, folder / f"{LAST}.damaged")  # the next checkpoint must not push the good one out
        why = f"{LAST} is damaged, kept as {CHECKPOINTS}/{LAST}.damaged" if damaged is not None else f"{LAST} is missing"
        _notice(f"{why}; resuming from {CHECKPOINTS}/{PREVIOUS} (stage {state['stage'] + 1}, iteration {state['iteration']})")
        return state

    def drop_previous(self) -> None:
        """A finished run: last.pt and the stage files are all that --resume, eval and --teacher need."""
        (self.checkpoints / PREVIOUS).unlink(missing_ok=True)

    # -- the one writer --------------------------------------------------------------------------
    def lock(self, busy: str | None = None):
        return lock_folder(self.path, busy=busy)

    def require_entries(self) -> None:
        """Every entry a run, --resume or eval writes is the folder's own, never a link (:func:`require_run_entries`)."""
        require_run_entries(self.path)
