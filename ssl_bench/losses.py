"""Loss primitives, ramp-up and EMA helpers shared by the methods (docs/methods.md §1.6, §1.7, §3.2).

The three Dice variants differ between the reference codebases and are kept distinct on
purpose (§1.6, §7): ``dice_fg_sq`` (UA-MT/DTC/SASSNet), ``dice_fg_lin`` (SS-Net) and
``dice_mc`` (BCP/OMF). Do not unify them.

Every tensor function is pure torch and device-agnostic. Low-precision inputs (fp16/bf16,
e.g. produced under autocast) are promoted to float32 before any sum or softmax, so a loss
is never accumulated over a whole volume in 8 mantissa bits; float64 inputs stay float64.
The returned losses are 0-d tensors (``softmax_mse`` excepted: it is element-wise).
"""

from __future__ import annotations

import math
import os
from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "dice_fg_sq",
    "dice_fg_lin",
    "dice_mc",
    "cross_entropy",
    "masked_cross_entropy",
    "softmax_mse",
    "sigmoid_rampup",
    "ema_update",
    "uamt_ema_alpha",
    "signed_distance_target",
    "inner_boundary",
]


def _acc(t: torch.Tensor) -> torch.Tensor:
    """Promote a floating tensor to at least float32 (non-float tensors -> float32)."""
    if not t.is_floating_point():
        return t.to(torch.float32)
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _check_same_shape(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{what}: shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")


def _index_target(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Class-index target (N, *spatial) as int64; a singleton channel dim is accepted."""
    if target.dim() == logits.dim():
        if target.shape[1] != 1:
            raise ValueError(
                f"target with a channel dim must have 1 channel, got {tuple(target.shape)}"
            )
        target = target[:, 0]
    expected = (logits.shape[0],) + tuple(logits.shape[2:])
    if tuple(target.shape) != expected:
        raise ValueError(
            f"target shape {tuple(target.shape)} does not match logits {tuple(logits.shape)}"
        )
    return target.long()


def _voxel_mask(mask: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mask broadcast to the (N, *spatial) target shape; a singleton channel dim is accepted."""
    if mask.dim() == target.dim() + 1:
        if mask.shape[1] != 1:
            raise ValueError(f"mask with a channel dim must have 1 channel, got {tuple(mask.shape)}")
        mask = mask[:, 0]
    return torch.broadcast_to(mask, target.shape)


# ---------------------------------------------------------------------------------------
# Dice variants
# ---------------------------------------------------------------------------------------


def dice_fg_sq(prob: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """DiceFG-sq (UA-MT / DTC / SASSNet ``dice_loss``), docs/methods.md §1.6.

        L = 1 - (2·Σ p·g + 1e-5) / (Σ p² + Σ g² + 1e-5)

    Batch-level: the sums run over every element of the (sub)batch together. ``prob`` is the
    foreground probability (softmax channel 1 for UA-MT/baseline, sigmoid output for
    DTC/SASSNet), ``target`` the binary ground truth; both the same shape.
    """
    _check_same_shape(prob, target, "dice_fg_sq")
    p = _acc(prob)
    g = target.to(p.dtype)
    smooth = 1e-5
    intersect = torch.sum(p * g)
    return 1.0 - (2.0 * intersect + smooth) / (torch.sum(p * p) + torch.sum(g * g) + smooth)


def dice_fg_lin(prob: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """DiceFG-lin (SS-Net ``Binary_dice_loss``), docs/methods.md §1.6.

        L = 1 - (2·Σ p·g + 1e-8) / (Σ p + Σ g + 1e-8)

    Batch-level, linear denominator. Works on any two same-shape tensors; SS-Net also uses
    it unchanged on full two-channel probability tensors inside VAT (§3.5).
    """
    _check_same_shape(prob, target, "dice_fg_lin")
    p = _acc(prob)
    g = target.to(p.dtype)
    ep = 1e-8
    return 1.0 - (2.0 * torch.sum(p * g) + ep) / (torch.sum(p) + torch.sum(g) + ep)


def dice_mc(
    logits: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """DiceMC (BCP/OMF ``mask_DiceLoss``, nclass = 2), docs/methods.md §1.6.

    p = softmax(logits) over channels, g = one-hot(target). For each sample n and class c
    (background included), with m the voxel mask (all ones when ``mask`` is None):

        d_nc = (2·Σ_v m_v·p_ncv·g_ncv + 1e-5) / (Σ_v m_v·(p_ncv + g_ncv) + 1e-5)
        L    = 1 - mean_{n,c} d_nc

    Per-sample and per-class, not batch-level.

    Args:
        logits: (N, C, *spatial), C >= 2 (the references use C = 2).
        target: integer class indices (N, *spatial) (or (N, 1, *spatial)), values in [0, C).
        mask: optional voxel weights (N, *spatial) or (N, 1, *spatial), or anything that
            broadcasts to (N, *spatial) (e.g. one cuboid mask (*spatial) shared by the batch).
    """
    n, c = logits.shape[0], logits.shape[1]
    if c < 2:
        raise ValueError("dice_mc needs at least 2 channels of logits (softmax over classes)")
    tgt = _index_target(logits, target)
    p = torch.softmax(_acc(logits), dim=1).reshape(n, c, -1)
    g = F.one_hot(tgt.reshape(n, -1), num_classes=c).transpose(1, 2).to(p.dtype)
    smooth = 1e-5
    if mask is None:
        inter = torch.sum(p * g, dim=2)
        union = torch.sum(p + g, dim=2)
    else:
        m = _voxel_mask(mask, tgt).reshape(n, 1, -1).to(p.dtype)
        inter = torch.sum(p * g * m, dim=2)
        union = torch.sum((p + g) * m, dim=2)
    dice = (2.0 * inter + smooth) / (union + smooth)
    return 1.0 - dice.mean()


# ---------------------------------------------------------------------------------------
# Cross-entropy and consistency
# ---------------------------------------------------------------------------------------


def cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """CE on logits, mean over all voxels (PyTorch ``F.cross_entropy``), docs/methods.md §1.6.

        L = mean_v [ -log softmax(logits)_{v, target_v} ]

    ``logits`` (N, C, *spatial); ``target`` class indices (N, *spatial) or (N, 1, *spatial).
    """
    tgt = _index_target(logits, target)
    return F.cross_entropy(_acc(logits), tgt)


def masked_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Masked CE (BCP ``mix_loss``), docs/methods.md §1.6.

        L = Σ_v CE_v·m_v / (Σ_v m_v + 1e-16)

    An all-zero mask gives 0 (not NaN). ``mask`` is (N, *spatial), (N, 1, *spatial) or
    broadcastable to (N, *spatial).
    """
    tgt = _index_target(logits, target)
    ce = F.cross_entropy(_acc(logits), tgt, reduction="none")
    m = _voxel_mask(mask, tgt).to(ce.dtype)
    return torch.sum(ce * m) / (torch.sum(m) + 1e-16)


def softmax_mse(a_logits: torch.Tensor, b_logits: torch.Tensor) -> torch.Tensor:
    """softmax-MSE, docs/methods.md §1.6: (softmax(a) - softmax(b))² element-wise over channel dim 1.

    No reduction: each method reduces as its section says (e.g. UA-MT's masked sum over
    channels and voxels divided by 2·Σm). No gradient is stopped here; detach the teacher's
    logits in the caller.
    """
    _check_same_shape(a_logits, b_logits, "softmax_mse")
    pa = torch.softmax(_acc(a_logits), dim=1)
    pb = torch.softmax(_acc(b_logits), dim=1)
    return (pa - pb) ** 2


# ---------------------------------------------------------------------------------------
# Ramp-up and EMA
# ---------------------------------------------------------------------------------------


def sigmoid_rampup(current: float, length: float) -> float:
    """Sigmoid ramp-up, docs/methods.md §1.7.

        r(t, L) = exp(-5·(1 - clip(t, 0, L)/L)²),   and 1.0 if L == 0.

    r(0, L) = e^-5 ≈ 0.0067; r(t, L) = 1 for t >= L. Consistency ramps call it with
    t = iteration // 150 and L = 40; UA-MT's threshold ramp with t = iteration, L = 6000.
    """
    if length == 0:
        return 1.0
    t = min(max(float(current), 0.0), float(length))
    phase = 1.0 - t / float(length)
    return float(math.exp(-5.0 * phase * phase))


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, alpha: float, fused: bool = True) -> None:
    """In-place EMA of parameters, docs/methods.md §3.2 item 8 (also BCP with fixed α = 0.99).

        θ_T ← α·θ_T + (1 - α)·θ_S

    in the arithmetic of the method's reference, which decides the float rounding:

    * ``fused=True``: ``θ_T.mul_(α).add_(θ_S, alpha=1 - α)``, UA-MT's ``update_ema_variables``
      (``ema_param.data.mul_(alpha).add_(1 - alpha, param.data)``, the old spelling of the same call);
    * ``fused=False``: ``θ_T.mul_(α).add_((1 - α) * θ_S)``, BCP's ``update_ema_variables``: the product
      (1 - α)·θ_S is rounded to float32 before the addition (up to 1.8e-7 apart after 30 steps).

    Parameters only: buffers (BatchNorm running statistics, ``num_batches_tracked``) are
    left untouched. ``alpha == 0`` copies the student's parameters exactly (UA-MT at
    iteration 0); ``alpha == 1`` leaves the teacher unchanged. Runs under ``no_grad``.
    """
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"EMA alpha must be in [0, 1], got {alpha}")
    t_params = list(teacher.parameters())
    s_params = list(student.parameters())
    if len(t_params) != len(s_params):
        raise ValueError("teacher and student have different numbers of parameters")
    for t, s in zip(t_params, s_params):
        if t.shape != s.shape:
            raise ValueError(f"parameter shape mismatch: {tuple(t.shape)} vs {tuple(s.shape)}")
    s_data = [s.detach().to(device=t.device, dtype=t.dtype) for t, s in zip(t_params, s_params)]
    # multi-tensor (foreach) kernels: a few launches per step instead of two per parameter, with the
    # arithmetic of t.mul_(alpha).add_(s, alpha=1 - alpha) per parameter, so the same bits (not lerp)
    if alpha == 0.0:
        torch._foreach_copy_(t_params, s_data)
    elif alpha != 1.0:
        torch._foreach_mul_(t_params, alpha)
        if fused:
            torch._foreach_add_(t_params, s_data, alpha=1.0 - alpha)
        else:  # BCP: (1 - α)·θ_S as its own float32 tensor, then added
            torch._foreach_add_(t_params, torch._foreach_mul(s_data, 1.0 - alpha))


def uamt_ema_alpha(iteration0: int, cap: float = 0.99) -> float:
    """UA-MT EMA decay, docs/methods.md §3.2 item 8: α = min(1 - 1/(iter + 1), cap), iter 0-based.

    α = 0 at iteration 0 (teacher becomes an exact copy of the student).
    """
    return min(1.0 - 1.0 / (int(iteration0) + 1), float(cap))


# ---------------------------------------------------------------------------------------
# Signed-distance target (DTC / SASSNet compute_sdf)
# ---------------------------------------------------------------------------------------


def inner_boundary(fg: np.ndarray) -> np.ndarray:
    """Inner boundary of a binary mask, equal to
    ``skimage.segmentation.find_boundaries(fg, connectivity=1, mode="inner")``.

    A voxel is on the inner boundary iff it is foreground and at least one of its
    face-neighbours (connectivity 1: ±1 along one axis) *inside the array* is background.
    The array border is not a boundary: skimage compares a grey dilation with a grey erosion
    computed with ``mode="reflect"``, where the missing neighbour of a border voxel is the
    voxel itself. Works for any number of dimensions.
    """
    fg = np.asarray(fg) != 0
    interior = fg.copy()
    nd = fg.ndim
    for ax in range(nd):
        if fg.shape[ax] < 2:
            continue
        head = [slice(None)] * nd
        tail = [slice(None)] * nd
        head[ax] = slice(0, -1)
        tail[ax] = slice(1, None)
        head_t, tail_t = tuple(head), tuple(tail)
        interior[head_t] &= fg[tail_t]  # neighbour at +1
        interior[tail_t] &= fg[head_t]  # neighbour at -1
    return fg & ~interior


def signed_distance_target(labels: Union[np.ndarray, torch.Tensor]) -> torch.Tensor:
    """Normalised signed-distance target (DTC/SASSNet ``compute_sdf``), docs/methods.md §1.6.

    For each sample b of ``labels`` (N, *spatial), with fg = labels[b] != 0 and bg = ~fg:

        SDM = norm(EDT(bg)) - norm(EDT(fg)),   SDM[inner boundary of fg] = 0

    where EDT is ``scipy.ndimage.distance_transform_edt`` (voxel units) applied to the mask
    (EDT(bg): distance of each background voxel to the nearest foreground voxel, 0 on
    foreground; EDT(fg): distance of each foreground voxel to the nearest background voxel),
    norm(d) = (d - min d)/(max d - min d) per sample, and the inner boundary is
    ``find_boundaries(fg, mode="inner")`` (see :func:`inner_boundary`). The result lies in
    [-1, 1]: negative inside, positive outside, 0 on the inner boundary.

    Degenerate cases (documented choices):

    * no foreground in a sample: its target is all zeros (as in the reference);
    * a normalisation with max == min is defined as 0 for that term. That happens only
      when the sample is entirely foreground: the background term is then 0, and the
      foreground term is 0 too (there is no background to measure a distance to; scipy's
      EDT of an all-ones mask is not meaningful, and the reference code yields NaN here).
      An all-foreground sample therefore gets an all-zero target.

    The squared distances come from ``edt`` (exact integers, multi-threaded; one pass over a two-label
    volume gives both transforms: each voxel's squared distance to the nearest voxel of the other
    class, which is scipy's EDT(fg)² on foreground and EDT(bg)² on background); about 10x faster than
    scipy, which matters as DTC and SASSNet compute it every iteration. As in the reference, the square
    root and the normalisation are computed in float64 and the result is cast to float32 once (the
    reference's ``torch.from_numpy(gt_dis).float()``), so the target is bit-identical to the reference
    ``compute_sdf`` (tests/test_dtc.py); normalising in float32 left about 31 % of voxels 1 ulp off.

    Returns a float32 tensor of the same shape, on ``labels``' device (CPU for numpy).
    """
    if isinstance(labels, torch.Tensor):
        device = labels.device
        arr = labels.detach().cpu().numpy()
    else:
        device = torch.device("cpu")
        arr = np.asarray(labels)
    if arr.ndim < 2:
        raise ValueError(f"labels must be (N, *spatial), got shape {arr.shape}")
    out = np.zeros(arr.shape, dtype=np.float32)
    threads = _edt_threads()  # edt's own threads (it holds the GIL: samples side by side in Python threads do not help)
    for b in range(arr.shape[0]):
        sdm = _sdf_sample(arr[b], threads)
        if sdm is not None:
            out[b] = sdm
    return torch.from_numpy(out).to(device)


def _sdf_sample(sample: np.ndarray, threads: int) -> Optional[np.ndarray]:
    """The normalised signed distance of one sample (None: no foreground, an all-zero target)."""
    fg = sample != 0
    if not fg.any():
        return None
    bg = ~fg
    if not bg.any():
        return np.zeros(fg.shape, dtype=np.float32)  # both normalised terms are 0 (docstring)
    dist = _two_class_edt(fg, threads)  # float64, as scipy's
    # norm(EDT(bg)) - norm(EDT(fg)) without materialising either term: each term is 0 on the other class, so
    # its min is 0 and its max is the max of `dist` over its own class (>= 1: both classes are present), and
    # the difference is dist/max_bg on background and -dist/max_fg on foreground: in float64 exactly the
    # reference's (x - 0)/(max - 0) - 0 and 0 - (y - 0)/(max - 0), as subtracting 0 is exact
    zero = np.float64(0.0)
    neg_max = np.max(np.where(bg, dist, zero))  # max EDT(bg)
    pos_max = np.max(np.where(fg, dist, zero))  # max EDT(fg)
    neg_term, pos_term = dist / neg_max, dist / pos_max
    sdm = np.where(bg, neg_term, -pos_term)
    sdm[inner_boundary(fg)] = 0.0
    return sdm.astype(np.float32)  # one rounding, as the reference's .float() of its float64 array


def _edt_threads() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n = os.cpu_count() or 1
    return max(1, min(n, 8))


def _two_class_edt(fg: np.ndarray, threads: int = 1) -> np.ndarray:
    """Per voxel, the Euclidean distance (voxel units) to the nearest voxel of the other class, float64.

    scipy's value exactly: ``edt.edtsq`` gives the squared distance, an integer held exactly in float32 (below
    2^24, a distance of 4096 voxels), and its float64 square root is what scipy computes from the same
    integer. (``edt.edt``'s float32 root rounds differently.) ``fg`` must hold both classes. Arrays of more
    than 3 dimensions (never a training batch) use scipy.
    """
    if fg.ndim > 3:
        from scipy.ndimage import distance_transform_edt

        return np.where(fg, distance_transform_edt(fg), distance_transform_edt(~fg))
    import edt

    two = np.ascontiguousarray(fg, dtype=np.uint8) + np.uint8(1)  # 1 background, 2 foreground: no 0 voxels
    return np.sqrt(edt.edtsq(two, black_border=False, parallel=threads).astype(np.float64))
