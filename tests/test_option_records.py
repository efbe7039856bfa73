"""Issue 23: every CLI option must be shown to reach the record and the run, for every command but `run` (that one:
tests/test_cli.py::test_every_run_option_reaches_the_record_and_the_run).

One test per command. Each enumerates the command's click options and asserts that the ones it leaves out form an
exact, commented set (a new option fails the test until it is exercised or named there), then invokes the command
with a value other than the default for every other option and checks that each value is (a) in the record the
command writes and (b) in what it did. Tiny data (ssl_bench.testing.make_tiny_la, tests/test_importer.py's
make_nnunet, the report fixtures) and one 2-iteration V-Net run at a 16³ patch; torch on one thread.

Devices: on a machine without CUDA `auto` resolves to the CPU too, so a `--device cpu` that was ignored would still
evaluate on the CPU. Each device name resolved is therefore recorded (``devices_asked``), and the run the tests
reuse was trained with ``device = "auto"``: the default (`auto`, or for `eval` the run's own) would show there.
"""
import csv
import json
import shutil
from pathlib import Path

import click
import h5py
import nibabel as nib
import numpy as np
import pytest

from ssl_bench.cli import cli as group
from ssl_bench.cli import main

from test_faults import one_thread_module  # noqa: F401  (a module fixture: one torch thread)
from test_report import md_section_rows

REPORT_FIX = Path(__file__).parent / "fixtures" / "report"
CASES_DIR = "2018LA_Seg_Training Set"
RUN_SETTINGS = dict(labeled=4, patch=(16, 16, 16), n_filters=2, iterations=2, device="auto", eval_cases=1,
                    checkpoint_every=2)


class Flag(str):
    """An option's non-default value given as a flag of its own (``--no-panel`` for ``--panel``)."""


def options_of(*names) -> set[str]:
    cmd = group
    for name in names:
        cmd = cmd.commands[name]
    return {p.opts[0] for p in cmd.params if isinstance(p, click.Option)}


def argv(given: dict) -> list[str]:
    """The command line of {option: value}; a list repeats the option, a Flag stands alone."""
    out = []
    for opt, value in given.items():
        for v in value if isinstance(value, list) else [value]:
            out += [str(v)] if isinstance(v, Flag) else [opt, str(v)]
    return out


def read_h5(root: Path, case: str):
    with h5py.File(root / CASES_DIR / case / "mri_norm2.h5", "r") as f:
        return {k: f[k][...] for k in f}


def lines(path: Path) -> list[str]:
    return path.read_text().split()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_thread_module):
    """Tiny data (8 train, 2 test cases) and a finished 2-iteration V-Net run on it, trained with device "auto".
    The data folder is then moved: the root config.json records is gone, so only --data can reach the data."""
    from ssl_bench.testing import make_tiny_la
    from ssl_bench.trainer import build_config, run_training

    tmp = tmp_path_factory.mktemp("option_records")
    at_training = make_tiny_la(tmp / "LA-at-training")
    run_training(build_config("vnet", "smoke", **RUN_SETTINGS), tmp / "vnet-run", at_training, progress=False)
    data = at_training.rename(tmp / "LA")
    return {"data": data, "run": tmp / "vnet-run"}


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    """Every command runs in the test's own folder: a default output (runs/, results/) would land there."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def devices_asked(monkeypatch):
    """Every device name resolved (a run set-up, an evaluation, bench's own), in order."""
    import ssl_bench.bench as bench
    import ssl_bench.run_setup as run_setup

    asked, real = [], run_setup.resolve_device

    def spy(name):
        asked.append(name)
        return real(name)

    monkeypatch.setattr(run_setup, "resolve_device", spy)
    monkeypatch.setattr(bench, "resolve_device", spy)
    return asked


# ------------------------------------------------------------------------------------------------ every command

#: the one test of each command's options; `methods` has none
OPTION_TESTS = {
    ("run",): "test_cli.py::test_every_run_option_reaches_the_record_and_the_run",
    ("eval",): "test_option_records.py::test_every_eval_option_reaches_the_summary_and_the_evaluation",
    ("occlusion",): "test_option_records.py::test_every_occlusion_option_reaches_its_record_and_the_boxes",
    ("sweep",): "test_option_records.py::test_every_sweep_option_reaches_status_json_and_the_trials",
    ("report",): "test_option_records.py::test_every_report_option_reaches_the_tables",
    ("bench",): "test_option_records.py::test_every_bench_option_reaches_the_json_and_the_timed_paths",
    ("curves",): "test_option_records.py::test_every_curves_option_reaches_the_figure_files",
    ("data", "verify"): "test_option_records.py::test_every_data_verify_option_reaches_the_check",
    ("data", "demo"): "test_option_records.py::test_every_data_demo_option_reaches_its_record_and_the_cases",
    ("data", "import"): "test_option_records.py::test_every_data_import_option_reaches_the_dataset_record",
    ("data", "derive"): "test_option_records.py::test_every_data_derive_option_reaches_the_dataset_record",
}


def test_every_command_has_its_option_test():
    """Issue 23: a new command (or subcommand) fails here until a test of its options is named above."""
    def walk(cmd, path):
        if isinstance(cmd, click.Group):
            for name, sub in cmd.commands.items():
                yield from walk(sub, path + (name,))
        else:
            yield path

    commands = set(walk(group, ()))
    assert commands - set(OPTION_TESTS) == {("methods",)} and options_of("methods") == set()
    assert set(OPTION_TESTS) <= commands
    here = Path(__file__).parent
    for where in OPTION_TESTS.values():
        file, name = where.split("::")
        assert f"def {name}(" in (here / file).read_text(), where


# ------------------------------------------------------------------------------------------------ eval

def test_every_eval_option_reaches_the_summary_and_the_evaluation(trained, tmp_path, devices_asked, capsys):
    """Issue 23: `ssl-bench eval`: --data is where the test cases are read from (the recorded root is gone), --device
    the device the run is evaluated on (not the "auto" the run recorded) and summary.json's device."""
    run = shutil.copytree(trained["run"], tmp_path / "run")
    before = json.loads((run / "summary.json").read_text())
    given = {"--data": trained["data"], "--device": "cpu"}
    # --quiet only hides the progress line (it writes and changes nothing)
    assert options_of("eval") - set(given) == {"--quiet"}
    assert main(["eval", str(run), "--quiet"]) == 2  # without --data: the root config.json records, moved away
    assert "not found" in capsys.readouterr().err
    devices_asked.clear()
    assert main(["eval", str(run), *argv(given), "--quiet"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["device"] == "cpu" and devices_asked == ["cpu"]  # config.json says "auto": --device replaced it
    # --data is in no record of eval, by design: eval refuses test cases whose sha256 differs from config.json's,
    # so where they lie cannot change a number (the metrics are those of the evaluation at the end of training)
    assert summary["test_cases"] == before["test_cases"] and summary["metrics"] == before["metrics"]


# ------------------------------------------------------------------------------------------------ occlusion

def test_every_occlusion_option_reaches_its_record_and_the_boxes(trained, tmp_path, devices_asked):
    """Issue 23: `ssl-bench occlusion`: the ratios (a range at --step), repeats, variant, seed, data, device and panel
    are in occlusion.json and boxes.csv and are what was evaluated; --experiment and --runs-dir (a second call)
    choose the runs and are recorded."""
    from ssl_bench.experiments import load_experiment
    from ssl_bench.occlusion import make_box

    out = tmp_path / "occ"
    given = {"--ratios": "0.2..0.4", "--step": "0.2", "--repeats": "2", "--variant": "code", "--seed": "5",
             "--out": out, "--data": trained["data"], "--device": "cpu", "--panel": Flag("--no-panel")}
    exp_file = tmp_path / "mini.toml"
    runs_dir = tmp_path / "cells"  # not the default's runs/ in the working folder
    by_experiment = {"--experiment": exp_file, "--runs-dir": runs_dir}
    # --overwrite (replacing an earlier occlusion output: tests/test_occlusion.py::
    # test_second_invocation_on_one_method_sees_the_same_occlusions) and --quiet (no progress line) record nothing
    assert options_of("occlusion") - set(given) - set(by_experiment) == {"--overwrite", "--quiet"}
    assert main(["occlusion", str(trained["run"]), *argv(given), "--quiet"]) == 0

    manifest = json.loads((out / "occlusion.json").read_text())
    # 0.2..0.4 every 0.2 (the default step 0.1 would add 0.3), 0 always added
    assert manifest["ratios"] == [0.0, 0.2, 0.4] and manifest["ratios_arg"] == "0.2..0.4" and manifest["step"] == 0.2
    assert (manifest["repeats"], manifest["variant"], manifest["occlusion_seed"]) == (2, "code", 5)
    assert manifest["training_patch"] == [16, 16, 16]  # variant code places its boxes within the training patch
    assert manifest["data"] == str(trained["data"].resolve())  # the recorded root is gone: only --data reached it
    assert [r["device"] for r in manifest["runs"]] == ["cpu"] and set(devices_asked) == {"cpu"}
    assert manifest["panel"] is None and "panel.png" not in manifest["files"] and not (out / "panel.png").exists()
    assert manifest["experiment"] is None and manifest["status"] == "complete"
    rows = list(csv.DictReader((out / "occlusion_per_case.csv").open()))
    assert {(r["ratio"], r["repeat"]) for r in rows} == {("0.0", "0"), ("0.2", "0"), ("0.2", "1"), ("0.4", "0"),
                                                         ("0.4", "1")}
    assert {r["variant"] for r in rows} == {"code"}
    boxes = [b for b in csv.DictReader((out / "boxes.csv").open()) if float(b["ratio"]) > 0]
    assert len(boxes) == 4 and {b["occlusion_seed"] for b in boxes} == {"5"} and {b["variant"] for b in boxes} == {"code"}
    other_seed = 0
    for b in boxes:  # every box is variant A's at seed 5: sides ⌊dim · r⌋, origin drawn from the seed
        dims = tuple(int(b[k]) for k in ("dim_x", "dim_y", "dim_z"))
        box, _ = make_box("code", dims, float(b["ratio"]), int(b["repeat"]), b["case"], 5, (16, 16, 16))
        assert [int(b[k]) for k in ("sx", "sy", "sz")] == [int(d * float(b["ratio"])) for d in dims] == list(box.size)
        assert tuple(int(b[k]) for k in ("x0", "y0", "z0")) == box.origin
        seed0, _ = make_box("code", dims, float(b["ratio"]), int(b["repeat"]), b["case"], 0, (16, 16, 16))
        other_seed += seed0.origin != box.origin
    assert other_seed > 0  # the default seed would have put them elsewhere

    # --experiment: the run folders are its cells under --runs-dir; variant, ratios and repeats its [occlusion]
    exp_file.write_text('title = "mini"\nprofile = "smoke"\nseeds = [1337]\nprotocols = ["honest"]\n'
                        '[[grid]]\nmethods = ["vnet"]\nlabeled = [4]\n'
                        '[occlusion]\nvariant = "volume"\nratios = [0.0, 0.3]\nrepeats = 1\n')
    exp = load_experiment(exp_file)
    (cell,) = exp.cells
    shutil.copytree(trained["run"], cell.run_dir(runs_dir))
    again = tmp_path / "occ-experiment"
    assert main(["occlusion", *argv(by_experiment), "--out", str(again), "--data", str(trained["data"]),
                 "--device", "cpu", "--no-panel", "--quiet"]) == 0
    manifest = json.loads((again / "occlusion.json").read_text())
    assert manifest["experiment"] == {"name": "mini", "file": str(exp.path), "runs_dir": str(runs_dir.resolve())}
    assert [r["path"] for r in manifest["runs"]] == [str(cell.run_dir(runs_dir).resolve())]
    assert (manifest["variant"], manifest["ratios"], manifest["repeats"]) == ("volume", [0.0, 0.3], 1)


# ------------------------------------------------------------------------------------------------ sweep

def test_every_sweep_option_reaches_status_json_and_the_trials(trained, tmp_path, monkeypatch):
    """Issue 23: `ssl-bench sweep`: data, resources, --only, --runs-dir and the Ray settings (--address,
    --max-concurrent, --max-failures) are in status.json and in what is handed to Ray Tune (stood in for: the
    trials are not run; each "trial" leaves a finished run folder)."""
    ray_tune = pytest.importorskip("ray.tune")
    from ssl_bench import sweep
    from ssl_bench.experiments import load_experiment

    exp_file = tmp_path / "grid.toml"
    exp_file.write_text('profile = "smoke"\nseeds = [1, 2]\n[run]\niterations = 2\neval_cases = 1\n'
                        '[[grid]]\nmethods = ["vnet", "uamt"]\nlabeled = [4]\n')
    cells = load_experiment(exp_file).plan()
    runs = tmp_path / "my-runs"  # not the default's runs/ in the working folder
    given = {"--data": trained["data"], "--gpus-per-trial": "0.5", "--cpus-per-trial": "2", "--max-concurrent": "1",
             "--address": "head-node:6379", "--runs-dir": runs, "--max-failures": "0", "--only": "vnet-*"}
    # --resume (continue incomplete run folders: tests/test_sweep.py::test_incomplete_folder_needs_resume and
    # ::test_interrupted_cell_was_resumed_not_restarted) and --dry-run (print the plan, write nothing:
    # tests/test_sweep.py::test_cli_plan_and_bad_options) are modes, not settings of the cells
    assert options_of("sweep") - set(given) == {"--resume", "--dry-run"}
    launched = {}

    def start_ray(address):
        launched["address"] = address
        return False

    class Tuner:
        def __init__(self, trainable, param_space, tune_config, run_config):
            launched.update(resources=trainable[1], jobs=param_space["job"]["grid_search"],
                            max_concurrent=tune_config.max_concurrent_trials,
                            max_failures=run_config.failure_config.max_failures)

        def fit(self):
            for job in launched["jobs"]:  # each trial stands for itself by a finished run folder
                Path(job["out"]).mkdir(parents=True)
                (Path(job["out"]) / "summary.json").write_text("{}")
            return []

    monkeypatch.setattr(sweep, "_start_ray", start_ray)
    monkeypatch.setattr(sweep, "_check_resources", lambda gpus, cpus: launched.update(checked=(gpus, cpus)))
    monkeypatch.setattr(ray_tune, "with_resources", lambda trainable, resources: (trainable, resources))
    monkeypatch.setattr(ray_tune, "Tuner", Tuner)
    assert main(["sweep", str(exp_file), *argv(given)]) == 0

    status = json.loads((runs / "_sweeps" / "grid" / "status.json").read_text())
    vnet = sorted(c.id for c in cells if c.method == "vnet")
    assert len(vnet) == 2 and len(cells) == 4  # --only keeps the vnet cells of the four
    assert status["data"] == str(trained["data"].resolve())
    assert status["resources"] == {"gpus_per_trial": 0.5, "cpus_per_trial": 2}
    assert status["ray"] == {"address": "head-node:6379", "max_concurrent_trials": 1, "max_failures": 0}
    assert status["only"] == ["vnet-*"] and sorted(status["cells"]) == vnet
    for cid, s in status["cells"].items():
        assert s["state"] == "complete" and s["gpu_memory_fraction"] == 0.5
        assert s["run_dir"] == str(runs.resolve() / cid)
    # what Ray was asked for
    assert launched["address"] == "head-node:6379" and launched["checked"] == (0.5, 2)
    assert launched["resources"] == {"cpu": 2, "gpu": 0.5}
    assert (launched["max_concurrent"], launched["max_failures"]) == (1, 0)
    jobs = launched["jobs"]
    assert sorted(j["id"] for j in jobs) == vnet
    for job in jobs:
        assert job["data"] == str(trained["data"].resolve()) and job["out"] == str(runs.resolve() / job["id"])
        assert job["threads"] == 2 and job["gpu_memory_fraction"] == 0.5
        assert job["config"]["device"] == "cuda"  # a trial with a GPU share trains on it


# ------------------------------------------------------------------------------------------------ report

def test_every_report_option_reaches_the_tables(tmp_path):
    """Issue 23: `ssl-bench report`: the --runs-dir folders (two) are where the runs are read and are named in
    table.md and REPRODUCTION.md, --out holds every file, --occlusion is where Fig. 3's numbers come from and is
    named beside them. The report fixture's runs and occlusion CSV (tests/test_report.py), as experiment table1."""
    runs = REPORT_FIX / "runs"
    exp = tmp_path / "table1.toml"  # table1 also writes REPRODUCTION.md
    shutil.copy(REPORT_FIX / "fig3.toml", exp)
    mine = tmp_path / "mine"
    mine.mkdir()
    out = tmp_path / "out"
    occlusion = REPORT_FIX / "occlusion"
    given = {"--runs-dir": [runs, mine], "--out": out, "--occlusion": occlusion}
    assert options_of("report") - set(given) == set()
    assert main(["report", str(exp), *argv(given)]) == 0

    md = (out / "table.md").read_text()
    # the working folder is tmp_path: mine is named relative to it, the fixture's runs absolute
    assert f"from the run folders in `{runs}`, `mine` (experiment file `table1.toml`)" in md
    assert md_section_rows(md, "## Protocol: honest")[0][:7] == ["V-Net", "8", "0", "honest", "tf32", "no", "2"]
    repro = (out / "REPRODUCTION.md").read_text()
    assert f"from `{runs}`, `{mine.resolve()}`." in repro
    assert "| V-Net | 8 | 82.74 / 71.72 / 13.35 / 3.26 | honest | 2/2 | no | 76.00 / 63.00 / 13.00 / 3.25 |" in repro
    assert f"from the occlusion results in `{occlusion}`" in md
    assert md_section_rows(md, "## Occlusion") == [["V-Net", "8", "honest", "2", "70.00", "45.00 ± 7.07"],
                                           ["OMF", "8", "honest", "1", "85.00", "70.00 ± 7.07"]]
    for name in ("table.md", "table.tex", "table.csv", "wilcoxon.csv", "selection.csv", "occlusion.csv", "fig3.png",
                 "REPRODUCTION.md"):
        assert (out / name).is_file(), name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "out", "table1.toml"]  # nothing in results/
    assert list(mine.iterdir()) == []


# ------------------------------------------------------------------------------------------------ bench

TINY_SMOKE = {"patch": (16, 16, 16), "n_filters": 2, "iterations": 2, "checkpoint_every": 2, "log_every": 1,
              "eval_stride_xy": 8, "eval_stride_z": 8, "selection_every": 2}


def test_every_bench_option_reaches_the_json_and_the_timed_paths(trained, tmp_path, monkeypatch, devices_asked):
    """Issue 23: `ssl-bench bench`: every option is in the JSON --out writes and in the trainers and arguments
    of the timed paths (the smoke profile made tiny, as in tests/test_bench.py)."""
    import ssl_bench.bench as bench
    from ssl_bench import trainer as trainer_mod

    monkeypatch.setitem(trainer_mod.PROFILES, "smoke", TINY_SMOKE)
    timed, real_path = [], bench.bench_path

    def path_spy(trainer, path, iterations, warmup, eval_cases, window_batches=()):
        timed.append((path, trainer.cfg.method, trainer.cfg.fast, trainer.cfg.precision, trainer.device.type,
                      len(trainer.split.labeled), tuple(trainer.cfg.patch), trainer.data.root, iterations, warmup,
                      eval_cases, tuple(window_batches)))
        return real_path(trainer, path, iterations, warmup, eval_cases, window_batches)

    monkeypatch.setattr(bench, "bench_path", path_spy)
    out = tmp_path / "bench.json"
    given = {"--method": "uamt", "--data": trained["data"], "--device": "cpu", "--profile": "smoke", "--labeled": "4",
             "--iterations": "2", "--warmup": "0", "--eval-cases": "2", "--precision": "fp32",
             "--reference-precision": "fp32", "--path": ["reference", "fast"], "--window-batch": "2", "--out": out}
    assert options_of("bench") - set(given) == set()
    assert main(["bench", *argv(given)]) == 0

    r = json.loads(out.read_text())
    root = trained["data"].resolve()
    assert r["complete"] is True and r["methods"] == ["uamt"] and list(r["results"]) == ["uamt"]
    assert r["data"] == str(root) and r["device"] == "cpu" and "auto" not in devices_asked
    assert r["profile"] == "smoke" and r["results"]["uamt"]["patch"] == [16, 16, 16]  # the paper's: 112,112,80
    assert (r["labeled"], r["timed_iterations"], r["warmup_iterations"], r["eval_cases"]) == (4, 2, 0, 2)
    assert r["paths"] == [{"label": "reference-fp32", "path": "reference", "precision": "fp32"},
                          {"label": "fast-fp32", "path": "fast", "precision": "fp32"}]
    paths = r["results"]["uamt"]["paths"]
    assert list(paths) == ["reference-fp32", "fast-fp32"]
    for p in paths.values():
        assert p["precision"] == p["numerics"]["precision"] == "fp32"
        assert [(s["iterations"], s["warmup"]) for s in p["train"]] == [(2, 0)] and p["eval"]["cases"] == 2
    assert paths["fast-fp32"]["eval"]["by_window_batch"]["2"]["window_batch"] == 2
    assert "by_window_batch" not in paths["reference-fp32"]["eval"]
    # what was timed: the trainers' settings and the arguments of each path
    assert timed == [("reference", "uamt", False, "fp32", "cpu", 4, (16, 16, 16), root, 2, 0, 2, (2,)),
                     ("fast", "uamt", True, "fp32", "cpu", 4, (16, 16, 16), root, 2, 0, 2, (2,))]


# ------------------------------------------------------------------------------------------------ curves

def test_every_curves_option_reaches_the_figure_files(trained, tmp_path):
    """Issue 23: `ssl-bench curves`: --out (its only option) is the stem of the two files written, and nothing else
    is written (curves keeps no record: the figure is its output)."""
    stem = tmp_path / "fig" / "curves-of-the-run"
    given = {"--out": stem}
    assert options_of("curves") - set(given) == set()
    assert main(["curves", str(trained["run"]), *argv(given)]) == 0
    assert sorted(p.name for p in (tmp_path / "fig").iterdir()) == ["curves-of-the-run.pdf", "curves-of-the-run.png"]
    assert (tmp_path / "fig" / "curves-of-the-run.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "fig" / "curves-of-the-run.pdf").read_bytes()[:5] == b"%PDF-"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fig"]


# ------------------------------------------------------------------------------------------------ data verify

def test_every_data_verify_option_reaches_the_check(trained, tmp_path, monkeypatch, capsys):
    """Issue 23: `ssl-bench data verify`: --data is the folder checked and named (it writes no record)."""
    monkeypatch.delenv("SSL_BENCH_DATA", raising=False)
    given = {"--data": trained["data"]}
    assert options_of("data", "verify") - set(given) == set()
    assert main(["data", "verify", *argv(given)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == f"data: {trained['data'].resolve()}" and printed[-1] == "ok"
    broken = shutil.copytree(trained["data"], tmp_path / "broken")
    (broken / CASES_DIR / "TINY09" / "mri_norm2.h5").write_bytes(b"not h5")
    assert main(["data", "verify", "--data", str(broken)]) == 2  # the folder given is the one read
    assert "TINY09" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ data demo

def test_every_data_demo_option_reaches_its_record_and_the_cases(tmp_path):
    """Issue 23: `ssl-bench data demo`: --seed is in ssl_bench_demo.json and draws other cases than the default."""
    from ssl_bench.demo import make_demo

    given = {"--seed": "1"}
    assert options_of("data", "demo") - set(given) == set()
    assert main(["data", "demo", str(tmp_path / "demo"), *argv(given)]) == 0
    record = json.loads((tmp_path / "demo" / "ssl_bench_demo.json").read_text())
    assert record["seed"] == 1 and (record["n_train"], record["n_test"]) == (16, 4)
    seed0 = make_demo(tmp_path / "seed0", n_train=1, n_test=1)  # the default seed's first cases, drawn first
    assert json.loads((seed0 / "ssl_bench_demo.json").read_text())["seed"] == 0
    a, b = read_h5(tmp_path / "demo", "DEMO000"), read_h5(seed0, "DEMO000")
    assert a["image"].shape != b["image"].shape or not np.array_equal(a["image"], b["image"])


# ------------------------------------------------------------------------------------------------ data import

def test_every_data_import_option_reaches_the_dataset_record(tmp_path):
    """Issue 23: `ssl-bench data import` (three calls: the three ways to choose the test set exclude each other):
    every option is in ssl_bench_dataset.json's options and in the record part it sets (source, preprocessing,
    split, settings), and the imported cases are what it asks for (label, channel, split, spacing, crop, the
    settings a run takes)."""
    from test_importer import make_nnunet

    from ssl_bench.data import LAData
    from ssl_bench.trainer import build_config

    src = tmp_path / "Dataset001_Syn"
    truth = make_nnunet(src, n_train=8, n_test=2)
    for cid, (image, _) in truth.items():  # channel 1: the negated image (its z-score is the negated one)
        tr = "Tr" if (src / "imagesTr" / f"{cid}_0000.nii.gz").exists() else "Ts"
        affine = nib.load(src / f"images{tr}" / f"{cid}_0000.nii.gz").affine
        nib.save(nib.Nifti1Image(-image, affine), str(src / f"images{tr}" / f"{cid}_0001.nii.gz"))
    train_ids = sorted(c for c in truth if (src / "imagesTr" / f"{c}_0000.nii.gz").exists())

    def record_of(out):
        return json.loads((out / "ssl_bench_dataset.json").read_text())

    # 1. label, channel, a test fraction and seed, the recorded patch and strides
    a = tmp_path / "a"
    given = {"--format": "nnunet", "--label": "other", "--test-fraction": "0.5", "--seed": "3", "--channel": "1",
             "--patch": "32,32,16", "--stride-xy": "5", "--stride-z": "2"}
    assert main(["data", "import", str(src), str(a), *argv(given)]) == 0
    rec = record_of(a)
    assert {k: rec["options"][k] for k in ("fmt", "label", "test_fraction", "seed", "channel", "patch", "stride_xy",
                                           "stride_z")} == {"fmt": "nnunet", "label": "other", "test_fraction": 0.5,
                                                            "seed": 3, "channel": 1, "patch": "32,32,16",
                                                            "stride_xy": 5, "stride_z": 2}
    assert rec["source"]["format"] == "nnunet" and rec["source"]["channel"] == 1
    assert rec["preprocessing"][1]["values"] == [2]  # "other" in dataset.json
    assert rec["split"]["method"] == "seeded shuffle, test fraction 0.5" and rec["split"]["seed"] == 3
    assert rec["settings"]["patch"] == [32, 32, 16]
    assert (rec["settings"]["eval_stride_xy"], rec["settings"]["eval_stride_z"]) == (5, 2)
    perm = [train_ids[i] for i in np.random.default_rng(3).permutation(8)]
    assert perm != [train_ids[i] for i in np.random.default_rng(0).permutation(8)]  # seed 3 is not the default's
    assert lines(a / "test.list") == perm[:4] and lines(a / "train.list") == perm[4:]
    for cid in perm:
        case = read_h5(a, cid)
        image, label = truth[cid]
        assert rec["cases"][cid]["source_image"].endswith(f"{cid}_0001.nii.gz")
        z = (image - image.mean(dtype=np.float64)) / image.std(dtype=np.float64)
        assert np.allclose(case["image"], -z, atol=1e-5)  # channel 1, not channel 0
        assert np.array_equal(case["label"], (label == 2).astype(np.uint8))
    cfg = build_config("vnet", "paper", dataset_defaults=LAData(a).run_defaults())  # what a run on it takes
    assert (cfg.patch, cfg.eval_stride_xy, cfg.eval_stride_z) == ((32, 32, 16), 5, 2)

    # 2. resampling, a crop around the label, an explicit test list
    b = tmp_path / "b"
    (tmp_path / "test-ids.txt").write_text("syn_005\nsyn_001\n")
    given_b = {"--spacing": "2.5,2.5,2.5", "--crop-around-label": "1,1,1", "--test-list": tmp_path / "test-ids.txt"}
    assert main(["data", "import", str(src), str(b), "--format", "nnunet", *argv(given_b)]) == 0
    rec = record_of(b)
    assert (rec["options"]["spacing"], rec["options"]["crop_around_label"], rec["options"]["test_list"]) == \
        ("2.5,2.5,2.5", "1,1,1", str(tmp_path / "test-ids.txt"))
    assert rec["preprocessing"][0]["target_spacing"] == [2.5, 2.5, 2.5]
    assert rec["preprocessing"][2]["margin_voxels"] == [1, 1, 1] and rec["preprocessing"][2]["uses_ground_truth"]
    assert rec["split"]["method"] == f"explicit test list {tmp_path / 'test-ids.txt'}"
    assert lines(b / "test.list") == ["syn_005", "syn_001"]
    for cid in lines(b / "train.list") + lines(b / "test.list"):
        case, info = read_h5(b, cid), rec["cases"][cid]
        assert list(case["spacing"]) == [2.5, 2.5, 2.5] == info["spacing"]
        resampled = [round(s * sp / 2.5) for s, sp in zip(truth[cid][0].shape, (1.25, 1.25, 2.5))]
        box = info["crop_box"]
        assert list(case["label"].shape) == [hi - lo for lo, hi in box] == info["shape"]
        assert all(0 <= lo < hi <= n for (lo, hi), n in zip(box, resampled)) and list(case["label"].shape) != resampled
        for axis, ((lo, hi), n) in enumerate(zip(box, resampled)):  # the label's box plus 1, within the volume
            present = np.flatnonzero(case["label"].any(axis=tuple(k for k in range(3) if k != axis)))
            first, last = lo + present[0], lo + present[-1]  # the label's extent in the resampled volume
            assert (lo, hi) == (first - min(1, first), last + 1 + min(1, n - 1 - last))

    # 3. the data set's own imagesTs as the test set
    c = tmp_path / "c"
    given_c = {"--test-from": "imagesTs"}
    assert main(["data", "import", str(src), str(c), "--format", "nnunet", *argv(given_c)]) == 0
    rec = record_of(c)
    assert rec["options"]["test_from"] == "imagesTs" and rec["split"]["method"] == "the data set's own imagesTs/labelsTs"
    assert lines(c / "test.list") == ["syn_008", "syn_009"] and sorted(lines(c / "train.list")) == train_ids

    assert options_of("data", "import") - set(given) - set(given_b) - set(given_c) == set()


# ------------------------------------------------------------------------------------------------ data derive

def test_every_data_derive_option_reaches_the_dataset_record(trained, tmp_path):
    """Issue 23: `ssl-bench data derive`: the zoom (one factor per axis) is in the record and gives the shapes; the
    patch and strides are in the record's settings, which a run on the derived data takes."""
    from ssl_bench.data import LAData
    from ssl_bench.trainer import build_config

    src, out = trained["data"], tmp_path / "derived"
    given = {"--zoom": "0.75,0.5,1", "--patch": "32,32,16", "--stride-xy": "5", "--stride-z": "2"}
    assert options_of("data", "derive") - set(given) == set()
    assert main(["data", "derive", str(src), str(out), *argv(given)]) == 0
    rec = json.loads((out / "ssl_bench_dataset.json").read_text())
    assert rec["options"] == {"src": str(src), "zoom": "0.75,0.5,1", "patch": "32,32,16", "stride_xy": 5,
                              "stride_z": 2}
    assert rec["preprocessing"][0]["zoom"] == [0.75, 0.5, 1.0]
    # the defaults at this zoom would be patch (80, 64, 80) and strides 9/4
    assert (rec["settings"]["patch"], rec["settings"]["eval_stride_xy"], rec["settings"]["eval_stride_z"]) == \
        ([32, 32, 16], 5, 2)
    for cid in lines(out / "train.list") + lines(out / "test.list"):
        assert read_h5(out, cid)["image"].shape == (18, 12, 20)  # 24 × 0.75, 24 × 0.5, 20 × 1
        assert rec["cases"][cid]["shape"] == [18, 12, 20] and rec["cases"][cid]["source_shape"] == [24, 24, 20]
    cfg = build_config("vnet", "paper", dataset_defaults=LAData(out).run_defaults())  # what `run --data OUT` takes
    assert (cfg.patch, cfg.eval_stride_xy, cfg.eval_stride_z) == ((32, 32, 16), 5, 2)
