"""An imported data set's own settings reach every run: patch and sliding-window strides (cli run, sweep
cells, the report's cell check) and distance units (``--units mm`` from the stored spacing).

Expected millimetre distances come from medpy with ``voxelspacing`` on masks the test builds itself.
"""
import json

import numpy as np
import pytest

from ssl_bench.cli import main
from ssl_bench.data import LAData
from ssl_bench.evaluate import EvalSettings, evaluate_cases
from ssl_bench.experiments import load_experiment, run_name
from ssl_bench.sweep import cell_config, classify
from test_importer import SPACING, make_nnunet

PATCH = (16, 16, 16)
TINY = ("--iterations", 2, "--n-filters", 2, "--eval-cases", 1, "--quiet")


def run_cli(*args):
    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """A synthetic nnU-Net set imported with its own patch (16³) and strides (8/4), 6 train + 2 test cases."""
    tmp = tmp_path_factory.mktemp("ds")
    make_nnunet(tmp / "src", n_train=8)
    out = tmp / "OUT"
    assert run_cli("data", "import", "--format", "nnunet", tmp / "src", out, "--test-fraction", 0.25,
                   "--patch", ",".join(map(str, PATCH)), "--stride-xy", 8, "--stride-z", 4) == 0
    return out


def _config(run):
    return json.loads((run / "config.json").read_text())["config"]


def test_a_paper_profile_run_takes_the_data_sets_patch_and_strides_an_explicit_patch_wins(imported, tmp_path):
    run = tmp_path / "own"
    assert run_cli("run", "--method", "vnet", "--labeled", 4, "--data", imported, "--out", run, *TINY) == 0
    cfg = _config(run)
    assert (cfg["patch"], cfg["eval_stride_xy"], cfg["eval_stride_z"], cfg["units"]) == ([16, 16, 16], 8, 4, "voxel")
    run2 = tmp_path / "explicit"
    assert run_cli("run", "--method", "vnet", "--labeled", 4, "--data", imported, "--out", run2,
                   "--patch", "32,16,16", *TINY) == 0
    assert _config(run2)["patch"] == [32, 16, 16] and _config(run2)["eval_stride_xy"] == 8


def test_la_runs_keep_la_defaults(demo_root):
    from ssl_bench.trainer import build_config

    cfg = build_config("vnet", "paper", dataset_defaults=LAData(demo_root).run_defaults())
    assert (cfg.patch, cfg.eval_stride_xy, cfg.eval_stride_z, cfg.units) == ((112, 112, 80), 18, 4, "voxel")


class Threshold:
    """prob_fn: the image itself as 'probability', so every window agrees and the mask is image > 0.5."""

    training = False

    def eval(self):
        pass

    def train(self, mode=True):
        pass

    def __call__(self, net, x):
        return x[:, 0]


def test_units_mm_give_medpy_distances_with_the_stored_spacing(imported):
    from medpy.metric import binary

    data = LAData(imported)
    ids = data.test_ids
    common = dict(patch=PATCH, stride_xy=8, stride_z=4)
    prob_fn = Threshold()
    vox, _ = evaluate_cases(prob_fn, prob_fn, data, ids, EvalSettings(**common), torch_cpu(), progress=False)
    mm, _ = evaluate_cases(prob_fn, prob_fn, data, ids, EvalSettings(**common, units="mm"), torch_cpu(),
                           progress=False)
    for case in ids:
        image, gt = data.load(case)
        mask = image > 0.5
        assert mask.any() and not np.array_equal(mask, gt)  # a real, imperfect prediction
        row_v = next(r for r in vox if r["case"] == case and r["post"] == "raw")
        row_m = next(r for r in mm if r["case"] == case and r["post"] == "raw")
        assert row_m["hd95"] == pytest.approx(binary.hd95(mask, gt, voxelspacing=SPACING), rel=1e-9)
        assert row_m["asd"] == pytest.approx(binary.asd(mask, gt, voxelspacing=SPACING), rel=1e-9)
        assert row_v["hd95"] == pytest.approx(binary.hd95(mask, gt), rel=1e-9)
        assert row_m["dice"] == row_v["dice"] and row_m["hd95"] != pytest.approx(row_v["hd95"])


def torch_cpu():
    import torch

    return torch.device("cpu")


def test_units_mm_run_records_them_and_la_without_spacing_is_one_line_exit_2(imported, demo_root, tmp_path, capsys):
    run = tmp_path / "mm"
    assert run_cli("run", "--method", "vnet", "--labeled", 4, "--data", imported, "--out", run, "--units", "mm",
                   *TINY) == 0
    assert _config(run)["units"] == "mm" and json.loads((run / "summary.json").read_text())["units"] == "mm"
    capsys.readouterr()
    bad = tmp_path / "la-mm"
    assert run_cli("run", "--method", "vnet", "--profile", "smoke", "--data", demo_root, "--out", bad,
                   "--units", "mm", "--quiet") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--units mm needs voxel spacings" in err[0] and not bad.exists()


EXPERIMENT = """title = "Imported"
profile = "paper"
seeds = [1]
protocols = ["honest"]
[run]
iterations = 2
n_filters = 2
eval_cases = 1
[[grid]]
methods = ["vnet"]
labeled = [4]
"""


def test_sweep_cells_and_the_report_use_the_data_sets_settings(imported, tmp_path):
    from ssl_bench.report import write_report

    (tmp_path / "exp.toml").write_text(EXPERIMENT)
    exp = load_experiment(tmp_path / "exp.toml")
    (cell,) = exp.plan()
    runs = tmp_path / "runs"
    defaults = LAData(imported).run_defaults()
    wanted = cell_config(cell, runs, 0.0, defaults)
    assert (wanted["patch"], wanted["eval_stride_xy"]) == ([16, 16, 16], 8)
    # a run trained as the sweep's trial would: same settings, under the cell's folder name
    out = cell.run_dir(runs)
    assert out.name.startswith(run_name("vnet", 4, 1, "honest"))
    assert run_cli("run", "--method", "vnet", "--labeled", 4, "--seed", 1, "--data", imported, "--out", out,
                   *TINY) == 0
    todo, complete = classify(exp.plan(), runs, 0.0, False, defaults)
    assert (todo, [c.id for c in complete]) == ([], [cell.id])
    with pytest.raises(Exception, match="patch"):  # LA's defaults would make it another cell
        classify(exp.plan(), runs, 0.0, False, {})
    written = write_report(tmp_path / "exp.toml", runs, tmp_path / "report", echo=lambda *_: None)
    table = written["table.md"].read_text()
    rows = [line for line in table.splitlines() if line.startswith("| V-Net")]
    assert len(rows) == 2  # the main table and the LCC table, each with the run as its cell's, and its precision
    assert all(r.startswith("| V-Net | 4 |") and "| tf32 |" in r and "missing" not in r for r in rows)


def test_the_report_labels_millimetres_and_refuses_mixed_units(imported, tmp_path):
    from types import SimpleNamespace

    from ssl_bench.errors import UserError
    from ssl_bench.report import distance_units, write_report

    (tmp_path / "mm.toml").write_text(EXPERIMENT.replace("eval_cases = 1\n", 'eval_cases = 1\nunits = "mm"\n'))
    (cell,) = load_experiment(tmp_path / "mm.toml").plan()
    runs = tmp_path / "runs"
    assert run_cli("run", "--method", "vnet", "--labeled", 4, "--seed", 1, "--data", imported,
                   "--out", cell.run_dir(runs), "--units", "mm", *TINY) == 0
    written = write_report(tmp_path / "mm.toml", runs, tmp_path / "report", echo=lambda *_: None)
    table = written["table.md"].read_text()
    assert "95HD (mm)" in table and "ASD (mm)" in table and "(vox)" not in table and "in millimetres" in table
    assert set(__import__("pandas").read_csv(written["table.csv"])["distance_units"]) == {"mm"}

    def row(*units):
        return SimpleNamespace(runs=[SimpleNamespace(summary={"units": u} if u else {}) for u in units])

    assert distance_units([row(None, "voxel")]) == "voxel"  # folders from before units were recorded: voxels
    with pytest.raises(UserError, match="different units"):
        distance_units([row("voxel"), row("mm")])
