"""`ssl-bench sweep EXPERIMENT`: every cell of an experiment file as one Ray Tune trial.

- A cell trains into ``<runs-dir>/<cell ID>`` (absolute paths: Tune runs trials in their own
  working folders, possibly on other nodes of a cluster sharing the file system).
- A cell whose run folder has ``summary.json`` is complete and skipped, after checking that it was
  made with the same defining settings (otherwise the sweep stops with the first difference).
- Each trial asks Ray for ``--cpus-per-trial`` CPUs and ``--gpus-per-trial`` GPUs (fractions share a
  GPU) and limits torch to as many threads as it has CPUs. A trial on CUDA also caps its process's
  caching allocator at its share of the GPU's memory (``torch.cuda.set_per_process_memory_fraction``
  with the fraction it asked for), so one large trial (SS-Net peaks near 7 GB) cannot starve the trials
  sharing its GPU; the cap is recorded per cell in status.json and in the cell's log.
- A crashing trial is retried ``--max-failures`` times by Tune (FailureConfig); a retry continues
  the run folder from its last checkpoint. A cell that still fails is recorded as failed; the others
  go on. Attempts and tracebacks go to ``<runs-dir>/_sweeps/<experiment>/logs/<cell>.log``, the
  outcome of every cell to ``<runs-dir>/_sweeps/<experiment>/status.json``, with what the sweep was
  launched with (data, resources, ``--only``, ``--address``, ``--max-concurrent``, ``--max-failures``).
- Before anything is trained, every cell is checked against the data set (its labeled count, validation
  cases and ``--units mm`` against the data set's lists and spacings; also under ``--dry-run`` when the data
  is there): an impossible cell is one line and exit 2, not a trial that Ray retries.
- Multi-stage cells that reuse another cell's stage 1 (``--teacher``, see
  ssl_bench.experiments.STAGE1_PROVIDERS) run in a later wave, after the cells they depend on; a
  cell whose provider failed is not started.

Restarting after the driver was killed: ``--resume`` re-launches the sweep. Complete cells are
skipped and every incomplete run folder continues from its own ``checkpoints/last.pt`` (the
trainer's resume). This is preferred to ``Tuner.restore`` because the run folders, written
atomically by the trainer, are the one source of truth: they survive any kill, while Tune's
experiment snapshot is written periodically, can lag behind them, is tied to one storage path and
Ray version, and cannot take an edited experiment file (e.g. one more seed). The same path serves
Tune's own retries. Without ``--resume`` the sweep refuses to touch incomplete run folders.
"""
from __future__ import annotations

import datetime as _dt
import fnmatch
import os
import platform
import time
import traceback
from contextlib import nullcontext
from pathlib import Path

import click

from .errors import UserError
from .experiments import ADDED_DEFAULTS, Cell, load_experiment, same_run, wave_index
from .run_folder import CONFIG, SUMMARY, RunFolder
from .runs import atomic_write_json, lock_folder, open_append, require_regular

ATTEMPT = "attempt "
ERROR = "error: "
SWEEP_START = "== sweep "


def lock_sweeps(runs_dir: Path):
    """The one-sweep lock of a runs folder (a live sweep holding it: one-line UserError)."""
    folder = Path(runs_dir) / "_sweeps"
    require_regular(folder, folder=True)  # a link would put the lock and the sweep's state elsewhere
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create {folder} ({exc.strerror or exc})") from None
    return lock_folder(folder, busy=f"another sweep is running on {runs_dir}")


def sweep_dir(runs_dir: Path, experiment: str) -> Path:
    return Path(runs_dir) / "_sweeps" / experiment


def cell_config(cell: Cell, runs_dir: Path, gpus_per_trial: float, dataset_defaults: dict | None = None) -> dict:
    """The exact RunConfig (as JSON) a cell trains with: device from the resources, teacher folder absolute,
    patch and strides from the data set (``LAData.run_defaults()``: an imported set's own; {} for LA)."""
    extra = {}
    if "device" not in cell.overrides:
        extra["device"] = "cuda" if gpus_per_trial > 0 else "cpu"
    if cell.teacher:
        extra["teacher"] = str(Path(runs_dir) / cell.teacher)
    return cell.config(dataset_defaults=dataset_defaults, **extra).to_json()


def classify(cells: list[Cell], runs_dir: Path, gpus_per_trial: float, resume: bool,
             dataset_defaults: dict | None = None, data=None):
    """Split the plan into (to run, already complete); refuse stale or unresumable folders, and (given the data,
    an LAData) folders whose recorded split differs from what its train.list and test.list give now."""
    from .data import check_split

    def same_split(out: Path, stored: dict) -> bool:
        if data is None:
            return True
        try:
            check_split(stored, data, f"{out} (config.json)", "restore train.list and test.list, or move the folder "
                        "away or use another --runs-dir")
        except UserError as exc:
            problems.append(str(exc))
            return False
        return True

    todo, complete, problems, incomplete = [], [], [], []
    for cell in cells:
        out = cell.run_dir(runs_dir)
        wanted = cell_config(cell, runs_dir, gpus_per_trial, dataset_defaults)
        folder = RunFolder(out)
        if folder.is_finished():
            if not folder.has_config():
                problems.append(f"{out} has {SUMMARY} but no {CONFIG}")
                continue
            folder.read_summary()  # complete only if its record is whole: one line naming a damaged one
            stored = folder.read_config()
            diff = same_run(stored["config"], wanted)
            if diff:
                problems.append(f"{out} is not this cell ({diff}); move it away or use another --runs-dir")
            elif same_split(out, stored):
                complete.append(cell)
            continue
        if folder.has_config():
            if not resume:
                incomplete.append(cell)
                continue
            from .precision import with_precision

            whole = folder.read_config()
            # precision inferred for an older folder, and settings added since at the value it computed with
            stored = {**ADDED_DEFAULTS, **with_precision(whole["config"])}
            diff = [k for k in wanted if k != "device" and stored.get(k) != wanted[k]]  # as the trainer's resume
            if diff:
                k = diff[0]
                problems.append(f"cannot resume {out}: setting {k!r} was {stored.get(k)!r}, now {wanted[k]!r}")
                continue
            if not same_split(out, whole):
                continue
        todo.append(cell)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise UserError(problems[0] + more)
    if incomplete:
        more = f" and {len(incomplete) - 1} more" if len(incomplete) > 1 else ""
        raise UserError(f"incomplete run folder {incomplete[0].run_dir(runs_dir)}{more}: pass --resume to continue "
                        "them from their checkpoints")
    return todo, complete


def check_cells(cells: list[Cell], data, runs_dir: Path, gpus_per_trial: float, dataset_defaults: dict | None) -> None:
    """Every cell against the data set ``data`` (an LAData), before anything is started: the split its labeled
    count, protocol and validation cases give (what the trainer would refuse inside a trial), and stored voxel
    spacings for the evaluated cases of a ``units = "mm"`` cell. One UserError naming the first impossible cell."""
    from .data import split_lists

    problems, with_spacing = [], set()
    for cell in cells:
        config = cell_config(cell, runs_dir, gpus_per_trial, dataset_defaults)
        try:
            test = tuple(split_lists(data, config)["test"])
            if config.get("units") == "mm" and test not in with_spacing:
                data.require_spacing(test)
                with_spacing.add(test)
        except UserError as exc:
            problems.append(f"cell {cell.id}: {exc}")
    if problems:
        more = f" (and {len(problems) - 1} more cell(s))" if len(problems) > 1 else ""
        raise UserError(f"{problems[0]}{more}; the data set {data.root} cannot give it: change the experiment or "
                        f"--data (nothing was started)")


def gpu_memory_fraction(gpus_per_trial: float, config: dict) -> float | None:
    """The share of its GPU's memory a trial may allocate: its share of the GPU; None when it trains on CPU."""
    if gpus_per_trial <= 0 or config.get("device") == "cpu":
        return None
    return float(min(gpus_per_trial, 1.0))


# -- inside a Ray worker -------------------------------------------------------------------------

def limit_gpu_memory(fraction: float | None) -> float | None:
    """Cap this process's CUDA caching allocator at ``fraction`` of the device's memory (Ray exposes the
    trial's one GPU as device 0); nothing on CPU. Returns the cap set (None: none)."""
    import torch

    if fraction is None or not torch.cuda.is_available():
        return None
    torch.cuda.set_per_process_memory_fraction(fraction, 0)
    return fraction


def _log(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now().isoformat(timespec="seconds")
    with open_append(path) as f:
        f.write(f"{stamp} {text}\n")


def train_cell(job: dict) -> dict:
    """Train one cell into its run folder (fresh, or continued when a previous attempt left a config.json)."""
    from .trainer import RunConfig, run_training

    out = Path(job["out"])
    folder = RunFolder(out)
    if folder.is_finished():
        return folder.read_summary()
    cfg = RunConfig.from_json(job["config"])
    resume = folder.has_config()
    overwrite = not resume and out.is_dir() and any(out.iterdir())  # an attempt that died before config.json
    return run_training(cfg, out, job["data"], resume=resume, overwrite=overwrite, progress=False)


def _trial(config: dict) -> None:
    """The Tune trainable: one cell; an exception makes Tune retry it (FailureConfig) or record it failed."""
    import torch
    from ray import tune

    job = config["job"]
    torch.set_num_threads(max(1, int(job["threads"])))
    cap = limit_gpu_memory(job.get("gpu_memory_fraction"))
    log = Path(job["log"])
    _log(log, f"{ATTEMPT}on {platform.node()} pid {os.getpid()}, {torch.get_num_threads()} threads, "
              f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}, "
              f"GPU memory cap {'none' if cap is None else f'{cap:g} of the device'}")
    try:
        summary = train_cell(job)
    except BaseException as exc:
        _log(log, "traceback:\n" + traceback.format_exc().rstrip())
        _log(log, f"{ERROR}{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        raise
    post = summary["paper_post"]
    _log(log, "complete")
    tune.report({"dice": summary["metrics"][post]["dice"], "post": post})


def _trial_name(trial) -> str:
    return trial.config["job"]["id"]


# -- the driver ------------------------------------------------------------------------------------

def _check_resources(gpus_per_trial: float, cpus_per_trial: int) -> None:
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    max_gpu = max((n["Resources"].get("GPU", 0) for n in nodes), default=0)
    max_cpu = max((n["Resources"].get("CPU", 0) for n in nodes), default=0)
    if gpus_per_trial > 0 and max_gpu == 0:
        raise UserError(f"--gpus-per-trial {gpus_per_trial:g} asks for GPUs, but the Ray cluster has none "
                        "(trials would wait forever); pass --gpus-per-trial 0 to train on CPU")
    if gpus_per_trial > max_gpu:
        raise UserError(f"--gpus-per-trial {gpus_per_trial:g} is more than any Ray node has ({max_gpu:g})")
    if cpus_per_trial > max_cpu:
        raise UserError(f"--cpus-per-trial {cpus_per_trial} is more than any Ray node has ({max_cpu:g})")


def _start_ray(address: str | None) -> bool:
    """Join ``address`` or start a local Ray; reuse a session this process already has. True if we started it."""
    import ray

    if ray.is_initialized():
        return False
    # plugin methods named by SSL_BENCH_PLUGINS must load in the workers too (entry points are installed), and
    # set but empty it switches the entry points off there as here
    plugins = os.environ.get("SSL_BENCH_PLUGINS")
    extra = {"runtime_env": {"env_vars": {"SSL_BENCH_PLUGINS": plugins.strip()}}} if plugins is not None else {}
    try:
        if address:
            ray.init(address=address, log_to_driver=False, **extra)
        else:
            ray.init(include_dashboard=False, log_to_driver=False, **extra)
    except ConnectionError as exc:
        raise UserError(f"cannot join the Ray cluster at {address!r} ({exc})") from None
    return True


def _attempts(log: Path) -> tuple[int, str | None]:
    """Attempts of this sweep invocation and the last error line, from the cell's log."""
    if not log.is_file():
        return 0, None
    lines = log.read_text().splitlines()
    starts = [i for i, ln in enumerate(lines) if ln.partition(" ")[2].startswith(SWEEP_START)]
    lines = lines[starts[-1] + 1:] if starts else lines
    texts = [text for stamp, _, text in (ln.partition(" ") for ln in lines) if _is_stamp(stamp)]
    attempts = sum(1 for t in texts if t.startswith(ATTEMPT))
    errors = [t[len(ERROR):] for t in texts if t.startswith(ERROR)]
    return attempts, (errors[-1] if errors else None)


def _is_stamp(token: str) -> bool:
    try:
        _dt.datetime.fromisoformat(token)
    except ValueError:
        return False
    return True


def _data_set(data_dir, dry_run: bool):
    """The data set (an LAData); None for a dry run without reachable data, which plans with LA's settings."""
    from .data import LAData

    try:
        return LAData(data_dir)
    except UserError:
        if dry_run:
            return None
        raise


def select_cells(cells: list[Cell], only) -> list[Cell]:
    """The planned cells whose ID matches a glob of ``only`` (all when empty), with the providers they reuse."""
    if not only:
        return cells
    by_id = {c.id: c for c in cells}
    keep = {c.id for c in cells if any(fnmatch.fnmatchcase(c.id, pattern) for pattern in only)}
    if not keep:
        raise UserError(f"--only {' '.join(only)} matches no cell of the experiment (see --dry-run for the IDs)")
    for cid in list(keep):
        while by_id[cid].teacher in by_id and by_id[cid].teacher not in keep:
            cid = by_id[cid].teacher
            keep.add(cid)
    return [c for c in cells if c.id in keep]


def run_sweep(experiment, data_dir=None, runs_dir="runs", gpus_per_trial: float = 0.0, cpus_per_trial: int = 1,
              max_concurrent: int | None = None, address: str | None = None, resume: bool = False,
              max_failures: int = 2, dry_run: bool = False, echo=click.echo, only: tuple[str, ...] = ()) -> dict:
    """Run every missing cell of ``experiment`` (``only``: the cells whose ID matches one of these glob patterns,
    and the stage-1 providers they need); returns the status written to status.json."""
    if not 0 <= gpus_per_trial <= 1:
        raise UserError(f"--gpus-per-trial must be between 0 and 1 (a trial trains on one device), got {gpus_per_trial:g}")
    if cpus_per_trial < 1:
        raise UserError(f"--cpus-per-trial must be at least 1, got {cpus_per_trial}")
    if max_concurrent is not None and max_concurrent < 1:
        raise UserError(f"--max-concurrent must be at least 1, got {max_concurrent}")
    if max_failures < 0:
        raise UserError(f"--max-failures must be 0 or more, got {max_failures}")
    exp = load_experiment(experiment)
    runs_dir = Path(runs_dir).resolve()
    # one sweep per runs folder at a time (two would train the same cells into the same folders); the lock
    # lives in <runs-dir>/_sweeps/.lock and is dropped by the operating system if this driver dies
    with (nullcontext() if dry_run else lock_sweeps(runs_dir)):
        cells = select_cells(exp.plan(), only)
        data = _data_set(data_dir, dry_run)
        defaults = data.run_defaults() if data is not None else {}
        if data is not None:  # an impossible cell: one line here, not a trial Ray retries
            check_cells(cells, data, runs_dir, gpus_per_trial, defaults)
        elif dry_run:
            echo("note: no data set found (--data / SSL_BENCH_DATA): the cells are not checked against one")
        todo, complete = classify(cells, runs_dir, gpus_per_trial, resume, defaults, None if dry_run else data)
        n_implicit = sum(c.implicit for c in cells)
        echo(f"sweep {exp.name}: {len(cells)} cells ({n_implicit} stage-1 providers added), "
             f"{len(complete)} complete, {len(todo)} to run; runs in {runs_dir}")
        state_dir = sweep_dir(runs_dir, exp.name)
        status = {c.id: {"state": "skipped", "attempts": 0, "error": None, "implicit": c.implicit, "teacher": c.teacher,
                         "run_dir": str(c.run_dir(runs_dir))} for c in cells}
        for c in todo:  # with the GPU memory cap its trial is given (a complete cell is not run)
            status[c.id].update(state="pending", gpu_memory_fraction=gpu_memory_fraction(
                gpus_per_trial, cell_config(c, runs_dir, gpus_per_trial, defaults)))
        if dry_run:
            for c in cells:
                echo(f"  {status[c.id]['state']:8s} {c.id}" + (f"  (stage 1 from {c.teacher})" if c.teacher else ""))
            return status
        data_root = str(Path(data.root).resolve())

        def save_status() -> None:  # after planning and after every wave: a killed driver leaves it current
            atomic_write_json(state_dir / "status.json", {
                "experiment": exp.name, "file": str(exp.path), "data": data_root,
                "resources": {"gpus_per_trial": gpus_per_trial, "cpus_per_trial": cpus_per_trial},
                # the rest of the launch: which cells (--only), how Tune ran them (issue 23: every option recorded)
                "only": list(only), "ray": {"address": address, "max_concurrent_trials": max_concurrent,
                                            "max_failures": max_failures},
                "updated": _dt.datetime.now().isoformat(timespec="seconds"), "cells": status})

        if todo:
            save_status()
            started = _start_ray(address)
            try:
                _check_resources(gpus_per_trial, cpus_per_trial)
                _run_waves(exp.name, todo, cells, status, runs_dir, state_dir, data_root, gpus_per_trial,
                           cpus_per_trial, max_concurrent, max_failures, echo, save_status, defaults)
            finally:
                if started:
                    import ray

                    ray.shutdown()
        save_status()
        failed = [cid for cid, s in status.items() if s["state"] == "failed"]
        for cid, s in status.items():
            echo(f"  {s['state']:8s} {cid}" + (f"  ({s['error']})" if s["error"] else ""))
        if failed:
            first = status[failed[0]]
            raise UserError(f"{len(failed)} of {len(cells)} cells failed, e.g. {failed[0]}: {first['error']} "
                            f"(logs in {state_dir / 'logs'})")
        echo(f"sweep {exp.name}: all {len(cells)} cells complete")
        return status


def make_job(cell: Cell, runs_dir: Path, gpus: float, cpus: int, data_root: str, log: Path,
             dataset_defaults: dict | None = None) -> dict:
    """What one trial is handed: the cell's exact config, its folder, its threads and its GPU memory cap."""
    config = cell_config(cell, runs_dir, gpus, dataset_defaults)
    return {"id": cell.id, "config": config, "out": str(cell.run_dir(runs_dir)), "data": data_root,
            "threads": cpus, "log": str(log), "gpu_memory_fraction": gpu_memory_fraction(gpus, config)}


def _run_waves(name, todo, cells, status, runs_dir, state_dir, data_root, gpus, cpus, max_concurrent,
               max_failures, echo, save_status, dataset_defaults=None) -> None:
    from ray import tune

    depth = wave_index(cells)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    for wave in sorted({depth[c.id] for c in todo}):
        jobs = []
        for cell in (c for c in todo if depth[c.id] == wave):
            log = state_dir / "logs" / f"{cell.id}.log"
            _log(log, f"{SWEEP_START}{name} {stamp}")
            if cell.teacher and not RunFolder(Path(runs_dir) / cell.teacher).is_finished():
                status[cell.id].update(state="failed", error=f"stage-1 provider {cell.teacher} did not complete")
                continue
            jobs.append(make_job(cell, runs_dir, gpus, cpus, data_root, log, dataset_defaults))
        if not jobs:
            continue
        echo(f"wave {wave}: {len(jobs)} trial(s) on Ray ({cpus} CPU, {gpus:g} GPU each)")
        t0 = time.perf_counter()
        tuner = tune.Tuner(
            tune.with_resources(_trial, {"cpu": cpus, "gpu": gpus}),
            param_space={"job": tune.grid_search(jobs)},
            tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrent, trial_name_creator=_trial_name,
                                        trial_dirname_creator=_trial_name),
            run_config=tune.RunConfig(name=f"{name}-{stamp}-wave{wave}", storage_path=str(state_dir / "ray"),
                                      failure_config=tune.FailureConfig(max_failures=max_failures), verbose=0),
        )
        results = tuner.fit()
        errors = {r.config["job"]["id"]: r.error for r in results if r.config}
        for job in jobs:
            attempts, error = _attempts(Path(job["log"]))
            done = RunFolder(job["out"]).is_finished()
            if not done and error is None:
                err = errors.get(job["id"])
                error = f"{type(err).__name__}: {err}".splitlines()[0] if err else "did not finish"
            status[job["id"]].update(state="complete" if done else "failed", attempts=attempts,
                                     error=None if done else error)
        save_status()
        echo(f"wave {wave} done in {time.perf_counter() - t0:.0f} s")


@click.command("sweep")
@click.argument("experiment")
@click.option("--data", "data_dir", default=None, help="LA data root (the folder with train.list); default: $SSL_BENCH_DATA")
@click.option("--gpus-per-trial", type=float, default=0.0, show_default=True,
              help="GPUs per trial; a fraction (e.g. 0.5) shares one GPU between trials; 0 trains on CPU")
@click.option("--cpus-per-trial", type=int, default=1, show_default=True, help="CPUs per trial (= torch threads)")
@click.option("--max-concurrent", type=int, default=None, help="at most this many trials at once (default: as resources allow)")
@click.option("--address", default=None, help="join an existing Ray cluster (e.g. auto) instead of starting one")
@click.option("--resume", is_flag=True, help="continue incomplete run folders (e.g. after the driver was killed)")
@click.option("--runs-dir", type=click.Path(path_type=Path), default=Path("runs"), show_default=True,
              help="where the run folders live (one per cell ID; shared between experiments)")
@click.option("--max-failures", type=int, default=2, show_default=True, help="retries of a crashing trial")
@click.option("--dry-run", is_flag=True, help="print the plan (cells, states, stage-1 providers) and stop")
@click.option("--only", multiple=True, metavar="GLOB",
              help="run only the cells whose ID matches (repeatable, e.g. 'vnet-L8-*'), with the stage-1 cells they reuse")
def sweep_command(experiment, data_dir, gpus_per_trial, cpus_per_trial, max_concurrent, address, resume, runs_dir,
                  max_failures, dry_run, only):
    """Train every cell of EXPERIMENT (a name in experiments/ or a .toml path) as Ray Tune trials."""
    run_sweep(experiment, data_dir, runs_dir, gpus_per_trial, cpus_per_trial, max_concurrent, address, resume,
              max_failures, dry_run, only=tuple(only))
