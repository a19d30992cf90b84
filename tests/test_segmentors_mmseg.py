"""mmseg compatibility: parameter names of the model zoo's checkpoints, and the loader."""

import pytest
import torch

from models.backbones import Backbone, build_backbone
from models.segmentors import build_segmentor
from models.segmentors.mmseg_convert import CheckpointMismatch, convert_mmseg_state_dict, load_mmseg_checkpoint


class _Levels(Backbone):
    channels = (256, 512, 1024, 2048)


# Keys (and shapes) of mmseg 1.x R-101-D8 VOC checkpoints at 21 classes, from the mmseg head sources.
MMSEG_KEYS = {
    "fcn": {"decode_head.convs.0.conv.weight": (512, 2048, 3, 3),
            "decode_head.convs.1.bn.running_var": (512,),
            "decode_head.conv_cat.conv.weight": (512, 2560, 3, 3),
            "decode_head.conv_seg.bias": (21,),
            "auxiliary_head.convs.0.conv.weight": (256, 1024, 3, 3),
            "auxiliary_head.conv_seg.weight": (21, 256, 1, 1)},
    "pspnet": {"decode_head.psp_modules.0.1.conv.weight": (512, 2048, 1, 1),
               "decode_head.psp_modules.3.1.bn.weight": (512,),
               "decode_head.bottleneck.conv.weight": (512, 4096, 3, 3)},
    "deeplabv3": {"decode_head.image_pool.1.conv.weight": (512, 2048, 1, 1),
                  "decode_head.aspp_modules.0.conv.weight": (512, 2048, 1, 1),
                  "decode_head.aspp_modules.3.conv.weight": (512, 2048, 3, 3),
                  "decode_head.bottleneck.conv.weight": (512, 2560, 3, 3)},
    "deeplabv3plus": {"decode_head.aspp_modules.1.depthwise_conv.conv.weight": (2048, 1, 3, 3),
                      "decode_head.aspp_modules.1.pointwise_conv.bn.bias": (512,),
                      "decode_head.c1_bottleneck.conv.weight": (48, 256, 1, 1),
                      "decode_head.sep_bottleneck.0.depthwise_conv.conv.weight": (560, 1, 3, 3),
                      "decode_head.sep_bottleneck.1.pointwise_conv.conv.weight": (512, 512, 1, 1)},
    "danet": {"decode_head.pam_in_conv.conv.weight": (512, 2048, 3, 3),
              "decode_head.pam.query_project.weight": (64, 512, 1, 1),
              "decode_head.pam.key_project.bias": (64,),
              "decode_head.pam.value_project.weight": (512, 512, 1, 1),
              "decode_head.pam.gamma.scale": (),
              "decode_head.cam.gamma.scale": (),
              "decode_head.pam_out_conv.bn.weight": (512,),
              "decode_head.cam_out_conv.conv.weight": (512, 512, 3, 3),
              "decode_head.pam_conv_seg.weight": (21, 512, 1, 1),
              "decode_head.cam_conv_seg.bias": (21,),
              "decode_head.conv_seg.weight": (21, 512, 1, 1)},
    "ocrnet": {"decode_head.0.convs.0.conv.weight": (256, 1024, 3, 3),
               "decode_head.0.conv_seg.weight": (21, 256, 1, 1),
               "decode_head.1.bottleneck.conv.weight": (512, 2048, 3, 3),
               "decode_head.1.object_context_block.query_project.0.conv.weight": (256, 512, 1, 1),
               "decode_head.1.object_context_block.query_project.1.bn.weight": (256,),
               "decode_head.1.object_context_block.key_project.1.conv.weight": (256, 256, 1, 1),
               "decode_head.1.object_context_block.value_project.conv.weight": (256, 512, 1, 1),
               "decode_head.1.object_context_block.out_project.conv.weight": (512, 256, 1, 1),
               "decode_head.1.object_context_block.bottleneck.conv.weight": (512, 1024, 1, 1),
               "decode_head.1.conv_seg.weight": (21, 512, 1, 1)},
}


@pytest.mark.parametrize("name", sorted(MMSEG_KEYS))
def test_head_parameter_names_match_mmseg(name):
    state = build_segmentor(name, 21, backbone=_Levels()).state_dict()
    for key, shape in MMSEG_KEYS[name].items():
        assert key in state, key
        assert tuple(state[key].shape) == shape, key


def test_deep_stem_backbone_names_match_resnet_v1c():
    state = build_backbone("resnet50", deep_stem=True).state_dict()
    expected = {"stem.0.weight": (32, 3, 3, 3), "stem.1.running_mean": (32,), "stem.3.weight": (32, 32, 3, 3),
                "stem.6.weight": (64, 32, 3, 3), "stem.7.bias": (64,), "layer1.0.downsample.0.weight": (256, 64, 1, 1),
                "layer3.5.conv2.weight": (256, 256, 3, 3), "layer4.2.bn3.running_var": (2048,)}
    for key, shape in expected.items():
        assert tuple(state[key].shape) == shape, key


def _small(num_classes=4):
    return build_segmentor("pspnet", num_classes, backbone=build_backbone("tiny", width=8),
                           channels=8, aux_channels=8)


def test_wrapped_ddp_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    source = _small().eval()
    with torch.no_grad():
        source.decode_head.conv_seg.bias.normal_()
    ckpt = {"meta": {"mmseg_version": "1.2.2", "iter": 20000},
            "state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}
    path = tmp_path / "iter_20000.pth"
    torch.save(ckpt, path)
    torch.manual_seed(1)
    target = load_mmseg_checkpoint(_small(), path).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(target(x)["out"], source(x)["out"])


def test_mismatches_are_reported_before_loading(tmp_path):
    model = _small()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointMismatch, match="has 6 classes .*conv_seg.* model has 4"):
        convert_mmseg_state_dict(_small(6).state_dict(), model)
    partial = {k: v for k, v in _small().state_dict().items() if not k.startswith("auxiliary_head")}
    partial["decode_head.extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointMismatch, match="missing: auxiliary_head.*unexpected: decode_head.extra"):
        convert_mmseg_state_dict(partial, model)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_mmseg_checkpoint(model, tmp_path / "nope.pth")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_torchvision_stem_gets_a_deep_stem_hint():
    mmseg_like = build_backbone("resnet50", deep_stem=True).state_dict()
    model = build_segmentor("fcn", 21, backbone="resnet50")   # 7x7 torchvision stem
    state = {f"backbone.{k}": v for k, v in mmseg_like.items()}
    state.update({k: v for k, v in model.state_dict().items() if not k.startswith("backbone.")})
    with pytest.raises(CheckpointMismatch, match="deep_stem"):
        convert_mmseg_state_dict(state, model)
