"""End to end through the CLI: the smoke profile on real data, reproducibility, resume, bad input."""
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch

from ssl_bench.cli import main

RUN_FILES = ["config.json", "log.jsonl", "metrics_per_case.csv", "summary.json", "stages/stage1.pt", "checkpoints/last.pt"]


def run_cli(*args):
    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def real_smoke(la_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("real") / "vnet"
    assert run_cli("run", "--method", "vnet", "--profile", "smoke", "--data", la_root, "--out", out, "--quiet") == 0
    return out


def test_smoke_on_real_data_writes_every_file(real_smoke, la_root):
    for name in RUN_FILES:
        assert (real_smoke / name).is_file(), name
    cfg = json.loads((real_smoke / "config.json").read_text())
    assert cfg["config"]["method"] == "vnet" and cfg["config"]["profile"] == "smoke"
    assert cfg["split"]["labeled"][0] == "06SR5RBREL16DQ6M8LWS" and len(cfg["split"]["labeled"]) == 8
    listed = dict(line.split("  ./")[::-1] for line in (la_root / "SHA256SUMS.h5.txt").read_text().split("\n") if line)
    for case, digest in cfg["data"]["sha256"].items():
        assert listed[f"{case}/mri_norm2.h5"] == digest
    for key in ("torch", "numpy", "medpy", "git", "command", "date"):
        assert key in cfg["provenance"]
    rows = list(csv.DictReader((real_smoke / "metrics_per_case.csv").open()))
    assert len(rows) == 4 and {r["post"] for r in rows} == {"raw", "lcc"}
    summary = json.loads((real_smoke / "summary.json").read_text())
    assert summary["protocol"] == "honest" and summary["checkpoint"]["iteration"] == 12
    assert summary["paper_post"] == "raw"  # UA-MT's tester has no LCC
    raw = [float(r["dice"]) for r in rows if r["post"] == "raw"]
    assert summary["metrics"]["raw"]["dice"] == pytest.approx(np.mean(raw))
    log = [json.loads(line) for line in (real_smoke / "log.jsonl").read_text().splitlines()]
    assert log[-1]["iteration"] == 12 and all("it_per_s" in r and "lr" in r and "loss" in r for r in log)


def test_eval_reproduces_the_run(real_smoke, tmp_path):
    before = (real_smoke / "metrics_per_case.csv").read_text()
    assert run_cli("eval", real_smoke, "--quiet") == 0
    assert (real_smoke / "metrics_per_case.csv").read_text() == before


def test_same_seed_gives_identical_numbers(demo_root, tmp_path):
    args = ["run", "--method", "vnet", "--profile", "smoke", "--labeled", 4, "--iterations", 6, "--data", demo_root, "--quiet"]
    assert run_cli(*args, "--out", tmp_path / "a") == 0
    assert run_cli(*args, "--out", tmp_path / "b") == 0
    a, b = (json.loads((tmp_path / x / "summary.json").read_text()) for x in "ab")
    assert a["metrics"] == b["metrics"]
    assert (tmp_path / "a/metrics_per_case.csv").read_text() == (tmp_path / "b/metrics_per_case.csv").read_text()
    assert run_cli(*args, "--seed", 7, "--out", tmp_path / "c") == 0
    wa = torch.load(tmp_path / "a/stages/stage1.pt", weights_only=False)["weights"]
    wc = torch.load(tmp_path / "c/stages/stage1.pt", weights_only=False)["weights"]
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)  # the seed matters


def _weights(run):
    return torch.load(run / "stages/stage1.pt", weights_only=False)["weights"]


def test_ctrl_c_then_resume_equals_uninterrupted(demo_root, tmp_path):
    common = ["--method", "vnet", "--profile", "smoke", "--labeled", "4", "--iterations", "30",
              "--checkpoint-every", "1000", "--eval-cases", "1", "--data", str(demo_root)]
    assert run_cli("run", *common, "--quiet", "--out", tmp_path / "full") == 0
    out = tmp_path / "cut"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "ssl_bench.cli", "run", *common, "--out", str(out)],
                            stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    log = out / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.is_file() and log.read_text().strip()):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)  # stops at the next iteration boundary with a checkpoint
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "continue with --resume" in err.strip().splitlines()[-1]
    state = torch.load(out / "checkpoints/last.pt", weights_only=False)
    assert 1 <= state["iteration"] < 30 and not (out / "summary.json").exists()
    assert run_cli("run", *common, "--quiet", "--out", out, "--resume") == 0
    wf, wc = _weights(tmp_path / "full"), _weights(out)
    assert all(torch.equal(wf[k], wc[k]) for k in wf)
    log_rows = [json.loads(x) for x in log.read_text().splitlines()]
    iters = [r["iteration"] for r in log_rows]
    assert iters == sorted(set(iters)) and iters[-1] == 30  # no duplicated or missing tail after the resume


def test_killed_run_resumes_from_last_periodic_checkpoint(demo_root, tmp_path):
    from ssl_bench.errors import Interrupted
    from ssl_bench.trainer import build_config, run_training

    cfg = build_config("vnet", "smoke", labeled=4, iterations=8, checkpoint_every=3, eval_cases=1)
    run_training(cfg, tmp_path / "full", demo_root, progress=False)
    cut = tmp_path / "cut"
    with pytest.raises(Interrupted):
        run_training(cfg, cut, demo_root, progress=False, stop_at=(1, 6))
    periodic = (cut / "checkpoints/last.pt").read_bytes()
    with pytest.raises(Interrupted):
        run_training(cfg, cut, demo_root, progress=False, resume=True, stop_at=(1, 7))
    # a hard kill during iteration 8: the log has run ahead of the last checkpoint on disk (iteration 6)
    (cut / "checkpoints/last.pt").write_bytes(periodic)
    assert max(json.loads(x)["iteration"] for x in (cut / "log.jsonl").read_text().splitlines()) == 7
    run_training(cfg, cut, demo_root, progress=False, resume=True)
    wf, wc = _weights(tmp_path / "full"), _weights(cut)
    assert all(torch.equal(wf[k], wc[k]) for k in wf)
    iters = [json.loads(x)["iteration"] for x in (cut / "log.jsonl").read_text().splitlines()]
    assert iters == sorted(set(iters)) and iters[-1] == 8


# ------------------------------------------------------------------ bad input

def _copy_demo(demo_root, tmp_path):
    dst = tmp_path / "LA"
    shutil.copytree(demo_root, dst)
    return dst


def _case_file(root, index=0, listname="train.list"):
    case = (root / listname).read_text().split()[index]
    return root / "2018LA_Seg_Training Set" / case / "mri_norm2.h5"


def _rewrite(path, image=None, label=None, drop=None):
    with h5py.File(path, "r") as f:
        data = {"image": f["image"][...], "label": f["label"][...]}
    if image is not None:
        data["image"] = image
    if label is not None:
        data["label"] = label
    if drop:
        del data[drop]
    path.unlink()
    with h5py.File(path, "w") as f:
        for k, v in data.items():
            f.create_dataset(k, data=v)


def _break_missing_list(root):
    (root / "test.list").unlink()


def _break_missing_h5(root):
    _case_file(root, 2).unlink()


def _break_corrupt_h5(root):
    p = _case_file(root, 1)
    p.write_bytes(p.read_bytes()[:500])


def _break_missing_label(root):
    _rewrite(_case_file(root, 0), drop="label")


def _break_shape(root):
    p = _case_file(root, 0)
    with h5py.File(p, "r") as f:
        lab = f["label"][...]
    _rewrite(p, label=lab[:-1])


def _break_label_values(root):
    p = _case_file(root, 5)
    with h5py.File(p, "r") as f:
        lab = f["label"][...]
    lab[0, 0, 0] = 2
    _rewrite(p, label=lab)


@pytest.mark.parametrize("breaker, message", [
    (_break_missing_list, "missing case list"),
    (_break_missing_h5, "missing file"),
    (_break_corrupt_h5, "cannot read"),
    (_break_missing_label, "no dataset 'label'"),
    (_break_shape, "differ"),
    (_break_label_values, "label values must be 0 or 1"),
])
def test_bad_data_gives_one_line_and_exit_2(demo_root, tmp_path, capsys, breaker, message):
    root = _copy_demo(demo_root, tmp_path)
    breaker(root)
    out = tmp_path / "run"
    rc = run_cli("run", "--method", "vnet", "--profile", "smoke", "--data", root, "--out", out, "--quiet")
    err = capsys.readouterr().err
    assert rc == 2
    assert len(err.strip().splitlines()) == 1 and message in err and "Traceback" not in err
    assert not out.exists()  # validated before anything is written
    if breaker is not _break_missing_list:
        rc = run_cli("data", "verify", "--data", root)
        captured = capsys.readouterr()
        assert rc == 2 and "problem:" in captured.out and len(captured.err.strip().splitlines()) == 1


@pytest.mark.parametrize("args, message", [
    (["--labeled", "0"], "--labeled must be between 1 and 16"),
    (["--labeled", "17"], "--labeled must be between 1 and 16"),
    (["--method", "nope"], "unknown method 'nope'; registered: "),
    (["--patch", "50,50,50"], "multiple of 16"),
    (["--patch", "a,b"], "--patch"),
    (["--option", "nope=1"], "vnet has no option 'nope'; its options: none"),
    (["--option", "novalue"], "--option must look like KEY=VALUE"),
])
def test_bad_options(demo_root, tmp_path, capsys, args, message):
    base = {"--method": "vnet", "--labeled": "4"}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value
    flat = [x for kv in base.items() for x in kv]
    rc = run_cli("run", *flat, "--profile", "smoke", "--data", demo_root, "--out", tmp_path / "r", "--quiet")
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_missing_data_location(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("SSL_BENCH_DATA", raising=False)
    assert run_cli("run", "--method", "vnet", "--out", tmp_path / "r") == 2
    assert "pass --data DIR or set SSL_BENCH_DATA" in capsys.readouterr().err
    assert run_cli("run", "--method", "vnet", "--data", tmp_path / "nowhere", "--out", tmp_path / "r") == 2
    assert "data folder not found" in capsys.readouterr().err
    monkeypatch.setenv("SSL_BENCH_DATA", str(tmp_path / "nowhere"))
    assert run_cli("data", "verify") == 2
    assert "data folder not found" in capsys.readouterr().err


def test_existing_output_is_never_overwritten_silently(demo_root, tmp_path, capsys):
    out = tmp_path / "r"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    rc = run_cli("run", "--method", "vnet", "--profile", "smoke", "--labeled", 4, "--data", demo_root, "--out", out, "--quiet")
    err = capsys.readouterr().err
    assert rc == 2 and "--resume" in err and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert (out / "precious.txt").read_text() == "keep me" and len(list(out.iterdir())) == 1
    rc = run_cli("run", "--method", "vnet", "--profile", "smoke", "--labeled", 4, "--data", demo_root, "--out", out, "--quiet", "--resume")
    assert rc == 2 and "nothing to resume" in capsys.readouterr().err


def test_resume_refuses_changed_settings(demo_root, tmp_path, capsys):
    from ssl_bench.errors import Interrupted
    from ssl_bench.trainer import build_config, run_training

    cfg = build_config("vnet", "smoke", labeled=4, iterations=4, eval_cases=1)
    with pytest.raises(Interrupted):
        run_training(cfg, tmp_path / "r", demo_root, progress=False, stop_at=(1, 2))
    rc = run_cli("run", "--method", "vnet", "--profile", "smoke", "--labeled", 5, "--iterations", 4, "--eval-cases", 1,
                 "--data", demo_root, "--out", tmp_path / "r", "--resume", "--quiet")
    assert rc == 2 and "setting 'labeled' was 4, now 5" in capsys.readouterr().err


def test_bench_reports_both_paths(demo_root, tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = run_cli("bench", "--method", "vnet", "--profile", "smoke", "--data", demo_root, "--device", "cpu",
                 "--iterations", 1, "--eval-cases", 1, "--out", out)
    text = capsys.readouterr().out
    assert rc == 0 and "reference-style" in text and "ratio" in text
    result = json.loads(out.read_text())
    paths = result["results"]["vnet"]["paths"]
    fast, ref = paths["fast-tf32"]["train"][0]["it_per_s"], paths["reference-tf32"]["train"][0]["it_per_s"]
    assert fast > 0 and ref > 0
    assert result["results"]["vnet"]["speedup"]["fast-tf32"]["train"] == [pytest.approx(fast / ref)]
    assert all(p["eval"]["s_per_case"] > 0 for p in paths.values()) and "git" in result["provenance"]


def test_literature_protocol_selects_best_on_test_and_keeps_the_last(demo_root, tmp_path, monkeypatch):
    from methods.vnet import VNetBaseline
    from ssl_bench.trainer import build_config, run_training

    monkeypatch.setattr(VNetBaseline, "literature_selection", (2, 2))
    cfg = build_config("vnet", "smoke", labeled=4, iterations=6, eval_cases=1, protocol="literature", selection_every=2)
    summary = run_training(cfg, tmp_path / "lit", demo_root, progress=False)
    log = [json.loads(x) for x in (tmp_path / "lit/log.jsonl").read_text().splitlines()]
    dices = {r["iteration"]: r["test_dice_raw"] for r in log if "test_dice_raw" in r}
    assert sorted(dices) == [2, 4, 6]
    best, best_it = None, None  # Decision 9: the running best is round(dice, 4); strictly greater wins
    for it in sorted(dices):
        if best is None or dices[it] > best:
            best, best_it = round(dices[it], 4), it
    assert summary["checkpoint"] == {"stage": 1, "iteration": best_it, "selection": "best-on-test"}
    assert summary["best_on_test"]["dice"] == best
    assert summary["last"]["checkpoint"]["iteration"] == 6 and (tmp_path / "lit/metrics_per_case_last.csv").is_file()
    raw = [float(r["dice"]) for r in csv.DictReader((tmp_path / "lit/metrics_per_case.csv").open()) if r["post"] == "raw"]
    assert raw[0] == pytest.approx(dices[best_it])  # the selected weights reproduce the selection Dice


def test_every_run_option_reaches_the_record_and_the_run(demo_root, tmp_path, monkeypatch):
    """Issue 23: each `ssl-bench run` option, given a value other than its default, is in the RunConfig the trainer
    gets, in config.json's record, and in what the run does with it (split, lengths, selection, evaluation)."""
    import click

    import ssl_bench.trainer as trainer_mod
    from ssl_bench.cli import cli as group
    from ssl_bench.data import LAData

    seen = {}

    def capture(cfg, out, data_dir=None, **kw):
        seen["cfg"], seen["out"] = cfg, out
        raise SystemExit(0)

    monkeypatch.setattr(trainer_mod, "run_training", capture)
    given = {"--labeled": "4", "--seed": "7", "--iterations": "5", "--schedule-scale": "0.5", "--patch": "32,32,16",
             "--n-filters": "3", "--device": "cpu", "--protocol": "val", "--val-cases": "2",
             "--selection-every": "7", "--profile": "smoke", "--checkpoint-every": "3", "--eval-cases": "1",
             "--empty-policy": "zero", "--precision": "fp32", "--units": "voxel",
             "--option": "ssnet_memory_weights=mean", "--out": str(tmp_path / "run")}
    run_options = {p.opts[0] for p in group.commands["run"].params if isinstance(p, click.Option)}
    # every option is exercised here, but those that do not set a run's settings (and --teacher: tests/test_omf.py)
    assert run_options - set(given) == {"--method", "--data", "--teacher", "--resume", "--overwrite", "--quiet"}
    with pytest.raises(SystemExit):
        main(["run", "--method", "ssnet", "--data", str(demo_root), *[x for kv in given.items() for x in kv]])
    cfg = seen["cfg"]
    expect = {"labeled": 4, "seed": 7, "iterations": 5, "schedule_scale": 0.5, "patch": (32, 32, 16), "n_filters": 3,
              "device": "cpu", "protocol": "val", "val_cases": 2, "selection_every": 7, "profile": "smoke",
              "checkpoint_every": 3, "eval_cases": 1, "empty_policy": "zero", "precision": "fp32", "units": "voxel",
              "options": {"ssnet_memory_weights": "mean"}}
    assert {k: getattr(cfg, k) for k in expect} == expect
    assert seen["out"] == tmp_path / "run"
    trainer = trainer_mod.Trainer(cfg, tmp_path / "run", LAData(demo_root), progress=False)
    record = trainer.config_record()["config"]
    assert {k: record[k] for k in expect} == {**expect, "patch": [32, 32, 16]}
    stage = trainer.stages[0]
    assert len(trainer.split.labeled) == 4 and trainer.selection_ids == list(trainer.split.val) and len(trainer.split.val) == 2
    assert trainer.stage_iterations(0) == 5 and trainer.ctx.schedule_scale == 0.5 and trainer.ctx.n_filters == 3
    assert trainer.selection_rule(stage)[1] == 7 and len(trainer.test_ids) == 1 and trainer.device.type == "cpu"
    assert (trainer.eval_settings.patch, trainer.eval_settings.empty_policy, trainer.eval_settings.precision,
            trainer.eval_settings.units) == ((32, 32, 16), "zero", "fp32", "voxel")
    assert stage.ctx.options == {"ssnet_memory_weights": "mean"}
