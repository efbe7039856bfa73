"""Issue 23: three data-loss faults, each refused with one line on stderr and exit code 2, nothing outside changed.

1. Links in a run folder: ``.lock`` (and ``<runs-dir>/_sweeps/.lock``), ``log.jsonl``, ``checkpoints/``,
   ``stages/`` that are symbolic links are refused instead of written through.
2. ``--overwrite`` empties only a run folder (an intact config.json written by ssl-bench), never the data
   folder, a folder inside or above it, a folder of other files, or the target of a link.
3. A changed train.list or test.list (reordered: same files, same checksums) is refused by eval, occlusion,
   --resume, --teacher, sweep --resume and report, naming the first differing id and its list.

Tiny V-Net runs (16³ patch, width 2, 2 iterations, one test case) on ssl_bench.testing.make_tiny_la data.

Then the probes of issue 23's data, sweep and units part (5-7): a full disk during ``data import`` (simulated:
a write that raises ENOSPC, h5py raising it, and a real failed write under RLIMIT_FSIZE in a child process);
allocations bounded before they happen (a NIfTI header or gzip stream too large, a resampling too large, an h5
dataset too large); label names and case ids that are not plain; a sweep cell the data set cannot give; runs
in different distance units given to ``occlusion`` together.
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


def test_sweep_refuses_a_finished_cell_whose_summary_is_damaged(base, tmp_path, capsys):
    """A finished cell counts as complete only if its summary.json reads: a damaged one is one line, not skipped."""
    exp, run = _cell_folder(base, tmp_path, "full")
    (run / "summary.json").write_text('{"metrics": ')
    before = tree(run)
    assert cli("sweep", exp, "--data", base["data"], "--runs-dir", run.parent, "--resume") == 2
    line = one_line(capsys)
    assert str(run / "summary.json") in line and "is damaged" in line, line
    assert tree(run) == before


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



# ------------------------------------------------------------------ 5. data import: a full disk, bounds, names

def _import(src, out, *extra) -> int:
    return cli("data", "import", "--format", "nnunet", src, out, *extra)


@pytest.fixture
def nn_src(tmp_path):
    """A tiny nnU-Net v2 raw data set (6 cases, labels 1 and 2; tests/test_importer.py's maker)."""
    from test_importer import make_nnunet

    make_nnunet(tmp_path / "src")
    return tmp_path / "src"


def _nothing_left(out: Path) -> None:
    """OUT was not created and no temporary folder of the writer is left beside it (its space is freed)."""
    assert not out.exists()
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")] == []


@pytest.mark.parametrize("where", ["write", "h5py"])
def test_a_full_disk_during_import_is_one_line_and_frees_the_space(nn_src, tmp_path, capsys, monkeypatch, where):
    """ENOSPC on the third case file, from the file write or from h5py itself: exit 2, one line saying the disk
    is full, the two case files already written and the temporary folder removed, the source untouched."""
    import errno

    import h5py

    import ssl_bench.importer as importer

    written = []
    if where == "write":
        real = importer.write_case_h5

        def filling(path, *args, **kwargs):
            if len(written) == 2:  # what a write that ran out of space leaves: part of a file, then the error
                Path(path).write_bytes(b"\0" * 4096)
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
            real(path, *args, **kwargs)
            written.append(Path(path))
        monkeypatch.setattr(importer, "write_case_h5", filling)
    else:
        real = h5py.Group.create_dataset

        def filling(self, name, *args, **kwargs):
            if len(written) == 6:  # 3 datasets per case: the third case's first one
                raise OSError(errno.ENOSPC, "Can't write data (No space left on device)")
            written.append(name)
            return real(self, name, *args, **kwargs)
        monkeypatch.setattr(h5py.Group, "create_dataset", filling)
    out = tmp_path / "parent" / "OUT"
    before = tree(nn_src)
    assert _import(nn_src, out) == 2
    line = one_line(capsys)
    assert "the disk is full" in line and "No space left on device" in line and str(out) in line, line
    assert len(written) == (2 if where == "write" else 6) and not any(isinstance(p, Path) and p.exists() for p in written)
    _nothing_left(out)
    assert tree(nn_src) == before


def test_a_failed_write_in_hdf5_is_one_line_not_a_crash(nn_src, tmp_path):
    """A real failing write (RLIMIT_FSIZE in a child: every write past 256 KB fails with EFBIG, as a full disk
    fails) on the one case file that is larger: exit 2, one line, no temporary folder. A file-backed h5py write
    crashed here (segfault in its close, exit 139, 33 lines)."""
    import subprocess
    import sys

    import nibabel as nib
    import numpy as np

    from test_importer import _affine

    rng = np.random.default_rng(1)
    label = np.zeros((64, 64, 64), np.uint8)
    label[20:40, 20:40, 20:40] = 1
    nib.save(nib.Nifti1Image(rng.standard_normal(label.shape).astype(np.float32), _affine()),
             str(nn_src / "imagesTr" / "big_000_0000.nii.gz"))
    nib.save(nib.Nifti1Image(label, _affine()), str(nn_src / "labelsTr" / "big_000.nii.gz"))
    out = tmp_path / "parent" / "OUT"
    out.parent.mkdir()
    child = ("import resource, signal, sys\n"
             "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
             "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 18, 1 << 18))\n"
             "from ssl_bench.cli import main\n"
             "sys.exit(main(sys.argv[1:]))\n")
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run([sys.executable, "-c", child, "data", "import", "--format", "nnunet", str(nn_src), str(out)],
                          capture_output=True, text=True, timeout=300, env=env)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"cannot write {out}" in lines[0] and "File too large" in lines[0] and "temporary folder is removed" in lines[0]
    _nothing_left(out)


def _gzip_nifti(path: Path, shape, payload: int) -> None:
    """A .nii.gz whose header declares ``shape`` (uint8, 1 mm) followed by ``payload`` zero bytes: a bomb when the
    header or the stream is large (zeros compress about 1000:1)."""
    import gzip

    import nibabel as nib
    import numpy as np

    header = nib.Nifti1Header()
    header.set_data_dtype(np.uint8)
    header.set_data_shape(shape)
    header.set_zooms((1.0, 1.0, 1.0))
    header.set_sform(np.eye(4), code=1)
    header.set_qform(np.eye(4), code=1)
    with gzip.open(path, "wb", compresslevel=1) as f:
        f.write(header.binaryblock + b"\0" * 4)
        block = b"\0" * (1 << 20)
        for _ in range(payload >> 20):
            f.write(block)
        f.write(b"\0" * (payload & ((1 << 20) - 1)))


@pytest.mark.parametrize("bomb", ["header", "stream"])
def test_a_gzip_bomb_is_refused_before_it_is_allocated(nn_src, tmp_path, capsys, monkeypatch, bomb):
    """header: a NIfTI declaring 2048³ voxels (8 GiB) over 1 MB of data; stream: a small header over a stream that
    inflates past the importer's limit (lowered to 4 MiB here, 1 GiB + 64 MiB by default). Both: one line naming
    the case and the bound, exit 2, nothing written."""
    import ssl_bench.importer as importer

    img = nn_src / "imagesTr" / "syn_001_0000.nii.gz"
    if bomb == "header":
        _gzip_nifti(img, (2048, 2048, 2048), 1 << 20)
    else:
        monkeypatch.setattr(importer, "MAX_NIFTI_BYTES", 4 << 20)
        _gzip_nifti(img, (26, 21, 12), 16 << 20)
    out = tmp_path / "OUT"
    assert _import(nn_src, out) == 2
    line = one_line(capsys)
    assert "case syn_001: image" in line, line
    if bomb == "header":
        assert "2048×2048×2048 = 8,589,934,592 voxels is larger than ssl-bench reads" in line
        assert "134,217,728 voxels (512³)" in line
    else:
        assert f"decompresses to more than {4 << 20:,} bytes" in line
    _nothing_left(out)


def test_a_resampling_too_large_is_refused_before_it_is_allocated(nn_src, tmp_path, capsys):
    """A 1000 mm voxel resampled with --spacing 1,1,1 (a 89 TiB volume in the issue's probe): one line, exit 2."""
    import nibabel as nib
    import numpy as np

    for sub, name in (("imagesTr", "syn_003_0000.nii.gz"), ("labelsTr", "syn_003.nii.gz")):
        arr = np.asarray(nib.load(str(nn_src / sub / name)).dataobj)
        nib.save(nib.Nifti1Image(arr, np.diag([1000.0, 1000.0, 1000.0, 1.0])), str(nn_src / sub / name))
    out = tmp_path / "OUT"
    assert _import(nn_src, out, "--spacing", "1,1,1") == 2
    line = one_line(capsys)
    assert "case syn_003" in line and "resampled to --spacing 1,1,1" in line and "512³" in line, line
    _nothing_left(out)
    assert _import(nn_src, out, "--spacing", "1e300,1e-300,1") == 2  # overflowing factors: the same one line
    assert "larger than ssl-bench reads or writes" in one_line(capsys)


@pytest.mark.parametrize("labels, args, fragment", [
    ({"0": "background", "²": "atrium"}, (), "declares no nonzero label"),  # MSD style: "²" is not a value
    ({"0": "background", "--1": "atrium"}, (), "declares no nonzero label"),
    ({"background": 0, "atrium": 1, "other": 2}, ("--label", "²"), "--label '²': no such label"),
    ({"background": 0, "atrium": 1, "other": 2}, ("--label=--1",), "--label '--1': no such label"),
    ({"background": 0, "atrium": 1, "other\nname": 2}, ("--label", "x"), "2='other\\nname'"),
    ("deep", (), "nested more than 64 levels deep"),
])
def test_label_names_and_dataset_json_are_one_line(nn_src, tmp_path, capsys, labels, args, fragment):
    """Label names that look like numbers to str.isdigit ("²", "--1"), a name with a line break, a 100 000-deep
    dataset.json (a RecursionError): one line, exit 2, nothing written."""
    if labels == "deep":
        (nn_src / "dataset.json").write_text('{"labels": ' + "[" * 100_000 + "]" * 100_000 + "}")
    else:
        (nn_src / "dataset.json").write_text(json.dumps({"labels": labels, "file_ending": ".nii.gz"}))
    out = tmp_path / "OUT"
    assert _import(nn_src, out, *args) == 2
    line = one_line(capsys)
    assert fragment in line, line
    _nothing_left(out)


@pytest.mark.parametrize("bad", ["syn\n009", "syn\\009", "syn\x1b009", "syn\u2028009"])
def test_a_case_id_that_is_not_a_plain_name_is_one_line(nn_src, tmp_path, capsys, bad):
    """A newline, a backslash or another control character in a case file name: one line naming it (quoted),
    exit 2, no train.list with bogus ids."""
    for sub, suffix in (("imagesTr", "_0000.nii.gz"), ("labelsTr", ".nii.gz")):
        shutil.copyfile(nn_src / sub / f"syn_000{suffix}", nn_src / sub / f"{bad}{suffix}")
    out = tmp_path / "OUT"
    assert _import(nn_src, out) == 2
    line = one_line(capsys)
    assert repr(bad) in line and "a case id must be a plain name" in line, line
    _nothing_left(out)


@pytest.mark.parametrize("entry", ["../TINY00", "TINY00/../TINY01", ".hidden"])
def test_a_case_list_entry_that_is_not_a_plain_name_is_one_line(base, tmp_path, capsys, entry):
    """A train.list line that would lead outside the data folder (or to another case): refused in one line before any
    file is read, by every command that reads the lists."""
    data = _copy(base["data"], tmp_path / "LA")
    ids = (data / "train.list").read_text().split()
    (data / "train.list").write_text("".join(i + "\n" for i in [entry] + ids[1:]))
    before = tree(tmp_path)
    assert cli("run", *ARGS, "--data", data, "--out", tmp_path / "run") == 2
    line = one_line(capsys)
    assert "is not a plain name" in line and repr(entry) in line and "train.list" in line, line
    assert tree(tmp_path) == before and not (tmp_path / "run").exists()


def test_an_h5_dataset_too_large_is_refused_before_it_is_read(base, tmp_path, capsys):
    """A case file whose (compressed, never written) datasets declare 2048³ voxels: one line before 32 GiB are
    allocated."""
    import h5py

    data = _copy(base["data"], tmp_path / "LA")
    path = data / CASES / "TINY00" / "mri_norm2.h5"
    path.unlink()
    with h5py.File(path, "w") as f:
        for name, dtype in (("image", "f4"), ("label", "u1")):
            f.create_dataset(name, shape=(2048, 2048, 2048), dtype=dtype, chunks=(64, 64, 64), compression="gzip")
    assert path.stat().st_size < 1 << 20
    assert cli("run", *ARGS, "--data", data, "--out", tmp_path / "run") == 2
    line = one_line(capsys)
    assert "case TINY00" in line and "8,589,934,592 voxels is larger than ssl-bench reads" in line, line
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ 6. a sweep cell the data set cannot give

@pytest.mark.parametrize("dry_run", [False, True], ids=["sweep", "dry-run"])
def test_a_sweep_cell_larger_than_the_data_set_is_one_line_before_ray(base, tmp_path, capsys, monkeypatch, dry_run):
    """labeled = 20 on a training list of 8: one line naming the cell, exit 2, Ray never started, no cell folder,
    the data untouched (before, Ray retried the trial and printed about 465 lines)."""
    def no_ray(*args, **kwargs):
        raise AssertionError("Ray must not start")

    monkeypatch.setattr("ssl_bench.sweep._start_ray", no_ray)
    exp = tmp_path / "too-many.toml"
    exp.write_text(EXPERIMENT.replace("labeled = [4]", "labeled = [4, 20]"))
    runs = tmp_path / "runs"
    before = tree(base["data"])
    assert cli("sweep", exp, "--data", base["data"], "--runs-dir", runs, *(["--dry-run"] if dry_run else [])) == 2
    line = one_line(capsys)
    assert "cell vnet-L20-s1337-honest-smoke" in line and "--labeled must be between 1 and 8" in line, line
    assert "nothing was started" in line
    assert tree(base["data"]) == before
    assert not runs.exists() if dry_run else [p.name for p in runs.iterdir()] == ["_sweeps"]


# ------------------------------------------------------------------ 7. runs in different units together

def test_occlusion_refuses_runs_in_different_units_together(tmp_path, capsys):
    """A voxel run and an mm run (an imported data set stores spacings) given to `occlusion` together: one line
    naming both units, exit 2, no output folder; the runs and the data untouched."""
    from test_importer import make_nnunet

    make_nnunet(tmp_path / "src", n_train=8)
    data = tmp_path / "data"
    assert _import(tmp_path / "src", data, "--test-fraction", 0.25) == 0
    runs = []
    for units in ("voxel", "mm"):
        runs.append(tmp_path / f"run-{units}")
        assert cli("run", *ARGS, "--data", data, "--units", units, "--out", runs[-1]) == 0
    capsys.readouterr()
    before = tree(data, *runs)
    out = tmp_path / "occ"
    assert cli("occlusion", *runs, "--ratios", "0.1", "--repeats", "1", "--out", out, "--no-panel", "--quiet") == 2
    line = one_line(capsys)
    assert "different distance units" in line and "in voxel" in line and "in mm" in line, line
    assert not out.exists() and tree(data, *runs) == before


def test_a_killed_writers_temporary_files_are_removed_at_the_next_write(tmp_path):
    """Issue 23: what a SIGKILLed atomic write left beside its file goes at the next write of that file; a live
    writer's temporary file, another file's, and a link are left alone."""
    import subprocess
    import sys

    from ssl_bench.runs import atomic_write_text

    target = tmp_path / "summary.json"
    # a writer killed mid-write: its temporary file stays behind
    code = ("import os, signal, sys; from pathlib import Path; from ssl_bench.runs import atomic_write\n"
            "atomic_write(Path(sys.argv[1]), lambda tmp: os.kill(os.getpid(), signal.SIGKILL))")
    r = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True)
    assert r.returncode == -9
    dead = [p for p in tmp_path.iterdir() if p.name.startswith(".summary.json.")]
    assert len(dead) == 1
    live = tmp_path / f".summary.json.{os.getppid()}.abc.json"  # a running process's (our parent's) pid
    other = tmp_path / ".config.json.99999999.abc.json"
    outside = tmp_path / "outside"
    outside.write_text("keep")
    link = tmp_path / ".summary.json.99999999.lnk.json"
    for p in (live, other):
        p.write_text("{}")
    link.symlink_to(outside)
    atomic_write_text(target, "{}")
    assert not dead[0].exists() and target.read_text() == "{}"
    assert live.exists() and other.exists() and link.is_symlink() and outside.read_text() == "keep"
