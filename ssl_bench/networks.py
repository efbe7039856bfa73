"""The simplified UA-MT "V-Net" shared by every method (docs/methods.md §1.5).

This is not Milletari's original V-Net: no 5x5x5 convolutions, no PReLU, no residual
blocks. Every conv stage is Conv3d(3x3x3, pad 1, bias) -> BatchNorm3d -> ReLU;
downsampling is Conv3d(2x2x2, stride 2) -> BN -> ReLU; upsampling is
ConvTranspose3d(2x2x2, stride 2) -> BN -> ReLU; skip connections are element-wise sums.

Widths (n_filters = 16, the paper setting; every width scales with n_filters):

    enc1  1 stage   16      down1 -> 32
    enc2  2 stages  32      down2 -> 64
    enc3  3 stages  64      down3 -> 128
    enc4  3 stages  128     down4 -> 256
    enc5  3 stages  256  [+ Dropout3d(0.5)]
    up5 -> 128 (+enc4)  dec6 3 stages
    up6 -> 64  (+enc3)  dec7 3 stages
    up7 -> 32  (+enc2)  dec8 2 stages
    up8 -> 16  (+enc1)  dec9 1 stage   [+ Dropout3d(0.5)]
    head

Heads:

* ``head="A"``: Conv3d 1x1x1 -> ``n_classes`` logits (baseline, UA-MT, SS-Net, BCP, OMF).
* ``head="B"``: DTC/SASSNet ``vnet_sdf`` (use ``n_classes=1``): two parallel 1x1x1 convs
  read dec9; one goes through tanh (predicted signed distance map in [-1, 1]), the other
  is the segmentation logit (read through a sigmoid by the methods).

Parameter counts (n_filters=16): 9,448,866 for head A with 2 classes, the same for head B
with 1 class; ``mlp_heads=True`` adds 8,452 (SS-Net/BCP/OMF projection/prediction heads
and four selectors). PyTorch default initialisation throughout.

Nothing here fixes a dtype or a memory format: the network runs under bf16/fp16
autocast and with ``torch.channels_last_3d`` inputs/weights.
"""

from __future__ import annotations

from typing import List

import torch
from torch import nn

__all__ = ["VNet", "count_parameters"]


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements of ``model`` (all of them unless ``trainable_only``)."""
    return int(
        sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
    )


def _conv_stage(c_in: int, c_out: int) -> List[nn.Module]:
    return [
        nn.Conv3d(c_in, c_out, kernel_size=3, padding=1, bias=True),
        nn.BatchNorm3d(c_out),
        nn.ReLU(inplace=True),
    ]


def _conv_block(n_stages: int, c_in: int, c_out: int) -> nn.Sequential:
    """``n_stages`` conv stages; the first maps c_in -> c_out, the rest keep c_out."""
    layers: List[nn.Module] = []
    for i in range(n_stages):
        layers += _conv_stage(c_in if i == 0 else c_out, c_out)
    return nn.Sequential(*layers)


def _down(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(c_in, c_out, kernel_size=2, stride=2, padding=0, bias=True),
        nn.BatchNorm3d(c_out),
        nn.ReLU(inplace=True),
    )


def _up(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.ConvTranspose3d(c_in, c_out, kernel_size=2, stride=2, padding=0, bias=True),
        nn.BatchNorm3d(c_out),
        nn.ReLU(inplace=True),
    )


def _selector(width: int = 32) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(width, width),
        nn.BatchNorm1d(width),
        nn.LeakyReLU(negative_slope=0.2, inplace=True),
        nn.Linear(width, 1),
    )


class VNet(nn.Module):
    """UA-MT simplified V-Net (docs/methods.md §1.5).

    Args:
        in_channels: input image channels (1 for LA MRI).
        n_classes: output channels of the segmentation head (2 for head A; 1 for head B).
        n_filters: base width (16 in every reference); all widths scale with it
            (n, 2n, 4n, 8n, 16n), so e.g. ``n_filters=4`` gives a tiny network for CPU
            smoke runs.
        head: ``"A"`` (1x1x1 conv -> logits) or ``"B"`` (DTC/SASSNet ``vnet_sdf``: tanh SDM
            head and a segmentation-logit head, both 1x1x1 convs on dec9).
        dropout: if True, ``Dropout3d(p=0.5)`` after enc5 and after dec9 (active only in
            train mode, like any dropout). If False the network contains no dropout module.
        mlp_heads: if True, add the SS-Net/BCP/OMF extra modules (not used by ``forward``):
            ``projection_head`` (Linear n_filters->32, BN1d, ReLU, Linear 32->32),
            ``prediction_head`` (Linear 32->32, BN1d, ReLU, Linear 32->32),
            ``selectors_feat[c]`` and ``selectors_mem[c]`` for c in {0, 1}
            (Linear 32->32, BN1d, LeakyReLU(0.2), Linear 32->1 each).

    Forward: ``forward(x, return_features=False)`` with x of shape (N, in_channels, X, Y, Z),
    X, Y, Z divisible by 16.

    * head A: logits (N, n_classes, X, Y, Z); with ``return_features``:
      ``(logits, features)``.
    * head B: ``(sdm_tanh, seg_logit)``, each (N, n_classes, X, Y, Z); with
      ``return_features``: ``(sdm_tanh, seg_logit, features)``.

    ``features`` is the n_filters-channel dec9 map after dropout (the SS-Net second output).
    """

    def __init__(
        self,
        in_channels: int = 1,
        n_classes: int = 2,
        n_filters: int = 16,
        head: str = "A",
        dropout: bool = True,
        mlp_heads: bool = False,
    ) -> None:
        super().__init__()
        head = str(head).upper()
        if head not in ("A", "B"):
            raise ValueError(f"head must be 'A' or 'B', got {head!r}")
        if n_filters < 1 or n_classes < 1 or in_channels < 1:
            raise ValueError("in_channels, n_classes and n_filters must be positive")
        self.in_channels = in_channels
        self.n_classes = n_classes
        self.n_filters = n_filters
        self.head_type = head
        self.has_dropout = bool(dropout)
        self.has_mlp_heads = bool(mlp_heads)

        f = n_filters
        # Encoder.
        self.enc1 = _conv_block(1, in_channels, f)
        self.down1 = _down(f, 2 * f)
        self.enc2 = _conv_block(2, 2 * f, 2 * f)
        self.down2 = _down(2 * f, 4 * f)
        self.enc3 = _conv_block(3, 4 * f, 4 * f)
        self.down3 = _down(4 * f, 8 * f)
        self.enc4 = _conv_block(3, 8 * f, 8 * f)
        self.down4 = _down(8 * f, 16 * f)
        self.enc5 = _conv_block(3, 16 * f, 16 * f)
        # Decoder.
        self.up5 = _up(16 * f, 8 * f)
        self.dec6 = _conv_block(3, 8 * f, 8 * f)
        self.up6 = _up(8 * f, 4 * f)
        self.dec7 = _conv_block(3, 4 * f, 4 * f)
        self.up7 = _up(4 * f, 2 * f)
        self.dec8 = _conv_block(2, 2 * f, 2 * f)
        self.up8 = _up(2 * f, f)
        self.dec9 = _conv_block(1, f, f)

        if self.has_dropout:
            self.dropout_enc5 = nn.Dropout3d(p=0.5)
            self.dropout_dec9 = nn.Dropout3d(p=0.5)

        if head == "A":
            self.out_conv = nn.Conv3d(f, n_classes, kernel_size=1, bias=True)
        else:
            self.sdm_conv = nn.Conv3d(f, n_classes, kernel_size=1, bias=True)
            self.seg_conv = nn.Conv3d(f, n_classes, kernel_size=1, bias=True)

        if self.has_mlp_heads:
            self.projection_head = nn.Sequential(
                nn.Linear(f, 32),
                nn.BatchNorm1d(32),
                nn.ReLU(inplace=True),
                nn.Linear(32, 32),
            )
            self.prediction_head = nn.Sequential(
                nn.Linear(32, 32),
                nn.BatchNorm1d(32),
                nn.ReLU(inplace=True),
                nn.Linear(32, 32),
            )
            self.selectors_feat = nn.ModuleList([_selector(32) for _ in range(2)])
            self.selectors_mem = nn.ModuleList([_selector(32) for _ in range(2)])

    def encode(self, x: torch.Tensor):
        """Encoder pass; returns the five encoder outputs (enc5 after dropout)."""
        x1 = self.enc1(x)
        x2 = self.enc2(self.down1(x1))
        x3 = self.enc3(self.down2(x2))
        x4 = self.enc4(self.down3(x3))
        x5 = self.enc5(self.down4(x4))
        if self.has_dropout:
            x5 = self.dropout_enc5(x5)
        return x1, x2, x3, x4, x5

    def decode(self, feats) -> torch.Tensor:
        """Decoder pass; returns the dec9 feature map (after dropout)."""
        x1, x2, x3, x4, x5 = feats
        y = self.dec6(self.up5(x5) + x4)
        y = self.dec7(self.up6(y) + x3)
        y = self.dec8(self.up7(y) + x2)
        y = self.dec9(self.up8(y) + x1)
        if self.has_dropout:
            y = self.dropout_dec9(y)
        return y

    def forward(self, x: torch.Tensor, return_features: bool = False):
        features = self.decode(self.encode(x))
        if self.head_type == "A":
            logits = self.out_conv(features)
            return (logits, features) if return_features else logits
        sdm = torch.tanh(self.sdm_conv(features))
        seg = self.seg_conv(features)
        return (sdm, seg, features) if return_features else (sdm, seg)
