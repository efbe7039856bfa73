"""The CPU track's wiring: the experiment file, `sweep --only`, and the bf16 fallback on CPUs without bf16."""
import json

import pytest

from ssl_bench.cli import main
from ssl_bench.experiments import load_experiment
from ssl_bench.sweep import select_cells
from ssl_bench.testing import make_tiny_la


def test_the_cpu_experiment_declares_the_grid():
    exp = load_experiment("cpu")
    assert {c.profile for c in exp.cells} == {"cpu"} and {c.precision for c in exp.cells} == {"fp32"}
    ids = {c.id for c in exp.cells}
    # Table 1 at 8 and 16 labels, one seed; single-stage methods by their val run (honest = its last weights)
    for m in ("vnet", "uamt", "sassnet", "dtc", "ssnet"):
        for n in (8, 16):
            assert f"{m}-L{n}-s1337-val-cpu-fp32" in ids
    for m in ("bcp", "omf"):
        for n in (8, 16):
            assert {f"{m}-L{n}-s1337-honest-cpu-fp32", f"{m}-L{n}-s1337-val-cpu-fp32"} <= ids
    assert "vnet-L80-s1337-honest-cpu-fp32" in ids
    for m in ("omf-s1", "omf-s1-orgloss", "omf-s1-s2"):  # Table 2
        assert f"{m}-L8-s1337-val-cpu-fp32" in ids
    for m in ("vnet", "uamt", "bcp", "omf"):  # 3 seeds at 8 labels
        assert all(f"{m}-L8-s{s}-val-cpu-fp32" in ids for s in (1337, 1338, 1339))
    assert exp.order_against == "table1" and exp.paper is None and exp.occlusion is not None


def test_sweep_only_selects_cells_and_the_stage1_they_reuse():
    plan = load_experiment("cpu").plan()
    got = [c.id for c in select_cells(plan, ("omf-L16-*",))]
    assert sorted(got) == sorted(["omf-s1-orgloss-L16-s1337-honest-cpu-fp32", "omf-s1-orgloss-L16-s1337-val-cpu-fp32",
                                  "omf-L16-s1337-honest-cpu-fp32", "omf-L16-s1337-val-cpu-fp32"])
    assert select_cells(plan, ()) == plan
    from ssl_bench.errors import UserError

    with pytest.raises(UserError, match="matches no cell"):
        select_cells(plan, ("nothing-*",))


def test_sweep_only_dry_run(capsys):
    assert main(["sweep", "cpu", "--dry-run", "--only", "vnet-L8-s1337-*", "--runs-dir", "/nonexistent/runs"]) == 0
    out = capsys.readouterr().out
    assert "1 cells" in out and "vnet-L8-s1337-val-cpu-fp32" in out and "uamt" not in out


def test_bf16_on_a_cpu_without_bf16_falls_back_to_fp32_in_one_line(tmp_path, monkeypatch, capsys):
    import ssl_bench.precision as precision

    monkeypatch.setattr(precision, "cpu_bf16_supported", lambda: False)
    data = make_tiny_la(tmp_path / "LA", n_train=6, n_test=1)
    out = tmp_path / "run"
    code = main(["run", "--method", "vnet", "--labeled", "4", "--data", str(data), "--profile", "smoke", "--device", "cpu",
                 "--patch", "16,16,16", "--iterations", "2", "--precision", "bf16", "--out", str(out), "--quiet"])
    assert code == 0
    err = [ln for ln in capsys.readouterr().err.splitlines() if "bf16" in ln]
    assert len(err) == 1 and "no bf16 instructions" in err[0] and "fp32 instead" in err[0]
    config = json.loads((out / "config.json").read_text())
    assert config["config"]["precision"] == "fp32" and config["config"]["requested_precision"] == "bf16"
    assert config["numerics"]["autocast"] is None


def _reproduce_cell():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("reproduce_cell", Path(__file__).parents[1] / "scripts" / "reproduce_cell.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_reproduce_cell_retrains_a_record_to_identical_numbers(tmp_path, capsys):
    mod = _reproduce_cell()
    data = make_tiny_la(tmp_path / "LA", n_train=6, n_test=1)
    record = tmp_path / "record"
    assert main(["run", "--method", "dtc", "--labeled", "2", "--data", str(data), "--profile", "smoke", "--device", "cpu",
                 "--patch", "16,16,16", "--iterations", "3", "--schedule-scale", "0.04", "--protocol", "val",
                 "--val-cases", "2", "--selection-every", "1", "--out", str(record), "--quiet"]) == 0
    assert mod.main([str(record), "--data", str(data), "--out", str(tmp_path / "again")]) == 0
    assert "identical" in capsys.readouterr().out
    csv = record / "metrics_per_case.csv"
    csv.write_text(csv.read_text().replace("raw", "RAW", 1))
    assert mod.main([str(record), "--data", str(data), "--out", str(tmp_path / "third")]) == 1


def test_reproduce_cell_saves_its_outcome_and_timing_for_the_report(tmp_path, capsys):
    from ssl_bench.track_report import REPRODUCTIONS, reproductions

    mod = _reproduce_cell()
    data = make_tiny_la(tmp_path / "LA", n_train=8, n_test=1)
    runs = tmp_path / "runs"
    args = ["--labeled", "4", "--data", str(data), "--profile", "smoke", "--device", "cpu", "--patch", "16,16,16",
            "--n-filters", "2", "--iterations", "2", "--quiet"]
    teacher, student = runs / "bcp", runs / "bcp-student"
    assert main(["run", "--method", "bcp", *args, "--out", str(teacher)]) == 0
    assert main(["run", "--method", "bcp", *args, "--teacher", str(teacher), "--out", str(student)]) == 0
    assert mod.main([str(teacher), "--data", str(data), "--save"]) == 0
    # a record that reused a stage 1 is re-trained from that run's stage 1 (the recorded teacher)
    assert mod.main([str(student), "--data", str(data), "--save"]) == 0
    saved = reproductions([runs])
    assert set(saved) == {"bcp", "bcp-student"}
    for name, rerun in saved.items():
        recorded = json.loads((runs / name / "config.json").read_text())["provenance"]["git"]
        assert rerun["identical"] is True and rerun["difference"] is None and rerun["record_git"] == recorded
        assert rerun["wall_s"] > 0 and rerun["cpu_s"] > 0 and len(rerun["loadavg_before"]) == 3
        assert rerun["metrics_files"] == ["metrics_per_case.csv"] and rerun["log_lines"] > 0
        trained = {"stage1", "stage2"} if name == "bcp" else {"stage2"}
        assert {k for k in rerun["timings"] if k.startswith("stage")} == trained
    assert saved["bcp-student"]["teacher"] == str(teacher) and saved["bcp"]["teacher"] is None
    # a re-run that differs is saved as such (exit 1)
    csv = teacher / "metrics_per_case.csv"
    csv.write_text(csv.read_text().replace("raw", "RAW", 1))
    assert mod.main([str(teacher), "--data", str(data), "--save"]) == 1
    again = json.loads((runs / REPRODUCTIONS / "bcp.json").read_text())
    assert again["identical"] is False and again["difference"] == "metrics_per_case.csv differs"
    # without the teacher's stage-1 weights: one line, exit 2, nothing saved
    (teacher / "stages" / "stage1.pt").unlink()
    before = (runs / REPRODUCTIONS / "bcp-student.json").read_bytes()
    capsys.readouterr()
    assert mod.main([str(student), "--data", str(data), "--save"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "whose weights are not here" in err[0]
    assert (runs / REPRODUCTIONS / "bcp-student.json").read_bytes() == before


def test_reproduce_cell_compares_everything_but_the_timing_fields(tmp_path):
    mod = _reproduce_cell()
    lines = [{"stage": 1, "iteration": 10, "loss": 0.5, "it_per_s": 2.0, "elapsed_s": 5.0},
             {"stage": 1, "iteration": 20, "loss": 0.25, "it_per_s": 2.0, "elapsed_s": 10.0}]
    record, again = tmp_path / "record", tmp_path / "again"
    for d in (record, again):
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"config": {"log_every": 10}}))
        (d / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
        for name in ("metrics_per_case.csv", "metrics_per_case_last.csv"):
            (d / name).write_text(f"case,post,dice\nA,raw,0.5\n{name}\n")
    assert mod.compare(record, again) == (None, 2, ["metrics_per_case.csv", "metrics_per_case_last.csv"], [])
    slower = [dict(r, it_per_s=1.0, elapsed_s=r["elapsed_s"] * 2) for r in lines]  # timing only: the same
    (again / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in slower))
    assert mod.compare(record, again)[0] is None
    other = [lines[0], dict(lines[1], loss=0.2500001)]
    (again / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in other))
    assert mod.compare(record, again)[0] == "log.jsonl differs at line 2"
    (again / "log.jsonl").write_text(json.dumps(lines[0]) + "\n")  # cut short
    assert mod.compare(record, again)[0] == "log.jsonl differs at line 2"
    # a record resumed after iteration 10 logged iteration 11 too; an uninterrupted re-run did not
    resumed = [lines[0], {"stage": 1, "iteration": 11, "loss": 0.4, "it_per_s": 0.1, "elapsed_s": 50.0}, lines[1]]
    (record / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in resumed))
    (again / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert mod.compare(record, again)[0] is None and mod.compare(record, again)[3] == [[1, 11]]
    (again / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in other))  # still a difference after it
    assert mod.compare(record, again)[0] == "log.jsonl differs at line 3"
    (again / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in resumed))  # the re-run's row is not extra
    (record / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert mod.compare(record, again)[0] == "log.jsonl differs at line 2"
    (again / "log.jsonl").write_text((record / "log.jsonl").read_text())
    (again / "metrics_per_case_last.csv").unlink()
    assert mod.compare(record, again)[0] == "metrics_per_case_last.csv differs"
