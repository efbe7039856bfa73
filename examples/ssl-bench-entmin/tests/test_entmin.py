"""The example plugin's own tests: its loss against the formulas written out here, and the contract kit."""
import math

import torch

import ssl_bench_entmin as entmin
from ssl_bench.method import StageContext, registry
from ssl_bench.testing import check_method


def test_entmin_is_registered():
    assert registry()["entmin"].stages == (entmin.EntMin,)


def test_loss_follows_the_equations():
    torch.manual_seed(0)
    stage = entmin.EntMin(StageContext(labeled=4, patch=(16, 16, 16), n_filters=2))
    nets = stage.networks()

    class Batch:  # the three public batch fields
        labeled_image = torch.randn(2, 1, 16, 16, 16)
        unlabeled_image = torch.randn(2, 1, 16, 16, 16)
        label = (torch.rand(2, 16, 16, 16) > 0.5).long()

    it0 = 3000
    torch.manual_seed(1)
    loss, parts = stage.losses("main", nets, Batch, it0)
    torch.manual_seed(1)  # the same dropout masks
    logits = nets["student"](torch.cat([Batch.labeled_image, Batch.unlabeled_image]))
    p = torch.softmax(logits, dim=1)
    y = Batch.label
    ce = -torch.log(p[:2].gather(1, y.unsqueeze(1))).mean()
    g = p[:2, 1]
    dice = 1 - (2 * (g * y).sum() + 1e-5) / ((g * g).sum() + (y * y).sum() + 1e-5)
    ent = -(p[2:] * torch.log(p[2:] + 1e-6)).sum(dim=1).mean()
    t = it0 // 150
    lam = 0.1 * math.exp(-5.0 * (1.0 - min(t, 40) / 40) ** 2)
    torch.testing.assert_close(loss, 0.5 * (ce + dice) + lam * ent, rtol=1e-5, atol=1e-6)


def test_entmin_keeps_the_method_contract(tmp_path):
    check_method("entmin", workdir=tmp_path)
