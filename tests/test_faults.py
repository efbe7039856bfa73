"""Issue 23: three data-loss faults, each refused with one line on stderr and exit code 2, nothing outside changed.

1. Links in a run folder: ``.lock`` (and ``<runs-dir>/_sweeps/.lock``), ``log.jsonl``, ``checkpoints/``,
   ``stages/`` that are symbolic links are refused instead of written through.
2. ``--overwrite`` empties only a run folder (an intact config.json written by ssl-bench), never the data
   folder, a folder inside or above it, a folder of other files, or the target of a link.
3. A changed train.list or test.list (reordered: same files, same checksums) is refused by eval, occlusion,
   --resume, --teacher, sweep --resume and report, naming the first differing id and its list.

Tiny V-Net runs (16³ patch, width 2, 2 iterations, one test case) on ssl_bench.testing.make_tiny_la data.
"""
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from ssl_bench.cli import main
from ssl_bench.errors import Interrupted, UserError

SETTINGS = dict(labeled=4, patch=(16, 16, 16), n_filters=2, iterations=2, device="cpu", eval_cases=1,
                checkpoint_every=1)
ARGS = ["--method", "vnet", "--profile", "smoke", "--labeled", "4", "--patch", "16,16,16", "--n-filters", "2",
        "--iterations", "2", "--device", "cpu", "--eval-cases", "1", "--checkpoint-every", "1", "--quiet"]
BCP_ARGS = ["--method", "bcp", "--profile", "smoke", "--labeled", "4", "--patch", "16,16,16", "--n-filters", "2",
            "--iterations", "2", "--device", "cpu", "--eval-cases", "1", "--quiet"]
CASES = "2018LA_Seg_Training Set"
EXPERIMENT = """title = "issue 23"
profile = "smoke"
seeds = [1337]
protocols = ["honest"]
[run]
iterations = 2
patch = [16, 16, 16]
n_filters = 2
eval_cases = 1
checkpoint_every = 1
[[grid]]
methods = ["vnet"]
labeled = [4]
"""


def cli(*args) -> int:
    return main([str(a) for a in args])


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    lines = err.splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def tree(*roots) -> dict:
    """sha256 of every file under ``roots`` (links as their target text, never followed); a run folder's own
    regular ``.lock`` is left out (taking the lock rewrites its note)."""
    out = {}
    for root in map(Path, roots):
        if root.is_symlink() or not root.is_dir():
            paths = [root]
        else:
            paths = [root]
            for folder, dirs, files in os.walk(root):
                paths += [Path(folder, n) for n in dirs + files]
        for p in paths:
            if p.is_symlink():
                out[str(p)] = "link " + os.readlink(p)
            elif p.is_dir():
                out[str(p)] = "folder"
            elif p.name != ".lock" and p.exists():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _config(**over):
    from ssl_bench.trainer import build_config

    return build_config("vnet", "smoke", **{**SETTINGS, **over})


@pytest.fixture(scope="module")
def base(tmp_path_factory, one_thread_module):
    """Tiny data D; a finished run; the same run interrupted after iteration 1."""
    from ssl_bench.testing import make_tiny_la
    from ssl_bench.trainer import run_training

    tmp = tmp_path_factory.mktemp("faults")
    data = make_tiny_la(tmp / "LA")
    run_training(_config(), tmp / "full", data, progress=False)
    with pytest.raises(Interrupted):
        run_training(_config(), tmp / "cut", data, progress=False, stop_at=(1, 1))
    return {"tmp": tmp, "data": data, "full": tmp / "full", "cut": tmp / "cut"}


@pytest.fixture(scope="module")
def one_thread_module():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def _outside(tmp_path: Path) -> Path:
    target = tmp_path / "outside" / "precious.txt"
    target.parent.mkdir()
    target.write_text("not ssl-bench's to write\n")
    return target


# ------------------------------------------------------------------ 1. links in a run folder

@pytest.mark.parametrize("command", ["eval", "resume", "overwrite", "fresh"])
def test_a_lock_that_is_a_link_is_refused_and_its_target_untouched(base, tmp_path, capsys, command):
    src = {"eval": "full", "resume": "cut", "overwrite": "full", "fresh": None}[command]
    run = _copy(base[src], tmp_path / "run") if src else tmp_path / "run"
    run.mkdir(exist_ok=True)
    target = _outside(tmp_path)
    (run / ".lock").unlink(missing_ok=True)
    (run / ".lock").symlink_to(target)
    before = tree(tmp_path, base["data"])
    if command == "eval":
        rc = cli("eval", run, "--quiet")
    else:
        extra = {"resume": ["--resume"], "overwrite": ["--overwrite"], "fresh": []}[command]
        rc = cli("run", *ARGS, "--data", base["data"], "--out", run, *extra)
    line = one_line(capsys)
    assert rc == 2 and str(run / ".lock") in line and "symbolic link" in line, line
    assert tree(tmp_path, base["data"]) == before
    assert target.read_text() == "not ssl-bench's to write\n"


@pytest.mark.parametrize("what", [".lock", "_sweeps"])
def test_the_sweep_lock_never_writes_through_a_link(tmp_path, capsys, what):
    runs = tmp_path / "runs"
    target = _outside(tmp_path)
    if what == ".lock":
        (runs / "_sweeps").mkdir(parents=True)
        (runs / "_sweeps" / ".lock").symlink_to(target)
    else:
        runs.mkdir()
        (runs / "_sweeps").symlink_to(target.parent, target_is_directory=True)
    before = tree(tmp_path)
    nowhere = tmp_path / "no-data"  # refused before the data is looked for
    rc = cli("sweep", Path(__file__).resolve().parents[1] / "experiments/smoke.toml", "--data", nowhere,
             "--runs-dir", runs)
    line = one_line(capsys)
    assert rc == 2 and "symbolic link" in line and "_sweeps" in line, line
    assert tree(tmp_path) == before and not (target.parent / ".lock").exists()


def test_a_dangling_log_link_creates_nothing_outside(base, tmp_path, capsys):
    run = _copy(base["cut"], tmp_path / "run")
    target = tmp_path / "outside" / "created.jsonl"
    target.parent.mkdir()
    (run / "log.jsonl").unlink()
    (run / "log.jsonl").symlink_to(target)
    before = tree(tmp_path, base["data"])
    rc = cli("run", *ARGS, "--data", base["data"], "--out", run, "--resume")
    line = one_line(capsys)
    assert rc == 2 and str(run / "log.jsonl") in line and "symbolic link" in line, line
    assert not target.exists() and tree(tmp_path, base["data"]) == before


def test_the_trainers_log_append_never_follows_a_link(tmp_path):
    from ssl_bench.runs import open_append

    target = tmp_path / "outside.jsonl"
    (tmp_path / "log.jsonl").symlink_to(target)
    with pytest.raises(UserError, match="symbolic link"):
        open_append(tmp_path / "log.jsonl")
    assert not target.exists()
    with open_append(tmp_path / "own.jsonl") as f:  # a plain file: appended as before
        f.write("a\n")
    with open_append(tmp_path / "own.jsonl") as f:
        f.write("b\n")
    assert (tmp_path / "own.jsonl").read_text() == "a\nb\n"


@pytest.mark.parametrize("folder, command", [("checkpoints", "resume"), ("stages", "eval"), ("stages", "resume")])
def test_a_linked_checkpoints_or_stages_folder_is_refused(base, tmp_path, capsys, folder, command):
    run = _copy(base["full" if command == "eval" else "cut"], tmp_path / "run")
    elsewhere = tmp_path / "outside" / folder
    elsewhere.parent.mkdir()
    if (run / folder).exists():
        shutil.move(run / folder, elsewhere)
    else:
        elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("mine\n")
    (run / folder).symlink_to(elsewhere, target_is_directory=True)
    before = tree(tmp_path, base["data"])
    if command == "eval":
        rc = cli("eval", run, "--quiet")
    else:
        rc = cli("run", *ARGS, "--data", base["data"], "--out", run, "--resume")
    line = one_line(capsys)
    assert rc == 2 and str(run / folder) in line and "symbolic link" in line, line
    assert tree(tmp_path, base["data"]) == before


def test_checkpoint_and_stage_writes_refuse_links(tmp_path):
    from ssl_bench.runs import LAST, atomic_torch_save, save_checkpoint

    target = _outside(tmp_path)
    run = tmp_path / "run"
    (run / "stages").mkdir(parents=True)
    (run / "stages" / "stage1.pt").symlink_to(target)
    (run / "checkpoints").symlink_to(target.parent, target_is_directory=True)
    before = tree(tmp_path)
    with pytest.raises(UserError, match="symbolic link"):
        atomic_torch_save({"weights": {}}, run / "stages" / "stage1.pt")
    with pytest.raises(UserError, match="symbolic link"):
        save_checkpoint({"iteration": 1}, run / "checkpoints")
    (run / "checkpoints").unlink()
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / LAST).symlink_to(target)
    with pytest.raises(UserError, match="symbolic link"):
        save_checkpoint({"iteration": 1}, run / "checkpoints")
    assert target.read_text() == "not ssl-bench's to write\n"
    assert {k: v for k, v in tree(tmp_path).items() if "/checkpoints" not in k} == \
        {k: v for k, v in before.items() if "/checkpoints" not in k}


# ------------------------------------------------------------------ 2. --overwrite

def _not_a_run(tmp_path: Path, config: str | None) -> Path:
    folder = tmp_path / "mine"
    (folder / "sub").mkdir(parents=True)
    (folder / "notes.txt").write_text("keep\n")
    (folder / "sub" / "data.bin").write_bytes(b"\0\1\2")
    if config is not None:
        (folder / "config.json").write_text(config)
    return folder


@pytest.mark.parametrize("where, words", [
    ("data", "is the data folder"),
    ("inside", "is inside the data folder"),
    ("above", "holds the data folder"),
    ("no-config", "not a run folder"),
    ("foreign-config", "not a run folder"),
    ("damaged-config", "not a run folder"),
    ("link", "symbolic link"),
])
def test_overwrite_empties_only_a_run_folder(base, tmp_path, capsys, where, words):
    data = _copy(base["data"], tmp_path / "LA")
    if where == "data":
        out = data
    elif where == "inside":
        out = data / CASES / "TINY00"
    elif where == "above":
        out = tmp_path
    elif where == "link":
        out = tmp_path / "link"
        out.symlink_to(_copy(base["full"], tmp_path / "full"), target_is_directory=True)
    else:
        config = {"no-config": None, "foreign-config": json.dumps({"name": "another tool", "config": {"x": 1}}),
                  "damaged-config": '{"config": {"method": "vnet"'}[where]
        out = _not_a_run(tmp_path, config)
    before = tree(tmp_path)
    rc = cli("run", *ARGS, "--data", data, "--out", out, "--overwrite")
    line = one_line(capsys)
    assert rc == 2 and "--overwrite refuses" in line and words in line, line
    assert tree(tmp_path) == before  # nothing deleted, nothing written


def test_overwrite_still_replaces_a_run_folder(base, tmp_path, capsys):
    run = _copy(base["full"], tmp_path / "run")
    (run / "stray.txt").write_text("from the old run\n")
    before = tree(base["data"])
    assert cli("run", *ARGS, "--data", base["data"], "--out", run, "--overwrite") == 0
    assert not (run / "stray.txt").exists() and (run / "summary.json").is_file()
    assert tree(base["data"]) == before


# ------------------------------------------------------------------ 3. a changed split

def _reordered(base, tmp_path: Path, listname: str, i: int, j: int, name: str = "LA-reordered") -> Path:
    data = _copy(base["data"], tmp_path / name)
    ids = (data / listname).read_text().split()
    ids[i], ids[j] = ids[j], ids[i]
    (data / listname).write_text("".join(x + "\n" for x in ids))
    return data


def test_eval_refuses_a_reordered_test_list(base, tmp_path, capsys):
    data = _reordered(base, tmp_path, "test.list", 0, 1)
    run = _copy(base["full"], tmp_path / "run")
    first = json.loads((run / "config.json").read_text())["split"]["test"][0]
    before = tree(tmp_path, base["data"])
    assert cli("eval", run, "--data", data, "--quiet") == 2
    line = one_line(capsys)
    assert "split changed" in line and first in line and "test case 1" in line and "test.list" in line, line
    assert tree(tmp_path, base["data"]) == before
    assert cli("occlusion", run, "--data", data, "--ratios", "0.1", "--repeats", "1", "--out", tmp_path / "occ",
               "--quiet") == 2
    line = one_line(capsys)
    assert "split changed" in line and first in line and not (tmp_path / "occ").exists()
    assert tree(tmp_path, base["data"]) == before


@pytest.mark.parametrize("i, j, which", [(0, 5, "labeled case 1"), (5, 6, "unlabeled case 2")])
def test_resume_refuses_a_reordered_train_list(base, tmp_path, capsys, i, j, which):
    data = _reordered(base, tmp_path, "train.list", i, j)
    run = _copy(base["cut"], tmp_path / "run")
    before = tree(tmp_path, base["data"])
    assert cli("run", *ARGS, "--data", data, "--out", run, "--resume") == 2
    line = one_line(capsys)
    assert "split changed" in line and which in line and "train.list" in line, line
    assert tree(tmp_path, base["data"]) == before  # the checkpoint is untouched: nothing trained


def test_teacher_refuses_a_reordered_train_list(base, tmp_path, capsys):
    data = _reordered(base, tmp_path, "train.list", 1, 6)
    teacher = _copy(base["full"], tmp_path / "teacher")  # relabelled as a BCP stage 1, so only its split differs
    handed = torch.load(teacher / "stages/stage1.pt", weights_only=True)
    torch.save({**handed, "stage_class": "BCPStage1"}, teacher / "stages/stage1.pt")
    before = tree(tmp_path, base["data"])
    assert cli("run", *BCP_ARGS, "--data", data, "--teacher", teacher, "--out", tmp_path / "student") == 2
    line = one_line(capsys)
    assert "split changed" in line and "labeled case 2" in line and "--teacher" in line, line
    assert not (tmp_path / "student").exists() and tree(tmp_path, base["data"]) == before


def _cell_folder(base, tmp_path: Path, which: str) -> tuple[Path, Path]:
    from ssl_bench.experiments import load_experiment

    exp = tmp_path / "issue23.toml"
    exp.write_text(EXPERIMENT)
    (cell,) = load_experiment(exp).plan()
    runs = tmp_path / "runs"
    runs.mkdir()
    _copy(base[which], cell.run_dir(runs))
    return exp, cell.run_dir(runs)


def test_sweep_resume_refuses_a_reordered_train_list(base, tmp_path, capsys):
    data = _reordered(base, tmp_path, "train.list", 0, 5)
    exp, run = _cell_folder(base, tmp_path, "cut")
    before = tree(data, run)
    assert cli("sweep", exp, "--data", data, "--runs-dir", run.parent, "--resume") == 2
    line = one_line(capsys)
    assert "split changed" in line and str(run) in line and "labeled case 1" in line, line
    assert tree(data, run) == before


def test_report_refuses_a_reordered_test_list(base, tmp_path, capsys):
    data = _reordered(base, tmp_path, "test.list", 0, 1)
    exp, run = _cell_folder(base, tmp_path, "full")
    config = json.loads((run / "config.json").read_text())
    config["data"]["root"] = str(data)  # the report reads the lists of the root the run records
    (run / "config.json").write_text(json.dumps(config))
    before = tree(data, run)
    assert cli("report", exp, "--runs-dir", run.parent, "--out", tmp_path / "results") == 2
    line = one_line(capsys)
    assert "split changed" in line and "test case 1" in line, line
    assert tree(data, run) == before and not (tmp_path / "results").exists()


def test_an_older_config_is_compared_on_the_lists_it_has(base, tmp_path):
    from ssl_bench.data import LAData, check_split

    stored = json.loads((base["full"] / "config.json").read_text())
    old = {**stored, "split": {"labeled": stored["split"]["labeled"], "n_unlabeled": 4}}
    check_split(old, LAData(base["data"]), "old", "")  # same lists: passes
    data = _reordered(base, tmp_path, "test.list", 0, 1)
    check_split(old, LAData(data), "old", "")  # no test list recorded: nothing to compare it with
    data = _reordered(base, tmp_path, "train.list", 6, 7, name="LA-unlabeled")
    check_split(old, LAData(data), "old", "")  # unlabeled order not recorded; its count is the same
    with pytest.raises(UserError, match="recorded 3 unlabeled cases"):
        check_split({**old, "split": {**old["split"], "n_unlabeled": 3}}, LAData(data), "old", "")
    data = _reordered(base, tmp_path, "train.list", 0, 7, name="LA-labeled")
    with pytest.raises(UserError, match="labeled case 1"):
        check_split(old, LAData(data), "old", "")


# ------------------------------------------------------------------ 4. hostile pickles at every protocol

class _Planted:
    """Unpickling this runs os.system: it must never happen."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_a_code_pickle_is_refused_as_such_and_never_falls_back(base, tmp_path, capsys, protocol):
    """A last.pt that would run code, at any pickle protocol, is refused (no fallback to previous.pt, exit 2,
    one line naming it as code, no warning lines), and the planted code never runs."""
    import pickle

    run = _copy(base["cut"], tmp_path / "cut")
    marker = tmp_path / "planted-ran"
    last = run / "checkpoints" / "last.pt"
    if not (run / "checkpoints" / "previous.pt").is_file():
        shutil.copyfile(last, run / "checkpoints" / "previous.pt")
    last.write_bytes(pickle.dumps({"stage": 0, "nets": _Planted(marker)}, protocol=protocol))
    before = tree(run, base["data"])
    assert cli("run", *ARGS, "--data", base["data"], "--out", run, "--resume") == 2
    line = one_line(capsys)
    assert "could run code" in line and "last.pt" in line and "damaged" not in line
    assert not marker.exists()
    assert tree(run, base["data"]) == before
