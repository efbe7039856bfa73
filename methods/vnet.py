"""Labeled-only V-Net baseline (docs/methods.md §3.1; UA-MT ``code/train_LA.py``)."""
import torch.nn.functional as F

from ssl_bench.losses import cross_entropy, dice_fg_sq
from ssl_bench.method import Stage, register


@register("vnet")
class VNetBaseline(Stage):
    """Labeled-only V-Net: 0.5·(CE + DiceFG-sq), 6000 iterations, batch 4 labeled."""

    iterations = 6000
    batch_labeled = 4
    batch_unlabeled = 0
    base_lr = 0.01
    keep_last_batch = True  # an ordinary shuffled DataLoader without drop_last

    def networks(self):
        return {"student": self.vnet(n_classes=2, head="A", dropout=True)}

    def losses(self, phase, nets, batch, it0):
        logits = nets["student"](batch.labeled_image)
        ce = cross_entropy(logits, batch.label)
        dice = dice_fg_sq(F.softmax(logits, dim=1)[:, 1], batch.label.float())
        return 0.5 * (ce + dice), {"ce": ce, "dice": dice}
