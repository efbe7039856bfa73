"""Plugins (issue 11): methods from installed packages (entry point group ``ssl_bench.methods``) and from
``SSL_BENCH_PLUGINS`` modules, usable everywhere a built-in is; broken plugins and name clashes fail with one
line and exit 2; ``ssl-bench methods`` says where each method comes from; the public API's names exist.

The entry-point path is real: a ``.dist-info`` folder with an ``entry_points.txt`` is put on ``sys.path``
(what pip would install), pointing at the worked example under examples/. The registry, ``sys.path`` and
the plugin modules are restored after each test.
"""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ssl_bench import method as method_mod
from ssl_bench import plugins, published, testing
from ssl_bench.cli import main
from ssl_bench.experiments import load_experiment
from ssl_bench.method import MethodClash, registry
from ssl_bench.report import report_methods

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "ssl-bench-entmin"

TINY_PLUGIN = '''
from torch import nn

from ssl_bench.losses import cross_entropy
from ssl_bench.method import Stage, register


@register("tiny-plugin")
class TinyPlugin(Stage):
    """A one-convolution plugin method (test)."""

    batch_labeled = 2
    batch_unlabeled = 0
    iterations = 2

    def networks(self):
        return {"student": nn.Conv3d(1, 2, 3, padding=1)}

    def losses(self, phase, nets, batch, it0):
        ce = cross_entropy(nets["student"](batch.labeled_image), batch.label)
        return ce, {"ce": ce}
'''

PLUGIN_MODULES = ("ssl_bench_entmin", "h11_tiny", "h11_broken", "h11_clash", "h11_clash2", "h11_missing")


@pytest.fixture(autouse=True)
def clean(monkeypatch):
    """Own copies of the registry and of the loaded-plugin record; plugin modules forgotten afterwards."""
    monkeypatch.delenv(plugins.ENV, raising=False)
    registry()  # the built-ins register into the real registry, before it is copied
    monkeypatch.setattr(method_mod, "_REGISTRY", dict(method_mod._REGISTRY))
    monkeypatch.setattr(plugins, "_loaded", dict(plugins._loaded))
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
    for name in PLUGIN_MODULES:
        sys.modules.pop(name, None)


def _module(folder: Path, name: str, text: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.py").write_text(textwrap.dedent(text))


def _dist_info(site: Path, name: str, version: str, entry_points: dict) -> None:
    """What `pip install` leaves: NAME-VERSION.dist-info with METADATA and entry_points.txt."""
    d = site / f"{name.replace('-', '_')}-{version}.dist-info"
    d.mkdir(parents=True)
    (d / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (d / "entry_points.txt").write_text(
        "[ssl_bench.methods]\n" + "".join(f"{k} = {v}\n" for k, v in entry_points.items()))


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("ssl-bench: error: ")
    return err[0]


# -- entry points ---------------------------------------------------------------------------------------

def test_entry_point_plugin_is_loaded_listed_and_keeps_the_contract(tmp_path, monkeypatch, capsys, demo_root):
    site = tmp_path / "site"
    _dist_info(site, "ssl-bench-entmin", "0.1.0", {"entmin": "ssl_bench_entmin"})
    monkeypatch.syspath_prepend(str(EXAMPLE))
    monkeypatch.syspath_prepend(str(site))
    assert "entmin" not in method_mod._REGISTRY

    assert main(["methods"]) == 0
    lines = {ln.split()[0]: ln for ln in capsys.readouterr().out.splitlines()}
    assert lines["entmin"].split()[1:5] == ["[plugin", "ssl-bench-entmin", "0.1.0]", "1"]
    assert "stage(s): EntMin " in lines["entmin"] and "Entropy minimisation" in lines["entmin"]
    assert "[built-in]  2 stage(s): BCPStage1 -> BCPStage2 " in lines["bcp"]
    assert set(lines) == set(registry())
    assert registry()["entmin"].origin == "plugin ssl-bench-entmin 0.1.0"

    # the contract, on the built-in demo data by default (made once per process; here the suite's copy)
    monkeypatch.setattr(testing, "_DEMO", [demo_root])
    result = testing.check_method("entmin", workdir=tmp_path / "runs")
    assert result["summary"]["method"] == "entmin"
    assert len(result["losses"]) == 2 and all(loss == loss for *_, loss in result["losses"])


def test_a_broken_entry_point_is_one_line_naming_the_package_and_exit_2(tmp_path, monkeypatch, capsys):
    site = tmp_path / "site"
    _dist_info(site, "ssl-bench-broken", "9.9", {"broken": "h11_missing"})
    monkeypatch.syspath_prepend(str(site))
    assert main(["methods"]) == 2
    line = _one_error_line(capsys)
    assert "'h11_missing' (plugin ssl-bench-broken 9.9) failed to import: ModuleNotFoundError" in line


def test_a_broken_entry_point_does_not_hide_the_methods_that_load(tmp_path, monkeypatch, capsys):
    """`ssl-bench methods` lists the built-ins and the plugins that work, then names the broken one in one line with
    the switch that turns entry points off (exit 2); every other command still refuses to run (issue 23)."""
    site = tmp_path / "site"
    _dist_info(site, "ssl-bench-broken", "9.9", {"broken": "h11_missing"})
    _module(tmp_path / "mods", "h11_tiny", TINY_PLUGIN)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.syspath_prepend(str(tmp_path / "mods"))
    monkeypatch.setenv(plugins.ENV, "h11_tiny")
    assert main(["methods"]) == 2
    out, err = capsys.readouterr()
    listed = {ln.split()[0] for ln in out.splitlines()}
    assert {"vnet", "bcp", "omf", "tiny-plugin"} <= listed and "broken" not in listed
    [line] = err.strip().splitlines()
    assert line.startswith("ssl-bench: error: plugin 'h11_missing' (plugin ssl-bench-broken 9.9) failed to import")
    assert line.endswith("; SSL_BENCH_PLUGINS= (set and empty) switches entry-point plugins off")
    assert main(["run", "--method", "vnet"]) == 2  # anything else: refused before it runs, with the same line
    assert _one_error_line(capsys) == line


def test_an_empty_plugins_variable_switches_entry_points_off(tmp_path, monkeypatch, capsys):
    """SSL_BENCH_PLUGINS= (set, empty or blank): no entry-point plugin is imported, the built-ins are all there; unset,
    the broken entry point is back. The sweep hands the empty value on to its Ray workers."""
    site = tmp_path / "site"
    _dist_info(site, "ssl-bench-broken", "9.9", {"broken": "h11_missing"})
    _dist_info(site, "ssl-bench-entmin", "0.1.0", {"entmin": "ssl_bench_entmin"})
    monkeypatch.syspath_prepend(str(EXAMPLE))
    monkeypatch.syspath_prepend(str(site))
    for value in ("", "  "):
        monkeypatch.setenv(plugins.ENV, value)
        assert main(["methods"]) == 0
        out, err = capsys.readouterr()
        assert err == "" and "entmin" not in out and "built-in" in out
        assert {ln.split()[0] for ln in out.splitlines()} == {n for n, s in registry().items()}
        assert all(s.origin == "built-in" for s in registry().values())
    monkeypatch.delenv(plugins.ENV)
    assert main(["methods"]) == 2 and "h11_missing" in _one_error_line(capsys)

    from ssl_bench import sweep

    calls = []

    class FakeRay:
        def is_initialized(self):
            return False

        def init(self, **kwargs):
            calls.append(kwargs)

    monkeypatch.setitem(sys.modules, "ray", FakeRay())
    monkeypatch.setenv(plugins.ENV, "")
    sweep._start_ray(None)
    assert calls[0]["runtime_env"] == {"env_vars": {plugins.ENV: ""}}


# -- SSL_BENCH_PLUGINS: run, eval, experiment files, report, sweep ------------------------------------------

def test_env_plugin_runs_evaluates_and_is_accepted_by_experiments_report_and_sweep(tmp_path, monkeypatch, capsys,
                                                                                  demo_root):
    _module(tmp_path / "mods", "h11_tiny", TINY_PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path / "mods"))
    monkeypatch.setenv(plugins.ENV, " h11_tiny , ")
    out = tmp_path / "run"
    args = ["run", "--method", "tiny-plugin", "--data", str(demo_root), "--profile", "smoke", "--patch", "16,16,16",
            "--n-filters", "2", "--iterations", "2", "--eval-cases", "1", "--device", "cpu", "--quiet", "--out", str(out)]
    assert main(args) == 0
    assert "tiny-plugin L=8 seed=1337 honest" in capsys.readouterr().out
    assert main(["eval", str(out), "--quiet"]) == 0
    assert "tiny-plugin" in capsys.readouterr().out
    assert main(["methods"]) == 0
    assert "tiny-plugin      [SSL_BENCH_PLUGINS module h11_tiny]  1 stage(s): TinyPlugin  A one-convolution" \
        in capsys.readouterr().out

    # an experiment file may name it (also beside a paper table); the report shows it without a published number
    toml = tmp_path / "mine.toml"
    toml.write_text('paper = "table1"\ncompare_to = "vnet"\n[[grid]]\nmethods = ["tiny-plugin", "vnet"]\nlabeled = [4]\n')
    exp = load_experiment(toml)
    assert {c.method for c in exp.plan()} == {"tiny-plugin", "vnet"}
    assert "tiny-plugin" in report_methods()
    assert published.paper_figure("table1", "tiny-plugin", 4) is None
    assert published.paper_figure("table1", "vnet", 8) is not None

    # the sweep hands SSL_BENCH_PLUGINS to the Ray workers it starts (their environment may not be the driver's)
    from ssl_bench import sweep

    class FakeRay:
        def __init__(self):
            self.calls = []

        def is_initialized(self):
            return False

        def init(self, **kwargs):
            self.calls.append(kwargs)

    fake = FakeRay()
    monkeypatch.setitem(sys.modules, "ray", fake)
    assert sweep._start_ray(None) and sweep._start_ray("10.0.0.1:6379")
    assert [c["runtime_env"] for c in fake.calls] == [{"env_vars": {plugins.ENV: "h11_tiny ,"}}] * 2
    assert fake.calls[1]["address"] == "10.0.0.1:6379"
    monkeypatch.delenv(plugins.ENV)
    fake.calls.clear()
    sweep._start_ray(None)
    assert "runtime_env" not in fake.calls[0]


# -- no silent failure ------------------------------------------------------------------------------------

BROKEN = '''
from torch import nn
from ssl_bench.method import Stage, register


@register("half-registered")
class Half(Stage):
    def networks(self):
        return {"student": nn.Conv3d(1, 2, 1)}

    def losses(self, phase, nets, batch, it0):
        raise NotImplementedError


raise RuntimeError("the plugin is broken\\nsecond line of the message")
'''


def test_a_plugin_that_fails_to_import_is_one_line_and_exit_2_from_the_command_line(tmp_path):
    _module(tmp_path / "mods", "h11_broken", BROKEN)
    env = dict(os.environ, SSL_BENCH_PLUGINS="h11_broken",
               PYTHONPATH=os.pathsep.join([str(tmp_path / "mods"), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "ssl_bench.cli", "data", "demo", str(out)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == [
        "ssl-bench: error: plugin 'h11_broken' (SSL_BENCH_PLUGINS module h11_broken) failed to import: "
        "RuntimeError: the plugin is broken"]
    assert not out.exists()  # loaded before any command runs: nothing written


def test_a_failed_plugin_leaves_nothing_registered_and_fails_again(tmp_path, monkeypatch, capsys):
    _module(tmp_path / "mods", "h11_broken", BROKEN)
    monkeypatch.syspath_prepend(str(tmp_path / "mods"))
    monkeypatch.setenv(plugins.ENV, "h11_broken")
    for _ in range(2):  # never skipped: the second look at the registry fails the same way
        assert main(["methods"]) == 2
        assert "RuntimeError: the plugin is broken" in _one_error_line(capsys)
        assert "half-registered" not in method_mod._REGISTRY
    monkeypatch.setenv(plugins.ENV, "h11_nowhere")
    assert main(["run", "--method", "vnet"]) == 2
    assert _one_error_line(capsys).endswith("failed to import: ModuleNotFoundError: No module named 'h11_nowhere'")


def test_a_name_clash_is_refused_with_one_line(tmp_path, monkeypatch, capsys):
    mods = tmp_path / "mods"
    _module(mods, "h11_clash", TINY_PLUGIN.replace('"tiny-plugin"', '"vnet"'))
    monkeypatch.syspath_prepend(str(mods))
    monkeypatch.setenv(plugins.ENV, "h11_clash")
    assert main(["methods"]) == 2
    assert _one_error_line(capsys) == ("ssl-bench: error: method 'vnet' (SSL_BENCH_PLUGINS module h11_clash) clashes "
                                       "with the registered method 'vnet' (built-in); choose another name")
    assert method_mod._REGISTRY["vnet"].origin == "built-in"

    # two plugins with one name: the second is refused, naming both
    _module(mods, "h11_tiny", TINY_PLUGIN)
    _module(mods, "h11_clash2", TINY_PLUGIN)
    monkeypatch.setenv(plugins.ENV, "h11_tiny,h11_clash2")
    assert main(["methods"]) == 2
    line = _one_error_line(capsys)
    assert "'tiny-plugin' (SSL_BENCH_PLUGINS module h11_clash2) clashes" in line
    assert "(SSL_BENCH_PLUGINS module h11_tiny)" in line

    # registering a taken name directly: still the ValueError it always was
    monkeypatch.delenv(plugins.ENV)
    with pytest.raises(ValueError, match="'uamt'.*clashes"):
        method_mod.register("uamt")(registry()["vnet"].stages[0])
    with pytest.raises(MethodClash):
        method_mod.register("uamt")(registry()["vnet"].stages[0])


def test_register_refuses_a_bad_name_or_a_non_stage():
    with pytest.raises(plugins.PluginError, match="cannot register method 'my method/1'"):
        method_mod.register("my method/1")
    with pytest.raises(plugins.PluginError, match="is not a subclass of ssl_bench.method.Stage"):
        method_mod.register("not-a-stage")(dict)
    assert "not-a-stage" not in method_mod._REGISTRY


# -- the public API ---------------------------------------------------------------------------------------

def test_the_documented_public_api_exists():
    """The names README "Your method beside the seven" promises; a rename must keep the old name working."""
    from ssl_bench import losses, mixing
    from ssl_bench.data import Batch
    from ssl_bench.method import Stage, StageContext, register  # noqa: F401

    for attr in ("networks", "losses", "optimizers", "lr", "after_step", "train_modes", "extra_state",
                 "load_extra_state", "init_from", "foreground_probability", "vnet", "iterations", "batch_labeled",
                 "batch_unlabeled", "base_lr", "phases", "trained", "paper_lcc", "literature_selection",
                 "known_options", "keep_last_batch"):
        assert hasattr(Stage, attr), attr
    assert {"labeled", "patch", "n_filters", "iterations", "options"} <= set(StageContext.__dataclass_fields__)
    batch = Batch(image=torch.zeros(3, 1, 16, 16, 16), label=torch.zeros(1, 16, 16, 16, dtype=torch.long), n_labeled=1)
    assert batch.labeled_image.shape[0] == 1 and batch.unlabeled_image.shape[0] == 2 and batch.label.shape[0] == 1
    for name in ("dice_fg_sq", "dice_fg_lin", "dice_mc", "cross_entropy", "masked_cross_entropy", "softmax_mse",
                 "sigmoid_rampup", "ema_update", "uamt_ema_alpha", "signed_distance_target"):
        assert callable(getattr(losses, name)), name
    for name in ("cut_sides", "draw_cut_origin", "cut_mask", "random_cut_mask", "mix", "overlay", "overlay_label",
                 "pseudo_label"):
        assert callable(getattr(mixing, name)), name
    from ssl_bench.method import StageContext as Ctx

    class Probe(Stage):
        def networks(self):
            return {"student": self.vnet(n_classes=2, head="A", dropout=True)}

        def losses(self, phase, nets, batch, it0):
            raise NotImplementedError

    net = Probe(Ctx(labeled=4, patch=(16, 16, 16), n_filters=2)).networks()["student"]
    assert net.eval()(torch.zeros(1, 1, 16, 16, 16)).shape == (1, 2, 16, 16, 16)


def test_a_users_methods_py_cannot_hide_the_built_in_methods(tmp_path):
    """A `methods.py` first on sys.path (the working folder under `python -m`, or PYTHONPATH) is refused in one line,
    never silently taken for the seven built-in methods."""
    import os
    import subprocess
    import sys

    (tmp_path / "methods.py").write_text("from ssl_bench.method import Stage, register\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p)}
    res = subprocess.run([sys.executable, "-m", "ssl_bench.cli", "methods"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot hide them" in lines[0] and str(tmp_path / "methods.py") in lines[0]
