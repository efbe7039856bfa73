"""ssl_bench.mixing: BCP's cut cuboid, copy-paste / overlay, hard LCC pseudo-labels (docs/methods.md §3.6, §3.7)."""
import torch

from ssl_bench.mixing import (cut_mask, cut_sides, draw_cut_origin, mix, overlay, overlay_label, pseudo_label,
                              random_cut_mask)

PAPER = (112, 112, 80)


def test_cut_sides_are_two_thirds_of_the_patch():
    assert cut_sides(PAPER) == (74, 74, 53)  # the reference's 74×74×53
    assert cut_sides((48, 48, 32)) == (32, 32, 21)  # smoke patch


def test_cut_origin_covers_exactly_the_reference_range():
    # reference: np.random.randint(0, 112 - 74) etc. -> {0..37} × {0..37} × {0..26}, bounds inclusive
    g = torch.Generator().manual_seed(0)
    draws = [draw_cut_origin(PAPER, g) for _ in range(3000)]
    for axis, top in enumerate((37, 37, 26)):
        assert {d[axis] for d in draws} == set(range(top + 1))


def test_cut_origin_follows_torch_rng_state():
    # drawn from torch's global CPU generator: restoring its state (what --resume does) redraws the same cuboid
    state = torch.get_rng_state()
    first = [draw_cut_origin(PAPER) for _ in range(5)]
    torch.set_rng_state(state)
    assert [draw_cut_origin(PAPER) for _ in range(5)] == first
    torch.set_rng_state(state)
    assert torch.equal(random_cut_mask(PAPER), cut_mask(PAPER, first[0]))


def test_cut_mask_is_one_outside_zero_inside():
    m = cut_mask(PAPER, (37, 37, 26))  # the largest origin
    assert m.shape == PAPER and m.dtype == torch.bool
    assert int((~m).sum()) == 74 * 74 * 53
    assert not m[37:111, 37:111, 26:79].any()
    assert m[36].all() and m[111].all() and m[:, :, 25].all() and m[:, :, 79].all()
    m0 = cut_mask(PAPER, (0, 0, 0))
    assert not m0[:74, :74, :53].any() and m0[74:].all() and m0[:, 74:].all() and m0[:, :, 53:].all()


def test_mix_selects_a_where_mask_is_one():
    torch.manual_seed(0)
    a, b = torch.randn(2, 1, 4, 5, 6), torch.randn(2, 1, 4, 5, 6)
    shared = torch.rand(4, 5, 6) > 0.5
    per_sample = torch.rand(2, 4, 5, 6) > 0.5
    assert torch.equal(mix(a, b, shared), a * shared + b * ~shared)
    expect = a * per_sample[:, None] + b * ~per_sample[:, None]
    assert torch.equal(mix(a, b, per_sample), expect)
    la, lb = torch.randint(0, 2, (2, 4, 5, 6)), torch.randint(0, 2, (2, 4, 5, 6))
    assert torch.equal(mix(la, lb, per_sample.long()), la * per_sample + lb * ~per_sample)


def test_overlay_pastes_the_foreground_and_label_is_the_union():
    # stage 1: A's atrium (y_A) pasted onto B; target = y_A ∨ y_B (docs/methods.md §3.7.2 items 3-4)
    a = torch.full((1, 1, 6, 6, 6), 10.0)
    b = torch.full((1, 1, 6, 6, 6), 20.0)
    y_a = torch.zeros(1, 6, 6, 6, dtype=torch.long)
    y_b = torch.zeros(1, 6, 6, 6, dtype=torch.long)
    y_a[0, 0:3, 0:3, 0:3] = 1
    y_b[0, 2:5, 2:5, 2:5] = 1
    x = overlay(a, b, y_a)
    assert (x[0, 0, 0:3, 0:3, 0:3] == 10).all()
    assert int((x == 10).sum()) == 27 and int((x == 20).sum()) == 216 - 27
    y = overlay_label(y_a, y_b)
    assert int(y.sum()) == 27 + 27 - 1  # the two boxes share the voxel (2, 2, 2)
    assert (y[0, 0:3, 0:3, 0:3] == 1).all() and (y[0, 2:5, 2:5, 2:5] == 1).all()


def _logits_from_prob(p1: torch.Tensor) -> torch.Tensor:
    """Two-class logits (N, 2, ...) whose softmax channel 1 is p1."""
    return torch.stack([torch.zeros_like(p1), torch.log(p1) - torch.log1p(-p1)], dim=1)


def test_pseudo_label_threshold_and_26_connectivity():
    p = torch.full((2, 10, 10, 10), 0.1)
    # a chain of 3 voxels touching only at corners: one component with 26-connectivity (three with 6)
    for k in range(3):
        p[0, 1 + k, 1 + k, 1 + k] = 0.9
    # 2 face-adjacent voxels far away: the largest component with 6-connectivity, not with 26
    p[0, 8, 8, 5] = 0.9
    p[0, 8, 8, 6] = 0.9
    # sample 1: one voxel exactly at 0.5 (logits 0, 0 -> softmax 0.5 counts as foreground), one just below
    logits = _logits_from_prob(p)
    logits[1, :, 4, 4, 4] = 0.0
    logits[1, 1, 6, 6, 6] = -1e-3
    y = pseudo_label(logits)
    assert y.dtype == torch.long and y.shape == (2, 10, 10, 10)
    expect0 = torch.zeros(10, 10, 10, dtype=torch.long)
    for k in range(3):
        expect0[1 + k, 1 + k, 1 + k] = 1
    assert torch.equal(y[0], expect0)
    expect1 = torch.zeros(10, 10, 10, dtype=torch.long)
    expect1[4, 4, 4] = 1
    assert torch.equal(y[1], expect1)


def test_pseudo_label_empty_stays_empty():
    p = torch.full((2, 6, 6, 6), 0.2)
    p[1, 2:4, 2:4, 2:4] = 0.8
    y = pseudo_label(_logits_from_prob(p))
    assert int(y[0].sum()) == 0
    assert int(y[1].sum()) == 8
