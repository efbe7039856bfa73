"""DTC: dual-task consistency (Luo et al., AAAI 2021), docs/methods.md §3.4 (HiLab-git/DTC ``code/train_la_dtc.py``).

One V-Net with head B (§1.5): a tanh signed-distance head and a one-class segmentation logit.
Per iteration, on a batch of 2 labeled + 2 unlabeled crops:

    L_sup = DiceFG-sq(σ(seg)[L], y) + β·MSE(tanh[L], SDM_gt),           β = 0.3
    L_dtc = mean over all voxels of all 4 samples of (σ(-k·tanh) - σ(seg))²,   k = 1500
    L     = L_sup + λ(t)·L_dtc,   λ(t) = 1.0·sigmoid_rampup(t // 150, 40), t = completed iterations

The BCE of the segmentation logit is computed and logged but not added (§3.4, §6.1 item 6).
L_dtc has no stop-gradient: both heads and the shared trunk receive its gradient.
Evaluation reads the segmentation head only (sigmoid > 0.5) with LCC on (§2.2); the reference
reports the last iteration (issue HiLab-git/DTC#14, §2.4), so there is no best-on-test selection.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ssl_bench.losses import dice_fg_sq, sigmoid_rampup, signed_distance_target
from ssl_bench.method import Stage, register

#: sharpness of the smooth Heaviside that turns a signed distance into a mask (§3.4)
HEAVISIDE_K = 1500.0


def sdm_to_mask(sdm: torch.Tensor, k: float = HEAVISIDE_K) -> torch.Tensor:
    """σ(-k·sdm): ≈1 inside (negative distance), ≈0 outside, 0.5 on the boundary (§3.4; signs as in §1.6)."""
    return torch.sigmoid(-k * sdm)


@register("dtc")
class DTC(Stage):
    """DTC: Dice-sq + 0.3·SDM-MSE on labeled, (σ(-1500·sdm) - σ(seg))² consistency on all, 6000 iterations."""

    iterations = 6000
    batch_labeled = 2
    batch_unlabeled = 2
    base_lr = 0.01
    paper_lcc = True
    literature_selection = None  # the last iteration, per the maintainer (§2.4)

    beta = 0.3  # --beta: weight of the SDM regression
    consistency = 1.0  # --consistency: the effective maximum of λ (the unused --consistency_weight is 0.1)
    rampup_length = 40.0  # --consistency_rampup, in units of 150 (scaled) iterations

    def networks(self):
        return {"student": self.vnet(n_classes=1, head="B", dropout=True)}

    def consistency_weight(self, it0: int) -> float:
        # the reference computes the ramp before incrementing iter_num: t = completed iterations
        return self.consistency * sigmoid_rampup(it0 // self.scaled(150), self.rampup_length)

    def host_targets(self, batch):
        # computed in the trainer's background thread while the previous iteration trains (Stage.host_targets)
        return {"sdf": signed_distance_target(batch.label)}

    def losses(self, phase, nets, batch, it0):
        sdm, seg = nets["student"](batch.image)
        sdm, seg = sdm.float(), seg.float()  # losses in float32 whatever the autocast dtype
        prob = torch.sigmoid(seg)
        nl = batch.n_labeled
        y = (batch.label == 1).float()

        # supervised part on the labeled samples (§3.4): Dice-sq + β·MSE to the normalised SDM
        sdm_gt = (getattr(batch, "host_targets", None) or {}).get("sdf")
        if sdm_gt is None:  # a batch that did not come through the trainer's prefetch
            sdm_gt = signed_distance_target(batch.label)
        sdm_gt = sdm_gt.to(sdm.device)
        mse_sdm = F.mse_loss(sdm[:nl, 0], sdm_gt)
        dice = dice_fg_sq(prob[:nl, 0], y)
        with torch.no_grad():  # logged only: the reference never adds it to the loss
            bce = F.binary_cross_entropy_with_logits(seg[:nl, 0], y)
        supervised = dice + self.beta * mse_sdm

        # dual-task consistency on every voxel of every sample, gradient to both heads
        consistency = torch.mean((sdm_to_mask(sdm) - prob) ** 2)
        lam = self.consistency_weight(it0)
        loss = supervised + lam * consistency
        return loss, {"dice": dice, "mse_sdm": mse_sdm, "bce": bce, "consistency": consistency,
                      "consistency_weight": lam}

    def foreground_probability(self, net, x):
        """Sigmoid of the segmentation head; the SDM head is ignored at test time (§2.1)."""
        _, seg = net(x)
        return torch.sigmoid(seg.float())[:, 0]
