"""The report for a reduced-scale track (ssl_bench/track_report.py), on hand-made run folders with known numbers:
honest rows from a single-stage method's val run, your own runs beside the committed ones (several --runs-dir,
settings checked), the method-ordering page (Kendall's τ beside the paper's Table 1 order)."""
import json

import pandas as pd
import pytest

from ssl_bench.cli import main
from ssl_bench.experiments import Cell, load_experiment

CASES = [f"C{i:02d}" for i in range(6)]

EXPERIMENT = """
title = "track"
description = "Reduced scale; not comparable with published numbers."
profile = "cpu"
precision = "fp32"
seeds = [1]
protocols = ["val"]
compare_to = "bcp"
order_against = "table1"

[[grid]]
methods = ["vnet", "uamt"]
labeled = [8]

[[grid]]
methods = ["bcp"]
labeled = [8]
protocols = ["honest", "val"]
"""


def _metrics(dice: list[float]) -> dict:
    m = sum(dice) / len(dice)
    return {"n_cases": len(dice), "n_empty": 0, "dice": m, "dice_std": 0.0, "jaccard": m - 0.1, "jaccard_std": 0.0,
            "hd95": 5.0, "hd95_std": 0.0, "asd": 1.0, "asd_std": 0.0}


def _csv(dice: list[float]) -> str:
    rows = ["case,post,dice,jaccard,hd95,asd,empty"]
    for post in ("raw", "lcc"):
        rows += [f"{c},{post},{d},{d - 0.1},5.0,1.0,False" for c, d in zip(CASES, dice)]
    return "\n".join(rows) + "\n"


#: what `ssl-bench data derive --zoom 0.5` records as the derived set's settings
DERIVED = {"patch": [64, 64, 32], "eval_stride_xy": 9, "eval_stride_z": 2, "units": "voxel"}


def write_run(runs_dir, cell: Cell, dice, last=None, stages=1, name=None, **config_changes):
    """A finished run folder of ``cell`` with per-case Dice ``dice`` (and ``last`` for its last weights)."""
    d = runs_dir / (name or cell.id)
    d.mkdir(parents=True)
    cfg = cell.config(dataset_defaults={**DERIVED, "patch": tuple(DERIVED["patch"])}).to_json()
    cfg.update(config_changes)
    (d / "config.json").write_text(json.dumps({
        "config": cfg, "data": {"root": "/nonexistent", "imported": DERIVED},
        "method": {"name": cell.method, "summary": "fixture",
                   "stages": [{"stage": f"S{k}", "literature_selection": None} for k in range(stages)]}}))
    summary = {"method": cell.method, "labeled": cell.labeled, "seed": cell.seed, "protocol": cell.protocol,
               "profile": cell.profile, "paper_post": "raw", "checkpoint": {"stage": stages, "iteration": 10},
               "metrics": {"raw": _metrics(dice), "lcc": _metrics(dice)},
               "timings": {"stage1": {"train_s": 600.0}, "eval": {"inference_s": 30.0, "metrics_s": 30.0}}}
    (d / "metrics_per_case.csv").write_text(_csv(dice))
    if last is not None:
        summary["last"] = {"checkpoint": {"stage": stages, "iteration": 240, "selection": "last"},
                           "metrics": {"raw": _metrics(last), "lcc": _metrics(last)}}
        (d / "metrics_per_case_last.csv").write_text(_csv(last))
    (d / "summary.json").write_text(json.dumps(summary))
    if cell.protocol == "val":  # its training log: the report draws the val runs' curves
        (d / "log.jsonl").write_text("".join(json.dumps({"stage": 1, "iteration": i, "lr": 0.01, "loss": 1.0 / i,
                                                         "val_dice_raw": dice[0] * i / 10}) + "\n"
                                             for i in range(2, 12, 2)))
    return d


def _cell(exp, method, protocol="val"):
    return next(c for c in exp.cells if (c.method, c.protocol) == (method, protocol))


@pytest.fixture
def setup(tmp_path):
    path = tmp_path / "track.toml"
    path.write_text(EXPERIMENT)
    exp = load_experiment(path)
    runs = tmp_path / "runs"
    write_run(runs, _cell(exp, "vnet"), [0.70] * 6, last=[0.60, 0.62, 0.64, 0.66, 0.68, 0.70])
    write_run(runs, _cell(exp, "uamt"), [0.80] * 6, last=[0.75] * 6)
    write_run(runs, _cell(exp, "bcp", "honest"), [0.90] * 6, last=None, stages=2)
    write_run(runs, _cell(exp, "bcp", "val"), [0.91] * 6, last=[0.85] * 6, stages=2)
    return tmp_path, path, exp, runs


def _report(path, out, *dirs):
    args = ["report", str(path), "--out", str(out)]
    for d in dirs:
        args += ["--runs-dir", str(d)]
    return main(args)


def _table(out) -> pd.DataFrame:
    df = pd.read_csv(out / "table.csv")
    return df[df["own_post"] == True].rename(columns={"dice_mean": "dice"})  # noqa: E712


def test_honest_rows_of_single_stage_methods_come_from_their_val_runs_last_weights(setup):
    tmp, path, exp, runs = setup
    assert _report(path, tmp / "out", runs) == 0
    df = _table(tmp / "out")
    honest = df[df["protocol"] == "honest"].set_index("method")
    assert honest.loc["vnet", "dice"] == pytest.approx(65.0)  # mean of the last weights' per-case Dice
    assert honest.loc["uamt", "dice"] == pytest.approx(75.0)
    assert honest.loc["bcp", "dice"] == pytest.approx(90.0)  # two stages: its own honest run, not val's last
    val = df[df["protocol"] == "val"].set_index("method")
    assert val.loc["vnet", "dice"] == pytest.approx(70.0) and val.loc["bcp", "dice"] == pytest.approx(91.0)
    md = (tmp / "out" / "table.md").read_text()
    assert "honest (= last of val)" in md and "no second run was trained" in md
    assert "Reduced scale; not comparable with published numbers." in md
    assert "Paper" not in md.split("## Method ordering")[0]  # no published column anywhere in the tables


def test_a_multi_stage_method_gets_no_honest_row_from_its_val_run(setup):
    """BCP's stage 2 starts from a val-selected stage 1, so its val run's last weights are not an honest run."""
    tmp, path, exp, runs = setup
    val_only = tmp / "val-only.toml"
    val_only.write_text(EXPERIMENT.replace('protocols = ["honest", "val"]', 'protocols = ["val"]')
                        + '\n[[grid]]\nmethods = ["dtc"]\nlabeled = [8]\nprotocols = ["honest"]\n')
    assert _report(val_only, tmp / "out", runs) == 0
    df = _table(tmp / "out")
    assert df[(df["protocol"] == "honest") & (df["method"] == "bcp")].empty
    assert df[(df["protocol"] == "honest") & (df["method"] == "uamt")]["dice"].tolist() == [pytest.approx(75.0)]


def test_the_ordering_page_ranks_methods_beside_the_papers_order(setup):
    tmp, path, exp, runs = setup
    assert _report(path, tmp / "out", runs) == 0
    order = pd.read_csv(tmp / "out" / "ordering.csv")
    honest = order[order["protocol"] == "honest"].set_index("method")
    assert honest["rank"].to_dict() == {"bcp": 1, "uamt": 2, "vnet": 3}
    assert honest["paper_rank"].to_dict() == {"bcp": 1, "uamt": 2, "vnet": 3}  # Table 1: BCP > UA-MT > V-Net at 8
    md = (tmp / "out" / "table.md").read_text()
    assert "τ = 1.00" in md
    assert "| BCP | 1 | 90.00 | 1 | 1 |" in md  # our Dice in %, as in the tables
    assert "## Measured time" in md and "In all: 44 min" in md  # 4 runs × (600 + 60) s
    # the first seed's Table 1 cells against the 4-hour budget (all 4 finished here)
    assert "One seed of Table 1's grid (seed 1: 4 runs, " in md and ": 44 min (0.73 h) for the 4 finished." in md


def test_the_budget_counts_the_first_seeds_table1_cells_and_the_stage1_runs_omf_reuses(setup):
    from ssl_bench.experiments import load_experiment
    from ssl_bench.track_report import budget_markdown

    tmp, path, exp, runs = setup
    grid = tmp / "grid.toml"
    grid.write_text(EXPERIMENT.replace("seeds = [1]", "seeds = [1, 2]") + '\n[[grid]]\nmethods = ["omf"]\nlabeled = [8]\n'
                    '\n[[grid]]\nmethods = ["omf-s1"]\nlabeled = [8]\n')
    exp = load_experiment(grid)

    def row(cid, minutes, teacher=None):
        cell = next(c for c in exp.plan() if c.id == cid)
        summary = {"timings": {"stage1": {"train_s": 60.0 * minutes}}}
        run = type("Run", (), {"cell": cell, "summary": summary, "teacher": teacher})()
        return type("Row", (), {"runs": [run]})()

    ids = {c.id: c for c in exp.plan()}
    omf = next(c for c in exp.plan() if c.method == "omf" and c.seed == 1)
    second = next(c for c in exp.plan() if c.method == "vnet" and c.seed == 2)
    s1 = next(c for c in exp.plan() if c.method == "omf-s1")
    assert omf.teacher in ids
    # the stage 1 omf reused counts once, whether it has a row of its own or not
    reused = (omf.teacher, {"stage1": {"train_s": 300.0}})
    md = budget_markdown([row(omf.id, 10, reused), row(omf.teacher, 5), row(second.id, 100), row(s1.id, 1000)], exp)
    assert budget_markdown([row(omf.id, 10, reused), row(second.id, 100), row(s1.id, 1000)], exp) == md
    # seed 1: vnet, uamt, bcp honest + val, omf, and the omf-s1-orgloss run it reuses = 6 runs; seed 2 and the
    # Table 2 variant count in the total only
    assert "In all: 1115 min" in md and "(seed 1: 6 runs, " in md and ": 15 min (0.25 h) for the 2 finished, 4 not yet." in md


def _rerun(runs, cell_id, minutes, identical=True, **changes):
    """What scripts/reproduce_cell.py --save writes: the re-run's outcome and its summary's timings."""
    folder = runs / "_reproductions"
    folder.mkdir(exist_ok=True)
    record = {"run": cell_id, "record_git": {"commit": "a" * 40, "dirty": False},
              "reproduced_git": {"commit": "a" * 40, "dirty": False}, "identical": identical,
              "difference": None if identical else "log.jsonl differs at line 3", "wall_s": 60.0 * minutes + 1,
              "timings": {"stage1": {"train_s": 60.0 * minutes - 30}, "eval": {"inference_s": 20.0, "metrics_s": 10.0}},
              **changes}
    (folder / f"{cell_id}.json").write_text(json.dumps(record))


def test_a_rerun_shows_beside_the_record_and_the_grid_counts_the_quicker_identical_measurement(setup):
    tmp, path, exp, runs = setup
    vnet, uamt, bcp = _cell(exp, "vnet"), _cell(exp, "uamt"), _cell(exp, "bcp", "honest")
    _rerun(runs, vnet.id, 4.0)  # quicker than its 11 recorded minutes, identical: counts
    _rerun(runs, uamt.id, 2.0, identical=False)  # quicker but not the same training: does not count
    _rerun(runs, bcp.id, 20.0)  # slower: the record's 11 minutes count
    assert _report(path, tmp / "out", runs) == 0
    md = (tmp / "out" / "table.md").read_text()
    assert f"| {vnet.id} | 11.0 | 4.0 | identical |" in md
    assert f"| {uamt.id} | 11.0 | 2.0 | **differs** |" in md
    assert f"| {bcp.id} | 11.0 | 20.0 | identical |" in md
    assert f"| {_cell(exp, 'bcp').id} | 11.0 |  |  |" in md  # never re-run
    assert "In all: 44 min" in md  # the records' own minutes
    assert ": 37 min (0.62 h) for the 4 finished." in md and "the quicker of its two measurements counts" in md


@pytest.mark.parametrize("damage", ["not json", "another run", "linked"])
def test_a_damaged_or_linked_rerun_record_is_refused_in_one_line(setup, capsys, damage):
    tmp, path, exp, runs = setup
    vnet = _cell(exp, "vnet")
    _rerun(runs, vnet.id, 4.0)
    target = runs / "_reproductions" / f"{vnet.id}.json"
    if damage == "not json":
        target.write_text(target.read_text()[:40])
    elif damage == "another run":
        target.write_text(target.read_text().replace(f'"run": "{vnet.id}"', '"run": "other"'))
    else:
        outside = tmp / "elsewhere.json"
        outside.write_text(target.read_text())
        target.unlink()
        target.symlink_to(outside)
    capsys.readouterr()
    assert _report(path, tmp / "out", runs) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{vnet.id}.json" in err[0], err
    assert not (tmp / "out").exists()  # refused before anything is written


def test_the_report_regenerates_byte_for_byte(setup):
    tmp, path, exp, runs = setup
    for out in ("a", "b"):
        assert _report(path, tmp / out, runs) == 0
    for name in ("table.md", "table.csv", "ordering.csv", "wilcoxon.csv", "selection.csv", "table.tex"):
        assert (tmp / "a" / name).read_bytes() == (tmp / "b" / name).read_bytes(), name


def test_your_runs_beside_the_committed_ones(setup):
    tmp, path, exp, runs = setup
    mine = tmp / "mine"
    user = Cell("dtc", 8, 1, "val", exp.cells[0].profile, {}, precision="fp32")
    write_run(mine, user, [0.85] * 6, last=[0.84] * 6)
    assert _report(path, tmp / "out", runs, mine) == 0
    df = _table(tmp / "out")
    got = df.set_index(["protocol", "method"])["dice"]
    assert got[("val", "dtc")] == pytest.approx(85.0) and got[("honest", "dtc")] == pytest.approx(84.0)
    assert got[("val", "vnet")] == pytest.approx(70.0)  # the committed ones are still there
    md = (tmp / "out" / "table.md").read_text()
    assert "`" + str(mine) + "`" in md or "mine" in md


def _one_line(capsys, code):
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("ssl-bench: error:"), (code, err)
    return err[0]


def test_a_run_with_other_settings_is_refused_in_one_line(setup, capsys):
    tmp, path, exp, runs = setup
    mine = tmp / "mine"
    user = Cell("dtc", 8, 1, "val", exp.cells[0].profile, {}, precision="fp32")
    write_run(mine, user, [0.85] * 6, last=[0.84] * 6, n_filters=16)
    line = _one_line(capsys, _report(path, tmp / "out", runs, mine))
    assert "not a run of the track experiment" in line and "n_filters" in line
    assert not (tmp / "out" / "table.md").exists()


def test_a_run_at_the_papers_scale_is_refused(setup, capsys):
    tmp, path, exp, runs = setup
    mine = tmp / "mine"
    user = Cell("dtc", 8, 1, "val", exp.cells[0].profile, {}, precision="fp32")
    write_run(mine, user, [0.85] * 6, last=[0.84] * 6, schedule_scale=1.0)
    assert "schedule_scale" in _one_line(capsys, _report(path, tmp / "out", runs, mine))


def test_a_cell_in_two_runs_dirs_and_a_misnamed_folder_are_refused(setup, capsys):
    tmp, path, exp, runs = setup
    mine = tmp / "mine"
    write_run(mine, _cell(exp, "vnet"), [0.5] * 6, last=[0.5] * 6)
    assert "two --runs-dir" in _one_line(capsys, _report(path, tmp / "out", runs, mine))
    other = tmp / "other"
    write_run(other, Cell("dtc", 8, 1, "val", exp.cells[0].profile, {}, precision="fp32"), [0.8] * 6,
              last=[0.8] * 6, name="my-dtc")
    assert "rename the folder" in _one_line(capsys, _report(path, tmp / "out2", runs, other))


def test_the_val_runs_training_curves_are_drawn_per_labeled_count(setup):
    from ssl_bench.track_report import curve_runs
    from ssl_bench.report_rows import collect

    tmp, path, exp, runs = setup
    assert _report(path, tmp / "out", runs) == 0
    assert (tmp / "out" / "curves-L8-val.png").is_file() and (tmp / "out" / "curves-L8-val.pdf").is_file()
    assert "![curves-L8-val.png](curves-L8-val.png)" in (tmp / "out" / "table.md").read_text()
    drawn = curve_runs(collect(exp, runs), [runs])
    assert {k: [p.name for p in v] for k, v in drawn.items()} == {
        "curves-L8-val": [_cell(exp, m).id for m in ("vnet", "uamt", "bcp")]}  # val runs only, in row order


def test_a_reused_stage_1_is_found_beside_the_run_where_the_recorded_folder_is_gone(setup, tmp_path):
    """A campaign's records cloned elsewhere: the teacher folder recorded at training time no longer exists, the
    record of that name beside the run does (the minutes, and the budget, then come out the same on any clone)."""
    from ssl_bench.track_report import teacher_folder

    tmp, path, exp, runs = setup
    beside = runs / "bcp-L8-s1-honest-cpu-fp32"
    config = {"config": {"teacher": str(tmp_path / "gone" / beside.name)}}
    assert teacher_folder(runs / "x", config) == beside  # finished, beside the run
    config = {"config": {"teacher": str(beside)}}
    assert teacher_folder(tmp_path / "elsewhere" / "x", config) == beside  # the recorded folder
    assert teacher_folder(runs / "x", {"config": {"teacher": str(tmp_path / "gone" / "nothing")}}) is None
    assert teacher_folder(runs / "x", {"config": {"teacher": None}}) is None
    (beside / "summary.json").unlink()  # not finished: not a teacher to count
    assert teacher_folder(runs / "x", {"config": {"teacher": str(beside)}}) is None
