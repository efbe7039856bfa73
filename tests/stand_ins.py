"""Hand-made stand-in networks shared by the BCP and OMF wiring tests."""
import torch
from torch import nn

from ssl_bench.method import StageContext

S = 12  # hand-made volumes 12³ (BCP: cuboid sides 8, origins {0..3})


class Recorder(nn.Module):
    """A stand-in network: records its inputs, returns fn(x) (two-class logits)."""

    def __init__(self, fn):
        super().__init__()
        self.fn, self.inputs = fn, []
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        self.inputs.append(x.detach().clone())
        return self.fn(x) + self.w


def fg_where_bright(x):
    """Teacher stand-in: foreground probability ≥ 0.5 exactly where x ≥ 0.5."""
    return torch.cat([torch.zeros_like(x), 8 * (x - 0.5)], dim=1)


def student_fn(x):
    return torch.cat([0.3 * x, 0.1 - 0.7 * x], dim=1)


def ctx(patch=(S, S, S)):
    return StageContext(labeled=8, patch=patch, n_filters=2)


def nets_initialised_from_handed(stage):
    """Build a two-network stage, hand it fresh V-Net weights, check student and teacher both load them; (nets, weights)."""
    torch.manual_seed(0)
    nets = stage.networks()
    handed = {k: v.clone() for k, v in stage.vnet(n_classes=2, head="A", dropout=True).state_dict().items()}
    stage.init_from(nets, handed)
    for name in ("student", "teacher"):
        for k, v in nets[name].state_dict().items():
            assert torch.equal(v, handed[k])
    return nets, handed
