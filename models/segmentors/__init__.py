"""The segmentor zoo: a registry and one builder.

Every architecture lives in its own module in this package and registers a constructor::

    @register("pspnet")
    def build_pspnet(num_classes, backbone="resnet101", pretrained=False, **options) -> Segmentor

Contract of a :class:`Segmentor` (what stage 4 and stage 5 rely on):

* ``forward(x)`` with ``x`` a normalised ``(N, 3, H, W)`` batch returns a dict whose key
  ``"out"`` holds the main logits ``(N, num_classes, h, w)`` at the head's resolution;
  other keys hold the auxiliary outputs its losses need (``"aux"``, ``"pam"``, ...).
  In ``eval()`` mode only ``"out"`` is needed.
* ``losses(outputs, target, pixel_loss)`` returns a dict of already-weighted loss terms
  (keys in mmseg's style: ``"decode.loss_ce"``, ``"aux.loss_ce"`` ...) whose sum is the
  training loss. ``pixel_loss(logits, target)`` is supplied by the training stage (CE with
  ignore 255, its averaging rule and optional class weights); logits are resized
  (bilinear, ``align_corners=False``) to the target size before it. The default
  implementation applies ``pixel_loss`` to each key of ``loss_weights``.
* ``head_parameters()`` / ``backbone_parameters()`` split the parameters for the head
  learning-rate multiplier.
"""

import importlib
import inspect
import pkgutil
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

PixelLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

SEGMENTORS: dict[str, Callable[..., "Segmentor"]] = {}


def register(name: str):
    """Class/function decorator adding a segmentor constructor to the registry."""
    def wrap(builder):
        if name in SEGMENTORS:
            raise ValueError(f"segmentor {name!r} registered twice")
        SEGMENTORS[name] = builder
        return builder
    return wrap


def resize_to(logits: torch.Tensor, size) -> torch.Tensor:
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


class Segmentor(nn.Module):
    """Base class: a backbone (``self.backbone``) and heads; see the module docstring."""

    #: output key -> weight of its pixel loss (the main output is ``"out"``)
    loss_weights: Mapping[str, float] = {"out": 1.0}
    #: output key -> loss name in mmseg's convention
    loss_names: Mapping[str, str] = {"out": "decode.loss_ce", "aux": "aux.loss_ce"}

    def losses(self, outputs: Mapping[str, torch.Tensor], target: torch.Tensor,
               pixel_loss: PixelLoss) -> dict[str, torch.Tensor]:
        size = target.shape[-2:]
        terms = {}
        for key, weight in self.loss_weights.items():
            if key in outputs and weight:
                name = self.loss_names.get(key, f"{key}.loss_ce")
                terms[name] = weight * pixel_loss(resize_to(outputs[key], size), target)
        return terms

    def backbone_parameters(self):
        backbone = getattr(self, "backbone", None)
        return list(backbone.parameters()) if backbone is not None else []

    def head_parameters(self):
        ids = {id(p) for p in self.backbone_parameters()}
        return [p for p in self.parameters() if id(p) not in ids]


def _import_all() -> None:
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


def available() -> list[str]:
    _import_all()
    return sorted(SEGMENTORS)


def _builder(name: str) -> Callable[..., "Segmentor"]:
    """The registered constructor of ``name``; unknown names list the registry."""
    _import_all()
    if name not in SEGMENTORS:
        raise ValueError(f"unknown segmentor {name!r}; available: {', '.join(sorted(SEGMENTORS))}")
    return SEGMENTORS[name]


def builder_options(name: str) -> set[str]:
    """The keyword options the builder of segmentor ``name`` takes (besides the class count,
    backbone and ``pretrained``)."""
    return set(inspect.signature(_builder(name)).parameters) - {"num_classes", "backbone", "pretrained"}


def build_segmentor(name: str, num_classes: int, backbone: str = "resnet101",
                    pretrained: bool = False, **options) -> Segmentor:
    """Build a registered segmentor; unknown names list the registry."""
    builder = _builder(name)
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    return builder(num_classes=num_classes, backbone=backbone, pretrained=pretrained, **options)
