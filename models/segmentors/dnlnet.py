"""DNLNet (Yin et al., "Disentangled Non-Local Neural Networks", ECCV 2020).

mmsegmentation's ``DNLHead``: an FCN head whose two 3x3 convs sandwich a disentangled
non-local (DNL) block on the output-stride-8 stage-4 feature:

    h = CBR_3x3(x)  (2048 -> 512);  h = DNL(h);  h = CBR_3x3(h);
    y = cls(Dropout2d_0.1(CBR_3x3([x, h])))     (2560 -> 512 -> K)

DNL block on ``x`` (C = 512 channels, positions i, j over H·W), C' = C / reduction = 256:
``q_i = θ(x)_i``, ``k_j = φ(x)_j``, ``v_j = g(x)_j`` (1x1 convs with bias, C -> C'), and
the means over positions ``μ_q = mean_i q_i``, ``μ_k = mean_j k_j``:

    pairwise (whitened):  ω^P_{ij} = softmax_j( (q_i - μ_q)·(k_j - μ_k) / (√C' · τ) ),  τ = 0.05
    unary:                ω^U_j    = softmax_j( W_m x_j )          (``conv_mask``: 1x1, C -> 1)
    y_i = Σ_j ω^P_{ij} v_j + Σ_j ω^U_j v_j
    DNL(x)_i = x_i + BN(W_o y_i)            (``conv_out``: 1x1 C' -> C, BN weight initialised 0)

Whitening makes ω^P invariant to adding a constant vector to every key (or query): the
pairwise term then models pure pixel–pixel relations, the unary term the saliency of each
key. The paper writes the unary term as σ(μ_qᵀ k_j) and then replaces it by the separate
linear map W_m used here; the scale 1/√C' (``use_scale``) and the temperature τ = 0.05 are
the reference implementation's (mmseg's DNLNet configs), not in the paper's equations. θ/φ/g weights are
initialised N(0, 0.01²) (mmcv's NonLocal2d). Auxiliary FCN head on stage 3, weight 0.4.

Parameters at 21 classes on R-101-D8: decode head 24.13 M, aux 2.37 M, backbone 42.52 M
(69.02 M in all, models.md).
"""

import torch
from torch import nn

from models.segmentors import register
from models.segmentors.layers import (ConvModule, EncoderDecoder, FCNHead, aux_fcn_head, in_channels_of,
                                      make_backbone, select)


class DisentangledNonLocal2d(nn.Module):
    """The DNL block (see the module docstring) with mmcv's child names
    (``g``, ``theta``, ``phi``, ``conv_out``, ``conv_mask``)."""

    def __init__(self, in_channels: int, reduction: int = 2, use_scale: bool = True,
                 temperature: float = 0.05):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"DNL temperature must be > 0, got {temperature}")
        inter = max(in_channels // reduction, 1)
        self.in_channels, self.inter_channels = in_channels, inter
        self.use_scale, self.temperature = use_scale, temperature
        self.g = ConvModule(in_channels, inter, 1, norm=False, act=False)
        self.theta = ConvModule(in_channels, inter, 1, norm=False, act=False)
        self.phi = ConvModule(in_channels, inter, 1, norm=False, act=False)
        self.conv_out = ConvModule(inter, in_channels, 1, norm=True, act=False)
        self.conv_mask = nn.Conv2d(in_channels, 1, 1)
        for m in (self.g, self.theta, self.phi):
            nn.init.normal_(m.conv.weight, 0.0, 0.01)
        nn.init.zeros_(self.conv_out.bn.weight)  # the block starts as the identity

    def pairwise(self, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """Whitened pairwise weights ``(N, HW, HW)`` from ``query``/``key`` of shape ``(N, C', HW)``."""
        query = query - query.mean(dim=-1, keepdim=True)
        key = key - key.mean(dim=-1, keepdim=True)
        energy = torch.matmul(query.transpose(1, 2), key)
        if self.use_scale:
            energy = energy / query.shape[1] ** 0.5
        return (energy / self.temperature).softmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        value = self.g(x).flatten(2).transpose(1, 2)                          # N, HW, C'
        query, key = self.theta(x).flatten(2), self.phi(x).flatten(2)
        with torch.autocast(device_type=x.device.type, enabled=False):  # τ = 0.05 overflows float16
            pair = self.pairwise(query.float(), key.float())                   # N, HW, HW
        y = torch.matmul(pair.to(value.dtype), value)                          # N, HW, C'
        unary = self.conv_mask(x).flatten(2).float().softmax(dim=-1)           # N, 1, HW
        y = y + torch.matmul(unary.to(value.dtype), value)                     # broadcast over i
        y = y.transpose(1, 2).reshape(n, self.inter_channels, h, w)
        return x + self.conv_out(y)


class DNLHead(FCNHead):
    """mmseg ``DNLHead``: ``convs.0`` -> ``dnl_block`` -> ``convs.1`` -> ``conv_cat`` -> cls."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, reduction: int = 2,
                 use_scale: bool = True, temperature: float = 0.05, dropout_ratio: float = 0.1):
        super().__init__(in_channels, channels, num_classes, num_convs=2, concat_input=True,
                         dropout_ratio=dropout_ratio)
        self.dnl_block = DisentangledNonLocal2d(channels, reduction, use_scale, temperature)

    def features(self, feats) -> torch.Tensor:
        x = select(feats, self.in_index)
        f = self.convs[1](self.dnl_block(self.convs[0](x)))
        return self.conv_cat(torch.cat([x, f], dim=1))


@register("dnlnet")
def build_dnlnet(num_classes: int, backbone: str | nn.Module = "resnet101", pretrained: bool = False,
                 *, channels: int = 512, reduction: int = 2, temperature: float = 0.05,
                 use_scale: bool = True, dropout_ratio: float = 0.1, aux: bool = True,
                 aux_channels: int = 256, aux_weight: float = 0.4,
                 backbone_options: dict | None = None) -> EncoderDecoder:
    """DNLNet on an OS-8 backbone (``aux=False`` drops the auxiliary FCN head)."""
    net = make_backbone(backbone, pretrained, backbone_options)
    head = DNLHead(in_channels_of(net, -1), channels, num_classes, reduction=reduction,
                   use_scale=use_scale, temperature=temperature, dropout_ratio=dropout_ratio)
    aux_head = (aux_fcn_head(in_channels_of(net, -2), num_classes, aux_channels, dropout_ratio)
                if aux else None)
    return EncoderDecoder(net, head, aux_head, aux_weight)
