"""ssl_bench.metrics must reproduce medpy.metric.binary (dc, jc, hd95, asd) exactly."""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

import ssl_bench.metrics as M
from ssl_bench.metrics import asd, case_metrics, dice, hd95, jaccard

mb = pytest.importorskip("medpy.metric.binary")

TOL = 1e-9
KEYS = ("dice", "jaccard", "hd95", "asd")


# ----------------------------------------------------------------------------------------------
# helpers


def medpy_values(result, reference):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return {
            "dice": float(mb.dc(result, reference)),
            "jaccard": float(mb.jc(result, reference)),
            "hd95": float(mb.hd95(result, reference)),
            "asd": float(mb.asd(result, reference)),
        }


def assert_close(ours: dict, ref: dict, what: str = "") -> None:
    for k in KEYS:
        assert isinstance(ours[k], float), (k, type(ours[k]))
        assert abs(ours[k] - ref[k]) <= TOL, f"{what} {k}: ours {ours[k]!r} vs medpy {ref[k]!r}"


@pytest.fixture(params=["kdtree", "edt"])
def nn_path(request, monkeypatch):
    """Run a test once with the KD-tree nearest-neighbour path forced, once with the EDT path."""
    frac = math.inf if request.param == "kdtree" else -1.0
    monkeypatch.setattr(M, "_KDTREE_MAX_SURFACE_FRACTION", frac)
    return request.param


def ours_all(result, reference) -> dict:
    """Our four separate functions and case_metrics must agree with each other; return them."""
    sep = {
        "dice": dice(result, reference),
        "jaccard": jaccard(result, reference),
        "hd95": hd95(result, reference),
        "asd": asd(result, reference),
    }
    cm = case_metrics(result, reference)
    assert cm["empty"] is False
    for k in KEYS:
        assert isinstance(sep[k], float)
        assert sep[k] == cm[k], (k, sep[k], cm[k])
    return cm


def check_against_medpy(result, reference, what=""):
    assert_close(ours_all(result, reference), medpy_values(result, reference), what)


def sphere(shape, center, radius):
    grid = np.ogrid[tuple(slice(0, s) for s in shape)]
    d2 = sum((g - c) ** 2 for g, c in zip(grid, center))
    return d2 <= radius**2


def shifted(mask, offset):
    """Shift with zero fill (no wrap-around)."""
    out = np.zeros_like(mask)
    src, dst = [], []
    for o, n in zip(offset, mask.shape):
        src.append(slice(max(0, -o), n - max(0, o)))
        dst.append(slice(max(0, o), n - max(0, -o)))
    out[tuple(dst)] = mask[tuple(src)]
    return out


# ----------------------------------------------------------------------------------------------
# hand-computed values


def test_two_single_voxels_at_distance_3():
    a = np.zeros((8, 8, 8), np.uint8)
    b = np.zeros_like(a)
    a[2, 2, 2] = 1
    b[2, 5, 2] = 1
    assert hd95(a, b) == 3.0 and asd(a, b) == 3.0 and asd(b, a) == 3.0
    assert dice(a, b) == 0.0 and jaccard(a, b) == 0.0
    assert case_metrics(a, b) == {"dice": 0.0, "jaccard": 0.0, "hd95": 3.0, "asd": 3.0, "empty": False}
    assert_close(case_metrics(a, b), medpy_values(a, b))


def test_single_voxels_3_4_5_triangle():
    a = np.zeros((6, 6, 2), bool)
    b = np.zeros_like(a)
    a[0, 0, 0] = True
    b[3, 4, 0] = True
    assert hd95(a, b) == 5.0 and asd(a, b) == 5.0


def test_center_voxel_vs_3x3x3_cube(nn_path):
    cube = np.zeros((7, 7, 7), bool)
    cube[2:5, 2:5, 2:5] = True
    dot = np.zeros_like(cube)
    dot[3, 3, 3] = True
    # cube surface = its 26 outer voxels; their distances to the centre: 6 x 1, 12 x sqrt2, 8 x sqrt3
    assert asd(dot, cube) == 1.0
    assert asd(cube, dot) == pytest.approx((6 + 12 * math.sqrt(2) + 8 * math.sqrt(3)) / 26, abs=1e-12)
    # 27 pooled distances sorted: 7 x 1, 12 x sqrt2, 8 x sqrt3; position 0.95 * 26 = 24.7 -> sqrt3
    assert hd95(dot, cube) == pytest.approx(math.sqrt(3), abs=1e-12)
    assert hd95(cube, dot) == pytest.approx(math.sqrt(3), abs=1e-12)
    assert dice(dot, cube) == pytest.approx(2 / 28) and jaccard(dot, cube) == pytest.approx(1 / 27)
    check_against_medpy(dot, cube)
    check_against_medpy(cube, dot)


def test_identical_masks_give_zero_distance_and_dice_one(nn_path):
    m = sphere((20, 20, 20), (10, 9, 11), 6)
    cm = case_metrics(m, m)
    assert cm == {"dice": 1.0, "jaccard": 1.0, "hd95": 0.0, "asd": 0.0, "empty": False}


def test_volume_border_counts_as_background_like_medpy():
    """scipy's binary_erosion uses border_value=0, so voxels on the array edge are surface voxels.

    An all-ones 3x3x3 array has the 26 outer voxels as surface and the centre inside; a centre
    voxel is therefore at distance 1 from it.  (Treating the outside as foreground would leave no
    surface at all.)"""
    full = np.ones((3, 3, 3), bool)
    dot = np.zeros_like(full)
    dot[1, 1, 1] = True
    assert asd(dot, full) == 1.0
    assert float(mb.asd(dot, full)) == 1.0
    check_against_medpy(full, dot)
    check_against_medpy(dot, full)


# ----------------------------------------------------------------------------------------------
# synthetic masks vs medpy


def test_single_voxel_vs_sphere(nn_path):
    shape = (24, 22, 20)
    ball = sphere(shape, (12, 11, 10), 6)
    for pos in [(12, 11, 10), (12, 11, 16), (2, 3, 1), (23, 21, 19)]:
        dot = np.zeros(shape, np.uint8)
        dot[pos] = 1
        check_against_medpy(dot, ball, f"dot {pos} vs ball")
        check_against_medpy(ball, dot, f"ball vs dot {pos}")


def test_mask_touching_every_face_of_the_volume(nn_path):
    shape = (18, 16, 14)
    # a 3D cross of bars that runs through the whole array: touches all six faces
    cross = np.zeros(shape, bool)
    cross[:, 6:10, 5:9] = True
    cross[7:11, :, 5:9] = True
    cross[7:11, 6:10, :] = True
    ball = sphere(shape, (9, 8, 7), 5)
    rng = np.random.default_rng(3)
    noisy_full = rng.random(shape) < 0.9  # almost the whole array, holes inside and on faces
    slab = np.zeros(shape, bool)
    slab[:, :, :3] = True  # a slab lying on one face
    for a, b, what in [
        (cross, ball, "cross/ball"),
        (noisy_full, ball, "noisy_full/ball"),
        (noisy_full, cross, "noisy_full/cross"),
        (slab, cross, "slab/cross"),
        (np.ones(shape, bool), ball, "full/ball"),
    ]:
        check_against_medpy(a, b, what)
        check_against_medpy(b, a, what + " reversed")


def test_result_entirely_inside_reference(nn_path):
    shape = (26, 24, 22)
    outer = sphere(shape, (13, 12, 11), 9)
    inner = sphere(shape, (14, 12, 10), 4)
    assert not (inner & ~outer).any()
    check_against_medpy(inner, outer, "inner/outer")
    check_against_medpy(outer, inner, "outer/inner")


def test_disjoint_masks(nn_path):
    shape = (40, 20, 16)
    a = sphere(shape, (6, 10, 8), 4)
    b = sphere(shape, (32, 8, 7), 5)
    assert dice(a, b) == 0.0
    check_against_medpy(a, b, "a/b")
    check_against_medpy(b, a, "b/a")


@pytest.mark.parametrize("seed", range(12))
def test_random_blobs_match_medpy(seed, nn_path):
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in rng.integers(6, 26, size=3))
    field = ndimage.gaussian_filter(rng.random(shape), sigma=float(rng.uniform(0.5, 2.5)))
    a = field > np.quantile(field, rng.uniform(0.4, 0.95))
    b = ndimage.binary_dilation(a, iterations=int(rng.integers(0, 3))) ^ (rng.random(shape) < 0.05)
    if not b.any():
        b[0, 0, 0] = True
    dtype = [np.uint8, np.int64, np.int16, bool][seed % 4]
    check_against_medpy(a.astype(dtype), b.astype(dtype), f"seed {seed}")
    check_against_medpy(b.astype(dtype), a.astype(dtype), f"seed {seed} reversed")


def test_2d_and_1d_arrays_match_medpy(nn_path):
    rng = np.random.default_rng(7)
    a2 = ndimage.gaussian_filter(rng.random((30, 25)), 2) > 0.5
    b2 = ndimage.binary_erosion(a2) | (rng.random((30, 25)) < 0.03)
    check_against_medpy(a2, b2, "2d")
    a1 = np.array([0, 1, 1, 1, 0, 0, 0, 1, 1, 0], bool)
    b1 = np.array([1, 1, 0, 0, 0, 0, 0, 0, 1, 1], bool)
    check_against_medpy(a1, b1, "1d")


def test_nonzero_values_count_as_foreground():
    a = np.zeros((10, 10, 10), np.int16)
    a[2:6, 2:6, 2:6] = 7
    a[3, 3, 3] = -2
    b = np.zeros((10, 10, 10), np.uint8)
    b[3:7, 3:7, 3:7] = 255
    assert_close(case_metrics(a, b), medpy_values(a != 0, b != 0))


# ----------------------------------------------------------------------------------------------
# empty masks, policies, bad input


def test_empty_prediction_penalty_policy():
    gt = sphere((10, 20, 30), (5, 10, 15), 4)
    pred = np.zeros(gt.shape, np.uint8)
    diag = math.sqrt(10**2 + 20**2 + 30**2)
    cm = case_metrics(pred, gt)  # default policy
    assert cm == {"dice": 0.0, "jaccard": 0.0, "hd95": diag, "asd": diag, "empty": True}
    assert case_metrics(pred, gt, empty_policy="penalty") == cm


def test_empty_prediction_zero_policy():
    gt = sphere((10, 20, 30), (5, 10, 15), 4)
    pred = np.zeros(gt.shape, bool)
    cm = case_metrics(pred, gt, empty_policy="zero")
    assert cm == {"dice": 0.0, "jaccard": 0.0, "hd95": 0.0, "asd": 0.0, "empty": True}


def test_both_empty_follows_the_empty_prediction_policy():
    z = np.zeros((4, 5, 6), bool)
    assert case_metrics(z, z)["empty"] is True
    assert case_metrics(z, z)["hd95"] == math.sqrt(16 + 25 + 36)
    assert case_metrics(z, z, empty_policy="zero")["hd95"] == 0.0


def test_empty_ground_truth_with_prediction_raises():
    pred = sphere((10, 10, 10), (5, 5, 5), 3)
    with pytest.raises(ValueError, match="ground truth"):
        case_metrics(pred, np.zeros_like(pred))


def test_unknown_policy_raises():
    m = sphere((10, 10, 10), (5, 5, 5), 3)
    with pytest.raises(ValueError, match="empty_policy"):
        case_metrics(m, m, empty_policy="nan")


def test_distance_metrics_reject_empty_masks_like_medpy():
    m = sphere((10, 10, 10), (5, 5, 5), 3)
    z = np.zeros_like(m)
    for f, mf in [(hd95, mb.hd95), (asd, mb.asd)]:
        for a, b in [(z, m), (m, z), (z, z)]:
            with pytest.raises(ValueError, match="empty"):
                f(a, b)
            with pytest.raises(RuntimeError):
                mf(a, b)


def test_dice_jaccard_of_two_empty_masks_match_medpy():
    z = np.zeros((3, 4, 5), bool)
    # medpy 0.5.2: dc -> nan on numpy >= 2 (numpy int / 0.0), jc -> 1.0 (ZeroDivisionError caught)
    assert math.isnan(dice(z, z))
    assert jaccard(z, z) == 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        np.testing.assert_equal(dice(z, z), float(mb.dc(z, z)))
    assert jaccard(z, z) == mb.jc(z, z)
    m = z.copy()
    m[1, 1, 1] = True
    assert dice(z, m) == 0.0 == mb.dc(z, m) and jaccard(z, m) == 0.0 == mb.jc(z, m)


def test_shape_mismatch_raises():
    a = np.zeros((10, 10, 10), bool)
    a[5, 5, 5] = True
    b = np.zeros((10, 10, 11), bool)
    b[5, 5, 5] = True
    for f in (dice, jaccard, hd95, asd, case_metrics):
        with pytest.raises(ValueError, match="shape"):
            f(a, b)


def test_float_arrays_are_rejected():
    a = np.zeros((5, 5, 5), np.float32)
    a[2, 2, 2] = 1
    with pytest.raises(TypeError, match="bool or integer"):
        case_metrics(a, a > 0)


# ----------------------------------------------------------------------------------------------
# real LA labels vs medpy (the crop must be invisible on full volumes)


def _la_root() -> Path:
    env = os.environ.get("SSL_BENCH_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1].parent / "shared/data/LA"


@pytest.fixture(scope="module")
def la_labels():
    root = _la_root()
    test_list = root / "test.list"
    if not test_list.is_file():
        pytest.skip(f"LA data not found at {root} (set SSL_BENCH_DATA to the LA folder)")
    h5py = pytest.importorskip("h5py")
    ids = [s.strip() for s in test_list.read_text().split() if s.strip()][:3]
    labels = []
    for cid in ids:
        path = root / "2018LA_Seg_Training Set" / cid / "mri_norm2.h5"
        if not path.is_file():
            pytest.skip(f"LA case file missing: {path}")
        with h5py.File(path, "r") as f:
            labels.append(f["label"][:])
    return labels


def _perturb(label: np.ndarray, kind: str, seed: int) -> np.ndarray:
    gt = label.astype(bool)
    if kind == "dilate":
        return ndimage.binary_dilation(gt, iterations=2)
    if kind == "erode":
        return ndimage.binary_erosion(gt, iterations=2)
    if kind == "shift":
        return shifted(gt, (3, -2, 2))
    rng = np.random.default_rng(seed)
    if kind == "flips":
        band = ndimage.binary_dilation(gt, iterations=2) & ~ndimage.binary_erosion(gt, iterations=2)
        flip = band & (rng.random(gt.shape) < 0.3)
        return gt ^ flip
    if kind == "blob":
        out = gt.copy()
        out[-6:, :5, -4:] = True  # far from the atrium, touching three faces of the volume
        return out
    raise AssertionError(kind)


# every perturbation on case 0, a spread of them on cases 1 and 2 (medpy takes ~1 s per pair)
REAL_PAIRS = [
    (0, "dilate"), (0, "erode"), (0, "shift"), (0, "flips"), (0, "blob"),
    (1, "flips"), (1, "shift"), (1, "dilate"),
    (2, "blob"), (2, "erode"),
]


@pytest.mark.parametrize("case, kind", REAL_PAIRS)
def test_real_la_cases_match_medpy(la_labels, case, kind, monkeypatch):
    gt = la_labels[case]
    pred = _perturb(gt, kind, seed=case).astype(np.uint8)
    ref = medpy_values(pred, gt)
    cm = case_metrics(pred, gt)
    assert cm["empty"] is False
    assert_close(cm, ref, f"case {case} {kind}")
    # both nearest-neighbour paths must agree on full volumes too
    monkeypatch.setattr(M, "_KDTREE_MAX_SURFACE_FRACTION", -1.0)  # force the EDT path
    assert_close(case_metrics(pred, gt), ref, f"case {case} {kind} (EDT path)")


def test_real_la_reverse_order_asd(la_labels):
    gt = la_labels[0]
    pred = _perturb(gt, "flips", seed=5)
    assert abs(asd(gt, pred) - float(mb.asd(gt, pred))) <= TOL
