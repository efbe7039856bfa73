"""SASSNet (docs/methods.md §3.3): discriminator, targets, phases, loss composition, λ, end to end."""
import json
import math
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from methods.sassnet import FC3DDiscriminator, SASSNet, discriminator_pool
from ssl_bench.data import Batch
from ssl_bench.errors import UserError
from ssl_bench.losses import dice_fg_sq, signed_distance_target
from ssl_bench.method import StageContext
from ssl_bench.trainer import Trainer

PATCH = (16, 16, 16)


def _stage(labeled=8, options=None, patch=PATCH):
    return SASSNet(StageContext(labeled=labeled, patch=patch, n_filters=2, options=options or {}))


def _nets(stage):
    """The stage's networks with a narrower D (ndf 8 instead of 64: same structure, a fraction of the CPU)."""
    torch.manual_seed(0)
    nets = stage.networks()
    assert isinstance(nets["disc"], FC3DDiscriminator) and nets["disc"].pool.kernel_size == (1, 1, 1)
    nets["disc"] = FC3DDiscriminator(patch=PATCH, ndf=8)
    return nets


def _batch():
    torch.manual_seed(3)
    image = torch.randn(4, 1, *PATCH)
    label = torch.zeros(2, *PATCH, dtype=torch.long)
    label[:, 4:12, 4:12, 5:11] = 1
    return Batch(image=image, label=label, n_labeled=2)


# --------------------------------------------------------------------------- discriminator


def test_discriminator_parameter_count():
    # conv_map, conv_image 1·64·64+64 each; 64·128·64+128; 128·256·64+256; 256·512·64+512; 512·2+2
    assert sum(p.numel() for p in FC3DDiscriminator().parameters()) == 11_020_290


def test_pool_kernel_derives_from_the_patch():
    assert discriminator_pool((112, 112, 80)) == (7, 7, 5)  # the reference's AvgPool3d((7, 7, 5))
    assert discriminator_pool((48, 48, 32)) == (3, 3, 2)
    with pytest.raises(ValueError):
        discriminator_pool((40, 48, 32))


def test_discriminator_at_the_reference_patch_pools_like_avgpool_7_7_5():
    torch.manual_seed(0)
    d = FC3DDiscriminator(patch=(112, 112, 80), ndf=2).eval()  # narrow width: same shapes, cheap
    assert d.pool.kernel_size == (7, 7, 5)
    sdm, img = torch.rand(1, 1, 112, 112, 80) * 2 - 1, torch.randn(1, 1, 112, 112, 80)
    with torch.no_grad():
        feats = d.features(sdm, img)
        out = d(sdm, img)
        expected = d.classifier(nn.AvgPool3d((7, 7, 5))(feats).reshape(1, -1))
    assert feats.shape == (1, 16, 7, 7, 5)
    assert out.shape == (1, 2)
    assert torch.allclose(out, expected, atol=1e-6)
    assert torch.allclose(out, d.classifier(feats.mean(dim=(2, 3, 4))), atol=1e-5)  # whole remaining extent


def test_discriminator_at_the_smoke_patch():
    torch.manual_seed(0)
    d = FC3DDiscriminator(patch=(48, 48, 32), ndf=4)
    x = torch.randn(4, 1, 48, 48, 32)
    assert d.features(x, x).shape == (4, 32, 3, 3, 2)
    assert d(x, x).shape == (4, 2)


def test_discriminator_targets():
    assert SASSNet.discriminator_targets(2, 2).tolist() == [1, 1, 0, 0]


# --------------------------------------------------------------------------- adversarial weight


def test_adversarial_weight_per_label_count():
    s8, s16 = _stage(8), _stage(16)
    assert s8.consistency == 0.015 and s16.consistency == 0.01
    assert s8.adversarial_weight(0) == pytest.approx(0.015 * math.exp(-5))
    assert s8.adversarial_weight(3000) == pytest.approx(0.015 * math.exp(-1.25))
    assert s8.adversarial_weight(6000) == pytest.approx(0.015)
    assert s16.adversarial_weight(6000) == pytest.approx(0.01)
    assert s16.adversarial_weight(0) == pytest.approx(0.01 * math.exp(-5))
    assert _stage(4).consistency == 0.01  # every other count: the script's default
    assert _stage(16, {"consistency": 0.05}).adversarial_weight(6000) == pytest.approx(0.05)
    with pytest.raises(UserError):
        _stage(8, {"consistency": "lots"})
    with pytest.raises(UserError):
        _stage(8, {"consistency": -1})


# --------------------------------------------------------------------------- losses


def test_main_phase_loss_omits_the_bce_and_fools_d():
    stage = _stage()
    nets = _nets(stage)
    batch = _batch()
    stage.train_modes(nets)
    torch.manual_seed(11)
    loss, p = stage.losses("main", nets, batch, it0=6000)
    assert nets["seg"].training and not nets["disc"].training
    assert p["adv_weight"] == pytest.approx(0.015)
    assert loss.item() == pytest.approx((p["dice"] + 0.3 * p["sdf"] + 0.015 * p["loss_adv"]).item(), abs=1e-6)
    assert p["bce"].item() > 0.1  # logged, and adding it would change the total
    assert abs(loss.item() - (p["dice"] + 0.3 * p["sdf"] + 0.015 * p["loss_adv"] + p["bce"]).item()) > 0.1

    # recompute by hand with the same random draws (seg dropout): targets 1 for the unlabeled half
    torch.manual_seed(11)
    sdm, logit = nets["seg"](batch.image)
    assert p["dice"].item() == pytest.approx(
        dice_fg_sq(torch.sigmoid(logit[:2, 0]), batch.label.float()).item(), abs=1e-6)
    assert p["sdf"].item() == pytest.approx(
        F.mse_loss(sdm[:2, 0], signed_distance_target(batch.label)).item(), abs=1e-6)
    d_out = nets["disc"](sdm[2:], batch.image[2:])
    assert p["loss_adv"].item() == pytest.approx(F.cross_entropy(d_out, torch.tensor([1, 1])).item(), abs=1e-6)


def test_disc_phase_targets_labeled_one_unlabeled_zero():
    stage = _stage()
    nets = _nets(stage)
    batch = _batch()
    torch.manual_seed(5)
    loss, _ = stage.losses("disc", nets, batch, it0=0)
    assert not nets["seg"].training and nets["disc"].training
    torch.manual_seed(5)
    with torch.no_grad():
        sdm, _ = nets["seg"](batch.image)
    d_out = nets["disc"](sdm, batch.image)  # same dropout draws as inside losses()
    assert loss.item() == pytest.approx(F.cross_entropy(d_out, torch.tensor([1, 1, 0, 0])).item(), abs=1e-6)
    assert loss.item() != pytest.approx(F.cross_entropy(d_out, torch.tensor([0, 0, 1, 1])).item(), abs=1e-6)


def _snapshot(net):
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def test_each_phase_updates_only_its_network_through_the_trainer_step():
    stage = _stage()
    nets = _nets(stage)
    opts = stage.optimizers(nets)
    assert isinstance(opts["main"], torch.optim.SGD) and isinstance(opts["disc"], torch.optim.Adam)
    g = opts["disc"].param_groups[0]
    assert (g["lr"], g["betas"], g["weight_decay"]) == (1e-4, (0.9, 0.99), 0.0)
    assert {id(p) for p in opts["main"].param_groups[0]["params"]} == {id(p) for p in nets["seg"].parameters()}

    snaps = {"start": (_snapshot(nets["seg"]), _snapshot(nets["disc"]))}
    original = stage.losses

    def recording(phase, nets_, batch, it0):
        snaps[phase] = (_snapshot(nets_["seg"]), _snapshot(nets_["disc"]))
        return original(phase, nets_, batch, it0)

    stage.losses = recording
    # the real trainer step (its only use of `self` is the autocast context)
    logs = Trainer.train_step(SimpleNamespace(_autocast=nullcontext), stage, nets, opts, _batch(), 0)
    end = (_snapshot(nets["seg"]), _snapshot(nets["disc"]))
    assert {"loss", "loss_disc", "bce", "d_acc"} <= set(logs)

    # main phase: the seg net moved, D did not
    assert not _same(snaps["start"][0], snaps["disc"][0])
    assert _same(snaps["start"][1], snaps["disc"][1])
    # disc phase: D moved, the seg net (weights and BN statistics: eval mode) did not
    assert not _same(snaps["disc"][1], end[1])
    assert _same(snaps["disc"][0], end[0])


def test_foreground_probability_is_the_sigmoid_of_the_seg_head():
    stage = _stage()
    torch.manual_seed(0)
    net = stage.networks()["seg"].eval()
    x = torch.randn(1, 1, *PATCH)
    with torch.no_grad():
        prob = stage.foreground_probability(net, x)
        expected = torch.sigmoid(net(x)[1])[:, 0]
    assert prob.shape == (1, *PATCH)
    assert torch.equal(prob, expected)


def test_declared_schedule():
    assert (SASSNet.iterations, SASSNet.batch_labeled, SASSNet.batch_unlabeled, SASSNet.base_lr) == (6000, 2, 2, 0.01)
    assert SASSNet.phases == ("main", "disc") and SASSNet.trained == "seg"
    assert SASSNet.paper_lcc is False and SASSNet.literature_selection is None


# --------------------------------------------------------------------------- end to end


def test_sassnet_smoke_run_end_to_end(la_root, tmp_path):
    from ssl_bench.cli import main

    out = tmp_path / "r"
    rc = main(["run", "--method", "sassnet", "--profile", "smoke", "--iterations", "2", "--eval-cases", "1",
               "--data", str(la_root), "--out", str(out), "--quiet"])
    assert rc == 0
    for name in ("config.json", "log.jsonl", "metrics_per_case.csv", "summary.json", "stages/stage1.pt",
                 "checkpoints/last.pt"):
        assert (out / name).is_file(), name
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2]
    assert {"loss", "loss_disc", "bce", "dice", "sdf", "loss_adv", "adv_weight", "d_acc"} <= set(rows[0])
    assert rows[0]["adv_weight"] == pytest.approx(0.015 * math.exp(-5))
    config = json.loads((out / "config.json").read_text())
    assert config["method"]["stages"][0]["phases"] == ["main", "disc"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "sassnet" and summary["paper_post"] == "raw"
    assert summary["checkpoint"] == {"stage": 1, "iteration": 2, "selection": "last"}
    handed = torch.load(out / "stages" / "stage1.pt", map_location="cpu", weights_only=False)
    assert "seg_conv.weight" in handed["weights"] and "sdm_conv.weight" in handed["weights"]
    assert not any(k.startswith("conv_map") for k in handed["weights"])  # D is not handed on
    ckpt = torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    assert set(ckpt["optimizers"]) == {"main", "disc"}
