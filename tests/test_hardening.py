"""Issue 13: opening a run folder never runs code, and no fault leaves torn or mixed state.

Tiny V-Net runs on a copy of the demo data (16³ patch, width 2, 4 iterations, a checkpoint every
iteration). Every fault is made for real where that is cheap: planted pickles, truncated and
garbage files, a live writer in another process, SIGKILL, an edited data file, and a write that
fails in the kernel (RLIMIT_FSIZE: the write gets EFBIG, as a full disk gives ENOSPC).
"""
import hashlib
import json
import os
import pickle
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest
import torch

from ssl_bench.cli import main
from ssl_bench.errors import Interrupted, UserError

REPO = Path(__file__).resolve().parents[1]
SETTINGS = dict(labeled=4, patch=(16, 16, 16), n_filters=2, iterations=4, device="cpu", eval_cases=1,
                checkpoint_every=1)


def vnet_args(iterations: int = 4) -> list[str]:
    """The CLI arguments of SETTINGS."""
    return ["--method", "vnet", "--profile", "smoke", "--labeled", "4", "--patch", "16,16,16", "--n-filters", "2",
            "--iterations", str(iterations), "--device", "cpu", "--eval-cases", "1", "--checkpoint-every", "1",
            "--quiet"]


ARGS = vnet_args()
BCP_ARGS = ["--method", "bcp", "--profile", "smoke", "--labeled", "4", "--patch", "16,16,16", "--n-filters", "2",
            "--iterations", "4", "--device", "cpu", "--eval-cases", "1", "--quiet"]
CASES = "2018LA_Seg_Training Set"


def cli(*args) -> int:
    return main([str(a) for a in args])


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    lines = err.splitlines()
    assert len(lines) == 1, err
    return lines[0]


def _config(**over):
    from ssl_bench.trainer import build_config

    return build_config("vnet", "smoke", **{**SETTINGS, **over})


def _weights(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["weights"]


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _h5(root: Path, case: str) -> Path:
    return root / CASES / case / "mri_norm2.h5"


@pytest.fixture(scope="module")
def base(demo_root, tmp_path_factory):
    """Data copy D; a finished run; the same run interrupted at iteration 3 (last.pt = 3, previous.pt = 2)."""
    from ssl_bench.trainer import run_training

    tmp = tmp_path_factory.mktemp("hardening")
    data = tmp / "LA"
    shutil.copytree(demo_root, data)
    run_training(_config(), tmp / "full", data, progress=False)
    with pytest.raises(Interrupted):
        run_training(_config(), tmp / "cut", data, progress=False, stop_at=(1, 3))
    return {"data": data, "full": tmp / "full", "cut": tmp / "cut"}


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ------------------------------------------------------------------ safe loading

class _Payload:
    """Unpickling this object calls open(target, "w"): it creates a file."""

    def __init__(self, target: Path):
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


def _plant(path: Path, target: Path, fmt: str) -> None:
    if fmt == "torch":
        torch.save({"weights": {}, "iteration": 4, "selection": "last", "boom": _Payload(target)}, path)
    else:  # a bare pickle, not torch's zip format
        path.write_bytes(pickle.dumps({"weights": {}, "boom": _Payload(target)}, protocol=2))


@pytest.mark.parametrize("fmt", ["torch", "pickle"])
def test_the_planted_payload_really_runs_code_when_loaded_unsafely(tmp_path, fmt):
    """The control of the next test: the same file does create the marker under weights_only=False."""
    marker = tmp_path / "created"
    _plant(tmp_path / "x.pt", marker, fmt)
    try:
        torch.load(tmp_path / "x.pt", weights_only=False)
    except RuntimeError:  # the bare pickle runs as torch's "magic number", then fails the format check
        pass
    assert marker.exists()


@pytest.mark.parametrize("fmt", ["torch", "pickle"])
@pytest.mark.parametrize("where", ["resume", "eval", "teacher"])
def test_a_planted_pickle_is_refused_and_never_run(base, tmp_path, capsys, where, fmt):
    marker = tmp_path / "created-by-the-payload"
    if where == "resume":
        run = _copy(base["cut"], tmp_path / "run")
        _plant(run / "checkpoints/last.pt", marker, fmt)  # previous.pt is fine: it must not be used instead
        rc = cli("run", *ARGS, "--data", base["data"], "--out", run, "--resume")
    elif where == "eval":
        run = _copy(base["full"], tmp_path / "run")
        _plant(run / "stages/stage1.pt", marker, fmt)
        rc = cli("eval", run, "--quiet")
    else:
        teacher = _copy(base["full"], tmp_path / "teacher")
        _plant(teacher / "stages/stage1.pt", marker, fmt)
        rc = cli("run", *BCP_ARGS, "--data", base["data"], "--teacher", teacher, "--out", tmp_path / "student")
        assert not (tmp_path / "student").exists()  # refused before anything is written
    line = one_line(capsys)
    assert rc == 2 and "refusing to load" in line and ("last.pt" if where == "resume" else "stage1.pt") in line
    assert not marker.exists()


def test_every_file_a_run_writes_is_plain_data(base):
    """What --resume, eval and --teacher load with weights_only=True: tensors, numbers, strings, lists, dicts."""
    def plain(x):
        if isinstance(x, dict):
            return all(isinstance(k, (str, int)) and plain(v) for k, v in x.items())
        if isinstance(x, (list, tuple)):
            return all(plain(v) for v in x)
        return x is None or isinstance(x, (torch.Tensor, bool, int, float, str))

    files = [*base["full"].rglob("*.pt"), *base["cut"].rglob("*.pt")]
    assert {p.name for p in files} == {"last.pt", "previous.pt", "stage1.pt"}
    for path in files:
        assert plain(torch.load(path, map_location="cpu", weights_only=True)), path
    state = torch.load(base["cut"] / "checkpoints/last.pt", weights_only=True)
    assert state["stream"]["rng"]["bit_generator"] == "PCG64" and state["torch_rng"].dtype == torch.uint8


# ------------------------------------------------------------------ damaged files

def test_a_damaged_last_checkpoint_falls_back_to_the_previous_one(base, tmp_path, capsys):
    run = _copy(base["cut"], tmp_path / "run")
    last = run / "checkpoints/last.pt"
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])  # truncated
    assert cli("run", *ARGS, "--data", base["data"], "--out", run, "--resume") == 0
    err = capsys.readouterr().err
    assert "resuming from checkpoints/previous.pt (stage 1, iteration 2)" in err and "damaged" in err
    assert (run / "checkpoints/last.pt.damaged").read_bytes() == data[: len(data) // 2]  # kept aside, not rotated in
    assert _same(_weights(run / "stages/stage1.pt"), _weights(base["full"] / "stages/stage1.pt"))
    iters = [json.loads(x)["iteration"] for x in (run / "log.jsonl").read_text().splitlines()]
    assert iters == sorted(set(iters)) and iters[-1] == 4
    assert not (run / "checkpoints/previous.pt").exists()  # a finished run keeps what eval and --teacher need


def test_checkpoints_keep_one_generation_back(base):
    last = torch.load(base["cut"] / "checkpoints/last.pt", weights_only=True)
    previous = torch.load(base["cut"] / "checkpoints/previous.pt", weights_only=True)
    assert (last["iteration"], previous["iteration"]) == (3, 2)
    assert json.loads((base["full"] / "summary.json").read_text())["checkpoint"]["iteration"] == 4


def test_a_damaged_last_checkpoint_without_a_previous_one_is_one_line(base, tmp_path, capsys):
    run = _copy(base["cut"], tmp_path / "run")
    (run / "checkpoints/previous.pt").unlink()
    (run / "checkpoints/last.pt").write_bytes(b"\x00garbage" * 100)
    assert cli("run", *ARGS, "--data", base["data"], "--out", run, "--resume") == 2
    line = one_line(capsys)
    assert "checkpoints/last.pt is damaged" in line and "--overwrite" in line
    assert (run / "checkpoints/last.pt").read_bytes() == b"\x00garbage" * 100


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garbage(path: Path) -> None:
    path.write_bytes(bytes(range(255, -1, -1)) * 2)  # not a pickle opcode, not UTF-8


@pytest.mark.parametrize("name, damage, command, advice", [
    ("config.json", _truncate, "resume", "--overwrite"),
    ("config.json", _truncate, "eval", "restore it"),
    ("config.json", _garbage, "occlusion", "restore it"),
    ("config.json", _truncate, "teacher", "restore it"),
    ("summary.json", _truncate, "eval", "ssl-bench eval"),
    ("summary.json", _garbage, "occlusion", "ssl-bench eval"),
    ("stages/stage1.pt", _truncate, "eval", "retrain"),
    ("stages/stage1.pt", _garbage, "occlusion", "retrain"),
    ("stages/stage1.pt", _truncate, "teacher", "another --teacher"),
])
def test_a_damaged_run_file_is_one_line_naming_it(base, tmp_path, capsys, name, damage, command, advice):
    run = _copy(base["cut" if command == "resume" else "full"], tmp_path / "run")
    damage(run / name)
    before = _snapshot(run)
    if command == "resume":
        rc = cli("run", *ARGS, "--data", base["data"], "--out", run, "--resume")
    elif command == "eval":
        rc = cli("eval", run, "--quiet")
    elif command == "occlusion":
        rc = cli("occlusion", run, "--ratios", "0.1", "--repeats", "1", "--out", tmp_path / "occ", "--quiet")
        assert not (tmp_path / "occ").exists()
    else:
        rc = cli("run", *BCP_ARGS, "--data", base["data"], "--teacher", run, "--out", tmp_path / "student")
        assert not (tmp_path / "student").exists()
    line = one_line(capsys)
    assert rc == 2 and str(run / name) in line and "damaged" in line and advice in line
    assert _snapshot(run) == before  # nothing rewritten (not even with the same bytes): no mixed state


@pytest.mark.parametrize("key, value, says, command", [
    ("labeled", "4", "'labeled' must be a whole number", "eval"),
    ("eval_stride_xy", 0, "strides must be positive", "eval"),
    ("patch", [2048, 2048, 2048], "voxels", "eval"),
    ("patch", [2048, 2048, 2048], "voxels", "occlusion"),
    ("fast", "yes", "'fast' must be true or false", "occlusion"),
    ("n_filters", 2.5, "'n_filters' must be a whole number", "eval"),
])
def test_an_edited_stored_config_is_one_line_naming_it(base, tmp_path, capsys, key, value, says, command):
    """Issue 23: the stored settings' types and ranges are checked when read (no ZeroDivisionError, MemoryError)."""
    run = _copy(base["full"], tmp_path / "run")
    config = json.loads((run / "config.json").read_text())
    config["config"][key] = value
    (run / "config.json").write_text(json.dumps(config))
    before = _snapshot(run)
    if command == "eval":
        rc = cli("eval", run, "--quiet")
    else:
        rc = cli("occlusion", run, "--ratios", "0.1", "--repeats", "1", "--out", tmp_path / "occ", "--quiet")
        assert not (tmp_path / "occ").exists()
    line = one_line(capsys)
    assert rc == 2 and str(run / "config.json") in line and "damaged" in line and says in line, line
    assert _snapshot(run) == before


def _snapshot(run: Path) -> dict:
    """Every file but the lock, with its bytes and inode (an atomic rewrite makes a new inode)."""
    return {p: (p.read_bytes(), p.stat().st_ino) for p in run.rglob("*") if p.is_file() and p.name != ".lock"}


# ------------------------------------------------------------------ one writer per folder

def _wait_for(predicate, proc, what: str, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the process ended before {what}: {proc.communicate()}")
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _got_past_the_lock(*args, **kwargs):
    raise AssertionError("a second writer got past the lock")


def test_a_live_writer_blocks_every_other_writer_and_sigkill_releases_it(base, tmp_path, capsys, monkeypatch):
    from ssl_bench.trainer import Trainer, run_training

    run = tmp_path / "live"
    long_args = vnet_args(iterations=1000)
    proc = subprocess.Popen([sys.executable, "-m", "ssl_bench.cli", "run", *long_args, "--data", str(base["data"]),
                             "--out", str(run)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        _wait_for(lambda: (run / "checkpoints/last.pt").is_file(), proc, "the first checkpoint")
        common = [*long_args, "--data", base["data"], "--out", run]
        with monkeypatch.context() as m:  # a command that got past the lock stops at once instead of training on
            m.setattr(Trainer, "run", _got_past_the_lock)
            m.setattr(Trainer, "evaluate", _got_past_the_lock)
            for extra in (["--resume"], ["--overwrite"], []):
                assert cli("run", *common, *extra) == 2, extra
                line = one_line(capsys)
                assert "being written by another process" in line and f"pid {proc.pid}" in line, (extra, line)
            assert cli("eval", run, "--quiet") == 2
            assert "being written by another process" in one_line(capsys)
        assert (run / "config.json").is_file() and proc.poll() is None  # --overwrite emptied nothing
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    done = torch.load(run / "checkpoints/last.pt", weights_only=True)["iteration"]
    with pytest.raises(Interrupted):  # the killed run's lock is gone: its resume trains on
        run_training(_config(iterations=1000), run, base["data"], resume=True, progress=False, stop_at=(1, done + 1))
    assert torch.load(run / "checkpoints/last.pt", weights_only=True)["iteration"] == done + 1


HOLD = ("import sys, time; from pathlib import Path; from ssl_bench.sweep import lock_sweeps; "
        "lock = lock_sweeps(Path(sys.argv[1])); print('held', flush=True); time.sleep(300)")


def test_two_sweeps_on_one_runs_folder(tmp_path, capsys):
    from ssl_bench.sweep import lock_sweeps, run_sweep

    runs = tmp_path / "runs"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(runs)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert proc.stdout.readline().strip() == "held"
        nowhere = tmp_path / "no-data"  # a sweep that got past the lock stops at once, before Ray
        with pytest.raises(UserError, match="another sweep is running"):
            run_sweep(REPO / "experiments/smoke.toml", nowhere, runs_dir=runs, echo=lambda *a: None)
        assert cli("sweep", REPO / "experiments/smoke.toml", "--data", nowhere, "--runs-dir", runs) == 2
        assert "another sweep is running" in one_line(capsys)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    lock_sweeps(runs).release()  # the operating system released the killed sweep's lock


# ------------------------------------------------------------------ data that changed

def test_changed_data_is_refused_naming_the_first_differing_case(base, tmp_path, capsys):
    cfg = json.loads((base["full"] / "config.json").read_text())
    labeled, test_case = cfg["split"]["labeled"][1], cfg["split"]["test"][0]
    changed = _copy(base["data"], tmp_path / "LA")
    for case in (labeled, test_case):
        with h5py.File(_h5(changed, case), "r+") as f:
            f["image"][0, 0, 0] = f["image"][0, 0, 0] + 1.0
    # the recorded checksums are the files' sha256 (computed here, independently)
    for case in (labeled, test_case):
        assert cfg["data"]["sha256"][case] == hashlib.sha256(_h5(base["data"], case).read_bytes()).hexdigest()
        assert cfg["data"]["sha256"][case] != hashlib.sha256(_h5(changed, case).read_bytes()).hexdigest()

    run = _copy(base["cut"], tmp_path / "cut")
    assert cli("run", *ARGS, "--data", changed, "--out", run, "--resume") == 2
    line = one_line(capsys)  # labeled cases come first: the test case also differs, but is not the first
    assert f"case {labeled}" in line and test_case not in line and "data changed" in line

    full = _copy(base["full"], tmp_path / "full")
    before = (full / "metrics_per_case.csv").read_bytes()
    assert cli("eval", full, "--data", changed, "--quiet") == 2
    assert f"case {test_case}" in one_line(capsys)  # eval reads only the test cases
    assert (full / "metrics_per_case.csv").read_bytes() == before

    assert cli("occlusion", full, "--data", changed, "--ratios", "0.1", "--repeats", "1", "--out", tmp_path / "occ",
               "--quiet") == 2
    assert f"case {test_case}" in one_line(capsys) and not (tmp_path / "occ").exists()

    teacher = _copy(base["full"], tmp_path / "teacher")  # relabelled as a BCP stage 1, so only its data differs
    handed = torch.load(teacher / "stages/stage1.pt", weights_only=True)
    torch.save({**handed, "stage_class": "BCPStage1"}, teacher / "stages/stage1.pt")
    assert cli("run", *BCP_ARGS, "--data", changed, "--teacher", teacher, "--out", tmp_path / "student") == 2
    assert f"case {labeled}" in one_line(capsys) and not (tmp_path / "student").exists()

    assert cli("eval", full, "--data", base["data"], "--quiet") == 0  # the unchanged data passes
    assert (full / "metrics_per_case.csv").read_bytes() == before


# ------------------------------------------------------------------ write failures

def test_a_failing_checkpoint_write_keeps_the_previous_checkpoint(base, tmp_path, capsys):
    run = _copy(base["cut"], tmp_path / "run")
    ck = run / "checkpoints"
    before = {p.name: p.read_bytes() for p in ck.iterdir()}
    limit = len(before["last.pt"]) // 2  # the next checkpoint cannot be written in full: the kernel says EFBIG
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        rc = cli("run", *ARGS, "--data", base["data"], "--out", run, "--resume")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    notice, line = capsys.readouterr().err.strip().splitlines()
    assert notice == "ssl-bench: resuming from checkpoints/last.pt (stage 1, iteration 3)"
    assert rc == 2 and "checkpoint not written" in line and "last.pt" in line and "File too large" in line
    assert {p.name: p.read_bytes() for p in ck.iterdir()} == before  # both generations intact, no temporary file
    assert not (run / "stages/stage1.pt").exists()
    assert cli("run", *ARGS, "--data", base["data"], "--out", run, "--resume") == 0  # continues once it can write
    assert _same(_weights(run / "stages/stage1.pt"), _weights(base["full"] / "stages/stage1.pt"))


# ------------------------------------------------------------------ RNG of the run's own device

def test_a_cpu_run_never_touches_cuda_generators(base, tmp_path, monkeypatch):
    """As on a GPU host (CUDA reported available): a --device cpu run saves and restores no CUDA RNG state."""
    from ssl_bench.trainer import run_training

    def forbidden(*a, **k):
        raise AssertionError("a CPU run touched a CUDA generator")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "a GPU")
    for name in ("get_rng_state", "get_rng_state_all", "set_rng_state", "set_rng_state_all"):
        monkeypatch.setattr(torch.cuda, name, forbidden)
    run = _copy(base["cut"], tmp_path / "run")
    state = torch.load(run / "checkpoints/last.pt", weights_only=True)
    assert state["cuda_rng"] is None
    state["cuda_rng"] = [torch.zeros(16, dtype=torch.uint8)]  # an older checkpoint: every GPU's generator
    torch.save(state, run / "checkpoints/last.pt")
    with pytest.raises(Interrupted):  # restores from the checkpoint above, then writes one
        run_training(_config(), run, base["data"], progress=False, resume=True, stop_at=(1, 4))
    assert torch.load(run / "checkpoints/last.pt", weights_only=True)["cuda_rng"] is None
    run_training(_config(), run, base["data"], progress=False, resume=True)
    assert _same(_weights(run / "stages/stage1.pt"), _weights(base["full"] / "stages/stage1.pt"))
