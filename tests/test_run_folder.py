"""The run-folder module: one place for the layout (every file name), and every read and write through it."""
import ast
import json
import re
from pathlib import Path

import pytest

from ssl_bench import run_folder as rf
from ssl_bench.errors import UserError
from ssl_bench.run_folder import RunFolder

REPO = Path(__file__).resolve().parents[1]
#: the names of a run folder's files, as they would be spelled in code that builds a path by hand
NAMES = {rf.CONFIG, rf.LOG, rf.SUMMARY, rf.METRICS, rf.METRICS_LAST, rf.CHECKPOINTS, rf.STAGES, "last.pt",
         "previous.pt"}
#: the modules that may spell them: the run-folder module, the generic run-file layer it builds on
ALLOWED = {"run_folder.py", "runs.py"}


def _path_literals(path: Path):
    """(line, text) of each literal in ``path`` that names a run-folder entry as a path: a file name as a whole
    string, a folder name joined with ``/``, or an f-string spelling a stage file (``f"stage{k}.pt"``)."""
    files = {n for n in NAMES if "." in n}
    folders = NAMES - files
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in files:
            yield node.lineno, node.value
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            for side in (node.left, node.right):
                if isinstance(side, ast.Constant) and side.value in folders:
                    yield side.lineno, side.value
        elif isinstance(node, ast.JoinedStr):
            text = "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
            if re.search(r"stage\{\}(_best|_last)?\.pt", text) and not re.search(r"\w \S*stage\{\}", text):
                yield node.lineno, text


def test_no_module_spells_a_run_folder_file_name():
    """Issue 22: the schema is written in one place; every other module goes through RunFolder or its constants."""
    found = []
    for path in sorted((REPO / "ssl_bench").glob("*.py")) + sorted((REPO / "methods").glob("*.py")):
        if path.name in ALLOWED:
            continue
        for line, text in _path_literals(path):
            found.append(f"{path.relative_to(REPO)}:{line}: {text!r}")
    assert not found, "run-folder file names spelled outside ssl_bench/run_folder.py:\n" + "\n".join(found)


def test_the_layout_is_the_documented_one(tmp_path):
    f = RunFolder(tmp_path / "run")
    assert f.config_path == tmp_path / "run" / "config.json"
    assert f.log_path.name == "log.jsonl" and f.summary_path.name == "summary.json"
    assert f.metrics_path() .name == "metrics_per_case.csv"
    assert f.metrics_path("last").name == "metrics_per_case_last.csv"
    assert f.stage_path(2) == tmp_path / "run" / "stages" / "stage2.pt"
    assert f.stage_path(1, "last") == tmp_path / "run" / "stages" / "stage1_last.pt"
    assert f.best_path(1) == tmp_path / "run" / "checkpoints" / "stage1_best.pt"
    for name in ("config.json", "log.jsonl", "summary.json", "metrics_per_case.csv", "metrics_per_case_last.csv",
                 "checkpoints/last.pt", "checkpoints/previous.pt", "stages/stageK.pt", "stages/stageK_last.pt",
                 "checkpoints/stageK_best.pt", ".lock"):
        assert name in rf.__doc__, f"{name} is not documented in the run-folder schema"


def test_metrics_round_trip_exactly_and_a_damaged_csv_is_one_line(tmp_path):
    f = RunFolder(tmp_path)
    rows = [{"case": "A", "post": "raw", "dice": 0.1 + 0.2, "jaccard": 1 / 3, "hd95": 2.0, "asd": 0.5, "empty": False}]
    f.write_metrics(rows)
    back = f.read_metrics()
    assert list(back.columns) == list(rf.METRIC_COLUMNS)
    assert back["dice"][0] == 0.1 + 0.2 and back["jaccard"][0] == 1 / 3  # repr floats: exact
    f.metrics_path().write_text("case,post\nA,raw\n")
    with pytest.raises(UserError, match="metrics_per_case.csv is damaged .no 'dice' column"):
        f.read_metrics()
    f.metrics_path().write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(UserError, match="is damaged"):
        f.read_metrics()


def test_truncate_log_keeps_what_a_resume_stands_on(tmp_path):
    f = RunFolder(tmp_path)
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "stage1.pt").write_bytes(b"")
    rows = [{"stage": 1, "iteration": i} for i in (1, 2)] + [{"stage": 2, "iteration": i} for i in (1, 2, 3)]
    f.log_path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"stage": 2, "iter')  # a cut line
    f.truncate_log({"stage": 1, "iteration": 2})  # checkpoint: stage 2 (0-based 1) at iteration 2
    assert [(r["stage"], r["iteration"]) for r in f.read_log()] == [(1, 1), (1, 2), (2, 1), (2, 2)]
    f.truncate_log(None)  # no checkpoint: finished stages only
    assert [(r["stage"], r["iteration"]) for r in f.read_log()] == [(1, 1), (1, 2)]


@pytest.mark.parametrize("entry, read", [
    ("config.json", lambda f: f.read_config()),
    ("config.json", lambda f: f.has_config()),
    ("summary.json", lambda f: f.read_summary()),
    ("summary.json", lambda f: f.is_finished()),
    ("metrics_per_case.csv", lambda f: f.read_metrics()),
    ("log.jsonl", lambda f: f.read_log()),
    ("stages", lambda f: f.finished_stages()),
    ("stages", lambda f: f.load_stage(1)),
    ("stages/stage1.pt", lambda f: f.load_stage(1)),
    ("checkpoints", lambda f: f.load_checkpoint()),
    ("checkpoints/last.pt", lambda f: f.load_checkpoint()),
])
def test_every_reader_refuses_an_entry_that_is_a_link(tmp_path, entry, read):
    """Issue 23: an entry of a run folder read through a symbolic link would take a file from elsewhere as the run's
    own (a linked summary.json made an interrupted cell count as complete); every reader refuses it in one line."""
    run, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    (run / "stages").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    elsewhere.mkdir()
    target = elsewhere / Path(entry).name
    if entry in ("stages", "checkpoints"):
        (run / entry).rmdir()
        target.mkdir()
    else:
        target.write_text("{}")
    (run / entry).symlink_to(target, target_is_directory=target.is_dir())
    with pytest.raises(UserError, match=f"refusing to use {re.escape(str(run / entry))}: it is a symbolic link.*"
                                        "reading through it"):
        read(RunFolder(run))


def test_a_metrics_row_cut_short_is_one_line(tmp_path):
    f = RunFolder(tmp_path)
    f.write_metrics([{"case": c, "post": "raw", "dice": 0.5, "jaccard": 0.3, "hd95": 2.0, "asd": 0.5, "empty": False}
                     for c in ("A", "B")])
    text = f.metrics_path().read_text()
    f.metrics_path().write_text(text[: text.rindex(",")])
    with pytest.raises(UserError, match="is damaged .a row with a missing value"):
        f.read_metrics()
