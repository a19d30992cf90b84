"""ViT encoder for SETR (Zheng et al., "Rethinking Semantic Segmentation from a
Sequence-to-Sequence Perspective with Transformers", CVPR 2021).

The transformer itself is torchvision's :class:`~torchvision.models.VisionTransformer`
(``class_token``, ``encoder.pos_embedding`` and the ``encoder.layers`` blocks, pre-LN,
LayerNorm eps 1e-6, qkv bias) with mmseg's patch embedding ``conv_proj``: a 16x16 stride-16
conv *without bias* (mmseg's ``patch_bias=False``; torchvision's has one). This module drives
the blocks layer by layer to return the outputs of chosen layers as feature maps:

    z_0 = [x_cls; E·patches(x)] + P,        z_l = Block_l(z_{l-1})  (l = 1..L)
    F_l = reshape(z_l[1:], (D, H/16, W/16))   for l in ``out_indices`` (0-based: l-1)

With ``with_cls_token=False`` (mmseg's SETR-MLA configuration) the class token is dropped
after the position embedding is added, before the first layer: ``z_0 = E·patches(x) + P[1:]``
and ``F_l = reshape(z_l, ...)``; the sequence then holds only the ``H/16 · W/16`` patches.
``class_token`` (and ``P[0]``) stay in the state dict, as in mmseg's checkpoints, but take
no part in the output; the unused ``class_token`` is frozen (``requires_grad=False``) so that
DDP needs no ``find_unused_parameters``.

* Position embeddings: ``P`` is stored for the crop size (``img_size``, 512 by default, as
  mmseg's SETR) and bilinearly interpolated (``align_corners=False``) whenever the input
  grid differs (other crop sizes, whole-image inference); pretrained 224-px embeddings are
  interpolated the same way when loaded. The class-token embedding is kept as is.
* Inputs whose sides are not multiples of 16 are zero-padded at the bottom/right first
  (mmseg's "corner" padding).
* As in mmseg's SETR backbone there is no final LayerNorm (``final_norm=False``): the
  decoders apply their own LayerNorm; torchvision's ``encoder.ln`` is replaced by an
  identity and its weights are ignored when loading.
* Weights: torchvision's ViT-B/16 / ViT-L/16 ImageNet weights (``IMAGENET1K_V1`` by
  default, ``IMAGENET1K_SWAG_E2E_V1`` selectable) when they can be downloaded or are in
  the torch hub cache, otherwise a clear error. The paper used ImageNet-21k weights
  (``jx_vit_large_p16_384``), which torchvision does not ship; :func:`convert_mmseg_vit`
  maps an mmseg/timm-style SETR checkpoint onto this module's names.
* Pretrained patch biases: ImageNet checkpoints (torchvision's, timm's) have a patch bias
  ``b``. It is folded into the patch entries of the position embedding,
  ``P[1:] <- P[1:] + b``, which is exact (``E·p + b + P_i = E·p + (P_i + b)``, and bilinear
  resizing keeps a constant offset) and keeps the pretrained network's function. mmseg
  instead drops the bias (its ``init_weights`` loads with ``strict=False``): the one
  place where our ImageNet initialisation differs from mmseg's.

Architectures: ``vit_large`` (ViT-L/16: 24 layers, D 1024, 16 heads, MLP 4096 — the
paper's "T-Large"), ``vit_base`` (ViT-B/16: 12 layers, D 768, 12 heads, MLP 3072) and
``vit_tiny`` (8 layers, D 64, 4 heads, MLP 128; random init, for tests and the demo).
"""

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import vision_transformer as tv_vit


@dataclass(frozen=True)
class ViTArch:
    num_layers: int
    hidden_dim: int
    num_heads: int
    mlp_dim: int
    weights_enum: str | None  # torchvision weights enum name, None: no pretrained weights
    patch_size: int = 16


VIT_ARCHS: dict[str, ViTArch] = {
    "vit_large": ViTArch(24, 1024, 16, 4096, "ViT_L_16_Weights"),
    "vit_base": ViTArch(12, 768, 12, 3072, "ViT_B_16_Weights"),
    "vit_tiny": ViTArch(8, 64, 4, 128, None),
}
#: accepted aliases (``tiny`` is the project-wide name of the small test backbone)
VIT_ALIASES = {"tiny": "vit_tiny", "vit_l16": "vit_large", "vit_b16": "vit_base"}


def resolve_vit_name(name: str) -> str:
    name = VIT_ALIASES.get(name, name)
    if name not in VIT_ARCHS:
        raise ValueError(f"unknown ViT backbone {name!r}; SETR needs one of "
                         f"{', '.join(sorted(VIT_ARCHS))} (or 'tiny')")
    return name


def layer_fractions_to_indices(num_layers: int, fractions) -> tuple[int, ...]:
    """0-based indices of the layers at ``fractions`` of the depth (1.0 = last layer).

    For ViT-L (24 layers) ``(10/24, 15/24, 20/24, 1)`` gives (9, 14, 19, 23) and
    ``(1/4, 2/4, 3/4, 1)`` gives (5, 11, 17, 23), i.e. layers 6/12/18/24."""
    return tuple(max(0, round(num_layers * f) - 1) for f in fractions)


def interpolate_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Resize ``(1, 1 + g*g', D)`` embeddings (class token first) to ``grid`` bilinearly."""
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    n = patch_pos.shape[1]
    old = int(round(n ** 0.5))
    if old * old != n:
        raise ValueError(f"position embedding has {n} patch entries, not a square grid")
    if (old, old) == tuple(grid):
        return pos_embed
    d = patch_pos.shape[-1]
    patch_pos = patch_pos.reshape(1, old, old, d).permute(0, 3, 1, 2)
    patch_pos = F.interpolate(patch_pos, size=tuple(grid), mode="bilinear", align_corners=False)
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], d)
    return torch.cat([cls_pos, patch_pos], dim=1)


def _torchvision_state_dict(arch: ViTArch, name: str, weights: str) -> dict:
    if arch.weights_enum is None:
        raise ValueError(f"no pretrained weights exist for {name!r}; use pretrained=False")
    enum = getattr(tv_vit, arch.weights_enum)
    try:
        entry = enum[weights]
    except KeyError:
        raise ValueError(f"unknown weights {weights!r} for {name}; choose from "
                         f"{', '.join(w.name for w in enum)}") from None
    try:
        return entry.get_state_dict(progress=False)
    except Exception as exc:  # no network and not in the torch hub cache
        raise RuntimeError(
            f"could not load torchvision's {arch.weights_enum}.{weights} for {name} "
            f"({type(exc).__name__}: {exc}). Download {entry.url} into "
            f"{torch.hub.get_dir()}/checkpoints, or build with pretrained=False") from exc


class ViTEncoder(nn.Module):
    """torchvision ViT returning the feature maps of layers ``out_indices`` (0-based)."""

    def __init__(self, name: str = "vit_large", img_size: int = 512, out_indices=(23,),
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0, pretrained: bool = False,
                 weights: str = "IMAGENET1K_V1", with_cls_token: bool = True):
        super().__init__()
        name = resolve_vit_name(name)
        arch = VIT_ARCHS[name]
        self.name, self.arch = name, arch
        self.patch_size = arch.patch_size
        self.embed_dim = arch.hidden_dim
        self.num_layers = arch.num_layers
        out_indices = tuple(int(i) for i in out_indices)
        bad = [i for i in out_indices if not 0 <= i < arch.num_layers]
        if bad or not out_indices:
            raise ValueError(f"out_indices {out_indices} must be non-empty layer indices in "
                             f"[0, {arch.num_layers - 1}] for {name}")
        self.out_indices = out_indices
        if img_size % arch.patch_size:
            raise ValueError(f"img_size {img_size} must be a multiple of the patch size {arch.patch_size}")
        # fetch the weights first: a missing file fails before the (large) model is built
        state = _torchvision_state_dict(arch, name, weights) if pretrained else None
        vit = tv_vit.VisionTransformer(
            image_size=img_size, patch_size=arch.patch_size, num_layers=arch.num_layers,
            num_heads=arch.num_heads, hidden_dim=arch.hidden_dim, mlp_dim=arch.mlp_dim,
            dropout=drop_rate, attention_dropout=attn_drop_rate)
        # mmseg's patch embedding has no bias (patch_bias=False): torchvision's initialised
        # weight in a bias-free conv
        self.conv_proj = nn.Conv2d(3, arch.hidden_dim, arch.patch_size, arch.patch_size, bias=False)
        self.conv_proj.weight = vit.conv_proj.weight
        self.with_cls_token = bool(with_cls_token)
        self.class_token = vit.class_token
        self.class_token.requires_grad_(self.with_cls_token)
        self.encoder = vit.encoder
        self.encoder.ln = nn.Identity()  # SETR: no final norm, the decoders normalise
        if state is not None:
            self.load_vit_state_dict(state)

    @property
    def channels(self) -> list[int]:
        return [self.embed_dim] * len(self.out_indices)

    def load_torchvision_weights(self, weights: str = "IMAGENET1K_V1") -> None:
        state = _torchvision_state_dict(self.arch, self.name, weights)
        self.load_vit_state_dict(state)

    def load_vit_state_dict(self, state: dict) -> None:
        """Load a torchvision-named ViT state dict, resizing the position embedding, folding a
        patch bias ``conv_proj.bias`` into it and dropping the classifier and final norm."""
        state = {k: v for k, v in state.items()
                 if not k.startswith(("heads.", "encoder.ln."))}
        key = "encoder.pos_embedding"
        if key in state:
            grid = int(round((self.encoder.pos_embedding.shape[1] - 1) ** 0.5))
            state[key] = interpolate_pos_embed(state[key], (grid, grid))
        bias = state.pop("conv_proj.bias", None)
        if bias is not None:
            if key not in state:
                raise RuntimeError(f"ViT weights for {self.name} have a patch bias but no position "
                                   "embedding to fold it into")
            pos = state[key].clone()
            pos[:, 1:] += bias.to(pos.dtype)
            state[key] = pos
        missing, unexpected = self.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise RuntimeError(f"ViT weights do not fit {self.name}: missing {missing[:5]}, "
                               f"unexpected {unexpected[:5]}")

    def load_mmseg_state_dict(self, state: dict) -> None:
        """Load an mmseg/timm-converted ViT checkpoint (e.g. mmseg's
        ``vit-large-p16_in21k-pre-3rdparty_ft-64xb64_in1k-384``, SETR's ImageNet-21k
        initialisation), renamed by :func:`convert_mmseg_vit`, position embedding resized."""
        if "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        state = {k[len("backbone."):] if k.startswith("backbone.") else k: v for k, v in state.items()}
        self.load_vit_state_dict(convert_mmseg_vit(state))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        n, _, h, w = x.shape
        p = self.patch_size
        pad_h, pad_w = (-h) % p, (-w) % p
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        x = self.conv_proj(x)
        gh, gw = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        pos = interpolate_pos_embed(self.encoder.pos_embedding, (gh, gw))
        if self.with_cls_token:
            x = torch.cat([self.class_token.expand(n, -1, -1), x], dim=1) + pos
        else:  # mmseg's with_cls_token=False: the class token is removed before the layers
            x = x + pos[:, 1:]
        x = self.encoder.dropout(x)
        skip = 1 if self.with_cls_token else 0
        feats = {}
        last = max(self.out_indices)
        for i, layer in enumerate(self.encoder.layers):
            if i > last:
                break  # later layers do not contribute to any output
            x = layer(x)
            if i in self.out_indices:
                feats[i] = x[:, skip:].transpose(1, 2).reshape(n, self.embed_dim, gh, gw)
        return [feats[i] for i in self.out_indices]


# mmseg ``VisionTransformer`` name -> this module's name (regex, replacement)
_MMSEG_TO_OURS = [
    (r"^patch_embed\.projection\.", "conv_proj."),
    (r"^cls_token$", "class_token"),
    (r"^pos_embed$", "encoder.pos_embedding"),
    (r"^layers\.(\d+)\.ln1\.", r"encoder.layers.encoder_layer_\1.ln_1."),
    (r"^layers\.(\d+)\.ln2\.", r"encoder.layers.encoder_layer_\1.ln_2."),
    (r"^layers\.(\d+)\.attn\.attn\.", r"encoder.layers.encoder_layer_\1.self_attention."),
    (r"^layers\.(\d+)\.ffn\.layers\.0\.0\.", r"encoder.layers.encoder_layer_\1.mlp.0."),
    (r"^layers\.(\d+)\.ffn\.layers\.1\.", r"encoder.layers.encoder_layer_\1.mlp.3."),
]


def convert_mmseg_vit(state: dict) -> dict:
    """Rename an mmseg SETR backbone state dict (``patch_embed.projection``, ``layers.i.attn.attn``,
    ``layers.i.ffn.layers.0.0`` ...) to :class:`ViTEncoder` names; ``ln1``/``norm`` final
    norms are dropped. Raises on keys it does not know."""
    out = {}
    for key, value in state.items():
        if key.startswith(("norm1.", "norm.", "ln1.")):
            continue  # final norm, absent in SETR's encoder
        for pattern, repl in _MMSEG_TO_OURS:
            new, count = re.subn(pattern, repl, key)
            if count:
                out[new] = value
                break
        else:
            raise KeyError(f"unknown mmseg ViT parameter {key!r}")
    return out
