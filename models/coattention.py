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
* Losses (all multi-label soft margin MLSM, weights 1; MLSM(s, l) averages
  ``-[l log sigmoid(s) + (1 - l) log sigmoid(-s)]`` over classes and rows):
  ``L_basic  = MLSM([s_m; s_n], [l_m; l_n])``
  ``L_co-att = MLSM([s_m^{m∩n}; s_n^{m∩n}], [l_m ∩ l_n; l_m ∩ l_n])``
  ``L_con    = MLSM(s_m^{m\\n}, l_m \\ l_n) + MLSM(s_n^{m\\n}, l_n \\ l_m)``.

Loss averaging (official ``train.py``): each multilabel soft margin loss runs once over the
concatenated rows, so ``L_basic = MLSM([s_m; s_n], [l_m; l_n])`` and ``L_co-att =
MLSM([s_m^{m∩n}; s_n^{m∩n}], [l_m ∩ l_n; l_m ∩ l_n])`` are means over 2B rows, while the two
contrastive terms are separate B-row means, each added only when *its own* side has some
label the partner lacks (``(l_m \\ l_n).any()`` over the batch, and likewise for n).

Self-pairs (official): I_m is also paired with flip(I_m), a 0.75x and a 2x copy (made from the
original image, without colour jitter); for each, ``L_basic = MLSM([s_I; s_copy], [l_m; l_m])``
and ``L_co-att = MLSM([s_I^{co}; s_copy^{co}], [l_m; l_m])`` (the contrastive targets
l_m \\ l_m are empty and unused). No scaling of ``P`` (as in the code) by default;
``scale_affinity=True`` (config ``classifier.scale_affinity``, a deviation) uses
``P / sqrt(C)`` as in scaled dot-product attention. ``P`` and both softmaxes are computed in
float32 under autocast (the official code has no AMP).

Initialisation (``init="official"``, the official ``VGG_coattention._initialize_weights``):
the extra convs and the CAM head ``phi_0`` are normal with std ``sqrt(2 / (k*k*C_out))`` (He,
fan-out: 0.32 for the 512 -> 20 CAM head), zero biases; ``W_P``, ``phi`` and ``W_B`` keep
PyTorch's default init (uniform, std ``1 / sqrt(3 C_in)``, 0.026 for C = 512), as the official
``CoattentionModel`` creates them after the VGG init. ``init="kaiming_fan_in"`` (a deviation,
config ``classifier.init``) draws every new layer He-normal with fan-in. Learning-rate groups
(official): backbone weights 1x, backbone biases 2x, new weights 10x, new biases 20x (the
new-layer factor is configurable, ``classifier.new_layer_lr_mult``; the demo's from-scratch
tiny backbone uses 1x).
"""

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.backbones import build_backbone


INIT_SCHEMES = ("official", "kaiming_fan_in")


class CoAttentionClassifier(nn.Module):
    """Backbone + extra convs + plain CAM head + co-attention branch (see module docstring)."""

    def __init__(self, num_classes: int, backbone: str = "vgg16", pretrained: bool = False,
                 feature_channels: int = 512, extra_convs: int = 3,
                 backbone_options: Mapping | None = None, scale_affinity: bool = False,
                 init: str = "official"):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if init not in INIT_SCHEMES:
            raise ValueError(f"init must be one of {', '.join(INIT_SCHEMES)}, got {init!r}")
        self.num_classes = num_classes
        self.backbone_name = backbone
        self.scale_affinity = bool(scale_affinity)
        self.init = init
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
        self.reset_new_layers()

    def reset_new_layers(self) -> None:
        """Initialise the new layers by ``self.init`` (module docstring): official = He
        fan-out normal for the extra convs and the CAM head, PyTorch's default for W_P, phi
        and W_B; kaiming_fan_in = He fan-in normal everywhere. Biases zero (He schemes)."""
        he_layers = [self.extra, self.cam_head]
        if self.init == "kaiming_fan_in":
            he_layers += [self.w_p, self.class_conv, self.w_b]
        else:
            for layer in (self.w_p, self.class_conv, self.w_b):
                layer.reset_parameters()
        mode = "fan_out" if self.init == "official" else "fan_in"
        for module in he_layers:
            for sub in module.modules():
                if isinstance(sub, (nn.Conv2d, nn.Linear)):
                    nn.init.kaiming_normal_(sub.weight, mode=mode, nonlinearity="relu")
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
        with torch.autocast(f_m.device.type, enabled=False):  # P unscaled: fp16 would overflow
            fm32, fn32 = fm.float(), fn.float()
            p = torch.bmm(F.linear(fm32.transpose(1, 2), self.w_p.weight.float()), fn32)
            if self.scale_affinity:
                p = p / c ** 0.5                              # deviation: P / sqrt(C)
            a_n = torch.softmax(p, dim=1)                     # over image m's positions
            a_m = torch.softmax(p.transpose(1, 2), dim=1)     # over image n's positions
        co_n = torch.bmm(fm, a_n.to(fm.dtype)).view(n, c, hn, wn)   # F_n^{m∩n} = F_m A_n
        co_m = torch.bmm(fn, a_m.to(fn.dtype)).view(n, c, hm, wm)   # F_m^{m∩n} = F_n A_m
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


def _ce_rows(scores: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> torch.Tensor:
    """One MLSM over the concatenated rows (the official code's ``cat`` before the loss)."""
    return _ce(torch.cat(list(scores)), torch.cat(list(targets)))


def mcis_losses(out: Mapping[str, torch.Tensor], l_m: torch.Tensor, l_n: torch.Tensor,
                contrastive: bool = True) -> dict[str, torch.Tensor]:
    """``L_basic``, ``L_co-att`` (each one MLSM over the 2B rows of both images) and, when
    ``contrastive`` and the pair output has them, the two contrastive terms ``con_m`` =
    MLSM(s_m^{m\\n}, l_m \\ l_n) and ``con_n`` (B-row means, weighted by the caller)."""
    shared, only_m, only_n = pair_targets(l_m, l_n)
    losses = {"basic": _ce_rows([out["s_m"], out["s_n"]], [l_m, l_n]),
              "co_att": _ce_rows([out["s_co_m"], out["s_co_n"]], [shared, shared])}
    if contrastive and "s_con_m" in out:
        losses["con_m"] = _ce(out["s_con_m"], only_m)
        losses["con_n"] = _ce(out["s_con_n"], only_n)
    return losses


def contrastive_switches(l_m: torch.Tensor, l_n: torch.Tensor) -> tuple[bool, bool]:
    """Official per-side rule: side m's contrastive term counts when some pair of the batch
    has a label of m that n lacks (``(l_m \\ l_n).any()``), side n's likewise."""
    _, only_m, only_n = pair_targets(l_m, l_n)
    return bool((only_m > 0).any()), bool((only_n > 0).any())


def self_pair_losses(out: Mapping[str, torch.Tensor], labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Self-pair (image, transformed copy), official: ``L_basic`` over the 2B rows of the
    image and its copy, ``L_co-att`` over both co-attentive sides, all with the image's labels."""
    return {"basic": _ce_rows([out["s_m"], out["s_n"]], [labels, labels]),
            "co_att": _ce_rows([out["s_co_m"], out["s_co_n"]], [labels, labels])}
