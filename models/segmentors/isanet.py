"""ISANet (Huang, Yuan et al., "Interlaced Sparse Self-Attention for Semantic Segmentation",
2019; IJCV 2021 as part of OCNet), laid out as mmsegmentation's ``ISAHead``.

On the output-stride-8 stage-4 feature: ``x = CBR_3x3(c4)`` (2048 -> 512), then interlaced
sparse self-attention with block size (P_h, P_w) = (8, 8). The map is zero-padded (centred)
to (G_h·P_h, G_w·P_w) and position (g_h·P_h + l_h, g_w·P_w + l_w) is indexed by its block
(g_h, g_w) and its offset (l_h, l_w) inside the block:

* **long-range** attention: for every offset (l_h, l_w), self-attention among the G_h·G_w
  positions sharing it (pixels P apart, spanning the whole image);
* **short-range** attention: for every block (g_h, g_w), self-attention among its P_h·P_w
  positions.

Each attention is ``out = φ_o(Σ_j softmax_j(Q_i·K_j/√256) V_j)`` with Q, K from
2 x 1x1 ConvModules (512 -> 256 -> 256), V a plain 1x1 conv (512 -> 512) and
``φ_o`` (``output_project``) a 1x1 ConvModule 512 -> 512. After the two steps every output
position depends on every input position (the first step links a pixel to its offset
class in every block, the second step spreads that within the block) at the cost of
O(N(G_h G_w + P_h P_w)) instead of O(N²).

``y = cls(Dropout2d_0.1(CBR_1x1([isa(x), x])))`` (1024 -> 512 -> K); auxiliary FCN head on
stage 3 with weight 0.4. Parameters at 21 classes on R-101-D8: decode head 11.82 M, aux
2.37 M, backbone 42.52 M (56.70 M in all, models.md).
"""

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.segmentors import register
from models.segmentors.layers import (ConvModule, DecodeHead, EncoderDecoder, SelfAttentionBlock,
                                      aux_fcn_head, build_project, in_channels_of, make_backbone, select)


class ISASelfAttention(SelfAttentionBlock):
    """Self-attention on one group: 2-conv key/query projections, plain value conv, then the
    ``output_project`` ConvModule (mmseg's ISA ``SelfAttentionBlock``)."""

    def __init__(self, in_channels: int, channels: int):
        super().__init__(key_in_channels=in_channels, query_in_channels=in_channels, channels=channels,
                         out_channels=in_channels, share_key_query=False, key_query_num_convs=2,
                         value_out_num_convs=1, key_query_norm=True, value_out_norm=False,
                         matmul_norm=True, with_out=False)
        self.output_project = build_project(in_channels, in_channels, 1, conv_module=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output_project(super().forward(x, x))


def interlaced_attention(x: torch.Tensor, global_relation: nn.Module, local_relation: nn.Module,
                         down_factor: Sequence[int]) -> torch.Tensor:
    """Long-range then short-range self-attention on ``x`` (N, C, H, W), see the module doc."""
    n, c, h, w = x.shape
    loc_h, loc_w = down_factor
    glb_h, glb_w = math.ceil(h / loc_h), math.ceil(w / loc_w)
    pad_h, pad_w = glb_h * loc_h - h, glb_w * loc_w - w
    if pad_h or pad_w:
        x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
    # long range: groups of pixels with the same offset inside their block
    x = x.view(n, c, glb_h, loc_h, glb_w, loc_w).permute(0, 3, 5, 1, 2, 4)
    x = global_relation(x.reshape(-1, c, glb_h, glb_w))
    # short range: groups of pixels inside one block
    x = x.view(n, loc_h, loc_w, c, glb_h, glb_w).permute(0, 4, 5, 3, 1, 2)
    x = local_relation(x.reshape(-1, c, loc_h, loc_w))
    x = x.view(n, glb_h, glb_w, c, loc_h, loc_w).permute(0, 3, 1, 4, 2, 5)
    x = x.reshape(n, c, glb_h * loc_h, glb_w * loc_w)
    return x[:, :, pad_h // 2:pad_h // 2 + h, pad_w // 2:pad_w // 2 + w]


class ISAHead(DecodeHead):
    """mmseg ``ISAHead``: ``in_conv`` -> ISA (``global_relation`` then ``local_relation``) ->
    ``out_conv`` on [attended, residual] -> cls."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, isa_channels: int = 256,
                 down_factor: Sequence[int] = (8, 8), dropout_ratio: float = 0.1, in_index: int = -1):
        super().__init__(channels, num_classes, dropout_ratio, in_index)
        if len(down_factor) != 2 or min(down_factor) < 1:
            raise ValueError(f"down_factor must be two positive ints, got {down_factor}")
        self.down_factor = tuple(int(d) for d in down_factor)
        self.in_conv = ConvModule(in_channels, channels, 3)
        self.global_relation = ISASelfAttention(channels, isa_channels)
        self.local_relation = ISASelfAttention(channels, isa_channels)
        self.out_conv = ConvModule(2 * channels, channels, 1)

    def isa(self, x: torch.Tensor) -> torch.Tensor:
        """The interlaced sparse self-attention of ``x`` (after ``in_conv``)."""
        return interlaced_attention(x, self.global_relation, self.local_relation, self.down_factor)

    def forward(self, feats) -> torch.Tensor:
        x = self.in_conv(select(feats, self.in_index))
        return self.cls_seg(self.out_conv(torch.cat([self.isa(x), x], dim=1)))


@register("isanet")
def build_isanet(num_classes: int, backbone: str | nn.Module = "resnet101", pretrained: bool = False,
                 *, channels: int = 512, isa_channels: int = 256, down_factor=(8, 8),
                 dropout_ratio: float = 0.1, aux: bool = True, aux_channels: int = 256,
                 aux_weight: float = 0.4, backbone_options: dict | None = None) -> EncoderDecoder:
    """ISANet on an OS-8 backbone (``aux=False`` drops the auxiliary FCN head)."""
    net = make_backbone(backbone, pretrained, backbone_options)
    head = ISAHead(in_channels_of(net, -1), channels, num_classes, isa_channels, tuple(down_factor),
                   dropout_ratio)
    aux_head = (aux_fcn_head(in_channels_of(net, -2), num_classes, aux_channels, dropout_ratio)
                if aux else None)
    return EncoderDecoder(net, head, aux_head, aux_weight)
