import pytest
import torch

from models.coattention import CoAttentionClassifier, mcis_losses, pair_targets, self_pair_losses

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
    assert set(losses) == {"basic", "co_att", "con_co_att"}
    for name in ("basic", "co_att", "con_co_att"):
        model.zero_grad()
        losses[name].backward(retain_graph=True)
        grads = {n: p.grad for n, p in model.named_parameters()}
        assert grads["backbone.stages.0.0.weight"].abs().sum() > 0, name
        if name == "basic":
            assert grads["cam_head.weight"].abs().sum() > 0
            assert grads["class_conv.weight"] is None  # L_basic does not touch the co-att branch
        if name == "co_att":
            assert grads["w_p.weight"].abs().sum() > 0 and grads["class_conv.weight"].abs().sum() > 0
        if name == "con_co_att":
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


def test_loss_values_match_multilabel_soft_margin():
    s = torch.tensor([[2.0, -1.0]])
    out = {"s_m": s, "s_n": s, "s_co_m": s, "s_co_n": s, "s_con_m": s, "s_con_n": s}
    l_m, l_n = torch.tensor([[1.0, 0]]), torch.tensor([[0.0, 1]])

    def ce(x, y):  # -mean(y log sig(x) + (1-y) log sig(-x))
        return -(y * torch.nn.functional.logsigmoid(x) + (1 - y) * torch.nn.functional.logsigmoid(-x)).mean()

    losses = mcis_losses(out, l_m, l_n, contrastive=True)
    assert torch.isclose(losses["basic"], ce(s, l_m) + ce(s, l_n))
    assert torch.isclose(losses["co_att"], 2 * ce(s, torch.zeros(1, 2)))
    assert torch.isclose(losses["con_co_att"], ce(s, l_m) + ce(s, l_n))
    assert "con_co_att" not in mcis_losses(out, l_m, l_n, contrastive=False)
    sp = self_pair_losses(out, l_m)
    assert torch.isclose(sp["co_att"], 2 * ce(s, l_m)) and torch.isclose(sp["basic"], ce(s, l_m))


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
