"""OCRNet -- Object-Contextual Representations (Yuan, Chen & Wang, ECCV 2020), R-101-D8 layout.

A cascade of two heads (mmseg's ``CascadeEncoderDecoder``; ``decode_head.0`` / ``decode_head.1``):

1. Soft object regions ``M`` (K x H x W logits): an FCN head on stage 3 (3x3 ConvModule
   1024 -> 256, Dropout2d 0.1, 1x1 cls), supervised by the same labels, loss weight 0.4.
2. OCR head on stage 4: pixel representations ``X = ConvBNReLU_3x3(x)`` (2048 -> 512), then

   * spatial gather (Eq. 1): ``m~_ki = softmax_i(s M_ki)`` over the H W positions (``scale``
     s = 1), object region representations ``f_k = sum_i m~_ki x_i`` (K x 512);
   * object attention (Eq. 2-3): ``w_ik = softmax_k( phi(x_i) . psi(f_k) / sqrt(256) )`` with
     phi, psi = two 1x1 ConvModules 512 -> 256 -> 256 each, ``y_i = rho( sum_k w_ik delta(f_k) )``
     with delta = 1x1 ConvModule 512 -> 256 and rho = 1x1 ConvModule 256 -> 512;
   * augmentation (Eq. 4): ``z_i = g([y_i, x_i])``, g = 1x1 ConvModule 1024 -> 512;
   * classifier: Dropout2d 0.1 + 1x1 conv (mmseg R-D8; openseg puts Dropout 0.05 in g instead).

Loss: ``L = CE(out) + 0.4 CE(soft regions)`` (keys ``decode_1.loss_ce`` / ``decode_0.loss_ce``).
The soft-region logits are returned as ``"aux"`` (they are needed at inference too).

Parameters at 21 classes on R-101-D8: backbone 42.52 M + soft-region head 2.37 M + OCR head
10.63 M = 55.52 M, models.md's table (``ocrnet_r101-d8``; the decode-head column counts both
cascade stages, 13.0 M). :class:`SpatialGather` and :class:`ObjectAttentionBlock` are reusable
on other backbones (HRNet + OCR: pass ``region_head`` / ``in_index`` accordingly).
"""

import torch
from torch import nn

from models.segmentors import Segmentor, register, resize_to
from models.segmentors.layers import (ConvModule, DecodeHead, SelfAttentionBlock, aux_fcn_head,
                                      in_channels_of, make_backbone, select)


class SpatialGather(nn.Module):
    """``f_k = sum_i softmax_i(scale * M_ki) x_i``: (N, C, H, W), (N, K, H, W) -> (N, C, K, 1)."""

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.scale = scale

    def forward(self, feats: torch.Tensor, region_logits: torch.Tensor) -> torch.Tensor:
        if feats.shape[-2:] != region_logits.shape[-2:]:
            raise ValueError(f"soft object regions {tuple(region_logits.shape[-2:])} and pixel "
                             f"features {tuple(feats.shape[-2:])} differ in size")
        n, c = feats.shape[:2]
        k = region_logits.shape[1]
        probs = torch.softmax(self.scale * region_logits.reshape(n, k, -1), dim=2)   # N x K x HW
        regions = torch.bmm(probs, feats.reshape(n, c, -1).transpose(1, 2))          # N x K x C
        return regions.transpose(1, 2).unsqueeze(-1)


class ObjectAttentionBlock(SelfAttentionBlock):
    """Pixel-region attention + the fusion ``g([y, x])`` (mmseg's ``ObjectAttentionBlock``)."""

    def __init__(self, in_channels: int, channels: int):
        super().__init__(key_in_channels=in_channels, query_in_channels=in_channels,
                         channels=channels, out_channels=in_channels, key_query_num_convs=2,
                         key_query_norm=True, value_out_num_convs=1, value_out_norm=True,
                         matmul_norm=True, with_out=True)
        self.bottleneck = ConvModule(2 * in_channels, in_channels, 1)

    def forward(self, query_feats: torch.Tensor, key_feats: torch.Tensor) -> torch.Tensor:
        context = super().forward(query_feats, key_feats)
        return self.bottleneck(torch.cat([context, query_feats], dim=1))


class OCRHead(DecodeHead):
    """Bottleneck -> spatial gather -> object attention -> classifier."""

    def __init__(self, in_channels: int, channels: int, ocr_channels: int, num_classes: int,
                 scale: float = 1.0, dropout_ratio: float = 0.1, in_index: int = -1):
        super().__init__(channels, num_classes, dropout_ratio, in_index)
        self.bottleneck = ConvModule(in_channels, channels, 3)
        self.spatial_gather_module = SpatialGather(scale)
        self.object_context_block = ObjectAttentionBlock(channels, ocr_channels)

    def forward(self, feats, region_logits: torch.Tensor) -> torch.Tensor:
        pixels = self.bottleneck(select(feats, self.in_index))
        region_logits = resize_to(region_logits, pixels.shape[-2:])   # levels at different strides
        regions = self.spatial_gather_module(pixels, region_logits)
        return self.cls_seg(self.object_context_block(pixels, regions))


class OCRNet(Segmentor):
    loss_names = {"out": "decode_1.loss_ce", "aux": "decode_0.loss_ce"}

    def __init__(self, backbone: nn.Module, region_head: nn.Module, ocr_head: OCRHead,
                 region_weight: float = 0.4):
        super().__init__()
        if region_weight < 0:
            raise ValueError(f"region_weight must be >= 0, got {region_weight}")
        self.backbone = backbone
        self.decode_head = nn.ModuleList([region_head, ocr_head])
        self.num_classes = ocr_head.num_classes
        self.loss_weights = {"out": 1.0, "aux": region_weight}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.backbone(x)
        regions = self.decode_head[0](feats)
        return {"out": self.decode_head[1](feats, regions), "aux": regions}


@register("ocrnet")
def build_ocrnet(num_classes: int, backbone: str | nn.Module = "resnet101", pretrained: bool = False,
                 *, channels: int = 512, ocr_channels: int = 256, region_channels: int = 256,
                 region_index: int = -2, scale: float = 1.0, dropout_ratio: float = 0.1,
                 region_weight: float = 0.4, backbone_options: dict | None = None) -> OCRNet:
    """OCRNet on ``backbone`` (soft regions from level ``region_index``, OCR on the last level)."""
    net = make_backbone(backbone, pretrained, backbone_options)
    region_head = aux_fcn_head(in_channels_of(net, region_index), num_classes, region_channels,
                               dropout_ratio, in_index=region_index)
    ocr_head = OCRHead(in_channels_of(net, -1), channels, ocr_channels, num_classes, scale, dropout_ratio)
    return OCRNet(net, region_head, ocr_head, region_weight)
