"""UA-MT: uncertainty-aware mean teacher (Yu et al., MICCAI 2019), docs/methods.md §3.2.

Reference: yulequan/UA-MT ``code/train_LA_meanteacher_certainty_unlabel.py`` (the README's "unlabel"
variant: noise, uncertainty and consistency on the unlabeled half of the batch only).

Per iteration (it0 = completed iterations, the reference's ``iter_num``):

1. student on all 4 clean inputs (2 labeled first, then 2 unlabeled);
2. teacher on the 2 unlabeled inputs + n, n = clip(N(0, 0.1²), ±0.2) per voxel -> consistency target;
3. T = 8 further teacher passes with fresh noise and dropout, batched as 4 forwards of the unlabeled
   inputs duplicated; u = -Σ_c p̄_c·ln(p̄_c + 1e-6) (nats, max ln 2) of the mean softmax p̄;
4. threshold H = (0.75 + 0.25·r(it0, L))·ln 2 with L the stage's iteration count, mask m = 1[u < H];
5. L_c = Σ m·(softmax(s) - softmax(t))² / (2·Σm + 1e-16) (sum over both channels and all voxels);
6. L_s = 0.5·(CE + DiceFG-sq(softmax channel 1)) on the 2 labeled samples;
7. L = L_s + λ·L_c, λ = 0.1·r(it0 // 150, 40);
8. after the SGD step: EMA of the parameters, α = min(1 - 1/(it0 + 1), 0.99) (buffers untouched).

The teacher's parameters never require a gradient and it stays in train mode (dropout active, BN
batch statistics), as in the reference; the default :meth:`Stage.train_modes` (all nets ``.train()``)
does exactly that. It is initialised independently (its own random draw, like the reference's second
``create_model``); the EMA at it0 = 0 (α = 0) makes it an exact copy of the student after step 1.
The student is evaluated, without LCC (§2.2), from the last iteration (§2.4).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ssl_bench.losses import (cross_entropy, dice_fg_sq, ema_update, sigmoid_rampup, softmax_mse,
                              uamt_ema_alpha)
from ssl_bench.method import Stage, register

N_CLASSES = 2
NOISE_STD = 0.1        # §3.2 item 2
NOISE_CLIP = 0.2
MC_PASSES = 8          # T, §3.2 item 3
CONSISTENCY = 0.1      # λ_max, §3.2 item 7
RAMPUP_EVERY = 150     # λ ramps with it0 // 150 over 40 steps (§1.7)
RAMPUP_LENGTH = 40
EMA_CAP = 0.99         # §3.2 item 8


def teacher_noise(x: torch.Tensor) -> torch.Tensor:
    """n = clip(N(0, 0.1²), -0.2, 0.2), independent per voxel (§3.2 item 2)."""
    return torch.clamp(torch.randn_like(x) * NOISE_STD, -NOISE_CLIP, NOISE_CLIP)


@torch.no_grad()
def mc_uncertainty(teacher: nn.Module, x_u: torch.Tensor, passes: int = MC_PASSES) -> torch.Tensor:
    """Predictive entropy of ``passes`` noisy teacher passes, (N, 1, X, Y, Z), in nats (§3.2 item 3).

    As in the reference, the unlabeled inputs are duplicated and run ``passes // 2`` times, each time
    with fresh noise (and fresh dropout masks: the teacher is in train mode). Output k of forward i
    is pass 2i + k // N of sample k % N. u = -Σ_c p̄_c·ln(p̄_c + 1e-6) with p̄ the mean softmax.
    """
    if passes % 2:
        raise ValueError(f"the passes are batched in pairs; got an odd count {passes}")
    n = x_u.shape[0]
    dup = x_u.repeat(2, 1, 1, 1, 1)
    outs = [teacher(dup + teacher_noise(dup)) for _ in range(passes // 2)]
    prob = torch.softmax(torch.cat(outs).float(), dim=1)          # (passes·N, C, X, Y, Z)
    mean = prob.reshape(passes, n, *prob.shape[1:]).mean(dim=0)   # (N, C, X, Y, Z)
    return -torch.sum(mean * torch.log(mean + 1e-6), dim=1, keepdim=True)


def uncertainty_threshold(it0: int, total_iterations: int) -> float:
    """H = (0.75 + 0.25·sigmoid_rampup(it0, L))·ln 2 in nats (§3.2 item 4; §1.7's exception to t // 150)."""
    return (0.75 + 0.25 * sigmoid_rampup(it0, total_iterations)) * math.log(2.0)


def certainty_mask(uncertainty: torch.Tensor, it0: int, total_iterations: int) -> torch.Tensor:
    """m = 1[u < H] as a float tensor (§3.2 item 4)."""
    return (uncertainty < uncertainty_threshold(it0, total_iterations)).float()


def masked_consistency(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                       mask: torch.Tensor) -> torch.Tensor:
    """L_c = Σ m·(softmax(s) - softmax(t))² / (2·Σm + 1e-16) (§3.2 item 5).

    ``mask`` (N, 1, X, Y, Z) broadcasts over the channels, so the numerator sums both channels;
    the denominator's 2 is the class count. An all-zero mask gives 0.
    """
    dist = softmax_mse(student_logits, teacher_logits.detach())
    m = mask.to(dist.dtype)
    return torch.sum(m * dist) / (N_CLASSES * torch.sum(m) + 1e-16)


def consistency_weight(it0: int, every: int = RAMPUP_EVERY) -> float:
    """λ(it0) = 0.1·sigmoid_rampup(it0 // 150, 40) (§3.2 item 7, §1.7); ``every``: 150 under the schedule scale."""
    return CONSISTENCY * sigmoid_rampup(it0 // every, RAMPUP_LENGTH)


@register("uamt")
class UAMT(Stage):
    """UA-MT: mean teacher with an MC-dropout certainty mask, 6000 iterations, batch 2 L + 2 U."""

    iterations = 6000
    batch_labeled = 2
    batch_unlabeled = 2
    base_lr = 0.01
    trained = "student"
    paper_lcc = False            # UA-MT's tester has no LCC (§2.2)
    literature_selection = None  # the reference evaluates iter_6000 (§2.4)

    def consistency_weight(self, it0: int) -> float:
        """λ(it0) of this run: the ramp unit 150 follows the schedule scale (Decision 10)."""
        return consistency_weight(it0, self.scaled(RAMPUP_EVERY))

    def total_iterations(self) -> int:
        """L of the threshold ramp: the number of iterations this stage actually runs.

        The reference uses ``max_iterations`` (6000, = its run length), so H reaches ln 2 at the last
        iteration. When the run overrides the count (``--iterations``; the smoke profile's 12) the ramp
        follows the override (``ctx.iterations``); otherwise the stage default (scaled) is the run length.
        """
        return self.run_iterations()

    def networks(self):
        student = self.vnet(n_classes=N_CLASSES, head="A", dropout=True)
        teacher = self.vnet(n_classes=N_CLASSES, head="A", dropout=True)
        for p in teacher.parameters():  # the reference's param.detach_(): never part of a graph
            p.requires_grad_(False)
        return {"student": student, "teacher": teacher}

    def losses(self, phase, nets, batch, it0):
        student, teacher = nets["student"], nets["teacher"]
        n_l = batch.n_labeled
        x_u = batch.unlabeled_image

        noise = teacher_noise(x_u)                     # item 2 (drawn first, as in the reference)
        logits = student(batch.image)                  # item 1: all 4 clean inputs
        with torch.no_grad():
            target = teacher(x_u + noise)              # item 2
            uncertainty = mc_uncertainty(teacher, x_u)  # item 3

        # item 6: L_s on the labeled half
        lab = logits[:n_l]
        ce = cross_entropy(lab, batch.label)
        dice = dice_fg_sq(torch.softmax(lab.float(), dim=1)[:, 1], (batch.label == 1).float())
        supervised = 0.5 * (ce + dice)

        # items 4-5: certainty-masked consistency on the unlabeled half only
        threshold = uncertainty_threshold(it0, self.total_iterations())
        mask = (uncertainty < threshold).float()       # = certainty_mask(uncertainty, it0, L)
        cons = masked_consistency(logits[n_l:], target, mask)

        weight = self.consistency_weight(it0)  # item 7
        loss = supervised + weight * cons
        return loss, {"ce": ce, "dice": dice, "loss_sup": supervised, "loss_cons": cons,
                      "cons_weight": weight, "threshold": threshold,
                      "mask_frac": mask.mean(), "uncertainty_mean": uncertainty.mean()}

    def after_step(self, nets, it0):
        """Item 8: θ_T ← α·θ_T + (1 - α)·θ_S after the SGD step, α = min(1 - 1/(it0 + 1), 0.99)."""
        ema_update(nets["teacher"], nets["student"], uamt_ema_alpha(it0, cap=EMA_CAP))
