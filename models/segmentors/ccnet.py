"""CCNet (Huang et al., "CCNet: Criss-Cross Attention for Semantic Segmentation", ICCV 2019).

Recurrent criss-cross attention (RCCA) on the output-stride-8 stage-4 feature, as in
mmsegmentation's ``CCHead`` (an FCN head whose two 3x3 convs sandwich the attention):

    h = CBR_3x3(x)                    2048 -> 512
    h = CCA(CCA(h))                   R = 2 loops of the same module (shared weights)
    h = CBR_3x3(h)                    512 -> 512
    y = cls(Dropout2d_0.1(CBR_3x3([x, h])))   2560 -> 512 -> K

Criss-cross attention on ``h`` (C channels, H x W): ``Q = W_q h``, ``K = W_k h`` (1x1 convs
C -> C/8, with bias), ``V = W_v h`` (1x1 conv C -> C). For pixel ``u = (i, j)`` the
criss-cross set Ω_u = {(i', j) : i' != i} ∪ {(i, j') : all j'} holds its column without
itself and its whole row, so ``u`` is counted once (H + W - 1 entries; the column energy
of ``u`` itself is set to -inf, mmcv's convention):

    e_{u,v} = Q_u · K_v,     A_{u,v} = exp(e_{u,v}) / Σ_{v' ∈ Ω_u} exp(e_{u,v'})   (one joint softmax)
    CCA(h)_u = γ Σ_{v ∈ Ω_u} A_{u,v} V_v + h_u,      γ (``gamma.scale``) initialised to 0.

Two loops let every pixel gather context from every other pixel. Auxiliary FCN head on
stage 3 with loss weight 0.4: ``L = CE(y) + 0.4 CE(y_aux)``. The TPAMI version's category
consistent loss is not used (nor in mmseg).

Parameters at 21 classes on R-101-D8: decode head 23.94 M, aux 2.37 M, backbone 42.52 M
(68.82 M in all, models.md).
"""

import torch
import torch.nn.functional as F
from torch import nn

from models.segmentors import register
from models.segmentors.layers import EncoderDecoder, FCNHead, aux_fcn_head, in_channels_of, make_backbone, select


class Scale(nn.Module):
    """A learnable scalar ``scale`` multiplying its input (mmcv's ``Scale``)."""

    def __init__(self, value: float = 0.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class CrissCrossAttention(nn.Module):
    """One criss-cross attention step (see the module docstring); pure PyTorch, any device."""

    def __init__(self, in_channels: int, reduction: int = 8):
        super().__init__()
        if in_channels // reduction < 1:
            raise ValueError(f"criss-cross attention: in_channels {in_channels} < reduction {reduction}")
        self.in_channels = in_channels
        self.query_conv = nn.Conv2d(in_channels, in_channels // reduction, 1)
        self.key_conv = nn.Conv2d(in_channels, in_channels // reduction, 1)
        self.value_conv = nn.Conv2d(in_channels, in_channels, 1)
        self.gamma = Scale(0.0)

    def attention(self, query: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Criss-cross weights: ``(A_col (N, H, W, H), A_row (N, H, W, W))`` from one softmax
        over the H + W entries; ``A_col[n, i, j, i] = 0`` (the pixel itself sits in the row)."""
        h = query.shape[2]
        e_col = torch.einsum("nchw,nciw->nhwi", query, key)     # query (h, w) vs key (i, w)
        self_mask = torch.eye(h, dtype=torch.bool, device=query.device).view(1, h, 1, h)
        e_col = e_col.masked_fill(self_mask, float("-inf"))
        e_row = torch.einsum("nchw,nchj->nhwj", query, key)     # query (h, w) vs key (h, j)
        attn = F.softmax(torch.cat([e_col, e_row], dim=-1), dim=-1)
        return attn[..., :h], attn[..., h:]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        query, key, value = self.query_conv(x), self.key_conv(x), self.value_conv(x)
        with torch.autocast(device_type=x.device.type, enabled=False):  # energies in float32
            a_col, a_row = self.attention(query.float(), key.float())
        a_col, a_row = a_col.to(value.dtype), a_row.to(value.dtype)
        out = torch.einsum("nciw,nhwi->nchw", value, a_col)
        out = out + torch.einsum("nchj,nhwj->nchw", value, a_row)
        return self.gamma(out) + x


class CCHead(FCNHead):
    """mmseg ``CCHead``: ``convs.0`` -> R x ``cca`` -> ``convs.1`` -> ``conv_cat`` -> cls."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, recurrence: int = 2,
                 dropout_ratio: float = 0.1, concat_input: bool = True):
        super().__init__(in_channels, channels, num_classes, num_convs=2, concat_input=concat_input,
                         dropout_ratio=dropout_ratio)
        if recurrence < 1:
            raise ValueError(f"CCNet recurrence must be >= 1, got {recurrence}")
        self.recurrence = recurrence
        self.cca = CrissCrossAttention(channels)

    def features(self, feats) -> torch.Tensor:
        x = select(feats, self.in_index)
        f = self.convs[0](x)
        for _ in range(self.recurrence):
            f = self.cca(f)
        f = self.convs[1](f)
        if self.concat_input:
            f = self.conv_cat(torch.cat([x, f], dim=1))
        return f


@register("ccnet")
def build_ccnet(num_classes: int, backbone: str | nn.Module = "resnet101", pretrained: bool = False,
                *, channels: int = 512, recurrence: int = 2, dropout_ratio: float = 0.1,
                aux: bool = True, aux_channels: int = 256, aux_weight: float = 0.4,
                backbone_options: dict | None = None) -> EncoderDecoder:
    """CCNet on an OS-8 backbone (``aux=False`` drops the auxiliary FCN head)."""
    net = make_backbone(backbone, pretrained, backbone_options)
    head = CCHead(in_channels_of(net, -1), channels, num_classes, recurrence=recurrence,
                  dropout_ratio=dropout_ratio)
    aux_head = (aux_fcn_head(in_channels_of(net, -2), num_classes, aux_channels, dropout_ratio)
                if aux else None)
    return EncoderDecoder(net, head, aux_head, aux_weight)
