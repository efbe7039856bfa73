"""OMF (docs/methods.md §3.7) and its Table-2 variants: overlay orientation, frozen-teacher wiring, schedules,
every registered name end to end on the real data, and stage-1 reuse through --teacher."""
import json
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from methods.omf import OMFStage1, OMFStage1Overlay, OMFStage2
from ssl_bench.cli import main
from ssl_bench.data import Batch
from ssl_bench.losses import dice_mc
from ssl_bench.method import get_method
from ssl_bench.trainer import Trainer
from stand_ins import S, Recorder, ctx, fg_where_bright, nets_initialised_from_handed, student_fn


def sup(z, y):
    return (F.cross_entropy(z, y) + dice_mc(z, y)) / 2


def test_registered_variants_share_the_right_stage_classes():
    assert get_method("omf").stages == (OMFStage1, OMFStage2)
    assert get_method("omf-s1").stages == (OMFStage1Overlay,)
    assert get_method("omf-s1-orgloss").stages == (OMFStage1,)
    assert get_method("omf-s1-s2").stages == (OMFStage1Overlay, OMFStage2)
    assert OMFStage1.orgloss and not OMFStage1Overlay.orgloss
    assert OMFStage1.__name__ != OMFStage1Overlay.__name__  # --teacher matches stage 1 by class name
    for cls in (OMFStage1Overlay, OMFStage1, OMFStage2):
        assert (cls.iterations, cls.batch_labeled, cls.batch_unlabeled, cls.base_lr) == (15000, 4, 4, 0.1)
        assert cls.literature_selection == (0, 200) and cls.paper_lcc


def test_lr_schedules_at_the_boundaries():
    s1, s2 = OMFStage1(ctx()), OMFStage2(ctx())
    # stage 1: lr(done) is the rate of iteration done+1; the code switches after the step of iteration 10 000
    assert s1.lr(0) == 0.1 and s1.lr(9999) == 0.1
    assert s1.lr(10000) == pytest.approx(0.01) and s1.lr(10001) == pytest.approx(0.01)
    assert s1.lr(14999) == pytest.approx(0.01) and OMFStage1Overlay(ctx()).lr(10000) == pytest.approx(0.01)
    # stage 2: 0.1·0.8^(done // 2500): 0.08 from iteration 2501, 0.064 from 5001
    assert s2.lr(2499) == 0.1
    assert s2.lr(2500) == pytest.approx(0.08) and s2.lr(2501) == pytest.approx(0.08)
    assert s2.lr(5000) == pytest.approx(0.064) and s2.lr(5001) == pytest.approx(0.064)
    assert s2.lr(12500) == pytest.approx(0.1 * 0.8 ** 5)


def _stage1_batch():
    g = torch.Generator().manual_seed(1)
    image = torch.rand(8, 1, S, S, S, generator=g)
    image[0:2] += 10.0  # A images are >= 10, B images < 1: every voxel's source is readable
    label = torch.zeros(4, S, S, S, dtype=torch.long)
    label[0, 1:6, 1:6, 1:6] = 1  # y_A[0]
    label[1, 4:8, 4:8, 4:8] = 1  # y_A[1]
    label[2, 3:9, 3:9, 3:9] = 1  # y_B[0], overlaps y_A[0] partly
    label[3, 0:2, 0:2, 0:2] = 1  # y_B[1], disjoint from y_A[1]
    return Batch(image, label, 4)


@pytest.mark.parametrize("cls", [OMFStage1, OMFStage1Overlay])
def test_stage1_overlay_orientation_and_losses(cls):
    batch = _stage1_batch()
    net = Recorder(student_fn)
    loss, logs = cls(ctx()).losses("main", {"student": net}, batch, 0)
    x, y = batch.labeled_image, batch.label
    a, b, y_a, y_b = x[0:2], x[2:4], y[0:2], y[2:4]
    x_ov = a * y_a[:, None] + b * (1 - y_a[:, None])  # A's atrium pasted onto B
    assert torch.equal(net.inputs[0], x_ov)
    assert int((net.inputs[0] >= 10).sum()) == int(y_a.sum())  # exactly A's atrium comes from A
    y_ov = ((y_a + y_b) > 0).long()  # union of both atria
    expect = sup(student_fn(x_ov), y_ov)
    assert float(logs["loss_ov"].detach()) == pytest.approx(float(expect), rel=1e-6)
    if cls.orgloss:  # three forwards of 2: overlay, A, B
        assert len(net.inputs) == 3 and torch.equal(net.inputs[1], a) and torch.equal(net.inputs[2], b)
        expect = expect + sup(student_fn(a), y_a) + sup(student_fn(b), y_b)
    else:
        assert len(net.inputs) == 1
    assert float(loss.detach()) == pytest.approx(float(expect), rel=1e-6)


def test_stage2_mantle_orientation_and_loss():
    g = torch.Generator().manual_seed(2)
    image = torch.rand(8, 1, S, S, S, generator=g) * 0.4  # all below the teacher's 0.5
    q_p = image[4:8]
    # P[0]: a 4³ bright box (its pseudo-atrium) and a lone bright voxel that LCC removes; P[1]: none (empty)
    q_p[2, 0, 2:6, 2:6, 2:6] = 1.0
    q_p[2, 0, 9, 9, 9] = 1.0
    q_p[0, 0, 7:10, 7:10, 7:10] = 0.9  # Q[0] has its own bright region: the teacher target from clean Q
    batch = Batch(image, (torch.rand(4, S, S, S, generator=g) > 0.5).long(), 4)
    teacher, student = Recorder(fg_where_bright), Recorder(student_fn)
    loss, logs = OMFStage2(ctx()).losses("main", {"student": student, "teacher": teacher}, batch, 0)
    q, p = batch.unlabeled_image[0:2], batch.unlabeled_image[2:4]
    assert len(teacher.inputs) == 2 and torch.equal(teacher.inputs[0], q) and torch.equal(teacher.inputs[1], p)
    y_p = torch.zeros(2, 1, S, S, S)
    y_p[0, 0, 2:6, 2:6, 2:6] = 1  # the largest component only; sample 1 stays empty
    x_mix = p * y_p + q * (1 - y_p)  # P's pseudo-atrium pasted onto Q
    assert len(student.inputs) == 1 and torch.equal(student.inputs[0], x_mix)
    assert student.inputs[0][0, 0, 9, 9, 9] == q[0, 0, 9, 9, 9]  # P's small blob did not survive LCC
    assert torch.equal(student.inputs[0][1], q[1])
    mse = (torch.softmax(student_fn(x_mix), 1) - torch.softmax(fg_where_bright(q), 1)) ** 2
    assert float(logs["loss_a"].detach()) == pytest.approx(float(mse.mean()), rel=1e-6)
    assert float(loss.detach()) == pytest.approx(1.7 * float(mse.mean()), rel=1e-6)


def test_stage2_teacher_is_frozen_in_train_mode():
    stage = OMFStage2(ctx((16, 16, 16)))
    nets, handed = nets_initialised_from_handed(stage)
    teacher_params = {k: v.clone() for k, v in nets["teacher"].named_parameters()}
    opts = stage.optimizers(nets)
    assert set(opts) == {"main"}
    trained = {id(p) for g in opts["main"].param_groups for p in g["params"]}
    assert trained == {id(p) for p in nets["student"].parameters()}
    batch = Batch(torch.randn(8, 1, 16, 16, 16), torch.zeros(4, 16, 16, 16, dtype=torch.long), 4)
    nets["teacher"].eval()  # the trainer's train_modes must put it back in train mode
    Trainer.train_step(SimpleNamespace(_autocast=nullcontext), stage, nets, opts, batch, 0)
    assert nets["teacher"].training
    for k, p in nets["teacher"].named_parameters():
        assert not p.requires_grad and p.grad is None
        assert torch.equal(p, teacher_params[k]), k
    assert any(not torch.equal(p, handed[k]) for k, p in nets["student"].named_parameters())
    # train mode: the teacher's BatchNorm running buffers drift (batch statistics), as in the code
    buffers = [k for k in handed if k.endswith("running_mean")]
    assert buffers and any(not torch.equal(nets["teacher"].state_dict()[k], handed[k]) for k in buffers)


# -- end to end on the real data ------------------------------------------------------------
RUN_ARGS = ["--profile", "smoke", "--iterations", "4", "--eval-cases", "1", "--device", "cpu", "--quiet"]
VARIANTS = {"omf": ("OMFStage1", "OMFStage2"), "omf-s1": ("OMFStage1Overlay",),
            "omf-s1-orgloss": ("OMFStage1",), "omf-s1-s2": ("OMFStage1Overlay", "OMFStage2")}


def run_cli(la_root, out, method, *extra):
    return main(["run", "--method", method, "--data", str(la_root), "--out", str(out), *RUN_ARGS, *extra])


def check_run_folder(out: Path, n_stages: int, iterations: int = 4, trained_stages=None) -> dict:
    for name in ["config.json", "log.jsonl", "metrics_per_case.csv", "summary.json", "checkpoints/last.pt"]:
        assert (out / name).is_file(), name
    for k in range(1, n_stages + 1):
        assert (out / "stages" / f"stage{k}.pt").is_file()
    trained_stages = trained_stages or list(range(1, n_stages + 1))
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert sorted({r["stage"] for r in log}) == trained_stages
    assert all(max(r["iteration"] for r in log if r["stage"] == k) == iterations for k in trained_stages)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["paper_post"] == "lcc" and summary["checkpoint"]["stage"] == n_stages
    assert (out / "metrics_per_case.csv").read_text().count("\n") == 1 + 2  # header + raw and lcc for 1 case
    return summary


@pytest.fixture(scope="module")
def runs(la_root, tmp_path_factory):
    root = tmp_path_factory.mktemp("omf")
    done = {}
    for method in VARIANTS:
        assert run_cli(la_root, root / method, method) == 0, method
        done[method] = root / method
    return done


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", list(VARIANTS))
def test_every_variant_end_to_end(runs, method):
    out = runs[method]
    classes = VARIANTS[method]
    check_run_folder(out, len(classes))
    described = json.loads((out / "config.json").read_text())["method"]["stages"]
    assert tuple(s["stage"] for s in described) == classes
    for k, cls in enumerate(classes, start=1):
        handed = torch.load(out / "stages" / f"stage{k}.pt", map_location="cpu", weights_only=False)
        assert handed["stage_class"] == cls
        rows = [r for r in _log(out) if r["stage"] == k]
        if cls == "OMFStage1":
            assert all({"loss_ov", "loss_a", "loss_b"} <= r.keys() for r in rows)
        elif cls == "OMFStage1Overlay":
            assert all("loss_ov" in r and "loss_a" not in r for r in rows)
        else:
            assert all("loss_a" in r for r in rows)
        assert all(r["lr"] == 0.1 for r in rows)


def _weights(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)["weights"]


def test_s1_s2_reuses_an_omf_s1_teacher(runs, la_root, tmp_path):
    out = tmp_path / "s1s2"
    assert run_cli(la_root, out, "omf-s1-s2", "--teacher", str(runs["omf-s1"])) == 0
    check_run_folder(out, 2, trained_stages=[2])  # stage 1 adopted, not trained
    mine, theirs = _weights(out / "stages" / "stage1.pt"), _weights(runs["omf-s1"] / "stages" / "stage1.pt")
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in theirs)
    adopted = torch.load(out / "stages" / "stage1.pt", map_location="cpu", weights_only=False)
    assert adopted["adopted_from"] == str(runs["omf-s1"].resolve())


def test_full_omf_refuses_an_overlay_only_teacher(runs, la_root, tmp_path, capsys):
    # `omf` needs the orgloss stage 1 (OMFStage1); an `omf-s1` run holds OMFStage1Overlay
    assert run_cli(la_root, tmp_path / "bad", "omf", "--teacher", str(runs["omf-s1"])) == 2
    assert "OMFStage1Overlay" in capsys.readouterr().err
