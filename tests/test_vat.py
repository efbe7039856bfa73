"""The shared VAT perturbation and loss (docs/methods.md §3.5 item 6; ssl_bench/vat.py)."""
import copy

import pytest
import torch
from torch import nn

from ssl_bench.losses import dice_fg_lin
from ssl_bench.vat import bn_stats_frozen, l2_normalize_per_sample, vat_loss, vat_perturbation


def _per_sample_norm(d):
    return d.reshape(d.shape[0], -1).norm(dim=1)


def test_l2_normalize_per_sample_unit_norm_same_direction():
    d = torch.tensor([[[3.0, 4.0]], [[0.0, -2.0]]])  # norms 5 and 2
    out = l2_normalize_per_sample(d)
    expected = torch.tensor([[[0.6, 0.8]], [[0.0, -1.0]]])
    assert torch.allclose(out, expected, atol=1e-6)
    # the reference's + 1e-8 in the denominator: a zero sample stays zero instead of NaN
    assert torch.equal(l2_normalize_per_sample(torch.zeros(1, 3)), torch.zeros(1, 3))


def test_direction_is_unit_per_sample_and_the_gradient_of_a_linear_distance():
    # prob_fn = identity, distance(p, t) = Σ a·(p - t): ∇_d = ξ·a, so d = a_n / ‖a_n‖ per sample
    torch.manual_seed(0)
    a = torch.randn(3, 1, 4, 4, 2)
    a[1] *= 50.0  # very different scales per sample: each is normalised on its own
    x = torch.randn(3, 1, 4, 4, 2)

    def distance(p, t):
        return torch.sum(a * (p - t))

    d = vat_perturbation(lambda v: v, x, x.clone(), distance=distance, xi=10.0, ip=1)
    assert torch.allclose(_per_sample_norm(d), torch.ones(3), atol=1e-5)
    expected = a / a.reshape(3, -1).norm(dim=1).reshape(3, 1, 1, 1, 1)
    assert torch.allclose(d, expected, atol=1e-5)
    assert not d.requires_grad
    # moving along d increases the distance by ε·Σ_n ‖a_n‖ (> 0): it points uphill
    eps = 10.0
    gain = distance(x + eps * d, x) - distance(x, x)
    assert gain.item() == pytest.approx(eps * a.reshape(3, -1).norm(dim=1).sum().item(), rel=1e-4)


def test_power_iterations_find_the_most_sensitive_direction():
    # prob_fn(v) = s·v (diagonal Jacobian), distance = Σ (p - t)²: the power iteration multiplies d by s²,
    # so with many iterations d -> ±e_k at k = argmax |s| — the direction of fastest increase.
    s = torch.tensor([[0.5, 3.0, 1.0, 2.0], [2.0, 0.1, 0.2, 0.3]])
    x = torch.zeros(2, 4)

    def prob_fn(v):
        return s * v

    def distance(p, t):
        return torch.sum((p - t) ** 2)

    torch.manual_seed(1)
    d = vat_perturbation(prob_fn, x, prob_fn(x), distance=distance, xi=10.0, ip=30)
    assert torch.allclose(d.abs(), torch.tensor([[0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]), atol=1e-4)
    # and the VAT loss equals distance(prob_fn(x + ε·d), p) = ε²·(3² + 2²)
    torch.manual_seed(1)
    loss = vat_loss(prob_fn, x, distance=distance, xi=10.0, eps=10.0, ip=30)
    assert loss.item() == pytest.approx(100.0 * (9.0 + 4.0), rel=1e-4)


class _TinyNet(nn.Module):
    """Conv -> BN -> ReLU -> Conv(2) with a second BN built without running stats (must stay so)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv3d(1, 3, 3, padding=1)
        self.bn = nn.BatchNorm3d(3)
        self.bn_plain = nn.BatchNorm3d(3, track_running_stats=False)
        self.conv2 = nn.Conv3d(3, 2, 1)

    def forward(self, x):
        return self.conv2(torch.relu(self.bn_plain(self.bn(self.conv1(x)))))


def _buffers(net):
    return {k: v.clone() for k, v in net.state_dict().items() if "running" in k or "num_batches" in k}


def test_perturbed_forwards_leave_bn_running_stats_unchanged():
    torch.manual_seed(0)
    net = _TinyNet().train()
    x = torch.randn(2, 1, 6, 6, 4)
    prob_fn = lambda v: torch.softmax(net(v), dim=1)  # noqa: E731
    with torch.no_grad():
        target = prob_fn(x)  # one plain forward: num_batches_tracked 1
    before = _buffers(net)
    assert before["bn.num_batches_tracked"].item() == 1
    loss = vat_loss(prob_fn, x, distance=dice_fg_lin, xi=10.0, eps=10.0, ip=2, bn_module=net, target=target)
    after = _buffers(net)
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    # each layer's own tracking flag is restored
    assert net.bn.track_running_stats is True and net.bn_plain.track_running_stats is False
    # the power iteration never filled parameter gradients; the loss itself trains the network
    assert all(p.grad is None for p in net.parameters())
    loss.backward()
    assert net.conv1.weight.grad is not None and net.conv1.weight.grad.abs().sum() > 0


def test_target_forward_updates_bn_once_like_the_reference():
    # without ``target`` the clean forward runs outside the frozen block: exactly one running-stat update
    torch.manual_seed(0)
    net = _TinyNet().train()
    twin = copy.deepcopy(net)
    x = torch.randn(2, 1, 6, 6, 4)
    vat_loss(lambda v: torch.softmax(net(v), dim=1), x, distance=dice_fg_lin, bn_module=net)
    with torch.no_grad():
        twin(x)
    assert net.bn.num_batches_tracked.item() == 1
    assert torch.allclose(net.bn.running_mean, twin.bn.running_mean, atol=1e-6)
    assert torch.allclose(net.bn.running_var, twin.bn.running_var, atol=1e-6)


def test_bn_stats_frozen_restores_after_an_error():
    net = _TinyNet()
    with pytest.raises(RuntimeError):
        with bn_stats_frozen(net):
            assert net.bn.track_running_stats is False
            raise RuntimeError("boom")
    assert net.bn.track_running_stats is True


def test_initial_direction_is_uniform_in_half_interval_before_normalisation():
    # d0 ~ U(-0.5, 0.5) drawn from torch's generator: with ip = 0 the returned direction is d0 / ‖d0‖
    torch.manual_seed(3)
    x = torch.zeros(2, 1000)
    d = vat_perturbation(lambda v: v, x, x, distance=lambda p, t: p.sum(), xi=10.0, ip=0)
    assert torch.allclose(_per_sample_norm(d), torch.ones(2), atol=1e-5)
    torch.manual_seed(3)
    raw = torch.rand(2, 1000) - 0.5
    assert torch.allclose(d, raw / raw.norm(dim=1, keepdim=True), atol=1e-6)
