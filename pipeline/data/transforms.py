"""Joint image/mask transforms (torchvision.transforms.v2).

Images are ``tv_tensors.Image`` uint8 (3, H, W) and masks ``tv_tensors.Mask`` int64 (H, W);
a v2 transform called as ``t(image, mask)`` moves both alike (geometry) and touches only the
image for photometric changes. Masks are resized with nearest-neighbour interpolation and
padded with 255 (ignore), images padded with 0.

Training (segmentor recipe, mmseg-style): random scale ``s ~ U(scale_range)`` of the whole
image, random crop ``crop_size`` (padding when smaller), horizontal flip, colour jitter.
"""

from typing import Any, Sequence

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IGNORE_FILL = {tv_tensors.Image: 0, tv_tensors.Mask: 255}


class RandomScale(v2.Transform):
    """Resize image and mask by a factor drawn uniformly from ``scale_range`` (aspect kept)."""

    def __init__(self, scale_range: Sequence[float] = (0.5, 2.0)):
        super().__init__()
        lo, hi = float(scale_range[0]), float(scale_range[1])
        if not 0 < lo <= hi:
            raise ValueError(f"scale_range must satisfy 0 < low <= high, got {tuple(scale_range)}")
        self.scale_range = (lo, hi)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        sized = [x for x in flat_inputs if isinstance(x, (tv_tensors.Image, tv_tensors.Mask))]
        if not sized:
            raise TypeError("RandomScale needs a tv_tensors.Image or Mask among its inputs")
        height, width = F.get_size(sized[0])
        scale = float(torch.empty(1).uniform_(*self.scale_range))
        return {"size": [max(1, round(height * scale)), max(1, round(width * scale))]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if isinstance(inpt, (tv_tensors.Image, tv_tensors.Mask)):
            return F.resize(inpt, params["size"], antialias=True)
        return inpt


def _square(size: int | Sequence[int]) -> list[int]:
    if isinstance(size, int):
        return [size, size]
    size = list(size)
    if len(size) != 2:
        raise ValueError(f"size must be an int or (height, width), got {size}")
    return size


def train_transform(crop_size: int | Sequence[int], scale_range: Sequence[float] = (0.5, 2.0),
                    flip: bool = True,
                    colour_jitter: Sequence[float] | None = (0.3, 0.3, 0.3, 0.1)) -> v2.Compose:
    """Random scale -> random crop (pad image 0 / mask 255) -> flip -> colour jitter."""
    steps: list[v2.Transform] = [
        RandomScale(scale_range),
        v2.RandomCrop(_square(crop_size), pad_if_needed=True, fill=IGNORE_FILL),
    ]
    if flip:
        steps.append(v2.RandomHorizontalFlip(0.5))
    if colour_jitter is not None and any(colour_jitter):
        b, c, s, h = colour_jitter
        steps.append(v2.ColorJitter(brightness=b, contrast=c, saturation=s, hue=h))
    return v2.Compose(steps)


def resize_transform(size: int | Sequence[int]) -> v2.Compose:
    """Resize image (antialiased) and mask (nearest) to ``size`` (int: a square)."""
    return v2.Compose([v2.Resize(_square(size), antialias=True)])


def eval_transform(size: int | Sequence[int] | None = None) -> v2.Compose:
    """Deterministic: the identity, or a resize to ``size`` when given."""
    return resize_transform(size) if size is not None else v2.Compose([v2.Identity()])


def normalize(image: torch.Tensor) -> torch.Tensor:
    """uint8 (..., 3, H, W) -> float32 ``(x / 255 - mean) / std`` with ImageNet statistics."""
    if image.ndim < 3 or image.shape[-3] != 3:
        raise ValueError(f"expected (..., 3, H, W) images, got shape {tuple(image.shape)}")
    image = image.as_subclass(torch.Tensor) if isinstance(image, tv_tensors.TVTensor) else image
    x = image.float() / 255.0 if image.dtype == torch.uint8 else image.float()
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(3, 1, 1)
    return (x - mean) / std
