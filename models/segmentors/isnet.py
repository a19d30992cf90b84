"""ISNet (Jin et al., "ISNet: Integrate Image-Level and Semantic-Level Context for Semantic
Segmentation", ICCV 2021), following the official sssegmentation code (parameter names as
mmsegmentation's ``projects/isnet`` port of it).

On the output-stride-8 stage-4 feature ``c4`` (C = 512, C' = 256 transform channels):

    x    = CBR_3x3(c4)                                            (``bottleneck``, 2048 -> 512)
    g    = Up(GAP(x))                                             image-level vector, broadcast
    f_il = CBR_3x3([x, Att(q=x, kv=[g, x])])                      image-level context (``ilc_net``)
    y_1  = cls(Dropout2d_0.1(CBR_1x1(x)))                         stage-1 logits (``decoder_stage1``)
    s_i  = Σ_{j: ĉ_j = ĉ_i} softmax_{j: ĉ_j = ĉ_i}(y_1[ĉ_i, j]) x_j,  ĉ = argmax y_1
                                                                  semantic-level (class) representation
    f_sl = CBR_3x3([f_il, Att(q=x, kv=s)])                        semantic-level context (``slc_net``)
    y_2  = cls(Dropout2d_0.1(f_sl))                               final logits (``decoder_stage2``)

``Att(q, kv) = φ_o(Σ_j softmax_j(φ_q(q)_i·φ_k(kv)_j / √C') φ_v(kv)_j)`` with φ_q, φ_k
2 x 1x1 ConvModules (-> 256), φ_v a 1x1 ConvModule (-> 256) and φ_o a 1x1 ConvModule
(256 -> 512). Every pixel gets the weighted average of the features of the pixels of its
predicted class in the same image; the weights are the softmax of that class's stage-1
logit over those pixels (differentiable, as in the official code, which loops over images
and classes; this implementation does the same per image with masked softmaxes).

Losses (official config): ``L = 1.0 CE(y_2) + 0.4 CE(y_1) + 0.4 CE(y_aux)`` with the
auxiliary FCN head on stage 3 (3x3 ConvModule 1024 -> 512, dropout, cls). The optional
DeepLabv3+-style shortcut (``with_shortcut``: stage-1 features 256 -> 48 concatenated before
a 3x3 ConvModule in ``decoder_stage2``) is off for the ResNet configs, as in the official ones.
ISNet is not in mmseg's model zoo table: at 21 classes on R-101-D8 this model has
42.52 M (backbone) + 20.74 M (head) + 4.73 M (aux) = 67.99 M parameters.
"""

import torch
import torch.nn.functional as F
from torch import nn

from models.segmentors import register
from models.segmentors.layers import (ConvModule, EncoderDecoder, SelfAttentionBlock, aux_fcn_head,
                                      in_channels_of, make_backbone, make_classifier)


def _context_attention(key_in: int, query_in: int, transform: int, out: int) -> SelfAttentionBlock:
    return SelfAttentionBlock(key_in_channels=key_in, query_in_channels=query_in, channels=transform,
                              out_channels=out, share_key_query=False, key_query_num_convs=2,
                              value_out_num_convs=1, key_query_norm=True, value_out_norm=True,
                              matmul_norm=True, with_out=True)


class ImageLevelContext(nn.Module):
    """``f_il = CBR_3x3([x, Att(q=x, kv=[Up(GAP(x)), x])])``."""

    def __init__(self, feats_channels: int, transform_channels: int, concat_input: bool = True):
        super().__init__()
        self.global_avgpool = nn.AdaptiveAvgPool2d(1)
        self.correlate_net = _context_attention(2 * feats_channels, feats_channels, transform_channels,
                                                feats_channels)
        self.bottleneck = ConvModule(2 * feats_channels, feats_channels, 3) if concat_input else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.global_avgpool(x).expand_as(x)  # bilinear upsampling of a 1x1 map = broadcast
        feats = self.correlate_net(x, torch.cat([g, x], dim=1))
        if self.bottleneck is not None:
            feats = self.bottleneck(torch.cat([x, feats], dim=1))
        return feats


def class_representations(x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``s_i`` of the module docstring: per image, per predicted class ``k``, the average of the
    features of the pixels predicted ``k`` weighted by ``softmax`` of their class-``k`` logit;
    every pixel receives its class's average. ``x (N, C, H, W)``, ``logits (N, K, H, W)``."""
    n, c, h, w = x.shape
    k = logits.shape[1]
    flat_logits = logits.flatten(2)                                    # N, K, HW
    pred = flat_logits.argmax(dim=1)                                   # N, HW
    member = F.one_hot(pred, k).transpose(1, 2).bool()                 # N, K, HW
    masked = flat_logits.masked_fill(~member, float("-inf"))
    present = member.any(dim=-1, keepdim=True)
    masked = torch.where(present, masked, torch.zeros_like(masked))     # absent classes: unused
    weights = masked.softmax(dim=-1)                                   # N, K, HW
    reps = torch.bmm(weights, x.flatten(2).transpose(1, 2))            # N, K, C
    per_pixel = torch.gather(reps, 1, pred.unsqueeze(-1).expand(-1, -1, c))  # N, HW, C
    return per_pixel.transpose(1, 2).reshape(n, c, h, w)


class SemanticLevelContext(nn.Module):
    """``f_sl = CBR_3x3([f_il, Att(q=x, kv=s)])``."""

    def __init__(self, feats_channels: int, transform_channels: int, concat_input: bool = True):
        super().__init__()
        self.correlate_net = _context_attention(feats_channels, feats_channels, transform_channels,
                                                feats_channels)
        self.bottleneck = ConvModule(2 * feats_channels, feats_channels, 3) if concat_input else None

    def forward(self, x: torch.Tensor, logits: torch.Tensor, feats_il: torch.Tensor) -> torch.Tensor:
        feats = self.correlate_net(x, class_representations(x, logits))
        if self.bottleneck is not None:
            feats = self.bottleneck(torch.cat([feats_il, feats], dim=1))
        return feats


class ISNetHead(nn.Module):
    """Two-stage ISNet head; returns ``{"out": y_2, "stage1": y_1}``."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, transform_channels: int = 256,
                 concat_input: bool = True, dropout_ratio: float = 0.1, with_shortcut: bool = False,
                 shortcut_in_channels: int = 256, shortcut_feat_channels: int = 48):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.bottleneck = ConvModule(in_channels, channels, 3)
        self.ilc_net = ImageLevelContext(channels, transform_channels, concat_input)
        self.slc_net = SemanticLevelContext(channels, transform_channels, concat_input)
        self.decoder_stage1 = nn.Sequential(ConvModule(channels, channels, 1), nn.Dropout2d(dropout_ratio),
                                            make_classifier(channels, num_classes))
        self.shortcut = ConvModule(shortcut_in_channels, shortcut_feat_channels, 1) if with_shortcut else None
        if with_shortcut:
            self.decoder_stage2 = nn.Sequential(
                ConvModule(channels + shortcut_feat_channels, channels, 3), nn.Dropout2d(dropout_ratio),
                make_classifier(channels, num_classes))
        else:
            self.decoder_stage2 = nn.Sequential(nn.Dropout2d(dropout_ratio), make_classifier(channels, num_classes))

    def forward(self, feats) -> dict[str, torch.Tensor]:
        x = self.bottleneck(feats[-1])
        feats_il = self.ilc_net(x)
        stage1 = self.decoder_stage1(x)
        feats_sl = self.slc_net(x, stage1, feats_il)
        if self.shortcut is not None:
            short = self.shortcut(feats[0])
            feats_sl = F.interpolate(feats_sl, size=short.shape[2:], mode="bilinear", align_corners=False)
            feats_sl = torch.cat([feats_sl, short], dim=1)
        return {"out": self.decoder_stage2(feats_sl), "stage1": stage1}


class ISNet(EncoderDecoder):
    """EncoderDecoder with ISNet's three weighted losses (stage 2 1.0, stage 1 0.4, aux 0.4)."""

    loss_names = {"out": "decode.loss_ce", "stage1": "decode_stage1.loss_ce", "aux": "aux.loss_ce"}

    def __init__(self, backbone, decode_head, auxiliary_head=None, aux_weight: float = 0.4,
                 stage1_weight: float = 0.4):
        super().__init__(backbone, decode_head, auxiliary_head, aux_weight)
        if stage1_weight < 0:
            raise ValueError(f"stage1_weight must be >= 0, got {stage1_weight}")
        self.loss_weights["stage1"] = stage1_weight


@register("isnet")
def build_isnet(num_classes: int, backbone: str | nn.Module = "resnet101", pretrained: bool = False,
                *, channels: int = 512, transform_channels: int = 256, concat_input: bool = True,
                dropout_ratio: float = 0.1, with_shortcut: bool = False, shortcut_feat_channels: int = 48,
                stage1_weight: float = 0.4, aux: bool = True, aux_channels: int = 512,
                aux_weight: float = 0.4, backbone_options: dict | None = None) -> ISNet:
    """ISNet on an OS-8 backbone (``aux=False`` drops the auxiliary FCN head)."""
    net = make_backbone(backbone, pretrained, backbone_options)
    head = ISNetHead(in_channels_of(net, -1), channels, num_classes, transform_channels, concat_input,
                     dropout_ratio, with_shortcut, in_channels_of(net, 0), shortcut_feat_channels)
    aux_head = (aux_fcn_head(in_channels_of(net, -2), num_classes, aux_channels, dropout_ratio)
                if aux else None)
    return ISNet(net, head, aux_head, aux_weight, stage1_weight)
