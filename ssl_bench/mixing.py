"""Mixing pieces shared by BCP and OMF (docs/methods.md §3.6, §3.7): the cut cuboid, hard copy-paste of
images and labels, and hard pseudo-labels.

* :func:`mix` is the one copy-paste primitive, ``a⊙m + b⊙(1−m)`` with a binary mask m, written as a
  selection (``torch.where``) so that values are copied exactly, never blended.
* BCP (§3.6 "Cut mask M", the reference's ``context_mask``): one cuboid per iteration, shared by the
  whole batch, sides ⌊patch·2/3⌋ (74×74×53 at 112×112×80), M = 1 OUTSIDE the cuboid, 0 inside.
* OMF (§3.7.2–3.7.3): :func:`overlay` pastes the foreground of one image onto another along a binary
  mask (the exact label in stage 1, the binary pseudo-label in stage 2); :func:`overlay_label` is the
  stage-1 target, the union of both atria.
* :func:`pseudo_label`: [softmax channel 1 ≥ 0.5], then the largest 26-connected component per sample;
  an empty mask stays empty (the BCP/OMF ``get_cut_mask(..., nms=1)`` + ``LargestCC_pancreas``).
"""
from __future__ import annotations

import torch

from .postprocess import largest_component_batch

__all__ = ["cut_sides", "draw_cut_origin", "cut_mask", "random_cut_mask", "mix", "overlay", "overlay_label",
           "pseudo_label"]


# -- BCP's cut cuboid (§3.6) -------------------------------------------------------------------
def cut_sides(shape) -> tuple[int, ...]:
    """Cuboid sides ⌊n·2/3⌋ per axis: 74, 74, 53 at 112×112×80 (32, 32, 21 at the smoke 48×48×32)."""
    return tuple(int(n) * 2 // 3 for n in shape)


def draw_cut_origin(shape, generator: torch.Generator | None = None) -> tuple[int, ...]:
    """Cuboid origin, uniform in {0 .. n − side − 1} per axis.

    The reference draws ``np.random.randint(0, 112 − side)`` (exclusive upper bound, 112/80 hard-coded
    from the training patch): {0..37} × {0..37} × {0..26} at 112×112×80, so the cuboid never reaches the
    last row of an axis. Here the bound derives from ``shape`` and equals the reference at the paper
    patch. The draw uses torch's CPU generator (the global one unless ``generator`` is given); the trainer
    saves and restores that state in every checkpoint, so a resumed run draws the same cuboids.
    """
    origin = []
    for n, side in zip(shape, cut_sides(shape)):
        origin.append(int(torch.randint(0, int(n) - side, (1,), generator=generator)))
    return tuple(origin)


def cut_mask(shape, origin, device=None) -> torch.Tensor:
    """M as a bool tensor of ``shape``: True (M = 1) outside the cuboid at ``origin``, False inside."""
    m = torch.ones(tuple(int(n) for n in shape), dtype=torch.bool, device=device)
    inside = tuple(slice(o, o + s) for o, s in zip(origin, cut_sides(shape)))
    m[inside] = False
    return m


def random_cut_mask(shape, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
    """One freshly drawn cut mask M (§3.6): the reference's ``context_mask(img, 2/3)``."""
    return cut_mask(shape, draw_cut_origin(shape, generator), device)


# -- copy-paste --------------------------------------------------------------------------------
def mix(a: torch.Tensor, b: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """a⊙m + b⊙(1−m): ``a`` where the binary mask ``m`` is 1, ``b`` where it is 0.

    ``a``/``b``: images (N, 1, X, Y, Z) or labels (N, X, Y, Z). ``m``: one mask (X, Y, Z) shared by the
    batch (BCP's cuboid) or one per sample (N, X, Y, Z) (OMF's label / pseudo-label); nonzero = 1.
    """
    if a.shape != b.shape:
        raise ValueError(f"mix: shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    if m.dim() == 4 and a.dim() == 5:
        m = m.unsqueeze(1)  # per-sample mask against (N, 1, X, Y, Z) images
    return torch.where(m != 0, a, b)


def overlay(foreground: torch.Tensor, background: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """OMF overlay: ``foreground`` inside ``mask`` pasted onto ``background`` (pairwise, sample i with i).

    Stage 1 (§3.7.2 item 3): X_ov = A⊙y_A + B⊙(1−y_A), A's atrium pasted onto B.
    Stage 2 (§3.7.3 item 4): X_mix = P⊙Ŷ_P + Q⊙(1−Ŷ_P), P's pseudo-atrium pasted onto Q.
    The paper's eqs. (1) and (4) write the same with Y the BACKGROUND mask (§3.7.6 item 1).
    """
    return mix(foreground, background, mask)


def overlay_label(y_foreground: torch.Tensor, y_background: torch.Tensor) -> torch.Tensor:
    """Stage-1 overlay target (§3.7.2 item 4): y_A + y_B⊙(1−y_A) = y_A ∨ y_B, the union of both atria."""
    return mix(y_foreground, y_background, y_foreground)


# -- pseudo-labels -----------------------------------------------------------------------------
@torch.no_grad()
def pseudo_label(logits: torch.Tensor) -> torch.Tensor:
    """Hard pseudo-label (N, X, Y, Z) int64 of two-class ``logits`` (N, 2, X, Y, Z).

    [softmax channel 1 ≥ 0.5] (a probability of exactly 0.5 counts as foreground, as in the reference),
    then per sample the largest 26-connected component; a sample with no foreground stays empty.
    """
    fg = torch.softmax(logits.float(), dim=1)[:, 1] >= 0.5
    return largest_component_batch(fg).long()
