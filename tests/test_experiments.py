"""Experiment files: the shipped grids, validation errors, cell IDs, stage-1 sharing and ordering."""

from pathlib import Path

import pytest

from ssl_bench.errors import UserError
from ssl_bench.experiments import (PLANNED_METHODS, Cell, load_experiment, same_run, wave_index, waves)

SEEDS = [1337, 1338, 1339]


def exp_from(tmp_path, text, name="exp"):
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return load_experiment(path, methods=PLANNED_METHODS)


def error_of(tmp_path, text) -> str:
    with pytest.raises(UserError) as info:
        exp_from(tmp_path, text)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("exp.toml: ")
    return msg


MINIMAL = 'seeds = [1]\n[[grid]]\nmethods = ["vnet"]\nlabeled = [8]\n'


def test_table1_grid():
    exp = load_experiment("table1", methods=PLANNED_METHODS)
    assert exp.paper == "table1" and exp.compare_to == "omf"
    ids = {c.id for c in exp.cells}
    # honest+val block, honest+literature+val block, V-Net 80 (honest only: no case is left for validation)
    assert len(exp.cells) == 4 * 2 * 2 * 3 + 3 * 2 * 3 * 3 + 3
    for m in ("vnet", "uamt", "sassnet", "dtc", "ssnet", "bcp", "omf"):
        for n in (8, 16):
            assert all(f"{m}-L{n}-s{s}-honest" in ids for s in SEEDS)
    assert {f"{m}-L8-s1337-literature" for m in ("ssnet", "bcp", "omf")} <= ids
    assert "uamt-L8-s1337-literature" not in ids  # its reference evaluates the last checkpoint
    # val (Decision 8) for every method at 8 and 16 labels; the honest/literature IDs are unchanged by it
    for m in ("vnet", "uamt", "sassnet", "dtc", "ssnet", "bcp", "omf"):
        for n in (8, 16):
            assert all(f"{m}-L{n}-s{s}-val" in ids for s in SEEDS)
    assert {c.id for c in exp.cells if c.protocol != "val"} == (
        {f"{m}-L{n}-s{s}-honest" for m in ("vnet", "uamt", "sassnet", "dtc", "ssnet", "bcp", "omf") for n in (8, 16)
         for s in SEEDS} | {f"{m}-L{n}-s{s}-literature" for m in ("ssnet", "bcp", "omf") for n in (8, 16) for s in SEEDS}
        | {f"vnet-L80-s{s}-honest" for s in SEEDS})
    assert {c.id for c in exp.cells if c.labeled == 80} == {f"vnet-L80-s{s}-honest" for s in SEEDS}
    assert {c.profile for c in exp.cells} == {"paper"} and all(not c.overrides for c in exp.cells)


def test_table2_fig3_smoke_grids():
    t2 = load_experiment("table2", methods=PLANNED_METHODS)
    assert t2.paper == "table2" and len(t2.cells) == 2 * 2 * 3 + 4 * 2 * 3 * 3  # val beside honest (+ literature)
    assert {c.id for c in t2.cells if c.protocol == "val"} == {
        f"{m}-L{n}-s{s}-val" for m in ("vnet", "omf-s1", "omf-s1-orgloss", "omf-s1-s2", "omf") for n in (8, 16)
        for s in SEEDS}
    assert {c.method for c in t2.cells} == {"vnet", "omf-s1", "omf-s1-orgloss", "omf-s1-s2", "omf"}
    fig3 = load_experiment("fig3", methods=PLANNED_METHODS)
    assert len(fig3.cells) == 7 * 2 * 3 and {c.protocol for c in fig3.cells} == {"honest"}
    assert fig3.occlusion.variant == "volume" and fig3.occlusion.repeats == 5
    assert fig3.occlusion.ratios == (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5)
    smoke = load_experiment("smoke", methods=PLANNED_METHODS)
    assert [c.id for c in smoke.cells] == ["vnet-L4-s1-honest-smoke", "vnet-L4-s2-honest-smoke",
                                           "uamt-L4-s1-honest-smoke", "uamt-L4-s2-honest-smoke"]


@pytest.mark.parametrize("name", ["table1", "table2", "fig3", "smoke"])
def test_shipped_files_match_the_registry(name):
    exp = load_experiment(name)  # every method name must be registered
    plan = exp.plan()
    assert len({c.id for c in plan}) == len(plan)


def test_shipped_plans_share_stage1():
    t1 = load_experiment("table1").plan()
    implicit = [c for c in t1 if c.implicit]
    assert {c.method for c in implicit} == {"omf-s1-orgloss"} and len(implicit) == 2 * 3 * 3  # per protocol
    omf = next(c for c in t1 if c.id == "omf-L16-s1338-literature")
    assert omf.teacher == "omf-s1-orgloss-L16-s1338-literature"
    assert next(c for c in t1 if c.id == "omf-L8-s1337-val").teacher == "omf-s1-orgloss-L8-s1337-val"
    t2 = load_experiment("table2").plan()
    assert not any(c.implicit for c in t2)
    assert next(c for c in t2 if c.id == "omf-s1-s2-L8-s1339-honest").teacher == "omf-s1-L8-s1339-honest"
    assert next(c for c in t2 if c.id == "omf-L8-s1339-honest").teacher == "omf-s1-orgloss-L8-s1339-honest"
    order = [c.id for c in t2]
    assert order.index("omf-s1-L8-s1339-honest") < order.index("omf-s1-s2-L8-s1339-honest")


def test_plan_with_stub_registry(tmp_path):
    exp = exp_from(tmp_path, 'seeds = [3]\nprofile = "smoke"\n[run]\niterations = 2\n'
                             '[[grid]]\nmethods = ["omf", "vnet"]\nlabeled = [4]\n')
    stages = {"omf": ["S1Org", "S2"], "omf-s1-orgloss": ["S1Org"], "vnet": ["V"]}
    plan = exp.plan(stages)
    assert [c.method for c in plan] == ["omf-s1-orgloss", "vnet", "omf"]  # provider first, then the listed order
    dep, omf = plan[0], plan[2]
    assert dep.implicit and omf.teacher == dep.id
    assert (dep.labeled, dep.seed, dep.protocol, dep.profile, dep.overrides) == (4, 3, "honest", "smoke", {"iterations": 2})
    assert wave_index(plan) == {dep.id: 0, plan[1].id: 0, omf.id: 1}
    # a provider whose stage is not the method's stage 1 is never used (the trainer would refuse it)
    plan = exp.plan({"omf": ["S1Org", "S2"], "omf-s1-orgloss": ["Other"], "vnet": ["V"]})
    assert len(plan) == 2 and all(c.teacher is None for c in plan)
    plan = exp.plan({"omf": ["S1Org", "S2"], "vnet": ["V"]})  # provider not registered: train stage 1 itself
    assert len(plan) == 2 and all(c.teacher is None for c in plan)


def test_waves_order_and_cycles():
    a, b, c = Cell("omf", 8, 1, "honest"), Cell("vnet", 8, 1, "honest"), Cell("omf-s1-orgloss", 8, 1, "honest")
    a.teacher = c.id
    assert [x.id for x in waves([a, b, c])] == [b.id, c.id, a.id]
    c.teacher = a.id
    with pytest.raises(UserError, match="circular"):
        waves([a, c])


def test_cell_ids_are_stable():
    assert Cell("vnet", 8, 1337, "honest").id == "vnet-L8-s1337-honest"  # = `ssl-bench run`'s default folder
    assert Cell("vnet", 4, 1, "literature", "smoke").id == "vnet-L4-s1-literature-smoke"
    one = Cell("vnet", 4, 1, "honest", "smoke", {"iterations": 2, "eval_cases": 1}).id
    assert one == Cell("vnet", 4, 1, "honest", "smoke", {"eval_cases": 1, "iterations": 2}).id
    assert one.startswith("vnet-L4-s1-honest-smoke-") and len(one.rsplit("-", 1)[1]) == 8
    assert one != Cell("vnet", 4, 1, "honest", "smoke", {"iterations": 3, "eval_cases": 1}).id
    # settings that do not change the result do not change the folder
    assert Cell("vnet", 4, 1, "honest", "smoke", {"device": "cpu", "log_every": 1}).id == "vnet-L4-s1-honest-smoke"


def test_cell_config_applies_overrides(tmp_path):
    exp = exp_from(tmp_path, 'profile = "smoke"\nseeds = [5]\nprotocols = ["literature"]\n'
                             '[run]\niterations = 2\npatch = [32, 32, 16]\n'
                             '[[grid]]\nmethods = ["vnet"]\nlabeled = [4]\n[grid.run]\neval_cases = 1\n')
    cfg = exp.cells[0].config(device="cpu")
    assert (cfg.method, cfg.labeled, cfg.seed, cfg.protocol, cfg.profile) == ("vnet", 4, 5, "literature", "smoke")
    assert (cfg.iterations, cfg.patch, cfg.eval_cases, cfg.n_filters, cfg.device) == (2, (32, 32, 16), 1, 4, "cpu")


@pytest.mark.parametrize("text, expected", [
    ("seed = [1]\n" + MINIMAL, "unknown key 'seed'"),
    ('[[grid]]\nmethods = ["vnet"]\nlabeled = [8]\nlabels = [8]\n', "grid[0]: unknown key 'labels'"),
    ('[[grid]]\nmethods = ["vnet", "omg"]\nlabeled = [8]\n', "grid[0]: unknown method 'omg'"),
    ('[[grid]]\nmethods = ["vnet"]\nlabeled = [0]\n', "labeled 0 is out of range 1..80"),
    ('[[grid]]\nmethods = ["vnet"]\nlabeled = [8, 81]\n', "labeled 81 is out of range 1..80"),
    ('[[grid]]\nmethods = []\nlabeled = [8]\n', "grid[0]: methods is empty"),
    ('seeds = []\n[[grid]]\nmethods = ["vnet"]\nlabeled = [8]\n', "seeds is empty"),
    ('[[grid]]\nmethods = ["vnet"]\nlabeled = [8]\nprotocols = []\n', "grid[0]: protocols is empty"),
    ('[[grid]]\nmethods = ["vnet"]\n', "grid[0]: missing key 'labeled'"),
    ("seeds = [1]\n", "needs at least one [[grid]] block"),
    ('seeds = [1, "2"]\n[[grid]]\nmethods = ["vnet"]\nlabeled = [8]\n', "seeds must hold int values"),
    ('seeds = [1, 1]\n[[grid]]\nmethods = ["vnet"]\nlabeled = [8]\n', "seeds lists a value twice"),
    ('protocols = ["best"]\n' + MINIMAL, "unknown protocol 'best'"),
    ('profile = "huge"\n' + MINIMAL, "unknown profile 'huge'"),
    ('paper = "table3"\n' + MINIMAL, "paper must be one of table1, table2"),
    ('compare_to = "nope"\n' + MINIMAL, "compare_to: unknown method 'nope'"),
    ('[run]\nlr = 0.1\n[[grid]]\nmethods = ["vnet"]\nlabeled = [8]\n', "unknown [run] setting 'lr'"),
    ('[run]\niterations = 0\n[[grid]]\nmethods = ["vnet"]\nlabeled = [8]\n',
     "grid[0]: bad [run] setting (--iterations must be at least 1"),
    ('[[grid]]\nmethods = ["vnet"]\nlabeled = [8]\n[grid.run]\nn_filters = "x"\n', "grid[0]: bad [run] setting"),
    (MINIMAL + '[[grid]]\nmethods = ["vnet"]\nlabeled = [8]\n', "grid[1]: cell vnet-L8-s1-honest is already listed in grid[0]"),
    (MINIMAL + '[occlusion]\nvariant = "B"\nratios = [0.1]\nrepeats = 5\n', "occlusion: variant must be one of volume, code"),
    (MINIMAL + '[occlusion]\nvariant = "volume"\nratios = [0.2, 0.1]\nrepeats = 5\n', "ratios must be increasing"),
    (MINIMAL + '[occlusion]\nvariant = "volume"\nratios = [1.0]\nrepeats = 5\n', "every ratio must be a number in [0, 1)"),
    (MINIMAL + '[occlusion]\nvariant = "volume"\nratios = [0.1]\n', "occlusion: missing key 'repeats'"),
    ("seeds = [1\n", "not valid TOML"),
])
def test_validation_errors(tmp_path, text, expected):
    assert expected in error_of(tmp_path, text)


def test_lookup_by_name_or_path(tmp_path):
    assert load_experiment("smoke", methods=PLANNED_METHODS).path.name == "smoke.toml"
    (tmp_path / "mine.toml").write_text(MINIMAL)
    assert load_experiment(tmp_path / "mine.toml", methods=PLANNED_METHODS).name == "mine"
    with pytest.raises(UserError, match="no experiment 'tabel1'.*table1"):
        load_experiment("tabel1", methods=PLANNED_METHODS)


def test_same_run_ignores_device_and_teacher():
    wanted = Cell("vnet", 4, 1, "honest", "smoke").config(device="cpu").to_json()
    stored = dict(wanted, device="cuda", teacher="/elsewhere", log_every=1)
    assert same_run(stored, wanted) is None
    assert same_run(dict(stored, iterations=3), wanted) == "iterations is 3 there, the experiment asks for 12"


def test_the_experiment_files_ship_with_the_package():
    """Issue 22: a regular (non-editable) install carries experiments/*.toml as ssl_bench.experiment_files, which
    EXPERIMENTS_DIR prefers when it is there (a checkout and an editable install read experiments/ itself)."""
    import configparser

    from ssl_bench import experiments as exp_mod

    cfg = configparser.ConfigParser()
    cfg.read(Path(exp_mod.__file__).resolve().parents[1] / "setup.cfg")
    packages = cfg["options"]["packages"].split()
    mapping = dict(line.split(" = ") for line in cfg["options"]["package_dir"].strip().splitlines())
    assert "ssl_bench.experiment_files" in packages and mapping["ssl_bench.experiment_files"] == "experiments"
    assert cfg["options.package_data"]["ssl_bench.experiment_files"].strip() == "*.toml"
    shipped = sorted(p.stem for p in (Path(exp_mod.__file__).resolve().parents[1] / "experiments").glob("*.toml"))
    assert {"table1", "table2", "fig3", "cpu", "smoke"} <= set(shipped)
    assert exp_mod.EXPERIMENTS_DIR == (exp_mod._PACKAGED if exp_mod._PACKAGED.is_dir()
                                       else exp_mod.PROJECT_ROOT / "experiments")
