"""DANet -- Dual Attention Network (Fu, Liu, Tian, Li, Bao, Fang & Lu, CVPR 2019).

Two parallel branches on the last backbone stage (2048 ch, 1/8), each after a 3x3 ConvModule
to C = 512 (``pam_in_conv`` / ``cam_in_conv``, the paper's conv5a/conv5c, C = 2048/4).

Position attention (PAM) on A (C x N, N = H W), Eq. (1)-(2):

    B = W_q A + b_q,  C' = W_k A + b_k   (1x1 convs, C -> C/8),   D = W_v A + b_v (C -> C)
    s_ji = exp(B_i . C'_j) / sum_i exp(B_i . C'_j)        softmax over positions, no 1/sqrt(d)
    E_j  = gamma * sum_i s_ji D_i + A_j,                  gamma initialised to 0

Channel attention (CAM) on A (no convolutions), Eq. (3)-(4) with the reference code's trick:

    X_e = A A^T (C x C),   X' = max_row(X_e) - X_e,   x_ji = softmax_i(X'_ji)
    E_j = beta * sum_i x_ji A_i + A_j,                     beta initialised to 0

Subtracting from the row maximum makes the most similar channels the *least* attended
(both the official code and mmseg do it; the paper's Eq. 3 has plain ``exp(A_i . A_j)``);
``cam_max_trick=False`` gives the paper's form.

Each branch continues with a 3x3 ConvModule (``pam_out_conv`` / ``cam_out_conv``; conv51 /
conv52), and the fused feature is their sum. Three classifiers (Dropout2d 0.1 + 1x1 conv):
``out`` on the sum (conv8), ``pam`` and ``cam`` on each branch (conv6, conv7). Loss (official
``SegmentationMultiLosses`` and mmseg): ``L = CE(out) + CE(pam) + CE(cam)`` all with weight 1,
plus mmseg's auxiliary FCN head on stage 3 with weight 0.4 (``aux=True``, the default, so that
mmseg model-zoo checkpoints load; ``aux=False`` is the original). Inference uses ``out`` only.

Names follow mmseg's ``DAHead`` (``decode_head.pam.gamma.scale`` ...). Parameters at 21
classes on R-101-D8: backbone 42.52 M + head 23.96 M + aux 2.37 M = 68.84 M (66.48 M without
aux), models.md's table.
"""

import torch
from torch import nn

from models.segmentors import register
from models.segmentors.layers import (ConvModule, DecodeHead, EncoderDecoder, aux_fcn_head,
                                      in_channels_of, make_backbone, make_classifier, select)


class Scale(nn.Module):
    """A learnable scalar ``y = scale * x`` (mmcv's ``Scale``), here initialised to 0."""

    def __init__(self, init: float = 0.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class PAM(nn.Module):
    """Position attention module; ``E = gamma * (D S^T) + A`` (see the module docstring)."""

    def __init__(self, in_channels: int, key_channels: int | None = None):
        super().__init__()
        key_channels = key_channels or max(in_channels // 8, 1)
        self.query_project = nn.Conv2d(in_channels, key_channels, 1)
        self.key_project = nn.Conv2d(in_channels, key_channels, 1)
        self.value_project = nn.Conv2d(in_channels, in_channels, 1)
        self.gamma = Scale(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        query = self.query_project(x).flatten(2).transpose(1, 2)      # N x HW x C'
        key = self.key_project(x).flatten(2)                           # N x C' x HW
        value = self.value_project(x).flatten(2).transpose(1, 2)      # N x HW x C
        with torch.autocast(device_type=x.device.type, enabled=False):  # energies in float32
            energy = torch.bmm(query.float(), key.float())
            attention = torch.softmax(energy, dim=-1)                  # S[j, i], sum_i = 1
        context = torch.bmm(attention.to(value.dtype), value).transpose(1, 2).reshape(n, c, h, w)
        return self.gamma(context) + x


class CAM(nn.Module):
    """Channel attention module; ``E = beta * softmax(max - A A^T) A + A``."""

    def __init__(self, max_trick: bool = True):
        super().__init__()
        self.max_trick = max_trick
        self.gamma = Scale(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        # A A^T sums H W products of post-ReLU activations and overflows float16 (max 65504)
        # at ordinary sizes, so the attention runs in float32 even under autocast.
        with torch.autocast(device_type=x.device.type, enabled=False):
            flat = x.float().flatten(2)                                # N x C x HW
            energy = torch.bmm(flat, flat.transpose(1, 2))             # N x C x C
            if self.max_trick:
                energy = energy.max(dim=-1, keepdim=True).values - energy
            attention = torch.softmax(energy, dim=-1)
            out = torch.bmm(attention, flat).reshape(n, c, h, w).to(x.dtype)
        return self.gamma(out) + x


class DAHead(DecodeHead):
    """PAM and CAM branches, summed; outputs ``{"out", "pam", "cam"}`` in training mode."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, pam_channels: int | None = None,
                 dropout_ratio: float = 0.1, in_index: int = -1, cam_max_trick: bool = True):
        super().__init__(channels, num_classes, dropout_ratio, in_index)
        self.pam_in_conv = ConvModule(in_channels, channels, 3)
        self.pam = PAM(channels, pam_channels or max(channels // 8, 1))
        self.pam_out_conv = ConvModule(channels, channels, 3)
        self.pam_conv_seg = make_classifier(channels, num_classes)
        self.cam_in_conv = ConvModule(in_channels, channels, 3)
        self.cam = CAM(cam_max_trick)
        self.cam_out_conv = ConvModule(channels, channels, 3)
        self.cam_conv_seg = make_classifier(channels, num_classes)

    def _classify(self, conv: nn.Conv2d, feat: torch.Tensor) -> torch.Tensor:
        return conv(self.dropout(feat) if self.dropout is not None else feat)

    def branches(self, feats, attention: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Post-conv features of the two branches; ``attention=False`` skips PAM and CAM."""
        x = select(feats, self.in_index)
        pam = self.pam_in_conv(x)
        cam = self.cam_in_conv(x)
        if attention:
            pam, cam = self.pam(pam), self.cam(cam)
        return self.pam_out_conv(pam), self.cam_out_conv(cam)

    def forward(self, feats, attention: bool = True) -> dict[str, torch.Tensor]:
        pam, cam = self.branches(feats, attention)
        outputs = {"out": self.cls_seg(pam + cam)}
        if self.training:
            outputs["pam"] = self._classify(self.pam_conv_seg, pam)
            outputs["cam"] = self._classify(self.cam_conv_seg, cam)
        return outputs


class DANet(EncoderDecoder):
    loss_names = {"out": "decode.pam_cam.loss_ce", "pam": "decode.pam.loss_ce",
                  "cam": "decode.cam.loss_ce", "aux": "aux.loss_ce"}

    def __init__(self, backbone, decode_head, auxiliary_head=None, aux_weight=0.4,
                 branch_weight: float = 1.0):
        super().__init__(backbone, decode_head, auxiliary_head, aux_weight)
        if branch_weight < 0:
            raise ValueError(f"branch_weight must be >= 0, got {branch_weight}")
        self.loss_weights.update(pam=branch_weight, cam=branch_weight)


@register("danet")
def build_danet(num_classes: int, backbone: str | nn.Module = "resnet101", pretrained: bool = False,
                *, channels: int = 512, pam_channels: int | None = None, dropout_ratio: float = 0.1,
                cam_max_trick: bool = True, branch_weight: float = 1.0, aux: bool = True,
                aux_channels: int = 256, aux_weight: float = 0.4,
                backbone_options: dict | None = None) -> DANet:
    """DANet on ``backbone``: position + channel attention, three CE losses (+ aux FCN 0.4)."""
    net = make_backbone(backbone, pretrained, backbone_options)
    head = DAHead(in_channels_of(net, -1), channels, num_classes, pam_channels, dropout_ratio,
                  cam_max_trick=cam_max_trick)
    aux_head = (aux_fcn_head(in_channels_of(net, -2), num_classes, aux_channels, dropout_ratio)
                if aux else None)
    return DANet(net, head, aux_head, aux_weight, branch_weight)
