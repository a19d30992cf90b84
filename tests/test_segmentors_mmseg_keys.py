"""mmseg checkpoints in their exact key sets load strictly, and SETR's ViT computes what mmseg's does.

The name/shape lists in ``tests/data/mmseg_keys/*.txt`` are derived by hand from mmseg 1.2.2's
module structure (``tests/data/mmseg_keys/derive.py``), never from our models: a state dict
with exactly those keys (no fabricated ones) must go through our converters and load with
``strict=True``. The ViT-L and HRNet-W48 models are built on the ``meta`` device (shapes
only, no memory); HRNet-W18 and tiny SETRs load real random tensors.
"""

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from models.segmentors import build_segmentor
from models.segmentors.mmseg_convert import convert_mmseg_state_dict
from models.segmentors.setr import convert_mmseg_setr

pytestmark = pytest.mark.usefixtures("one_thread")

KEYS_DIR = Path(__file__).resolve().parent / "data" / "mmseg_keys"
_spec = importlib.util.spec_from_file_location("derive_mmseg_keys", KEYS_DIR / "derive.py")
derive = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(derive)

#: key file -> (our segmentor, number of classes, build options)
OURS = {
    "fcn_hr18": ("fcn_hrnet", 21, {"backbone": "hrnet_w18"}),
    "ocrnet_hr18": ("ocrnet_hrnet", 21, {"backbone": "hrnet_w18"}),
    "setr_naive": ("setr_naive", 150, {"backbone": "vit_large", "img_size": 512}),
    "setr_pup": ("setr_pup", 150, {"backbone": "vit_large", "img_size": 512}),
    "setr_mla": ("setr_mla", 150, {"backbone": "vit_large", "img_size": 512}),
}


def test_key_files_are_what_the_derivation_writes():
    written = {p.stem for p in KEYS_DIR.glob("*.txt")}
    assert written == set(derive.models()) == set(OURS)
    for name, (keys, config) in derive.models().items():
        assert (KEYS_DIR / f"{name}.txt").read_text() == derive.render(keys, config), name


def _state(keys: dict, device: str, seed: int = 0) -> dict:
    """Tensors of the listed shapes: empty on ``meta``, else random (weights of two or more
    dims scaled by 1/sqrt(fan-in), so that a 8-layer ViT's activations stay O(1))."""
    if device == "meta":
        return {k: torch.empty(shape, device="meta") for k, shape in keys.items()}
    gen = torch.Generator().manual_seed(seed)

    def tensor(name, shape):
        if name.endswith("num_batches_tracked"):
            return torch.randint(0, 100, shape, generator=gen)
        if name.endswith("running_var"):
            return torch.rand(shape, generator=gen) + 0.5
        t = torch.randn(shape, generator=gen)
        return t / torch.Size(shape[1:]).numel() ** 0.5 if len(shape) >= 2 else t
    return {k: tensor(k, shape) for k, shape in keys.items()}


def _convert(name: str, state: dict, model) -> dict:
    if name.startswith("setr"):
        state = convert_mmseg_setr({"state_dict": state, "meta": {"mmseg_version": "1.2.2"}})
    return convert_mmseg_state_dict(state, model, source=name)


@pytest.mark.parametrize("name", sorted(OURS))
def test_mmseg_key_set_loads_strictly(name):
    arch, classes, options = OURS[name]
    keys = derive.read(KEYS_DIR / f"{name}.txt")
    device = "meta" if name.startswith("setr") else "cpu"
    with torch.device(device):
        model = build_segmentor(arch, classes, **options)
    state = _state(keys, device)
    converted = _convert(name, state, model)
    assert set(converted) == set(model.state_dict())     # nothing missing, nothing fabricated
    model.load_state_dict(converted, strict=True)
    # equal parameter counts: mmseg's (the list's non-buffer entries) and ours
    n_mmseg = sum(torch.Size(s).numel() for k, s in keys.items() if not derive.is_buffer(k))
    assert sum(p.numel() for p in model.parameters()) == n_mmseg
    if device == "cpu":   # HRNet: mmseg's names are ours, values arrive unchanged
        own = model.state_dict()
        assert all(torch.equal(own[k], v) for k, v in state.items())


@pytest.mark.parametrize("arch,derived", [("fcn_hrnet", "fcn_hrnet"), ("ocrnet_hrnet", "ocrnet_hrnet")])
def test_mmseg_hrnet_w48_key_set_loads_strictly(arch, derived):
    keys = getattr(derive, derived)(48, 21).items
    with torch.device("meta"):
        model = build_segmentor(arch, 21, backbone="hrnet_w48")
    converted = convert_mmseg_state_dict(_state(keys, "meta"), model)
    assert set(converted) == set(model.state_dict())
    model.load_state_dict(converted, strict=True)


def test_missing_patch_bias_is_not_needed_and_an_extra_one_is_rejected():
    """The failure of issue 19: a real SETR checkpoint has no ``patch_embed.projection.bias``."""
    keys = derive.setr("naive", 3, img_size=64, depth=8, dim=64, mlp_ratio=2, channels=16).items
    assert "backbone.patch_embed.projection.bias" not in keys
    model = build_segmentor("setr_naive", 3, backbone="tiny", img_size=64, channels=16)
    state = _state(keys, "cpu")
    model.load_state_dict(_convert("setr_naive", state, model), strict=True)
    with pytest.raises(Exception, match="unexpected: backbone.conv_proj.bias"):
        _convert("setr_naive", dict(state, **{"backbone.patch_embed.projection.bias": torch.zeros(64)}), model)


# --------------------------------------------------------------------------- SETR's ViT vs mmseg's
def mmseg_vit_forward(sd: dict, x: torch.Tensor, heads: int, out_indices, with_cls_token: bool):
    """mmseg 1.2.2 ``VisionTransformer.forward`` (SETR configs: patch_bias=False, no pre/final
    norm, LN eps 1e-6, eval mode) written out on mmseg's parameter names."""
    t = F.conv2d(x, sd["patch_embed.projection.weight"], stride=16)
    n, d, gh, gw = t.shape
    t = torch.cat([sd["cls_token"].expand(n, -1, -1), t.flatten(2).transpose(1, 2)], 1) + sd["pos_embed"]
    if not with_cls_token:
        t = t[:, 1:]
    outs, depth = [], 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("layers."))
    for i in range(depth):
        p = f"layers.{i}."
        h = F.layer_norm(t, (d,), sd[p + "ln1.weight"], sd[p + "ln1.bias"], 1e-6)
        q, k, v = F.linear(h, sd[p + "attn.attn.in_proj_weight"], sd[p + "attn.attn.in_proj_bias"]).chunk(3, -1)
        q, k, v = (z.reshape(n, -1, heads, d // heads).transpose(1, 2) for z in (q, k, v))
        a = torch.softmax(q @ k.transpose(-1, -2) / (d // heads) ** 0.5, -1) @ v
        a = a.transpose(1, 2).reshape(n, -1, d)
        t = t + F.linear(a, sd[p + "attn.attn.out_proj.weight"], sd[p + "attn.attn.out_proj.bias"])
        h = F.layer_norm(t, (d,), sd[p + "ln2.weight"], sd[p + "ln2.bias"], 1e-6)
        h = F.gelu(F.linear(h, sd[p + "ffn.layers.0.0.weight"], sd[p + "ffn.layers.0.0.bias"]))
        t = t + F.linear(h, sd[p + "ffn.layers.1.weight"], sd[p + "ffn.layers.1.bias"])
        if i in out_indices:
            out = t[:, 1:] if with_cls_token else t
            outs.append(out.transpose(1, 2).reshape(n, d, gh, gw))
    return outs


@pytest.mark.parametrize("variant,with_cls", [("mla", False), ("naive", True), ("pup", True)])
def test_setr_encoder_computes_mmseg_vit(variant, with_cls):
    """A tiny SETR (8 layers, D 64, 4 heads) loaded from mmseg-named random tensors: the
    encoder's feature maps equal mmseg's ViT forward on the same tensors (MLA: class token
    dropped before the layers; Naive/PUP: kept)."""
    keys = derive.setr(variant, 3, img_size=64, depth=8, dim=64, mlp_ratio=2, channels=16,
                       mla_channels=8).items
    model = build_segmentor(f"setr_{variant}", 3, backbone="tiny", img_size=64, channels=16,
                            **({"mla_channels": 8} if variant == "mla" else {})).eval()
    state = _state(keys, "cpu", seed=1)
    model.load_state_dict(_convert(f"setr_{variant}", state, model), strict=True)
    backbone = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours = model.backbone(x)
        ref = mmseg_vit_forward(backbone, x, 4, model.backbone.out_indices, with_cls)
        ref_other = mmseg_vit_forward(backbone, x, 4, model.backbone.out_indices, not with_cls)
    assert len(ours) == len(ref) == 4
    for a, b, c in zip(ours, ref, ref_other):
        assert torch.allclose(a, b, atol=1e-4), float((a - b).abs().max())
        assert not torch.allclose(a, c, atol=1e-2)   # control: the other choice differs
