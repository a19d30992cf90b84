"""pipeline.attention_eval on a co-attention whose matching is known by construction."""

import math

import numpy as np
import pytest
import torch

from models.coattention import CoAttentionClassifier
from pipeline.attention_eval import attention_diagnostics, plan_triples


class Images:
    """Images whose red channel is 255 on the object (class 0, mask value 1), 0 elsewhere."""

    def __init__(self, masks):
        self.masks = masks

    def load_image(self, item):
        image = np.zeros(self.masks[item].shape + (3,), np.uint8)
        image[..., 0] = np.where(self.masks[item] == 1, 255, 0)
        return image

    def load_mask(self, item):
        return self.masks[item]


def indicator_model(scale: float) -> CoAttentionClassifier:
    """Features = scale x [object, not object] per pixel; W_P = identity, so P_xj = scale^2
    when x and j are both object or both not, 0 otherwise; phi_c reads the object channel."""
    model = CoAttentionClassifier(num_classes=1, backbone="tiny", feature_channels=2)
    model.features = lambda x: scale * torch.stack([(x[:, 0] > 0), (x[:, 0] <= 0)], 1).float()
    with torch.no_grad():
        model.w_p.weight.copy_(torch.eye(2))
        model.class_conv.weight.copy_(torch.tensor([[1.0, 0.0]]).view(1, 2, 1, 1))
    return model


def masks_8x8():
    a = np.zeros((8, 8), np.uint8)
    a[:4, :4] = 1                       # 16 object pixels of 64
    b = np.zeros((8, 8), np.uint8)
    b[:, :2] = 1                        # 16 object pixels of 64
    b[7, 7] = 255                       # void pixel of the partner: not object
    return {"a": a, "b": b}


def test_matching_attention_lands_on_the_object():
    masks = masks_8x8()
    out = attention_diagnostics(indicator_model(10.0), Images(masks), [("a", 0, "b")], image_size=8)
    assert out["pairs"] == 1
    assert out["on_object"] == pytest.approx(1.0, abs=1e-6)     # P = 100 vs 0: softmax one-hot on the type
    assert out["off_object"] == pytest.approx(0.0, abs=1e-6)
    assert out["uniform"] == pytest.approx(16 / 64)
    # object rows spread evenly over R's 16 object pixels, the others over its 48 non-object ones
    expected_entropy = (16 * math.log(16) + 48 * math.log(48)) / 64 / math.log(64)
    assert out["entropy"] == pytest.approx(expected_entropy, abs=1e-5)
    assert out["logit_on"] == pytest.approx(10.0, abs=1e-5)
    assert out["logit_off"] == pytest.approx(0.0, abs=1e-5)


def test_flat_attention_gives_the_uniform_share():
    masks = masks_8x8()
    out = attention_diagnostics(indicator_model(1e-4), Images(masks), [("a", 0, "b")], image_size=8)
    assert out["on_object"] == pytest.approx(16 / 64, abs=1e-4)
    assert out["off_object"] == pytest.approx(16 / 64, abs=1e-4)
    assert out["entropy"] == pytest.approx(1.0, abs=1e-4)


def test_triples_without_object_are_skipped_and_plan_is_flattened():
    masks = masks_8x8()
    masks["empty"] = np.zeros((8, 8), np.uint8)
    out = attention_diagnostics(indicator_model(10.0), Images(masks), [("a", 0, "empty"), ("empty", 0, "a")], 8)
    assert out["pairs"] == 0 and out["on_object"] == 0.0

    class Plan:
        classes = {"a": [0, 2], "b": [0]}
        related = {"a": {0: ["b", "b"], 2: []}, "b": {0: ["a"]}}
    assert plan_triples(Plan) == [("a", 0, "b"), ("a", 0, "b"), ("b", 0, "a")]
