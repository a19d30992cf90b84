"""Building blocks shared by the segmentor zoo.

Child names follow mmsegmentation/mmcv so that model-zoo checkpoints load with at most a
backbone renaming (see :mod:`models.segmentors.mmseg_convert`):

* :class:`ConvModule` -- ``conv -> bn -> activate`` (``.conv``, ``.bn``, ``.activate``).
  The convolution has no bias when a norm follows it (``y = ReLU(BN(W * x))``), a bias
  otherwise (``y = ReLU(W * x + b)``).
* :class:`DepthwiseSeparableConvModule` -- ``.depthwise_conv`` (k x k, groups = C_in) then
  ``.pointwise_conv`` (1 x 1), each a ConvModule with BN + ReLU (mmcv's defaults).
* :class:`DecodeHead` -- the classifier every head ends with (mmseg ``BaseDecodeHead.cls_seg``):
  ``logits = conv_seg(Dropout2d_p(feat))``, ``conv_seg`` a 1x1 conv with bias, weights drawn
  from N(0, 0.01^2), bias 0. ``in_index`` selects the backbone level(s) the head reads.
* :class:`FCNHead` -- mmseg's dilated-FCN head (also every R-D8 model's auxiliary head).
* :class:`SelfAttentionBlock` -- mmseg's generic query/key/value attention (OCR, ANN, ISA,
  ISNet): ``out = out_project( softmax(q k^T / sqrt(C)) v )``.
* :class:`EncoderDecoder` -- a :class:`Segmentor` made of a backbone, a decode head and an
  optional auxiliary head (``backbone`` / ``decode_head`` / ``auxiliary_head``).
* :func:`make_backbone` -- a backbone from ``models.backbones.build_backbone`` (or a module).

Initialisation (mmcv's): convolutions of ConvModules ~ Kaiming-normal (fan_out, ReLU gain),
bias 0; BN weight 1, bias 0.
"""

from typing import Mapping, Sequence

import torch
from torch import nn

from models.segmentors import Segmentor


class ConvModule(nn.Sequential):
    """``Conv2d -> BatchNorm2d -> ReLU`` with mmcv's child names.

    Args:
        in_channels, out_channels, kernel_size, stride, dilation, groups: as ``nn.Conv2d``.
        padding: default ``dilation * (kernel_size - 1) // 2`` (keeps the spatial size).
        norm: add ``.bn`` (BatchNorm2d); the conv then has no bias.
        act: add ``.activate`` (ReLU).
        bias: force the conv's bias on/off (default: ``not norm``).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1,
                 stride: int = 1, padding: int | None = None, dilation: int = 1,
                 groups: int = 1, norm: bool = True, act: bool = True,
                 bias: bool | None = None):
        super().__init__()
        if padding is None:
            padding = dilation * (kernel_size - 1) // 2
        if bias is None:
            bias = not norm
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride,
                              padding=padding, dilation=dilation, groups=groups, bias=bias)
        if norm:
            self.bn = nn.BatchNorm2d(out_channels)
        if act:
            self.activate = nn.ReLU(inplace=True)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")
        if self.conv.bias is not None:
            nn.init.zeros_(self.conv.bias)
        if norm:
            nn.init.ones_(self.bn.weight)
            nn.init.zeros_(self.bn.bias)


class DepthwiseSeparableConvModule(nn.Sequential):
    """Depthwise k x k conv (+BN+ReLU) then pointwise 1x1 conv (+BN+ReLU), mmcv's layout."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3,
                 stride: int = 1, padding: int | None = None, dilation: int = 1):
        super().__init__()
        self.depthwise_conv = ConvModule(in_channels, in_channels, kernel_size, stride=stride,
                                         padding=padding, dilation=dilation, groups=in_channels)
        self.pointwise_conv = ConvModule(in_channels, out_channels, 1)


def select(feats: Sequence[torch.Tensor] | torch.Tensor, index: int) -> torch.Tensor:
    """``feats[index]`` for a list of backbone levels; a single tensor is returned as is."""
    if isinstance(feats, torch.Tensor):
        return feats
    return feats[index]


class DecodeHead(nn.Module):
    """Base of every head: ``in_index`` plus the classifier ``cls_seg``.

    ``cls_seg(f) = conv_seg(Dropout2d_p(f))``; ``dropout_ratio <= 0`` disables the dropout
    (mmseg's convention, ``.dropout`` is then ``None``).
    """

    def __init__(self, channels: int, num_classes: int, dropout_ratio: float = 0.1,
                 in_index: int | Sequence[int] = -1):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.in_index = in_index
        self.num_classes = num_classes
        self.dropout = nn.Dropout2d(dropout_ratio) if dropout_ratio and dropout_ratio > 0 else None
        self.conv_seg = make_classifier(channels, num_classes)

    def cls_seg(self, feat: torch.Tensor) -> torch.Tensor:
        if self.dropout is not None:
            feat = self.dropout(feat)
        return self.conv_seg(feat)


def make_classifier(in_channels: int, num_classes: int) -> nn.Conv2d:
    """1x1 conv with bias, weight ~ N(0, 0.01^2), bias 0 (mmseg's ``conv_seg`` init)."""
    conv = nn.Conv2d(in_channels, num_classes, 1)
    nn.init.normal_(conv.weight, 0.0, 0.01)
    nn.init.zeros_(conv.bias)
    return conv


class FCNHead(DecodeHead):
    """mmseg's ``FCNHead`` (the dilated-FCN baseline head, Long et al. 2015 on a dilated ResNet).

    ``f = convs(x)`` (``num_convs`` k x k ConvModules in -> channels -> ... -> channels),
    then if ``concat_input``: ``f = conv_cat([x, f])`` (k x k ConvModule in+channels ->
    channels); logits = ``cls_seg(f)``. ``num_convs=0`` requires in == channels and makes
    ``convs`` the identity.

    R-101-D8 decode head (2048 -> 512, 2 convs, concat): 23.61 M params at 21 classes;
    auxiliary head (1024 -> 256, 1 conv, no concat, ``in_index=-2``): 2.37 M.
    """

    def __init__(self, in_channels: int, channels: int, num_classes: int, num_convs: int = 2,
                 kernel_size: int = 3, concat_input: bool = True, dilation: int = 1,
                 dropout_ratio: float = 0.1, in_index: int = -1):
        super().__init__(channels, num_classes, dropout_ratio, in_index)
        if num_convs < 0:
            raise ValueError(f"num_convs must be >= 0, got {num_convs}")
        if num_convs == 0 and in_channels != channels:
            raise ValueError(f"num_convs=0 needs in_channels == channels, got {in_channels} != {channels}")
        if num_convs == 0:
            self.convs = nn.Identity()
        else:
            layers = [ConvModule(in_channels if i == 0 else channels, channels, kernel_size,
                                 dilation=dilation) for i in range(num_convs)]
            self.convs = nn.Sequential(*layers)
        self.concat_input = concat_input
        if concat_input:
            self.conv_cat = ConvModule(in_channels + channels, channels, kernel_size)

    def features(self, feats) -> torch.Tensor:
        x = select(feats, self.in_index)
        f = self.convs(x)
        if self.concat_input:
            f = self.conv_cat(torch.cat([x, f], dim=1))
        return f

    def forward(self, feats) -> torch.Tensor:
        return self.cls_seg(self.features(feats))


def aux_fcn_head(in_channels: int, num_classes: int, channels: int = 256,
                 dropout_ratio: float = 0.1, in_index: int = -2) -> FCNHead:
    """The auxiliary head of mmseg's R-D8 models: 3x3 ConvModule in -> 256, dropout, 1x1 cls."""
    return FCNHead(in_channels, channels, num_classes, num_convs=1, concat_input=False,
                   dropout_ratio=dropout_ratio, in_index=in_index)


def build_project(in_channels: int, channels: int, num_convs: int, conv_module: bool) -> nn.Module:
    """``num_convs`` 1x1 projections in -> channels (-> channels ...): ConvModules (BN + ReLU)
    or plain convs with bias; a single layer is returned bare, several as a Sequential."""
    if num_convs < 1:
        raise ValueError(f"num_convs must be >= 1, got {num_convs}")
    if conv_module:
        layers = [ConvModule(in_channels if i == 0 else channels, channels, 1) for i in range(num_convs)]
    else:
        layers = [nn.Conv2d(in_channels if i == 0 else channels, channels, 1) for i in range(num_convs)]
    return layers[0] if num_convs == 1 else nn.Sequential(*layers)


class SelfAttentionBlock(nn.Module):
    """Scaled dot-product attention between a query map and a key/value map (mmseg's layout).

    With ``q = P_q(X_q)`` (N_q x C), ``k = P_k(X_k)`` (N_k x C), ``v = P_v(X_k)``::

        A   = softmax_j( q k^T / sqrt(C) )      (no 1/sqrt(C) when ``matmul_norm=False``)
        out = P_out( A v )                      reshaped to the query's spatial size

    ``P_q``/``P_k``: ``key_query_num_convs`` 1x1 layers (ConvModules if ``key_query_norm``,
    else plain convs), shared when ``share_key_query``; ``P_v``/``P_out``:
    ``value_out_num_convs`` layers (ConvModules if ``value_out_norm``); without ``with_out``
    there is no ``P_out`` and ``P_v`` maps straight to ``out_channels``. Optional
    ``query_downsample`` / ``key_downsample`` modules (e.g. pooling) act after projection.
    """

    def __init__(self, key_in_channels: int, query_in_channels: int, channels: int,
                 out_channels: int, share_key_query: bool = False,
                 query_downsample: nn.Module | None = None, key_downsample: nn.Module | None = None,
                 key_query_num_convs: int = 1, key_query_norm: bool = True,
                 value_out_num_convs: int = 1, value_out_norm: bool = True,
                 matmul_norm: bool = True, with_out: bool = True):
        super().__init__()
        if share_key_query and key_in_channels != query_in_channels:
            raise ValueError("share_key_query needs key_in_channels == query_in_channels, "
                             f"got {key_in_channels} != {query_in_channels}")
        self.channels = channels
        self.matmul_norm = matmul_norm
        self.key_project = build_project(key_in_channels, channels, key_query_num_convs, key_query_norm)
        self.query_project = (self.key_project if share_key_query else
                              build_project(query_in_channels, channels, key_query_num_convs, key_query_norm))
        self.value_project = build_project(key_in_channels, channels if with_out else out_channels,
                                           value_out_num_convs, value_out_norm)
        self.out_project = (build_project(channels, out_channels, value_out_num_convs, value_out_norm)
                            if with_out else None)
        self.query_downsample = query_downsample
        self.key_downsample = key_downsample

    def forward(self, query_feats: torch.Tensor, key_feats: torch.Tensor) -> torch.Tensor:
        n = query_feats.shape[0]
        query = self.query_project(query_feats)
        if self.query_downsample is not None:
            query = self.query_downsample(query)
        size = query.shape[-2:]
        key = self.key_project(key_feats)
        value = self.value_project(key_feats)
        if self.key_downsample is not None:
            key, value = self.key_downsample(key), self.key_downsample(value)
        query = query.reshape(n, query.shape[1], -1).transpose(1, 2)     # n x Nq x C
        key = key.reshape(n, key.shape[1], -1)                            # n x C x Nk
        value = value.reshape(n, value.shape[1], -1).transpose(1, 2)     # n x Nk x Cv
        with torch.autocast(device_type=query.device.type, enabled=False):  # no float16 overflow
            sim = torch.bmm(query.float(), key.float())
            if self.matmul_norm:
                sim = sim * self.channels ** -0.5
            sim = sim.softmax(dim=-1)
        context = torch.bmm(sim.to(value.dtype), value).transpose(1, 2)
        context = context.reshape(n, -1, *size)
        return self.out_project(context) if self.out_project is not None else context


def make_backbone(backbone: str | nn.Module, pretrained: bool = False,
                  options: Mapping | None = None) -> nn.Module:
    """A backbone module with ``.channels`` whose forward returns the list of stage outputs.

    ``backbone`` is a name for ``models.backbones.build_backbone`` or an already built module.
    """
    if isinstance(backbone, nn.Module):
        if options:
            raise ValueError("backbone_options given together with a built backbone module")
        if not hasattr(backbone, "channels"):
            raise ValueError(f"backbone module {type(backbone).__name__} has no .channels attribute")
        return backbone
    from models.backbones import build_backbone
    return build_backbone(backbone, pretrained=pretrained, **dict(options or {}))


def in_channels_of(backbone: nn.Module, index: int) -> int:
    """Channels of backbone level ``index`` with a clear error when the level does not exist."""
    channels = list(backbone.channels)
    try:
        return int(channels[index])
    except IndexError:
        raise ValueError(f"backbone has {len(channels)} levels {channels}; level {index} "
                         f"requested") from None


class EncoderDecoder(Segmentor):
    """Backbone + decode head (+ auxiliary head): mmseg's ``EncoderDecoder`` layout.

    ``forward(x)``: ``feats = backbone(x)``; ``decode_head(feats)`` gives the main logits
    (``"out"``) or a dict of outputs that includes ``"out"``; ``auxiliary_head(feats)`` gives
    ``"aux"`` in training mode only. Loss: ``L = L_out + aux_weight * L_aux`` (aux 0.4 in
    every R-D8 mmseg config), see :meth:`Segmentor.losses`.
    """

    def __init__(self, backbone: nn.Module, decode_head: nn.Module,
                 auxiliary_head: nn.Module | None = None, aux_weight: float = 0.4):
        super().__init__()
        if aux_weight < 0:
            raise ValueError(f"aux_weight must be >= 0, got {aux_weight}")
        self.backbone = backbone
        self.decode_head = decode_head
        self.auxiliary_head = auxiliary_head
        self.num_classes = decode_head.num_classes
        self.loss_weights = dict(self.loss_weights)
        if auxiliary_head is not None:
            self.loss_weights["aux"] = aux_weight

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.backbone(x)
        decoded = self.decode_head(feats)
        outputs = dict(decoded) if isinstance(decoded, Mapping) else {"out": decoded}
        if self.auxiliary_head is not None and self.training:
            outputs["aux"] = self.auxiliary_head(feats)
        return outputs
