"""The DeepLab family on an output-stride-8 backbone: LargeFOV, v2, v3 and v3+.

``deeplab_largefov`` -- DeepLab v1 LargeFOV (Chen et al., ICLR 2015), as MCIS trained it
(Caffe DeepLab-LargeFOV on ResNet-101: the fc6/fc7/fc8 head on the last stage):

    f6 = Dropout_0.5( ReLU( W6 *_{d=12} x + b6 ) )       3x3, dilation 12, 2048 -> 1024
    f7 = Dropout_0.5( ReLU( W7 * f6 + b7 ) )              1x1, 1024 -> 1024
    y  = W8 * f7 + b8                                      1x1, 1024 -> K, W8 ~ N(0, 0.01^2)

No BN in the head (Caffe's), element-wise dropout, no auxiliary head by default. Not in
models.md's table (mmseg has no LargeFOV): head 19.95 M, 62.47 M in all at 21 classes on
R-101-D8.

``deeplabv2`` -- DeepLab v2 (Chen et al., TPAMI 2017), ResNet-101 ASPP-L: four parallel 3x3
convolutions straight to the classes, dilations (6, 12, 18, 24) at output stride 8, summed:

    y = sum_{r in (6,12,18,24)} ( W_r *_{d=r} x + b_r ),   W_r ~ N(0, 0.01^2)

(the VGG variant's per-branch fc6/fc7 are not used with ResNet in the paper's release).
Head 1.55 M, 44.07 M in all at 21 classes on R-101-D8; not in the table.

``deeplabv3`` -- DeepLab v3 (Chen et al., arXiv 2017), mmseg's ``ASPPHead``:

    a_0 = Up( ConvBNReLU_1x1( GAP(x) ) )                 image pooling, 2048 -> C
    a_r = ConvBNReLU_{1x1 if r=1 else 3x3, d=r}(x),  r in (1, 12, 24, 36)   (paper's 6/12/18 x 2 at OS 8)
    f   = ConvBNReLU_kxk( [a_0, a_1, a_12, a_24, a_36] ) 5C -> C
    y   = W_cls * Dropout2d_0.1(f) + b

mmseg uses C = 512 and a 3x3 projection (k = 3): head 42.22 M, with aux 87.11 M in all =
models.md's table. The paper uses C = 256 and a 1x1 projection (``channels=256,
bottleneck_kernel=1``): head 15.54 M.

``deeplabv3plus`` -- DeepLab v3+ (Chen et al., ECCV 2018), mmseg's
``DepthwiseSeparableASPPHead``: the ASPP above with depthwise-separable dilated branches
(depthwise 3x3 + BN + ReLU, pointwise 1x1 + BN + ReLU), then a decoder on stage 1 (1/4):

    l = ConvBNReLU_1x1(c1)                               256 -> 48
    f = SepConv_3x3( SepConv_3x3( [Up(aspp), l] ) )      C + 48 -> C -> C
    y = W_cls * Dropout2d_0.1(f) + b                     logits at 1/4

mmseg (C = 512): head 17.70 M, 62.58 M in all = the table. The paper uses C = 256 and plain
3x3 convs in the decoder; ``channels=256`` gives the 256-wide variant.

DeepLab v3/v3+ carry the auxiliary FCN head (0.4) of mmseg's configs by default; LargeFOV
and v2 do not (the papers have none). Every decode head is ``decode_head``. As in mmseg, the
image-pooling branch has BN on a 1x1 map, so a training batch (per process) needs >= 2 images.
"""

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.segmentors import register
from models.segmentors.layers import (ConvModule, DecodeHead, DepthwiseSeparableConvModule,
                                      EncoderDecoder, aux_fcn_head, in_channels_of, make_backbone,
                                      select)


# --------------------------------------------------------------------------- LargeFOV
class LargeFOVHead(DecodeHead):
    """fc6 (3x3, dilation 12) -> ReLU -> dropout -> fc7 (1x1) -> ReLU -> dropout -> fc8."""

    def __init__(self, in_channels: int, num_classes: int, channels: int = 1024,
                 dilation: int = 12, dropout_ratio: float = 0.5, in_index: int = -1):
        super().__init__(channels, num_classes, dropout_ratio=0, in_index=in_index)
        self.fc6 = ConvModule(in_channels, channels, 3, dilation=dilation, norm=False)
        self.drop6 = nn.Dropout(dropout_ratio)
        self.fc7 = ConvModule(channels, channels, 1, norm=False)
        self.dropout = nn.Dropout(dropout_ratio)

    def forward(self, feats) -> torch.Tensor:
        x = select(feats, self.in_index)
        return self.cls_seg(self.fc7(self.drop6(self.fc6(x))))


# --------------------------------------------------------------------------- v2
class ASPPSumHead(nn.Module):
    """DeepLab v2 ASPP-L: ``y = sum_r conv3x3_{d=r}(x)`` straight to class scores."""

    def __init__(self, in_channels: int, num_classes: int,
                 dilations: Sequence[int] = (6, 12, 18, 24), in_index: int = -1):
        super().__init__()
        if not dilations:
            raise ValueError("dilations must not be empty")
        self.in_index = in_index
        self.num_classes = num_classes
        self.aspp_modules = nn.ModuleList(
            nn.Conv2d(in_channels, num_classes, 3, padding=d, dilation=d) for d in dilations)
        for conv in self.aspp_modules:
            nn.init.normal_(conv.weight, 0.0, 0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, feats) -> torch.Tensor:
        x = select(feats, self.in_index)
        return sum(branch(x) for branch in self.aspp_modules)


# --------------------------------------------------------------------------- v3 / v3+
class ASPPModule(nn.ModuleList):
    """Parallel ConvModules, 1x1 for dilation 1 and 3x3 dilated otherwise (mmseg layout)."""

    def __init__(self, dilations: Sequence[int], in_channels: int, channels: int,
                 separable: bool = False):
        branches = []
        for d in dilations:
            if d == 1:
                branches.append(ConvModule(in_channels, channels, 1))
            elif separable:
                branches.append(DepthwiseSeparableConvModule(in_channels, channels, 3, dilation=d))
            else:
                branches.append(ConvModule(in_channels, channels, 3, dilation=d))
        super().__init__(branches)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [branch(x) for branch in self]


class ASPPHead(DecodeHead):
    """DeepLab v3 ASPP + image pooling (mmseg ``ASPPHead``)."""

    def __init__(self, in_channels: int, channels: int, num_classes: int,
                 dilations: Sequence[int] = (1, 12, 24, 36), bottleneck_kernel: int = 3,
                 dropout_ratio: float = 0.1, in_index: int = -1, separable: bool = False):
        super().__init__(channels, num_classes, dropout_ratio, in_index)
        if not dilations:
            raise ValueError("dilations must not be empty")
        self.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), ConvModule(in_channels, channels, 1))
        self.aspp_modules = ASPPModule(dilations, in_channels, channels, separable)
        self.bottleneck = ConvModule((len(dilations) + 1) * channels, channels, bottleneck_kernel)

    def aspp(self, x: torch.Tensor) -> torch.Tensor:
        pooled = F.interpolate(self.image_pool(x), size=x.shape[-2:], mode="bilinear",
                               align_corners=False)
        return self.bottleneck(torch.cat([pooled, *self.aspp_modules(x)], dim=1))

    def forward(self, feats) -> torch.Tensor:
        return self.cls_seg(self.aspp(select(feats, self.in_index)))


class DepthwiseSeparableASPPHead(ASPPHead):
    """DeepLab v3+ (mmseg ``DepthwiseSeparableASPPHead``): separable ASPP + low-level decoder."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, c1_in_channels: int,
                 c1_channels: int = 48, dilations: Sequence[int] = (1, 12, 24, 36),
                 dropout_ratio: float = 0.1, in_index: int = -1, c1_index: int = 0):
        super().__init__(in_channels, channels, num_classes, dilations, 3, dropout_ratio,
                         in_index, separable=True)
        self.c1_index = c1_index
        self.c1_bottleneck = ConvModule(c1_in_channels, c1_channels, 1)
        self.sep_bottleneck = nn.Sequential(
            DepthwiseSeparableConvModule(channels + c1_channels, channels, 3),
            DepthwiseSeparableConvModule(channels, channels, 3))

    def forward(self, feats) -> torch.Tensor:
        if isinstance(feats, torch.Tensor):
            raise ValueError("DeepLab v3+ needs the list of backbone levels (low-level decoder)")
        out = self.aspp(select(feats, self.in_index))
        c1 = self.c1_bottleneck(select(feats, self.c1_index))
        out = F.interpolate(out, size=c1.shape[-2:], mode="bilinear", align_corners=False)
        return self.cls_seg(self.sep_bottleneck(torch.cat([out, c1], dim=1)))


# --------------------------------------------------------------------------- builders
def _aux(net, num_classes, aux, aux_channels, dropout_ratio):
    return aux_fcn_head(in_channels_of(net, -2), num_classes, aux_channels, dropout_ratio) if aux else None


@register("deeplab_largefov")
def build_deeplab_largefov(num_classes: int, backbone: str | nn.Module = "resnet101",
                           pretrained: bool = False, *, channels: int = 1024, dilation: int = 12,
                           dropout_ratio: float = 0.5, aux: bool = False, aux_channels: int = 256,
                           aux_weight: float = 0.4, backbone_options: dict | None = None) -> EncoderDecoder:
    """DeepLab-LargeFOV (MCIS's segmentor)."""
    net = make_backbone(backbone, pretrained, backbone_options)
    head = LargeFOVHead(in_channels_of(net, -1), num_classes, channels, dilation, dropout_ratio)
    return EncoderDecoder(net, head, _aux(net, num_classes, aux, aux_channels, 0.1), aux_weight)


@register("deeplabv2")
def build_deeplabv2(num_classes: int, backbone: str | nn.Module = "resnet101", pretrained: bool = False,
                    *, dilations: Sequence[int] = (6, 12, 18, 24), aux: bool = False,
                    aux_channels: int = 256, aux_weight: float = 0.4,
                    backbone_options: dict | None = None) -> EncoderDecoder:
    """DeepLab v2 (ASPP-L, summed class scores)."""
    net = make_backbone(backbone, pretrained, backbone_options)
    head = ASPPSumHead(in_channels_of(net, -1), num_classes, dilations)
    return EncoderDecoder(net, head, _aux(net, num_classes, aux, aux_channels, 0.1), aux_weight)


@register("deeplabv3")
def build_deeplabv3(num_classes: int, backbone: str | nn.Module = "resnet101", pretrained: bool = False,
                    *, channels: int = 512, dilations: Sequence[int] = (1, 12, 24, 36),
                    bottleneck_kernel: int = 3, dropout_ratio: float = 0.1, aux: bool = True,
                    aux_channels: int = 256, aux_weight: float = 0.4,
                    backbone_options: dict | None = None) -> EncoderDecoder:
    """DeepLab v3 (mmseg defaults; ``channels=256, bottleneck_kernel=1`` for the paper's head)."""
    net = make_backbone(backbone, pretrained, backbone_options)
    head = ASPPHead(in_channels_of(net, -1), channels, num_classes, dilations, bottleneck_kernel,
                    dropout_ratio)
    return EncoderDecoder(net, head, _aux(net, num_classes, aux, aux_channels, dropout_ratio), aux_weight)


@register("deeplabv3plus")
def build_deeplabv3plus(num_classes: int, backbone: str | nn.Module = "resnet101",
                        pretrained: bool = False, *, channels: int = 512, c1_channels: int = 48,
                        dilations: Sequence[int] = (1, 12, 24, 36), dropout_ratio: float = 0.1,
                        aux: bool = True, aux_channels: int = 256, aux_weight: float = 0.4,
                        backbone_options: dict | None = None) -> EncoderDecoder:
    """DeepLab v3+ (mmseg defaults), logits at the stage-1 resolution (1/4)."""
    net = make_backbone(backbone, pretrained, backbone_options)
    head = DepthwiseSeparableASPPHead(in_channels_of(net, -1), channels, num_classes,
                                      in_channels_of(net, 0), c1_channels, dilations, dropout_ratio)
    return EncoderDecoder(net, head, _aux(net, num_classes, aux, aux_channels, dropout_ratio), aux_weight)
