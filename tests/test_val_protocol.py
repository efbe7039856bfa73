"""The `val` protocol (docs/methods.md Decision 8, issue 12): selection on the last K cases of train.list.

- the split: the validation cases are the last K of train.list (on the real list too), inside the
  unlabeled pool, never labeled, never test; too many is one line, exit 2;
- training is identical to honest and literature: the same batches in the same order, the same last weights;
- selection every `selection_every` iterations in every stage on the validation cases (Decision 9's
  rounding, strictly greater wins), the selected weights handed on to stage 2; the test set is never
  read before training ends, and read from disk once after it;
- run identity: val_cases never changes an honest/literature run or cell, and an old config.json
  without it still loads and resumes;
- `ssl-bench curves` and the report's selection table (last, val-selected, best-on-test).

Expected values come from the test's own reading of train.list, the scripted scores and hand arithmetic.
"""
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from ssl_bench import evaluation as evaluation_mod, trainer as trainer_mod
from ssl_bench.cli import main
from ssl_bench.curves import load_curves
from ssl_bench.data import LAData
from ssl_bench.errors import UserError
from ssl_bench.experiments import PLANNED_METHODS, Cell, load_experiment, same_run
from ssl_bench.report import write_report
from ssl_bench.testing import make_tiny_la
from ssl_bench.trainer import RunConfig, Trainer, build_config, run_training
from test_report import md_section_rows

PATCH = (16, 16, 16)
FIX = Path(__file__).parent / "fixtures" / "report"

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _lines(path: Path) -> list[str]:
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]


def _log(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]


def _equal(a: dict, b: dict, keys=None) -> bool:
    keys = list(a) if keys is None else keys
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in keys)


def _stage_file(path: Path) -> dict:
    return torch.load(path, weights_only=True)


# ------------------------------------------------------------------ the split (real train.list)

@pytest.mark.parametrize("labeled", [8, 16])
def test_validation_cases_are_the_last_k_of_the_real_train_list(la_root, labeled):
    train, test = _lines(la_root / "train.list"), _lines(la_root / "test.list")
    split = LAData(la_root).split(labeled, 8)
    assert list(split.val) == train[-8:] and len(train) == 80
    assert list(split.labeled) == train[:labeled]
    assert list(split.unlabeled) == train[labeled:]  # the validation cases stay in the unlabeled pool
    assert set(split.val) <= set(split.unlabeled)
    assert not set(split.val) & set(split.labeled) and not set(split.val) & set(test)
    assert LAData(la_root).split(labeled).val == ()  # honest and literature have none


def test_more_validation_cases_than_the_unlabeled_pool_is_one_line(la_root, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["run", "--method", "vnet", "--labeled", "75", "--protocol", "val", "--val-cases", "6", "--profile",
               "smoke", "--device", "cpu", "--data", str(la_root), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "--val-cases 6" in err and "5 unlabeled" in err
    assert not out.exists()  # nothing written
    with pytest.raises(UserError, match="more than the 5 unlabeled"):
        LAData(la_root).split(75, 6)
    assert len(LAData(la_root).split(75, 5).val) == 5  # the whole pool is allowed


def test_val_cases_is_a_val_setting_only(tiny_root, capsys):
    assert build_config("vnet", "smoke", protocol="val").val_cases == 8  # Decision 8's default
    assert build_config("vnet", "smoke", protocol="honest").val_cases is None
    assert build_config("vnet", "smoke", protocol="literature").val_cases is None
    with pytest.raises(UserError, match="--val-cases applies to --protocol val only"):
        build_config("vnet", "smoke", protocol="honest", val_cases=4)
    with pytest.raises(UserError, match="--val-cases must be at least 1"):
        build_config("vnet", "smoke", protocol="val", val_cases=0)
    rc = main(["run", "--method", "vnet", "--protocol", "literature", "--val-cases", "4", "--device", "cpu",
               "--data", str(tiny_root)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "--val-cases" in err


# ------------------------------------------------------------------ training is the same under every protocol

@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    return make_tiny_la(tmp_path_factory.mktemp("tiny") / "LA")  # train TINY00..07, test TINY08..09


@pytest.fixture(scope="module")
def three_protocols(tiny_root, tmp_path_factory):
    """UA-MT (labeled + unlabeled stream) under honest, literature (made to select) and val, batches recorded."""
    from methods.uamt import UAMT

    base = tmp_path_factory.mktemp("protocols")
    batches, outs = {}, {}
    original = Trainer.train_step
    mp = pytest.MonkeyPatch()
    mp.setattr(UAMT, "literature_selection", (2, 2))  # its reference selects nothing: make literature select too
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for protocol in ("honest", "literature", "val"):
            seen = batches[protocol] = []

            def step(self, stage, nets, opts, batch, it0, scalers=None, _seen=seen):
                _seen.append((it0, batch.image.clone(), batch.label.clone()))
                return original(self, stage, nets, opts, batch, it0, scalers)

            mp.setattr(Trainer, "train_step", step)
            cfg = build_config("uamt", "smoke", labeled=4, iterations=4, patch=PATCH, n_filters=2, device="cpu",
                               eval_cases=1, protocol=protocol, selection_every=2, checkpoint_every=1000,
                               val_cases=2 if protocol == "val" else None)
            outs[protocol] = base / protocol
            run_training(cfg, outs[protocol], tiny_root, progress=False)
    finally:
        mp.undo()
        torch.set_num_threads(n)
    return outs, batches


def test_training_batches_are_identical_under_every_protocol(three_protocols):
    _, batches = three_protocols
    ref = batches["honest"]
    assert [b[0] for b in ref] == [0, 1, 2, 3] and ref[0][1].shape[0] == 4  # 2 labeled + 2 unlabeled per batch
    for protocol in ("literature", "val"):
        got = batches[protocol]
        assert len(got) == len(ref)
        for (it_a, img_a, lab_a), (it_b, img_b, lab_b) in zip(ref, got):
            assert it_a == it_b and torch.equal(img_a, img_b) and torch.equal(lab_a, lab_b)


def test_selection_never_changes_the_last_weights(three_protocols):
    outs, _ = three_protocols
    honest = _stage_file(outs["honest"] / "stages/stage1.pt")
    assert honest["selection"] == "last" and honest["iteration"] == 4
    for protocol in ("literature", "val"):
        last = _stage_file(outs[protocol] / "stages/stage1_last.pt")  # kept beside the selected weights
        assert last["iteration"] == 4 and _equal(last["weights"], honest["weights"])
    val_log = [r for r in _log(outs["val"]) if "val_dice_raw" in r]
    lit_log = [r for r in _log(outs["literature"]) if "test_dice_raw" in r]
    assert [r["iteration"] for r in val_log] == [2, 4] == [r["iteration"] for r in lit_log]
    assert not any("test_dice_raw" in r for r in _log(outs["val"]))
    assert not any("val_dice_raw" in r or "test_dice_raw" in r for r in _log(outs["honest"]))


def test_config_lists_the_validation_cases(three_protocols, tiny_root):
    outs, _ = three_protocols
    train, test = _lines(tiny_root / "train.list"), _lines(tiny_root / "test.list")
    split = json.loads((outs["val"] / "config.json").read_text())["split"]
    assert split["val"] == train[-2:] and split["unlabeled"] == train[4:] and split["labeled"] == train[:4]
    assert not set(split["val"]) & set(test + split["labeled"])
    assert json.loads((outs["honest"] / "config.json").read_text())["split"]["val"] == []
    summary = json.loads((outs["val"] / "summary.json").read_text())
    assert summary["val_cases"] == train[-2:] and summary["test_cases"] == test[:1]


# ------------------------------------------------------------------ identity: old folders, cells

def test_an_old_config_without_val_cases_still_loads_and_resumes(three_protocols, tiny_root):
    outs, _ = three_protocols
    for protocol in ("honest", "literature"):
        path = outs[protocol] / "config.json"
        stored = json.loads(path.read_text())
        del stored["config"]["val_cases"]  # as written before the val protocol existed
        path.write_text(json.dumps(stored))
        cfg = RunConfig.from_json(stored["config"])
        assert cfg.val_cases is None
        Trainer(cfg, outs[protocol], LAData(tiny_root), progress=False).check_resumable()  # no difference
        wanted = build_config("uamt", "smoke", labeled=4, iterations=4, patch=PATCH, n_filters=2, device="cpu",
                              eval_cases=1, protocol=protocol, selection_every=2, checkpoint_every=1000)
        assert same_run(stored["config"], wanted.to_json()) is None
    val = json.loads((outs["val"] / "config.json").read_text())
    cfg = RunConfig.from_json(val["config"])
    with pytest.raises(UserError, match="setting 'val_cases' was 2, now 3"):
        Trainer(RunConfig.from_json({**val["config"], "val_cases": 3}), outs["val"], LAData(tiny_root),
                progress=False).check_resumable()
    assert cfg.val_cases == 2


def test_val_cases_in_an_experiment_defines_only_the_val_cells(tmp_path):
    path = tmp_path / "exp.toml"
    path.write_text('seeds = [1]\nprotocols = ["honest", "literature", "val"]\n[run]\nval_cases = 4\n'
                    '[[grid]]\nmethods = ["omf"]\nlabeled = [8]\n')
    cells = {c.protocol: c for c in load_experiment(path, methods=PLANNED_METHODS).cells}
    assert cells["honest"].id == "omf-L8-s1-honest" and cells["literature"].id == "omf-L8-s1-literature"
    assert cells["val"].id.startswith("omf-L8-s1-val-") and cells["val"].config().val_cases == 4
    assert cells["honest"].config().val_cases is None
    assert Cell("omf", 8, 1, "val").id == "omf-L8-s1-val" and Cell("omf", 8, 1, "val").config().val_cases == 8


# ------------------------------------------------------------------ selection per stage; the test set untouched

#: scripted validation Dice after iterations 1..4 of each stage. Stage 1: best at 2, the tie at 3 does not
#: replace it. Stage 2 (Decision 9): 0.81236 -> best round() = 0.8124; 0.81238 does not beat it.
SCRIPT = {"OMFStage1": [0.50, 0.80, 0.80, 0.60], "OMFStage2": [0.81236, 0.81238, 0.5, 0.6]}
BEST = {"OMFStage1": (0.80, 2), "OMFStage2": (0.8124, 1)}


@pytest.fixture(scope="module")
def omf_val(tiny_root, tmp_path_factory):
    """A two-stage `omf` run under val (2 validation cases, selection after every iteration), instrumented."""
    out = tmp_path_factory.mktemp("val") / "omf"
    events, snapshots, real = [], {k: [] for k in SCRIPT}, []
    orig_step, orig_sel, orig_eval = Trainer.train_step, Trainer._selection_dice, trainer_mod.evaluate_cases
    orig_load, orig_read = LAData.load, LAData._read

    def step(self, stage, nets, opts, batch, it0, scalers=None):
        events.append(("step", type(stage).__name__, it0))
        return orig_step(self, stage, nets, opts, batch, it0, scalers)

    def selection(self, stage, nets):
        name = type(stage).__name__
        snapshots[name].append({k: v.detach().clone() for k, v in nets[stage.trained].state_dict().items()})
        real.append(orig_sel(self, stage, nets))  # the real evaluation on the validation cases runs
        return SCRIPT[name][len(snapshots[name]) - 1]

    def evaluate(prob_fn, net, data, case_ids, settings, device, **kw):
        events.append(("eval", tuple(case_ids), kw.get("dice_only", False)))
        return orig_eval(prob_fn, net, data, case_ids, settings, device, **kw)

    def load(self, case_id):
        events.append(("load", case_id))
        return orig_load(self, case_id)

    def read(self, case_id, image):
        if image:
            events.append(("disk", case_id))
        return orig_read(self, case_id, image)

    mp = pytest.MonkeyPatch()
    for target, name, fn in ((Trainer, "train_step", step), (Trainer, "_selection_dice", selection),
                             (trainer_mod, "evaluate_cases", evaluate), (evaluation_mod, "evaluate_cases", evaluate),
                             (LAData, "load", load), (LAData, "_read", read)):
        mp.setattr(target, name, fn)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = build_config("omf", "smoke", labeled=4, iterations=4, patch=PATCH, n_filters=2, device="cpu",
                           eval_cases=1, protocol="val", val_cases=2, selection_every=1, checkpoint_every=1000)
        summary = run_training(cfg, out, tiny_root, progress=False)
    finally:
        mp.undo()
        torch.set_num_threads(n)
    return out, summary, events, snapshots, real


def test_the_test_set_is_read_once_and_only_after_training(omf_val, tiny_root):
    _, _, events, _, real = omf_val
    val, test = _lines(tiny_root / "train.list")[-2:], _lines(tiny_root / "test.list")[:1]
    last_step = max(i for i, e in enumerate(events) if e[0] == "step")
    before, after = events[:last_step], events[last_step:]
    assert sum(e[0] == "step" for e in events) == 8  # 4 iterations x 2 stages
    # during training: only the validation cases are evaluated (raw Dice), after every iteration of both stages
    evals = [e for e in before if e[0] == "eval"]
    assert evals == [("eval", tuple(val), True)] * 7  # the 8th follows the last step
    assert not any(e[0] in ("load", "disk") and e[1] in test for e in before)
    # after training: the selected and the last weights on the test case, read from disk once
    assert [e for e in after if e[0] == "eval"] == [("eval", tuple(val), True), ("eval", tuple(test), False),
                                                    ("eval", tuple(test), False)]
    assert [e for e in events if e == ("disk", test[0])] == [("disk", test[0])]
    assert len(real) == 8 and all(0.0 <= d <= 1.0 for d in real)


@pytest.mark.parametrize("k, name", [(1, "OMFStage1"), (2, "OMFStage2")])
def test_each_stage_hands_on_its_val_selection(omf_val, k, name):
    out, _, _, snapshots, _ = omf_val
    dice, it = BEST[name]
    handed = _stage_file(out / f"stages/stage{k}.pt")
    assert handed["selection"] == "best-on-val" and handed["iteration"] == it
    assert handed["best_on_val"] == {"dice": dice, "iteration": it} and "best_on_test" not in handed
    assert _equal(handed["weights"], snapshots[name][it - 1])
    assert not _equal(handed["weights"], snapshots[name][-1])  # the weights moved after the selection
    kept = _stage_file(out / f"stages/stage{k}_last.pt")
    assert kept["iteration"] == 4 and _equal(kept["weights"], snapshots[name][-1])
    logged = {r["iteration"]: r["val_dice_raw"] for r in _log(out) if r["stage"] == k and "val_dice_raw" in r}
    assert logged == dict(zip(range(1, 5), SCRIPT[name]))


def test_stage2_starts_from_the_stage1_val_selection(omf_val):
    out, summary, _, snapshots, _ = omf_val
    teacher = torch.load(out / "checkpoints/last.pt", weights_only=True)["nets"]["teacher"]
    params = [k for k in teacher if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert params and _equal(teacher, snapshots["OMFStage1"][1], keys=params)
    assert summary["checkpoint"] == {"stage": 2, "iteration": 1, "selection": "best-on-val"}
    assert summary["best_on_val"] == {"dice": 0.8124, "iteration": 1}
    assert summary["last"]["checkpoint"] == {"stage": 2, "iteration": 4, "selection": "last"}


def test_an_interrupted_val_run_resumes_to_the_same_selection(tiny_root, tmp_path):
    def cfg():
        return build_config("vnet", "smoke", labeled=4, iterations=4, patch=PATCH, n_filters=2, device="cpu",
                            eval_cases=1, protocol="val", val_cases=2, selection_every=1, checkpoint_every=1000)

    whole = run_training(cfg(), tmp_path / "whole", tiny_root, progress=False)
    from ssl_bench.errors import Interrupted

    with pytest.raises(Interrupted):
        run_training(cfg(), tmp_path / "cut", tiny_root, progress=False, stop_at=(1, 2))
    resumed = run_training(cfg(), tmp_path / "cut", tiny_root, resume=True, progress=False)
    assert resumed["checkpoint"] == whole["checkpoint"] and resumed["best_on_val"] == whole["best_on_val"]
    assert resumed["metrics"] == whole["metrics"]
    a, b = (_stage_file(tmp_path / d / "stages/stage1.pt") for d in ("whole", "cut"))
    assert _equal(a["weights"], b["weights"])
    dice = lambda d: [r["val_dice_raw"] for r in _log(tmp_path / d) if "val_dice_raw" in r]  # noqa: E731
    assert dice("cut") == dice("whole") and len(dice("whole")) == 4


# ------------------------------------------------------------------ curves

def test_curves_of_several_runs_in_one_figure(three_protocols, omf_val, tmp_path, capsys):
    outs, _ = three_protocols
    omf = omf_val[0]
    stem = tmp_path / "fig" / "curves"
    rc = main(["curves", str(outs["honest"]), str(outs["literature"]), str(outs["val"]), str(omf), "--out", str(stem)])
    assert rc == 0
    assert (tmp_path / "fig/curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "fig/curves.pdf").read_bytes()[:5] == b"%PDF-"
    # stage 2 is drawn after stage 1's 4 iterations; the Dice series are the logged ones
    c = load_curves(omf)
    assert c["boundaries"] == [4]
    assert c["series"]["val_dice_raw"] == ([1, 2, 3, 4, 5, 6, 7, 8], SCRIPT["OMFStage1"] + SCRIPT["OMFStage2"])
    assert "test_dice_raw" not in c["series"] and c["series"]["loss"][0] == list(range(1, 9))
    lit = load_curves(outs["literature"])["series"]
    assert lit["test_dice_raw"][0] == [2, 4] and "val_dice_raw" not in lit
    capsys.readouterr()
    rc = main(["curves", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "run folder not found" in err
    assert not list(tmp_path.glob("x.*"))


def test_curves_never_join_one_stage_to_the_next():
    from ssl_bench.curves import by_stage

    assert by_stage([2, 4, 6, 8], [0.1, 0.2, 0.3, 0.4], [4]) == [([2, 4], [0.1, 0.2]), ([6, 8], [0.3, 0.4])]
    assert by_stage([1, 2], [0.5, 0.6], []) == [([1, 2], [0.5, 0.6])]


def test_a_val_stage2_refuses_a_teacher_with_other_validation_cases(tiny_root, tmp_path):
    def cfg(method, **kw):
        return build_config(method, "smoke", labeled=4, iterations=1, patch=PATCH, n_filters=2, device="cpu",
                            eval_cases=1, protocol="val", selection_every=1, checkpoint_every=1000, **kw)

    run_training(cfg("omf-s1-orgloss", val_cases=2), tmp_path / "s1", tiny_root, progress=False)
    with pytest.raises(UserError, match="its val_cases is 2, this run's is 3"):
        run_training(cfg("omf", val_cases=3, teacher=str(tmp_path / "s1")), tmp_path / "omf", tiny_root,
                     progress=False)
    assert not (tmp_path / "omf").exists()


# ------------------------------------------------------------------ the report's selection table



def _val_folder(runs: Path, seed: int, val_lcc: float, last_lcc: float, iteration: int) -> None:
    """A finished val run folder for the fixture's omf cell (made from its literature run): LCC Dice as given."""
    dst = runs / f"omf-L8-s{seed}-val"
    shutil.copytree(FIX / "runs" / "omf-L8-s1-literature", dst)
    summary = json.loads((dst / "summary.json").read_text())
    summary.update(seed=seed, protocol="val", best_on_test=None, checkpoint={"stage": 2, "iteration": iteration,
                                                                          "selection": "best-on-val"})
    summary["metrics"]["lcc"]["dice"] = val_lcc
    summary["last"]["metrics"]["lcc"]["dice"] = last_lcc
    (dst / "summary.json").write_text(json.dumps(summary))
    per_case = pd.read_csv(dst / "metrics_per_case.csv")  # its per-case Dice shifted to the summary's mean
    lcc = per_case["post"] == "lcc"
    per_case.loc[lcc, "dice"] += val_lcc - per_case.loc[lcc, "dice"].mean()
    per_case.to_csv(dst / "metrics_per_case.csv", index=False)
    config = json.loads((dst / "config.json").read_text())
    config["config"] = Cell("omf", 8, seed, "val").config().to_json()
    (dst / "config.json").write_text(json.dumps(config))


def test_report_sets_val_beside_honest_and_literature(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    for name in ("omf-L8-s1-honest", "omf-L8-s2-honest", "omf-L8-s1-literature"):
        shutil.copytree(FIX / "runs" / name, runs / name)
    _val_folder(runs, 1, 0.89, 0.88, 4200)  # literature s1: selected .90, its last .88 (LCC)
    _val_folder(runs, 2, 0.87, 0.86, 5000)
    exp = tmp_path / "exp.toml"
    exp.write_text('title = "val"\npaper = "table1"\nseeds = [1, 2]\nprotocols = ["honest", "literature", "val"]\n'
                   '[[grid]]\nmethods = ["omf"]\nlabeled = [8]\n')
    written = write_report(exp, runs, tmp_path / "out", echo=lambda *_: None)
    md = written["table.md"].read_text()
    val_rows = md_section_rows(md, "## Protocol: val")
    assert val_rows[0][:8] == ["OMF", "8", "72", "val", "tf32", "yes", "2", "88.00 ± 1.41"]
    # by protocol: honest .875/.885, literature .90 (one seed), val .89/.87
    assert md_section_rows(md, "Dice (%) by protocol") == [
        ["OMF", "8", "tf32", "88.00 ± 0.71", "90.00", "88.00 ± 1.41", "2/2 / 1/2 / 2/2"]]
    # last = the val runs' last (.88, .86) -> 87.00 ± 1.41; val 88.00; test (literature only) 90.00
    rows = md_section_rows(md, "Last: the val runs'")
    assert rows == [["OMF", "8", "tf32", "yes", "2 / 1", "4200, 5000", "87.00 ± 1.41", "88.00 ± 1.41", "90.00",
                     "+1.00", "+3.00", "+2.00"]]
    import pandas as pd

    sel = pd.read_csv(written["selection.csv"]).iloc[0]
    assert (sel.method, sel.post, sel.n_val, sel.n_literature) == ("omf", "lcc", 2, 1)
    assert sel.last_dice_mean == pytest.approx(87.0) and sel.val_dice_mean == pytest.approx(88.0)
    assert sel.test_dice_mean == pytest.approx(90.0) and sel.test_minus_val == pytest.approx(2.0)
    assert "tf32" in written["table.tex"].read_text() and "Val-selected" in written["table.tex"].read_text()


def test_the_main_table_names_each_rows_precision(tmp_path):
    runs = tmp_path / "runs"
    for seed in (1, 2):
        dst = runs / f"vnet-L8-s{seed}-honest-bf16"
        shutil.copytree(FIX / "runs" / f"vnet-L8-s{seed}-honest", dst)
        config = json.loads((dst / "config.json").read_text())
        config["config"] = Cell("vnet", 8, seed, "honest", precision="bf16").config().to_json()
        (dst / "config.json").write_text(json.dumps(config))
    exp = tmp_path / "exp.toml"
    exp.write_text('seeds = [1, 2]\nprecision = "bf16"\n[[grid]]\nmethods = ["vnet"]\nlabeled = [8]\n')
    written = write_report(exp, runs, tmp_path / "out", echo=lambda *_: None)
    row = md_section_rows(written["table.md"].read_text(), "## Protocol: honest")[0]
    assert row[:7] == ["V-Net", "8", "0", "honest", "bf16", "no", "2"]
    assert r"V-Net & 8 & 0 & honest & bf16 & no & 2" in written["table.tex"].read_text()
