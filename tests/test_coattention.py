import pytest
import torch

import math

import torch.nn.functional as F

from models.coattention import (CoAttentionClassifier, contrastive_switches, mcis_losses,
                                pair_targets, self_pair_losses)

K = 4


@pytest.fixture
def model():
    torch.manual_seed(0)
    return CoAttentionClassifier(K, backbone="tiny", feature_channels=16,
                                 backbone_options={"width": 8})


def test_pair_forward_shapes(model):
    out = model(torch.randn(2, 3, 32, 32), torch.randn(2, 3, 48, 40))
    assert out["cam_m"].shape == (2, K, 4, 4) and out["cam_n"].shape == (2, K, 6, 5)
    assert out["co_m"].shape == (2, K, 4, 4) and out["co_n"].shape == (2, K, 6, 5)
    assert out["con_m"].shape == (2, K, 4, 4) and out["con_n"].shape == (2, K, 6, 5)
    assert out["gate_m"].shape == (2, 1, 4, 4) and out["gate_n"].shape == (2, 1, 6, 5)
    assert ((out["gate_m"] >= 0) & (out["gate_m"] <= 1)).all()
    for key in ("s_m", "s_n", "s_co_m", "s_co_n", "s_con_m", "s_con_n"):
        assert out[key].shape == (2, K)
    assert out["attn_n"].shape == (2, 16, 30) and out["attn_m"].shape == (2, 30, 16)


def test_softmax_directions_sum_to_one(model):
    out = model(torch.randn(1, 3, 32, 32), torch.randn(1, 3, 48, 40))
    # A_n: over image m's positions (dim 1, size HW_m = 16); A_m: over image n's (size 30)
    assert torch.allclose(out["attn_n"].sum(1), torch.ones(1, 30), atol=1e-5)
    assert torch.allclose(out["attn_m"].sum(1), torch.ones(1, 16), atol=1e-5)
    # the other axis does not sum to one in general
    assert not torch.allclose(out["attn_n"].sum(2), torch.ones(1, 16), atol=1e-3)


def test_co_attention_equations_by_hand(model):
    torch.manual_seed(1)
    f_m, f_n = torch.randn(1, 16, 2, 3), torch.randn(1, 16, 3, 1)
    co_m, co_n, a_m, a_n = model.co_attention(f_m, f_n)
    fm, fn = f_m[0].flatten(1), f_n[0].flatten(1)             # C x HW
    p = fm.T @ model.w_p.weight.T @ fn                         # P = F_m^T W_P^T F_n (code's W_P side)
    a_n_ref = torch.softmax(p, dim=0)
    a_m_ref = torch.softmax(p.T, dim=0)
    assert torch.allclose(a_n[0], a_n_ref, atol=1e-5) and torch.allclose(a_m[0], a_m_ref, atol=1e-5)
    assert torch.allclose(co_n[0].flatten(1), fm @ a_n_ref, atol=1e-5)
    assert torch.allclose(co_m[0].flatten(1), fn @ a_m_ref, atol=1e-5)
    # contrastive features are the image's own features times (1 - gate)
    out = model.pair(f_m, f_n)
    gate = torch.sigmoid(torch.einsum("oc,chw->ohw", model.w_b.weight[:, :, 0, 0], co_m[0]))
    expected = model.class_conv(f_m * (1 - gate))
    assert torch.allclose(out["con_m"], expected, atol=1e-5)


def test_gradients_reach_every_branch(model):
    l_m = torch.tensor([[1.0, 1, 0, 0], [0, 1, 0, 0]])
    l_n = torch.tensor([[1.0, 0, 1, 0], [0, 1, 0, 1]])
    out = model(torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32))
    losses = mcis_losses(out, l_m, l_n, contrastive=True)
    assert set(losses) == {"basic", "co_att", "con_m", "con_n"}
    for name in ("basic", "co_att", "con_m", "con_n"):
        model.zero_grad()
        losses[name].backward(retain_graph=True)
        grads = {n: p.grad for n, p in model.named_parameters()}
        assert grads["backbone.stages.0.0.weight"].abs().sum() > 0, name
        if name == "basic":
            assert grads["cam_head.weight"].abs().sum() > 0
            assert grads["class_conv.weight"] is None  # L_basic does not touch the co-att branch
        if name == "co_att":
            assert grads["w_p.weight"].abs().sum() > 0 and grads["class_conv.weight"].abs().sum() > 0
        if name.startswith("con_"):
            assert grads["w_b.weight"].abs().sum() > 0 and grads["w_p.weight"].abs().sum() > 0


def test_targets_on_crafted_label_pairs():
    disjoint_m, disjoint_n = torch.tensor([[1.0, 0, 0, 0]]), torch.tensor([[0.0, 1, 1, 0]])
    shared, only_m, only_n = pair_targets(disjoint_m, disjoint_n)
    assert shared.sum() == 0                              # no shared label -> no co-att positives
    assert torch.equal(only_m, disjoint_m) and torch.equal(only_n, disjoint_n)
    same = torch.tensor([[0.0, 1, 0, 1]])
    shared, only_m, only_n = pair_targets(same, same)
    assert torch.equal(shared, same) and only_m.sum() == 0 and only_n.sum() == 0
    partial_m, partial_n = torch.tensor([[1.0, 1, 0, 0]]), torch.tensor([[0.0, 1, 1, 0]])
    shared, only_m, only_n = pair_targets(partial_m, partial_n)
    assert shared.tolist() == [[0, 1, 0, 0]] and only_m.tolist() == [[1, 0, 0, 0]] \
        and only_n.tolist() == [[0, 0, 1, 0]]


def _mlsm(x, y):
    """MLSM by hand: -mean over classes, then rows, of y log sig(x) + (1-y) log sig(-x)."""
    return -(y * F.logsigmoid(x) + (1 - y) * F.logsigmoid(-x)).mean(1).mean(0)


def _official_pair_losses(score1, score2, co1, co2, comple1, comple2, label1, label2):
    """Transcription of the official train.py (GuoleiSun/MCIS_wsss, Classifier/scripts):
    logits = cat[score1, score2]; co_logits = cat[co_score1, co_score2, comple1, comple2]."""
    b = score1.shape[0]
    logits, co_logits = torch.cat([score1, score2]), torch.cat([co1, co2, comple1, comple2])
    label = torch.cat([label1, label2])
    label_new = label1 + label2
    label_new = (label_new == 2).float()
    label1_comple, label2_comple = label1 - label_new, label2 - label_new
    label_new = torch.cat([label_new, label_new])
    return {"loss_val1": F.multilabel_soft_margin_loss(logits, label),
            "loss_val2": F.multilabel_soft_margin_loss(co_logits[:2 * b], label_new),
            "loss_val1_comple": F.multilabel_soft_margin_loss(co_logits[2 * b:3 * b], label1_comple),
            "loss_val2_comple": F.multilabel_soft_margin_loss(co_logits[3 * b:], label2_comple)}


def test_losses_equal_the_official_averaging_on_a_fixed_batch():
    g = torch.Generator().manual_seed(5)
    b, k = 3, 6
    out = {key: 3 * torch.randn(b, k, generator=g)
           for key in ("s_m", "s_n", "s_co_m", "s_co_n", "s_con_m", "s_con_n")}
    l_m = (torch.rand(b, k, generator=g) > 0.5).float()
    l_n = (torch.rand(b, k, generator=g) > 0.5).float()
    ours = mcis_losses(out, l_m, l_n, contrastive=True)
    ref = _official_pair_losses(out["s_m"], out["s_n"], out["s_co_m"], out["s_co_n"],
                                out["s_con_m"], out["s_con_n"], l_m, l_n)
    assert torch.isclose(ours["basic"], ref["loss_val1"], atol=1e-6)
    assert torch.isclose(ours["co_att"], ref["loss_val2"], atol=1e-6)
    assert torch.isclose(ours["con_m"], ref["loss_val1_comple"], atol=1e-6)
    assert torch.isclose(ours["con_n"], ref["loss_val2_comple"], atol=1e-6)
    # and by hand: L_basic is the mean of the two images' B-means, not their sum
    assert torch.isclose(ours["basic"], (_mlsm(out["s_m"], l_m) + _mlsm(out["s_n"], l_n)) / 2, atol=1e-6)
    assert "con_m" not in mcis_losses(out, l_m, l_n, contrastive=False)


def test_self_pair_losses_cover_the_image_and_its_copy():
    """Official: loss_val2_1 = MLSM(cat[score(I), score(copy)], cat[l1, l1]) and loss_val2_2
    = MLSM(cat[co_score1, co_score2], cat[l1, l1]): L_basic of *both* images."""
    g = torch.Generator().manual_seed(6)
    out = {key: 2 * torch.randn(2, 4, generator=g) for key in ("s_m", "s_n", "s_co_m", "s_co_n")}
    labels = torch.tensor([[1.0, 0, 1, 0], [0, 0, 0, 1]])
    sp = self_pair_losses(out, labels)
    assert torch.isclose(sp["basic"], (_mlsm(out["s_m"], labels) + _mlsm(out["s_n"], labels)) / 2, atol=1e-6)
    assert torch.isclose(sp["co_att"], (_mlsm(out["s_co_m"], labels) + _mlsm(out["s_co_n"], labels)) / 2,
                         atol=1e-6)
    changed = dict(out, s_m=out["s_m"] + 1.0)          # the image's own score enters L_basic
    assert not torch.isclose(self_pair_losses(changed, labels)["basic"], sp["basic"])


def test_contrastive_rule_is_per_side():
    """Official: ``if (label1_comple > 0).any(): add loss_val1_comple``, and separately for 2."""
    l_m = torch.tensor([[1.0, 1, 0], [0, 1, 0]])
    l_n = torch.tensor([[1.0, 1, 0], [0, 1, 1]])         # n has an unshared label, m has none
    assert contrastive_switches(l_m, l_n) == (False, True)
    assert contrastive_switches(l_n, l_m) == (True, False)
    assert contrastive_switches(l_m, l_m) == (False, False)
    assert contrastive_switches(torch.tensor([[1.0, 0, 0]]), torch.tensor([[0.0, 1, 0]])) == (True, True)


def test_official_initialisation_spreads():
    """VGG_coattention._initialize_weights: conv std sqrt(2 / (k k C_out)) for the extra convs
    and the CAM head; W_P (nn.Linear), extra_gate and extra_gate_merge keep PyTorch's default
    uniform(-1/sqrt(C_in), 1/sqrt(C_in)), std 1/sqrt(3 C_in)."""
    torch.manual_seed(0)
    model = CoAttentionClassifier(20, backbone="tiny", feature_channels=512, backbone_options={"width": 8})
    assert model.cam_head.weight.std().item() == pytest.approx(math.sqrt(2 / 20), rel=0.05)
    assert model.cam_head.bias.abs().max().item() == 0.0
    for conv in (m for m in model.extra if isinstance(m, torch.nn.Conv2d)):
        assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / (9 * 512)), rel=0.05)
    for layer in (model.w_p, model.class_conv, model.w_b):
        assert layer.weight.std().item() == pytest.approx(1 / math.sqrt(3 * 512), rel=0.1)
        assert layer.weight.abs().max().item() <= 1 / math.sqrt(512) + 1e-7
    fan_in = CoAttentionClassifier(20, backbone="tiny", feature_channels=512,
                                   backbone_options={"width": 8}, init="kaiming_fan_in")
    assert fan_in.cam_head.weight.std().item() == pytest.approx(math.sqrt(2 / 512), rel=0.05)
    assert fan_in.w_p.weight.std().item() == pytest.approx(math.sqrt(2 / 512), rel=0.05)
    with pytest.raises(ValueError, match="init"):
        CoAttentionClassifier(2, backbone="tiny", init="xavier")


def test_affinity_is_float32_under_autocast(model):
    """The unscaled P runs in float32 even under autocast (bfloat16 on CPU here)."""
    torch.manual_seed(3)
    f_m, f_n = 4 * torch.randn(1, 16, 2, 3), 4 * torch.randn(1, 16, 3, 1)
    with torch.no_grad():
        _, _, _, ref = model.co_attention(f_m, f_n)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, _, _, auto = model.co_attention(f_m.bfloat16(), f_n.bfloat16())
    assert auto.dtype == torch.float32
    p32 = F.linear(f_m.bfloat16().float().flatten(2).transpose(1, 2), model.w_p.weight) \
        @ f_n.bfloat16().float().flatten(2)
    assert torch.allclose(auto, torch.softmax(p32, dim=1), atol=1e-5)


def test_param_groups_official_multipliers(model):
    groups = {g["name"]: g for g in model.param_groups(1e-3, 5e-4)}
    assert groups["bb_w"]["lr"] == pytest.approx(1e-3)
    assert groups["new_w"]["lr"] == pytest.approx(1e-2) and groups["new_b"]["lr"] == pytest.approx(2e-2)
    assert groups["bb_b"]["lr"] == pytest.approx(2e-3)
    counted = sum(len(g["params"]) for g in groups.values())
    assert counted == len(list(model.parameters()))
    assert any(p is model.w_p.weight for p in groups["new_w"]["params"])


def test_bad_class_count():
    with pytest.raises(ValueError, match="num_classes"):
        CoAttentionClassifier(0, backbone="tiny")


def test_param_groups_new_layer_multiplier(model):
    groups = {g["name"]: g for g in model.param_groups(1e-3, 1e-4, new_mult=1.0)}
    assert groups["new_w"]["lr"] == pytest.approx(1e-3) and groups["new_b"]["lr"] == pytest.approx(2e-3)
    assert groups["bb_w"]["lr"] == pytest.approx(1e-3) and groups["new_w"]["weight_decay"] == 1e-4
    with pytest.raises(ValueError, match="new_mult"):
        model.param_groups(1e-3, 1e-4, new_mult=0.0)


def test_scaled_affinity_is_p_over_sqrt_c(model):
    scaled = CoAttentionClassifier(K, backbone="tiny", feature_channels=16,
                                   backbone_options={"width": 8}, scale_affinity=True)
    scaled.load_state_dict(model.state_dict())
    torch.manual_seed(2)
    f_m, f_n = torch.randn(1, 16, 2, 3), torch.randn(1, 16, 3, 1)
    p = model.w_p(f_m.flatten(2).transpose(1, 2)) @ f_n.flatten(2)          # (1, 6, 3)
    _, _, a_m, a_n = scaled.co_attention(f_m, f_n)
    assert torch.allclose(a_n, torch.softmax(p / 4.0, dim=1), atol=1e-6)     # sqrt(16) = 4
    assert torch.allclose(a_m, torch.softmax(p.transpose(1, 2) / 4.0, dim=1), atol=1e-6)
    _, _, _, a_n_official = model.co_attention(f_m, f_n)
    assert torch.allclose(a_n_official, torch.softmax(p, dim=1), atol=1e-6)


def test_tiny_backbone_dilations():
    from models.backbones import BackboneError, build_backbone
    net = build_backbone("tiny", width=8, dilations=[1, 1])
    dil = [m.dilation for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert dil[-4:] == [(1, 1)] * 4
    default = [m.dilation for m in build_backbone("tiny", width=8).modules()
               if isinstance(m, torch.nn.Conv2d)]
    assert default[-4:] == [(2, 2), (2, 2), (4, 4), (4, 4)]
    assert net(torch.randn(1, 3, 32, 32))[-1].shape == (1, 32, 4, 4)
    with pytest.raises(BackboneError, match="dilations"):
        build_backbone("tiny", width=8, dilations=[0, 1])
