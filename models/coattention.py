"""The MCIS co-attention classifier (Sun et al., "Mining Cross-Image Semantics for Weakly
Supervised Semantic Segmentation", ECCV 2020), with the official code's choices
(GuoleiSun/MCIS_wsss) where the paper is silent.

For an image pair (I_m, I_n) with multi-hot labels l_m, l_n over K foreground classes:

* Features. A shared backbone (last stage, output stride 8) and three extra 3x3 convs
  (C_b -> C -> C -> C, each + ReLU; official C = 512) give ``F_m, F_n`` (C x HW).
* Plain CAM head. ``S = phi_0(F)`` (1x1 conv C -> K with bias), scores ``s = GAP(S)``;
  this is the single-image classifier of ``L_basic``.
* Affinity. ``P = F_m^T W_P F_n`` (HW_m x HW_n); the code applies ``W_P`` (C x C, no bias)
  to image m's side: ``P_ij = (W_P f_m,i) . f_n,j``.
* Co-attention, both softmax directions:
  ``A_n = softmax_i(P)`` normalised over the positions i of image m (columns sum to 1), and
  ``A_m = softmax_j(P^T)`` over the positions j of image n. Co-attentive features
  ``F_n^{m∩n} = F_m A_n`` (C x HW_n, every position of n is a convex combination of m's
  features) and ``F_m^{m∩n} = F_n A_m`` (C x HW_m).
* Class-aware conv ``phi`` (1x1, C -> K, no bias) on the co-attentive features:
  ``S^{m∩n} = phi(F^{m∩n})``, ``s^{m∩n} = GAP(S^{m∩n})``.
* Gate ``B_m = sigmoid(W_B F_m^{m∩n})`` (W_B: 1x1 conv C -> 1, no bias) in [0,1]^{HW};
  contrastive co-attention ``A_m^{m\\n} = 1 - B_m`` and contrastive features
  ``F_m^{m\\n} = F_m * A_m^{m\\n}`` (the image's *own* features, broadcast over channels),
  through the *same* ``phi``: ``s_m^{m\\n} = GAP(phi(F_m^{m\\n}))``.
* Losses (all multi-label soft margin, weights 1):
  ``L_basic  = CE(s_m, l_m) + CE(s_n, l_n)``
  ``L_co-att = CE(s_m^{m∩n}, l_m ∩ l_n) + CE(s_n^{m∩n}, l_m ∩ l_n)``
  ``L_con    = CE(s_m^{m\\n}, l_m \\ l_n) + CE(s_n^{m\\n}, l_n \\ l_m)``.

Self-pairs (official): I_m is also paired with flip(I_m), a 0.75x and a 2x copy; for those
only ``L_basic`` of the copy and ``L_co-att`` of both sides with l_m are used (the
contrastive targets l_m \\ l_m are empty). No scaling of ``P`` (as in the code) by default;
``scale_affinity=True`` (config ``classifier.scale_affinity``, a deviation) uses
``P / sqrt(C)`` as in scaled dot-product attention: the unscaled P of a from-scratch network
has a spread of tens, so both softmaxes are near one-hot from the first steps.

Initialisation: new layers He-normal (fan-in), zero biases. Learning-rate groups (official):
backbone weights 1x, backbone biases 2x, new weights 10x, new biases 20x (the new-layer
factor is configurable, ``classifier.new_layer_lr_mult``; the demo's from-scratch tiny
backbone uses 1x).
"""

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from models.backbones import build_backbone


class CoAttentionClassifier(nn.Module):
    """Backbone + extra convs + plain CAM head + co-attention branch (see module docstring)."""

    def __init__(self, num_classes: int, backbone: str = "vgg16", pretrained: bool = False,
                 feature_channels: int = 512, extra_convs: int = 3,
                 backbone_options: Mapping | None = None, scale_affinity: bool = False):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.backbone_name = backbone
        self.scale_affinity = bool(scale_affinity)
        self.backbone = build_backbone(backbone, pretrained=pretrained, **dict(backbone_options or {}))
        layers: list[nn.Module] = []
        cin = self.backbone.out_channels
        for _ in range(extra_convs):
            layers += [nn.Conv2d(cin, feature_channels, 3, padding=1), nn.ReLU(inplace=True)]
            cin = feature_channels
        self.extra = nn.Sequential(*layers)
        self.feature_channels = cin
        self.cam_head = nn.Conv2d(cin, num_classes, 1, bias=True)          # phi_0 (L_basic)
        self.w_p = nn.Linear(cin, cin, bias=False)                         # W_P
        self.class_conv = nn.Conv2d(cin, num_classes, 1, bias=False)       # phi (co-att, contrastive)
        self.w_b = nn.Conv2d(cin, 1, 1, bias=False)                        # W_B (gate)
        for module in self.new_modules():
            for sub in module.modules():
                if isinstance(sub, (nn.Conv2d, nn.Linear)):
                    nn.init.kaiming_normal_(sub.weight, mode="fan_in", nonlinearity="relu")
                    if sub.bias is not None:
                        nn.init.zeros_(sub.bias)

    # ------------------------------------------------------------------ pieces
    def new_modules(self) -> list[nn.Module]:
        return [self.extra, self.cam_head, self.w_p, self.class_conv, self.w_b]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """F = extra(backbone(x)[-1]) : (N, C, h, w)."""
        return self.extra(self.backbone(x)[-1])

    def cam(self, feats: torch.Tensor) -> torch.Tensor:
        """Plain CAM logits S = phi_0(F) : (N, K, h, w)."""
        return self.cam_head(feats)

    def co_attention(self, f_m: torch.Tensor, f_n: torch.Tensor):
        """Co-attentive features of both images.

        Returns ``(F_m^{m∩n}, F_n^{m∩n}, A_m, A_n)`` with ``A_n = softmax_i(P)`` of shape
        (N, HW_m, HW_n) normalised over dim 1 (image m's positions) and ``A_m =
        softmax_j(P^T)`` of shape (N, HW_n, HW_m) normalised over dim 1 (image n's positions).
        """
        n, c, hm, wm = f_m.shape
        hn, wn = f_n.shape[-2:]
        fm = f_m.flatten(2)                                   # (N, C, HW_m)
        fn = f_n.flatten(2)                                   # (N, C, HW_n)
        p = torch.bmm(self.w_p(fm.transpose(1, 2)), fn)       # (N, HW_m, HW_n): (W_P f_m,i) . f_n,j
        if self.scale_affinity:
            p = p / c ** 0.5                                  # deviation: P / sqrt(C)
        a_n = torch.softmax(p, dim=1)                         # over image m's positions
        a_m = torch.softmax(p.transpose(1, 2), dim=1)         # over image n's positions
        co_n = torch.bmm(fm, a_n).view(n, c, hn, wn)          # F_n^{m∩n} = F_m A_n
        co_m = torch.bmm(fn, a_m).view(n, c, hm, wm)          # F_m^{m∩n} = F_n A_m
        return co_m, co_n, a_m, a_n

    def class_maps(self, feats: torch.Tensor) -> torch.Tensor:
        """Class-aware maps phi(F) : (N, K, h, w) (co-attentive or contrastive features)."""
        return self.class_conv(feats)

    def gate(self, co_feats: torch.Tensor) -> torch.Tensor:
        """B = sigmoid(W_B F^{m∩n}) : (N, 1, h, w)."""
        return torch.sigmoid(self.w_b(co_feats))

    def pair(self, f_m: torch.Tensor, f_n: torch.Tensor, contrastive: bool = True) -> dict:
        """Every map and score of the co-attention branch for feature pairs (f_m[i], f_n[i])."""
        co_m, co_n, a_m, a_n = self.co_attention(f_m, f_n)
        out = {"attn_m": a_m, "attn_n": a_n}
        out["co_m"], out["co_n"] = self.class_maps(co_m), self.class_maps(co_n)
        out["s_co_m"], out["s_co_n"] = out["co_m"].mean((2, 3)), out["co_n"].mean((2, 3))
        if contrastive:
            out["gate_m"], out["gate_n"] = self.gate(co_m), self.gate(co_n)
            out["con_m"] = self.class_maps(f_m * (1.0 - out["gate_m"]))
            out["con_n"] = self.class_maps(f_n * (1.0 - out["gate_n"]))
            out["s_con_m"], out["s_con_n"] = out["con_m"].mean((2, 3)), out["con_n"].mean((2, 3))
        return out

    def forward(self, x_m: torch.Tensor, x_n: torch.Tensor, contrastive: bool = True) -> dict:
        """Pair forward from images: plain CAMs and scores of both images plus :meth:`pair`.
        Same-size inputs share one backbone pass."""
        if x_m.shape[-2:] == x_n.shape[-2:]:
            f_m, f_n = self.features(torch.cat([x_m, x_n])).chunk(2)
        else:
            f_m, f_n = self.features(x_m), self.features(x_n)
        out = self.pair(f_m, f_n, contrastive)
        out["feat_m"], out["feat_n"] = f_m, f_n
        out["cam_m"], out["cam_n"] = self.cam(f_m), self.cam(f_n)
        out["s_m"], out["s_n"] = out["cam_m"].mean((2, 3)), out["cam_n"].mean((2, 3))
        return out

    # ------------------------------------------------------------------ optimisation
    def param_groups(self, lr: float, weight_decay: float, new_mult: float = 10.0) -> list[dict]:
        """Official multipliers: backbone w 1x / b 2x, new layers w ``new_mult`` (official 10x)
        / b ``2 new_mult`` (20x). A from-scratch backbone (demo) has no pretrained part to
        protect, so the demo preset uses ``new_mult = 1`` (then biases 2x everywhere)."""
        if new_mult <= 0:
            raise ValueError(f"new_mult must be > 0, got {new_mult}")
        new_ids = {id(p) for m in self.new_modules() for p in m.parameters()}
        groups: dict[str, list] = {"bb_w": [], "bb_b": [], "new_w": [], "new_b": []}
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            kind = "new" if id(param) in new_ids else "bb"
            groups[f"{kind}_{'b' if name.endswith('bias') else 'w'}"].append(param)
        mult = {"bb_w": 1.0, "bb_b": 2.0, "new_w": new_mult, "new_b": 2.0 * new_mult}
        return [{"params": params, "lr": lr * mult[key], "weight_decay": weight_decay, "name": key}
                for key, params in groups.items() if params]


# --------------------------------------------------------------------------- losses
def pair_targets(l_m: torch.Tensor, l_n: torch.Tensor):
    """Targets of the co-attention and contrastive terms:
    ``l_m ∩ l_n``, ``l_m \\ l_n``, ``l_n \\ l_m`` (multi-hot, same shape as the labels)."""
    shared = l_m * l_n
    return shared, l_m * (1 - l_n), l_n * (1 - l_m)


def _ce(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.multilabel_soft_margin_loss(scores.float(), target.float())


def mcis_losses(out: Mapping[str, torch.Tensor], l_m: torch.Tensor, l_n: torch.Tensor,
                contrastive: bool = True) -> dict[str, torch.Tensor]:
    """``L_basic``, ``L_co-att`` and (when ``contrastive`` and the pair output has them)
    ``L_con-co-att`` for a batch of pairs (each term averaged over the batch)."""
    shared, only_m, only_n = pair_targets(l_m, l_n)
    losses = {"basic": _ce(out["s_m"], l_m) + _ce(out["s_n"], l_n),
              "co_att": _ce(out["s_co_m"], shared) + _ce(out["s_co_n"], shared)}
    if contrastive and "s_con_m" in out:
        losses["con_co_att"] = _ce(out["s_con_m"], only_m) + _ce(out["s_con_n"], only_n)
    return losses


def self_pair_losses(out: Mapping[str, torch.Tensor], labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Self-pair (image, transformed copy): ``L_basic`` of the copy and ``L_co-att`` of both
    sides, all with the image's own labels (official training script)."""
    return {"basic": _ce(out["s_n"], labels),
            "co_att": _ce(out["s_co_m"], labels) + _ce(out["s_co_n"], labels)}
