"""Largest-connected-component post-processing (BCP / OMF getLargestCC)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from ssl_bench.postprocess import largest_component, largest_component_batch


def test_corner_touching_voxels_are_one_component():
    m = np.zeros((4, 4, 4), bool)
    m[1, 1, 1] = True
    m[2, 2, 2] = True  # touches the first voxel only at a corner
    assert ndimage.label(m)[1] == 2  # 6-connectivity would see two components
    out = largest_component(m)
    assert out.dtype == np.bool_
    np.testing.assert_array_equal(out, m)


def test_edge_touching_voxels_are_one_component():
    m = np.zeros((4, 4, 4), np.uint8)
    m[1, 1, 1] = 1
    m[2, 2, 1] = 1
    np.testing.assert_array_equal(largest_component(m), m.astype(bool))


def test_largest_component_is_kept():
    m = np.zeros((20, 20, 20), np.uint8)
    m[1:4, 1:4, 1:4] = 1  # 27 voxels
    m[10:15, 10:15, 10:15] = 1  # 125 voxels
    m[18, 18, 18] = 1  # 1 voxel
    out = largest_component(m)
    expected = np.zeros(m.shape, bool)
    expected[10:15, 10:15, 10:15] = True
    np.testing.assert_array_equal(out, expected)
    assert m.sum() == 27 + 125 + 1  # input untouched


def test_tie_goes_to_lowest_label():
    m = np.zeros((10, 10, 10), bool)
    m[6:8, 6:8, 6:8] = True  # 8 voxels, later in raster order
    m[1:3, 1:3, 1:3] = True  # 8 voxels, first in raster order -> label 1
    expected = np.zeros_like(m)
    expected[1:3, 1:3, 1:3] = True
    np.testing.assert_array_equal(largest_component(m), expected)


def test_empty_mask_returns_empty():
    m = np.zeros((5, 6, 7), np.uint8)
    out = largest_component(m)
    assert out.shape == m.shape and out.dtype == np.bool_ and not out.any()


def test_nonzero_is_foreground():
    m = np.zeros((6, 6, 6), np.int32)
    m[1:3, 1:3, 1:3] = 5
    m[4, 4, 4] = -1
    expected = np.zeros(m.shape, bool)
    expected[1:3, 1:3, 1:3] = True
    np.testing.assert_array_equal(largest_component(m), expected)


@pytest.mark.parametrize("seed", range(5))
def test_matches_skimage_full_connectivity(seed):
    measure = pytest.importorskip("skimage.measure")
    rng = np.random.default_rng(seed)
    m = rng.random((30, 28, 26)) < 0.25  # many components of all sizes
    lab = measure.label(m, connectivity=3)
    sizes = np.bincount(lab.ravel())[1:]
    biggest = np.flatnonzero(sizes == sizes.max())
    out = largest_component(m)
    assert out.sum() == sizes.max()
    # the kept voxels are exactly one of skimage's largest components
    assert any(np.array_equal(out, lab == b + 1) for b in biggest)
    # and the number of 26-connected components agrees with scipy labelling
    assert ndimage.label(m, structure=np.ones((3, 3, 3)))[1] == lab.max()


@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8, torch.float32, torch.int64])
def test_batch_per_sample_keeps_dtype_and_device(dtype):
    x = torch.zeros((3, 12, 12, 12), dtype=dtype)
    x[0, 1:3, 1:3, 1:3] = 1  # sample 0: small + big
    x[0, 6:11, 6:11, 6:11] = 1
    x[1, 0, 0, 0] = 1  # sample 1: single voxel + 2 voxels
    x[1, 5, 5, 5:7] = 1
    # sample 2: empty
    out = largest_component_batch(x)
    assert out.dtype == dtype and out.device == x.device and out.shape == x.shape
    exp = torch.zeros((3, 12, 12, 12), dtype=torch.bool)
    exp[0, 6:11, 6:11, 6:11] = True
    exp[1, 5, 5, 5:7] = True
    assert torch.equal(out != 0, exp)
    for i in range(3):
        np.testing.assert_array_equal((out[i] != 0).numpy(), largest_component(x[i].numpy() != 0))


def test_batch_on_gpu_if_available():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    x = torch.zeros((2, 8, 8, 8), dtype=torch.float32, device="cuda")
    x[0, 1, 1, 1] = 1
    x[0, 4:6, 4:6, 4:6] = 1
    out = largest_component_batch(x)
    assert out.device == x.device and out.dtype == x.dtype
    assert int(out.sum()) == 8


def test_batch_rejects_wrong_rank():
    with pytest.raises(ValueError, match="N, X, Y, Z"):
        largest_component_batch(torch.zeros((8, 8, 8)))
