"""Tests for the loss primitives, ramp-up and EMA (docs/methods.md §1.6, §1.7, §3.2)."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from ssl_bench.losses import (
    cross_entropy,
    dice_fg_lin,
    dice_fg_sq,
    dice_mc,
    ema_update,
    inner_boundary,
    masked_cross_entropy,
    sigmoid_rampup,
    signed_distance_target,
    softmax_mse,
    uamt_ema_alpha,
)

LN3 = math.log(3.0)


def _close(t, expected, tol=1e-6):
    assert abs(float(t) - expected) < tol, (float(t), expected)


# --------------------------------------------------------------------------- Dice variants

# Two samples of two voxels: p = [[0.5, 1.0], [0.0, 0.25]], g = [[1, 1], [0, 0]].
P = torch.tensor([[0.5, 1.0], [0.0, 0.25]])
G = torch.tensor([[1.0, 1.0], [0.0, 0.0]])


def test_dice_fg_sq_hand_value():
    # Σpg = 1.5, Σp² = 0.25 + 1 + 0 + 0.0625 = 1.3125, Σg² = 2 (batch-level sums).
    expected = 1.0 - (3.0 + 1e-5) / (3.3125 + 1e-5)
    _close(dice_fg_sq(P, G), expected)


def test_dice_fg_lin_hand_value():
    # Σpg = 1.5, Σp = 1.75, Σg = 2  ->  1 - 3/3.75 = 0.2 (plus 1e-8 smoothing).
    expected = 1.0 - (3.0 + 1e-8) / (3.75 + 1e-8)
    _close(dice_fg_lin(P, G), expected)
    _close(dice_fg_lin(P, G), 0.2)


def test_dice_fg_lin_two_channel_tensors():
    # VAT use: full two-channel probability tensors, batch-level over everything.
    p = torch.tensor([[[0.25], [0.75]]])  # (1, 2, 1)
    q = torch.tensor([[[0.5], [0.5]]])
    # Σpq = 0.125 + 0.375 = 0.5; Σp = 1; Σq = 1  ->  1 - 1/2
    _close(dice_fg_lin(p, q), 0.5)


def test_dice_perfect_and_empty():
    g = torch.tensor([[1.0, 0.0, 1.0]])
    _close(dice_fg_sq(g, g), 0.0)
    _close(dice_fg_lin(g, g), 0.0)
    z = torch.zeros(1, 3)
    _close(dice_fg_sq(z, z), 0.0)  # (0 + eps) / (0 + eps)
    _close(dice_fg_lin(z, z), 0.0)


def test_dice_shape_mismatch_raises():
    with pytest.raises(ValueError):
        dice_fg_sq(torch.zeros(2, 2), torch.zeros(4))
    with pytest.raises(ValueError):
        dice_fg_lin(torch.zeros(2, 2), torch.zeros(4))


def test_dice_low_precision_input_promoted():
    out = dice_fg_sq(P.to(torch.bfloat16), G)
    assert out.dtype == torch.float32
    _close(out, 1.0 - (3.0 + 1e-5) / (3.3125 + 1e-5))


def test_dice_gradients_flow():
    p = P.clone().requires_grad_(True)
    dice_fg_sq(p, G).backward()
    assert p.grad is not None and torch.isfinite(p.grad).all()


# Logits (N=2, C=2, X=2, Y=1, Z=1):
#   sample 0: v0 logits (0, 0) -> p = (0.5, 0.5), target 1; v1 (0, ln3) -> p = (0.25, 0.75), target 1
#   sample 1: v0 (ln3, 0) -> p = (0.75, 0.25), target 0;   v1 (0, 0)   -> p = (0.5, 0.5),  target 1
LOGITS = torch.tensor(
    [
        [[0.0, 0.0], [0.0, LN3]],
        [[LN3, 0.0], [0.0, 0.0]],
    ]
).reshape(2, 2, 2, 1, 1)
TARGET = torch.tensor([[1, 1], [0, 1]]).reshape(2, 2, 1, 1)


def test_dice_mc_hand_value():
    e = 1e-5
    d = [
        (0 + e) / (0.75 + e),  # n0 c0: p=[.5,.25], g=[0,0]
        (2.5 + e) / (3.25 + e),  # n0 c1: p=[.5,.75], g=[1,1]
        (1.5 + e) / (2.25 + e),  # n1 c0: p=[.75,.5], g=[1,0]
        (1.0 + e) / (1.75 + e),  # n1 c1: p=[.25,.5], g=[0,1]
    ]
    expected = 1.0 - sum(d) / 4.0
    _close(dice_mc(LOGITS, TARGET), expected)
    # singleton channel target is accepted
    _close(dice_mc(LOGITS, TARGET[:, None]), expected)


def test_dice_mc_with_mask():
    e = 1e-5
    mask = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).reshape(2, 2, 1, 1)
    # n0 keeps v0 only (p=(.5,.5), target 1); n1 keeps v1 only (p=(.5,.5), target 1).
    d_bg = (0 + e) / (0.5 + e)
    d_fg = (1.0 + e) / (1.5 + e)
    expected = 1.0 - (2 * d_bg + 2 * d_fg) / 4.0
    _close(dice_mc(LOGITS, TARGET, mask), expected)
    _close(dice_mc(LOGITS, TARGET, mask[:, None]), expected)  # (N, 1, ...) mask
    # all-ones mask == no mask
    _close(dice_mc(LOGITS, TARGET, torch.ones(2, 2, 1, 1)), float(dice_mc(LOGITS, TARGET)))
    # a spatial mask shared by the batch broadcasts
    shared = torch.tensor([1.0, 0.0]).reshape(2, 1, 1)
    e0 = [(0 + e) / (0.5 + e), (1 + e) / (1.5 + e), (1.5 + e) / (1.75 + e), (0 + e) / (0.25 + e)]
    _close(dice_mc(LOGITS, TARGET, shared), 1.0 - sum(e0) / 4.0)


def test_dice_mc_is_per_sample_not_batch_level():
    # Batch-level per-class Dice would give a different number on the same data.
    e = 1e-5
    batch_level = 1.0 - ((1.5 + e) / (3.0 + e) + (3.5 + e) / (5.0 + e)) / 2.0
    assert abs(float(dice_mc(LOGITS, TARGET)) - batch_level) > 1e-3


# --------------------------------------------------------------------------- CE


# Logits (N=1, C=2, X=2): v0 (0, 0) target 1 -> CE = ln 2; v1 (0, ln3) target 0 -> CE = ln 4.
CE_LOGITS = torch.tensor([[[0.0, 0.0], [0.0, LN3]]]).reshape(1, 2, 2, 1, 1)
CE_TARGET = torch.tensor([[1, 0]]).reshape(1, 2, 1, 1)


def test_cross_entropy_hand_value():
    _close(cross_entropy(CE_LOGITS, CE_TARGET), 1.5 * math.log(2.0))


def test_masked_cross_entropy_hand_values():
    ln2 = math.log(2.0)
    m1 = torch.tensor([1.0, 0.0]).reshape(1, 2, 1, 1)
    _close(masked_cross_entropy(CE_LOGITS, CE_TARGET, m1), ln2)
    w = torch.tensor([0.5, 1.0]).reshape(1, 2, 1, 1)
    _close(masked_cross_entropy(CE_LOGITS, CE_TARGET, w), (0.5 * ln2 + 2 * ln2) / 1.5)
    ones = torch.ones(1, 2, 1, 1)
    _close(masked_cross_entropy(CE_LOGITS, CE_TARGET, ones), float(cross_entropy(CE_LOGITS, CE_TARGET)))


def test_masked_cross_entropy_all_zero_mask():
    zero = torch.zeros(1, 2, 1, 1)
    logits = CE_LOGITS.clone().requires_grad_(True)
    out = masked_cross_entropy(logits, CE_TARGET, zero)
    assert float(out.detach()) == 0.0
    out.backward()
    assert torch.isfinite(logits.grad).all()


def test_softmax_mse_hand_value():
    a = torch.zeros(1, 2, 1, 1, 1)
    b = torch.tensor([0.0, LN3]).reshape(1, 2, 1, 1, 1)
    out = softmax_mse(a, b)
    assert out.shape == a.shape  # no reduction
    assert torch.allclose(out, torch.full_like(out, 0.0625))
    assert torch.equal(softmax_mse(b, b), torch.zeros_like(b))


# --------------------------------------------------------------------------- ramp


def test_sigmoid_rampup():
    assert isinstance(sigmoid_rampup(0, 40), float)
    _close(sigmoid_rampup(0, 40), math.exp(-5.0), 1e-12)
    _close(sigmoid_rampup(0, 40), 0.006737946999085467, 1e-12)
    _close(sigmoid_rampup(20, 40), math.exp(-1.25), 1e-12)
    assert sigmoid_rampup(40, 40) == 1.0
    assert sigmoid_rampup(1000, 40) == 1.0
    _close(sigmoid_rampup(-3, 40), math.exp(-5.0), 1e-12)
    assert sigmoid_rampup(5, 0) == 1.0
    assert sigmoid_rampup(0, 0) == 1.0
    # consistency ramp reaches 1 at iteration 6000 (t = 6000 // 150 = 40)
    assert sigmoid_rampup(6000 // 150, 40) == 1.0
    assert sigmoid_rampup(5999 // 150, 40) < 1.0


# --------------------------------------------------------------------------- EMA


def _net(fill):
    net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(fill)
        net[1].running_mean.fill_(fill + 10)
        net[1].running_var.fill_(fill + 20)
        net[1].num_batches_tracked.fill_(int(fill))
    return net


def test_ema_update_values_and_buffers():
    teacher, student = _net(1.0), _net(3.0)
    ema_update(teacher, student, 0.25)
    for p in teacher.parameters():
        assert torch.allclose(p, torch.full_like(p, 0.25 * 1.0 + 0.75 * 3.0))
        assert p.requires_grad  # still a parameter
    # buffers not averaged
    assert torch.equal(teacher[1].running_mean, torch.full((2,), 11.0))
    assert torch.equal(teacher[1].running_var, torch.full((2,), 21.0))
    assert int(teacher[1].num_batches_tracked) == 1
    # student untouched
    for p in student.parameters():
        assert torch.equal(p, torch.full_like(p, 3.0))


def test_ema_update_alpha_one_and_099():
    teacher, student = _net(1.0), _net(3.0)
    ema_update(teacher, student, 1.0)
    assert all(torch.equal(p, torch.ones_like(p)) for p in teacher.parameters())
    ema_update(teacher, student, 0.99)
    assert all(torch.allclose(p, torch.full_like(p, 1.02)) for p in teacher.parameters())


def test_ema_update_alpha_zero_is_exact_copy():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    student = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    with torch.no_grad():
        for p in student.parameters():
            p.normal_()
        student[1].running_mean.fill_(7.0)
    ema_update(teacher, student, uamt_ema_alpha(0))
    for pt, ps in zip(teacher.parameters(), student.parameters()):
        assert torch.equal(pt, ps)
    assert torch.equal(teacher[1].running_mean, torch.zeros(4))


def test_ema_update_no_autograd_graph():
    teacher, student = _net(1.0), _net(3.0)
    ema_update(teacher, student, 0.5)
    for p in teacher.parameters():
        assert p.grad_fn is None and p.is_leaf


def test_ema_update_rejects_bad_alpha():
    with pytest.raises(ValueError):
        ema_update(_net(1.0), _net(2.0), 1.5)


def test_uamt_ema_alpha():
    assert uamt_ema_alpha(0) == 0.0
    assert uamt_ema_alpha(1) == 0.5
    _close(uamt_ema_alpha(9), 0.9, 1e-12)
    _close(uamt_ema_alpha(99), 0.99, 1e-12)
    assert uamt_ema_alpha(100) == 0.99
    assert uamt_ema_alpha(5999) == 0.99
    assert uamt_ema_alpha(1000, cap=0.999) == 0.999


# --------------------------------------------------------------------------- inner boundary


def _random_masks(rng):
    masks = []
    for shape in [(6, 7, 5), (4, 4, 4), (1, 6, 5), (9, 8), (5, 1, 1)]:
        for density in (0.2, 0.5, 0.85):
            masks.append(rng.random(shape) < density)
    # solid blocks touching the border on several faces
    m = np.zeros((6, 6, 6), bool)
    m[:3, :, 2:] = True
    masks.append(m)
    masks.append(np.ones((4, 5, 3), bool))
    masks.append(np.zeros((4, 5, 3), bool))
    return masks


def test_inner_boundary_matches_skimage():
    find_boundaries = pytest.importorskip("skimage.segmentation").find_boundaries
    rng = np.random.default_rng(0)
    for mask in _random_masks(rng):
        ref = find_boundaries(mask, connectivity=1, mode="inner")
        np.testing.assert_array_equal(inner_boundary(mask), ref)


def test_inner_boundary_border_is_not_boundary():
    m = np.zeros((1, 1, 6), bool)
    m[0, 0, :3] = True
    # voxel 0 touches the volume border but has no background neighbour inside the volume
    np.testing.assert_array_equal(inner_boundary(m)[0, 0], [False, False, True, False, False, False])


# --------------------------------------------------------------------------- signed distance


def _reference_sdf(labels):
    """Direct scipy + skimage implementation of DTC/SASSNet compute_sdf."""
    from scipy.ndimage import distance_transform_edt
    from skimage.segmentation import find_boundaries

    out = np.zeros(labels.shape, dtype=np.float64)
    for b in range(labels.shape[0]):
        pos = labels[b].astype(bool)
        if pos.any():
            neg = ~pos
            posdis = distance_transform_edt(pos)
            negdis = distance_transform_edt(neg)
            boundary = find_boundaries(pos, mode="inner").astype(np.uint8)
            sdf = (negdis - negdis.min()) / (negdis.max() - negdis.min()) - (posdis - posdis.min()) / (
                posdis.max() - posdis.min()
            )
            sdf[boundary == 1] = 0
            out[b] = sdf
    return out


def test_sdt_hand_value_1d_line():
    # fg at 1..5, bg at 0, 6, 7.
    # EDT(bg) = [1,0,0,0,0,0,1,2] -> /2 ; EDT(fg) = [0,1,2,3,2,1,0,0] -> /3
    # SDM = [.5, -1/3, -2/3, -1, -2/3, -1/3, .5, 1]; inner boundary (1 and 5) -> 0.
    labels = np.array([0, 1, 1, 1, 1, 1, 0, 0]).reshape(1, 1, 1, 8)
    out = signed_distance_target(labels)
    expected = np.array([0.5, 0.0, -2 / 3, -1.0, -2 / 3, 0.0, 0.5, 1.0], dtype=np.float32)
    assert out.dtype == torch.float32 and out.shape == (1, 1, 1, 8)
    np.testing.assert_allclose(out.numpy()[0, 0, 0], expected, atol=1e-6)


def test_sdt_matches_direct_reference_and_properties():
    pytest.importorskip("skimage")
    rng = np.random.default_rng(1)
    labels = np.zeros((4, 10, 9, 8), dtype=np.uint8)
    labels[0, 2:7, 3:8, 1:6] = 1  # interior block
    labels[1, :4, :, 5:] = 1  # border-touching slab
    labels[2] = rng.random((10, 9, 8)) < 0.3  # scattered
    labels[3, 5, 4, 3] = 1  # one voxel
    out = signed_distance_target(torch.from_numpy(labels))
    assert out.dtype == torch.float32 and out.shape == labels.shape
    ref = _reference_sdf(labels)
    np.testing.assert_allclose(out.numpy(), ref, atol=1e-6)

    o = out.numpy()
    assert o.min() >= -1.0 and o.max() <= 1.0
    fg = labels.astype(bool)
    boundary = np.stack([inner_boundary(fg[b]) for b in range(fg.shape[0])])
    assert (o[boundary] == 0).all()
    assert (o[fg & ~boundary] < 0).all()  # negative inside
    assert (o[~fg] > 0).all()  # positive outside
    assert np.isclose(o[0].min(), -1.0) and np.isclose(o[0].max(), 1.0)


def test_sdt_no_foreground_and_all_foreground():
    labels = np.zeros((3, 4, 4, 4), dtype=np.int64)
    labels[1] = 1  # entirely foreground: degenerate normalisation -> 0
    labels[2, 1:3, 1:3, 1:3] = 1
    out = signed_distance_target(labels)
    assert torch.isfinite(out).all()
    assert torch.equal(out[0], torch.zeros(4, 4, 4))
    assert torch.equal(out[1], torch.zeros(4, 4, 4))
    assert out[2].abs().max() > 0


def test_sdt_numpy_and_torch_inputs_agree():
    labels = np.zeros((1, 6, 6, 6), dtype=np.uint8)
    labels[0, 1:4, 2:5, 0:3] = 1
    a = signed_distance_target(labels)
    b = signed_distance_target(torch.from_numpy(labels))
    c = signed_distance_target(torch.from_numpy(labels).float())
    assert a.device.type == b.device.type == "cpu"
    assert torch.equal(a, b) and torch.equal(a, c)
