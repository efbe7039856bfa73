"""Post-processing of binary predictions: keep the largest connected component (LCC).

This is the post-processing of BCP / OMF (``getLargestCC``): label the foreground with full
connectivity (26-neighbourhood in 3D: faces, edges and corners), keep the component with the most
voxels; ties go to the lowest label index (scipy numbers components in raster order, and
``np.argmax`` picks the first maximum); an empty mask stays empty (their fallback).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["largest_component", "largest_component_batch"]


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
    labels, n = ndimage.label(m, structure=np.ones((3,) * m.ndim, dtype=bool))
    if n <= 1:
        return m.copy()  # empty, or already a single component
    counts = np.bincount(labels.ravel(), minlength=n + 1)
    keep = int(np.argmax(counts[1:])) + 1
    return labels == keep


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
    arr = (arr != 0).numpy()
    out = np.empty(arr.shape, dtype=bool)
    for i in range(arr.shape[0]):
        out[i] = largest_component(arr[i])
    return torch.from_numpy(out).to(device=masks.device, dtype=masks.dtype)
