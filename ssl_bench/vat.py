"""Virtual adversarial training (VAT), the one implementation of the harness (docs/methods.md §3.5 item 6).

SS-Net's smoothness term (its ``VAT3d``) in the general form of Miyato et al.'s VAT:

1. target p = prob_fn(x), without gradient (the network keeps whatever mode it is in, so dropout
   stays active in train mode);
2. d ~ U(-0.5, 0.5) per element, L2-normalised per sample over every non-batch dimension;
3. ``ip`` power iterations: d <- normalise(∇_d distance(prob_fn(x + ξ·d), p));
4. loss = distance(prob_fn(x + ε·d), p), with gradient to the network (d is a constant).

The normalisation is d / (‖d_n‖₂ + 1e-8) per sample n. Only the direction d receives the
power-iteration gradient (``torch.autograd.grad``); parameter ``.grad`` fields are never touched,
which is what the reference obtains by zeroing the model's gradients after its backward.

BatchNorm running statistics: the forwards of steps 3 and 4 run with running-stat tracking switched
off (:func:`bn_stats_frozen`); they normalise with batch statistics in train mode and leave every
running mean/var and ``num_batches_tracked`` unchanged. The target forward of step 1 is outside that
block, as in the reference, so in train mode it updates the running statistics once; pass ``target``
to skip that forward.

Precision (docs/methods.md Decision 7): with ``full_precision=True`` (the default) every VAT forward — the
target, the power iteration and the perturbed one — runs in float32 with autocast switched off, whatever
precision the run trains in. Under bf16/fp16 autocast a convolution casts its input to the low
precision, and an ε = 10 unit-norm perturbation of a 112×112×80 crop is about 0.009 per voxel, near
bf16's spacing (0.0078 in [1, 2)): the network would see a quantised perturbation (measured: cosine
≈ 0.975 to the intended ε·d, many voxels losing it entirely). In float32 it sees x + ε·d itself; the
target is computed with the same numerics as the perturbed predictions it is compared with.
``full_precision=False`` keeps whatever autocast is active (the unfaithful path, kept for the tests).
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Callable

import torch
from torch import nn

__all__ = ["bn_stats_frozen", "l2_normalize_per_sample", "vat_perturbation", "vat_loss"]


@contextmanager
def bn_stats_frozen(module: nn.Module):
    """Switch running-stat tracking off for every normalisation layer of ``module``; restore each one's own setting."""
    layers = [m for m in module.modules() if hasattr(m, "track_running_stats")]
    previous = [m.track_running_stats for m in layers]
    try:
        for m in layers:
            m.track_running_stats = False
        yield
    finally:
        for m, flag in zip(layers, previous):
            m.track_running_stats = flag


def l2_normalize_per_sample(d: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """d_n / (‖d_n‖₂ + eps) for each sample n (norm over every dimension but the first)."""
    norm = d.reshape(d.shape[0], -1).norm(dim=1)
    return d / (norm.reshape(-1, *([1] * (d.dim() - 1))) + eps)


def vat_perturbation(prob_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, target: torch.Tensor, *,
                     distance: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], xi: float = 10.0,
                     ip: int = 1) -> torch.Tensor:
    """The adversarial direction d (unit L2 norm per sample, no gradient history), steps 2–3 above.

    ``distance(prediction, target)`` is differentiated with respect to d only.
    """
    d = torch.rand(x.shape, device=x.device, dtype=torch.float32) - 0.5
    d = l2_normalize_per_sample(d)
    for _ in range(ip):
        d = d.detach().requires_grad_(True)
        dist = distance(prob_fn(x + xi * d), target)
        (grad,) = torch.autograd.grad(dist, d)
        d = l2_normalize_per_sample(grad.detach().float())
    return d.detach()


def vat_loss(prob_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, *,
             distance: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], xi: float = 10.0, eps: float = 10.0,
             ip: int = 1, bn_module: nn.Module | None = None, target: torch.Tensor | None = None,
             full_precision: bool = True) -> torch.Tensor:
    """VAT loss distance(prob_fn(x + ε·d), p) with gradient to the network (steps 1–4 above).

    Args:
        prob_fn: maps an input batch to the probability tensor compared by ``distance``.
        x: the input batch; it needs no gradient.
        distance: ``distance(prediction, target)`` -> 0-d tensor (SS-Net: DiceFG-lin on the full
            two-channel softmax tensors).
        xi: finite-difference step of the power iteration (SS-Net 10).
        eps: perturbation magnitude (SS-Net ``--magnitude`` 10).
        ip: number of power iterations (SS-Net 1).
        bn_module: the network whose normalisation layers stop tracking running statistics during
            the perturbed forwards; None leaves them as they are.
        target: the clean prediction p; None computes prob_fn(x) under ``no_grad`` (the reference).
        full_precision: run every VAT forward in float32 with autocast off (see the module notes).
    """
    precise = torch.autocast(x.device.type, enabled=False) if full_precision else nullcontext()
    with precise:
        if full_precision:
            x = x.float()
        if target is None:
            with torch.no_grad():
                target = prob_fn(x)
        target = target.detach()
        if full_precision:
            target = target.float()
        frozen = bn_stats_frozen(bn_module) if bn_module is not None else nullcontext()
        with frozen:
            d = vat_perturbation(prob_fn, x, target, distance=distance, xi=xi, ip=ip)
            return distance(prob_fn(x + eps * d), target)
