"""Tests for the UA-MT simplified V-Net, ssl_bench/networks.py (docs/methods.md §1.5)."""

import pytest
import torch
from torch import nn

from ssl_bench.networks import VNet, count_parameters

SMALL = (1, 1, 32, 32, 16)  # tiny input for the reduced-width network


def _small(**kw):
    torch.manual_seed(0)
    return VNet(n_filters=4, **kw)


# --------------------------------------------------------------------------- parameter counts


def test_parameter_count_head_a():
    assert count_parameters(VNet(in_channels=1, n_classes=2, n_filters=16, head="A")) == 9_448_866


def test_parameter_count_head_b():
    assert count_parameters(VNet(n_classes=1, head="B")) == 9_448_866


def test_parameter_count_mlp_heads():
    base = count_parameters(VNet())
    with_mlp = VNet(mlp_heads=True)
    assert count_parameters(with_mlp) - base == 8_452
    assert count_parameters(with_mlp) == 9_448_866 + 8_452


def test_dropout_flag_does_not_change_count():
    assert count_parameters(_small(dropout=False)) == count_parameters(_small(dropout=True))


def test_count_parameters_trainable_only():
    m = _small()
    total = count_parameters(m)
    m.out_conv.weight.requires_grad_(False)
    assert count_parameters(m, trainable_only=True) == total - m.out_conv.weight.numel()
    assert count_parameters(m) == total


# --------------------------------------------------------------------------- structure


def test_structure_matches_table():
    m = VNet()
    convs = [mod for mod in m.modules() if isinstance(mod, nn.Conv3d)]
    # 1+2+3+3+3 encoder stages, 4 downsampling convs, 3+3+2+1 decoder stages, 1 head conv.
    assert len(convs) == 12 + 4 + 9 + 1
    ups = [mod for mod in m.modules() if isinstance(mod, nn.ConvTranspose3d)]
    assert len(ups) == 4
    for up in ups:
        assert up.kernel_size == (2, 2, 2) and up.stride == (2, 2, 2)
    bns = [mod for mod in m.modules() if isinstance(mod, nn.BatchNorm3d)]
    assert len(bns) == 12 + 4 + 9 + 4  # every conv / up except the head is followed by BN
    three = [c for c in convs if c.kernel_size == (3, 3, 3)]
    assert len(three) == 21
    assert all(c.padding == (1, 1, 1) and c.bias is not None for c in three)
    downs = [c for c in convs if c.kernel_size == (2, 2, 2)]
    assert [d.out_channels for d in downs] == [32, 64, 128, 256]
    assert all(d.stride == (2, 2, 2) for d in downs)
    assert m.out_conv.kernel_size == (1, 1, 1) and m.out_conv.out_channels == 2
    assert not any(isinstance(mod, (nn.PReLU, nn.InstanceNorm3d, nn.GroupNorm)) for mod in m.modules())


def test_invalid_head():
    with pytest.raises(ValueError):
        VNet(head="C")


# --------------------------------------------------------------------------- forward shapes


def test_full_width_small_forward():
    torch.manual_seed(0)
    m = VNet().eval()
    with torch.no_grad():
        y = m(torch.randn(1, 1, 16, 16, 16))
    assert y.shape == (1, 2, 16, 16, 16)
    assert torch.isfinite(y).all()


def test_head_a_shapes_and_features():
    m = _small().eval()
    x = torch.randn(*SMALL)
    with torch.no_grad():
        y = m(x)
        y2, feat = m(x, return_features=True)
    assert y.shape == (1, 2, 32, 32, 16)
    assert feat.shape == (1, 4, 32, 32, 16)  # n_filters channels of dec9
    assert torch.allclose(y, y2)
    assert torch.allclose(m.out_conv(feat), y2)


def test_head_b_shapes_and_outputs():
    m = _small(n_classes=1, head="B").eval()
    x = torch.randn(*SMALL)
    with torch.no_grad():
        out = m(x)
        sdm, seg, feat = m(x, return_features=True)
    assert isinstance(out, tuple) and len(out) == 2
    assert out[0].shape == out[1].shape == (1, 1, 32, 32, 16)
    assert feat.shape == (1, 4, 32, 32, 16)
    assert sdm.abs().max() <= 1.0
    assert torch.allclose(sdm, torch.tanh(m.sdm_conv(feat)))
    assert torch.allclose(seg, m.seg_conv(feat))
    assert torch.allclose(out[0], sdm) and torch.allclose(out[1], seg)


def test_features_are_after_dropout():
    m = _small().train()
    torch.manual_seed(3)
    logits, feat = m(torch.randn(1, 1, 32, 32, 16), return_features=True)
    assert torch.allclose(m.out_conv(feat), logits)  # logits read the dropped features
    # Dropout3d zeroes whole channels: with p=0.5 over 4 channels some channel is zero
    # for this seed, and the surviving ones are scaled by 2.
    zero_channels = [(feat[0, c] == 0).all().item() for c in range(4)]
    assert any(zero_channels)


def test_all_parameters_receive_gradients():
    m = _small()
    y = m(torch.randn(2, 1, 16, 16, 16))
    y.sum().backward()
    assert all(p.grad is not None for p in m.parameters())


# --------------------------------------------------------------------------- dropout


def test_dropout_false_has_no_dropout_modules():
    m = _small(dropout=False)
    assert not any(isinstance(mod, nn.modules.dropout._DropoutNd) for mod in m.modules())
    m2 = _small(dropout=True)
    drops = [mod for mod in m2.modules() if isinstance(mod, nn.Dropout3d)]
    assert len(drops) == 2 and all(d.p == 0.5 for d in drops)


def test_dropout_active_only_in_train_mode():
    x = torch.randn(*SMALL)
    m = _small(dropout=True)
    m.train()
    torch.manual_seed(1)
    a = m(x)
    torch.manual_seed(2)
    b = m(x)
    assert not torch.allclose(a, b)  # fresh dropout masks
    m.eval()
    with torch.no_grad():
        c, d = m(x), m(x)
    assert torch.equal(c, d)

    nodrop = _small(dropout=False).train()
    torch.manual_seed(1)
    e = nodrop(x)
    torch.manual_seed(2)
    f = nodrop(x)
    assert torch.allclose(e, f)


# --------------------------------------------------------------------------- MLP heads


def test_mlp_heads_modules():
    m = VNet(n_filters=4, mlp_heads=True)
    assert isinstance(m.selectors_feat, nn.ModuleList) and len(m.selectors_feat) == 2
    assert isinstance(m.selectors_mem, nn.ModuleList) and len(m.selectors_mem) == 2
    ph = m.projection_head
    assert [type(l) for l in ph] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert ph[0].in_features == 4 and ph[0].out_features == 32 and ph[3].out_features == 32
    pr = m.prediction_head
    assert [type(l) for l in pr] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert pr[0].in_features == 32 and pr[3].out_features == 32
    for sel in list(m.selectors_feat) + list(m.selectors_mem):
        assert [type(l) for l in sel] == [nn.Linear, nn.BatchNorm1d, nn.LeakyReLU, nn.Linear]
        assert sel[2].negative_slope == 0.2
        assert sel[0].in_features == 32 and sel[3].out_features == 1
    feats = torch.randn(5, 4)
    z = m.projection_head(feats)
    assert z.shape == (5, 32)
    assert m.prediction_head(z).shape == (5, 32)
    assert m.selectors_feat[1](z).shape == (5, 1)
    assert m.selectors_mem[0](z).shape == (5, 1)
    plain = VNet(n_filters=4)
    assert not hasattr(plain, "projection_head")
    assert count_parameters(m) - count_parameters(plain) == 8_452 - (16 - 4) * 32


# --------------------------------------------------------------------------- formats / dtypes


def test_channels_last_and_bf16_autocast():
    m = _small().train().to(memory_format=torch.channels_last_3d)
    x = torch.randn(2, 1, 32, 32, 16).to(memory_format=torch.channels_last_3d)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, feat = m(x, return_features=True)
    assert y.shape == (2, 2, 32, 32, 16) and feat.shape == (2, 4, 32, 32, 16)
    assert torch.isfinite(y.float()).all()
    y.float().sum().backward()
    assert all(p.grad is not None for p in m.parameters())

    mb = _small(n_classes=1, head="B").eval().to(memory_format=torch.channels_last_3d)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        sdm, seg = mb(x)
    assert sdm.shape == seg.shape == (2, 1, 32, 32, 16)


def test_double_precision_forward():
    m = _small().double().eval()
    with torch.no_grad():
        y = m(torch.randn(*SMALL, dtype=torch.float64))
    assert y.dtype == torch.float64
