"""SANet -- Squeeze-and-Attention Networks (Zhong, Lin, Bidart, Hu, Daya, Li, Zheng, Li & Wong,
CVPR 2020), reconstructed: no official code exists and the paper body could not be checked
(models.md section 1.15), so every choice below that the sources do not fix is a constructor
option with the default named here.

Squeeze-and-attention (SA) module on an input ``X`` (Eq. 2-3 as quoted by the reviews)::

    X_res = F_res(X)                                main branch: 3x3 ConvBNReLU, C_in -> C
    X_att = Up( sigma( F_att( APool_p(X) ) ) )      attention branch, pooled by p, up-sampled back
    X_out = X_att * X_res + X_att                   (element-wise)

with ``C = C_in / reduction`` (``reduction=4``), ``p = attn_pool = 8`` (average pooling, kernel
= stride = p, clamped to the map size) and bilinear up-sampling (``align_corners=False``) back
to the main branch's size. ``F_att`` = three "attention convolutions": 3x3 ConvBNReLU
C_in -> C, 3x3 ConvBNReLU C -> C / ``attn_reduction`` (the middle one with reduced channels,
``attn_reduction=4``), 1x1 conv -> C. ``sigma`` is the logistic sigmoid (``attn_sigmoid=True``;
the reviews disagree whether the paper has it; with ``False`` the last conv is a 1x1
ConvBNReLU instead, as in the widely copied toy block).

Head: one SA module per backbone stage (R-D8: 256/512/1024/2048 -> 64/128/256/512 channels at
1/4, 1/8, 1/8, 1/8); the outputs are resized (bilinear) to the last stage's size and
concatenated (960 ch), then

* mask prediction ``y = W_cls * Dropout2d_0.1(cat) + b`` -> ``"out"``, L_mask = CE;
* categorical prediction ``c = W_fc GAP(cat) + b_fc`` (K-way, background included, as
  EncNet's SE-loss which SANet's training code most likely reused) -> ``"cat"``;
  ``L_cat = BCE(c, t)`` with ``t_k = 1`` iff class k occurs in the (pseudo-)mask (ignoring
  255), computed from the target inside :meth:`SANet.losses`. ``cat_from="attention"`` pools
  the concatenated attention maps ``X_att`` instead of the SA outputs;
* dense prediction: a conventional FCN head on the last stage (3x3 ConvBNReLU 2048 -> 512,
  Dropout2d 0.1, 1x1 cls) -> ``"den"``, L_den = CE (deep supervision; ``den_index`` picks
  the stage).

Total: ``L = L_mask + alpha L_cat + beta L_den`` with alpha = 0.2, beta = 0.8 (the paper's
best ablation). Loss keys ``decode.loss_ce``, ``cat.loss_bce``, ``den.loss_ce``.

Parameters at 21 classes on R-101-D8 with the defaults: backbone 42.52 M + SA modules 25.94 M
(two 3x3 convs C_in -> C_in/4 per module dominate: 2 x 9.4 M on stage 4) + mask/categorical
classifiers 0.04 M + dense head 9.45 M = 77.95 M. models.md has no reference count for SANet
(not in mmseg, no official code) and the paper's count could not be checked.
"""

from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.segmentors import PixelLoss, Segmentor, register, resize_to
from models.segmentors.layers import ConvModule, DecodeHead, FCNHead, in_channels_of, make_backbone


class SAModule(nn.Module):
    """``X_out = X_att * X_res + X_att`` (see the module docstring)."""

    def __init__(self, in_channels: int, channels: int, attn_mid_channels: int,
                 attn_pool: int = 8, attn_sigmoid: bool = True):
        super().__init__()
        if attn_pool < 1:
            raise ValueError(f"attn_pool must be >= 1, got {attn_pool}")
        self.attn_pool = attn_pool
        self.attn_sigmoid = attn_sigmoid
        self.conv = ConvModule(in_channels, channels, 3)
        last = (nn.Conv2d(attn_mid_channels, channels, 1) if attn_sigmoid
                else ConvModule(attn_mid_channels, channels, 1))
        self.attention = nn.Sequential(ConvModule(in_channels, channels, 3),
                                       ConvModule(channels, attn_mid_channels, 3), last)

    def branches(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(X_res, X_att)``, both at the input's spatial size."""
        k = max(1, min(self.attn_pool, x.shape[-2], x.shape[-1]))
        pooled = F.avg_pool2d(x, kernel_size=k, stride=k, ceil_mode=True)
        att = self.attention(pooled)
        if self.attn_sigmoid:
            att = torch.sigmoid(att)
        att = F.interpolate(att, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.conv(x), att

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        res, att = self.branches(x)
        return att * res + att


class SAHead(DecodeHead):
    """SA modules on all levels, concatenated -> mask logits and class-presence logits."""

    def __init__(self, in_channels: Sequence[int], num_classes: int, reduction: int = 4,
                 attn_reduction: int = 4, attn_pool: int = 8, attn_sigmoid: bool = True,
                 dropout_ratio: float = 0.1, cat_from: Literal["output", "attention"] = "output"):
        if reduction < 1 or attn_reduction < 1:
            raise ValueError(f"reduction and attn_reduction must be >= 1, got {reduction}, {attn_reduction}")
        if cat_from not in ("output", "attention"):
            raise ValueError(f"cat_from must be 'output' or 'attention', got {cat_from!r}")
        widths = [max(c // reduction, 1) for c in in_channels]
        super().__init__(sum(widths), num_classes, dropout_ratio, in_index=-1)
        self.cat_from = cat_from
        self.sa_modules = nn.ModuleList(
            SAModule(c, w, max(w // attn_reduction, 1), attn_pool, attn_sigmoid)
            for c, w in zip(in_channels, widths))
        self.cat_fc = nn.Linear(sum(widths), num_classes)

    def forward(self, feats: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        if isinstance(feats, torch.Tensor) or len(feats) != len(self.sa_modules):
            raise ValueError(f"SANet head expects {len(self.sa_modules)} backbone levels")
        size = feats[self.in_index].shape[-2:]
        outs, atts = [], []
        for module, x in zip(self.sa_modules, feats):
            res, att = module.branches(x)
            outs.append(resize_to(att * res + att, size))
            atts.append(att)
        fused = torch.cat(outs, dim=1)
        outputs = {"out": self.cls_seg(fused)}
        if self.training:
            pooled = (fused.mean(dim=(2, 3)) if self.cat_from == "output" else
                      torch.cat([a.mean(dim=(2, 3)) for a in atts], dim=1))
            outputs["cat"] = self.cat_fc(pooled)
        return outputs


def class_presence(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``t[n, k] = 1`` iff class k occurs in ``target[n]`` (255 ignored); (N, K) float."""
    valid = target != 255
    if (target[valid] >= num_classes).any() or (target[valid] < 0).any():
        bad = target[valid & ((target >= num_classes) | (target < 0))][0].item()
        raise ValueError(f"target holds class value {bad}, outside 0..{num_classes - 1} and not 255")
    labels = torch.where(valid, target, torch.full_like(target, num_classes)).long().flatten(1)
    return F.one_hot(labels, num_classes + 1).amax(dim=1)[:, :num_classes].float()


class SANet(Segmentor):
    loss_names = {"out": "decode.loss_ce", "den": "den.loss_ce"}

    def __init__(self, backbone: nn.Module, decode_head: SAHead, dense_head: nn.Module | None,
                 alpha: float = 0.2, beta: float = 0.8):
        super().__init__()
        if alpha < 0 or beta < 0:
            raise ValueError(f"alpha and beta must be >= 0, got {alpha}, {beta}")
        self.backbone = backbone
        self.decode_head = decode_head
        self.dense_head = dense_head
        self.num_classes = decode_head.num_classes
        self.alpha = alpha
        self.loss_weights = {"out": 1.0, "den": beta} if dense_head is not None else {"out": 1.0}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.backbone(x)
        outputs = self.decode_head(feats)
        if self.training and self.dense_head is not None:
            outputs["den"] = self.dense_head(feats)
        return outputs

    def losses(self, outputs, target: torch.Tensor, pixel_loss: PixelLoss) -> dict[str, torch.Tensor]:
        """``L_mask + beta L_den`` via ``pixel_loss``, plus ``alpha L_cat`` (BCE on presence)."""
        terms = super().losses(outputs, target, pixel_loss)
        if "cat" in outputs and self.alpha:
            logits = outputs["cat"].float()
            presence = class_presence(target, logits.shape[1])
            terms["cat.loss_bce"] = self.alpha * F.binary_cross_entropy_with_logits(logits, presence)
        return terms


@register("sanet")
def build_sanet(num_classes: int, backbone: str | nn.Module = "resnet101", pretrained: bool = False,
                *, reduction: int = 4, attn_reduction: int = 4, attn_pool: int = 8,
                attn_sigmoid: bool = True, cat_from: Literal["output", "attention"] = "output",
                dropout_ratio: float = 0.1, alpha: float = 0.2, beta: float = 0.8,
                dense: bool = True, den_index: int = -1, den_reduction: int = 4,
                backbone_options: dict | None = None) -> SANet:
    """SANet on ``backbone`` (all of its levels get an SA module)."""
    net = make_backbone(backbone, pretrained, backbone_options)
    levels = [int(c) for c in net.channels]
    head = SAHead(levels, num_classes, reduction, attn_reduction, attn_pool, attn_sigmoid,
                  dropout_ratio, cat_from)
    dense_head = None
    if dense:
        c = in_channels_of(net, den_index)
        dense_head = FCNHead(c, max(c // den_reduction, 1), num_classes, num_convs=1,
                             concat_input=False, dropout_ratio=dropout_ratio, in_index=den_index)
    return SANet(net, head, dense_head, alpha, beta)
