"""The schedule scale (Decision 10, the CPU track): every constant a method counts in iterations follows it;
at 1.0 nothing changes.

The scaled schedule at iteration i must equal the paper's at iteration i / s, at every iteration of the scaled
run: run lengths, lr steps (2500; OMF's 10000 and ×0.8 per 2500), the consistency ramps (unit 150; SS-Net counts
t = it0 + 1), UA-MT's threshold ramp (the run length), and the selection start and interval.
"""
from __future__ import annotations

import json

import pytest

from ssl_bench.method import StageContext, registry, scale_iterations
from ssl_bench.testing import make_tiny_la
from ssl_bench.trainer import PROFILES, Trainer, build_config

# s with every iteration constant integral (the CPU track's 0.04), and one more
SCALES = (0.04, 0.1)
#: method -> (the stage's ramp weight, offset of its ramp clock: SS-Net increments iter_num before the ramp)
RAMPS = {"uamt": ("consistency_weight", 0), "dtc": ("consistency_weight", 0), "ssnet": ("consistency_weight", 1),
         "sassnet": ("adversarial_weight", 0)}


def _stages():
    for name, spec in sorted(registry().items()):
        if spec.origin == "built-in":
            for k, cls in enumerate(spec.stages):
                yield name, k, cls


def _pair(cls, s, labeled=8):
    full = cls(StageContext(labeled=labeled, patch=(32, 32, 16), n_filters=2))
    scaled = cls(StageContext(labeled=labeled, patch=(32, 32, 16), n_filters=2, schedule_scale=s))
    return full, scaled


def _at_paper(i: int, s: float) -> int:
    return round(i / s)


def test_every_built_in_method_is_covered():
    names = {name for name, _, _ in _stages()}
    assert {"vnet", "uamt", "sassnet", "dtc", "ssnet", "bcp", "omf", "omf-s1", "omf-s1-orgloss", "omf-s1-s2"} <= names


@pytest.mark.parametrize("s", SCALES)
def test_run_lengths_and_lr_schedules_follow_the_scale(s):
    for name, k, cls in _stages():
        full, scaled = _pair(cls, s)
        n = scaled.run_iterations()
        assert n == round(cls.iterations * s), (name, k)
        assert full.run_iterations() == cls.iterations
        for done in range(n + 1):
            assert scaled.lr(done) == full.lr(_at_paper(done, s)), (name, k, done)


def test_the_lr_steps_move_with_the_scale():
    # at s = 0.04 the step schedule drops at 100 and 200 (2500, 5000); OMF stage 1 at 400 (10000); OMF stage 2
    # takes ×0.8 every 100 (2500)
    reg = registry()
    vnet = _pair(reg["vnet"].stages[0], 0.04)[1]
    assert [vnet.lr(d) for d in (99, 100, 199, 200)] == pytest.approx([0.01, 0.001, 0.001, 0.0001])
    omf1, omf2 = (_pair(c, 0.04)[1] for c in reg["omf"].stages)
    assert (omf1.lr(399), omf1.lr(400)) == pytest.approx((0.1, 0.01))
    assert (omf2.lr(99), omf2.lr(100), omf2.lr(200)) == pytest.approx((0.1, 0.08, 0.064))


@pytest.mark.parametrize("s", SCALES)
@pytest.mark.parametrize("method", sorted(RAMPS))
def test_consistency_ramps_follow_the_scale(method, s):
    attr, off = RAMPS[method]
    full, scaled = _pair(registry()[method].stages[0], s)
    n = scaled.run_iterations()
    values = [getattr(scaled, attr)(it0) for it0 in range(n)]
    assert values == [getattr(full, attr)(_at_paper(it0 + off, s) - off) for it0 in range(n)]
    assert values[-1] == getattr(full, attr)(full.run_iterations() - 1)  # the ramp ends where the paper's does
    assert len(set(values)) > 30  # it ramps over the run (40 steps), not in one jump


def test_uamt_threshold_ramp_follows_the_scaled_run_length():
    full, scaled = _pair(registry()["uamt"].stages[0], 0.04)
    assert (full.total_iterations(), scaled.total_iterations()) == (6000, 240)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_la(tmp_path_factory.mktemp("tiny") / "LA", n_train=12, n_test=2)


@pytest.mark.parametrize("protocol", ["literature", "val"])
def test_selection_start_and_interval_follow_the_scale(tiny, tmp_path, protocol):
    from ssl_bench.data import LAData

    data = LAData(tiny)
    for name in ("vnet", "ssnet", "bcp", "omf"):
        cfg = {s: build_config(name, "paper", labeled=2, protocol=protocol, patch=(16, 16, 16), n_filters=2,
                               device="cpu", schedule_scale=s, **({"val_cases": 2} if protocol == "val" else {}))
               for s in (1.0, 0.04)}
        full, scaled = (Trainer(cfg[s], tmp_path / f"{name}-{s}", data, progress=False) for s in (1.0, 0.04))
        for st_full, st_scaled in zip(full.stages, scaled.stages):
            (rule_full, every_full), (rule_scaled, every_scaled) = full.selection_rule(st_full), scaled.selection_rule(st_scaled)
            assert every_scaled == round(every_full * 0.04)
            if rule_full is None:
                assert rule_scaled is None
            else:
                assert rule_scaled == (round(rule_full[0] * 0.04), round(rule_full[1] * 0.04))
    # SS-Net's literature selection: from 2000 every 200 -> from 80 every 8
    ss = Trainer(build_config("ssnet", "paper", labeled=2, protocol="literature", patch=(16, 16, 16), n_filters=2,
                              device="cpu", schedule_scale=0.04), tmp_path / "ss", data, progress=False)
    if protocol == "literature":
        assert ss.selection_rule(ss.stages[0]) == ((80, 8), 8)
    # an explicit --selection-every is the user's, not scaled
    ex = Trainer(build_config("vnet", "paper", labeled=2, protocol="val", val_cases=2, patch=(16, 16, 16), n_filters=2,
                              device="cpu", schedule_scale=0.04, selection_every=3), tmp_path / "ex", data, progress=False)
    assert ex.selection_rule(ex.stages[0])[1] == 3


def test_scale_one_is_the_paper(tiny, tmp_path):
    """At 1.0 every constant is the paper's, the record shows none of the scaled fields, and a run is
    bit-identical to one that never heard of the scale."""
    for n in (1, 150, 200, 2000, 2500, 6000, 10000, 15000):
        assert scale_iterations(n, 1.0) == n
    from ssl_bench.data import LAData
    from ssl_bench.trainer import run_training

    data = LAData(tiny)
    for name, k, cls in _stages():
        full = cls(StageContext(labeled=8, patch=(32, 32, 16)))
        assert full.run_iterations() == cls.iterations and full.scaled(2500) == 2500
    outs = []
    for i, extra in enumerate(({}, {"schedule_scale": 1.0})):
        cfg = build_config("uamt", "smoke", labeled=2, patch=(16, 16, 16), n_filters=2, eval_cases=1,
                           eval_stride_xy=8, eval_stride_z=8, iterations=3, device="cpu", **extra)
        out = tmp_path / f"run{i}"
        run_training(cfg, out, str(tiny), progress=False)
        outs.append(out)
    logs = [[{k: v for k, v in json.loads(line).items() if k not in ("it_per_s", "elapsed_s")}
             for line in (o / "log.jsonl").read_text().splitlines()] for o in outs]
    assert logs[0] == logs[1]
    assert (outs[0] / "metrics_per_case.csv").read_text() == (outs[1] / "metrics_per_case.csv").read_text()
    stages = json.loads((outs[0] / "config.json").read_text())["method"]["stages"]
    assert "scaled_selection" not in stages[0]


def test_a_scaled_run_records_its_scale_and_scaled_schedule(tiny, tmp_path):
    from ssl_bench.data import LAData

    cfg = build_config("bcp", "paper", labeled=2, protocol="val", val_cases=2, patch=(16, 16, 16), n_filters=2,
                       device="cpu", schedule_scale=0.04)
    tr = Trainer(cfg, tmp_path / "bcp", LAData(tiny), progress=False)
    desc = tr.describe()
    assert [s["iterations"] for s in desc["stages"]] == [80, 600]
    assert [s["scaled_selection"] for s in desc["stages"]] == [(0, 8), (0, 8)]
    assert cfg.to_json()["schedule_scale"] == 0.04


def test_the_cpu_profile_declares_the_track():
    cfg = build_config("vnet", "cpu")
    assert (cfg.schedule_scale, cfg.n_filters, cfg.precision) == (PROFILES["cpu"]["schedule_scale"], 8, "fp32")
    # every constant of every method is an integer at the track's scale
    s = cfg.schedule_scale
    for n in (150, 200, 2000, 2500, 6000, 10000, 15000):
        assert abs(n * s - round(n * s)) < 1e-9, n


@pytest.mark.parametrize("bad", [0, -1, 0.0001, 11, "x", True])
def test_an_impossible_scale_is_one_line(bad):
    from ssl_bench.errors import UserError

    with pytest.raises(UserError, match="schedule-scale"):
        build_config("vnet", "paper", schedule_scale=bad)
