"""`ssl-bench bench` (issue 15): every case loaded before any timing, each path timed under its own backend,
the JSON it writes; the GPU session driver (scripts/device_session.py) and its staging helper. No timing is
ever asserted: only what was loaded when, which flags were in force, what was written."""
import hashlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ssl_bench.bench as bench
import ssl_bench.precision as precision
from ssl_bench import trainer as trainer_mod
from ssl_bench.cli import main
from ssl_bench.data import LAData
from ssl_bench.testing import make_tiny_la

REPO = Path(__file__).resolve().parents[1]
TINY = {"patch": (16, 16, 16), "n_filters": 2, "iterations": 2, "checkpoint_every": 2, "log_every": 1,
        "eval_stride_xy": 8, "eval_stride_z": 8, "selection_every": 2}


def _load_script(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def tiny(tmp_path, monkeypatch, one_thread):
    """A tiny LA-layout data set (6 train, 3 test); the `smoke` profile made tiny (16³ patch) for the test."""
    monkeypatch.setitem(trainer_mod.PROFILES, "smoke", TINY)  # the CLI accepts only its own profile names
    return make_tiny_la(tmp_path / "LA", n_train=6, n_test=3)


@pytest.fixture
def cudnn_flags():
    """The flags a test sets through the CUDA branch of set_backend, restored afterwards."""
    saved = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic, torch.backends.cudnn.allow_tf32,
             torch.backends.cuda.matmul.allow_tf32)
    yield
    (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic, torch.backends.cudnn.allow_tf32,
     torch.backends.cuda.matmul.allow_tf32) = saved


def _flags():
    return (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic, torch.backends.cudnn.allow_tf32,
            torch.backends.cuda.matmul.allow_tf32)


def test_every_case_is_loaded_before_anything_is_timed(tiny, tmp_path, monkeypatch):
    reads, timing = [], []
    real_read = LAData._read

    def counting_read(self, case_id, image):
        reads.append((case_id, bool(timing)))
        return real_read(self, case_id, image)

    def flagged(fn):
        def inner(*args, **kwargs):
            timing.append(1)
            try:
                return fn(*args, **kwargs)
            finally:
                timing.pop()
        return inner

    monkeypatch.setattr(LAData, "_read", counting_read)
    monkeypatch.setattr(bench, "time_training", flagged(bench.time_training))
    monkeypatch.setattr(bench, "time_eval", flagged(bench.time_eval))
    monkeypatch.setattr(bench, "host_work", flagged(bench.host_work))
    out = tmp_path / "b.json"
    seen_partial = []
    real_path = bench.bench_path

    def path_spy(*args, **kwargs):  # the JSON is on disk, marked incomplete, before the second path is timed
        if out.is_file():
            seen_partial.append(json.loads(out.read_text())["complete"])
        return real_path(*args, **kwargs)

    monkeypatch.setattr(bench, "bench_path", path_spy)
    bench.run_bench(["vnet", "uamt"], tiny, "cpu", "smoke", 1, 2, out, warmup=0, labeled=4)
    train = (tiny / "train.list").read_text().split()
    test = (tiny / "test.list").read_text().split()
    expected = set(train) | set(test[:2])  # uamt draws from both unlabeled cases; 2 test cases are timed
    assert [r for r in reads if r[1]] == [], "a case was read from disk inside a timed part"
    assert sorted(c for c, _ in reads) == sorted(expected), "every case read exactly once, all before timing"
    assert seen_partial == [False, False, False]
    assert json.loads(out.read_text())["preload"]["cases"] == len(expected)


def test_each_path_trains_and_evaluates_under_its_own_backend(tiny, monkeypatch, cudnn_flags):
    # on CPU set_backend changes nothing; here it sets the flags as it would on CUDA, so they can be watched
    monkeypatch.setattr(bench, "set_backend", lambda p, d, fast: precision.set_backend(p, "cuda", fast))
    seen = []
    real_step, real_eval, real_train = trainer_mod.Trainer.train_step, bench.evaluate_cases, bench.time_training

    def step_spy(self, *args, **kwargs):
        seen.append(("train", "fast" if self.cfg.fast else "reference", self.cfg.precision, _flags()))
        return real_step(self, *args, **kwargs)

    def eval_spy(*args, reference_style=False, **kwargs):
        seen.append(("eval", "reference" if reference_style else "fast", kwargs.get("settings", args[4]).precision,
                     _flags()))
        return real_eval(*args, reference_style=reference_style, **kwargs)

    def train_then_scramble(*args, **kwargs):  # whatever ran between, each timed part must set its own flags
        result = real_train(*args, **kwargs)
        b, d, t, m = _flags()  # every flag flipped: an evaluation that set nothing would run under wrong ones
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = not b, not d
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = not t, not m
        return result

    monkeypatch.setattr(trainer_mod.Trainer, "train_step", step_spy)
    monkeypatch.setattr(bench, "evaluate_cases", eval_spy)
    monkeypatch.setattr(bench, "time_training", train_then_scramble)
    result = bench.run_bench(["vnet"], tiny, "cpu", "smoke", 1, 1, None, precisions=["bf16", "fp32"],
                             reference_precision="tf32", warmup=1, labeled=4)
    # benchmark, deterministic, cudnn TF32, matmul TF32: fast = autotuned, reference = deterministic; TF32 off for fp32
    want = {("fast", "bf16"): (True, False, True, True), ("fast", "fp32"): (True, False, False, False),
            ("reference", "tf32"): (False, True, True, True)}
    assert {(path, p) for _, path, p, _ in seen} == set(want)
    assert {kind for kind, *_ in seen} == {"train", "eval"}
    for kind, path, p, flags in seen:
        assert flags == want[(path, p)], (kind, path, p, flags)
    assert list(result["results"]["vnet"]["paths"]) == ["fast-bf16", "fast-fp32", "reference-tf32"]


def test_bench_json_carries_every_figure_and_provenance(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("ssl_bench.runs.git_commit", lambda: {"commit": None, "dirty": None})  # a device without git
    monkeypatch.setenv("SSL_BENCH_COMMIT", "abc123")
    out = tmp_path / "bench.json"
    rc = main(["bench", "--method", "vnet", "--method", "dtc", "--profile", "smoke", "--data", str(tiny), "--device",
               "cpu", "--labeled", "4", "--iterations", "1", "--warmup", "0", "--eval-cases", "1", "--out", str(out),
               "--window-batch", "2"])
    assert rc == 0
    text = capsys.readouterr().out
    r = json.loads(out.read_text())
    assert r["complete"] is True and r["methods"] == ["vnet", "dtc"] and r["device"] == "cpu"
    assert r["provenance"]["git"] == {"commit": "abc123", "dirty": None, "source": "SSL_BENCH_COMMIT"}
    for key in ("torch", "date", "command", "python"):
        assert key in r["provenance"]
    for m in ("vnet", "dtc"):
        row = r["results"][m]
        assert list(row["paths"]) == ["fast-tf32", "reference-tf32"] and row["patch"] == [16, 16, 16]
        for label, p in row["paths"].items():
            assert p["numerics"]["precision"] == "tf32" and p["peak_memory_bytes"] is None  # None on CPU
            (s,) = p["train"]
            assert s["losses_finite"] is True and s["peak_memory_bytes"] is None and s["it_per_s"] > 0
            assert set(p["eval"]) >= {"inference_s_per_case", "host_s_per_case", "s_per_case", "peak_memory_bytes"}
        assert set(row["speedup"]) == {"fast-tf32"} and len(row["speedup"]["fast-tf32"]["train"]) == 1
        # the window-batch measurement: the fast path only, at the asked size beside the default 8
        fast, ref = row["paths"]["fast-tf32"]["eval"], row["paths"]["reference-tf32"]["eval"]
        assert fast["window_batch"] == 8 and fast["by_window_batch"]["2"]["window_batch"] == 2
        assert "by_window_batch" not in ref and ref["window_batch"] is None
        assert f"eval {m} fast-tf32 window batch 2:" in text
        (h,) = row["host_ms_per_iteration"]
        assert h["stage"] == 1 and h["ms"] >= 0 and h["source"]
        assert f"host {m} stage 1:" in text
    # DTC computes signed-distance targets on the host: measured apart when ssl_bench.hostwork is there
    if r["results"]["dtc"]["host_ms_per_iteration"][0]["detail"] is not None:
        assert r["results"]["dtc"]["host_ms_per_iteration"][0]["detail"]["targets_ms"] > 0


def test_method_all_is_the_papers_seven_once_each():
    assert bench.resolve_methods(["all"]) == ["vnet", "uamt", "sassnet", "dtc", "ssnet", "bcp", "omf"]
    assert bench.resolve_methods(["dtc", "all"])[:2] == ["dtc", "vnet"] and len(bench.resolve_methods(["dtc", "all"])) == 7


@pytest.mark.parametrize("args, message", [
    (["--method", "nosuch"], "unknown method 'nosuch'"),
    (["--precision", "fp16"], "needs a CUDA GPU"),
    (["--iterations", "0"], "--iterations must be at least 1"),
])
def test_bad_bench_input_is_one_line(tiny, capsys, args, message):
    rc = main(["bench", "--profile", "smoke", "--data", str(tiny), "--device", "cpu", *args])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------ the session driver

@pytest.fixture
def driver():
    return _load_script("device_session")


def _in_process(driver, calls):
    """run_child, but in this process (no interpreter start-up per step); a child's exit code as it would be."""
    def fake(session, cmd, env, timeout):
        calls.append(cmd)
        if cmd[1:3] == ["-m", "ssl_bench.cli"]:
            rc = main(cmd[3:])
        elif len(cmd) > 2 and cmd[2] == "resume-check":
            rc = driver.resume_main(cmd[3:])
        else:
            rc = subprocess.run(cmd).returncode
        return {"returncode": rc, "timed_out": False}
    return fake


def test_session_dry_run_writes_every_record_as_each_step_ends(driver, tiny, tmp_path, monkeypatch):
    calls, on_disk = [], []
    monkeypatch.setattr(driver, "run_child", _in_process(driver, calls))
    monkeypatch.setattr(driver, "project_provenance", lambda env: {"torch": torch.__version__, "stub": True})
    real_end = driver.Session.end

    def end_spy(self, step, status, **info):
        real_end(self, step, status, **info)
        rec = json.loads((self.out / "session.json").read_text())  # on disk at once, not at the session's end
        mine = [s for s in rec["steps"] if s["step"] == step["step"]][-1]
        record = info.get("record")
        on_disk.append((mine["step"], mine["status"], record is None or (self.out / record).is_file()))

    monkeypatch.setattr(driver.Session, "end", end_spy)
    out = tmp_path / "OUT"
    rc = driver.main(["--out", str(out), "--data", str(tiny), "--device", "cpu", "--profile", "smoke", "--methods",
                      "vnet uamt", "--bench-iterations", "1", "--warmup", "0", "--resume-iterations", "2",
                      "--run-iterations", "2", "--eval-cases", "2", "--labeled", "4", "--step-min-s", "0",
                      "--commit", "c0ffee", "--wheels", str(tmp_path / "none"), "--run-dir", str(tmp_path / "runs")])
    assert rc == 0
    assert on_disk == [("1-bench", "ok", True), ("1-resume", "ok", True), ("2-precisions", "ok", True),
                       ("2-eval", "ok", True), ("3-run", "ok", True)]
    rec = json.loads((out / "session.json").read_text())
    assert rec["provenance"]["commit"] == "c0ffee" and rec["provenance"]["project"]["stub"] is True
    assert rec["steps"][-1] == {"step": "4-extra", "status": "skipped", "reason": "no --step4 command given"}
    resume = json.loads((out / "step1_resume.json").read_text())
    assert resume["complete"] and not resume["errors"]
    for m in ("vnet", "uamt"):  # CPU, same seed: the interrupted-and-resumed run is the straight one, bit for bit
        assert resume["results"][m]["bitwise_equal"] is True and resume["results"][m]["interrupted_at"]["iteration"] == 1
    prec = json.loads((out / "step2_precisions.json").read_text())
    assert list(prec["results"]["vnet"]["paths"]) == ["fast-fp32", "fast-tf32", "fast-bf16", "reference-fp32"]
    assert json.loads((out / "step2_eval.json").read_text())["eval_cases"] == 2
    import tarfile
    with tarfile.open(out / "step3_run.tar.gz") as tar:
        names = sorted(tar.getnames())
    assert names == sorted(f"vnet-L4-s1337-honest/{n}" for n in driver.RUN_FILES)  # records, never checkpoints
    assert all(c[0] == sys.executable for c in calls)


def test_session_budget_spent_skips_the_later_steps_with_a_record(driver, tmp_path, monkeypatch):
    now = [0.0]
    calls = []

    def fake_child(session, cmd, env, timeout):
        calls.append(cmd)
        now[0] += 100  # each child takes 100 s
        return {"returncode": 0, "timed_out": False}

    monkeypatch.setattr(driver, "run_child", fake_child)
    monkeypatch.setattr(driver, "project_provenance", lambda env: {})
    out = tmp_path / "OUT"
    a = driver.parse_args(["--out", str(out), "--data", str(tmp_path), "--budget-s", "150", "--step-min-s", "60",
                           "--wheels", str(tmp_path / "none")])
    driver.run_session(driver.Session(out, 150, clock=lambda: now[0]), a)
    steps = {s["step"]: s for s in json.loads((out / "session.json").read_text())["steps"]}
    assert steps["1-bench"]["status"] == "ok" and len(calls) == 1
    for name in ("1-resume", "2-precisions", "2-eval", "3-run"):
        assert steps[name]["status"] == "skipped" and steps[name]["reason"].startswith("budget: 50 s left")


def test_nothing_the_session_runs_imports_ray_or_medpy():
    code = ("import sys; sys.modules['ray'] = None; sys.modules['medpy'] = None\n"
            "import ssl_bench.cli, ssl_bench.bench, ssl_bench.trainer\n"
            "from ssl_bench.method import registry; registry()\n"
            "from ssl_bench.runs import provenance; assert provenance()['medpy'] is None\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_stage_subset_holds_the_first_training_cases_and_every_test_case(tmp_path):
    stage = _load_script("stage_subset")
    src = make_tiny_la(tmp_path / "LA", n_train=6, n_test=2)
    dest = tmp_path / "staged" / "LA"
    stage.stage_subset(src, dest, n_train=3)
    train, test = (src / "train.list").read_text().split(), (src / "test.list").read_text().split()
    assert (dest / "train.list").read_text().split() == train[:3] and (dest / "test.list").read_text().split() == test
    listed = {}
    for line in (dest / "SHA256SUMS.h5.txt").read_text().splitlines():
        digest, name = line.split("  ")
        listed[Path(name).parts[-2]] = digest
    for case in train[:3] + test:
        f = src / "2018LA_Seg_Training Set" / case / "mri_norm2.h5"
        assert listed[case] == hashlib.sha256(f.read_bytes()).hexdigest()
    assert set(listed) == set(train[:3] + test)
    assert LAData(dest).listed_sums() == listed  # the project reads the staged folder and its checksums
    with pytest.raises(SystemExit, match="already exists"):
        stage.stage_subset(src, dest, n_train=3)


def test_resume_check_reports_a_resume_that_does_not_continue_exactly(driver, tiny, tmp_path, monkeypatch):
    monkeypatch.setattr("ssl_bench.data.TrainStream.load_state_dict", lambda self, state: None)  # sampler not restored
    data = LAData(tiny)
    r = driver.resume_check("uamt", data, "cpu", "smoke", 4, 4, tmp_path)
    assert r["bitwise_equal"] is False and r["max_logged_diff"] > 0 and r["max_weight_diff"] > 0
    assert r["interrupted_at"] == {"stage": 1, "iteration": 2} and r["losses_finite"] is True
