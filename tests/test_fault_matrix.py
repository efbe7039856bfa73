"""Issue 23's done-when: every probe, on every command that reads a run folder, ends in one line and exit 2 or in a
correct result; nothing outside the output folder is created, changed or deleted; no planted code runs.

``tests/test_faults.py`` holds each probe where it was found. Here the same probes are crossed with every reader:

- commands: ``eval``, ``run --resume``, ``run --overwrite``, ``run --teacher``, ``occlusion``, ``curves``, ``report``,
  ``sweep --resume`` (a finished cell, and an interrupted one whose trial runs in-process instead of on Ray);
- probes: the run folder's entries as symbolic links out of it (``.lock``, ``config.json``, ``log.jsonl``,
  ``summary.json``, the metrics CSV, ``checkpoints/``, ``stages/``), an entry that is a folder where a file belongs,
  damaged records (config.json not JSON, of a wrong type or range; summary.json, the metrics CSV and log.jsonl cut
  short), a stage file or checkpoint that would run code when unpickled, and a reordered train.list or test.list.

Each (probe, command) pair has its expected outcome in ``REFUSED``: refused (exit 2, one line on stderr that holds the
given words) or "ok" (exit 0 and the command's own result, checked). Every pair also asserts: no traceback, no warning
lines, the outside files and the data untouched (hashes), the planted code never ran, and a refused command left the
run folder as it found it.
"""
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from ssl_bench.cli import main

from test_faults import ARGS, BCP_ARGS, EXPERIMENT, _Planted, tree

OUTSIDE_TEXT = "not ssl-bench's to write\n"


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Tiny data; a finished vnet run and the same run interrupted after iteration 1, trained once for the module."""
    from ssl_bench.experiments import load_experiment
    from ssl_bench.testing import make_tiny_la
    from ssl_bench.trainer import build_config, run_training
    from ssl_bench.errors import Interrupted

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("matrix")
    data = make_tiny_la(tmp / "LA")
    settings = dict(labeled=4, patch=(16, 16, 16), n_filters=2, iterations=2, device="cpu", eval_cases=1,
                    checkpoint_every=1)
    exp = tmp / "issue23.toml"
    exp.write_text(EXPERIMENT)
    (cell,) = load_experiment(exp).plan()
    run_training(build_config("vnet", "smoke", **settings), tmp / "full", data, progress=False)
    with pytest.raises(Interrupted):
        run_training(build_config("vnet", "smoke", **settings), tmp / "cut", data, progress=False, stop_at=(1, 1))
    yield {"data": data, "full": tmp / "full", "cut": tmp / "cut", "cell": cell.run_dir(Path("runs")).name}
    torch.set_num_threads(n)


# ------------------------------------------------------------------ the probes: each changes one run folder or data set

def _link_out(run: Path, name: str, outside: Path) -> None:
    """Move the entry ``name`` out of the run folder and leave a symbolic link to it in its place (a link to a file
    created outside when the run has no such entry)."""
    entry, target = run / name, outside / name
    if entry.exists():
        shutil.move(entry, target)
    else:
        target.write_text(OUTSIDE_TEXT)
    entry.symlink_to(target, target_is_directory=target.is_dir())


def _folder_in_place(run: Path, name: str) -> None:
    entry = run / name
    if entry.exists():
        entry.unlink()
    entry.mkdir()
    (entry / "keep.txt").write_text("mine\n")


def _edit_config(run: Path, edit) -> None:
    path = run / "config.json"
    stored = json.loads(path.read_text())
    edit(stored)
    path.write_text(json.dumps(stored))


def _cut_short(run: Path, name: str) -> None:
    path = run / name
    if path.exists():
        text = path.read_bytes()
        path.write_bytes(text[: len(text) // 2])


def _plant(run: Path, name: str, marker: Path) -> None:
    path = run / name
    if path.exists():
        path.write_bytes(pickle.dumps({"weights": _Planted(marker), "nets": _Planted(marker)}, protocol=4))


def _reorder(data: Path, name: str, i: int, j: int) -> None:
    path = data / name
    ids = path.read_text().split()
    ids[i], ids[j] = ids[j], ids[i]
    path.write_text("".join(x + "\n" for x in ids))


PROBES = {
    "lock-link": lambda run, data, out, marker: _link_out(run, ".lock", out),
    "config-link": lambda run, data, out, marker: _link_out(run, "config.json", out),
    "log-link": lambda run, data, out, marker: _link_out(run, "log.jsonl", out),
    "summary-link": lambda run, data, out, marker: _link_out(run, "summary.json", out),
    "metrics-link": lambda run, data, out, marker: _link_out(run, "metrics_per_case.csv", out),
    "checkpoints-link": lambda run, data, out, marker: _link_out(run, "checkpoints", out),
    "stages-link": lambda run, data, out, marker: _link_out(run, "stages", out),
    "config-folder": lambda run, data, out, marker: _folder_in_place(run, "config.json"),
    "log-folder": lambda run, data, out, marker: _folder_in_place(run, "log.jsonl"),
    "config-not-json": lambda run, data, out, marker: (run / "config.json").write_text("{\"config\": "),
    "config-labeled-text": lambda run, data, out, marker: _edit_config(
        run, lambda c: c["config"].__setitem__("labeled", "four")),
    "config-stride-0": lambda run, data, out, marker: _edit_config(
        run, lambda c: c["config"].__setitem__("eval_stride_xy", 0)),
    "summary-cut": lambda run, data, out, marker: _cut_short(run, "summary.json"),
    "metrics-cut": lambda run, data, out, marker: _cut_short(run, "metrics_per_case.csv"),
    "log-cut": lambda run, data, out, marker: _cut_short(run, "log.jsonl"),
    "stage-code": lambda run, data, out, marker: _plant(run, "stages/stage1.pt", marker),
    "checkpoint-code": lambda run, data, out, marker: _plant(run, "checkpoints/last.pt", marker),
    "test-list-reordered": lambda run, data, out, marker: _reorder(data, "test.list", 0, 1),
    "train-list-reordered": lambda run, data, out, marker: _reorder(data, "train.list", 0, 5),
}


# ------------------------------------------------------------------ the commands: each reads the run folder RUN

def _teacher_ready(run: Path) -> None:
    """The finished vnet run relabelled as BCP's stage 1, so that ``run --method bcp --teacher`` takes it."""
    stage = run / "stages" / "stage1.pt"
    if stage.is_file() and not stage.is_symlink():
        try:
            handed = torch.load(stage, weights_only=True)
        except Exception:
            return  # a planted file stays as the probe left it
        torch.save({**handed, "stage_class": "BCPStage1"}, stage)


def _in_process_waves(name, todo, cells, status, runs_dir, state_dir, data_root, gpus, cpus, *rest, **kw):
    """Ray's waves, run in this process: each cell's trial is sweep.train_cell, its error recorded as Ray's path does."""
    from ssl_bench import sweep
    from ssl_bench.run_folder import RunFolder

    for cell in todo:
        job = sweep.make_job(cell, runs_dir, gpus, cpus, data_root, state_dir / "logs" / f"{cell.id}.log")
        try:
            sweep.train_cell(job)
            error = None
        except Exception as exc:  # noqa: BLE001 -- what the trial logs as its ERROR line
            error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        done = RunFolder(job["out"]).is_finished()
        status[cell.id].update(state="complete" if done else "failed", attempts=1, error=None if done else error)


COMMANDS = {
    # name: (which base run, the argument list given RUN, DATA, EXP and a fresh output folder OUT)
    "eval": ("full", lambda run, data, exp, out: ["eval", run, "--data", data, "--quiet"]),
    "resume": ("cut", lambda run, data, exp, out: ["run", *ARGS, "--data", data, "--out", run, "--resume"]),
    "overwrite": ("full", lambda run, data, exp, out: ["run", *ARGS, "--data", data, "--out", run, "--overwrite"]),
    "teacher": ("full", lambda run, data, exp, out: ["run", *BCP_ARGS, "--data", data, "--teacher", run,
                                                     "--out", out]),
    "occlusion": ("full", lambda run, data, exp, out: ["occlusion", run, "--data", data, "--ratios", "0,0.5",
                                                       "--repeats", "1", "--no-panel", "--quiet", "--out", out]),
    "curves": ("full", lambda run, data, exp, out: ["curves", run, "--out", out / "curves"]),
    "report": ("full", lambda run, data, exp, out: ["report", exp, "--runs-dir", run.parent, "--out", out]),
    "sweep-finished": ("full", lambda run, data, exp, out: ["sweep", exp, "--data", data, "--runs-dir", run.parent,
                                                            "--resume"]),
    "sweep-resume": ("cut", lambda run, data, exp, out: ["sweep", exp, "--data", data, "--runs-dir", run.parent,
                                                         "--resume"]),
}

LINK, FOLDER, DAMAGED, CODE, SPLIT = "symbolic link", "a folder, not a regular file", "is damaged", "could run code", \
    "split changed"
#: (probe, command) -> the words of its one line (exit 2); a pair not named here ends in the command's correct result
REFUSED = {
    "lock-link": dict.fromkeys(["eval", "resume", "overwrite", "sweep-resume"], LINK),
    "config-link": {**dict.fromkeys(["eval", "resume", "teacher", "occlusion", "curves", "report", "sweep-finished",
                                     "sweep-resume"], LINK), "overwrite": "not a run folder"},
    "log-link": dict.fromkeys(["eval", "resume", "curves", "sweep-resume"], LINK),
    "summary-link": dict.fromkeys(["eval", "resume", "occlusion", "report", "sweep-finished", "sweep-resume"], LINK),
    "metrics-link": dict.fromkeys(["eval", "resume", "occlusion", "report", "sweep-resume"], LINK),
    "checkpoints-link": dict.fromkeys(["eval", "resume", "sweep-resume"], LINK),
    "stages-link": dict.fromkeys(["eval", "resume", "teacher", "occlusion", "sweep-resume"], LINK),
    "config-folder": {**dict.fromkeys(["eval", "teacher", "occlusion", "curves", "report", "sweep-finished",
                                       "sweep-resume"], FOLDER), "resume": "nothing to resume",
                      "overwrite": "not a run folder"},
    "log-folder": dict.fromkeys(["eval", "resume", "curves", "sweep-resume"], FOLDER),
    "config-not-json": {**dict.fromkeys(["eval", "resume", "teacher", "occlusion", "curves", "report",
                                         "sweep-finished", "sweep-resume"], DAMAGED), "overwrite": "not a run folder"},
    "config-labeled-text": {"eval": DAMAGED, "occlusion": DAMAGED, "resume": "cannot resume",
                            "sweep-resume": "cannot resume", "teacher": "its labeled is", "report": "not the cell",
                            "sweep-finished": "not this cell"},
    "config-stride-0": {"eval": DAMAGED, "occlusion": DAMAGED, "resume": "cannot resume", "sweep-resume": "cannot resume",
                        "report": "not the cell", "sweep-finished": "not this cell"},
    "summary-cut": dict.fromkeys(["eval", "occlusion", "report", "sweep-finished"], DAMAGED),
    "metrics-cut": dict.fromkeys(["occlusion", "report"], DAMAGED),
    "log-cut": {},  # a last line cut short is what an interruption leaves: skipped by every reader
    "stage-code": dict.fromkeys(["eval", "teacher", "occlusion"], CODE),
    "checkpoint-code": dict.fromkeys(["resume", "sweep-resume"], CODE),
    "test-list-reordered": dict.fromkeys(["eval", "resume", "teacher", "occlusion", "report", "sweep-finished",
                                          "sweep-resume"], SPLIT),
    "train-list-reordered": dict.fromkeys(["eval", "resume", "teacher", "occlusion", "report", "sweep-finished",
                                           "sweep-resume"], SPLIT),
}


def _regular(path: Path) -> bool:
    return path.is_file() and not path.is_symlink()


def _correct_result(command: str, ctx: dict) -> None:
    """What each command gives when it goes on: its own output, complete, inside its own folder."""
    run, out = ctx["run"], ctx["out"]
    if command in ("eval", "resume", "overwrite", "sweep-resume"):
        summary = json.loads((run / "summary.json").read_text())
        assert _regular(run / "summary.json") and _regular(run / "metrics_per_case.csv") and summary["metrics"]
        assert _regular(run / "config.json") and _regular(run / "log.jsonl")
    elif command == "teacher":
        assert _regular(out / "summary.json") and json.loads((out / "config.json").read_text())["config"]["teacher"]
    elif command == "occlusion":
        assert json.loads((out / "occlusion.json").read_text())["status"] == "complete"
        assert _regular(out / "occlusion_per_case.csv")
    elif command == "curves":
        assert _regular(out / "curves.png") and _regular(out / "curves.pdf")
    elif command == "report":
        import pandas as pd

        table = pd.read_csv(out / "table.csv")
        dice = json.loads((run / "summary.json").read_text())["metrics"]["raw"]["dice"]
        raw = table[(table["method"] == "vnet") & (table["post"] == "raw")]
        assert list(raw["status"]) == ["complete"] and raw["dice_mean"].iloc[0] == pytest.approx(100 * dice)
    elif command == "sweep-finished":  # the cell is complete: nothing of its folder is touched
        assert tree(run) == ctx["before_run"]


def _case(probe: str, command: str, made, tmp_path, monkeypatch, capsys):
    from ssl_bench import sweep

    monkeypatch.setattr(sweep, "_start_ray", lambda address: False)
    monkeypatch.setattr(sweep, "_check_resources", lambda gpus, cpus: None)
    monkeypatch.setattr(sweep, "_run_waves", _in_process_waves)
    base, args = COMMANDS[command]
    data = tmp_path / "LA"
    shutil.copytree(made["data"], data)
    runs = tmp_path / "runs"
    runs.mkdir()
    run = runs / made["cell"]
    shutil.copytree(made[base], run, symlinks=True)
    _edit_config(run, lambda c: c["data"].__setitem__("root", str(data)))  # the report reads the recorded root
    if command == "teacher":
        _teacher_ready(run)
    exp = tmp_path / "issue23.toml"
    exp.write_text(EXPERIMENT)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text(OUTSIDE_TEXT)
    marker = tmp_path / "planted-ran"
    PROBES[probe](run, data, outside, marker)
    out = tmp_path / "out"
    before_outside, before_run = tree(outside, data, exp), tree(run)
    capsys.readouterr()
    rc = main([str(a) for a in args(run, data, exp, out)])
    captured = capsys.readouterr()
    return rc, captured, {"run": run, "data": data, "out": out, "outside": outside, "marker": marker,
                          "before_outside": before_outside, "before_run": before_run, "exp": exp}


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("probe", list(PROBES))
def test_every_probe_on_every_reader(probe, command, made, tmp_path, monkeypatch, capsys):
    rc, captured, ctx = _case(probe, command, made, tmp_path, monkeypatch, capsys)
    err = captured.err.strip()
    assert "Traceback" not in err and "Warning" not in err, err
    assert not ctx["marker"].exists(), "the planted code ran"
    assert tree(ctx["outside"], ctx["data"], ctx["exp"]) == ctx["before_outside"], "a file outside was changed"
    words = REFUSED[probe].get(command)
    if words is None:
        assert rc == 0, err
        assert all(line.startswith("ssl-bench: resuming from") for line in err.splitlines()), err
        _correct_result(command, ctx)
    else:
        lines = err.splitlines()
        assert rc == 2 and len(lines) == 1 and words in lines[0], err
        assert tree(ctx["run"]) == ctx["before_run"], "a refused command changed the run folder"
        assert not ctx["out"].exists() or command == "teacher" and not (ctx["out"] / "config.json").exists()
