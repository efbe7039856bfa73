"""Guards on what a run hands on and what gets reported: the `literature` protocol's best-on-test
selection in a two-stage method (Decisions 2 and 9, §3.7.2 item 8, §3.7.3), and finished run folders
whose settings are not their cell's (the sweep refuses them; the report must never show them).

The selection scores are scripted (Trainer._selection_dice replaced), so the best iteration is known;
the weights it must hand on are snapshotted by the test itself when each score is taken.
"""
import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

from ssl_bench.cli import main
from ssl_bench.errors import Interrupted, UserError
from ssl_bench.experiments import PLANNED_METHODS, load_experiment
from ssl_bench.report import collect, write_report
from ssl_bench.sweep import classify, run_sweep
from ssl_bench.testing import make_tiny_la
from ssl_bench.trainer import Trainer, build_config, run_training

FIX = Path(__file__).parent / "fixtures" / "report"  # hand-made finished run folders (tests/test_report.py)
PATCH = (16, 16, 16)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py




# ------------------------------------------------------------------ literature: best-on-test per stage

#: scripted selection Dice after iterations 1..4 of each stage: the best at 2, tied at 3 (a tie never
#: replaces the best: strictly greater, Decision 9), the last (4) below the best
SCRIPT = {"OMFStage1": [0.50, 0.80, 0.80, 0.60], "OMFStage2": [0.40, 0.70, 0.70, 0.20]}
BEST_IT = 2


def _weights(path):
    return torch.load(path, weights_only=False)


def _equal(a, b, keys=None):
    keys = list(a) if keys is None else keys
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in keys)


def _scripted_literature_run(tmp_path_factory, script, stop_at=None):
    """A tiny `omf` run under `literature`, selecting after every iteration with scripted scores (``stop_at``:
    interrupted there, then resumed)."""
    root = make_tiny_la(tmp_path_factory.mktemp("tiny") / "LA")
    out = tmp_path_factory.mktemp("lit") / "omf"
    seen = {name: [] for name in script}

    def scripted(self, stage, nets):
        name = type(stage).__name__
        seen[name].append({k: v.detach().clone() for k, v in nets[stage.trained].state_dict().items()})
        return script[name][len(seen[name]) - 1]

    cfg = build_config("omf", "smoke", labeled=4, iterations=4, patch=PATCH, n_filters=2, device="cpu",
                       eval_cases=1, protocol="literature", selection_every=1, checkpoint_every=1000)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    mp = pytest.MonkeyPatch()
    mp.setattr(Trainer, "_selection_dice", scripted)
    try:
        if stop_at is None:
            summary = run_training(cfg, out, root, progress=False)
        else:
            with pytest.raises(Interrupted):
                run_training(cfg, out, root, progress=False, stop_at=stop_at)
            summary = run_training(cfg, out, root, progress=False, resume=True)
    finally:
        mp.undo()
        torch.set_num_threads(n)
    return out, summary, seen


@pytest.fixture(scope="module")
def literature_run(tmp_path_factory):
    return _scripted_literature_run(tmp_path_factory, SCRIPT)


def test_the_running_best_is_rounded_to_four_decimals(tmp_path_factory):
    # Decision 9: best = round(dice, 4), a new score wins when strictly greater than that.
    # Stage 1: 0.81234 -> best 0.8123; 0.81232 > 0.8123 wins (unrounded it would not).
    # Stage 2: 0.81236 -> best 0.8124; 0.81238 < 0.8124 loses (unrounded it would win).
    script = {"OMFStage1": [0.81234, 0.81232, 0.5, 0.5], "OMFStage2": [0.81236, 0.81238, 0.5, 0.5]}
    out, _, _ = _scripted_literature_run(tmp_path_factory, script)
    assert _weights(out / "stages/stage1.pt")["best_on_test"] == {"dice": 0.8123, "iteration": 2}
    assert _weights(out / "stages/stage2.pt")["best_on_test"] == {"dice": 0.8124, "iteration": 1}


def test_a_resumed_stage_keeps_its_running_best(tmp_path_factory):
    # interrupted after iteration 2 (best so far: 0.9 at 1); after the resume 0.6 and 0.7 must not replace it
    script = {"OMFStage1": [0.9, 0.5, 0.6, 0.7], "OMFStage2": [0.5, 0.6, 0.7, 0.8]}
    out, _, seen = _scripted_literature_run(tmp_path_factory, script, stop_at=(1, 2))
    assert len(seen["OMFStage1"]) == 4
    assert _weights(out / "stages/stage1.pt")["best_on_test"] == {"dice": 0.9, "iteration": 1}
    assert _weights(out / "stages/stage2.pt")["best_on_test"] == {"dice": 0.8, "iteration": 4}


def test_the_selected_and_the_last_weights_have_their_own_metrics(literature_run):
    out, summary, _ = literature_run
    for name, metrics in (("metrics_per_case.csv", summary["metrics"]), ("metrics_per_case_last.csv",
                                                                         summary["last"]["metrics"])):
        rows = list(csv.DictReader((out / name).open()))
        for post, m in metrics.items():
            dice = [float(r["dice"]) for r in rows if r["post"] == post]
            assert sum(dice) / len(dice) == pytest.approx(m["dice"], abs=1e-12), (name, post)
    assert summary["checkpoint"]["iteration"] == BEST_IT and summary["last"]["checkpoint"]["iteration"] == 4


def test_selection_was_taken_after_every_iteration(literature_run):
    _, _, seen = literature_run
    assert {k: len(v) for k, v in seen.items()} == {"OMFStage1": 4, "OMFStage2": 4}
    log = [json.loads(x) for x in (literature_run[0] / "log.jsonl").read_text().splitlines()]
    for stage, name in ((1, "OMFStage1"), (2, "OMFStage2")):
        logged = {r["iteration"]: r["test_dice_raw"] for r in log if r["stage"] == stage and "test_dice_raw" in r}
        assert logged == dict(zip(range(1, 5), SCRIPT[name]))


@pytest.mark.parametrize("k, name", [(1, "OMFStage1"), (2, "OMFStage2")])
def test_each_stage_hands_on_its_best_not_its_last(literature_run, k, name):
    out, _, seen = literature_run
    best, last = seen[name][BEST_IT - 1], seen[name][-1]
    assert not _equal(best, last)  # the weights did move after the best iteration
    handed = _weights(out / f"stages/stage{k}.pt")
    assert handed["iteration"] == BEST_IT and handed["selection"] == "best-on-test"
    assert handed["best_on_test"] == {"dice": SCRIPT[name][BEST_IT - 1], "iteration": BEST_IT}
    assert _equal(handed["weights"], best)
    saved = _weights(out / f"checkpoints/stage{k}_best.pt")
    assert saved["iteration"] == BEST_IT and _equal(saved["weights"], best)
    kept = _weights(out / f"stages/stage{k}_last.pt")  # the last weights are kept beside them
    assert kept["iteration"] == 4 and _equal(kept["weights"], last)


def test_stage2_starts_from_the_stage1_selection(literature_run):
    """§3.7.3: the frozen teacher loads the stage-1 best; its parameters never move (buffers drift)."""
    out, _, seen = literature_run
    teacher = _weights(out / "checkpoints/last.pt")["nets"]["teacher"]
    params = [k for k in teacher if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert params and _equal(teacher, seen["OMFStage1"][BEST_IT - 1], keys=params)
    assert not _equal(teacher, seen["OMFStage1"][-1], keys=params)


def test_both_the_selection_and_the_last_weights_are_evaluated(literature_run):
    out, summary, _ = literature_run
    stored = json.loads((out / "summary.json").read_text())
    assert stored["checkpoint"] == summary["checkpoint"] == {"stage": 2, "iteration": BEST_IT,
                                                             "selection": "best-on-test"}
    assert stored["best_on_test"] == {"dice": SCRIPT["OMFStage2"][BEST_IT - 1], "iteration": BEST_IT}
    assert stored["last"]["checkpoint"] == {"stage": 2, "iteration": 4, "selection": "last"}
    assert set(stored["last"]["metrics"]) == set(stored["metrics"]) == {"raw", "lcc"}
    rows = {name: list(csv.DictReader((out / name).open())) for name in ("metrics_per_case.csv",
                                                                         "metrics_per_case_last.csv")}
    cases = {name: sorted((r["case"], r["post"]) for r in r_) for name, r_ in rows.items()}
    assert cases["metrics_per_case.csv"] == cases["metrics_per_case_last.csv"] == [
        (stored["test_cases"][0], "lcc"), (stored["test_cases"][0], "raw")]


# ------------------------------------------------------------------ sweep and report: a folder that is not its cell

VNET_S1 = "vnet-L8-s1-honest"  # a finished folder of the fixture experiment


@pytest.fixture
def runs(tmp_path):
    dst = tmp_path / "runs"
    shutil.copytree(FIX / "runs", dst)
    return dst


def _edit_config(runs, folder, **changes):
    path = runs / folder / "config.json"
    stored = json.loads(path.read_text())
    stored["config"].update(changes)
    path.write_text(json.dumps(stored))


def _plan():
    return load_experiment(FIX / "experiment.toml").plan()


def _report(runs, tmp_path):
    return write_report(FIX / "experiment.toml", runs, tmp_path / "out", echo=lambda *_: None)


def test_unchanged_folders_are_complete_and_reported(runs):
    _, complete = classify(_plan(), runs, 0.0, resume=False)
    assert {c.id for c in complete} == {p.name for p in (FIX / "runs").iterdir()}
    rows = collect(load_experiment(FIX / "experiment.toml", methods=PLANNED_METHODS), runs)
    reported = sorted(run.cell.id for r in rows for run in r.runs if not r.note)
    assert reported == sorted(p.name for p in (FIX / "runs").iterdir())


@pytest.mark.parametrize("key, value", [
    ("iterations", 100), ("patch", [96, 96, 64]), ("n_filters", 8), ("eval_stride_xy", 9),
    ("selection_every", 50), ("empty_policy", "zero"), ("options", {"ssnet_memory_weights": "mean"}),
])
def test_a_finished_folder_with_other_settings_is_refused_by_sweep_and_report(runs, tmp_path, key, value):
    _edit_config(runs, VNET_S1, **{key: value})
    with pytest.raises(UserError, match=f"{VNET_S1} is not this cell \\({key} is"):
        classify(_plan(), runs, 0.0, resume=False)
    with pytest.raises(UserError, match=f"{VNET_S1} is not this cell"):  # the sweep stops before training
        run_sweep(FIX / "experiment.toml", None, runs, dry_run=True, echo=lambda *_: None)
    with pytest.raises(UserError) as refused:
        _report(runs, tmp_path)
    msg = str(refused.value)
    assert str(runs / VNET_S1) in msg and f"{key} is {value!r} there" in msg and "\n" not in msg
    assert not (tmp_path / "out" / "table.md").exists()  # nothing was reported


def test_report_cli_refuses_with_one_line(runs, tmp_path, capsys):
    _edit_config(runs, VNET_S1, iterations=100)
    rc = main(["report", str(FIX / "experiment.toml"), "--runs-dir", str(runs), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and VNET_S1 in err and "iterations" in err


@pytest.mark.parametrize("key, value", [("device", "cpu"), ("fast", False), ("teacher", "/elsewhere"),
                                        ("log_every", 1), ("checkpoint_every", 7)])
def test_settings_that_do_not_define_a_run_are_not_differences(runs, tmp_path, key, value):
    _edit_config(runs, VNET_S1, **{key: value})
    _, complete = classify(_plan(), runs, 0.0, resume=False)
    assert VNET_S1 in {c.id for c in complete}
    rows = collect(load_experiment(FIX / "experiment.toml", methods=PLANNED_METHODS), runs)
    assert any(r.method == "vnet" and [run.cell.seed for run in r.runs] == [1, 2] for r in rows)


def test_a_finished_folder_without_config_is_refused_by_sweep_and_report(runs, tmp_path):
    (runs / VNET_S1 / "config.json").unlink()
    with pytest.raises(UserError, match=f"{VNET_S1} has summary.json but no config.json"):
        classify(_plan(), runs, 0.0, resume=False)
    with pytest.raises(UserError, match=f"{VNET_S1} has summary.json but no config.json"):
        _report(runs, tmp_path)


def test_runs_on_an_imported_data_set_are_never_set_beside_the_published_la_numbers(runs, tmp_path):
    published_vnet = "82.74 / 71.72 / 13.35 / 3.26"  # §5.1's V-Net at 8 labels
    assert published_vnet in (_report(runs, tmp_path / "la")["table.md"]).read_text()
    path = runs / VNET_S1 / "config.json"
    stored = json.loads(path.read_text())
    stored["data"]["imported"] = {"patch": [112, 112, 80], "eval_stride_xy": 18, "eval_stride_z": 4}
    path.write_text(json.dumps(stored))
    said = []
    written = write_report(FIX / "experiment.toml", runs, tmp_path / "imported" / "out", echo=said.append)
    table = written["table.md"].read_text()
    assert published_vnet not in table and "90.23 / 82.34" not in table
    assert "imported data set" in table and any("published LA numbers are not shown" in s for s in said)
