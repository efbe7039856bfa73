"""Occlusion robustness (docs/methods.md §3.7.8, Decisions 5): boxes, seeding, ratio 0 = clean, outputs, bad input."""
import csv
import hashlib
import json
import math
import shutil

import numpy as np
import pytest

import ssl_bench.evaluate as evaluate_mod
from ssl_bench.cli import main
from ssl_bench.data import LAData
from ssl_bench.errors import UserError
from ssl_bench.occlusion import (Box, apply_box, box_from_row, code_box, make_box, parse_ratios, volume_box,
                                 box_rng)
from ssl_bench.occlusion_plots import plot_fig3

SIDE_03 = 0.3 ** (1 / 3)  # variant B side factor at p = 0.3
N_CASES = 1  # test cases per smoke run: each evaluated case costs seconds of CPU (inference + surface metrics)


def run_cli(*args):
    return main([str(a) for a in args])


def rows_of(path):
    return list(csv.DictReader(open(path)))


def digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


# ------------------------------------------------------------------ pure functions (no data)

@pytest.mark.parametrize("text, step, expected", [
    ("0.1..0.5", 0.1, [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]),
    ("0.1..0.5", 0.2, [0.0, 0.1, 0.3, 0.5]),
    ("0.1..0.4", 0.25, [0.0, 0.1, 0.35]),
    ("0.2..0.2", 0.1, [0.0, 0.2]),
    ("0.3,0.05,0.3", 0.1, [0.0, 0.05, 0.3]),
    ("0", 0.1, [0.0]),
    (" 0..0.2 ", 0.1, [0.0, 0.1, 0.2]),
])
def test_parse_ratios(text, step, expected):
    assert parse_ratios(text, step) == expected


@pytest.mark.parametrize("text, step", [("0.5..0.1", 0.1), ("1.0", 0.1), ("-0.1", 0.1), ("0.2,1.5", 0.1),
                                        ("abc", 0.1), ("0.1..", 0.1), ("0.1..0.5", 0.0), ("0.1..0.5", -0.1),
                                        ("0..0.9", 1e-6), ("nan", 0.1)])
def test_parse_ratios_rejects(text, step):
    with pytest.raises(UserError):
        parse_ratios(text, step)


def test_volume_box_sides_and_bounds():
    shape = (175, 132, 88)
    # sides round(dim · 0.3^(1/3)): 117.08 → 117, 88.29 → 88, 58.87 → 59
    origins = []
    for repeat in range(200):
        box = volume_box(shape, 0.3, box_rng(0, "volume", 0.3, repeat, "CASE"))
        assert box.size == (117, 88, 59)
        origins.append(box.origin)
    origins = np.array(origins)
    # uniform over {0..dim − s} inclusive: 0..58, 0..44, 0..29 (200 fixed draws reach both ends)
    assert origins.min(axis=0).tolist() == [0, 0, 0]
    assert origins.max(axis=0).tolist() == [58, 44, 29]
    assert abs(box.fraction(shape) - 117 * 88 * 59 / (175 * 132 * 88)) < 1e-12


def test_code_box_uses_training_patch_bounds_and_skips():
    shape, patch = (180, 140, 88), (112, 112, 80)
    origins = []
    for repeat in range(200):
        box, reason = code_box(shape, 0.5, patch, box_rng(0, "code", 0.5, repeat, "CASE"))
        assert reason == "" and box.size == (90, 70, 44)  # ⌊dim · r⌋
        origins.append(box.origin)
    origins = np.array(origins)
    # OMF patch_mask: x ∈ {0..111−90}, y ∈ {0..111−70}, z ∈ {0..79−44}
    assert origins.min(axis=0).tolist() == [0, 0, 0]
    assert origins.max(axis=0).tolist() == [21, 41, 35]
    box, reason = code_box(shape, 0.75, patch, box_rng(0, "code", 0.75, 0, "CASE"))  # ⌊180·0.75⌋ = 135 ≥ 112
    assert box is None and reason == "side x 135 >= training patch 112"
    # the side is int(dim * r) in floating point, as in the reference: 180 * 0.7 = 125.99999999999999 → 125
    assert code_box(shape, 0.7, patch, box_rng(0, "code", 0.7, 0, "CASE"))[1] == "side x 125 >= training patch 112"
    box, reason = code_box((120, 100, 88), 0.95, patch, box_rng(0, "code", 0.95, 0, "CASE"))  # x 114, y 95, z 83
    assert box is None and reason.startswith("side x 11")


def test_boxes_depend_only_on_seed_variant_ratio_repeat_case():
    shape, patch = (175, 132, 88), (48, 48, 32)
    a = make_box("volume", shape, 0.3, 1, "CASE_A", 7, patch)
    assert make_box("volume", shape, 0.3, 1, "CASE_A", 7, (112, 112, 80)) == a  # the patch plays no part in B
    assert make_box("volume", shape, 0.3, 1, "CASE_A", 7, patch) == a
    others = [make_box("volume", shape, 0.3, 2, "CASE_A", 7, patch), make_box("volume", shape, 0.3, 1, "CASE_B", 7, patch),
              make_box("volume", shape, 0.3, 1, "CASE_A", 8, patch)]
    assert all(o[0].origin != a[0].origin for o in others)
    assert make_box("volume", shape, 0.0, 3, "CASE_A", 7, patch) == (None, "")  # ratio 0: no box, no draw
    assert make_box("code", shape, 0.0, 3, "CASE_A", 7, patch) == (None, "")


def test_apply_box_fills_zero_and_copies():
    image = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6) + 1
    out = apply_box(image, Box((1, 2, 3), (2, 2, 2)))
    assert (image > 0).all()  # the (cached) input is untouched
    assert np.count_nonzero(out == 0) == 8 and (out[1:3, 2:4, 3:5] == 0).all()
    assert apply_box(image, None) is image


@pytest.mark.parametrize("ratios, extra, fragment", [
    ("0.5..0.1", [], "reversed"), ("1.0", [], "[0, 1)"), ("-0.2", [], "[0, 1)"), ("0.1..0.5", ["--step", "0"], "--step"),
    ("0.1..0.5", ["--step", "-0.1"], "--step"), ("x", [], "not a number"),
])
def test_bad_ratio_input_is_one_line_exit_2(tmp_path, capsys, ratios, extra, fragment):
    rc = run_cli("occlusion", "--ratios", ratios, *extra, tmp_path / "nothing", "--out", tmp_path / "o")
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith("ssl-bench: error:") and fragment in err
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------ end to end on real data (smoke runs)

@pytest.fixture(scope="module")
def runs(la_root, tmp_path_factory):
    """Two tiny V-Net runs (seeds 1 and 2) standing for two methods, evaluated on the first N_CASES test cases.

    One iteration keeps them cheap; with these seeds the nets predict non-empty masks (checked below),
    so the ratio-0 comparison is not between two trivially empty predictions.
    """
    base = tmp_path_factory.mktemp("occ_runs")
    out = []
    for seed in (1, 2):
        d = base / f"vnet-s{seed}"
        assert run_cli("run", "--method", "vnet", "--profile", "smoke", "--iterations", 1, "--seed", seed,
                       "--eval-cases", N_CASES, "--data", la_root, "--out", d, "--quiet") == 0
        out.append(d)
    return out


@pytest.fixture(scope="module")
def sweep(runs, la_root, tmp_path_factory):
    """One volume-variant sweep of both runs; a spy records a hash of every image the evaluator receives."""
    out = tmp_path_factory.mktemp("occ_sweep") / "o"
    seen = []
    real = evaluate_mod.evaluate_cases

    def spy(prob_fn, net, data, case_ids, settings, device, image_fn=None, **kw):
        def watched(case_id, image):
            img = image_fn(case_id, image)
            seen.append(((image_fn.ratio, image_fn.repeat, case_id), digest(img)))
            return img
        return real(prob_fn, net, data, case_ids, settings, device, image_fn=watched, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(evaluate_mod, "evaluate_cases", spy)
        assert run_cli("occlusion", *runs, "--ratios", "0.3", "--repeats", 2, "--seed", 5, "--data", la_root,
                       "--out", out, "--device", "cpu", "--quiet") == 0
    return out, seen


def test_outputs_written(sweep, runs):
    out, _ = sweep
    for name in ("occlusion_per_case.csv", "occlusion_summary.csv", "occlusion.json", "boxes.csv", "fig3_data.csv",
                 "panel.npz"):
        assert (out / name).is_file(), name
    assert (out / "fig3.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "panel.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "fig3.pdf").read_bytes()[:5] == b"%PDF-"
    rows = rows_of(out / "occlusion_per_case.csv")
    # 2 runs × (ratio 0 once + ratio 0.3 × 2 repeats) × cases × 2 posts
    assert len(rows) == 2 * 3 * N_CASES * 2
    assert {(r["ratio"], r["repeat"]) for r in rows} == {("0.0", "0"), ("0.3", "0"), ("0.3", "1")}
    assert {r["post"] for r in rows} == {"raw", "lcc"}
    assert {r["paper_post"] for r in rows if r["post"] == "raw"} == {"True"}  # UA-MT's tester: no LCC
    # the unit of hd95/asd is appended: every earlier column keeps its place
    assert list(rows[0]) == ["run", "method", "labeled", "seed", "protocol", "precision", "variant", "ratio", "repeat",
                             "case", "post", "paper_post", "dice", "jaccard", "hd95", "asd", "empty", "units"]
    assert {r["units"] for r in rows} == {"voxel"}
    summary = rows_of(out / "occlusion_summary.csv")
    assert list(summary[0])[-1] == "units" and {r["units"] for r in summary} == {"voxel"}
    assert list(summary[0])[:10] == ["run", "method", "labeled", "seed", "protocol", "precision", "variant", "ratio",
                                     "post", "paper_post"]
    manifest = json.loads((out / "occlusion.json").read_text())
    assert manifest["units"] == "voxel" and {r["units"] for r in manifest["runs"]} == {"voxel"}
    assert manifest["variant"] == "volume" and manifest["ratios"] == [0.0, 0.3] and manifest["skipped"] == []
    assert [r["seed"] for r in manifest["runs"]] == [1, 2]
    assert all(r["ratio0_vs_clean"]["identical"] for r in manifest["runs"])
    assert manifest["status"] == "complete"


def test_panel_shows_the_occluded_slice(sweep, la_root):
    out, _ = sweep
    manifest = json.loads((out / "occlusion.json").read_text())
    p = np.load(out / "panel.npz")
    # both runs are vnet: one subplot, the first run given
    assert list(p["labels"]) == ["vnet (seed 1, raw)"] and p["preds"].shape[0] == 1
    assert manifest["panel"]["ratio"] == 0.3 and manifest["panel"]["repeat"] == 0
    [row] = [b for b in rows_of(out / "boxes.csv") if b["ratio"] == "0.3" and b["repeat"] == "0"
             and b["case"] == manifest["panel"]["case"]]
    image, gt = LAData(la_root).load(row["case"])
    z = manifest["panel"]["z"]
    assert int(row["z0"]) <= z < int(row["z0"]) + int(row["sz"])  # a slice through the box
    assert np.array_equal(p["image"], apply_box(image, box_from_row(row))[:, :, z])
    assert np.array_equal(p["gt"], gt[:, :, z]) and p["preds"][0].shape == gt[:, :, z].shape


def test_ratio_zero_equals_clean_evaluation_exactly(sweep, runs):
    out, _ = sweep
    rows = rows_of(out / "occlusion_per_case.csv")
    for run in runs:
        clean = rows_of(run / "metrics_per_case.csv")
        mine = [r for r in rows if r["run"] == run.name and r["ratio"] == "0.0"]
        assert len(mine) == len(clean) == 2 * N_CASES
        assert any(c["empty"] == "False" for c in clean), f"{run.name} predicts nothing: the comparison would be trivial"
        for c in clean:
            [m] = [r for r in mine if r["case"] == c["case"] and r["post"] == c["post"]]
            for key in ("dice", "jaccard", "hd95", "asd", "empty"):
                assert m[key] == c[key], (run.name, c["case"], c["post"], key)


def test_identical_masks_across_methods_and_stored_boxes_reproduce_them(sweep, la_root):
    out, seen = sweep
    by_key = {}
    for key, h in seen:
        by_key.setdefault(key, []).append(h)
    assert len(by_key) == 3 * N_CASES and all(len(v) == 2 for v in by_key.values())  # every image seen by both runs
    assert all(v[0] == v[1] for v in by_key.values())  # ... identical for both
    data = LAData(la_root)
    boxes = rows_of(out / "boxes.csv")
    assert len(boxes) == len(by_key)
    for row in boxes:
        image, _ = data.load(row["case"])
        dims = image.shape
        assert (int(row["dim_x"]), int(row["dim_y"]), int(row["dim_z"])) == dims
        box = box_from_row(row)
        key = (float(row["ratio"]), int(row["repeat"]), row["case"])
        assert digest(apply_box(image, box)) == by_key[key][0]  # the stored box rebuilds the occluded image
        if key[0] == 0:
            assert box is None and by_key[key][0] == digest(image)
        else:
            sides = tuple(math.floor(d * SIDE_03 + 0.5) for d in dims)
            assert box.size == sides
            assert all(0 <= o <= d - s for o, d, s in zip(box.origin, dims, sides))
            assert by_key[key][0] != digest(image)
            assert row["occluded_fraction"] == repr(float(np.prod(sides) / np.prod(dims)))


def test_summary_is_mean_and_std_over_repeats_of_case_means(sweep, runs):
    out, _ = sweep
    rows = rows_of(out / "occlusion_per_case.csv")
    summary = rows_of(out / "occlusion_summary.csv")
    for run in runs:
        for post in ("raw", "lcc"):
            per_repeat = [np.mean([float(r["dice"]) for r in rows if r["run"] == run.name and r["post"] == post
                                   and r["ratio"] == "0.3" and r["repeat"] == rep]) for rep in ("0", "1")]
            [s] = [s for s in summary if s["run"] == run.name and s["post"] == post and s["ratio"] == "0.3"]
            assert float(s["dice_mean"]) == pytest.approx((per_repeat[0] + per_repeat[1]) / 2, abs=1e-12)
            assert float(s["dice_std"]) == pytest.approx(np.std(per_repeat, ddof=1), abs=1e-12)  # sample std
            assert s["n_repeats"] == "2" and s["n_cases"] == str(N_CASES)
            [z] = [s for s in summary if s["run"] == run.name and s["post"] == post and s["ratio"] == "0.0"]
            assert z["n_repeats"] == "1" and float(z["dice_std"]) == 0.0


def test_fig3_is_rebuilt_from_the_csv_alone(sweep, tmp_path):
    out, _ = sweep
    csv_path = tmp_path / "copy.csv"
    shutil.copy(out / "occlusion_per_case.csv", csv_path)
    table = plot_fig3(csv_path, tmp_path / "fig")
    assert (tmp_path / "fig.png").stat().st_size > 0 and (tmp_path / "fig.pdf").stat().st_size > 0
    rows = [r for r in rows_of(csv_path) if r["paper_post"] == "True" and r["ratio"] == "0.3"]
    # both runs are vnet (seeds 1 and 2): one line. Per repeat, the case-mean Dice averaged over the seeds; then
    # mean ± sample std (n−1) over the repeats (docs/methods.md §3.7.8; ssl_bench.report_rows.fig3_table)
    per_repeat = [np.mean([np.mean([float(r["dice"]) for r in rows if r["run"] == run and r["repeat"] == rep])
                           for run in sorted({r["run"] for r in rows})]) for rep in ("0", "1")]
    [line] = table[table["ratio"] == 0.3].to_dict("records")
    assert line["method"] == "vnet" and line["n_repeats"] == 2 and line["n_seeds"] == 2
    assert line["dice_mean"] == pytest.approx(np.mean(per_repeat), abs=1e-12)
    assert line["dice_std"] == pytest.approx(np.std(per_repeat, ddof=1), abs=1e-12)
    [drawn] = [r for r in rows_of(out / "fig3_data.csv") if r["ratio"] == "0.3"]  # what `ssl-bench occlusion` wrote
    assert float(drawn["dice_std"]) == pytest.approx(line["dice_std"], abs=1e-12)


def test_second_invocation_on_one_method_sees_the_same_occlusions(sweep, runs, la_root, tmp_path):
    """A later call on one method alone (and with fewer repeats) draws the same boxes and gets the same numbers."""
    out, _ = sweep
    again = tmp_path / "again"
    assert run_cli("occlusion", runs[1], "--ratios", "0.3", "--repeats", 1, "--seed", 5, "--data", la_root,
                   "--out", again, "--device", "cpu", "--no-panel", "--quiet") == 0
    assert not (again / "panel.png").exists()
    assert rows_of(again / "boxes.csv") == [b for b in rows_of(out / "boxes.csv") if b["repeat"] == "0"]
    first = [r for r in rows_of(out / "occlusion_per_case.csv") if r["run"] == runs[1].name and r["repeat"] == "0"]
    assert rows_of(again / "occlusion_per_case.csv") == first
    # an existing, non-empty output folder is never overwritten silently
    before = (again / "boxes.csv").read_text()
    assert run_cli("occlusion", runs[1], "--ratios", "0.2", "--out", again, "--quiet") == 2
    assert (again / "boxes.csv").read_text() == before
    # --overwrite refuses to empty a folder that is not an occlusion output
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("x")
    assert run_cli("occlusion", runs[1], "--out", tmp_path / "mine", "--overwrite", "--quiet") == 2
    assert (tmp_path / "mine" / "keep.txt").read_text() == "x"


def test_code_variant_reports_skips(runs, la_root, tmp_path, capsys):
    out = tmp_path / "code"
    assert run_cli("occlusion", runs[0], "--variant", "code", "--ratios", "0.1,0.5", "--repeats", 1,
                   "--data", la_root, "--out", out, "--device", "cpu", "--no-panel", "--quiet") == 0
    stdout = capsys.readouterr().out
    # smoke patch 48×48×32: at r = 0.5 every side ⌊dim/2⌋ ≥ the patch (z: 44 ≥ 32), so every case is skipped
    assert "skipped" in stdout and f"ratio 0.5: {N_CASES}/{N_CASES} case(s)" in stdout
    manifest = json.loads((out / "occlusion.json").read_text())
    assert {s["ratio"] for s in manifest["skipped"]} == {0.5} and len(manifest["skipped"]) == N_CASES
    boxes = rows_of(out / "boxes.csv")
    assert [b["skipped"] for b in boxes if b["ratio"] == "0.5"] == ["True"] * N_CASES
    for b in (b for b in boxes if b["ratio"] == "0.1"):
        dims = [int(b[k]) for k in ("dim_x", "dim_y", "dim_z")]
        sides = [int(b[k]) for k in ("sx", "sy", "sz")]
        assert sides == [int(d * 0.1) for d in dims]
        assert all(0 <= int(b[o]) <= p - 1 - s for o, p, s in zip(("x0", "y0", "z0"), (48, 48, 32), sides))
    rows = rows_of(out / "occlusion_per_case.csv")
    assert {r["ratio"] for r in rows} == {"0.0", "0.1"}
    assert "0.5" not in {r["ratio"] for r in rows_of(out / "occlusion_summary.csv")}


def test_runs_on_different_test_sets_are_rejected(runs, la_root, tmp_path, capsys):
    other = tmp_path / "fewer"
    shutil.copytree(runs[1], other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["config"]["eval_cases"] = N_CASES + 1
    from ssl_bench.data import LAData

    cfg["split"]["test"] = LAData(la_root).test_ids[:N_CASES + 1]  # a consistent record (else: "split changed")
    (other / "config.json").write_text(json.dumps(cfg))
    rc = run_cli("occlusion", runs[0], other, "--ratios", "0.3", "--data", la_root, "--out", tmp_path / "o", "--quiet")
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "different test sets" in err
    assert not (tmp_path / "o").exists()


def test_experiment_file_supplies_runs_and_protocol(runs, tmp_path, capsys):
    """`--experiment` takes the cells' run folders and the [occlusion] settings; missing runs are refused."""
    from ssl_bench.experiments import load_experiment

    exp_file = tmp_path / "mini.toml"
    exp_file.write_text('title = "mini"\nprofile = "smoke"\nseeds = [1, 2]\nprotocols = ["honest"]\n'
                        '[run]\niterations = 1\neval_cases = 1\n'
                        '[[grid]]\nmethods = ["vnet"]\nlabeled = [8]\n'
                        '[occlusion]\nvariant = "volume"\nratios = [0.0, 0.3]\nrepeats = 1\n')
    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()
    cells = load_experiment(exp_file).cells
    assert [c.seed for c in cells] == [1, 2]
    rc = run_cli("occlusion", "--experiment", exp_file, "--runs-dir", runs_dir, "--quiet", "--no-panel",
                 "--out", tmp_path / "o")
    err = capsys.readouterr().err
    assert rc == 2 and "2 of 2 runs of mini are not finished" in err and len(err.strip().splitlines()) == 1
    for cell, run in zip(cells, runs):  # the fixture's seed-1 and seed-2 runs stand for the two cells
        (runs_dir / cell.id).symlink_to(run, target_is_directory=True)
    rc = run_cli("occlusion", "--experiment", exp_file, "--runs-dir", runs_dir, "--quiet", "--no-panel",
                 "--out", tmp_path / "o")
    assert rc == 0
    manifest = json.loads((tmp_path / "o" / "occlusion.json").read_text())
    assert manifest["ratios"] == [0.0, 0.3] and manifest["repeats"] == 1 and manifest["variant"] == "volume"
    assert sorted(r["seed"] for r in manifest["runs"]) == [1, 2]


def test_runs_in_different_units_are_refused_before_any_test_case_is_read():
    """_check_comparable looks at the units first (the runs' trainers are not touched)."""
    from pathlib import Path

    from ssl_bench.occlusion import RunInfo, _check_comparable

    def info(name, units):
        return RunInfo(Path(name), name, None, "vnet", 8, 1, "honest", "smoke", "raw", "tf32", units)

    with pytest.raises(UserError, match="runs with different distance units: a gives 95HD/ASD in voxel, b in mm"):
        _check_comparable([info("a", "voxel"), info("b", "mm")], "volume")


def test_an_mm_run_carries_its_unit_into_the_occlusion_files_and_its_printed_result(tmp_path, capsys):
    """On an imported data set (stored spacings) a --units mm run prints 95HD/ASD with "mm", and its occlusion
    CSVs and JSON say mm (issue 23)."""
    from test_importer import make_nnunet

    make_nnunet(tmp_path / "src", n_train=8)
    data = tmp_path / "data"
    assert run_cli("data", "import", "--format", "nnunet", tmp_path / "src", data, "--test-fraction", 0.25) == 0
    run = tmp_path / "run"
    capsys.readouterr()
    assert run_cli("run", "--method", "vnet", "--profile", "smoke", "--patch", "16,16,16", "--n-filters", 2,
                   "--iterations", 1, "--labeled", 4, "--eval-cases", 1, "--device", "cpu", "--data", data, "--units", "mm",
                   "--out", run, "--quiet") == 0
    printed = [ln for ln in capsys.readouterr().out.splitlines() if "95HD" in ln]
    assert len(printed) == 2 and all(" mm  ASD " in ln and ln.split("ASD ")[1].split()[1] == "mm" for ln in printed)
    out = tmp_path / "occ"
    assert run_cli("occlusion", run, "--ratios", "0.2", "--repeats", 1, "--out", out, "--no-panel", "--quiet",
                   "--device", "cpu") == 0
    assert {r["units"] for r in rows_of(out / "occlusion_per_case.csv")} == {"mm"}
    assert {r["units"] for r in rows_of(out / "occlusion_summary.csv")} == {"mm"}
    manifest = json.loads((out / "occlusion.json").read_text())
    assert manifest["units"] == "mm" and manifest["runs"][0]["units"] == "mm"
    assert all(s["units"] == "mm" for s in manifest["summary"])
