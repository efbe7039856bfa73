#!/usr/bin/env python3
"""One GPU session's work (issue 15), run on the device machine: python3, the standard library and the project.

Steps, each after a time check against ``--budget-s``, each leaving its records under ``$OUT`` as soon as it
ends (a call killed part-way still returns what was done):

  0. provenance: the commit (``--commit``/``SSL_BENCH_COMMIT``: the device has no git), GPU, torch/CUDA
     versions, date, command, wheels installed                                     -> session.json
  1. every method's fast path at the paper patch, data preloaded: warm-up, ~30 timed iterations, finite
     losses, it/s, host ms/iteration, peak memory, one evaluated case              -> step1_bench.json
     then a checkpoint and resume per method: a run interrupted half-way and resumed against the same run
     uninterrupted (losses and final weights compared), and its one evaluated case -> step1_resume.json
  2. vnet: the reference-style path (fp32, deterministic cuDNN) and the fast path at each precision
     (fp32, tf32, bf16, fp16)                                                      -> step2_precisions.json
     and the fast evaluation of the 20 test cases, inference and LCC+metrics apart, at window batches
     8 (the default) and --window-batches (4, 16)                                   -> step2_eval.json
  3. the 6000-iteration vnet paper run with 8 labels and its evaluation (`ssl-bench run`); its config,
     summary, per-case metrics and log (never checkpoints)                         -> step3_run.tar.gz
     (a run cut by the budget is interrupted cleanly; the next call on a warm machine resumes it)
  4. only if time remains: ``--step4 'COMMAND'`` (whatever the GPU issue asks next), run in the repo root
Every child's output goes to session.log; session.json holds every step's status, time and summary.
That is 7 files, within what the device tool brings back (8 files, 2 folders deep).

Staging (the machine keeps /tmp only while warm; ray is not needed, nothing here imports it). Here, in the
project root::

    python3 scripts/stage_subset.py ../shared/data/LA /tmp/ssl-stage/LA     # first 16 train + 20 test, 85 MB
    mkdir -p /tmp/ssl-stage/wheels && python3 -m pip download --no-deps --only-binary=:all: \\
        --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \\
        --platform manylinux_2_17_x86_64 -d /tmp/ssl-stage/wheels edt==3.1.2 connected-components-3d==4.1.1
    ../shared/tools/device-stage pack /tmp/ssl-stage/LA /tmp/ssl-stage/wheels   # ~93 MB: 2 parts

then make the calls it prints, back to back, and in the last one (timeout_s 600; the driver's budget
plus at most 20 s to stop a step cleanly stays inside it)::

    <the unpack line device-stage prints> && \\
    python3 scripts/device_session.py --out "$OUT" --commit <git rev-parse HEAD, here> --budget-s 540

(defaults: ``--data /tmp/stage/root/LA``, ``--wheels /tmp/stage/root/wheels``, installed with
``pip install --no-index --no-deps --target /tmp/site`` when present). medpy is optional (only its version is
recorded). The first 16 training cases serve steps 1-3: the labeled-only V-Net never reads the unlabeled
stream, and the semi-supervised benches draw their unlabeled batches from cases 9-16, which is fine for timing.

CPU dry run (smoke settings, tiny counts)::

    python3 scripts/device_session.py --out /tmp/o --device cpu --profile smoke --data /tmp/ssl-stage/LA \\
        --bench-iterations 1 --warmup 0 --resume-iterations 2 --run-iterations 4 --eval-cases 2 --step-min-s 0
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shlex
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METHODS = ("vnet", "uamt", "sassnet", "dtc", "ssnet", "bcp", "omf")
PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
RUN_FILES = ("config.json", "summary.json", "metrics_per_case.csv", "log.jsonl")
#: what a step needs at least (paper settings on the H200; --step-min-s overrides every one): below it, skipped
MIN_S = {"1-bench": 45, "1-resume": 30, "2-precisions": 30, "2-eval": 15, "3-run": 60, "4-extra": 30}
GRACE_S = 20  # after the budget: SIGINT (a training run checkpoints), then SIGKILL this much later


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def write_json(path: Path, obj) -> None:
    """Atomic: a reader (or a kill) never sees half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.chmod(tmp, 0o644)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


class Session:
    """The records of one session: session.json rewritten at every step's start and end."""

    def __init__(self, out: Path, budget_s: float, clock=time.monotonic):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.clock = clock
        self.start = clock()
        self.budget_s = budget_s
        self.record = {"format": 1, "started": _now(), "budget_s": budget_s, "provenance": None, "steps": []}
        self.log = self.out / "session.log"

    def remaining(self) -> float:
        return self.budget_s - (self.clock() - self.start)

    def save(self) -> None:
        self.record["elapsed_s"] = round(self.clock() - self.start, 1)
        write_json(self.out / "session.json", self.record)

    def say(self, text: str) -> None:
        line = f"[{_now()}] {text}"
        print(line, flush=True)
        with open(self.log, "a") as f:
            f.write(line + "\n")

    def begin(self, name: str, what: str, min_s: float) -> dict | None:
        """The time check before a step: None (and a 'skipped' record) when less than ``min_s`` remains."""
        left = self.remaining()
        step = {"step": name, "what": what, "started": _now(), "remaining_before_s": round(left, 1)}
        self.record["steps"].append(step)
        if left < min_s:
            step.update(status="skipped", reason=f"budget: {left:.0f} s left of {self.budget_s:.0f} s, this step "
                                                 f"needs at least {min_s:.0f} s")
            self.say(f"step {name}: skipped ({step['reason']})")
            self.save()
            return None
        step["status"] = "running"
        self.say(f"step {name}: {what} ({left:.0f} s left)")
        self.save()
        step["_t0"] = self.clock()
        return step

    def end(self, step: dict, status: str, **info) -> None:
        step["seconds"] = round(self.clock() - step.pop("_t0"), 1)
        step["status"] = status
        step.update(info)
        self.say(f"step {step['step']}: {status} in {step['seconds']} s")
        self.save()


def run_child(session: Session, cmd: list[str], env: dict, timeout: float) -> dict:
    """A child process (its output appended to session.log), stopped at ``timeout``: SIGINT first (a training
    run then checkpoints and exits), SIGKILL ``GRACE_S`` later."""
    with open(session.log, "a") as log:
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        # same process group as the driver: a kill of the call ends the children too (one in its own session
        # would run on, holding its run folder's lock, until the machine goes back)
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            rc = proc.wait(timeout=max(timeout, 1))
            return {"returncode": rc, "timed_out": False}
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)
            try:
                rc = proc.wait(timeout=GRACE_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = proc.wait()
            return {"returncode": rc, "timed_out": True}
        except BaseException:
            proc.kill()
            proc.wait()
            raise


def _tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


# ------------------------------------------------------------------------------------------- summaries

def bench_summary(path: Path) -> dict | None:
    """The figures a reader wants first, from a bench JSON (partial ones too)."""
    rec = _read_json(path)
    if not isinstance(rec, dict):
        return None
    out = {"complete": rec.get("complete"), "preload": rec.get("preload"), "methods": {}}
    for m, row in (rec.get("results") or {}).items():
        paths = {}
        for label, r in row["paths"].items():
            paths[label] = {"it_per_s": [round(s["it_per_s"], 3) for s in r["train"]],
                            "losses_finite": all(s["losses_finite"] for s in r["train"]),
                            "eval_s_per_case": round(r["eval"]["s_per_case"], 3),
                            "inference_s_per_case": round(r["eval"]["inference_s_per_case"], 3),
                            "host_s_per_case": round(r["eval"]["host_s_per_case"], 3),
                            "peak_memory_mib": None if r["peak_memory_bytes"] is None
                            else round(r["peak_memory_bytes"] / 2 ** 20)}
        out["methods"][m] = {"paths": paths, "host_ms_per_iteration": [round(h["ms"], 1) for h in
                                                                        row.get("host_ms_per_iteration") or []]}
    return out


# ------------------------------------------------------------------------------------------- step 1b

def resume_check(method: str, data, device: str, profile: str, iterations: int, labeled: int, workdir: Path) -> dict:
    """A run of ``iterations`` per stage straight through, and the same run interrupted half-way through its last
    stage (checkpoint) and resumed: their logged losses and final weights compared; one evaluated test case."""
    import torch

    from ssl_bench.errors import Interrupted
    from ssl_bench.run_folder import RunFolder, prepare_run_dir
    from ssl_bench.trainer import Trainer, build_config

    cfg = build_config(method, profile, dataset_defaults=data.run_defaults(), device=device, labeled=labeled,
                       iterations=iterations, checkpoint_every=iterations, log_every=1, eval_cases=1)
    straight, resumed = workdir / f"{method}-straight", workdir / f"{method}-resumed"
    t0 = time.perf_counter()
    with prepare_run_dir(straight, resume=False, overwrite=True):
        trainer = Trainer(cfg, straight, data, progress=False)
        n_stages = len(trainer.stages)
        trainer.run()
    t1 = time.perf_counter()
    stop = (n_stages, max(iterations // 2, 1))
    with prepare_run_dir(resumed, resume=False, overwrite=True):
        try:
            Trainer(cfg, resumed, data, progress=False).run(stop_at=stop)
            raise RuntimeError(f"the run was not interrupted at stage {stop[0]} iteration {stop[1]}")
        except Interrupted:
            pass
    with prepare_run_dir(resumed, resume=True, overwrite=False):
        summary = Trainer(cfg, resumed, data, progress=False).run(resume=True)
    t2 = time.perf_counter()

    def logged(folder):
        rows = RunFolder(folder).read_log()
        return {(r["stage"], r["iteration"]): {k: v for k, v in r.items() if k not in ("it_per_s", "elapsed_s")}
                for r in rows}

    a, b = logged(straight), logged(resumed)
    diffs = [abs(a[key][k] - b[key][k]) for key in a if key in b for k in a[key]
             if isinstance(a[key][k], (int, float)) and isinstance(b[key].get(k), (int, float))]
    losses = [v for row in b.values() for k, v in row.items() if k.startswith("loss") and isinstance(v, (int, float))]
    wa = RunFolder(straight).load_stage(n_stages)["weights"]
    wb = RunFolder(resumed).load_stage(n_stages)["weights"]
    wdiff = max(float((wa[n].double() - wb[n].double()).abs().max()) if wa[n].numel() else 0.0 for n in wa)
    return {"method": method, "iterations_per_stage": iterations, "stages": n_stages,
            "interrupted_at": {"stage": stop[0], "iteration": stop[1]},
            "same_log_rows": sorted(a) == sorted(b),
            "bitwise_equal": sorted(a) == sorted(b) and all(a[k] == b[k] for k in a) and wdiff == 0.0,
            "max_logged_diff": max(diffs, default=0.0), "max_weight_diff": wdiff,
            "losses_finite": bool(losses) and all(torch.isfinite(torch.tensor(losses)).tolist()),
            "eval": {"case": summary["test_cases"], "dice_raw": summary["metrics"]["raw"]["dice"],
                     "timings": summary["timings"].get("eval")},
            "seconds": {"straight": round(t1 - t0, 2), "interrupted_and_resumed": round(t2 - t1, 2)},
            "numerics": summary.get("numerics")}


def resume_main(argv) -> int:
    """``device_session.py resume-check``: step 1's checkpoint-and-resume check, JSON rewritten after each method."""
    p = argparse.ArgumentParser(prog="device_session.py resume-check")
    p.add_argument("--method", action="append", default=None)
    p.add_argument("--data", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--profile", default="paper")
    p.add_argument("--iterations", type=int, default=4)
    p.add_argument("--labeled", type=int, default=8)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    from ssl_bench.bench import preload, resolve_methods
    from ssl_bench.data import LAData

    methods = resolve_methods(a.method or ["all"])
    data = LAData(a.data)
    split = data.split(a.labeled)
    loaded = preload(data, list(split.labeled) + list(split.unlabeled) + list(data.test_ids[:1]))
    record = {"complete": False, "preload": loaded, "results": {}, "errors": {}}
    with tempfile.TemporaryDirectory(prefix="ssl-resume-") as tmp:
        for m in methods:
            try:
                record["results"][m] = r = resume_check(m, data, a.device, a.profile, a.iterations, a.labeled, Path(tmp))
                print(f"resume {m}: bitwise {r['bitwise_equal']}, max logged diff {r['max_logged_diff']:.3g}, max "
                      f"weight diff {r['max_weight_diff']:.3g}, losses finite {r['losses_finite']}, "
                      f"dice {r['eval']['dice_raw']:.4f}", flush=True)
            except Exception as exc:  # one method's failure is a record, the others still run
                record["errors"][m] = f"{type(exc).__name__}: {exc}"
                print(f"resume {m}: FAILED {record['errors'][m]}", flush=True)
            write_json(Path(a.out), record)
    record["complete"] = True
    write_json(Path(a.out), record)
    return 1 if record["errors"] else 0


# ------------------------------------------------------------------------------------------- the session

def install_wheels(session: Session, wheels: Path | None, env: dict) -> dict:
    """Staged wheels (edt, connected-components-3d, medpy...) into /tmp/site, put first on the children's path."""
    if wheels is None or not Path(wheels).is_dir():
        return {"wheels": None}
    files = sorted(str(p) for p in Path(wheels).glob("*.whl"))
    if not files:
        return {"wheels": str(wheels), "installed": []}
    target = Path(tempfile.gettempdir()) / "site"
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
           "--upgrade", "--target", str(target), *files]
    res = run_child(session, cmd, env, timeout=120)
    if res["returncode"] == 0:
        env["PYTHONPATH"] = os.pathsep.join([str(target), env["PYTHONPATH"]])
    return {"wheels": str(wheels), "installed": [Path(f).name for f in files], "returncode": res["returncode"]}


PROVENANCE_CODE = """
import json, os, subprocess
from ssl_bench.runs import provenance
p = provenance()
try:
    p["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                      "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
except Exception as exc:
    p["nvidia_smi"] = f"unavailable ({type(exc).__name__})"
for name in ("edt", "cc3d", "medpy", "ray"):
    try:
        m = __import__(name)
        p.setdefault("modules", {})[name] = getattr(m, "__version__", "present")
    except Exception:
        p.setdefault("modules", {})[name] = None
print("PROVENANCE " + json.dumps(p))
"""


def project_provenance(env: dict) -> dict:
    """ssl_bench.runs.provenance() as a child computes it (GPU, torch, CUDA, cuDNN...), plus nvidia-smi and modules."""
    try:
        res = subprocess.run([sys.executable, "-c", PROVENANCE_CODE], cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return {"error": "provenance child timed out"}
    line = next((ln for ln in res.stdout.splitlines() if ln.startswith("PROVENANCE ")), None)
    return json.loads(line[len("PROVENANCE "):]) if line else {"error": res.stderr[-2000:]}


def parse_args(argv):
    env = os.environ
    p = argparse.ArgumentParser(prog="device_session.py", description=__doc__.split("\n")[0])
    p.add_argument("--out", default=env.get("OUT"), help="the folder whose files come back ($OUT)")
    p.add_argument("--data", default=env.get("SSL_BENCH_DATA", "/tmp/stage/root/LA"))
    p.add_argument("--wheels", default=env.get("SSL_BENCH_WHEELS", "/tmp/stage/root/wheels"))
    p.add_argument("--commit", default=env.get("SSL_BENCH_COMMIT"), help="the commit (the device has no git)")
    p.add_argument("--budget-s", type=float, default=float(env.get("BUDGET_S", 540)))
    p.add_argument("--step-min-s", type=float, default=None, help="the least time every step needs (default: per step)")
    p.add_argument("--device", default=env.get("DEVICE", "cuda"))
    p.add_argument("--profile", default=env.get("PROFILE", "paper"))
    p.add_argument("--methods", default=" ".join(METHODS), help="step 1's methods, space-separated")
    p.add_argument("--precision", default="tf32", help="step 1's fast-path precision")
    p.add_argument("--bench-iterations", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--eval-cases", type=int, default=20, help="step 2's evaluated test cases")
    p.add_argument("--window-batches", type=lambda v: [int(x) for x in v.split()], default=[4, 16],
                   help="step 2's evaluation also at these windows per forward, space-separated (the default 8 is "
                        "always timed): the measurement behind EvalSettings.window_batch")
    p.add_argument("--resume-iterations", type=int, default=4, help="step 1's checkpoint-and-resume run, per stage")
    p.add_argument("--labeled", type=int, default=8)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--run-iterations", type=int, default=None, help="step 3's iterations (default: the paper's 6000)")
    p.add_argument("--run-dir", default=str(Path(tempfile.gettempdir()) / "ssl-bench-runs"))
    p.add_argument("--step4", default=None, help="step 4's command (run in the repo root if time remains)")
    a = p.parse_args(argv)
    if not a.out:
        p.error("--out (or $OUT) is required")
    return a


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["resume-check"]:
        return resume_main(argv[1:])
    a = parse_args(argv)
    s = Session(Path(a.out), a.budget_s)
    return run_session(s, a)


def run_session(s: Session, a) -> int:
    out = s.out
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)  # no pip install there
    if a.commit:
        env["SSL_BENCH_COMMIT"] = a.commit
    py = sys.executable
    cli = [py, "-m", "ssl_bench.cli"]
    common = ["--data", a.data, "--device", a.device, "--profile", a.profile]
    min_s = (lambda name: MIN_S[name]) if a.step_min_s is None else (lambda name: a.step_min_s)

    def left() -> float:  # a child's time limit: what remains of the budget
        return max(s.remaining(), 1.0)

    # -- 0: provenance, first
    s.record["provenance"] = {"commit": a.commit, "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
                              "args": vars(a), "date": _now(), "python": sys.version.split()[0]}
    s.save()
    s.record["provenance"]["install"] = install_wheels(s, Path(a.wheels) if a.wheels else None, env)
    s.record["provenance"]["project"] = project_provenance(env)
    s.save()
    s.say(f"provenance: commit {a.commit}, gpu {(s.record['provenance']['project'] or {}).get('gpu')}")
    failures = 0

    def child(step, cmd, record=None, summarize=None):
        nonlocal failures
        r = run_child(s, cmd, env, timeout=left())
        status = "ok" if r["returncode"] == 0 else ("timeout" if r["timed_out"] else "failed")
        failures += status != "ok"
        info = {"command": shlex.join(cmd), **r}
        if record is not None:
            info["record"] = record
            if summarize is not None:
                info["summary"] = summarize(out / record)
        if status != "ok":
            info["output_tail"] = _tail(s.log)
        s.end(step, status, **info)

    # -- 1: every method's fast path, then checkpoint and resume
    if (st := s.begin("1-bench", "fast path of every method: warm-up, timed iterations, one evaluated case",
                      min_s("1-bench"))):
        cmd = cli + ["bench", *common, "--path", "fast", "--precision", a.precision, "--labeled", str(a.labeled),
                     "--iterations", str(a.bench_iterations), "--warmup", str(a.warmup), "--eval-cases", "1",
                     "--out", str(out / "step1_bench.json")]
        for m in a.methods.split():
            cmd += ["--method", m]
        child(st, cmd, "step1_bench.json", bench_summary)
    if (st := s.begin("1-resume", "checkpoint and resume of every method (straight vs interrupted + resumed)",
                      min_s("1-resume"))):
        cmd = [py, str(Path(__file__).resolve()), "resume-check", "--data", a.data, "--device", a.device, "--profile",
               a.profile, "--iterations", str(a.resume_iterations), "--labeled", str(a.labeled),
               "--out", str(out / "step1_resume.json")]
        for m in a.methods.split():
            cmd += ["--method", m]
        child(st, cmd, "step1_resume.json",
              lambda p: {m: {k: r[k] for k in ("bitwise_equal", "max_logged_diff", "max_weight_diff", "losses_finite")}
                         for m, r in ((_read_json(p) or {}).get("results") or {}).items()})

    # -- 2: vnet at each precision and reference-style; the fast evaluation of the test cases
    if (st := s.begin("2-precisions", "vnet: reference-style path (fp32, deterministic) and the fast path at each "
                      "precision", min_s("2-precisions"))):
        precisions = [p for p in PRECISIONS if a.device == "cuda" or p != "fp16"]  # fp16 needs CUDA
        cmd = cli + ["bench", *common, "--method", "vnet", "--labeled", str(a.labeled), "--path", "fast", "--path",
                     "reference", "--reference-precision", "fp32", "--iterations", str(a.bench_iterations),
                     "--warmup", str(a.warmup), "--eval-cases", "1", "--out", str(out / "step2_precisions.json")]
        for p in precisions:
            cmd += ["--precision", p]
        child(st, cmd, "step2_precisions.json", bench_summary)
    if (st := s.begin("2-eval", f"vnet: fast evaluation of {a.eval_cases} test cases, inference and LCC+metrics apart",
                      min_s("2-eval"))):
        cmd = cli + ["bench", *common, "--method", "vnet", "--labeled", str(a.labeled), "--path", "fast",
                     "--precision", a.precision, "--iterations", "1", "--warmup", "1",
                     "--eval-cases", str(a.eval_cases), "--out", str(out / "step2_eval.json"),
                     *(x for b in a.window_batches for x in ("--window-batch", str(b)))]
        child(st, cmd, "step2_eval.json", bench_summary)

    # -- 3: the paper run of vnet with 8 labels
    if (st := s.begin("3-run", f"vnet paper run, {a.labeled} labels, and its evaluation", min_s("3-run"))):
        run = Path(a.run_dir) / f"vnet-L{a.labeled}-s{a.seed}-honest"
        cmd = cli + ["run", *common, "--method", "vnet", "--labeled", str(a.labeled), "--seed", str(a.seed),
                     "--out", str(run), "--quiet"]
        if a.run_iterations:
            cmd += ["--iterations", str(a.run_iterations)]
        if (run / "config.json").is_file():
            cmd.append("--resume")  # a warm machine still holds the run an earlier call began
        r = run_child(s, cmd, env, timeout=left())
        status = "ok" if r["returncode"] == 0 else ("timeout" if r["timed_out"] else "failed")
        failures += status != "ok"
        packed = pack_run(run, out / "step3_run.tar.gz")
        summary = _read_json(run / "summary.json") if status == "ok" else None
        info = {"command": shlex.join(cmd), **r, "record": "step3_run.tar.gz", "packed": packed,
                "summary": summary and {"metrics": summary.get("metrics"), "timings": summary.get("timings"),
                                        "numerics": summary.get("numerics")}}
        if status != "ok":
            info["output_tail"] = _tail(s.log)
            if status == "timeout":
                info["note"] = "interrupted at the budget with a checkpoint; the next call on a warm machine resumes it"
        s.end(st, status, **info)

    # -- 4: only if time remains
    if not a.step4:
        s.record["steps"].append({"step": "4-extra", "status": "skipped", "reason": "no --step4 command given"})
        s.save()
    elif (st := s.begin("4-extra", a.step4, min_s("4-extra"))):
        child(st, ["bash", "-c", a.step4])
    s.record["finished"] = _now()
    s.save()
    s.say(f"session done in {s.record['elapsed_s']} s, {failures} step(s) not ok")
    return 1 if failures else 0


def pack_run(run: Path, dest: Path) -> list[str]:
    """The run's records (never its checkpoints) as one tar.gz, written atomically."""
    names = [n for n in RUN_FILES if (run / n).is_file()]
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
    os.close(fd)
    os.chmod(tmp, 0o644)
    with tarfile.open(tmp, "w:gz") as tar:
        for n in names:
            tar.add(run / n, arcname=f"{run.name}/{n}")
    os.replace(tmp, dest)
    return names


if __name__ == "__main__":
    sys.exit(main())
