"""HRNetV2 (Wang et al., "Deep High-Resolution Representation Learning for Visual
Recognition", TPAMI 2020) as a segmentation backbone, its FCN head (``fcn_hrnet``) and
OCRNet on HRNet (``ocrnet_hrnet``, Yuan et al. ECCV 2020's headline configuration).

Backbone (mmseg's ``HRNet``, child names as mmseg and the MSRA checkpoints):

* stem: two 3x3 stride-2 convs 3 -> 64 -> 64 (``conv1/bn1``, ``conv2/bn2``) -> 1/4;
* stage 1 (``layer1``): 4 Bottlenecks (64 -> 256);
* stages 2/3/4: 1/4/3 multi-resolution modules (``HRModule``) with 2/3/4 parallel branches
  of width (W, 2W, 4W, 8W) at strides (4, 8, 16, 32), 4 BasicBlocks per branch and module;
  new branches come from ``transition<k>`` (3x3 stride-2 conv + BN + ReLU from the lowest
  resolution), channel changes of existing branches from 3x3 conv + BN + ReLU;
* fusion at the end of each module (exchange across resolutions): output branch i is
  ``ReLU(Σ_j T_ij(x_j))`` with ``T_ii = id``; for j > i ``T_ij`` = 1x1 conv + BN +
  bilinear ×2^(j-i) upsampling (``align_corners=False``), then a bilinear resize to x_i's
  size where the two differ (odd sizes: ``⌈h/2⌉·2 ≠ h``); for j < i ``T_ij`` = (i - j) 3x3
  stride-2 convs + BN (ReLU between them, none after the last). This is mmseg's fusion
  exactly (its ``Upsample`` then ``resize``); bilinear upsampling by 2^k with
  ``align_corners=False`` samples output pixel ``o`` at input coordinate
  ``(o + 0.5) / 2^k - 0.5``, clamped to the border. The paper upsamples before the 1x1
  conv; convolving first (mmseg, the official code) is the same map in eval mode (bilinear
  interpolation commutes with a 1x1 conv and BN's per-channel affine) at 4^(j-i) x less work.

W18: 18/36/72/144 (270-channel concatenation), W48: 48/96/192/384 (720).
**HRNetV2 representation**: the four outputs bilinearly upsampled (``align_corners=False``,
as mmseg; the HRNet repository uses ``True``) to 1/4 and concatenated (mmseg's
``resize_concat`` input transform; ``concat=True`` here).

Heads:

* ``fcn_hrnet``: ``y = cls(CBR_1x1(concat))`` (C -> C -> K, no dropout), logits at 1/4, no
  auxiliary head; ``L = CE(y)``. W48: backbone 65.33 M + head 0.53 M = 65.86 M at 21
  classes (models.md); W18: 9.56 + 0.08 = 9.64 M.
* ``ocrnet_hrnet``: cascade of the soft-region head ``cls(CBR_1x1(concat))`` (C -> C, mmseg's
  HRNet config; openseg uses a 3x3 conv there) and the OCR head of :mod:`.ocrnet` (3x3
  ConvModule C -> 512, spatial gather, object attention 256, fusion, cls; no dropout as in
  mmseg's HRNet configs). ``L = CE(y) + 0.4 CE(y_regions)``. W48: 65.33 M + 5.05 M =
  70.37 M (models.md), W18: 9.56 + 2.52 = 12.08 M.

ImageNet weights: the MSRA HRNetV2 checkpoints mmseg uses (``open-mmlab://msra/hrnetv2_w18``,
``..._w48``) from the torch hub cache or downloaded when reachable; a clear error otherwise.
Their classification-only parts (``incre_modules``, ``downsamp_modules``, ``final_layer``,
``classifier``) are ignored. ``weights_path`` loads a local checkpoint instead.
``hrnet_tiny`` (width 8, one module and one block per stage) is for tests.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.segmentors import register
from models.segmentors.layers import EncoderDecoder, FCNHead, make_backbone

HRNET_URLS = {
    "hrnet_w18": "https://download.openmmlab.com/pretrain/third_party/hrnetv2_w18-00eb2006.pth",
    "hrnet_w48": "https://download.openmmlab.com/pretrain/third_party/hrnetv2_w48-d2186c55.pth",
}


@dataclass(frozen=True)
class HRNetArch:
    width: int
    num_modules: tuple[int, int, int, int] = (1, 1, 4, 3)
    num_blocks: int = 4


HRNET_ARCHS = {
    "hrnet_w18": HRNetArch(18),
    "hrnet_w48": HRNetArch(48),
    "hrnet_tiny": HRNetArch(8, (1, 1, 1, 1), 1),
}
HRNET_ALIASES = {"tiny": "hrnet_tiny", "hrnetv2_w18": "hrnet_w18", "hrnetv2_w48": "hrnet_w48"}


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, 1, bias=False)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride, 0, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1, self.bn1 = _conv3x3(inplanes, planes, stride), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = _conv3x3(planes, planes), nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1, self.bn1 = _conv1x1(inplanes, planes), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = _conv3x3(planes, planes, stride), nn.BatchNorm2d(planes)
        self.conv3, self.bn3 = _conv1x1(planes, planes * 4), nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def _make_layer(block, inplanes: int, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
    downsample = None
    if stride != 1 or inplanes != planes * block.expansion:
        downsample = nn.Sequential(_conv1x1(inplanes, planes * block.expansion, stride),
                                   nn.BatchNorm2d(planes * block.expansion))
    layers = [block(inplanes, planes, stride, downsample)]
    layers += [block(planes * block.expansion, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


class BilinearUpsample(nn.Module):
    """Bilinear upsampling by an integer ``scale`` (``align_corners=False``) to
    ``(scale·h, scale·w)``, as mmseg's ``Upsample(scale_factor=scale, mode='bilinear')``."""

    def __init__(self, scale: int):
        super().__init__()
        self.scale = int(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        return F.interpolate(x, size=(h * self.scale, w * self.scale), mode="bilinear", align_corners=False)

    def extra_repr(self) -> str:
        return f"scale={self.scale}"


class HRModule(nn.Module):
    """Parallel branches of BasicBlocks followed by the multi-resolution fusion."""

    def __init__(self, channels: list[int], num_blocks: int, multiscale_output: bool = True):
        super().__init__()
        self.num_branches = len(channels)
        self.branches = nn.ModuleList(_make_layer(BasicBlock, c, c, num_blocks) for c in channels)
        self.fuse_layers = self._make_fuse_layers(channels, multiscale_output) if self.num_branches > 1 else None
        self.relu = nn.ReLU(inplace=False)

    @staticmethod
    def _make_fuse_layers(channels: list[int], multiscale_output: bool) -> nn.ModuleList:
        n = len(channels)
        fuse_layers = []
        for i in range(n if multiscale_output else 1):
            row = []
            for j in range(n):
                if j > i:
                    row.append(nn.Sequential(_conv1x1(channels[j], channels[i]), nn.BatchNorm2d(channels[i]),
                                             BilinearUpsample(2 ** (j - i))))
                elif j == i:
                    row.append(None)
                else:
                    steps = []
                    for k in range(i - j):
                        if k == i - j - 1:
                            steps.append(nn.Sequential(_conv3x3(channels[j], channels[i], 2),
                                                       nn.BatchNorm2d(channels[i])))
                        else:
                            steps.append(nn.Sequential(_conv3x3(channels[j], channels[j], 2),
                                                       nn.BatchNorm2d(channels[j]), nn.ReLU(inplace=False)))
                    row.append(nn.Sequential(*steps))
            fuse_layers.append(nn.ModuleList(row))
        return nn.ModuleList(fuse_layers)

    def forward(self, x: list[torch.Tensor]) -> list[torch.Tensor]:
        x = [branch(xi) for branch, xi in zip(self.branches, x)]
        if self.fuse_layers is None:
            return x
        out = []
        for i, row in enumerate(self.fuse_layers):
            y = None
            for j in range(self.num_branches):  # summed in branch order, as mmseg
                t = x[j] if j == i else row[j](x[j])
                if j > i and t.shape[-2:] != x[i].shape[-2:]:  # odd sizes: x2^k overshoots
                    t = F.interpolate(t, size=x[i].shape[-2:], mode="bilinear", align_corners=False)
                y = t if y is None else y + t
            out.append(self.relu(y))
        return out


def _make_transition(pre: list[int], cur: list[int]) -> nn.ModuleList:
    layers = []
    for i, c in enumerate(cur):
        if i < len(pre):
            layers.append(None if c == pre[i] else nn.Sequential(
                _conv3x3(pre[i], c), nn.BatchNorm2d(c), nn.ReLU(inplace=True)))
        else:
            steps = []
            for j in range(i + 1 - len(pre)):
                cin = pre[-1]
                cout = c if j == i - len(pre) else cin
                steps.append(nn.Sequential(_conv3x3(cin, cout, 2), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)))
            layers.append(nn.Sequential(*steps))
    return nn.ModuleList(layers)


class HRNet(nn.Module):
    """HRNetV2 backbone; ``forward`` returns the four branches (strides 4, 8, 16, 32), or with
    ``concat=True`` the HRNetV2 representation ``[concat]`` (one level, stride 4)."""

    def __init__(self, name: str = "hrnet_w48", concat: bool = False):
        super().__init__()
        name = HRNET_ALIASES.get(name, name)
        if name not in HRNET_ARCHS:
            raise ValueError(f"unknown HRNet backbone {name!r}; choose one of {', '.join(sorted(HRNET_ARCHS))}")
        arch = HRNET_ARCHS[name]
        self.name, self.concat = name, concat
        w = arch.width
        widths = [w, 2 * w, 4 * w, 8 * w]
        self.conv1, self.bn1 = _conv3x3(3, 64, 2), nn.BatchNorm2d(64)
        self.conv2, self.bn2 = _conv3x3(64, 64, 2), nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = _make_layer(Bottleneck, 64, 64, arch.num_blocks)
        pre = [64 * Bottleneck.expansion]
        for stage in (2, 3, 4):
            cur = widths[:stage]
            setattr(self, f"transition{stage - 1}", _make_transition(pre, cur))
            setattr(self, f"stage{stage}", nn.Sequential(*(
                HRModule(cur, arch.num_blocks) for _ in range(arch.num_modules[stage - 1]))))
            pre = cur
        self.branch_channels = tuple(widths)
        self.channels = (sum(widths),) if concat else tuple(widths)
        self.strides = (4,) if concat else (4, 8, 16, 32)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        ys = [self.layer1(x)]
        for stage in (2, 3, 4):
            transition = getattr(self, f"transition{stage - 1}")
            xs = [ys[i] if t is None else t(ys[min(i, len(ys) - 1)]) for i, t in enumerate(transition)]
            ys = getattr(self, f"stage{stage}")(xs)
        if not self.concat:
            return ys
        size = ys[0].shape[-2:]
        ups = [ys[0]] + [F.interpolate(y, size=size, mode="bilinear", align_corners=False) for y in ys[1:]]
        return [torch.cat(ups, dim=1)]

    def load_pretrained(self, weights_path=None) -> None:
        """Load the MSRA ImageNet HRNetV2 weights (hub cache / download) or a local file."""
        from models.backbones import _clean_state_dict, _load_into, _load_url, _read_weights
        if weights_path is not None:
            state = _read_weights(weights_path, self.name)
        elif self.name in HRNET_URLS:
            state = _load_url(HRNET_URLS[self.name], self.name)
        else:
            raise ValueError(f"backbone {self.name!r} has no ImageNet weights; use pretrained=False")
        state = _clean_state_dict(state)
        _load_into(self, state, self.name, ignore=lambda k: k.startswith(
            ("incre_modules.", "downsamp_modules.", "final_layer.", "classifier.", "fc.")))


def build_hrnet(name: str = "hrnet_w48", pretrained: bool = False, concat: bool = True,
                weights_path=None) -> HRNet:
    """An HRNet backbone by name (``hrnet_w18``, ``hrnet_w48``, ``tiny``/``hrnet_tiny``)."""
    if not isinstance(name, str) or HRNET_ALIASES.get(name, name) not in HRNET_ARCHS:
        raise ValueError(f"this segmentor needs an HRNet backbone (hrnet_w48 as the paper, hrnet_w18, "
                         f"or tiny for tests), got backbone {name!r}")
    net = HRNet(name, concat=concat)
    if pretrained or weights_path is not None:
        net.load_pretrained(weights_path)
    return net


def _hrnet_backbone(backbone, pretrained, backbone_options) -> nn.Module:
    if isinstance(backbone, nn.Module):
        return make_backbone(backbone, pretrained, backbone_options)
    opts = dict(backbone_options or {})
    extra = set(opts) - {"weights_path"}
    if extra:
        raise ValueError(f"HRNet backbone options: only weights_path is accepted, got {sorted(extra)}")
    return build_hrnet(backbone, pretrained, concat=True, weights_path=opts.get("weights_path"))


def hrnet_fcn_head(in_channels: int, num_classes: int, dropout_ratio: float = -1) -> FCNHead:
    """HRNet's head: 1x1 ConvModule C -> C, (no) dropout, 1x1 classifier."""
    return FCNHead(in_channels, in_channels, num_classes, num_convs=1, kernel_size=1,
                   concat_input=False, dropout_ratio=dropout_ratio)


@register("fcn_hrnet")
def build_fcn_hrnet(num_classes: int, backbone: str | nn.Module = "hrnet_w48", pretrained: bool = False,
                    *, dropout_ratio: float = -1, backbone_options: dict | None = None) -> EncoderDecoder:
    """FCN head on the HRNetV2 representation (logits at 1/4, no auxiliary head)."""
    net = _hrnet_backbone(backbone, pretrained, backbone_options)
    return EncoderDecoder(net, hrnet_fcn_head(net.channels[-1], num_classes, dropout_ratio))


@register("ocrnet_hrnet")
def build_ocrnet_hrnet(num_classes: int, backbone: str | nn.Module = "hrnet_w48", pretrained: bool = False,
                       *, channels: int = 512, ocr_channels: int = 256, scale: float = 1.0,
                       dropout_ratio: float = -1, region_weight: float = 0.4,
                       backbone_options: dict | None = None):
    """OCRNet on HRNetV2 (soft regions and OCR both on the concatenated representation)."""
    from models.segmentors.ocrnet import OCRHead, OCRNet
    net = _hrnet_backbone(backbone, pretrained, backbone_options)
    c = net.channels[-1]
    region_head = hrnet_fcn_head(c, num_classes, dropout_ratio)
    ocr_head = OCRHead(c, channels, ocr_channels, num_classes, scale, dropout_ratio)
    return OCRNet(net, region_head, ocr_head, region_weight)
