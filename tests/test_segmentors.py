"""Segmentor zoo: shared layers, every model's forward/backward and losses, parameter counts."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.backbones import Backbone, build_backbone
from models.segmentors import Segmentor, available, build_segmentor
from models.segmentors.layers import (ConvModule, DecodeHead, DepthwiseSeparableConvModule, FCNHead,
                                      make_classifier)

K = 5  # classes incl. background in the small tests


def ce(logits, target):
    return F.cross_entropy(logits, target, ignore_index=255)


def n_params(module):
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


def tiny():
    return build_backbone("tiny", width=8)   # 8/16/24/32 channels at 1/4, 1/8, 1/8, 1/8


# Small widths so that every model runs in well under a second on 64x64 inputs.
SMALL = {
    "fcn": dict(channels=16, aux_channels=8),
    "pspnet": dict(channels=16, aux_channels=8),
    "deeplab_largefov": dict(channels=32),
    "deeplabv2": dict(),
    "deeplabv3": dict(channels=16, aux_channels=8),
    "deeplabv3plus": dict(channels=16, c1_channels=8, aux_channels=8),
    "danet": dict(channels=16, aux_channels=8),
    "ocrnet": dict(channels=16, ocr_channels=8, region_channels=8),
    "sanet": dict(),
}

LOSS_KEYS = {
    "fcn": {"decode.loss_ce", "aux.loss_ce"},
    "pspnet": {"decode.loss_ce", "aux.loss_ce"},
    "deeplab_largefov": {"decode.loss_ce"},
    "deeplabv2": {"decode.loss_ce"},
    "deeplabv3": {"decode.loss_ce", "aux.loss_ce"},
    "deeplabv3plus": {"decode.loss_ce", "aux.loss_ce"},
    "danet": {"decode.pam_cam.loss_ce", "decode.pam.loss_ce", "decode.cam.loss_ce", "aux.loss_ce"},
    "ocrnet": {"decode_0.loss_ce", "decode_1.loss_ce"},
    "sanet": {"decode.loss_ce", "den.loss_ce", "cat.loss_bce"},
}

OUT_STRIDE = {"deeplabv3plus": 4}


# --------------------------------------------------------------------------- layers
def test_conv_module_names_bias_and_shape():
    m = ConvModule(4, 6, 3, dilation=2)
    assert [name for name, _ in m.named_children()] == ["conv", "bn", "activate"]
    assert m.conv.bias is None and m.conv.padding == (2, 2)
    plain = ConvModule(4, 6, 1, norm=False, act=False)
    assert [name for name, _ in plain.named_children()] == ["conv"]
    assert plain.conv.bias is not None and torch.all(plain.conv.bias == 0)
    y = m(torch.randn(2, 4, 9, 7))
    assert y.shape == (2, 6, 9, 7) and (y >= 0).all()


def test_depthwise_separable_module():
    m = DepthwiseSeparableConvModule(8, 12, 3, dilation=3)
    assert m.depthwise_conv.conv.groups == 8 and m.depthwise_conv.conv.dilation == (3, 3)
    assert m.pointwise_conv.conv.kernel_size == (1, 1)
    assert n_params(m) == 8 * 9 + 2 * 8 + 8 * 12 + 2 * 12
    assert m(torch.randn(1, 8, 10, 10)).shape == (1, 12, 10, 10)


def test_classifier_init_and_dropout_switch():
    torch.manual_seed(0)
    conv = make_classifier(512, 64)
    assert abs(conv.weight.std().item() - 0.01) < 0.001 and torch.all(conv.bias == 0)
    assert DecodeHead(8, 3, dropout_ratio=0).dropout is None
    assert isinstance(DecodeHead(8, 3, dropout_ratio=0.1).dropout, nn.Dropout2d)
    with pytest.raises(ValueError, match="num_classes"):
        DecodeHead(8, 0)


def test_fcn_head_structure_and_concat():
    head = FCNHead(8, 4, num_classes=3, num_convs=2, concat_input=True).eval()
    x = torch.randn(2, 8, 6, 6)
    expected = head.conv_seg(head.conv_cat(torch.cat([x, head.convs(x)], 1)))
    assert torch.allclose(head([torch.zeros(1), x]), expected)
    assert torch.allclose(head(x), expected)               # a single tensor is used as is
    assert isinstance(FCNHead(8, 8, 3, num_convs=0, concat_input=False).convs, nn.Identity)
    with pytest.raises(ValueError, match="in_channels == channels"):
        FCNHead(8, 4, 3, num_convs=0)


# --------------------------------------------------------------------------- registry
def test_registry_lists_models_and_rejects_unknown_names():
    names = available()
    for name in SMALL:
        assert name in names
    with pytest.raises(ValueError, match="unknown segmentor 'nope'.*available: .*fcn"):
        build_segmentor("nope", 21)


def test_builder_rejects_bad_arguments():
    with pytest.raises(ValueError, match="num_classes"):
        build_segmentor("fcn", 0, backbone=tiny())
    with pytest.raises(ValueError, match="aux_weight"):
        build_segmentor("fcn", 3, backbone=tiny(), aux_weight=-1.0, **SMALL["fcn"])
    with pytest.raises(ValueError, match="levels"):
        one_level = Backbone()
        one_level.channels = (8,)
        build_segmentor("fcn", 3, backbone=one_level)


# --------------------------------------------------------------------------- all models
@pytest.mark.parametrize("name", sorted(SMALL))
def test_forward_backward_shapes_and_losses(name):
    torch.manual_seed(0)
    model = build_segmentor(name, K, backbone=tiny(), **SMALL[name])
    assert isinstance(model, Segmentor) and isinstance(model.backbone, Backbone)
    x = torch.randn(2, 3, 64, 64)
    target = torch.randint(0, K, (2, 64, 64))
    target[:, :8] = 255
    outputs = model.train()(x)
    stride = OUT_STRIDE.get(name, 8)
    assert outputs["out"].shape == (2, K, 64 // stride, 64 // stride)
    terms = model.losses(outputs, target, ce)
    assert set(terms) == LOSS_KEYS[name]
    total = sum(terms.values())
    assert torch.isfinite(total)
    total.backward()
    head_grads = [p.grad for p in model.head_parameters()]
    assert all(g is not None for g in head_grads)
    assert any(g.abs().sum() > 0 for g in head_grads)
    assert model.backbone.stages[0][0].weight.grad.abs().sum() > 0
    # every parameter takes part in the loss: DDP (pipeline.runtime.wrap_ddp) needs no
    # find_unused_parameters
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    ids = {id(p) for p in model.backbone_parameters()}
    assert len(ids) + len(model.head_parameters()) == len(list(model.parameters()))
    with torch.no_grad():
        evaluated = model.eval()(x)
    assert evaluated["out"].shape == outputs["out"].shape


def test_aux_weight_and_switch():
    model = build_segmentor("fcn", K, backbone=tiny(), aux_weight=0.25, **SMALL["fcn"])
    assert model.loss_weights == {"out": 1.0, "aux": 0.25}
    x, target = torch.randn(2, 3, 32, 32), torch.randint(0, K, (2, 32, 32))
    outputs = model.train()(x)
    terms = model.losses(outputs, target, ce)
    up = F.interpolate(outputs["aux"], size=(32, 32), mode="bilinear", align_corners=False)
    assert torch.allclose(terms["aux.loss_ce"], 0.25 * ce(up, target))
    no_aux = build_segmentor("fcn", K, backbone=tiny(), aux=False, **SMALL["fcn"])
    assert no_aux.auxiliary_head is None and set(no_aux.train()(x)) == {"out"}


def test_short_training_decreases_loss():
    torch.manual_seed(0)
    model = build_segmentor("fcn", 3, backbone=tiny(), **SMALL["fcn"]).train()
    target = torch.zeros(4, 32, 32, dtype=torch.long)
    target[:, :, 16:] = 1
    target[:, 16:, :16] = 2
    x = torch.randn(4, 3, 32, 32) * 0.5 + torch.stack([target == c for c in range(3)], 1).float()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for _ in range(20):
        loss = sum(model.losses(model(x), target, ce).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.4 * losses[0]


# --------------------------------------------------------------------------- parameter counts
class _Levels(Backbone):
    """A parameter-free stand-in with R-101-D8's level channels, to count heads only."""

    channels = (256, 512, 1024, 2048)


@pytest.fixture(scope="module")
def r101_backbone_params():
    return n_params(build_backbone("resnet101", deep_stem=True))


# models.md section 2.3 (mmseg 1.2.2, 21 classes, R-101-D8): total M, aux head M
TABLE = {"fcn": (68.49, 2.37), "pspnet": (67.97, 2.37), "deeplabv3": (87.11, 2.37),
         "deeplabv3plus": (62.58, 2.37), "danet": (68.84, 2.37), "ocrnet": (55.52, 0.0)}


@pytest.mark.parametrize("name", sorted(TABLE))
def test_parameter_counts_match_table(name, r101_backbone_params):
    assert abs(r101_backbone_params / 1e6 - 42.52) < 0.01
    model = build_segmentor(name, 21, backbone=_Levels())
    total_m = (r101_backbone_params + n_params(model)) / 1e6
    aux_m = n_params(getattr(model, "auxiliary_head", None)) / 1e6
    table_total, table_aux = TABLE[name]
    assert abs(aux_m - table_aux) < 0.01
    assert abs(total_m - table_total) / table_total < 0.005
    assert abs((total_m - aux_m) - (table_total - table_aux)) / (table_total - table_aux) < 0.005


def test_parameter_counts_of_models_outside_the_table():
    """The counts the DeepLab docstrings state (R-101-D8 head, 21 classes)."""
    assert n_params(build_segmentor("deeplab_largefov", 21, backbone=_Levels()).decode_head) == 19_946_517
    assert n_params(build_segmentor("deeplabv2", 21, backbone=_Levels()).decode_head) == 4 * (2048 * 21 * 9 + 21)
    sanet = build_segmentor("sanet", 21, backbone=_Levels())
    assert abs(n_params(sanet) / 1e6 - (77.95 - 42.52)) < 0.01
    paper_v3 = build_segmentor("deeplabv3", 21, backbone=_Levels(), channels=256, bottleneck_kernel=1)
    assert abs(n_params(paper_v3.decode_head) / 1e6 - 15.54) < 0.01


# --------------------------------------------------------------------------- DANet
def test_danet_with_zero_gamma_beta_equals_its_no_attention_path():
    torch.manual_seed(0)
    model = build_segmentor("danet", K, backbone=tiny(), **SMALL["danet"]).eval()
    assert model.decode_head.pam.gamma.scale.item() == 0 and model.decode_head.cam.gamma.scale.item() == 0
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        feats = model.backbone(x)
        plain = model.decode_head(feats, attention=False)["out"]
        assert torch.allclose(model(x)["out"], plain, atol=1e-6)
        model.decode_head.pam.gamma.scale.fill_(0.5)
        assert not torch.allclose(model(x)["out"], plain, atol=1e-4)
        model.decode_head.pam.gamma.scale.fill_(0.0)
        model.decode_head.cam.gamma.scale.fill_(0.5)
        assert not torch.allclose(model(x)["out"], plain, atol=1e-4)


def test_pam_and_cam_formulas_on_small_cases():
    from models.segmentors.danet import CAM, PAM
    torch.manual_seed(0)
    pam = PAM(8, 2)
    pam.gamma.scale.data.fill_(1.0)
    x = torch.randn(1, 8, 3, 2)
    a = x.flatten(2)[0]                                          # C x N
    q = pam.query_project.weight[:, :, 0, 0] @ a + pam.query_project.bias[:, None]
    k = pam.key_project.weight[:, :, 0, 0] @ a + pam.key_project.bias[:, None]
    v = pam.value_project.weight[:, :, 0, 0] @ a + pam.value_project.bias[:, None]
    s = torch.softmax(q.T @ k, dim=1)                            # s[j, i]: query j, key i
    expected = v @ s.T + a
    assert torch.allclose(pam(x).flatten(2)[0], expected, atol=1e-5)

    cam = CAM()
    cam.gamma.scale.data.fill_(1.0)
    energy = a @ a.T
    att = torch.softmax(energy.max(dim=1, keepdim=True).values - energy, dim=1)
    assert torch.allclose(cam(x).flatten(2)[0], att @ a + a, atol=1e-5)
    paper = CAM(max_trick=False)
    paper.gamma.scale.data.fill_(1.0)
    assert torch.allclose(paper(x).flatten(2)[0], torch.softmax(energy, 1) @ a + a, atol=1e-5)


def test_attention_energies_do_not_overflow_under_float16_autocast():
    from models.segmentors.danet import CAM, PAM
    x = torch.rand(1, 8, 64, 64) * 10                      # A A^T ~ 1e5 > float16 max
    flat = x.half().flatten(2)
    assert not torch.isfinite(torch.bmm(flat, flat.transpose(1, 2))).all()
    cam, pam = CAM(), PAM(8, 2)
    cam.gamma.scale.data.fill_(1.0)
    pam.gamma.scale.data.fill_(1.0)
    with torch.autocast("cpu", dtype=torch.float16):
        assert torch.isfinite(cam(x.half())).all()
        assert torch.isfinite(pam(x)).all()
    assert torch.allclose(cam(x.half()).float(), cam(x).half().float(), rtol=1e-2, atol=1e-1)


# --------------------------------------------------------------------------- OCRNet
def test_ocr_spatial_gather_on_one_hot_regions_returns_class_means():
    from models.segmentors.ocrnet import SpatialGather
    torch.manual_seed(0)
    labels = torch.tensor([[0, 0, 1, 1], [0, 2, 2, 1], [2, 2, 2, 1]])        # 3 x 4 map, 3 regions
    onehot = F.one_hot(labels, 3).permute(2, 0, 1)[None].float()
    feats = torch.randn(1, 6, 3, 4)
    gathered = SpatialGather(scale=1.0)(feats, torch.log(onehot))       # -inf outside each region
    assert gathered.shape == (1, 6, 3, 1)
    for k in range(3):
        mean = feats[0][:, labels == k].mean(dim=1)
        assert torch.allclose(gathered[0, :, k, 0], mean, atol=1e-6)
    # soft but peaked logits: the same means up to exp(-50)
    assert torch.allclose(SpatialGather()(feats, 50 * onehot), gathered, atol=1e-5)
    with pytest.raises(ValueError, match="differ in size"):
        SpatialGather()(feats, onehot[..., :2])


def test_ocr_object_attention_uses_region_representations():
    from models.segmentors.ocrnet import ObjectAttentionBlock
    torch.manual_seed(0)
    block = ObjectAttentionBlock(8, 4).eval()
    pixels = torch.randn(2, 8, 5, 5)
    regions = torch.randn(2, 8, 3, 1)
    with torch.no_grad():
        q = block.query_project(pixels).flatten(2).transpose(1, 2)           # n x HW x 4
        k = block.key_project(regions).flatten(2)                            # n x 4 x K
        v = block.value_project(regions).flatten(2).transpose(1, 2)          # n x K x 4
        w = torch.softmax(q @ k / 2.0, dim=-1)
        y = block.out_project((w @ v).transpose(1, 2).reshape(2, 4, 5, 5))
        expected = block.bottleneck(torch.cat([y, pixels], 1))
        assert torch.allclose(block(pixels, regions), expected, atol=1e-5)


def test_ocrnet_region_head_reads_stage3_and_feeds_ocr():
    torch.manual_seed(0)
    model = build_segmentor("ocrnet", K, backbone=tiny(), **SMALL["ocrnet"]).eval()
    assert model.loss_weights == {"out": 1.0, "aux": 0.4}
    assert model.decode_head[0].in_index == -2
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        feats = model.backbone(x)
        out = model(x)
        assert torch.allclose(out["aux"], model.decode_head[0](feats))
        assert torch.allclose(out["out"], model.decode_head[1](feats, out["aux"]))
        changed = model.decode_head[1](feats, out["aux"] + 5 * torch.randn_like(out["aux"]))
        assert not torch.allclose(changed, out["out"])


# --------------------------------------------------------------------------- SANet
def test_sa_module_formula_on_a_hand_built_case():
    from models.segmentors.sanet import SAModule
    sa = SAModule(2, 2, 1, attn_pool=8, attn_sigmoid=True)
    sa.conv = nn.Identity()                        # X_res = X
    sa.attention = nn.Identity()                   # X_att = Up(sigmoid(APool_8(X)))
    x = torch.zeros(1, 2, 8, 8)
    x[0, 0, :4] = 2.0                              # channel 0: mean 1.0
    x[0, 1] = -3.0                                 # channel 1: mean -3.0
    att = torch.sigmoid(torch.tensor([1.0, -3.0])).view(1, 2, 1, 1)
    expected = att * x + att                       # X_out = X_att * X_res + X_att
    assert torch.allclose(sa(x), expected)
    assert abs(sa(x)[0, 0, 0, 0].item() - (torch.sigmoid(torch.tensor(1.0)) * 3).item()) < 1e-6
    # 16x16 input: a 2x2 pooled map, bilinearly up-sampled back
    y = torch.randn(1, 2, 16, 16)
    pooled = F.avg_pool2d(y, 8)
    att = F.interpolate(torch.sigmoid(pooled), size=(16, 16), mode="bilinear", align_corners=False)
    assert torch.allclose(sa(y), att * y + att, atol=1e-6)
    no_sigmoid = SAModule(2, 2, 1, attn_sigmoid=False)
    no_sigmoid.conv, no_sigmoid.attention = nn.Identity(), nn.Identity()
    means = torch.tensor([1.0, -3.0]).view(1, 2, 1, 1)
    assert torch.allclose(no_sigmoid(x), means * x + means)


def test_sanet_categorical_loss_uses_classes_present_in_target():
    from models.segmentors.sanet import class_presence
    target = torch.tensor([[[0, 0], [3, 255]], [[255, 255], [255, 255]], [[1, 2], [2, 1]]])
    assert torch.equal(class_presence(target, 4), torch.tensor(
        [[1.0, 0, 0, 1], [0, 0, 0, 0], [0, 1, 1, 0]]))
    with pytest.raises(ValueError, match="class value 7"):
        class_presence(torch.tensor([[[0, 7]]]), 4)
    model = build_segmentor("sanet", K, backbone=tiny(), alpha=0.5, beta=0.25)
    assert model.loss_weights == {"out": 1.0, "den": 0.25}
    outputs = {"out": torch.zeros(1, K, 2, 2), "den": torch.zeros(1, K, 2, 2),
               "cat": torch.tensor([[10.0, -10.0, 0.0, 0.0, 0.0]])}
    target = torch.tensor([[[0, 0], [2, 255]]])
    terms = model.losses(outputs, target, ce)
    presence = torch.tensor([[1.0, 0, 1, 0, 0]])
    bce = F.binary_cross_entropy_with_logits(outputs["cat"], presence)
    assert torch.allclose(terms["cat.loss_bce"], 0.5 * bce)
    assert torch.allclose(terms["den.loss_ce"], 0.25 * torch.log(torch.tensor(float(K))))
    assert torch.allclose(terms["decode.loss_ce"], torch.log(torch.tensor(float(K))))


def test_sanet_heads_cover_all_backbone_levels():
    model = build_segmentor("sanet", K, backbone=tiny(), cat_from="attention")
    assert len(model.decode_head.sa_modules) == 4
    widths = [m.conv.conv.out_channels for m in model.decode_head.sa_modules]
    assert widths == [c // 4 for c in model.backbone.channels]
    out = model.train()(torch.randn(2, 3, 32, 32))
    assert out["cat"].shape == (2, K) and out["den"].shape == (2, K, 4, 4)
    with pytest.raises(ValueError, match="cat_from"):
        build_segmentor("sanet", K, backbone=tiny(), cat_from="nope")


# --------------------------------------------------------------------------- DeepLab family
def test_deeplab_variants_structure():
    largefov = build_segmentor("deeplab_largefov", K, backbone=tiny(), channels=32).decode_head
    assert largefov.fc6.conv.dilation == (12, 12) and not hasattr(largefov.fc6, "bn")
    assert isinstance(largefov.dropout, nn.Dropout) and largefov.dropout.p == 0.5
    v2 = build_segmentor("deeplabv2", K, backbone=tiny()).eval()
    assert [c.dilation[0] for c in v2.decode_head.aspp_modules] == [6, 12, 18, 24]
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        feats = v2.backbone(x)
        assert torch.allclose(v2(x)["out"], sum(c(feats[-1]) for c in v2.decode_head.aspp_modules))
    v3 = build_segmentor("deeplabv3", K, backbone=tiny(), **SMALL["deeplabv3"]).decode_head
    assert [m.conv.dilation[0] for m in v3.aspp_modules] == [1, 12, 24, 36]
    assert v3.aspp_modules[0].conv.kernel_size == (1, 1) and v3.bottleneck.conv.kernel_size == (3, 3)
    plus = build_segmentor("deeplabv3plus", K, backbone=tiny(), **SMALL["deeplabv3plus"]).decode_head
    assert isinstance(plus.aspp_modules[1], DepthwiseSeparableConvModule)
    assert plus.c1_bottleneck.conv.in_channels == 8     # stage-1 channels of tiny(width=8)
