"""OMF: Overlay Mantle-Free (Liu, Qian, Cao & Liu, MICCAI 2024), docs/methods.md §3.7, and its Table-2 ablations.

Reference: vigilliu/OMF ``code/LA_OMF_train.py`` (README: ``--base_lr=0.1``).

Notation. The paper's eqs. (1) and (4) write X_mix = X_j·Y_i + X_i·(1−Y_i) (label Y_i·Y_j) and
X_mix = X_q·Ỹ_p + X_p·(1−Ỹ_p). They agree with the code only when **Y is the BACKGROUND mask**
(1 − label), which is what the code's helper ``vigil_mask`` returns (§3.7.6 item 1). Read that way:

* eq. (1), stage 1: X_mix = X_i on i's own atrium and X_j elsewhere, i.e. i's atrium pasted onto j;
  the label's background Y_i·Y_j is the intersection of the backgrounds, so the label is the UNION of
  both atria. Here: X_ov = A⊙y_A + B⊙(1−y_A), Y_ov = y_A ∨ y_B, with y the foreground label.
* eq. (4), stage 2: X_mix = X_p on p's pseudo-atrium and X_q elsewhere (p's pseudo-atrium pasted onto
  q); the teacher sees the clean X_q. Here: X_mix = P⊙Ŷ_P + Q⊙(1−Ŷ_P), target T(Q).

This module implements the code semantics, quirks included (Decision 1): three separate forwards of 2
samples in stage 1, a FROZEN teacher kept in train mode in stage 2, no supervised term in stage 2, the
constant weight 1.7, lr 0.1 with ×0.1 at 10 000 (stage 1) and ×0.8 per 2500 (stage 2).

Registered names (Table 2 of the paper, §5.1; S1 = overlay pre-training, orgloss = stage 1 also trains
on the original labeled images, S2 = frozen-teacher distillation):

* ``omf-s1``          S1: one stage, :class:`OMFStage1Overlay`, L = L_ov.
* ``omf-s1-orgloss``  S1+orgloss: one stage, :class:`OMFStage1`, L = L_ov + L_A + L_B. This is exactly
  OMF's stage 1 (the code's stage 1 has always had the three terms, the ``win+3loss`` of the logs), so
  the variant is "OMF without stage 2": same class, same 15 000 iterations, same lr schedule, evaluated
  (with LCC by default) as the final network. Table 2 lists it with 0 unlabeled volumes: it uses none
  (the sampler still draws 4, discarded, as the reference's loader does).
* ``omf-s1-s2``       S1+S2: :class:`OMFStage1Overlay` then :class:`OMFStage2`.
* ``omf``             S1+orgloss+S2 (the method): :class:`OMFStage1` then :class:`OMFStage2`.

Because the trainer's ``--teacher RUN_DIR`` reuses another run's stage 1 only when the stage-1 class is
the same, an ``omf-s1`` run can feed ``omf-s1-s2`` and an ``omf-s1-orgloss`` run can feed ``omf``.
"""
from __future__ import annotations

from typing import ClassVar

import torch

from ssl_bench.losses import cross_entropy, dice_mc, softmax_mse
from ssl_bench.method import Stage, register
from ssl_bench.mixing import overlay, overlay_label, pseudo_label


def _sup(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """½(CE + DiceMC) (§3.7.2 item 6)."""
    return (cross_entropy(logits, target) + dice_mc(logits, target)) / 2


class OMFStage1Overlay(Stage):
    """OMF stage 1 without orgloss (Table 2 "S1"): overlay pre-training on labeled pairs, L = L_ov."""

    iterations = 15000
    batch_labeled = 4
    batch_unlabeled = 4  # drawn as in the reference's two-stream sampler, then discarded
    base_lr = 0.1
    paper_lcc = True
    literature_selection = (0, 200)
    #: also train on the original images A and B (L_A + L_B, the paper's "orgloss")
    orgloss: ClassVar[bool] = False

    def networks(self):
        return {"student": self.vnet(n_classes=2, head="A", dropout=True)}

    def lr(self, done: int) -> float:
        # §3.7.2 item 7: after the step of iteration 10 000 the code sets lr = 0.1·0.1, so iterations
        # 1..10 000 run at 0.1 and 10 001.. at 0.01 (the same assignment would repeat at 20 000)
        return self.base_lr * (0.1 if done >= self.scaled(10000) else 1.0)

    def losses(self, phase, nets, batch, it0):
        net = nets["student"]
        x, y = batch.labeled_image, batch.label
        a, b = x[0:2], x[2:4]  # pairs A_i, B_i (the code's vigil_mask hard-codes 2 per half)
        y_a, y_b = y[0:2], y[2:4]
        # X_ov = A⊙y_A + B⊙(1−y_A): A's atrium, cut along its ground truth, pasted onto B (eq. (1))
        x_ov = overlay(a, b, y_a)
        # Y_ov = y_A + y_B⊙(1−y_A) = y_A ∨ y_B: B's atrium stays visible where A's does not cover it
        y_ov = overlay_label(y_a, y_b)
        loss_ov = _sup(net(x_ov), y_ov)
        if not self.orgloss:
            return loss_ov, {"loss_ov": loss_ov}
        # the original (non-overlaid) images, each its own forward of 2 samples as in the code
        loss_a = _sup(net(a), y_a)
        loss_b = _sup(net(b), y_b)
        return loss_ov + loss_a + loss_b, {"loss_ov": loss_ov, "loss_a": loss_a, "loss_b": loss_b}


class OMFStage1(OMFStage1Overlay):
    """OMF stage 1 (Table 2 "S1+orgloss"): overlay pre-training, L = L_ov + L_A + L_B."""

    orgloss = True


class OMFStage2(Stage):
    """OMF (MICCAI 2024) stage 2: mantle-free distillation from a frozen stage-1 teacher, 1.7·softmax-MSE."""

    iterations = 15000
    batch_labeled = 4  # drawn and unused: stage 2 has no labeled term (§3.7.3 item 1)
    batch_unlabeled = 4
    base_lr = 0.1
    paper_lcc = True
    literature_selection = (0, 200)
    weight = 1.7  # hard-coded constant; the sigmoid ramp of the code is only logged

    def networks(self):
        teacher = self.vnet(n_classes=2, head="A", dropout=True)
        teacher.requires_grad_(False)  # frozen: detached, never updated (the EMA call is commented out)
        return {"student": self.vnet(n_classes=2, head="A", dropout=True), "teacher": teacher}

    def init_from(self, nets, previous):
        # student S and teacher T both load the stage-1 weights
        nets["student"].load_state_dict(previous)
        nets["teacher"].load_state_dict(previous)

    # train_modes: the default keeps T in train mode too (dropout on, batch statistics; its BN running
    # buffers drift, harmless since T is never evaluated), as in the code.

    def lr(self, done: int) -> float:
        # §3.7.3 item 8: after iteration i, i a multiple of 2500, lr = 0.1·0.8^(i/2500)
        return self.base_lr * 0.8 ** (done // self.scaled(2500))

    def losses(self, phase, nets, batch, it0):
        u = batch.unlabeled_image
        q, p = u[0:2], u[2:4]  # Q = unimg_a (background image), P = unimg_b (gives the "mantle")
        with torch.no_grad():
            z_q = nets["teacher"](q)
            z_p = nets["teacher"](p)
            # Ŷ_P: LCC of [softmax ch1 ≥ 0.5] per sample, 26-connectivity, empty kept (Ŷ_Q is unused: skipped)
            y_p = pseudo_label(z_p)
        # X_mix = P⊙Ŷ_P + Q⊙(1−Ŷ_P): P's predicted atrium overlaid onto Q (eq. (4))
        x_mix = overlay(p, q, y_p)
        z_s = nets["student"](x_mix)
        # target: the teacher on the CLEAN Q; mean over 2 samples × 2 channels × all voxels
        loss_a = softmax_mse(z_s, z_q).mean()
        return self.weight * loss_a, {"loss_a": loss_a}


register("omf", OMFStage1, OMFStage2,
         summary="OMF (MICCAI 2024): overlay pre-training (L_ov + L_A + L_B) + frozen-teacher mantle-free distillation")
register("omf-s1", OMFStage1Overlay,
         summary="OMF Table 2 'S1': overlay pre-training only (L_ov), one stage, labeled data only")
register("omf-s1-orgloss", OMFStage1,
         summary="OMF Table 2 'S1+orgloss': OMF stage 1 alone (L_ov + L_A + L_B), labeled data only")
register("omf-s1-s2", OMFStage1Overlay, OMFStage2,
         summary="OMF Table 2 'S1+S2': overlay-only (L_ov) stage 1, then OMF's stage-2 distillation")
