"""BCP: bidirectional copy-paste (Bai et al., CVPR 2023), docs/methods.md §3.6.

Reference: DeepMed-Lab-ECNU/BCP ``code/LA_BCP_train.py`` and ``code/utils/BCP_utils.py``.

Two stages, V-Net head A (two classes, dropout on), batch 8 = 4 labeled + 4 unlabeled (§1.4):

1. Pre-training on labeled data only (the unlabeled half is drawn and discarded): 2000 iterations,
   constant lr 0.01; the centre cuboid of L_a is replaced by L_b's, label mixed the same way;
   loss ½(CE + DiceMC).
2. Self-training: student and an EMA teacher (α = 0.99 after every step, teacher in train mode), both
   initialised from the stage-1 weights; 15 000 iterations, lr 0.01 ×0.1 per 2500. Labeled and
   unlabeled volumes are copy-pasted both ways; the teacher's hard LCC pseudo-labels supervise the
   unlabeled regions at weight α = 0.5 (``u_weight``).

Both stages keep the best test-set Dice every 200 iterations in the reference (``literature``
protocol); the test script applies LCC.
"""
from __future__ import annotations

import torch

from ssl_bench.losses import cross_entropy, dice_mc, ema_update, masked_cross_entropy
from ssl_bench.method import Stage, register
from ssl_bench.mixing import mix, pseudo_label, random_cut_mask


def _split_pairs(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x[0:2], x[2:4]): the reference's ``sub_bs = labeled_bs // 2`` halves."""
    return t[0:2], t[2:4]


def mix_loss(logits: torch.Tensor, target_out: torch.Tensor, target_in: torch.Tensor, m: torch.Tensor,
             w_out: float, w_in: float) -> torch.Tensor:
    """BCP ``mix_loss`` (§3.6 stage 2 item 3) on one mixed volume.

    ½·[w_out·DiceMC(target_out, mask M) + w_in·DiceMC(target_in, mask 1−M)
       + w_out·CE_masked(target_out, M) + w_in·CE_masked(target_in, 1−M)]

    ``m`` is the cut mask M (1 outside the cuboid); ``target_out`` supervises the outside, ``target_in``
    the cuboid. Labeled regions get weight 1, pseudo-labeled ones α = 0.5.
    """
    outside = m.float()
    inside = 1.0 - outside
    dice = w_out * dice_mc(logits, target_out, outside) + w_in * dice_mc(logits, target_in, inside)
    ce = (w_out * masked_cross_entropy(logits, target_out, outside)
          + w_in * masked_cross_entropy(logits, target_in, inside))
    return (dice + ce) / 2


class BCPStage1(Stage):
    """BCP stage 1: copy-paste pre-training on labeled pairs, ½(CE + DiceMC), constant lr 0.01."""

    iterations = 2000
    batch_labeled = 4
    batch_unlabeled = 4  # drawn as in the reference's two-stream sampler, then discarded
    base_lr = 0.01
    paper_lcc = True
    literature_selection = (0, 200)

    def networks(self):
        return {"student": self.vnet(n_classes=2, head="A", dropout=True)}

    def lr(self, done: int) -> float:
        return self.base_lr  # the pre-training loop never changes the learning rate

    def losses(self, phase, nets, batch, it0):
        l_a, l_b = _split_pairs(batch.labeled_image)
        y_a, y_b = _split_pairs(batch.label)
        m = random_cut_mask(l_a.shape[-3:], device=l_a.device)
        # X = L_a⊙M + L_b⊙(1−M): L_b fills the cuboid; the label is mixed the same way
        x = mix(l_a, l_b, m)
        y = mix(y_a, y_b, m)
        logits = nets["student"](x)
        ce = cross_entropy(logits, y)
        dice = dice_mc(logits, y)
        return (ce + dice) / 2, {"ce": ce, "dice": dice}


class BCPStage2(Stage):
    """BCP (Bai et al., CVPR 2023): bidirectional copy-paste self-training with an EMA teacher."""

    iterations = 15000
    batch_labeled = 4
    batch_unlabeled = 4
    base_lr = 0.01  # ×0.1 per 2500 (the default Stage.lr, §1.8)
    paper_lcc = True
    literature_selection = (0, 200)
    ema_alpha = 0.99  # fixed, no warm-up formula
    u_weight = 0.5  # weight of the pseudo-labeled region

    def networks(self):
        teacher = self.vnet(n_classes=2, head="A", dropout=True)
        teacher.requires_grad_(False)  # the reference detaches the EMA model's parameters
        return {"student": self.vnet(n_classes=2, head="A", dropout=True), "teacher": teacher}

    def init_from(self, nets, previous):
        # student and teacher both start from the stage-1 weights
        nets["student"].load_state_dict(previous)
        nets["teacher"].load_state_dict(previous)

    def after_step(self, nets, it0):
        # BCP's update_ema_variables: ema.mul_(α).add_((1 - α) * param), the product rounded on its own
        ema_update(nets["teacher"], nets["student"], self.ema_alpha, fused=False)

    def losses(self, phase, nets, batch, it0):
        l_a, l_b = _split_pairs(batch.labeled_image)
        y_a, y_b = _split_pairs(batch.label)
        u_a, u_b = _split_pairs(batch.unlabeled_image)
        m = random_cut_mask(l_a.shape[-3:], device=l_a.device)  # drawn first: one cuboid for both mixes
        with torch.no_grad():  # teacher in train mode (dropout, batch statistics), no gradient
            plab_a = pseudo_label(nets["teacher"](u_a))
            plab_b = pseudo_label(nets["teacher"](u_b))
        # X_in = L_a⊙M + U_a⊙(1−M): labeled outside (y_a), unlabeled cuboid inside (Ŷ_a)
        x_in = mix(l_a, u_a, m)
        # X_out = U_b⊙M + L_b⊙(1−M): unlabeled outside (Ŷ_b), labeled cuboid inside (y_b)
        x_out = mix(u_b, l_b, m)
        z_in = nets["student"](x_in)
        z_out = nets["student"](x_out)
        loss_in = mix_loss(z_in, y_a, plab_a, m, w_out=1.0, w_in=self.u_weight)
        loss_out = mix_loss(z_out, plab_b, y_b, m, w_out=self.u_weight, w_in=1.0)
        return loss_in + loss_out, {"loss_l": loss_in, "loss_u": loss_out}


register("bcp", BCPStage1, BCPStage2,
         summary="BCP (CVPR 2023): copy-paste pre-training (2000 it) + bidirectional copy-paste EMA self-training")
