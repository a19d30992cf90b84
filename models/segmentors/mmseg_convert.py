"""Load mmsegmentation model-zoo checkpoints into our segmentors.

Our modules use mmseg's names (``backbone.stem.*`` / ``backbone.layer1..4`` of ResNetV1c with
``deep_stem=True``, ``decode_head.*``, ``auxiliary_head.*``; OCRNet's cascade as
``decode_head.0`` / ``decode_head.1``), so a checkpoint's ``state_dict`` maps onto ours one to
one and no renaming table is needed. What this module adds to ``load_state_dict``:

* unwraps ``{"state_dict": ..., "meta": ...}`` (mmseg/mmengine) and strips ``module.``
  (DDP) prefixes;
* checks the result against the model *before* loading: the class count
  (``conv_seg`` rows), missing keys, unexpected keys and shape mismatches are reported with
  the offending names, and nothing is loaded when any is found.

Corresponding mmseg 1.x configs (R-101-D8 = ``resnet101`` with ``deep_stem=True``):
:data:`MMSEG_CONFIGS`. ``deeplab_largefov``, ``deeplabv2`` and ``sanet`` have no mmseg
counterpart.
"""

from pathlib import Path
from typing import Mapping

import torch
from torch import nn

MMSEG_CONFIGS = {
    "fcn": "fcn_r101-d8_4xb4-20k_voc12aug-512x512",
    "pspnet": "pspnet_r101-d8_4xb4-20k_voc12aug-512x512",
    "deeplabv3": "deeplabv3_r101-d8_4xb4-20k_voc12aug-512x512",
    "deeplabv3plus": "deeplabv3plus_r101-d8_4xb4-20k_voc12aug-512x512",
    "danet": "danet_r101-d8_4xb4-20k_voc12aug-512x512",
    "ocrnet": "ocrnet_r101-d8_4xb2-40k_cityscapes-512x1024 (cityscapes only for R-101)",
    "ccnet": "ccnet_r101-d8_4xb4-20k_voc12aug-512x512",
    "ann": "ann_r101-d8_4xb4-20k_voc12aug-512x512",
    "isanet": "isanet_r101-d8_4xb4-20k_voc12aug-512x512",
    "dnlnet": "dnl_r101-d8_4xb2-40k_cityscapes-512x1024 (cityscapes only)",
    "fcn_hrnet": "fcn_hr48_4xb4-20k_voc12aug-512x512 (backbone hrnet_w48)",
    "ocrnet_hrnet": "ocrnet_hr48_4xb4-20k_voc12aug-512x512 (backbone hrnet_w48)",
    "setr_naive": "setr_vit-l_naive_8xb2-160k_ade20k-512x512 (ADE20K only; rename with setr.convert_mmseg_setr)",
    "setr_pup": "setr_vit-l_pup_8xb2-160k_ade20k-512x512 (ADE20K only; rename with setr.convert_mmseg_setr)",
    "setr_mla": "setr_vit-l_mla_8xb2-160k_ade20k-512x512 (ADE20K only; rename with setr.convert_mmseg_setr)",
}

class CheckpointMismatch(ValueError):
    """The checkpoint does not fit the model (names, shapes or class count)."""


def _unwrap(state: Mapping) -> dict[str, torch.Tensor]:
    for key in ("state_dict", "model"):
        if key in state and isinstance(state[key], Mapping):
            state = state[key]
            break
    out = {}
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointMismatch(f"checkpoint entry {name!r} is not a tensor ({type(value).__name__})")
        while name.startswith("module."):
            name = name[len("module."):]
        out[name] = value
    return out


def _classes(state: Mapping[str, torch.Tensor]) -> dict[str, int]:
    return {k: int(v.shape[0]) for k, v in state.items()
            if k.endswith("conv_seg.weight") and v.ndim == 4}


def convert_mmseg_state_dict(state: Mapping, model: nn.Module, source: str = "checkpoint") -> dict:
    """The checkpoint's tensors renamed to ``model``'s keys; raises :class:`CheckpointMismatch`."""
    state = _unwrap(state)
    own = model.state_dict()
    theirs, ours = _classes(state), _classes(own)
    for key, n in ours.items():
        if key in theirs and theirs[key] != n:
            raise CheckpointMismatch(f"{source} has {theirs[key]} classes ({key}) but the model has {n}")
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k}: {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
             for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong)):
            if items:
                parts.append(f"{len(items)} {label}: {', '.join(items[:6])}{' ...' if len(items) > 6 else ''}")
        hint = ""
        if any(k.startswith("backbone.stem.") for k in missing + unexpected):
            hint = " (mmseg's R-D8 backbones need backbone_options={'deep_stem': True})"
        raise CheckpointMismatch(f"{source} does not fit {type(model).__name__}: " + "; ".join(parts) + hint)
    return {k: v for k, v in state.items() if k in own}


def load_mmseg_checkpoint(model: nn.Module, path: str | Path, trusted: bool = False) -> nn.Module:
    """Load an mmseg checkpoint file into ``model`` (in place) after checking that it fits.

    mmengine checkpoints may pickle non-tensor metadata that ``torch.load(weights_only=True)``
    refuses; pass ``trusted=True`` for a file from a source you trust to unpickle it fully.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"mmseg checkpoint {path} does not exist")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=not trusted)
    except Exception as err:
        if trusted:
            raise CheckpointMismatch(f"mmseg checkpoint {path} cannot be read: {err}") from None
        raise CheckpointMismatch(
            f"mmseg checkpoint {path} holds non-tensor objects that a safe load refuses ({err}); "
            "pass trusted=True if you trust the file") from None
    if not isinstance(raw, Mapping):
        raise CheckpointMismatch(f"mmseg checkpoint {path} is a {type(raw).__name__}, not a dict")
    state = convert_mmseg_state_dict(raw, model, source=str(path))
    model.load_state_dict(state, strict=False)
    return model
