"""Entropy minimisation (Grandvalet & Bengio, NIPS 2004) on the ssl-bench V-Net: a worked example plugin.

One stage, one network (the student), batch 2 labeled + 2 unlabeled patches. Per iteration, with
it0 = completed iterations (0-based), s = student logits, p = softmax(s) over the 2 classes:

    L_s   = 0.5 · (CE(s_L, y) + DiceFG-sq(p_L[:, 1], y))                 supervised, labeled half
    H(p)  = -Σ_c p_c · ln(p_c + 1e-6)                                    per voxel, nats (max ln 2)
    L_ent = mean over the unlabeled voxels of H(p_U)
    λ(t)  = λ_max · exp(-5 · (1 - min(t, 40) / 40)²),  t = it0 // 150    the usual sigmoid ramp-up
    L     = L_s + λ(it0) · L_ent                                          λ_max = 0.1 (option entmin_weight)

SGD (momentum 0.9, weight decay 1e-4, lr 0.01, ×0.1 every 2500 iterations) and the evaluation of the
student come from ssl_bench's defaults (Stage.optimizers, Stage.lr, Stage.foreground_probability).

Only the public API is used: ssl_bench.method.Stage / register / StageContext (self.ctx), the batch
fields labeled_image, label and unlabeled_image, Stage.vnet(...) and the helpers of ssl_bench.losses.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ssl_bench.losses import cross_entropy, dice_fg_sq, sigmoid_rampup
from ssl_bench.method import Stage, register

__version__ = "0.1.0"

WEIGHT = 0.1          # λ_max
RAMPUP_EVERY = 150    # λ ramps with it0 // 150 ...
RAMPUP_LENGTH = 40    # ... over 40 steps (as UA-MT's consistency weight)
EPS = 1e-6


def voxel_entropy(logits: torch.Tensor) -> torch.Tensor:
    """H(p) = -Σ_c p_c·ln(p_c + 1e-6) per voxel, (N, X, Y, Z), in nats."""
    p = torch.softmax(logits.float(), dim=1)
    return -(p * torch.log(p + EPS)).sum(dim=1)


def entmin_weight(it0: int, weight: float = WEIGHT) -> float:
    """λ(it0) = λ_max · sigmoid_rampup(it0 // 150, 40)."""
    return weight * sigmoid_rampup(it0 // RAMPUP_EVERY, RAMPUP_LENGTH)


@register("entmin")
class EntMin(Stage):
    """Entropy minimisation: 0.5·(CE + DiceFG-sq) on labeled + λ·mean voxel entropy on unlabeled (example plugin)."""

    iterations = 6000
    batch_labeled = 2
    batch_unlabeled = 2
    base_lr = 0.01
    known_options = ("entmin_weight",)

    def __init__(self, ctx):
        super().__init__(ctx)
        self.weight = float(ctx.options.get("entmin_weight", WEIGHT))

    def networks(self):
        return {"student": self.vnet(n_classes=2, head="A", dropout=True)}

    def losses(self, phase, nets, batch, it0):
        n_l = batch.labeled_image.shape[0]
        logits = nets["student"](torch.cat([batch.labeled_image, batch.unlabeled_image]))
        s_l, s_u = logits[:n_l], logits[n_l:]
        ce = cross_entropy(s_l, batch.label)
        dice = dice_fg_sq(F.softmax(s_l, dim=1)[:, 1], batch.label.float())
        supervised = 0.5 * (ce + dice)
        entropy = voxel_entropy(s_u).mean()
        lam = entmin_weight(it0, self.weight)
        return supervised + lam * entropy, {"supervised": supervised, "entropy": entropy, "lambda": lam}
