"""`ssl-bench report` on hand-made run folders with known numbers (tests/fixtures/report).

Fixture runs (4 test cases each; per-case Dice in metrics_per_case.csv, means in summary.json):
  vnet  s1, s2 honest  raw Dice .75/.77, Jaccard .62/.64, 95HD 12/14, ASD 3.0/3.5; own post raw; 11 + 10 GPU min
  uamt  s1 honest      raw Dice .85 (s2 missing); LCC has one empty case; CPU, 13 min
  omf   s1, s2 honest  LCC Dice .875/.885, Jaccard .78/.79, 95HD 6/5, ASD 1.6/1.8; own post LCC; 41 + 41 GPU min
  omf   s1 literature  LCC Dice .90 at its selected iteration 4600, .88 at its last weights (s2 missing)
  dtc   nothing (missing)
"""
import csv
import json
import math
import shutil
from pathlib import Path

import pandas as pd
import pytest

from ssl_bench.cli import main
from ssl_bench.errors import UserError
from ssl_bench.experiments import PLANNED_METHODS, Cell, load_experiment
from ssl_bench.report import collect, reproduction_markdown, write_report
from ssl_bench.report_rows import run_minutes
from ssl_bench.track_report import teacher_folder

FIX = Path(__file__).parent / "fixtures" / "report"
RUNS = FIX / "runs"
H100 = "NVIDIA H100 80GB HBM3"


def md_section_rows(md: str, heading: str, first_col_header: str = "Method") -> list[list[str]]:
    """Body rows of the first Markdown table after ``heading``."""
    lines = md[md.index(heading):].splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith(f"| {first_col_header} |"))
    rows = []
    for ln in lines[start + 2:]:
        if not ln.startswith("|"):
            break
        rows.append([c.strip() for c in ln.strip().strip("|").split(" | ")])
    return rows


@pytest.fixture(scope="module")
def fixture_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "out"
    rc = main(["report", str(FIX / "experiment.toml"), "--runs-dir", str(RUNS), "--out", str(out)])
    assert rc == 0
    return out


def test_main_table_cells(fixture_report):
    md = (fixture_report / "table.md").read_text()
    honest = md_section_rows(md, "## Protocol: honest")
    assert honest == [
        ["V-Net", "8", "0", "honest", "tf32", "no", "2", "76.00 ± 1.41", "63.00 ± 1.41", "13.00 ± 1.41", "3.25 ± 0.35",
         "82.74 / 71.72 / 13.35 / 3.26", "-6.74 / -8.72 / -0.35 / -0.01", "–", "0/8", f"21.0 ({H100})"],
        ["UA-MT", "8", "72", "honest", "tf32", "no", "1/2 (partial)", "85.00", "75.00", "9.00", "2.25",
         "87.79 / 78.39 / 8.68 / 2.12", "-2.79 / -3.39 / +0.32 / +0.13", "–", "0/4", "13.0 (cpu)"],
        ["OMF", "8", "72", "honest", "tf32", "yes", "2", "88.00 ± 0.71", "78.50 ± 0.71", "5.50 ± 0.71", "1.70 ± 0.14",
         "90.23 / 82.34 / 5.95 / 1.63", "-2.23 / -3.84 / -0.45 / +0.07", "90.23 / 82.34 / 5.95 / 1.63", "0/8",
         f"82.0 ({H100})"],
        ["DTC", "8", "72", "honest", "tf32", "–", "0/2 (missing)", "missing", "–", "–", "–",
         "87.51 / 78.17 / 8.23 / 2.36", "–", "86.57 / 76.55 / 14.47 / 3.74", "–", "–"],
    ]
    lit = md_section_rows(md, "## Protocol: literature")
    # V-Net, UA-MT and DTC evaluate the last checkpoint in their references: their honest runs, labelled
    assert [r[3] for r in lit] == ["literature (= honest)", "literature (= honest)", "literature", "literature (= honest)"]
    assert [r[4] for r in lit] == ["tf32"] * 4  # the precision column (Decision 7) in every row
    assert lit[0][7] == "76.00 ± 1.41" and lit[1][6] == "1/2 (partial)"
    assert lit[2][6:9] == ["1/2 (partial)", "90.00", "82.00"] and lit[2][12] == "-0.23 / -0.34 / -0.45 / -0.23"
    assert lit[3][7] == "missing"
    # the literature run also evaluated its last weights (summary "last"): selection effect within the same run
    assert md_section_rows(md, "The same literature runs") == [["OMF", "8", "tf32", "1", "4600", "90.00", "88.00", "+2.00"]]
    both = md_section_rows(md, "Without and with largest-connected-component post-processing (honest)")
    assert both[1] == ["UA-MT", "8", "tf32", "85.00", "66.75", "9.00", "30.00", "0/4", "1/4"]
    assert both[2][:5] == ["OMF", "8", "tf32", "86.00 ± 0.71", "88.00 ± 0.71"]


def test_csv_and_latex(fixture_report):
    df = pd.read_csv(fixture_report / "table.csv")
    vnet = df[(df.protocol == "honest") & (df.method == "vnet") & (df.post == "raw")].iloc[0]
    assert vnet.dice_mean == pytest.approx(76.0) and vnet.dice_std == pytest.approx(math.sqrt(2))
    assert vnet.asd_std == pytest.approx(math.sqrt(0.125)) and vnet.diff_dice == pytest.approx(76.0 - 82.74)
    assert vnet.minutes_total == pytest.approx(21.0) and vnet.n_empty == 0 and vnet.n_cases == 8
    assert bool(vnet.own_post) and vnet.status == "complete" and vnet.seeds == "1 2"
    omf_lcc = df[(df.protocol == "literature") & (df.method == "omf") & (df.post == "lcc")].iloc[0]
    assert omf_lcc.status == "partial" and omf_lcc.n_seeds == 1 and omf_lcc.n_planned == 2
    assert math.isnan(omf_lcc.dice_std) and omf_lcc.dice_mean == pytest.approx(90.0)
    assert omf_lcc.last_dice_mean == pytest.approx(88.0) and math.isnan(vnet.last_dice_mean)
    dtc = df[(df.protocol == "honest") & (df.method == "dtc")]
    assert list(dtc.status) == ["missing", "missing"] and dtc.dice_mean.isna().all()
    assert dtc.own_dice.iloc[0] == pytest.approx(86.57) and dtc.paper_dice.iloc[0] == pytest.approx(87.51)
    uamt_lit = df[(df.protocol == "literature") & (df.method == "uamt")].iloc[0]
    assert uamt_lit.runs_protocol == "honest"
    tex = (fixture_report / "table.tex").read_text()
    assert r"V-Net & 8 & 0 & honest & tf32 & no & 2 & 76.00 $\pm$ 1.41 & 63.00 $\pm$ 1.41" in tex
    assert r"Protocol & Precision & LCC" in tex
    # one table per protocol, and the selection table (the literature OMF run selected on the test set)
    assert r"Dice (\%)" in tex and tex.count(r"\begin{tabular}") == 3


def test_wilcoxon(fixture_report):
    rows = list(csv.DictReader((fixture_report / "wilcoxon.csv").open()))
    by = {(r["protocol"], r["method"], r["post"]): r for r in rows}
    # OMF (LCC, seed mean .91 .86 .94 .81) vs V-Net (raw, .82 .72 .88 .62): four positive differences
    r = by[("honest", "vnet", "own")]
    assert (r["reference_post"], r["method_post"], r["n_cases"]) == ("lcc", "raw", "4")
    assert float(r["statistic"]) == 0.0 and float(r["p_value"]) == pytest.approx(0.125)
    assert float(r["median_diff"]) == pytest.approx(0.115)
    # vs UA-MT (raw .88 .80 .96 .76): differences .03 .06 -.02 .05 -> W- = rank 1; exact two-sided p = 4/16
    r = by[("honest", "uamt", "own")]
    assert float(r["statistic"]) == 1.0 and float(r["p_value"]) == pytest.approx(0.25)
    assert {(r["protocol"], r["method"]) for r in rows} == {("honest", "vnet"), ("honest", "uamt"),
                                                            ("literature", "vnet"), ("literature", "uamt")}
    md = (fixture_report / "table.md").read_text()
    assert md_section_rows(md, "## Paired Wilcoxon", "Protocol")[0] == \
        ["honest", "8", "V-Net", "4", "88.00", "76.00", "+11.50", "0.00", "0.125"]


def test_plots_are_written(fixture_report):
    for stem in ("dice_per_case_honest", "dice_per_case_literature"):
        assert (fixture_report / f"{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (fixture_report / f"{stem}.pdf").read_bytes()[:5] == b"%PDF-"
    assert not list(fixture_report.glob("ablation_*")) and not list(fixture_report.glob("fig3*"))
    # no temporary files left behind; .lock is the output folder's one-writer lock
    assert [p.name for p in fixture_report.glob(".*")] == [".lock"]


def test_rerun_gives_the_same_tables(fixture_report):
    before = {n: (fixture_report / n).read_text() for n in ("table.md", "table.csv", "table.tex", "wilcoxon.csv")}
    write_report(FIX / "experiment.toml", RUNS, fixture_report, echo=lambda *_: None)
    assert {n: (fixture_report / n).read_text() for n in before} == before


def test_ablation_uses_table2_and_draws_bars(tmp_path):
    write_report(FIX / "ablation.toml", RUNS, tmp_path, echo=lambda *_: None)
    rows = md_section_rows((tmp_path / "table.md").read_text(), "## Protocol: honest")
    assert [r[0] for r in rows] == ["V-Net", "S1", "S1+orgloss+S2 (OMF)"]
    assert rows[1][6:8] == ["0/2 (missing)", "missing"] and rows[1][11] == "87.09 / 77.48 / 11.47 / 2.64"
    assert rows[1][2] == "0"  # S1 trains on labeled data only
    for ext in ("png", "pdf"):
        assert (tmp_path / f"ablation_honest.{ext}").stat().st_size > 0


def test_fig3_from_occlusion_csv(tmp_path):
    write_report(FIX / "fig3.toml", RUNS, tmp_path, occlusion=FIX / "occlusion", echo=lambda *_: None)
    md = (tmp_path / "table.md").read_text()
    # per repeat: case mean, averaged over seeds; then mean ± sd over repeats. Ratio 0 has one repeat.
    assert md_section_rows(md, "## Occlusion") == [["V-Net", "8", "honest", "2", "70.00", "45.00 ± 7.07"],
                                                   ["OMF", "8", "honest", "1", "85.00", "70.00 ± 7.07"]]
    summary = pd.read_csv(tmp_path / "occlusion.csv")
    assert list(summary.method) == ["vnet", "vnet", "omf", "omf"]
    assert summary.dice_mean.tolist() == pytest.approx([0.70, 0.45, 0.85, 0.70])
    assert summary.n_repeats.tolist() == [1, 2, 1, 2]
    assert (tmp_path / "fig3.png").stat().st_size > 0 and (tmp_path / "fig3.pdf").stat().st_size > 0


def test_fig3_without_occlusion_results(tmp_path):
    write_report(FIX / "fig3.toml", RUNS, tmp_path, echo=lambda *_: None)
    assert "No occlusion results" in (tmp_path / "table.md").read_text()
    assert not (tmp_path / "fig3.png").exists()


def test_reproduction_markdown(tmp_path):
    exp = load_experiment(FIX / "experiment.toml", methods=PLANNED_METHODS)
    text = reproduction_markdown([(exp, collect(exp, RUNS))])
    lines = [ln for ln in text.splitlines() if ln.startswith("| ")]
    assert "| OMF | 8 | 90.23 / 82.34 / 5.95 / 1.63 | honest | 2/2 | yes | 88.00 / 78.50 / 5.50 / 1.70 | -2.23 |" in lines
    assert "| OMF | 8 | 90.23 / 82.34 / 5.95 / 1.63 | literature | 1/2 | yes | 90.00 / 82.00 / 5.50 / 1.40 | -0.23 |" in lines
    assert "| DTC | 8 | 87.51 / 78.17 / 8.23 / 2.36 | honest | 0/2 | – | missing | – |" in lines
    # a report of an experiment named table1 writes REPRODUCTION.md inside its output folder, never beside it
    shutil.copy(FIX / "experiment.toml", tmp_path / "table1.toml")
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "REPRODUCTION.md").write_text("mine")
    written = write_report(tmp_path / "table1.toml", RUNS, tmp_path / "results" / "table1", echo=lambda *_: None)
    repro = (tmp_path / "results" / "table1" / "REPRODUCTION.md").read_text()
    assert written["REPRODUCTION.md"] == tmp_path / "results" / "table1" / "REPRODUCTION.md"
    assert (tmp_path / "results" / "REPRODUCTION.md").read_text() == "mine"
    assert "| OMF | 8 | 90.23 / 82.34 / 5.95 / 1.63 | honest | 2/2 | yes |" in repro
    assert "Table 2 (OMF, MICCAI 2024)" in repro  # the shipped table2 file, its cells missing in these runs


def test_minutes_include_a_reused_stage1(tmp_path):
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "summary.json").write_text(json.dumps({"metrics": {}, "timings": {"stage1": {"train_s": 120.0}}}))
    summary = {"timings": {"stage2": {"train_s": 60.0}, "eval": {"inference_s": 30.0, "metrics_s": 30.0}}}
    found = teacher_folder(tmp_path / "student", {"config": {"teacher": str(teacher)}})
    assert found == teacher
    assert run_minutes(summary, (found.name, {"stage1": {"train_s": 120.0}})) == pytest.approx(4.0)
    assert run_minutes(summary) == pytest.approx(2.0)
    own = {"timings": {**summary["timings"], "stage1": {"train_s": 6.0}}}  # trained its own stage 1: no teacher time
    assert run_minutes(own, (found.name, {"stage1": {"train_s": 120.0}})) == pytest.approx(2.1)


def test_missing_runs_folder_shows_everything_missing(tmp_path):
    exp = load_experiment(FIX / "experiment.toml", methods=PLANNED_METHODS)
    rows = collect(exp, tmp_path / "nothing")
    assert rows and all(not r.runs for r in rows)
    assert Cell("vnet", 8, 1, "honest").run_dir(RUNS) == RUNS / "vnet-L8-s1-honest"


def test_a_folder_that_is_not_its_cell_is_refused(tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(RUNS / "omf-L8-s1-honest", runs / "omf-L8-s2-honest")  # seed 1's run under seed 2's name
    exp = load_experiment(FIX / "experiment.toml", methods=PLANNED_METHODS)
    with pytest.raises(UserError, match="omf-L8-s2-honest: its summary.json has seed 1"):
        collect(exp, runs)


# -- Fig. 3: one table for `ssl-bench report` and `ssl-bench occlusion` (issue 22) ----------------------------------

def _occlusion_rows() -> pd.DataFrame:
    """Two seeds × two repeats × two cases at ratio 0.5 (and ratio 0 once) for vnet; omf one seed; own post only."""
    dice = {(1, 0): [0.50, 0.70], (1, 1): [0.40, 0.40], (2, 0): [0.60, 0.60], (2, 1): [0.20, 0.40]}
    recs = []
    for (seed, rep), values in dice.items():
        for case, d in zip(("A", "B"), values):
            recs.append({"method": "vnet", "labeled": 8, "seed": seed, "protocol": "honest", "precision": "tf32",
                         "ratio": 0.5, "repeat": rep, "case": case, "dice": d})
    for seed in (1, 2):
        for case in ("A", "B"):
            recs.append({"method": "vnet", "labeled": 8, "seed": seed, "protocol": "honest", "precision": "tf32",
                         "ratio": 0.0, "repeat": 0, "case": case, "dice": 0.9 if seed == 1 else 0.7})
    for rep, d in ((0, 0.3), (1, 0.5)):
        recs.append({"method": "omf", "labeled": 8, "seed": 1, "protocol": "honest", "precision": "tf32",
                     "ratio": 0.5, "repeat": rep, "case": "A", "dice": d})
    return pd.DataFrame.from_records(recs)


def test_fig3_table_is_the_sample_std_over_repeats_of_the_seed_averaged_case_means():
    from ssl_bench.report_rows import fig3_table

    table = fig3_table(_occlusion_rows(), ["omf", "vnet"])
    assert list(table.method) == ["omf", "vnet", "vnet"] and list(table.ratio) == [0.5, 0.0, 0.5]
    vnet = table[(table.method == "vnet") & (table.ratio == 0.5)].iloc[0]
    # case means: s1 r0 .6, s1 r1 .4, s2 r0 .6, s2 r1 .3 -> per repeat over seeds .6, .35
    assert vnet.dice_mean == pytest.approx(0.475, abs=1e-12)
    assert vnet.dice_std == pytest.approx(math.sqrt(((0.6 - 0.475) ** 2 + (0.35 - 0.475) ** 2) / 1), abs=1e-12)
    assert (vnet.n_repeats, vnet.n_seeds) == (2, 2)
    zero = table[(table.method == "vnet") & (table.ratio == 0.0)].iloc[0]
    assert zero.dice_mean == pytest.approx(0.8) and math.isnan(zero.dice_std) and zero.n_repeats == 1
    omf = table[table.method == "omf"].iloc[0]
    assert omf.dice_std == pytest.approx(math.sqrt(0.02), abs=1e-12) and omf.n_seeds == 1
    # without an order: methods as they first appear
    assert list(fig3_table(_occlusion_rows()).method) == ["vnet", "vnet", "omf"]


def test_occlusion_command_and_report_draw_the_same_fig3_table(tmp_path):
    """`ssl-bench occlusion`'s fig3 (occlusion_plots.plot_fig3, from its per-case CSV) and the report's occlusion.csv
    are one table: the same numbers for the same rows."""
    from ssl_bench.occlusion_plots import plot_fig3
    from ssl_bench.report_rows import fig3_table

    rows = _occlusion_rows()
    tidy = pd.concat([rows.assign(post="raw", paper_post=True), rows.assign(post="lcc", paper_post=False, dice=0.0)])
    tidy = tidy.assign(variant="volume", run=[f"{m}-s{s}" for m, s in zip(tidy.method, tidy.seed)])
    tidy.to_csv(tmp_path / "occlusion_per_case.csv", index=False)
    drawn = plot_fig3(tmp_path / "occlusion_per_case.csv", tmp_path / "fig3")
    pd.testing.assert_frame_equal(drawn, fig3_table(rows))
    assert (tmp_path / "fig3.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("variant", ["volume", "code"])
def test_fig3_axis_names_its_variant(variant):
    from ssl_bench.occlusion_plots import X_LABEL, fig3_figure
    from ssl_bench.report_rows import fig3_table

    fig = fig3_figure(fig3_table(_occlusion_rows()), variant, paper="table1")
    assert fig.axes[0].get_xlabel() == X_LABEL[variant]
    assert X_LABEL["code"] != X_LABEL["volume"]
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["V-Net", "OMF"]
    with pytest.raises(UserError, match="unknown occlusion variant 'A'"):
        fig3_figure(fig3_table(_occlusion_rows()), "A")


# -- faults (issue 23): one line, exit 2, nothing written outside --out --------------------------------------------

def _tree(root: Path, skip: Path | None = None) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and (skip is None or skip not in p.parents)}


def _refused(capsys, tmp_path, *args, out=None) -> str:
    """Runs `ssl-bench report ARGS`; asserts exit 2, one line on stderr, no traceback, and no file outside ``out``
    (below tmp_path) created, changed or deleted. Returns the line."""
    before = _tree(tmp_path, out)
    capsys.readouterr()
    rc = main(["report", *map(str, args)] + (["--out", str(out)] if out is not None else []))
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("ssl-bench: error:"), (rc, err)
    assert "Traceback" not in err
    assert _tree(tmp_path, out) == before
    return lines[0]


@pytest.fixture
def runs_copy(tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(RUNS, runs)
    return runs


def test_a_second_report_on_the_same_output_is_refused(tmp_path, runs_copy, capsys):
    from ssl_bench.runs import lock_folder

    out = tmp_path / "out"
    assert main(["report", str(FIX / "experiment.toml"), "--runs-dir", str(runs_copy), "--out", str(out)]) == 0
    with lock_folder(out):  # another report holds the folder
        before = _tree(out)
        line = _refused(capsys, tmp_path, FIX / "experiment.toml", "--runs-dir", runs_copy, out=out)
        assert _tree(out) == before  # nothing of the second report interleaved
    assert "being written by another" in line


def test_an_experiment_name_that_is_not_plain_is_refused(tmp_path, runs_copy, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("...toml", "..toml", "a b.toml"):
        (tmp_path / name).write_text((FIX / "experiment.toml").read_text())
        line = _refused(capsys, tmp_path, tmp_path / name, "--runs-dir", runs_copy)
        assert "not a plain name" in line
        (tmp_path / name).unlink()
    assert not (tmp_path / "results").exists() and not (tmp_path / "table.md").exists()


def test_a_report_without_any_finished_cell_points_to_the_sweep(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    line = _refused(capsys, tmp_path, FIX / "experiment.toml", "--runs-dir", tmp_path / "empty", out=out)
    assert "no finished run" in line and "ssl-bench sweep experiment" in line
    assert not out.exists()


def test_partial_results_are_marked(fixture_report):
    md = (fixture_report / "table.md").read_text()
    assert "**Partial results:** 3 of 8 rows are complete, 3 partial" in md and "2 missing" in md
    assert "`ssl-bench sweep experiment` runs the rest" in md
    from ssl_bench.report import partial_note

    exp = load_experiment(FIX / "experiment.toml", methods=PLANNED_METHODS)
    rows = collect(exp, RUNS)
    assert partial_note([r for r in rows if len(r.runs) == len(r.planned)], "x") == ""  # all complete: no note
    assert "3 of 6 rows are complete, 3 partial" in partial_note([r for r in rows if r.runs], "x")


@pytest.mark.parametrize("damage", ["no paper_post", "no dice", "dice a string", "no checkpoint", "timings a list"])
def test_a_summary_missing_a_key_is_one_line_naming_it(tmp_path, runs_copy, capsys, damage):
    path = runs_copy / "vnet-L8-s1-honest" / "summary.json"
    summary = json.loads(path.read_text())
    if damage == "no paper_post":
        del summary["paper_post"]
    elif damage == "no dice":
        del summary["metrics"]["raw"]["dice"]
    elif damage == "dice a string":
        summary["metrics"]["lcc"]["dice"] = "0.5"
    elif damage == "no checkpoint":
        del summary["checkpoint"]
    else:
        summary["timings"] = {"stage1": [1]}
    path.write_text(json.dumps(summary))
    out = tmp_path / "out"
    line = _refused(capsys, tmp_path, FIX / "experiment.toml", "--runs-dir", runs_copy, out=out)
    assert str(path) in line and "is damaged" in line
    assert not out.exists()


@pytest.mark.parametrize("damage", ["no dice column", "text in dice", "binary", "empty"])
def test_a_broken_metrics_csv_is_one_line_naming_it(tmp_path, runs_copy, capsys, damage):
    path = runs_copy / "omf-L8-s1-honest" / "metrics_per_case.csv"
    text = path.read_text()
    if damage == "no dice column":
        path.write_text(text.replace(",dice,", ",dise,", 1))
    elif damage == "text in dice":
        lines = text.splitlines()
        head = lines[0].split(",")
        cells = lines[1].split(",")
        cells[head.index("dice")] = "abc"
        path.write_text("\n".join([lines[0], ",".join(cells)] + lines[2:]) + "\n")
    elif damage == "binary":
        path.write_bytes(b"\x00\xff\xfe" * 50)
    else:
        path.write_text("")
    out = tmp_path / "out"
    line = _refused(capsys, tmp_path, FIX / "experiment.toml", "--runs-dir", runs_copy, out=out)
    assert str(path) in line and "is damaged" in line


@pytest.mark.parametrize("damage, words", [
    ("cut short", "a row with a missing value"),
    ("a row dropped", "rows, the summary counts"),
    ("a value edited", "its mean lcc dice is"),
])
def test_a_metrics_csv_that_disagrees_with_its_summary_is_one_line(tmp_path, runs_copy, capsys, damage, words):
    """Issue 23: the per-case CSV is checked against the summary.json it was written with (row count and means per
    post-processing), so a CSV cut short, losing a row or edited by hand never reaches the box plots and the tests."""
    path = runs_copy / "omf-L8-s1-honest" / "metrics_per_case.csv"
    lines = path.read_text().splitlines()
    if damage == "cut short":
        text = "\n".join(lines) + "\n"
        path.write_text(text[: text.rindex(",")])  # the last row loses its last column
    elif damage == "a row dropped":
        path.write_text("\n".join(lines[:-1]) + "\n")
    else:
        head = lines[0].split(",")
        row = next(i for i, ln in enumerate(lines) if ln.split(",")[head.index("post")] == "lcc")
        cells = lines[row].split(",")
        cells[head.index("dice")] = repr(float(cells[head.index("dice")]) + 0.01)
        lines[row] = ",".join(cells)
        path.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    line = _refused(capsys, tmp_path, FIX / "experiment.toml", "--runs-dir", runs_copy, out=out)
    assert str(path) in line and words in line, line
    assert not out.exists()


def test_every_csv_has_its_header_when_nothing_is_paired(tmp_path, runs_copy):
    # the reference method (omf) has no finished run: nothing to pair
    for d in runs_copy.glob("omf-*"):
        shutil.rmtree(d)
    out = tmp_path / "out"
    assert main(["report", str(FIX / "experiment.toml"), "--runs-dir", str(runs_copy), "--out", str(out)]) == 0
    for name in ("wilcoxon.csv", "selection.csv", "table.csv"):
        header = (out / name).read_text().splitlines()[0]
        assert header.count(",") >= 5, (name, header)
    assert (out / "wilcoxon.csv").read_text().splitlines()[0].startswith("protocol,precision,labeled,reference,")
    assert len((out / "wilcoxon.csv").read_text().splitlines()) == 1
    from ssl_bench.report_rows import ordering_frame, wilcoxon_tests

    empty = ordering_frame([], pd.DataFrame(), "table1")  # ordering.csv with no method of the paper's table
    assert empty.to_csv(index=False).startswith("protocol,precision,labeled,method,") and "paper_rank" in empty
    assert wilcoxon_tests([], None).to_csv(index=False).startswith("protocol,precision,labeled,reference,")
