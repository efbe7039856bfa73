"""Post-processing of binary predictions: keep the largest connected component (LCC).

This is the post-processing of BCP / OMF (``getLargestCC``): label the foreground with full
connectivity (26-neighbourhood in 3D: faces, edges and corners), keep the component with the most
voxels; ties go to the lowest label index (scipy numbers components in raster order, and
``np.argmax`` picks the first maximum); an empty mask stays empty (their fallback).

Labelling uses ``connected-components-3d`` (cc3d, ~7x faster than ``scipy.ndimage.label`` on a crop:
BCP and OMF take this pass every iteration). The result is identical to the scipy version: same
26-connectivity, and a tie is resolved explicitly to the component whose first voxel comes first in C
raster order (scipy's lowest label), whatever cc3d's own numbering. 1-D and 2-D masks are labelled as
3-D volumes with singleton axes (full connectivity there is full connectivity in the lower dimension);
more than 3 dimensions fall back to scipy. Metrics keep scipy (ssl_bench/metrics.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import cc3d
import numpy as np
from scipy import ndimage

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["largest_component", "largest_component_batch"]


def _label(m: np.ndarray) -> tuple[np.ndarray, int]:
    """Full-connectivity labels of the bool mask ``m`` (0 = background) and their number."""
    if m.ndim > 3 or m.size == 0:  # cc3d handles non-empty arrays of 1-3 dimensions
        return ndimage.label(m, structure=np.ones((3,) * m.ndim, dtype=bool))
    vol = np.ascontiguousarray(m).reshape(m.shape + (1,) * (3 - m.ndim))
    labels, n = cc3d.connected_components(vol, connectivity=26, return_N=True)
    return labels.reshape(m.shape), int(n)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Largest connected component of ``mask`` (nonzero = foreground) as a new bool array.

    Full connectivity (``np.ones((3,) * ndim)``, i.e. 26-connectivity for 3D volumes).  An empty
    mask returns an all-False array of the same shape.
    """
    m = np.asarray(mask)
    if m.dtype != np.bool_:
        m = m != 0
    if m.ndim == 0:
        raise ValueError("largest_component needs an array with at least one dimension")
    labels, n = _label(m)
    if n <= 1:
        return m.copy()  # empty, or already a single component
    counts = np.bincount(labels.ravel(), minlength=n + 1)
    counts[0] = -1  # background never wins
    tied = np.flatnonzero(counts == counts.max())
    if len(tied) == 1:
        return labels == tied[0]
    # a tie: the component seen first in C raster order, as scipy's lowest label
    flat = labels.ravel()
    return labels == flat[np.argmax(np.isin(flat, tied))]


def largest_component_batch(masks: "torch.Tensor") -> "torch.Tensor":
    """``largest_component`` applied to each sample of an ``(N, X, Y, Z)`` tensor.

    Accepts bool or 0/1 (any numeric dtype; nonzero = foreground) on any device; goes through CPU
    numpy and returns a new tensor with the input's dtype and device (foreground = 1 / True).
    """
    import torch

    if not isinstance(masks, torch.Tensor):
        raise TypeError(f"largest_component_batch expects a torch.Tensor, got {type(masks).__name__}")
    if masks.ndim != 4:
        raise ValueError(
            f"largest_component_batch expects shape (N, X, Y, Z), got {tuple(masks.shape)}"
        )
    arr = masks.detach().cpu()
    # a bool mask (pseudo_label's) as it is: torch's `!= 0` on a bool batch costs more than the labelling
    arr = arr.numpy() if arr.dtype == torch.bool else (arr != 0).numpy()
    out = np.empty(arr.shape, dtype=bool)
    for i in range(arr.shape[0]):
        out[i] = largest_component(arr[i])
    return torch.from_numpy(out).to(device=masks.device, dtype=masks.dtype)
