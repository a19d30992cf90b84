"""SETR (Zheng et al., "Rethinking Semantic Segmentation from a Sequence-to-Sequence
Perspective with Transformers", CVPR 2021): a ViT encoder on 16x16 patches
(:mod:`models.segmentors.vit`) and three decoders, laid out as mmsegmentation 1.2.2
(``backbone`` / ``neck`` / ``decode_head`` / ``auxiliary_head.<i>``).

Notation: ``F_l`` = output of transformer layer ``l`` as a ``(D, H/16, W/16)`` map,
``LN`` = LayerNorm over channels (eps 1e-6), ``CBR_k`` = k x k conv + BN + ReLU,
``Up_s`` = bilinear upsampling by ``s`` (``align_corners=False``), ``cls`` = 1x1 conv.

* **Naive** (``setr_naive``): ``y = cls(Up_4(CBR_1(LN(F_24))))`` (D -> 256, logits at 1/4).
  Auxiliary heads on F_10, F_15, F_20: ``cls(Up_4(CBR_1(Up_4(CBR_1(LN(F_l))))))`` (two
  1x1 conv blocks, logits at full resolution).
* **PUP** (``setr_pup``, progressive upsampling): ``y = cls(Up_2(CBR_3(...Up_2(CBR_3(LN(F_24))))))``
  with four ``CBR_3 + Up_2`` stages (D -> 256 -> 256 -> 256 -> 256), logits at full
  resolution. Auxiliary heads on F_10, F_15, F_20: ``cls(Up_4(CBR_3(Up_4(CBR_3(LN(F_l))))))``
  (two ``CBR_3 + Up_4`` stages: the second conv runs at 1/4, logits at full resolution), as
  mmseg's PUP configs, which leave ``up_scale`` at ``SETRUPHead``'s default of 4.
* **MLA** (``setr_mla``, multi-level feature aggregation) on F_6, F_12, F_18, F_24 (exactly
  these layers for ViT-L; the same quarters of the depth for smaller ViTs). The encoder runs
  without the class token (mmseg's MLA config: ``with_cls_token=False``, and the original
  code's ``VIT_MLA``: the token is dropped before the first layer, the sequence holds only
  the patches; Naive and PUP keep it).
  Neck ``Z_l = CBR_1(LN(F_l))`` (D -> 256); top-down cumulative sums
  ``M_1 = Z_24, M_2 = M_1 + Z_18, M_3 = M_2 + Z_12, M_4 = M_3 + Z_6``; ``P_i = CBR_3(M_i)``.
  Head: per level ``U_i = Up_4(CBR_3(CBR_3(P_i)))`` (256 -> 128 -> 128), ``y = cls([U_1..U_4])``
  (512 -> K, logits at 1/4). Auxiliary: a 1x1 classifier on each ``P_i``.

Inputs whose sides are not multiples of 16 are zero-padded by the encoder; every output is
cropped back to the part covering the input, so logits stay aligned with the labels.
The position embeddings are stored for ``img_size`` (mmseg's configs: the training crop);
stage 4 sets it from ``segmentor.crop_size`` (rounded up to the patch, :func:`crop_img_size`)
unless the model's options give one, so training crops need no interpolation.

Losses: ``L = CE(y) + 0.4 * sum_i CE(y_aux_i)`` (the paper's and mmseg's 0.4), keys
``decode.loss_ce``, ``aux_0.loss_ce`` ... in mmseg's naming.

Choices where the paper is silent or the two references differ (mmseg is followed):
Naive uses 1x1 convs (``kernel_size=1``); PUP classifies after the last upsampling (the
original code classifies before it); MLA's classifier is a 1x1 conv (the original: 3x3)
and upsampling uses ``align_corners=False`` (original: True); 3 auxiliary heads for
Naive/PUP (the original Pascal Context config used 4, on layers 10/15/20/24).

Parameters at 21 classes, 512x512 crops, ViT-L (position embedding stored for the 32x32
grid of a 512 crop, class token kept, no final norm, patch embedding without bias):
Naive 305,424,980, PUP 317,157,460, MLA 309,370,473 (models.md: 305.42 / 317.16 / 309.37 M),
equal to mmseg's parameter for parameter: same names and shapes as mmseg's modules built from
its configs (checked at ADE20K's 150 classes against ``tests/data/mmseg_keys``; our encoder
carries one identity where torchvision's final LayerNorm was, no parameters). mmseg SETR
checkpoints load strictly after :func:`convert_mmseg_setr` (the heads and neck already use
mmseg's names, only the ViT's names are torchvision's).
"""

import math

import torch
from torch import nn

from models.segmentors import Segmentor, register
from models.segmentors.layers import ConvModule, DecodeHead, FCNHead, select
from models.segmentors.vit import (VIT_ARCHS, ViTEncoder, convert_mmseg_vit, layer_fractions_to_indices,
                                   resolve_vit_name)

#: layers (1-based, of 24) SETR-Naive/PUP read: decode on 24, auxiliary heads on 10, 15, 20
UP_LAYER_FRACTIONS = (10 / 24, 15 / 24, 20 / 24, 24 / 24)
#: layers (1-based, of 24) SETR-MLA reads: 6, 12, 18, 24
MLA_LAYER_FRACTIONS = (6 / 24, 12 / 24, 18 / 24, 24 / 24)


class TokenLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of a ``(N, C, H, W)`` map (each position a token).

    The encoder's maps are views of its ``(N, L, C)`` tokens, so ``x.permute(0, 2, 3, 1)`` is
    the token layout: contiguous without a class token (MLA), one copy with it (the slice
    ``z[:, 1:]`` skips a row per image; ``layer_norm`` would copy internally otherwise). The
    normalised map is returned as a channels-last view, and the following convolutions and
    upsamplings run channels-last: converting it back to a contiguous NCHW map (mmseg's
    layout; the same values) made the SETR-Naive head's training step about 18 % slower on
    CPU (2 x 1024 x 32 x 32 input, one thread)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1).contiguous()).permute(0, 3, 1, 2)


def _upsample(scale: int) -> nn.Upsample:
    return nn.Upsample(scale_factor=scale, mode="bilinear", align_corners=False)


class SETRUPHead(DecodeHead):
    """mmseg ``SETRUPHead``: ``LN`` then ``num_convs`` x (k x k ConvModule + bilinear x up_scale),
    then the classifier. Naive: 1 conv, k=1, x4 (auxiliary: 2 convs); PUP: 4 convs, k=3, x2
    (auxiliary: 2 convs, k=3, x4)."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, num_convs: int = 1,
                 up_scale: int = 4, kernel_size: int = 1, dropout_ratio: float = 0.0,
                 in_index: int = -1):
        super().__init__(channels, num_classes, dropout_ratio, in_index)
        if kernel_size not in (1, 3):
            raise ValueError(f"SETR up head kernel_size must be 1 or 3, got {kernel_size}")
        if num_convs < 1:
            raise ValueError(f"SETR up head needs num_convs >= 1, got {num_convs}")
        self.norm = TokenLayerNorm(in_channels, eps=1e-6)
        self.up_convs = nn.ModuleList(
            nn.Sequential(ConvModule(in_channels if i == 0 else channels, channels, kernel_size),
                          _upsample(up_scale))
            for i in range(num_convs))

    def forward(self, feats) -> torch.Tensor:
        x = self.norm(select(feats, self.in_index))
        for up_conv in self.up_convs:
            x = up_conv(x)
        return self.cls_seg(x)


class MLANeck(nn.Module):
    """mmseg ``MLANeck``: per-level LN + 1x1 ConvModule, top-down cumulative sum from the
    deepest level, 3x3 ConvModule per level. Outputs are ordered deepest-first
    (``P_1 = CBR(Z_24)``, ..., ``P_4 = CBR(Z_24 + Z_18 + Z_12 + Z_6)``)."""

    def __init__(self, in_channels: list[int], out_channels: int = 256):
        super().__init__()
        self.norm = nn.ModuleList(TokenLayerNorm(c, eps=1e-6) for c in in_channels)
        self.mla = nn.Module()
        self.mla.channel_proj = nn.ModuleList(ConvModule(c, out_channels, 1) for c in in_channels)
        self.mla.feat_extract = nn.ModuleList(ConvModule(out_channels, out_channels, 3)
                                              for _ in in_channels)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        if len(feats) != len(self.norm):
            raise ValueError(f"MLA neck expects {len(self.norm)} levels, got {len(feats)}")
        projected = [proj(norm(x)) for x, norm, proj in zip(feats, self.norm, self.mla.channel_proj)]
        cumulative, running = [], None
        for z in reversed(projected):  # deepest layer first
            running = z if running is None else running + z
            cumulative.append(running)
        return [conv(m) for m, conv in zip(cumulative, self.mla.feat_extract)]


class SETRMLAHead(DecodeHead):
    """mmseg ``SETRMLAHead``: per level 2 x 3x3 ConvModule (-> mla_channels) + bilinear x4,
    concatenation (``channels = levels * mla_channels``), classifier."""

    def __init__(self, in_channels: list[int], mla_channels: int, num_classes: int,
                 up_scale: int = 4, dropout_ratio: float = 0.0):
        channels = len(in_channels) * mla_channels
        super().__init__(channels, num_classes, dropout_ratio, in_index=list(range(len(in_channels))))
        self.up_convs = nn.ModuleList(
            nn.Sequential(ConvModule(c, mla_channels, 3), ConvModule(mla_channels, mla_channels, 3),
                          _upsample(up_scale))
            for c in in_channels)

    def forward(self, feats) -> torch.Tensor:
        outs = [up(feats[i]) for i, up in zip(self.in_index, self.up_convs)]
        return self.cls_seg(torch.cat(outs, dim=1))


class SETR(Segmentor):
    """ViT encoder (+ MLA neck) + decode head + auxiliary heads (``aux_<i>`` outputs)."""

    def __init__(self, backbone: ViTEncoder, decode_head: nn.Module, auxiliary_heads: list[nn.Module],
                 neck: nn.Module | None = None, aux_weight: float = 0.4):
        super().__init__()
        if aux_weight < 0:
            raise ValueError(f"aux_weight must be >= 0, got {aux_weight}")
        self.backbone = backbone
        self.neck = neck
        self.decode_head = decode_head
        self.auxiliary_head = nn.ModuleList(auxiliary_heads) if auxiliary_heads else None
        self.num_classes = decode_head.num_classes
        self.loss_weights = {"out": 1.0}
        self.loss_names = {"out": "decode.loss_ce"}
        for i in range(len(auxiliary_heads)):
            self.loss_weights[f"aux_{i}"] = aux_weight
            self.loss_names[f"aux_{i}"] = f"aux_{i}.loss_ce"

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.backbone(x)
        if self.neck is not None:
            feats = self.neck(feats)
        outputs = {"out": self.decode_head(feats)}
        if self.auxiliary_head is not None and self.training:
            for i, head in enumerate(self.auxiliary_head):
                outputs[f"aux_{i}"] = head(feats)
        # the encoder zero-pads to a multiple of the patch size: drop the padded border
        h, w = x.shape[-2:]
        p = self.backbone.patch_size
        hp, wp = math.ceil(h / p) * p, math.ceil(w / p) * p
        if (hp, wp) != (h, w):
            outputs = {k: v[..., :math.ceil(v.shape[-2] * h / hp), :math.ceil(v.shape[-1] * w / wp)]
                       for k, v in outputs.items()}
        return outputs


def crop_img_size(backbone: str, crop_size: int) -> int:
    """``img_size`` for training on ``crop_size``-px crops: mmseg's SETR configs set it to the
    crop size; here the crop rounded up to the backbone's patch size, the grid of the padded
    input, so that training needs no position-embedding interpolation."""
    patch = VIT_ARCHS[resolve_vit_name(backbone)].patch_size
    return -(-int(crop_size) // patch) * patch


def _encoder(backbone, pretrained, img_size, fractions, out_indices, drop_rate, weights,
             with_cls_token: bool = True) -> ViTEncoder:
    if isinstance(backbone, ViTEncoder):
        if backbone.with_cls_token != with_cls_token:
            raise ValueError(f"this SETR variant needs a ViTEncoder with with_cls_token={with_cls_token} "
                             f"(as mmseg's config), got {backbone.with_cls_token}")
        return backbone
    if not isinstance(backbone, str):
        raise ValueError(f"SETR needs a ViT backbone name, got {type(backbone).__name__}")
    try:
        name = resolve_vit_name(backbone)
    except ValueError:
        raise ValueError(f"SETR needs a ViT backbone (vit_large as the paper, vit_base, or "
                         f"tiny/vit_tiny for tests), got backbone {backbone!r}") from None
    layers = VIT_ARCHS[name].num_layers
    indices = tuple(out_indices) if out_indices is not None else layer_fractions_to_indices(layers, fractions)
    return ViTEncoder(name, img_size=img_size, out_indices=indices, drop_rate=drop_rate,
                      pretrained=pretrained, weights=weights, with_cls_token=with_cls_token)


@register("setr_naive")
def build_setr_naive(num_classes: int, backbone: str | ViTEncoder = "vit_large", pretrained: bool = False,
                     *, img_size: int = 512, channels: int = 256, aux: bool = True,
                     aux_weight: float = 0.4, drop_rate: float = 0.0, weights: str = "IMAGENET1K_V1",
                     out_indices=None) -> SETR:
    """SETR-Naive; ``out_indices`` (0-based, 3 aux layers then the decode layer) default to
    layers 10/15/20/24 of ViT-L (the same fractions of the depth for other ViTs)."""
    enc = _encoder(backbone, pretrained, img_size, UP_LAYER_FRACTIONS, out_indices, drop_rate, weights)
    d, n = enc.embed_dim, len(enc.out_indices)
    head = SETRUPHead(d, channels, num_classes, num_convs=1, up_scale=4, kernel_size=1, in_index=n - 1)
    auxs = [SETRUPHead(d, channels, num_classes, num_convs=2, up_scale=4, kernel_size=1, in_index=i)
            for i in range(n - 1)] if aux else []
    return SETR(enc, head, auxs, aux_weight=aux_weight)


@register("setr_pup")
def build_setr_pup(num_classes: int, backbone: str | ViTEncoder = "vit_large", pretrained: bool = False,
                   *, img_size: int = 512, channels: int = 256, aux: bool = True,
                   aux_weight: float = 0.4, drop_rate: float = 0.0, weights: str = "IMAGENET1K_V1",
                   out_indices=None) -> SETR:
    """SETR-PUP: four 3x3 conv + x2 upsampling stages (logits at full resolution); auxiliary
    heads two 3x3 conv + x4 stages (full resolution too)."""
    enc = _encoder(backbone, pretrained, img_size, UP_LAYER_FRACTIONS, out_indices, drop_rate, weights)
    d, n = enc.embed_dim, len(enc.out_indices)
    head = SETRUPHead(d, channels, num_classes, num_convs=4, up_scale=2, kernel_size=3, in_index=n - 1)
    auxs = [SETRUPHead(d, channels, num_classes, num_convs=2, up_scale=4, kernel_size=3, in_index=i)
            for i in range(n - 1)] if aux else []
    return SETR(enc, head, auxs, aux_weight=aux_weight)


@register("setr_mla")
def build_setr_mla(num_classes: int, backbone: str | ViTEncoder = "vit_large", pretrained: bool = False,
                   *, img_size: int = 512, channels: int = 256, mla_channels: int = 128,
                   aux: bool = True, aux_weight: float = 0.4, drop_rate: float = 0.0,
                   weights: str = "IMAGENET1K_V1", out_indices=None) -> SETR:
    """SETR-MLA on layers 6/12/18/24 (ViT-L; quarters of the depth otherwise), encoder without
    the class token."""
    enc = _encoder(backbone, pretrained, img_size, MLA_LAYER_FRACTIONS, out_indices, drop_rate, weights,
                   with_cls_token=False)
    levels = len(enc.out_indices)
    neck = MLANeck([enc.embed_dim] * levels, channels)
    head = SETRMLAHead([channels] * levels, mla_channels, num_classes)
    auxs = [FCNHead(channels, channels, num_classes, num_convs=0, kernel_size=1, concat_input=False,
                    dropout_ratio=0.0, in_index=i) for i in range(levels)] if aux else []
    return SETR(enc, head, auxs, neck=neck, aux_weight=aux_weight)


def convert_mmseg_setr(state: dict) -> dict:
    """Rename an mmseg SETR checkpoint (``state_dict`` or the checkpoint dict) to our names:
    ``backbone.*`` through :func:`~models.segmentors.vit.convert_mmseg_vit`, the rest as is."""
    if "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    backbone = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    out = {f"backbone.{k}": v for k, v in convert_mmseg_vit(backbone).items()}
    out.update({k: v for k, v in state.items() if not k.startswith("backbone.")})
    return out
