"""ANN (Zhu et al., "Asymmetric Non-local Neural Networks for Semantic Segmentation", ICCV 2019).

Built from the shared attention block :class:`models.segmentors.layers.SelfAttentionBlock`
(queries from ``q_feats``, keys/values from ``k_feats``, C' = ``channels``):

    Q = φ_q(q_feats),  K = S(φ_k(k_feats)),  V = S(φ_v(k_feats))
    A = softmax_j(Q_i · K_j / √C')          (``matmul_norm``; one row per query position i)
    out_i = φ_o(Σ_j A_ij V_j)

``φ`` are stacks of 1x1 convs (ConvModules with BN+ReLU when ``*_norm``), ``S`` an optional
key/value sampler (ANN's pyramid pooling), ``φ_o`` the optional output projection (a plain
conv is zero-initialised so the block starts as "no context").

ANN on the output-stride-8 ResNet stages 3 ("low", 1024 ch) and 4 ("high", 2048 ch):

* **AFNB** (asymmetric fusion): queries from high (ConvModule 2048 -> 256), keys from low
  (ConvModule 1024 -> 256), values from low (plain conv 1024 -> 256), keys/values sampled by
  pyramid pooling ``S`` = concat of adaptive average pools with bins (1, 3, 6, 8) ->
  S = 1 + 9 + 36 + 64 = 110 anchors; output conv 256 -> 2048 (zero-init);
  ``fused = BN(W [context, high])`` (1x1 conv 4096 -> 2048 + BN, no activation).
* ``h = CBR_3x3(Dropout2d_0.1(fused))`` (2048 -> 512).
* **APNB** (asymmetric pyramid non-local, self-attention on h): shared key/query projection
  (ConvModule 512 -> 256), value plain conv 512 -> 256, output conv 256 -> 512 (zero-init),
  pyramid-sampled keys/values; ``h' = CBR_1x1([context, h])`` (1024 -> 512).
* ``y = cls(Dropout2d_0.1(h'))``; auxiliary FCN head on stage 3 with weight 0.4.

``query_scales > 1`` max-pool the queries (mmseg's option) and the context is upsampled
back bilinearly; the paper and mmseg's configs use 1.

Parameters at 21 classes on R-101-D8: decode head 20.34 M, aux 2.37 M, backbone 42.52 M
(65.22 M in all, models.md).
"""

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.segmentors import register
from models.segmentors.layers import (ConvModule, DecodeHead, EncoderDecoder, SelfAttentionBlock,
                                      aux_fcn_head, in_channels_of, make_backbone)


class PPMConcat(nn.ModuleList):
    """Pyramid sampling of keys/values: adaptive average pools with the given bins, flattened
    and concatenated -> ``(N, C, Σ bins²)`` anchors."""

    def __init__(self, pool_scales: Sequence[int] = (1, 3, 6, 8)):
        super().__init__(nn.AdaptiveAvgPool2d(s) for s in pool_scales)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return torch.cat([pool(feats).flatten(2) for pool in self], dim=2)


class ANNAttention(SelfAttentionBlock):
    """ANN's attention stage: ConvModule key/query projections, plain value/output convs (the
    output conv zero-initialised), pyramid-sampled keys/values, optional max-pooled queries
    (the context is then upsampled back to the query size)."""

    def __init__(self, low_in: int, high_in: int, channels: int, out_channels: int,
                 share_key_query: bool, query_scale: int, key_pool_scales: Sequence[int]):
        if query_scale < 1:
            raise ValueError(f"ANN query scale must be >= 1, got {query_scale}")
        super().__init__(
            key_in_channels=low_in, query_in_channels=high_in, channels=channels,
            out_channels=out_channels, share_key_query=share_key_query,
            query_downsample=nn.MaxPool2d(query_scale) if query_scale > 1 else None,
            key_downsample=PPMConcat(key_pool_scales), key_query_num_convs=1, key_query_norm=True,
            value_out_num_convs=1, value_out_norm=False, matmul_norm=True, with_out=True)
        nn.init.zeros_(self.out_project.weight)  # the block starts as "no context"
        nn.init.zeros_(self.out_project.bias)

    def forward(self, query_feats: torch.Tensor, key_feats: torch.Tensor) -> torch.Tensor:
        context = super().forward(query_feats, key_feats)
        if context.shape[-2:] != query_feats.shape[-2:]:
            context = F.interpolate(context, size=query_feats.shape[-2:], mode="bilinear", align_corners=False)
        return context


class AFNB(nn.Module):
    """Asymmetric fusion non-local block: queries from ``high``, keys/values from ``low``."""

    def __init__(self, low_in_channels: int, high_in_channels: int, channels: int, out_channels: int,
                 query_scales: Sequence[int] = (1,), key_pool_scales: Sequence[int] = (1, 3, 6, 8)):
        super().__init__()
        self.stages = nn.ModuleList(
            ANNAttention(low_in_channels, high_in_channels, channels, out_channels, False, s, key_pool_scales)
            for s in query_scales)
        self.bottleneck = ConvModule(out_channels + high_in_channels, out_channels, 1, act=False)

    def forward(self, low_feats: torch.Tensor, high_feats: torch.Tensor) -> torch.Tensor:
        context = torch.stack([stage(high_feats, low_feats) for stage in self.stages]).sum(dim=0)
        return self.bottleneck(torch.cat([context, high_feats], dim=1))


class APNB(nn.Module):
    """Asymmetric pyramid non-local block: self-attention with pyramid-sampled keys/values."""

    def __init__(self, in_channels: int, channels: int, out_channels: int,
                 query_scales: Sequence[int] = (1,), key_pool_scales: Sequence[int] = (1, 3, 6, 8)):
        super().__init__()
        self.stages = nn.ModuleList(
            ANNAttention(in_channels, in_channels, channels, out_channels, True, s, key_pool_scales)
            for s in query_scales)
        self.bottleneck = ConvModule(2 * in_channels, out_channels, 1)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        context = torch.stack([stage(feats, feats) for stage in self.stages]).sum(dim=0)
        return self.bottleneck(torch.cat([context, feats], dim=1))


class ANNHead(DecodeHead):
    """mmseg ``ANNHead`` (``fusion`` AFNB, ``bottleneck``, ``context`` APNB, ``conv_seg``)."""

    def __init__(self, in_channels: Sequence[int], channels: int, num_classes: int,
                 project_channels: int = 256, query_scales: Sequence[int] = (1,),
                 key_pool_scales: Sequence[int] = (1, 3, 6, 8), dropout_ratio: float = 0.1,
                 in_index: Sequence[int] = (-2, -1)):
        super().__init__(channels, num_classes, dropout_ratio, list(in_index))
        if len(in_channels) != 2:
            raise ValueError(f"ANN reads two levels (low, high), got in_channels {in_channels}")
        low, high = in_channels
        self.fusion = AFNB(low, high, project_channels, high, query_scales, key_pool_scales)
        self.bottleneck = ConvModule(high, channels, 3)
        self.context = APNB(channels, project_channels, channels, query_scales, key_pool_scales)

    def forward(self, feats) -> torch.Tensor:
        low, high = (feats[i] for i in self.in_index)
        out = self.fusion(low, high)
        if self.dropout is not None:
            out = self.dropout(out)
        out = self.context(self.bottleneck(out))
        return self.cls_seg(out)


@register("ann")
def build_ann(num_classes: int, backbone: str | nn.Module = "resnet101", pretrained: bool = False,
              *, channels: int = 512, project_channels: int = 256, query_scales=(1,),
              key_pool_scales=(1, 3, 6, 8), dropout_ratio: float = 0.1, aux: bool = True,
              aux_channels: int = 256, aux_weight: float = 0.4,
              backbone_options: dict | None = None) -> EncoderDecoder:
    """ANN on an OS-8 backbone (stages 3 and 4); ``aux=False`` drops the auxiliary FCN head."""
    net = make_backbone(backbone, pretrained, backbone_options)
    head = ANNHead([in_channels_of(net, -2), in_channels_of(net, -1)], channels, num_classes,
                   project_channels, tuple(query_scales), tuple(key_pool_scales), dropout_ratio)
    aux_head = (aux_fcn_head(in_channels_of(net, -2), num_classes, aux_channels, dropout_ratio)
                if aux else None)
    return EncoderDecoder(net, head, aux_head, aux_weight)
