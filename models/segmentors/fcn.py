"""FCN -- the dilated fully convolutional baseline (Long, Shelhamer & Darrell, CVPR 2015).

As in mmsegmentation (``fcn_r101-d8``), "FCN" is the dilated-FCN baseline on an output-stride-8
ResNet rather than the VGG FCN-8s skip architecture: on the last stage ``x`` (2048 ch, 1/8)

    f1 = ConvBNReLU_3x3(x)            2048 -> 512
    f2 = ConvBNReLU_3x3(f1)           512  -> 512
    f  = ConvBNReLU_3x3([x, f2])      2560 -> 512      (concat_input)
    y  = W_cls * Dropout2d_0.1(f) + b  512 -> K         (logits at 1/8)

plus the auxiliary FCN head on stage 3 (3x3 ConvModule 1024 -> 256, dropout, 1x1 cls) with
loss weight 0.4: ``L = CE(y) + 0.4 CE(y_aux)``.

Parameters at 21 classes on R-101-D8 (ResNetV1c deep stem): backbone 42.52 M + decode head
23.61 M + aux 2.37 M = 68.49 M, models.md's table (66.13 M without the aux head).
"""

from torch import nn

from models.segmentors import register
from models.segmentors.layers import EncoderDecoder, FCNHead, aux_fcn_head, in_channels_of, make_backbone


@register("fcn")
def build_fcn(num_classes: int, backbone: str | nn.Module = "resnet101", pretrained: bool = False,
              *, channels: int = 512, num_convs: int = 2, concat_input: bool = True,
              dropout_ratio: float = 0.1, aux: bool = True, aux_channels: int = 256,
              aux_weight: float = 0.4, backbone_options: dict | None = None) -> EncoderDecoder:
    """Dilated FCN on ``backbone``; ``aux=False`` drops the auxiliary head."""
    net = make_backbone(backbone, pretrained, backbone_options)
    head = FCNHead(in_channels_of(net, -1), channels, num_classes, num_convs=num_convs,
                   concat_input=concat_input, dropout_ratio=dropout_ratio)
    aux_head = (aux_fcn_head(in_channels_of(net, -2), num_classes, aux_channels, dropout_ratio)
                if aux else None)
    return EncoderDecoder(net, head, aux_head, aux_weight)
