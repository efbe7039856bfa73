"""`ssl-bench sweep` through a real (tiny, local) Ray session on the demo data.

One Ray session and one sweep are shared by the module (Ray start-up is slow). The sweep's grid:
two 2-iteration vnet cells (seed 2 left interrupted beforehand, so it must be resumed), one cell
that fails inside its trial (20 labeled cases, the demo data has 16: the sweep's own check of the
cells against the data set is switched off there, standing for a failure no check foresees), and an
omf-s1-s2 cell whose stage 1 comes from an omf-s1 cell that the plan adds and trains first. With the
check on, that cell is refused in one line before Ray starts.
"""
import json

import pytest

from ssl_bench.cli import main
from ssl_bench.errors import Interrupted, UserError
from ssl_bench.experiments import load_experiment
from ssl_bench.sweep import cell_config, run_sweep
from ssl_bench.trainer import RunConfig, run_training

HEAD = 'profile = "smoke"\nseeds = [1, 2]\n[run]\niterations = 2\neval_cases = 1\n'
GOOD = HEAD + """
[[grid]]
methods = ["vnet"]
labeled = [4]

[[grid]]
methods = ["omf-s1-s2"]
labeled = [4]
seeds = [1]
"""
WITH_FAILURE = GOOD + """
[[grid]]  # the demo data has 16 training cases: this cell fails inside its trial
methods = ["vnet"]
labeled = [20]
seeds = [1]
"""


@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, object_store_memory=80 * 1024 * 1024, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def grids(tmp_path_factory):
    d = tmp_path_factory.mktemp("grids")
    (d / "grid.toml").write_text(WITH_FAILURE)
    (d / "good.toml").write_text(GOOD)
    return d


@pytest.fixture(scope="module")
def swept(ray_session, grids, demo_root, tmp_path_factory):
    runs = tmp_path_factory.mktemp("sweep") / "runs"
    exp = load_experiment(grids / "grid.toml")
    ids = {f"{c.method}/L{c.labeled}/s{c.seed}": c for c in exp.plan()}
    # a driver killed mid-run leaves an incomplete folder: seed 2 stopped after its first iteration
    interrupted = ids["vnet/L4/s2"].run_dir(runs)
    cfg = RunConfig.from_json(cell_config(ids["vnet/L4/s2"], runs.resolve(), 0.0))
    with pytest.raises(Interrupted):
        run_training(cfg, interrupted, demo_root, progress=False, stop_at=(1, 1))
    config_before = (interrupted / "config.json").read_text()
    lines = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("ssl_bench.sweep.check_cells", lambda *args, **kwargs: None)  # the trial must fail by itself
        with pytest.raises(UserError) as refused:  # not touched without --resume
            run_sweep(grids / "grid.toml", demo_root, runs, echo=lambda *_: None)
        with pytest.raises(UserError) as failed:
            run_sweep(grids / "grid.toml", demo_root, runs, resume=True, max_failures=1, echo=lines.append)
    status = json.loads((runs / "_sweeps" / "grid" / "status.json").read_text())["cells"]
    return {"runs": runs, "ids": ids, "refused": str(refused.value), "failed": str(failed.value), "status": status,
            "lines": lines, "config_before": config_before}


def test_incomplete_folder_needs_resume(swept):
    assert "incomplete run folder" in swept["refused"] and "pass --resume" in swept["refused"]


def test_failing_cell_is_retried_reported_and_does_not_stop_the_others(swept):
    status, ids = swept["status"], swept["ids"]
    bad = status[ids["vnet/L20/s1"].id]
    assert bad["state"] == "failed" and bad["attempts"] == 2  # first try + max_failures=1 retry
    assert "--labeled must be between 1 and 16" in bad["error"]
    assert swept["failed"].startswith(f"1 of 5 cells failed, e.g. {ids['vnet/L20/s1'].id}")
    for key in ("vnet/L4/s1", "vnet/L4/s2", "omf-s1/L4/s1", "omf-s1-s2/L4/s1"):
        assert status[ids[key].id]["state"] == "complete", key
        summary = json.loads((ids[key].run_dir(swept["runs"]) / "summary.json").read_text())
        assert summary["checkpoint"]["iteration"] == 2 and summary["metrics"]["raw"]["n_cases"] == 1
        assert summary["device"] == "cpu"
    log = (swept["runs"] / "_sweeps" / "grid" / "logs" / f"{ids['vnet/L20/s1'].id}.log").read_text()
    assert "Traceback" in log and log.count(" attempt on ") == 2


def test_interrupted_cell_was_resumed_not_restarted(swept):
    run = swept["ids"]["vnet/L4/s2"].run_dir(swept["runs"])
    assert (run / "config.json").read_text() == swept["config_before"]  # a restart would rewrite it
    assert [json.loads(ln)["iteration"] for ln in (run / "log.jsonl").read_text().splitlines()] == [1, 2]


def test_two_stage_cell_reuses_the_provider_stage1(swept):
    ids, runs = swept["ids"], swept["runs"]
    provider, cell = ids["omf-s1/L4/s1"], ids["omf-s1-s2/L4/s1"]
    assert provider.implicit and cell.teacher == provider.id
    cfg = json.loads((cell.run_dir(runs) / "config.json").read_text())["config"]
    assert cfg["teacher"] == str(provider.run_dir(runs.resolve()))
    summary = json.loads((cell.run_dir(runs) / "summary.json").read_text())
    assert "stage1" not in summary["timings"] and "stage2" in summary["timings"]  # stage 1 was not retrained


def test_rerun_skips_complete_cells(swept, grids, demo_root, monkeypatch):
    runs = swept["runs"]
    stamps = {p: p.stat().st_mtime_ns for p in runs.glob("*/summary.json")}

    def no_ray(*args, **kwargs):
        raise AssertionError("nothing should be trained")

    monkeypatch.setattr("ssl_bench.sweep._run_waves", no_ray)
    status = run_sweep(grids / "good.toml", demo_root, runs, echo=lambda *_: None)
    assert {s["state"] for s in status.values()} == {"skipped"} and len(status) == 4
    assert {p: p.stat().st_mtime_ns for p in runs.glob("*/summary.json")} == stamps


def test_asking_for_gpus_without_gpus_fails_clearly(ray_session, grids, demo_root, tmp_path):
    with pytest.raises(UserError, match="--gpus-per-trial 0.5 asks for GPUs, but the Ray cluster has none"):
        run_sweep(grids / "good.toml", demo_root, tmp_path / "runs", gpus_per_trial=0.5, echo=lambda *_: None)
    assert not (tmp_path / "runs" / "vnet-L4-s1-honest-smoke").exists()


def test_cli_plan_and_bad_options(grids, demo_root, tmp_path, capsys):
    assert main(["sweep", str(grids / "good.toml"), "--data", str(demo_root), "--runs-dir", str(tmp_path),
                 "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "4 cells (1 stage-1 providers added), 0 complete, 4 to run" in out
    assert "(stage 1 from omf-s1-L4-s1-honest-smoke-" in out
    assert main(["sweep", str(grids / "good.toml"), "--data", str(demo_root), "--gpus-per-trial", "2"]) == 2
    assert "--gpus-per-trial must be between 0 and 1" in capsys.readouterr().err
    assert main(["sweep", "no-such-experiment", "--data", str(demo_root)]) == 2
    assert "no experiment 'no-such-experiment'" in capsys.readouterr().err


def _no_ray(*args, **kwargs):
    raise AssertionError("Ray must not be started for a cell the data set cannot give")


def test_the_cells_are_checked_for_validation_cases_and_mm_units(demo_root, tmp_path, monkeypatch):
    """A val cell whose validation cases would reach the labeled ones, and a units = "mm" cell on a data set that
    stores no spacings, are refused by the check; a dry run without a data set says the cells are unchecked."""
    from ssl_bench.data import LAData
    from ssl_bench.sweep import check_cells

    monkeypatch.setattr("ssl_bench.sweep._start_ray", _no_ray)
    data = LAData(demo_root)
    toml = tmp_path / "val.toml"
    toml.write_text('profile = "smoke"\nseeds = [1]\nprotocols = ["val"]\n[run]\nval_cases = 8\n'
                    '[[grid]]\nmethods = ["vnet"]\nlabeled = [4, 10]\n')
    cells = load_experiment(toml).plan()
    with pytest.raises(UserError, match=r"cell vnet-L10-s1-val-smoke-\w+: --val-cases 8 is more than the 6 unlabeled"):
        check_cells(cells, data, tmp_path, 0.0, {})
    check_cells([c for c in cells if c.labeled == 4], data, tmp_path, 0.0, {})  # 12 unlabeled: fine
    toml.write_text('profile = "smoke"\nseeds = [1]\nprotocols = ["honest"]\n[run]\nunits = "mm"\n'
                    '[[grid]]\nmethods = ["vnet"]\nlabeled = [4]\n')
    with pytest.raises(UserError, match="--units mm needs voxel spacings"):
        check_cells(load_experiment(toml).plan(), data, tmp_path, 0.0, {})
    lines = []
    status = run_sweep(toml, tmp_path / "no-data", tmp_path / "runs", dry_run=True, echo=lines.append)
    assert any("not checked" in ln for ln in lines) and {s["state"] for s in status.values()} == {"pending"}
