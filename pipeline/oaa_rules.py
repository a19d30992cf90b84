"""The official MCIS pseudo-ground-truth rules (OAA's ``gen_gt.py``, shipped with the MCIS
code as ``Classifier/gen_gt.py``): localization maps plus a saliency map, no CRF.

For an image with saliency ``s`` in [0, 1] (the PNG / 255) and maps ``M_c`` of its classes:

1. channels ``G_0 = 1 - s`` (background) and ``G_c = (M_c - min M_c) / (max M_c - min M_c +
   1e-8)`` (each map min-max normalised);
2. ``G < fg_threshold`` (0.3) -> 0, in every channel;
3. label = ``argmax_c G_c`` (ties go to the lower index: background first);
4. pixels where more than one channel exceeds ``conflict`` (0.99) -> 255;
5. ``s' = max(s, [any M_c > att_threshold (0.95)])``; background pixels with ``s' >=
   saliency_ignore`` (32/255) -> 255 (salient or confidently attended, yet labelled background);
6. an image with less than ``min_foreground`` (1 %) foreground -> all 255.

The saliency maps are the ones the MCIS / OAA READMEs link (a salient-object detector trained
with pixel-level saliency masks: extra supervision beyond image-level labels).
"""

import numpy as np

IGNORE = 255


def oaa_pseudo_mask(classes, maps: np.ndarray, saliency: np.ndarray, fg_threshold: float = 0.3,
                    conflict: float = 0.99, att_threshold: float = 0.95,
                    saliency_ignore: float = 32 / 255, min_foreground: float = 0.01) -> np.ndarray:
    """uint8 (H, W) pseudo-mask: 0 background, the ids in ``classes`` (n,), 255 ignore, from
    maps (n, H, W) and a saliency map (H, W) in [0, 1] by the rules of the module docstring."""
    classes = np.asarray(classes, dtype=np.int64).reshape(-1)
    maps = np.asarray(maps, dtype=np.float32)
    saliency = np.asarray(saliency, dtype=np.float32)
    if maps.ndim != 3 or maps.shape[0] != classes.size or maps.shape[1:] != saliency.shape:
        raise ValueError(f"{classes.size} classes, maps {maps.shape} and saliency {saliency.shape} "
                         f"do not fit")
    lo = maps.min(axis=(1, 2), keepdims=True) if classes.size else 0
    hi = maps.max(axis=(1, 2), keepdims=True) if classes.size else 0
    normed = (maps - lo) / (hi - lo + 1e-8)
    channels = np.concatenate([(1.0 - saliency)[None], normed])
    salient = np.maximum(saliency, (normed > att_threshold).any(axis=0).astype(np.float32))
    channels[channels < fg_threshold] = 0
    keys = np.concatenate([[0], classes]).astype(np.uint8)
    label = keys[np.argmax(channels, axis=0)]
    label[(channels > conflict).sum(axis=0) > 1] = IGNORE
    label[(label == 0) & (salient >= saliency_ignore)] = IGNORE
    if np.mean((label != 0) & (label != IGNORE)) < min_foreground:
        label[:] = IGNORE
    return label
