"""BCP (docs/methods.md §3.6): cuboid copy-paste wiring, mix_loss weights, schedules, end to end and resume."""
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from methods.bcp import BCPStage1, BCPStage2, mix_loss
from ssl_bench.cli import main
from ssl_bench.data import Batch
from ssl_bench.errors import Interrupted
from ssl_bench.losses import dice_mc
from ssl_bench.method import get_method
from ssl_bench.mixing import cut_mask, random_cut_mask
from ssl_bench.trainer import build_config, run_training
from stand_ins import S, Recorder, ctx, fg_where_bright, nets_initialised_from_handed, student_fn


def test_registration_and_defaults():
    spec = get_method("bcp")
    assert spec.stages == (BCPStage1, BCPStage2)
    for cls in spec.stages:
        assert (cls.batch_labeled, cls.batch_unlabeled, cls.base_lr) == (4, 4, 0.01)
        assert cls.literature_selection == (0, 200) and cls.paper_lcc
    assert (BCPStage1.iterations, BCPStage2.iterations) == (2000, 15000)


def test_lr_schedules():
    s1, s2 = BCPStage1(ctx()), BCPStage2(ctx())
    assert [s1.lr(d) for d in (0, 1999, 2000, 2500, 5000)] == [0.01] * 5  # constant pre-training lr
    assert s2.lr(2499) == 0.01 and s2.lr(2500) == pytest.approx(0.001) and s2.lr(5001) == pytest.approx(1e-4)


def test_mix_loss_in_and_out_weights_hand_computed():
    # constant logits (0, a): p1 = σ(a) everywhere; target_out ≡ 1 (read under M), target_in ≡ 0 (under 1−M)
    a = 0.7
    m = cut_mask((S, S, S), (2, 3, 1))
    n_in = 8 ** 3
    n_out = S ** 3 - n_in
    logits = torch.zeros(2, 2, S, S, S, dtype=torch.float64)
    logits[:, 1] = a
    t_out = torch.ones(2, S, S, S, dtype=torch.long)
    t_in = torch.zeros(2, S, S, S, dtype=torch.long)
    p1 = 1 / (1 + math.exp(-a))
    p0 = 1 - p1
    s = 1e-5
    dice_out = 1 - ((2 * n_out * p1 + s) / (n_out * (p1 + 1) + s) + s / (n_out * p0 + s)) / 2
    dice_in = 1 - ((2 * n_in * p0 + s) / (n_in * (p0 + 1) + s) + s / (n_in * p1 + s)) / 2
    ce_out, ce_in = -math.log(p1), -math.log(p0)
    for w_out, w_in in ((1.0, 0.5), (0.5, 1.0)):
        expect = 0.5 * (w_out * dice_out + w_in * dice_in + w_out * ce_out + w_in * ce_in)
        got = mix_loss(logits, t_out, t_in, m, w_out=w_out, w_in=w_in)
        assert float(got) == pytest.approx(expect, rel=1e-9)
    assert float(mix_loss(logits, t_out, t_in, m, 1.0, 0.5)) != pytest.approx(float(mix_loss(logits, t_out, t_in, m, 0.5, 1.0)))


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(8, 1, S, S, S, generator=g) * 0.4  # all below the teacher's 0.5
    image[4, 0, 1:5, 1:5, 1:5] = 1.0  # U_a[0]: one bright box -> its pseudo-label
    image[7, 0, 6:10, 2:6, 3:9] = 1.0  # U_b[1]
    label = (torch.rand(4, S, S, S, generator=g) > 0.6).long()
    return Batch(image, label, 4)


def test_stage1_mixes_labeled_pairs_with_the_cuboid():
    stage = BCPStage1(ctx())
    batch = _batch()
    student = Recorder(student_fn)
    torch.manual_seed(5)
    loss, _ = stage.losses("main", {"student": student}, batch, 0)
    torch.manual_seed(5)
    m = random_cut_mask((S, S, S)).long()
    l, y = batch.labeled_image, batch.label
    x_expect = l[0:2] * m + l[2:4] * (1 - m)  # X = L_a⊙M + L_b⊙(1−M)
    y_expect = y[0:2] * m + y[2:4] * (1 - m)
    assert len(student.inputs) == 1 and torch.equal(student.inputs[0], x_expect)
    z = student_fn(x_expect)
    assert float(loss.detach()) == pytest.approx(float((F.cross_entropy(z, y_expect) + dice_mc(z, y_expect)) / 2), rel=1e-6)


def test_stage2_bidirectional_copy_paste_wiring():
    stage = BCPStage2(ctx())
    batch = _batch()
    teacher, student = Recorder(fg_where_bright), Recorder(student_fn)
    torch.manual_seed(9)
    loss, logs = stage.losses("main", {"student": student, "teacher": teacher}, batch, 0)
    torch.manual_seed(9)
    m = random_cut_mask((S, S, S)).long()
    l, y, u = batch.labeled_image, batch.label, batch.unlabeled_image
    # the teacher sees U_a then U_b
    assert len(teacher.inputs) == 2
    assert torch.equal(teacher.inputs[0], u[0:2]) and torch.equal(teacher.inputs[1], u[2:4])
    plab_a = torch.zeros(2, S, S, S, dtype=torch.long)
    plab_a[0, 1:5, 1:5, 1:5] = 1
    plab_b = torch.zeros(2, S, S, S, dtype=torch.long)
    plab_b[1, 6:10, 2:6, 3:9] = 1
    x_in = l[0:2] * m + u[0:2] * (1 - m)  # labeled outside, unlabeled cuboid
    x_out = u[2:4] * m + l[2:4] * (1 - m)  # unlabeled outside, labeled cuboid
    assert len(student.inputs) == 2
    assert torch.equal(student.inputs[0], x_in) and torch.equal(student.inputs[1], x_out)
    loss_in = mix_loss(student_fn(x_in), y[0:2], plab_a, m, 1.0, 0.5)
    loss_out = mix_loss(student_fn(x_out), plab_b, y[2:4], m, 0.5, 1.0)
    assert float(logs["loss_l"].detach()) == pytest.approx(float(loss_in), rel=1e-6)
    assert float(logs["loss_u"].detach()) == pytest.approx(float(loss_out), rel=1e-6)
    assert float(loss.detach()) == pytest.approx(float(loss_in + loss_out), rel=1e-6)


def test_stage2_teacher_init_and_fixed_ema():
    stage = BCPStage2(ctx((16, 16, 16)))
    nets, handed = nets_initialised_from_handed(stage)
    assert not any(p.requires_grad for p in nets["teacher"].parameters())
    with torch.no_grad():
        for p in nets["student"].parameters():
            p.add_(1.0)
    stage.after_step(nets, 0)
    for (k, t), s in zip(nets["teacher"].named_parameters(), nets["student"].parameters()):
        assert torch.allclose(t, 0.99 * handed[k] + 0.01 * s)


# -- end to end on the real data ------------------------------------------------------------
RUN_ARGS = ["--profile", "smoke", "--iterations", "4", "--eval-cases", "1", "--device", "cpu", "--quiet"]


def check_run_folder(out: Path, n_stages: int, iterations: int = 4) -> dict:
    for name in ["config.json", "log.jsonl", "metrics_per_case.csv", "summary.json", "checkpoints/last.pt"]:
        assert (out / name).is_file(), name
    for k in range(1, n_stages + 1):
        assert (out / "stages" / f"stage{k}.pt").is_file()
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert sorted({r["stage"] for r in log}) == list(range(1, n_stages + 1))
    assert all(max(r["iteration"] for r in log if r["stage"] == k) == iterations for k in range(1, n_stages + 1))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["paper_post"] == "lcc" and summary["checkpoint"]["stage"] == n_stages
    assert (out / "metrics_per_case.csv").read_text().count("\n") == 1 + 2  # header + raw and lcc for 1 case
    return summary


@pytest.fixture(scope="module")
def bcp_run(la_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("bcp") / "run"
    assert main(["run", "--method", "bcp", "--data", str(la_root), "--out", str(out), *RUN_ARGS]) == 0
    return out


def test_bcp_end_to_end(bcp_run):
    check_run_folder(bcp_run, 2)
    stages = json.loads((bcp_run / "config.json").read_text())["method"]["stages"]
    assert [s["stage"] for s in stages] == ["BCPStage1", "BCPStage2"]
    log = [json.loads(line) for line in (bcp_run / "log.jsonl").read_text().splitlines()]
    assert all(r["lr"] == 0.01 for r in log)  # 4 iterations: below the first ×0.1 step
    assert all("loss_l" in r and "loss_u" in r for r in log if r["stage"] == 2)


def _weights(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)["weights"]


def test_interrupted_and_resumed_across_the_stage_boundary_is_exact(bcp_run, la_root, tmp_path):
    # same settings as the CLI run above; interrupted in stage 1 and again in stage 2, resumed each time
    cfg = build_config("bcp", "smoke", iterations=4, eval_cases=1, device="cpu")
    out = tmp_path / "resumed"
    with pytest.raises(Interrupted):
        run_training(cfg, out, la_root, progress=False, stop_at=(1, 2))
    assert not (out / "stages" / "stage1.pt").exists()
    with pytest.raises(Interrupted):
        run_training(cfg, out, la_root, resume=True, progress=False, stop_at=(2, 3))
    assert (out / "stages" / "stage1.pt").is_file() and not (out / "stages" / "stage2.pt").exists()
    run_training(cfg, out, la_root, resume=True, progress=False)
    check_run_folder(out, 2)
    for k in (1, 2):
        mine, ref = _weights(out / "stages" / f"stage{k}.pt"), _weights(bcp_run / "stages" / f"stage{k}.pt")
        assert mine.keys() == ref.keys()
        for name in ref:
            assert torch.equal(mine[name], ref[name]), (k, name)


def _reference_update_ema_variables(model, ema_model, alpha):
    """BCP's ``update_ema_variables`` (code/LA_BCP_train.py), transcribed: one parameter at a time, non-fused."""
    for ema_param, param in zip(ema_model.parameters(), model.parameters()):
        ema_param.data.mul_(alpha).add_((1 - alpha) * param.data)


def test_stage2_ema_is_bcps_own_arithmetic_bit_for_bit():
    """After 30 steps the teacher is bit-identical to BCP's non-fused update, and not to the fused one (UA-MT's):
    the two round differently (issue 23)."""
    import copy

    stage = BCPStage2(ctx((16, 16, 16)))
    nets, _ = nets_initialised_from_handed(stage)
    reference, fused = copy.deepcopy(nets["teacher"]), copy.deepcopy(nets["teacher"])
    gen = torch.Generator().manual_seed(3)
    for it0 in range(30):
        with torch.no_grad():  # a student that moves like a trained one: small steps of every parameter
            for p in nets["student"].parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=gen))
        stage.after_step(nets, it0)
        _reference_update_ema_variables(nets["student"], reference, 0.99)
        with torch.no_grad():
            for t, s in zip(fused.parameters(), nets["student"].parameters()):
                t.mul_(0.99).add_(s, alpha=1 - 0.99)
    ours = list(nets["teacher"].parameters())
    assert all(torch.equal(a, b) for a, b in zip(ours, reference.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(ours, fused.parameters()))  # the test can tell them apart
