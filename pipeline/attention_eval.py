"""Does the co-attention match objects across images? (diagnostic of the MCIS classifier).

For an image I, a class c of its label and a related partner R of stage 2's plan (both
squashed to the maps' ``image_size``), the co-attention that builds I's co-attentive
features is ``A = softmax_j(P^T)`` (:meth:`models.coattention.CoAttentionClassifier.co_attention`,
``A[j, x]``: the weight of R's position j in I's position x, columns summing to 1). With the
ground-truth masks at feature resolution (nearest), per (I, c, R):

* ``on_object``  = mean over x on I's GT-c pixels of ``sum_{j in R's GT-c} A[j, x]``;
* ``off_object`` = the same over x on I's other labelled pixels;
* ``uniform``    = R's GT-c area fraction (what a flat attention gives both);
* ``entropy``    = mean over x of ``H(A[:, x]) / log(HW_R)`` (0 one-hot, 1 uniform);
* ``logit_on`` / ``logit_off`` = mean co-attentive class-c logit ``phi(F_I^{I∩R})_c`` on /
  off I's object.

An attention that matches objects has ``on_object`` well above ``uniform`` and
``off_object`` below it; MCIS maps leak into the background when ``off_object`` is close to
``on_object`` (background positions also gather the partner's object features). Means are
over the (I, c, R) triples where I has both object and other labelled pixels and R shows c.
"""

from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F

KEYS = ("on_object", "off_object", "uniform", "entropy", "logit_on", "logit_off")


@torch.no_grad()
def attention_diagnostics(model, dataset, triples: Iterable[tuple[str, int, str]], image_size: int | None) -> dict:
    """Means of :data:`KEYS` over ``triples`` of (image id, 0-based class, partner id);
    ``dataset`` gives ``load_image`` / ``load_mask`` (class c is mask value c + 1, 255 void).
    Features of each image are computed once. Returns ``{"pairs": n, key: mean, ...}``."""
    from stages.generate_cams import network_input

    model.eval()
    device = next(model.parameters()).device
    feats: dict[str, torch.Tensor] = {}
    masks: dict[str, torch.Tensor] = {}

    def prepare(item: str):
        if item not in feats:
            feats[item] = model.features(network_input(dataset.load_image(item), image_size).to(device))
            mask = torch.from_numpy(np.asarray(dataset.load_mask(item)))[None, None].float()
            masks[item] = F.interpolate(mask, size=feats[item].shape[-2:], mode="nearest").reshape(-1).long().to(device)
        return feats[item], masks[item]

    sums = np.zeros(len(KEYS))
    count = 0
    for item, c, partner in triples:
        f_i, m_i = prepare(item)
        f_r, m_r = prepare(partner)
        on, off = m_i == c + 1, (m_i != c + 1) & (m_i != 255)
        obj_r = (m_r == c + 1).float()
        if not (on.any() and off.any() and obj_r.any()):
            continue
        co_i, _, attn, _ = model.co_attention(f_i, f_r)           # attn: (1, HW_R, HW_I)
        share = (attn[0] * obj_r[:, None]).sum(0)                  # per position x of I
        entropy = -(attn[0] * attn[0].clamp(min=1e-12).log()).sum(0) / np.log(attn.shape[1])
        logit = model.class_maps(co_i)[0, c].reshape(-1)
        sums += [float(v) for v in (share[on].mean(), share[off].mean(), obj_r.mean(), entropy.mean(),
                                    logit[on].mean(), logit[off].mean())]
        count += 1
    return {"pairs": count, **{k: float(v) / max(count, 1) for k, v in zip(KEYS, sums)}}


def plan_triples(plan) -> list[tuple[str, int, str]]:
    """Every (image, class, partner) of a :class:`stages.generate_cams.Plan`."""
    return [(item, c, partner) for item, classes in plan.classes.items() for c in classes
            for partner in plan.related[item].get(c, [])]


def stage_diagnostics(config, dataset, classifier_dir) -> dict:
    """:func:`attention_diagnostics` of stage 1's last checkpoint in ``classifier_dir`` over
    every (image, class, partner) of stage 2's plan for ``dataset``, at the maps' input size
    (``maps.image_size``; under the official protocol the classifier's when unset)."""
    from pathlib import Path

    from stages.generate_cams import make_plan, select_checkpoint
    from stages.train_classifier import load_classifier

    model, _ = load_classifier(select_checkpoint(Path(classifier_dir), None))
    maps = config.maps
    plan = make_plan(dataset, maps.num_related, config.seed, maps.related_pool)
    image_size = maps.image_size
    if image_size is None and maps.protocol == "official":
        image_size = config.classifier.image_size
    return attention_diagnostics(model, dataset, plan_triples(plan), image_size)
