"""Segmentor zoo, part 2: SETR (Naive/PUP/MLA), CCNet, ANN, DNLNet, ISANet, ISNet, HRNet (+FCN, +OCR).

Forward/backward and shapes on tiny variants, the attention mechanisms and HRNet's bilinear
fusion on hand-built cases, SETR's class token (MLA: none, as mmseg) and PUP's auxiliary heads,
parameter counts against models.md's table (counted on the ``meta`` device: no memory, no
weights), and the exact layers SETR-MLA reads on a real ViT-L.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.segmentors import available, build_segmentor
from models.segmentors.ann import PPMConcat
from models.segmentors.ccnet import CrissCrossAttention
from models.segmentors.dnlnet import DisentangledNonLocal2d
from models.segmentors.hrnet import HRModule, HRNet, build_hrnet
from models.segmentors.isanet import ISAHead
from models.segmentors.isnet import class_representations
from models.segmentors.setr import convert_mmseg_setr
from models.segmentors.vit import ViTEncoder, convert_mmseg_vit, interpolate_pos_embed

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = ("setr_naive", "setr_pup", "setr_mla", "ccnet", "ann", "dnlnet", "isanet", "isnet",
         "fcn_hrnet", "ocrnet_hrnet")

TINY = {
    "setr_naive": dict(backbone="tiny", img_size=64, channels=16),
    "setr_pup": dict(backbone="tiny", img_size=64, channels=16),
    "setr_mla": dict(backbone="tiny", img_size=64, channels=16, mla_channels=8),
    "ccnet": dict(backbone="tiny", backbone_options={"width": 8}, channels=16, aux_channels=8),
    "ann": dict(backbone="tiny", backbone_options={"width": 8}, channels=16, project_channels=8,
                aux_channels=8),
    "dnlnet": dict(backbone="tiny", backbone_options={"width": 8}, channels=16, aux_channels=8),
    "isanet": dict(backbone="tiny", backbone_options={"width": 8}, channels=16, isa_channels=8,
                   down_factor=(4, 4), aux_channels=8),
    "isnet": dict(backbone="tiny", backbone_options={"width": 8}, channels=16, transform_channels=8,
                  aux_channels=8),
    "fcn_hrnet": dict(backbone="tiny"),
    "ocrnet_hrnet": dict(backbone="tiny", channels=16, ocr_channels=8),
}

# expected training outputs -> (stride of the logits w.r.t. the input, loss weight)
OUTPUTS = {
    "setr_naive": {"out": (4, 1.0), "aux_0": (1, 0.4), "aux_1": (1, 0.4), "aux_2": (1, 0.4)},
    "setr_pup": {"out": (1, 1.0), "aux_0": (1, 0.4), "aux_1": (1, 0.4), "aux_2": (1, 0.4)},
    "setr_mla": {"out": (4, 1.0), **{f"aux_{i}": (16, 0.4) for i in range(4)}},
    "ccnet": {"out": (8, 1.0), "aux": (8, 0.4)},
    "ann": {"out": (8, 1.0), "aux": (8, 0.4)},
    "dnlnet": {"out": (8, 1.0), "aux": (8, 0.4)},
    "isanet": {"out": (8, 1.0), "aux": (8, 0.4)},
    "isnet": {"out": (8, 1.0), "stage1": (8, 0.4), "aux": (8, 0.4)},
    "fcn_hrnet": {"out": (4, 1.0)},
    "ocrnet_hrnet": {"out": (4, 1.0), "aux": (4, 0.4)},
}



def ce(logits, target):
    return F.cross_entropy(logits, target, ignore_index=255)


def test_registered():
    assert set(NAMES) <= set(available())


@pytest.mark.parametrize("name", NAMES)
def test_forward_backward_shapes(name):
    torch.manual_seed(0)
    model = build_segmentor(name, 5, **TINY[name])
    x = torch.randn(2, 3, 64, 64)
    target = torch.randint(0, 5, (2, 64, 64))
    target[:, :8] = 255
    model.train()
    out = model(x)
    assert set(out) == set(OUTPUTS[name])
    for key, (stride, _) in OUTPUTS[name].items():
        assert out[key].shape == (2, 5, 64 // stride, 64 // stride), key
    assert {k: w for k, w in model.loss_weights.items() if k in out} == \
        {k: w for k, (_, w) in OUTPUTS[name].items()}
    terms = model.losses(out, target, ce)
    assert len(terms) == len(OUTPUTS[name]) and all(torch.isfinite(v) for v in terms.values())
    sum(terms.values()).backward()
    for group in (model.backbone_parameters(), model.head_parameters()):
        grads = [p.grad for p in group if p.grad is not None]
        assert grads and sum(float(g.abs().sum()) for g in grads) > 0
    # every trainable parameter takes part in the loss: DDP (pipeline.runtime.wrap_ddp) needs
    # no find_unused_parameters; only SETR-MLA's class token (unused, as mmseg's) is frozen
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
    assert [n for n, p in model.named_parameters() if not p.requires_grad] == \
        (["backbone.class_token"] if name == "setr_mla" else [])
    model.eval()
    with torch.no_grad():
        y = model(torch.randn(1, 3, 48, 80))["out"]
    stride = OUTPUTS[name]["out"][0]
    assert y.shape == (1, 5, math.ceil(48 / stride), math.ceil(80 / stride))
    with torch.no_grad():   # sides that are not multiples of 16 (SETR pads, then crops back)
        y = model(torch.randn(1, 3, 40, 72))["out"]
    assert y.shape == (1, 5, math.ceil(40 / stride), math.ceil(72 / stride))


# --------------------------------------------------------------------------- CCNet
def _plain_cca(channels=4, gamma=1.0):
    """Criss-cross attention with constant energies (uniform weights) and V = identity."""
    cca = CrissCrossAttention(channels, reduction=channels)
    with torch.no_grad():
        for conv in (cca.query_conv, cca.key_conv):
            conv.weight.zero_()
            conv.bias.fill_(1.0)
        cca.value_conv.weight.copy_(torch.eye(channels).view(channels, channels, 1, 1))
        cca.value_conv.bias.zero_()
        cca.gamma.scale.fill_(gamma)
    return cca


def test_ccnet_attends_row_and_column_once():
    h, w = 5, 7
    cca = _plain_cca()
    x = torch.zeros(1, 4, h, w)
    x[0, 0, 2, 3] = 1.0  # a single "source" pixel v = (2, 3)
    with torch.no_grad():
        context = cca(x) - x
    expected = torch.zeros(h, w)
    expected[2, :] = 1.0 / (h + w - 1)   # same row (v itself included once)
    expected[:, 3] = 1.0 / (h + w - 1)   # same column
    assert torch.allclose(context[0, 0], expected, atol=1e-7)
    assert torch.count_nonzero(context[0, 1:]) == 0

    q = torch.randn(2, 3, h, w)
    k = torch.randn(2, 3, h, w)
    a_col, a_row = cca.attention(q, k)
    total = a_col.sum(-1) + a_row.sum(-1)           # one joint softmax over H + W entries
    assert torch.allclose(total, torch.ones_like(total), atol=1e-6)
    diag = a_col[:, torch.arange(h), :, torch.arange(h)]  # a pixel's own column entry
    assert torch.count_nonzero(diag) == 0
    # weights are exp(q·k) normalised over the criss-cross set, by hand for one pixel
    i, j = 1, 4
    e_row = torch.einsum("c,cw->w", q[0, :, i, j], k[0, :, i, :])
    e_col = torch.einsum("c,ch->h", q[0, :, i, j], k[0, :, :, j])
    e_col[i] = -math.inf
    ref = torch.softmax(torch.cat([e_col, e_row]), 0)
    assert torch.allclose(torch.cat([a_col[0, i, j], a_row[0, i, j]]), ref, atol=1e-6)


def test_ccnet_two_loops_reach_every_pixel():
    cca = _plain_cca()
    x = torch.zeros(1, 4, 5, 6)
    x[0, 0, 1, 1] = 1.0
    with torch.no_grad():
        once = cca(x)[0, 0]
        twice = cca(cca(x))[0, 0]
    assert torch.count_nonzero(once) == 5 + 6 - 1
    assert torch.all(twice > 0)


# --------------------------------------------------------------------------- ISANet
def _isa_head(down=(4, 4)):
    torch.manual_seed(0)
    head = ISAHead(8, 16, 3, isa_channels=8, down_factor=down).double().eval()
    return head


@pytest.mark.parametrize("size", [(8, 12), (7, 10)])
def test_isanet_reaches_every_position(size):
    head = _isa_head()
    x = torch.randn(1, 16, *size, dtype=torch.float64, requires_grad=True)
    for (i, j) in [(0, 0), (size[0] - 1, size[1] - 1), (3, 5)]:
        grad, = torch.autograd.grad(head.isa(x)[0, :, i, j].sum(), x)
        assert torch.all(grad.abs().sum(dim=1) > 0), (i, j)


def test_isanet_single_step_does_not_reach_everything():
    """Control: short-range attention alone only sees its 4x4 block."""
    head = _isa_head()
    head.global_relation = nn.Identity()
    x = torch.randn(1, 16, 8, 12, dtype=torch.float64, requires_grad=True)
    grad, = torch.autograd.grad(head.isa(x)[0, :, 0, 0].sum(), x)
    reach = grad.abs().sum(dim=1)[0] > 0
    assert reach[:4, :4].all() and not reach[4:].any() and not reach[:, 4:].any()


def test_isanet_groups_are_interlaced():
    """Long-range groups: same offset in every 4x4 block (pixels 4 apart)."""
    head = _isa_head()
    head.local_relation = nn.Identity()
    x = torch.randn(1, 16, 8, 12, dtype=torch.float64, requires_grad=True)
    grad, = torch.autograd.grad(head.isa(x)[0, :, 1, 2].sum(), x)
    reach = (grad.abs().sum(dim=1)[0] > 0).nonzero().tolist()
    assert sorted(reach) == sorted([[r, c] for r in (1, 5) for c in (2, 6, 10)])


# --------------------------------------------------------------------------- DNLNet
def test_dnl_whitening_invariant_to_key_and_query_shift():
    torch.manual_seed(0)
    block = DisentangledNonLocal2d(16, reduction=2, temperature=0.05)
    q, k = torch.randn(2, 8, 30), torch.randn(2, 8, 30)
    shift_k, shift_q = 3 * torch.randn(2, 8, 1), 3 * torch.randn(2, 8, 1)
    ref = block.pairwise(q, k)
    assert torch.allclose(ref.sum(-1), torch.ones(2, 30), atol=1e-5)
    assert torch.allclose(block.pairwise(q, k + shift_k), ref, atol=1e-5)
    assert torch.allclose(block.pairwise(q + shift_q, k), ref, atol=1e-5)
    # control: without whitening a shift of the queries adds c·k_j, which varies over the
    # keys j and changes the softmax (a key shift adds q_i·c, constant along each softmax row)
    plain = lambda a, b: torch.softmax(a.transpose(1, 2) @ b / (8 ** 0.5 * 0.05), -1)
    assert not torch.allclose(plain(q + shift_q, k), plain(q, k), atol=1e-3)
    # by hand: whitened, scaled by 1/sqrt(C') and 1/temperature
    qc, kc = q - q.mean(-1, keepdim=True), k - k.mean(-1, keepdim=True)
    assert torch.allclose(ref, torch.softmax(qc.transpose(1, 2) @ kc / math.sqrt(8) / 0.05, -1), atol=1e-6)


def test_dnl_block_identity_at_init_and_key_bias_invariant():
    torch.manual_seed(0)
    block = DisentangledNonLocal2d(16).eval()
    x = torch.randn(2, 16, 5, 6)
    with torch.no_grad():
        assert torch.equal(block(x), x)                  # conv_out's BN weight starts at 0
        block.conv_out.bn.weight.fill_(1.0)
        y = block(x)
        block.phi.conv.bias.add_(5 * torch.randn(8))     # same shift for every key position
        assert torch.allclose(block(x), y, atol=1e-5)
        block.conv_mask.bias.add_(7.0)                   # unary softmax: shift-invariant too
        assert torch.allclose(block(x), y, atol=1e-5)
        block.conv_mask.weight.mul_(50.0)                # but the unary term does matter
        assert not torch.allclose(block(x), y, atol=1e-4)


# --------------------------------------------------------------------------- ANN / ISNet
def test_ann_pyramid_sampling_and_zero_init():
    feats = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    anchors = PPMConcat((1, 3, 6, 8))(feats)
    assert anchors.shape == (2, 3, 1 + 9 + 36 + 64)
    assert torch.allclose(anchors[..., 0], feats.mean(dim=(2, 3)))
    assert torch.equal(anchors[..., -64:], feats.flatten(2))   # bin 8 on an 8x8 map = identity
    model = build_segmentor("ann", 4, **TINY["ann"])
    for stage in (*model.decode_head.fusion.stages, *model.decode_head.context.stages):
        assert torch.count_nonzero(stage.out_project.weight) == 0


def test_isnet_class_representations_by_hand():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 5)
    logits = torch.randn(2, 4, 4, 5)
    got = class_representations(x, logits)
    # the official per-image, per-class loop
    for b in range(2):
        pred = logits[b].argmax(0)
        for c in range(4):
            mask = pred == c
            if not mask.any():
                continue
            w = torch.softmax(logits[b, c][mask], 0)
            rep = (x[b][:, mask] * w).sum(1)
            assert torch.allclose(got[b][:, mask], rep[:, None].expand(-1, int(mask.sum())), atol=1e-6)
    logits.requires_grad_(True)
    class_representations(x, logits).sum().backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_isnet_loss_weights():
    model = build_segmentor("isnet", 4, **TINY["isnet"])
    out = model.train()(torch.randn(2, 3, 32, 32))
    target = torch.randint(0, 4, (2, 32, 32))
    terms = model.losses(out, target, ce)
    assert terms["decode.loss_ce"].item() == pytest.approx(ce(F.interpolate(
        out["out"], size=(32, 32), mode="bilinear"), target).item(), rel=1e-5)
    assert terms["decode_stage1.loss_ce"].item() == pytest.approx(0.4 * ce(F.interpolate(
        out["stage1"], size=(32, 32), mode="bilinear"), target).item(), rel=1e-5)
    assert set(terms) == {"decode.loss_ce", "decode_stage1.loss_ce", "aux.loss_ce"}


# --------------------------------------------------------------------------- HRNet
def test_hrnet_branches_and_concat():
    net = build_hrnet("hrnet_w18", concat=False).eval()
    with torch.no_grad():
        outs = net(torch.randn(1, 3, 64, 96))
    assert [tuple(o.shape[1:]) for o in outs] == [(18, 16, 24), (36, 8, 12), (72, 4, 6), (144, 2, 3)]
    tiny = HRNet("tiny", concat=True).eval()
    with torch.no_grad():
        (cat,) = tiny(torch.randn(1, 3, 50, 70))   # odd sizes: fusion resizes
    assert cat.shape == (1, 8 + 16 + 32 + 64, 13, 18) and tiny.channels == (120,)
    names = {n for n, _ in net.named_parameters()}
    assert {"conv1.weight", "bn1.weight", "layer1.0.conv3.weight", "transition1.1.0.0.weight",
            "stage4.2.fuse_layers.3.0.0.0.weight", "stage4.2.branches.3.3.conv2.weight"} <= names


def _bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """Row o: the weights of the n_in inputs in output o of a bilinear resize with
    align_corners=False (source coordinate (o + 0.5) n_in / n_out - 0.5, clamped to the border)."""
    w = np.zeros((n_out, n_in))
    for o in range(n_out):
        src = max((o + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = min(int(np.floor(src)), n_in - 1)
        lam = src - i0
        w[o, i0] += 1 - lam
        w[o, min(i0 + 1, n_in - 1)] += lam
    return w


def _plain_fusion(channels):
    """An HRModule whose branches are identities and whose j > i fuse convs/BNs are identities,
    so that fused output 0 is ReLU(x_0 + Σ_j resize(x_j))."""
    module = HRModule(channels, num_blocks=1).eval()
    module.branches = nn.ModuleList(nn.Identity() for _ in channels)
    with torch.no_grad():
        for j in range(1, len(channels)):
            conv, bn = module.fuse_layers[0][j][0], module.fuse_layers[0][j][1]
            conv.weight.copy_(torch.eye(channels[0], channels[j]).view(channels[0], channels[j], 1, 1))
            bn.eps = 0.0
    return module


def test_hrnet_fuse_upsamples_bilinear_by_hand():
    # 2x2 -> 4x4, align_corners=False: outputs at source coordinates -0.25 (clamped to 0),
    # 0.25, 0.75, 1.25 (clamped to 1)
    by_hand = np.array([[1, 0], [0.75, 0.25], [0.25, 0.75], [0, 1]])
    assert np.allclose(_bilinear_matrix(2, 4), by_hand)
    module = _plain_fusion([2, 2])
    x1 = torch.tensor([[[1.0, 2.0], [3.0, 5.0]], [[0.5, 4.0], [2.0, 1.0]]])[None]
    with torch.no_grad():
        out = module([torch.zeros(1, 2, 4, 4), x1])[0]
    expected = np.stack([by_hand @ c @ by_hand.T for c in x1[0].double().numpy()])
    assert np.allclose(out[0].double().numpy(), expected, atol=1e-6)
    # channel 0, output row 1 by hand: 0.75 * (1, 1.25, 1.75, 2) + 0.25 * (3, 3.5, 4.5, 5)
    assert np.allclose(out[0, 0, 1].numpy(), [1.5, 1.8125, 2.4375, 2.75])


def test_hrnet_fuse_odd_sizes_upsample_then_resize():
    """Sides 5x7 -> 3x4 -> 2x2 (stride-2 convs): mmseg upsamples by 2 / 4 to 6x8 / 8x8, then
    resizes bilinearly to 5x7."""
    torch.manual_seed(0)
    module = _plain_fusion([2, 2, 2])
    x1, x2 = torch.rand(1, 2, 3, 4), torch.rand(1, 2, 2, 2)
    with torch.no_grad():
        out = module([torch.zeros(1, 2, 5, 7), x1, x2])[0]
    expected = 0
    for x, s in ((x1, 2), (x2, 4)):
        h, w = x.shape[-2:]
        rows = _bilinear_matrix(h * s, 5) @ _bilinear_matrix(h, h * s)
        cols = _bilinear_matrix(w * s, 7) @ _bilinear_matrix(w, w * s)
        expected = expected + np.stack([rows @ c @ cols.T for c in x[0].double().numpy()])
    assert out.shape == (1, 2, 5, 7)
    assert np.allclose(out[0].double().numpy(), expected, atol=1e-6)


def test_hrnet_loads_msra_style_checkpoint(tmp_path):
    """ImageNet HRNet checkpoints carry classification parts (ignored) and mmseg's names."""
    src = HRNet("tiny")
    state = {f"backbone.{k}": v.clone() for k, v in src.state_dict().items()}
    state.update({"incre_modules.0.0.conv1.weight": torch.zeros(1), "classifier.weight": torch.zeros(3, 4)})
    path = tmp_path / "hrnet_tiny.pth"
    torch.save({"state_dict": state}, path)
    model = build_segmentor("fcn_hrnet", 4, backbone="tiny", backbone_options={"weights_path": str(path)})
    for k, v in src.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[k], v), k
    del state["backbone.conv1.weight"]
    torch.save(state, path)
    with pytest.raises(ValueError, match="missing.*conv1.weight"):
        build_hrnet("tiny", weights_path=path)


# --------------------------------------------------------------------------- bad input
def test_wrong_backbone_family_named():
    with pytest.raises(ValueError, match="SETR needs a ViT backbone.*resnet101"):
        build_segmentor("setr_mla", 21, backbone="resnet101")
    with pytest.raises(ValueError, match="HRNet backbone.*resnet101"):
        build_segmentor("ocrnet_hrnet", 21, backbone="resnet101")
    with pytest.raises(ValueError, match="out_indices"):
        build_segmentor("setr_naive", 21, backbone="tiny", out_indices=(1, 2, 3, 8))
    with pytest.raises(ValueError, match="recurrence"):
        build_segmentor("ccnet", 21, backbone="tiny", recurrence=0)


def test_unreachable_weights_clear_error(monkeypatch, tmp_path):
    def offline(*args, **kwargs):
        raise OSError("no network")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    import torchvision.models._api as tv_api
    monkeypatch.setattr(tv_api, "load_state_dict_from_url", offline)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(RuntimeError, match=r"ViT_B_16_Weights\.IMAGENET1K_V1.*pretrained=False"):
        build_segmentor("setr_naive", 21, backbone="vit_base", pretrained=True)
    with pytest.raises(ValueError, match="hrnetv2_w18-00eb2006.pth"):
        build_segmentor("fcn_hrnet", 21, backbone="hrnet_w18", pretrained=True)


# --------------------------------------------------------------------------- ViT encoder
def test_vit_encoder_matches_torchvision_and_interpolates():
    from torchvision.models import VisionTransformer
    torch.manual_seed(0)
    ref = VisionTransformer(image_size=64, patch_size=16, num_layers=8, num_heads=4, hidden_dim=64,
                            mlp_dim=128).eval()
    with torch.no_grad():
        ref.conv_proj.bias.normal_()   # pretrained ViTs have a patch bias; ours folds it into P
    enc = ViTEncoder("vit_tiny", img_size=64, out_indices=(7,)).eval()
    assert enc.conv_proj.bias is None and "conv_proj.bias" not in enc.state_dict()
    enc.load_vit_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tokens = ref.encoder.layers(ref.encoder.dropout(
            torch.cat([ref.class_token.expand(2, -1, -1), ref._process_input(x)], 1) + ref.encoder.pos_embedding))
        (feat,) = enc(x)
    assert torch.allclose(feat, tokens[:, 1:].transpose(1, 2).reshape(2, 64, 4, 4), atol=1e-5)
    # a 224-px torchvision state dict (14x14 grid) loads into a 64-px encoder (4x4 grid)
    big = VisionTransformer(image_size=224, patch_size=16, num_layers=8, num_heads=4, hidden_dim=64, mlp_dim=128)
    enc.load_vit_state_dict(big.state_dict())
    assert enc.encoder.pos_embedding.shape == (1, 17, 64)
    # interpolation: same grid is the identity, a constant field stays constant
    pos = torch.randn(1, 17, 8)
    assert torch.equal(interpolate_pos_embed(pos, (4, 4)), pos)
    const = torch.ones(1, 17, 8)
    assert torch.allclose(interpolate_pos_embed(const, (3, 5)), torch.ones(1, 16, 8))
    with torch.no_grad():
        assert [f.shape for f in enc(torch.randn(1, 3, 40, 72))] == [(1, 64, 3, 5)]  # padded to 48x80


def test_mmseg_vit_names_convert():
    enc = ViTEncoder("vit_tiny", img_size=64, out_indices=(7,))
    ours = enc.state_dict()
    mm = {"patch_embed.projection.weight": ours["conv_proj.weight"],
          "cls_token": ours["class_token"], "pos_embed": ours["encoder.pos_embedding"]}
    for i in range(8):
        p = f"encoder.layers.encoder_layer_{i}."
        for a, b in (("ln1", "ln_1"), ("ln2", "ln_2")):
            for t in ("weight", "bias"):
                mm[f"layers.{i}.{a}.{t}"] = ours[p + f"{b}.{t}"]
        for t in ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias"):
            mm[f"layers.{i}.attn.attn.{t}"] = ours[p + f"self_attention.{t}"]
        for t in ("weight", "bias"):
            mm[f"layers.{i}.ffn.layers.0.0.{t}"] = ours[p + f"mlp.0.{t}"]
            mm[f"layers.{i}.ffn.layers.1.{t}"] = ours[p + f"mlp.3.{t}"]
    converted = convert_mmseg_vit(mm)
    assert set(converted) == set(ours)
    enc.load_state_dict(converted)
    # a 384-px (24x24 grid) mmseg ViT checkpoint loads with its position embedding resized
    big = dict(mm, pos_embed=torch.randn(1, 1 + 24 * 24, 64))
    enc.load_mmseg_state_dict({"state_dict": big})
    assert enc.encoder.pos_embedding.shape == (1, 17, 64)
    assert torch.equal(enc.encoder.pos_embedding[:, 0], big["pos_embed"][:, 0])
    # an ImageNet (timm-converted) ViT has a patch bias: folded into the patch positions
    bias, pos = torch.randn(64), torch.randn(1, 17, 64)
    enc.load_mmseg_state_dict(dict(mm, pos_embed=pos, **{"patch_embed.projection.bias": bias}))
    assert torch.allclose(enc.encoder.pos_embedding[0, 1:], pos[0, 1:] + bias)
    assert torch.equal(enc.encoder.pos_embedding[0, 0], pos[0, 0])
    model = build_segmentor("setr_naive", 3, **TINY["setr_naive"])
    full = {("backbone." + k if k in mm else k): v for k, v in mm.items()}
    full.update({k: v for k, v in model.state_dict().items() if not k.startswith("backbone.")})
    model.load_state_dict(convert_mmseg_setr({"state_dict": full}))
    with pytest.raises(KeyError, match="layers.0.bogus"):
        convert_mmseg_vit({"layers.0.bogus.weight": torch.zeros(1)})


@pytest.mark.parametrize("name,with_cls", [("setr_mla", False), ("setr_naive", True), ("setr_pup", True)])
def test_setr_class_token_only_where_mmseg_has_it(name, with_cls):
    """MLA drops the class token before the layers (the sequence holds the patches only, the
    token does not affect any output); Naive and PUP carry it through every layer."""
    torch.manual_seed(0)
    model = build_segmentor(name, 3, **TINY[name]).eval()
    assert model.backbone.with_cls_token is with_cls
    lengths = []
    hooks = [layer.register_forward_pre_hook(lambda m, args: lengths.append(args[0].shape[1]))
             for layer in model.backbone.encoder.layers]
    x = torch.randn(1, 3, 48, 80)   # 3 x 5 = 15 patches
    with torch.no_grad():
        before = model(x)["out"]
        model.backbone.class_token.normal_(0.0, 10.0)
        after = model(x)["out"]
    for h in hooks:
        h.remove()
    assert set(lengths) == {15 + with_cls}
    assert torch.equal(before, after) is (not with_cls)


def test_setr_pup_auxiliary_heads_at_full_resolution():
    """mmseg's PUP auxiliary heads: two (3x3 ConvModule + bilinear x4) stages, so the second
    conv runs at 1/4 and the logits come out at the input's resolution."""
    torch.manual_seed(0)
    model = build_segmentor("setr_pup", 3, **TINY["setr_pup"]).train()
    conv_in = []
    head = model.auxiliary_head[0]
    assert [stage[1].scale_factor for stage in head.up_convs] == [4, 4]
    hooks = [stage[0].register_forward_pre_hook(lambda m, args: conv_in.append(tuple(args[0].shape[-2:])))
             for stage in head.up_convs]
    out = model(torch.randn(2, 3, 64, 96))
    for h in hooks:
        h.remove()
    assert conv_in == [(4, 6), (16, 24)]
    assert [out[f"aux_{i}"].shape for i in range(3)] == [(2, 3, 64, 96)] * 3
    assert out["out"].shape == (2, 3, 64, 96)


# --------------------------------------------------------------------------- parameter counts
# models.md section 2.3: total / decode head / aux (M) at 21 classes (R-101-D8 = deep stem)
TABLE = {
    "ccnet": (68.82, 23.94, 2.37), "ann": (65.22, 20.34, 2.37), "dnlnet": (69.02, 24.13, 2.37),
    "isanet": (56.70, 11.82, 2.37),
}
TABLE_1PCT = {
    ("setr_naive", "vit_large"): 305.42, ("setr_pup", "vit_large"): 317.16,
    ("setr_mla", "vit_large"): 309.37, ("ocrnet_hrnet", "hrnet_w48"): 70.37,
    ("ocrnet_hrnet", "hrnet_w18"): 12.08, ("fcn_hrnet", "hrnet_w48"): 65.86,
    ("fcn_hrnet", "hrnet_w18"): 9.64,
}


def _count(model, prefix=""):
    return sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefix)) / 1e6


@pytest.mark.parametrize("name", sorted(TABLE))
def test_param_counts_r101_d8(name):
    total, decode, aux = TABLE[name]
    with torch.device("meta"):
        model = build_segmentor(name, 21, backbone="resnet101", backbone_options={"deep_stem": True})
        no_aux = build_segmentor(name, 21, backbone="resnet101", backbone_options={"deep_stem": True},
                                 aux=False)
    assert _count(model) == pytest.approx(total, rel=0.005)
    assert _count(no_aux) == pytest.approx(total - aux, rel=0.005)
    assert _count(model, "decode_head") == pytest.approx(decode, rel=0.005)
    assert _count(model, "auxiliary_head") == pytest.approx(aux, rel=0.005)


@pytest.mark.parametrize("name,backbone", sorted(TABLE_1PCT))
def test_param_counts_setr_hrnet(name, backbone):
    with torch.device("meta"):
        model = build_segmentor(name, 21, backbone=backbone)
    assert _count(model) == pytest.approx(TABLE_1PCT[(name, backbone)], rel=0.01)


def test_setr_layer_choice_meta():
    with torch.device("meta"):
        naive = build_segmentor("setr_naive", 21, backbone="vit_large")
        base = build_segmentor("setr_mla", 21, backbone="vit_base")
    assert naive.backbone.out_indices == (9, 14, 19, 23)      # layers 10/15/20 (aux) and 24
    assert base.backbone.out_indices == (2, 5, 8, 11)          # quarters of ViT-B's 12 layers


@pytest.fixture(scope="module")
def setr_mla_large():
    """A real ViT-L SETR-MLA, built on ``meta`` and filled with N(0, 0.02) weights (torchvision's
    own initialisation of 300 M parameters takes much longer and is irrelevant here)."""
    with torch.device("meta"):
        model = build_segmentor("setr_mla", 21, backbone="vit_large")
    model = model.to_empty(device="cpu").eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif p.ndim == 1:   # norm weights
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
        for name, b in model.named_buffers():
            b.fill_(1.0 if name.endswith("running_var") else 0.0)
    return model


def test_setr_mla_reads_exactly_layers_6_12_18_24(setr_mla_large):
    model = setr_mla_large
    assert model.backbone.out_indices == (5, 11, 17, 23)
    layer_out, neck_in = {}, []
    hooks = [layer.register_forward_hook(lambda m, i, o, k=k: layer_out.__setitem__(k, o))
             for k, layer in enumerate(model.backbone.encoder.layers)]
    hooks.append(model.neck.register_forward_pre_hook(lambda m, args: neck_in.extend(args[0])))
    with torch.no_grad():
        out = model(torch.randn(1, 3, 32, 48))
    for h in hooks:
        h.remove()
    assert out["out"].shape == (1, 21, 8, 12)
    # no class token (mmseg's with_cls_token=False): every layer sees the 2x3 patches only
    assert {tuple(v.shape) for v in layer_out.values()} == {(1, 6, 1024)}
    as_map = {k: v.transpose(1, 2).reshape(1, 1024, 2, 3) for k, v in layer_out.items()}
    assert len(neck_in) == 4
    for feat, layer in zip(neck_in, (6, 12, 18, 24)):
        matches = [k + 1 for k, m in as_map.items() if torch.equal(m, feat)]
        assert matches == [layer]
    assert _count(model) == pytest.approx(309.37, rel=0.01)
