"""Device placement on a CPU-only machine: the stage-1 step and the stage-2 map rules run on
fake CUDA tensors (FakeTensorMode raises on any CPU/CUDA mix, as a real GPU run would). Only
the model is built under ``torch.device("cuda")``; the code under test runs with the default
device left at CPU, so a tensor created without ``device=`` lands on the CPU and raises."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from models.coattention import CoAttentionClassifier
from stages import generate_cams as g
from stages.train_classifier import PairTrainer


CUDA = torch.device("cuda")


@pytest.fixture
def fake_cuda():
    with FakeTensorMode(allow_non_fake_inputs=False):
        yield


def _model():
    with CUDA:
        return CoAttentionClassifier(3, backbone="tiny", feature_channels=16, backbone_options={"width": 8})


def _randn(*shape):
    return torch.randn(*shape, device=CUDA)


def test_the_harness_catches_a_cpu_tensor_mixed_with_cuda(fake_cuda):
    """The bug of the old stage 2 (a CPU accumulator plus CUDA maps) raises here."""
    maps = _randn(2, 6, 6)
    with pytest.raises(Exception, match="(?i)device"):
        torch.zeros(2, 6, 6) + maps


def test_training_step_on_fake_cuda(fake_cuda):
    trainer = PairTrainer(_model(), self_pairs=True)
    x_m, x_n = _randn(2, 3, 32, 32), _randn(2, 3, 32, 32)
    copies = [_randn(2, 3, 32, 32), _randn(2, 3, 24, 24), _randn(2, 3, 64, 64)]
    l_m, l_n = torch.ones(2, 3, device=CUDA), torch.zeros(2, 3, device=CUDA)
    terms = trainer(x_m, x_n, copies, l_m, l_n, 1.0, 0.0)
    assert all(v.device.type == "cuda" for v in terms.values())


def test_stage2_rules_on_fake_cuda(fake_cuda):
    model = _model().eval()
    x = _randn(1, 3, 48, 48)
    f = model.features(x)
    copies = [model.features(_randn(1, 3, s, s)) for s in (48, 36, 96)]
    partners = {"a": model.features(_randn(1, 3, 48, 48)), "b": model.features(_randn(1, 3, 40, 40))}
    related = {0: ["a", "b"], 2: []}
    maps = g.official_maps(model, f, copies, [0, 2], related, partners, 3)
    assert maps.device.type == "cuda" and maps.shape == (2, 6, 6)
    feats = g.view_features(model, x, [g.BASE_VIEW, *g.SELF_VIEWS, (0.5, True)])
    multi = g.mcis_maps(model, feats, [g.BASE_VIEW, (0.5, True)], [0, 2], related, partners, (6, 6), True)
    cams = g.plain_cams(model, feats, [g.BASE_VIEW, (0.5, True)], [0, 2], (6, 6))
    assert multi.device.type == "cuda" and cams.device.type == "cuda"
