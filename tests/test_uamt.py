"""UA-MT (docs/methods.md §3.2): threshold, mask, entropy, consistency, EMA warm-up, teacher, end to end."""
import json
import math

import pytest
import torch
from torch import nn

from methods.uamt import (UAMT, certainty_mask, consistency_weight, masked_consistency, mc_uncertainty,
                          teacher_noise, uncertainty_threshold)
from ssl_bench.data import Batch
from ssl_bench.method import StageContext

LN2 = math.log(2.0)


# --------------------------------------------------------------------------- threshold and mask (items 4)


def test_threshold_ramps_from_three_quarters_ln2_to_ln2():
    # H = (0.75 + 0.25·exp(-5·(1 - t/L)²))·ln 2 with L = 6000, by hand:
    assert uncertainty_threshold(0, 6000) == pytest.approx((0.75 + 0.25 * 0.006737947) * LN2, abs=1e-9)
    assert uncertainty_threshold(0, 6000) == pytest.approx(0.52102798, abs=1e-8)
    assert uncertainty_threshold(3000, 6000) == pytest.approx((0.75 + 0.25 * 0.286504797) * LN2, abs=1e-9)
    assert uncertainty_threshold(3000, 6000) == pytest.approx(0.56950788, abs=1e-8)
    assert uncertainty_threshold(6000, 6000) == pytest.approx(LN2, abs=1e-12)
    assert uncertainty_threshold(9000, 6000) == pytest.approx(LN2, abs=1e-12)  # clipped


def test_mask_keeps_only_voxels_below_the_threshold():
    u = torch.tensor([0.0, 0.52, 0.53, 0.60, 0.69, 0.6931])
    assert certainty_mask(u, 0, 6000).tolist() == [1, 1, 0, 0, 0, 0]      # H ≈ 0.5210
    assert certainty_mask(u, 3000, 6000).tolist() == [1, 1, 1, 0, 0, 0]   # H ≈ 0.5695
    assert certainty_mask(u, 6000, 6000).tolist() == [1, 1, 1, 1, 1, 1]   # H = ln 2 ≈ 0.693147
    assert certainty_mask(torch.tensor([LN2]), 6000, 6000).tolist() == [0]  # strict inequality


# --------------------------------------------------------------------------- MC uncertainty (item 3)


class _Recorder(nn.Module):
    """Teacher stub: logits (0, 0) for a sample of mean < 5 (uniform), (20, -20) otherwise (certain)."""

    def __init__(self):
        super().__init__()
        self.inputs = []

    def forward(self, x):
        self.inputs.append(x.clone())
        a = (x.mean(dim=(1, 2, 3, 4)) > 5).float() * 20.0
        a = a.view(-1, 1, 1, 1, 1).expand(x.shape[0], 1, *x.shape[2:])
        return torch.cat([a, -a], dim=1)


def test_mc_uncertainty_batches_four_duplicated_noisy_forwards():
    x_u = torch.cat([torch.zeros(1, 1, 4, 4, 2), torch.full((1, 1, 4, 4, 2), 10.0)])
    teacher = _Recorder()
    u = mc_uncertainty(teacher, x_u)
    assert u.shape == (2, 1, 4, 4, 2)
    # T = 8 passes as 4 forwards of the 2 inputs duplicated, each with fresh clipped noise
    assert len(teacher.inputs) == 4
    dup = x_u.repeat(2, 1, 1, 1, 1)
    noises = [inp - dup for inp in teacher.inputs]
    for n in noises:
        assert n.shape == (4, 1, 4, 4, 2)
        assert n.abs().max() <= 0.2 + 1e-6
        assert n.abs().max() > 0
        assert not torch.equal(n[:2], n[2:])  # the duplicates get different noise
    assert not torch.equal(noises[0], noises[1])
    # sample 0 always uniform -> maximal entropy ln 2 (the +1e-6 makes it a hair smaller);
    # sample 1 always certain -> 0: the passes are averaged per sample, not across samples
    assert u[0].max() <= LN2
    assert u[0].min() == pytest.approx(LN2, abs=1e-5)
    assert u[1].abs().max() < 1e-5


def test_entropy_never_exceeds_ln2():
    torch.manual_seed(0)

    class Random(nn.Module):
        def forward(self, x):
            return torch.randn(x.shape[0], 2, *x.shape[2:]) * 3

    u = mc_uncertainty(Random(), torch.zeros(2, 1, 6, 6, 4))
    assert u.max() <= LN2
    assert u.min() >= -1e-5


def test_noise_is_clipped_gaussian():
    torch.manual_seed(1)
    n = teacher_noise(torch.zeros(200_000))
    assert n.abs().max() <= 0.2
    clipped = (n.abs() == 0.2).float().mean().item()
    assert 0.03 < clipped < 0.07  # P(|N(0, 0.1²)| > 0.2) ≈ 4.6 %
    assert 0.085 < n.std().item() < 0.1
    assert abs(n.mean().item()) < 0.002


# --------------------------------------------------------------------------- consistency and weight (items 5, 7)


def test_masked_consistency_by_hand():
    ln3 = math.log(3.0)
    # two voxels: student p = (.5,.5) and (.75,.25); teacher p = (.75,.25) and (.75,.25)
    s = torch.tensor([0.0, ln3]).view(1, 1, 1, 1, 2)
    s = torch.cat([s, torch.zeros_like(s)], dim=1)
    t = torch.full((1, 1, 1, 1, 2), ln3)
    t = torch.cat([t, torch.zeros_like(t)], dim=1)
    # squared differences summed over both channels: voxel a 0.0625 + 0.0625 = 0.125, voxel b 0
    mask = lambda a, b: torch.tensor([a, b], dtype=torch.float32).view(1, 1, 1, 1, 2)
    assert masked_consistency(s, t, mask(1, 1)).item() == pytest.approx(0.125 / 4)
    assert masked_consistency(s, t, mask(1, 0)).item() == pytest.approx(0.125 / 2)
    assert masked_consistency(s, t, mask(0, 1)).item() == 0.0
    assert masked_consistency(s, t, mask(0, 0)).item() == 0.0  # not NaN


def test_consistency_weight_ramp():
    assert consistency_weight(0) == pytest.approx(0.1 * math.exp(-5))
    assert consistency_weight(149) == pytest.approx(0.1 * math.exp(-5))       # t = it0 // 150
    assert consistency_weight(3000) == pytest.approx(0.1 * math.exp(-1.25))   # t = 20 of 40
    assert consistency_weight(5999) == pytest.approx(0.1 * math.exp(-5 / 1600))
    assert consistency_weight(6000) == pytest.approx(0.1)


# --------------------------------------------------------------------------- EMA (item 8)


def _pair():
    torch.manual_seed(2)
    s = nn.Sequential(nn.Conv3d(1, 2, 1), nn.BatchNorm3d(2))
    t = nn.Sequential(nn.Conv3d(1, 2, 1), nn.BatchNorm3d(2))
    s[1].running_mean.fill_(5.0)
    return {"student": s, "teacher": t}


def test_ema_warm_up_and_cap():
    stage = UAMT(StageContext(labeled=8, patch=(16, 16, 16), n_filters=2))
    nets = _pair()
    stage.after_step(nets, 0)  # α = 0: exact copy of the parameters
    for pt, ps in zip(nets["teacher"].parameters(), nets["student"].parameters()):
        assert torch.equal(pt, ps)
    assert torch.equal(nets["teacher"][1].running_mean, torch.zeros(2))  # buffers are not averaged

    for it0, alpha in ((9, 0.9), (49, 0.98), (99, 0.99), (1000, 0.99)):
        nets = _pair()
        before = [p.clone() for p in nets["teacher"].parameters()]
        stage.after_step(nets, it0)
        for b, pt, ps in zip(before, nets["teacher"].parameters(), nets["student"].parameters()):
            assert torch.allclose(pt, alpha * b + (1 - alpha) * ps, atol=1e-7)


# --------------------------------------------------------------------------- the stage


def _batch(size=16, requires_grad=False):
    torch.manual_seed(3)
    image = torch.randn(4, 1, size, size, size, requires_grad=requires_grad)
    label = torch.zeros(2, size, size, size, dtype=torch.long)
    label[:, 4:12, 4:12, 4:12] = 1
    return Batch(image=image, label=label, n_labeled=2)


def test_teacher_gets_no_gradient_and_stays_in_train_mode():
    stage = UAMT(StageContext(labeled=8, patch=(16, 16, 16), n_filters=2))
    torch.manual_seed(0)
    nets = stage.networks()
    assert set(nets) == {"student", "teacher"} and stage.trained == "student"
    assert all(not p.requires_grad for p in nets["teacher"].parameters())
    stage.train_modes(nets)
    assert nets["teacher"].training and nets["student"].training
    loss, parts = stage.losses("main", nets, _batch(), it0=6000)
    loss.backward()
    assert all(p.grad is None for p in nets["teacher"].parameters())
    assert all(p.grad is not None for p in nets["student"].parameters())
    assert parts["threshold"] == pytest.approx(LN2)
    assert torch.isfinite(loss)


def test_consistency_uses_only_the_unlabeled_samples():
    stage = UAMT(StageContext(labeled=8, patch=(16, 16, 16), n_filters=2))
    # per-voxel stubs (no BatchNorm mixing the samples); a confident teacher so that the mask is on
    student = nn.Conv3d(1, 2, 1)
    teacher = nn.Conv3d(1, 2, 1)
    with torch.no_grad():
        teacher.weight.copy_(torch.tensor([5.0, -5.0]).view(2, 1, 1, 1, 1))
        teacher.bias.zero_()
    teacher.requires_grad_(False)
    nets = {"student": student, "teacher": teacher}

    batch = _batch(requires_grad=True)
    torch.manual_seed(7)
    _, parts = stage.losses("main", nets, batch, it0=6000)
    assert parts["mask_frac"] > 0.5 and parts["loss_cons"] > 0
    parts["loss_cons"].backward()
    assert batch.image.grad[:2].abs().max() == 0       # labeled inputs do not enter L_c
    assert batch.image.grad[2:].abs().max() > 0

    changed = Batch(image=batch.image.detach().clone(), label=batch.label, n_labeled=2)
    changed.image[:2] = torch.randn_like(changed.image[:2]) * 5
    torch.manual_seed(7)
    _, parts2 = stage.losses("main", nets, changed, it0=6000)
    assert parts2["loss_cons"].item() == parts["loss_cons"].item()
    assert parts2["ce"].item() != parts["ce"].item()


def test_threshold_length_is_the_stage_run_length():
    assert UAMT(StageContext(labeled=8, patch=(16, 16, 16))).total_iterations() == 6000
    ctx = StageContext(labeled=8, patch=(16, 16, 16), n_filters=2, iterations=12)
    assert UAMT(ctx).total_iterations() == 12


def test_declared_schedule():
    assert (UAMT.iterations, UAMT.batch_labeled, UAMT.batch_unlabeled, UAMT.base_lr) == (6000, 2, 2, 0.01)
    assert UAMT.paper_lcc is False and UAMT.literature_selection is None and UAMT.phases == ("main",)


# --------------------------------------------------------------------------- end to end


def test_uamt_smoke_run_end_to_end(la_root, tmp_path):
    from ssl_bench.cli import main

    out = tmp_path / "r"
    rc = main(["run", "--method", "uamt", "--profile", "smoke", "--iterations", "2", "--eval-cases", "1", "--data", str(la_root),
               "--out", str(out), "--quiet"])
    assert rc == 0
    for name in ("config.json", "log.jsonl", "metrics_per_case.csv", "summary.json", "stages/stage1.pt",
                 "checkpoints/last.pt"):
        assert (out / name).is_file(), name
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2]
    assert {"ce", "dice", "loss_cons", "cons_weight", "threshold", "mask_frac"} <= set(rows[0])
    assert rows[0]["cons_weight"] == pytest.approx(0.1 * math.exp(-5))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "uamt" and summary["paper_post"] == "raw"
    assert summary["checkpoint"] == {"stage": 1, "iteration": 2, "selection": "last"}
    handed = torch.load(out / "stages" / "stage1.pt", map_location="cpu", weights_only=False)
    assert "out_conv.weight" in handed["weights"]  # the student's V-Net head A
