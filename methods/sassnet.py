"""SASSNet: shape-aware adversarial semi-supervised segmentation (Li et al., MICCAI 2020), docs/methods.md §3.3.

Reference: kleinzcy/SASSnet ``code/train_gan_sdfloss.py`` with ``networks/discriminator.py``
(``FC3DDiscriminator``); README commands ``--label 16 --consistency 0.01`` and
``--label 8 --consistency 0.015``.

Two optimiser phases per iteration (the trainer zero-grads every optimiser before each phase):

* ``"main"`` — segmentation step, seg net in train mode, D in eval mode (no dropout):
  L_sup = DiceFG-sq(sigmoid(seg)[L], y) + 0.3·MSE(tanh[L], SDM_gt) — the BCE on the seg logit is
  computed and logged but NOT added (§3.3, §6.1 item 6);
  L_adv = CE(D(tanh[U], x[U]), 1) (fool D into calling unlabeled predictions "labeled");
  L = L_sup + λ·L_adv, λ = c·sigmoid_rampup(it0 // 150, 40). SGD step on the seg net only; the
  gradients L_adv leaves on D are cleared by the trainer before the D phase.
* ``"disc"`` — discriminator step, seg net in eval mode (BN running statistics, no dropout), D in
  train mode: the SDMs of all 4 samples are recomputed without gradient, and
  L_D = CE(D(tanh_all, x_all), [1, 1, 0, 0]) (1 = labeled image). Adam step on D only
  (lr 1e-4, betas (0.9, 0.99), no weight decay, constant lr).

Modes: the trainer calls :meth:`train_modes` at the start of each iteration (seg train, D eval:
the main phase's modes); :meth:`losses` sets the modes of its own phase explicitly, so the disc
phase switches to seg eval / D train, and the next iteration's :meth:`train_modes` switches back.

Adversarial weight c: the named option ``consistency`` (``StageContext.options``); by default
0.015 for 8 labels (README) and 0.01 for every other count (the script's default, README's 16-label
command). Evaluation: sigmoid of the seg head > 0.5, no LCC (``--nms 0``), last iteration (§2.4).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ssl_bench.errors import UserError
from ssl_bench.losses import dice_fg_sq, sigmoid_rampup, signed_distance_target
from ssl_bench.method import Stage, register

BETA = 0.3                 # weight of the SDM regression in L_sup
D_LR = 1e-4                # Adam, constant (the reference never changes it)
D_BETAS = (0.9, 0.99)
RAMPUP_EVERY = 150         # λ ramps with it0 // 150 over 40 steps (§1.7)
RAMPUP_LENGTH = 40
CONSISTENCY_8_LABELS = 0.015
CONSISTENCY_DEFAULT = 0.01
DOWNSAMPLING = 16          # four stride-2 convolutions


def discriminator_pool(patch) -> tuple[int, int, int]:
    """Average-pool kernel over D's remaining spatial extent: patch / 16 per axis.

    (7, 7, 5) at the reference's 112×112×80 (its hard-coded ``AvgPool3d((7, 7, 5))``), (3, 3, 2) at 48×48×32.
    """
    if len(patch) != 3 or any(p % DOWNSAMPLING for p in patch):
        raise ValueError(f"the discriminator needs a 3-D patch divisible by {DOWNSAMPLING}, got {tuple(patch)}")
    return tuple(int(p) // DOWNSAMPLING for p in patch)


class FC3DDiscriminator(nn.Module):
    """SASSNet's 3-D discriminator (§3.3): (predicted SDM, image) -> 2 logits (1 = labeled image).

    conv_map(SDM) + conv_image(image), each Conv3d 4/2/1 -> ndf; LeakyReLU(0.2), Dropout3d(0.5);
    Conv ndf->2ndf, LeakyReLU, Dropout3d; Conv 2ndf->4ndf, LeakyReLU, Dropout3d; Conv 4ndf->8ndf,
    LeakyReLU (all 4/2/1); AvgPool3d over the remaining patch/16 extent; Linear 8ndf -> 2.
    About 11.0 M parameters with ndf = 64 (the reference).
    """

    def __init__(self, patch=(112, 112, 80), map_channels: int = 1, image_channels: int = 1, ndf: int = 64):
        super().__init__()
        self.conv_map = nn.Conv3d(map_channels, ndf, kernel_size=4, stride=2, padding=1)
        self.conv_image = nn.Conv3d(image_channels, ndf, kernel_size=4, stride=2, padding=1)
        self.conv2 = nn.Conv3d(ndf, 2 * ndf, kernel_size=4, stride=2, padding=1)
        self.conv3 = nn.Conv3d(2 * ndf, 4 * ndf, kernel_size=4, stride=2, padding=1)
        self.conv4 = nn.Conv3d(4 * ndf, 8 * ndf, kernel_size=4, stride=2, padding=1)
        self.pool = nn.AvgPool3d(discriminator_pool(patch))
        self.classifier = nn.Linear(8 * ndf, 2)
        self.act = nn.LeakyReLU(negative_slope=0.2)
        self.dropout = nn.Dropout3d(p=0.5)

    def features(self, sdm: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """The 8·ndf-channel map before pooling ((patch/16) spatially)."""
        x = self.dropout(self.act(self.conv_map(sdm) + self.conv_image(image)))
        x = self.dropout(self.act(self.conv2(x)))
        x = self.dropout(self.act(self.conv3(x)))
        return self.act(self.conv4(x))

    def forward(self, sdm: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        n = sdm.shape[0]
        x = self.pool(self.features(sdm, image))
        return self.classifier(x.reshape(n, -1))


@register("sassnet")
class SASSNet(Stage):
    """SASSNet: SDM head + adversarial shape discriminator, 6000 iterations, batch 2 L + 2 U."""

    iterations = 6000
    batch_labeled = 2
    batch_unlabeled = 2
    base_lr = 0.01
    phases = ("main", "disc")
    trained = "seg"
    paper_lcc = False            # SASSNet's test script defaults to --nms 0 (§2.2)
    literature_selection = None  # README evaluates iter_6000 (§2.4)
    known_options = ("consistency",)

    def __init__(self, ctx):
        super().__init__(ctx)
        self.consistency = self._consistency(ctx)

    @staticmethod
    def _consistency(ctx) -> float:
        value = (ctx.options or {}).get("consistency")
        if value is None:
            return CONSISTENCY_8_LABELS if ctx.labeled == 8 else CONSISTENCY_DEFAULT
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise UserError(f"sassnet option consistency must be a number, got {value!r}") from None
        if not value >= 0.0:
            raise UserError(f"sassnet option consistency must be non-negative, got {value}")
        return value

    def adversarial_weight(self, it0: int) -> float:
        """λ(it0) = c·sigmoid_rampup(it0 // 150, 40) (§3.3, §1.7); 150 follows the schedule scale."""
        return self.consistency * sigmoid_rampup(it0 // self.scaled(RAMPUP_EVERY), RAMPUP_LENGTH)

    def networks(self):
        return {"seg": self.vnet(n_classes=1, head="B", dropout=True),
                "disc": FC3DDiscriminator(patch=self.ctx.patch)}

    def optimizers(self, nets):
        main = super().optimizers(nets)["main"]  # SGD mom 0.9, wd 1e-4 on the seg net (§1.8)
        disc = torch.optim.Adam(nets["disc"].parameters(), lr=D_LR, betas=D_BETAS, weight_decay=0.0)
        return {"main": main, "disc": disc}

    def train_modes(self, nets):
        """Modes of the main phase, which runs first: seg net train, D eval."""
        nets["seg"].train()
        nets["disc"].eval()

    @staticmethod
    def discriminator_targets(n_labeled: int, n_unlabeled: int, device=None) -> torch.Tensor:
        """[1]·B_L + [0]·B_U: the reference's hard-coded [1, 1, 0, 0] for its 2 + 2 batch."""
        return torch.tensor([1] * n_labeled + [0] * n_unlabeled, dtype=torch.long, device=device)

    def host_targets(self, batch):
        # computed in the trainer's background thread while the previous iteration trains (Stage.host_targets)
        return {"sdf": signed_distance_target(batch.label)}

    def losses(self, phase, nets, batch, it0):
        if phase == "main":
            return self._segmentation_step(nets, batch, it0)
        if phase == "disc":
            return self._discriminator_step(nets, batch)
        raise ValueError(f"sassnet has phases {self.phases}, got {phase!r}")

    def _segmentation_step(self, nets, batch, it0):
        seg, disc = nets["seg"], nets["disc"]
        seg.train()
        disc.eval()
        n_l = batch.n_labeled
        sdm, logit = seg(batch.image)
        sdm_l = sdm[:n_l, 0].float()
        logit_l = logit[:n_l, 0].float()
        y = batch.label.float()

        dice = dice_fg_sq(torch.sigmoid(logit_l), (batch.label == 1).float())
        sdm_gt = (getattr(batch, "host_targets", None) or {}).get("sdf")
        if sdm_gt is None:  # a batch that did not come through the trainer's prefetch
            sdm_gt = signed_distance_target(batch.label)
        sdm_gt = sdm_gt.to(sdm_l.device)
        sdf = F.mse_loss(sdm_l, sdm_gt)
        bce = F.binary_cross_entropy_with_logits(logit_l, y)  # logged only, never added (§3.3)
        supervised = dice + BETA * sdf

        d_logits = disc(sdm[n_l:], batch.unlabeled_image)
        fool = torch.ones(d_logits.shape[0], dtype=torch.long, device=d_logits.device)
        adv = F.cross_entropy(d_logits.float(), fool)

        weight = self.adversarial_weight(it0)
        loss = supervised + weight * adv
        return loss, {"dice": dice, "sdf": sdf, "bce": bce, "loss_sup": supervised, "loss_adv": adv,
                      "adv_weight": weight}

    def _discriminator_step(self, nets, batch):
        seg, disc = nets["seg"], nets["disc"]
        seg.eval()
        disc.train()
        with torch.no_grad():
            sdm_all, _ = seg(batch.image)
        d_logits = disc(sdm_all, batch.image)
        target = self.discriminator_targets(batch.n_labeled, batch.image.shape[0] - batch.n_labeled,
                                            device=d_logits.device)
        loss = F.cross_entropy(d_logits.float(), target)
        acc = (torch.argmax(d_logits, dim=1) == target).float().mean()
        return loss, {"d_acc": acc}

    def foreground_probability(self, net, x):
        """Sigmoid of the segmentation head; the SDM head is ignored at test time (§2.1)."""
        _, logit = net(x)
        return torch.sigmoid(logit.float())[:, 0]
