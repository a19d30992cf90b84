"""PSPNet -- Pyramid Scene Parsing Network (Zhao, Shi, Qi, Wang & Jia, CVPR 2017).

Pyramid pooling module on the last backbone stage ``x`` (2048 ch, 1/8), bins ``b in (1,2,3,6)``:

    p_b = Up_bilinear( ConvBNReLU_1x1( AdaptiveAvgPool_b(x) ) )       2048 -> 512 each
    f   = ConvBNReLU_3x3( [x, p_1, p_2, p_3, p_6] )                   4096 -> 512
    y   = W_cls * Dropout2d_0.1(f) + b                                 512 -> K  (1/8)

Deep supervision: the auxiliary FCN head on stage 3 (the paper's res4b22 loss) with weight
0.4, ``L = CE(y) + 0.4 CE(y_aux)``. The layout, channel widths (512 per branch, as mmseg;
the paper reduces to 1/N of 2048 = 512 as well) and names follow mmseg's ``PSPHead``.

Where the paper is silent: up-sampling uses ``align_corners=False``; BN sits in every
pyramid branch, so a training batch needs >= 2 images (the 1x1 bin has one value per
channel and image).

Parameters at 21 classes on R-101-D8: backbone 42.52 M + head 23.08 M + aux 2.37 M =
67.97 M (65.60 M without aux), models.md's table.
"""

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.segmentors import register
from models.segmentors.layers import (ConvModule, DecodeHead, EncoderDecoder, aux_fcn_head,
                                      in_channels_of, make_backbone, select)


class PPM(nn.ModuleList):
    """Pyramid pooling: one ``Sequential(AdaptiveAvgPool2d(b), ConvModule 1x1)`` per bin."""

    def __init__(self, bins: Sequence[int], in_channels: int, channels: int):
        super().__init__(nn.Sequential(nn.AdaptiveAvgPool2d(b), ConvModule(in_channels, channels, 1))
                         for b in bins)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        size = x.shape[-2:]
        return [F.interpolate(branch(x), size=size, mode="bilinear", align_corners=False)
                for branch in self]


class PSPHead(DecodeHead):
    def __init__(self, in_channels: int, channels: int, num_classes: int,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), dropout_ratio: float = 0.1,
                 in_index: int = -1):
        super().__init__(channels, num_classes, dropout_ratio, in_index)
        if not pool_scales or min(pool_scales) < 1:
            raise ValueError(f"pool_scales must be positive integers, got {pool_scales}")
        self.psp_modules = PPM(pool_scales, in_channels, channels)
        self.bottleneck = ConvModule(in_channels + len(pool_scales) * channels, channels, 3)

    def forward(self, feats) -> torch.Tensor:
        x = select(feats, self.in_index)
        f = self.bottleneck(torch.cat([x, *self.psp_modules(x)], dim=1))
        return self.cls_seg(f)


@register("pspnet")
def build_pspnet(num_classes: int, backbone: str | nn.Module = "resnet101", pretrained: bool = False,
                 *, channels: int = 512, pool_scales: Sequence[int] = (1, 2, 3, 6),
                 dropout_ratio: float = 0.1, aux: bool = True, aux_channels: int = 256,
                 aux_weight: float = 0.4, backbone_options: dict | None = None) -> EncoderDecoder:
    """PSPNet on ``backbone``; ``aux=False`` drops the auxiliary head."""
    net = make_backbone(backbone, pretrained, backbone_options)
    head = PSPHead(in_channels_of(net, -1), channels, num_classes, pool_scales, dropout_ratio)
    aux_head = (aux_fcn_head(in_channels_of(net, -2), num_classes, aux_channels, dropout_ratio)
                if aux else None)
    return EncoderDecoder(net, head, aux_head, aux_weight)
