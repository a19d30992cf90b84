"""Stage 4 (segmentor training): loss, schedule, sampling, bad input, resume == uninterrupted."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.config import load_config
from pipeline.data import build_dataset
from pipeline.data.palette import read_label_png, save_label_png
from pipeline.runtime import load_checkpoint, save_checkpoint
from pipeline.storage import StageResult
from pipeline.tracking import MemoryTracker
from stages import train_segmentor as ts

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_FCN = {"fcn": {"channels": 16, "aux_channels": 8, "backbone_options": {"width": 8}}}


def tiny_config(root: Path, **segmentor):
    """Synthetic data of 16 train / 8 val 48-px images and a tiny FCN."""
    seg = {"models": ["fcn"], "backbone": "tiny", "pretrained": False, "model_options": TINY_FCN,
           "iterations": 6, "batch_size": 4, "crop_size": 32, "scale_range": [0.75, 1.25],
           "lr": 0.01, "warmup_iters": 2, "checkpoint_every": 3, "log_every": 1, "amp": False,
           "num_workers": 0}
    seg.update(segmentor)
    config = load_config("demo")
    data = {"root": str(root / "data"), "synthetic": {"num_train": 16, "num_val": 8, "image_size": 48}}
    return config.model_validate({**config.model_dump(), "workdir": str(root / "work"),
                                  "data": {**config.data.model_dump(), **data}, "segmentor": seg})


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("seg")
    config = tiny_config(root)
    dataset = build_dataset(config.data, "train")
    masks = root / "masks"
    masks.mkdir()
    for image_id in dataset.ids:
        shutil.copy(dataset.mask_path(image_id), masks / f"{image_id}.png")
    return root, config, dataset, masks


# --------------------------------------------------------------------------- loss
def test_pixel_loss_averaging_by_hand():
    logits = torch.zeros(1, 3, 1, 4)
    logits[0, 1, 0, 0] = math.log(2.0)  # pixel 0: p(class1) = 2/4
    target = torch.tensor([[[1, 0, 255, 255]]])
    # per-pixel CE: pixel0 = -log(1/2), pixel1 = -log(1/3)
    l0, l1 = math.log(2.0), math.log(3.0)
    labelled = ts.make_pixel_loss("labelled")(logits, target)
    everything = ts.make_pixel_loss("all")(logits, target)
    assert labelled.item() == pytest.approx((l0 + l1) / 2, rel=1e-6)
    assert everything.item() == pytest.approx((l0 + l1) / 4, rel=1e-6)
    weight = torch.tensor([3.0, 1.0, 1.0])
    weighted = ts.make_pixel_loss("labelled", weight)(logits, target)
    assert weighted.item() == pytest.approx((l0 + 3 * l1) / 4, rel=1e-6)
    # equals torch's weighted mean with ignore_index
    ref = F.cross_entropy(logits, target, weight=weight, ignore_index=255)
    assert weighted.item() == pytest.approx(ref.item(), rel=1e-6)


def test_pixel_loss_all_ignored_is_zero_with_gradient():
    logits = torch.randn(2, 4, 3, 3, requires_grad=True)
    target = torch.full((2, 3, 3), 255)
    loss = ts.make_pixel_loss("labelled")(logits, target)
    loss.backward()
    assert loss.item() == 0.0 and torch.all(logits.grad == 0)
    with pytest.raises(ValueError, match="loss_average"):
        ts.make_pixel_loss("mean")


def test_class_balanced_weights_median_frequency():
    # class 0: 80 px in images of 100 px total; class 1: 10 of 100; class 2: 5 of 50; class 3 absent
    counts = np.array([[80, 10, 5, 0], [100, 100, 50, 0]])
    w = ts.class_balanced_weights(counts, max_weight=10.0)
    freq = np.array([0.8, 0.1, 0.1])
    expected = np.median(freq) / freq
    assert np.allclose(w[:3].numpy(), expected)
    assert w[3].item() == 1.0
    clipped = ts.class_balanced_weights(np.array([[1000, 1], [1001, 1001]]), max_weight=5.0)
    assert clipped.max().item() == pytest.approx(5.0)


# --------------------------------------------------------------------------- schedule
def test_lr_factor_poly_warmup(base):
    _, config, _, _ = base
    cfg = config.segmentor.model_copy(update={"iterations": 100, "warmup_iters": 10, "warmup_ratio": 0.1,
                                              "lr": 0.01, "min_lr": 1e-4, "poly_power": 0.9})
    m = 1e-4 / 0.01
    assert ts.lr_factor(0, cfg) == pytest.approx(0.1)
    assert ts.lr_factor(5, cfg) == pytest.approx(((1 - m) * 0.95 ** 0.9 + m) * 0.55)
    assert ts.lr_factor(50, cfg) == pytest.approx((1 - m) * 0.5 ** 0.9 + m)
    assert ts.lr_factor(100, cfg) == pytest.approx(m)


def test_optimizer_groups_head_multiplier(base):
    _, config, _, _ = base
    from models.segmentors import build_segmentor
    model = build_segmentor("fcn", 6, backbone="tiny", **TINY_FCN["fcn"])
    cfg = config.segmentor.model_copy(update={"head_lr_mult": 10.0, "warmup_iters": 0, "lr": 0.01})
    optimizer, scheduler = ts.build_optimizer(model, cfg)
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert lrs["head"] == pytest.approx(10 * lrs["backbone"]) and lrs["backbone"] == pytest.approx(0.01)
    n = sum(len(g["params"]) for g in optimizer.param_groups)
    assert n == len(list(model.parameters()))
    assert optimizer.param_groups[0]["momentum"] == 0.9


# --------------------------------------------------------------------------- sampling
def test_sample_stream_epochs_and_ranks():
    full = ts.SampleStream(10, 4, seed=3, start=0, stop=5)
    batches = list(full)
    assert len(batches) == 5 and all(len(b) == 4 for b in batches)
    flat = [i for b in batches for i, _ in b]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
    seeds = [s for b in batches for _, s in b]
    assert len(set(seeds)) == len(seeds)
    # two ranks split each global batch; a resumed stream continues exactly
    r0 = list(ts.SampleStream(10, 4, 3, 0, 5, rank=0, world_size=2))
    r1 = list(ts.SampleStream(10, 4, 3, 0, 5, rank=1, world_size=2))
    assert all(a + b == c for a, b, c in zip(r0, r1, batches))
    assert list(ts.SampleStream(10, 4, 3, start=2, stop=5)) == batches[2:]
    with pytest.raises(ValueError, match="not divisible"):
        ts.SampleStream(10, 5, 3, 0, 5, rank=0, world_size=2)


def test_seeded_samples_reproducible_and_rng_untouched(base):
    _, config, _, masks = base
    from pipeline.data.transforms import train_transform
    ds = build_dataset(config.data, "train", mask_dir=masks, transform=train_transform(32, (0.5, 2.0)))
    wrapped = ts.SeededSamples(ds)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    a, b, c = wrapped[(3, 11)], wrapped[(3, 11)], wrapped[(3, 12)]
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    assert not torch.equal(a["image"], c["image"])
    assert a["image"].shape == (3, 32, 32) and a["mask"].dtype == torch.int64


# --------------------------------------------------------------------------- bad input
def test_unknown_model_lists_registry():
    with pytest.raises(ValueError, match=r"unknown segmentor\(s\) 'nope'.*available: .*fcn"):
        ts.check_models(["fcn", "nope"])


def test_missing_masks_named(base, tmp_path):
    _, config, dataset, masks = base
    partial = tmp_path / "partial"
    shutil.copytree(masks, partial)
    gone = dataset.ids[2:9]
    for image_id in gone:
        (partial / f"{image_id}.png").unlink()
    with pytest.raises(ts.PseudoMaskError) as err:
        ts.scan_pseudo_masks(partial, dataset.ids, dataset.num_classes, "train")
    text = str(err.value)
    assert "lacks 7 of the 16 images" in text and "'train'" in text
    assert all(i in text for i in gone[:5]) and gone[6] not in text


def test_bad_mask_value_named(base, tmp_path):
    _, config, dataset, masks = base
    bad = tmp_path / "bad"
    shutil.copytree(masks, bad)
    victim = bad / f"{dataset.ids[4]}.png"
    mask = read_label_png(victim)
    mask[0, 0] = dataset.num_classes + 1
    mask[0, 1] = 255
    save_label_png(victim, mask)
    with pytest.raises(ts.PseudoMaskError, match=rf"{victim}.*value {dataset.num_classes + 1}"):
        ts.scan_pseudo_masks(bad, dataset.ids, dataset.num_classes)
    # the stage refuses it before training anything
    with pytest.raises(ts.PseudoMaskError):
        ts.run(config, {"refine_crf": StageResult("refine_crf", "k", str(bad))}, tmp_path / "out")
    assert not (tmp_path / "out" / "fcn").exists()


def test_mask_size_mismatch_named(base, tmp_path):
    _, _, dataset, masks = base
    bad = tmp_path / "bad"
    shutil.copytree(masks, bad)
    victim = bad / f"{dataset.ids[1]}.png"
    save_label_png(victim, np.zeros((10, 12), np.uint8))
    with pytest.raises(ts.PseudoMaskError, match=rf"{victim} is 12x10 but its image .* is 48x48"):
        ts.scan_pseudo_masks(bad, dataset.ids, dataset.num_classes, image_path=dataset.image_path)


def test_scan_counts_and_255(base):
    _, _, dataset, masks = base
    counts = ts.scan_pseudo_masks(masks, dataset.ids, dataset.num_classes)
    total = sum(int((read_label_png(masks / f"{i}.png") < 255).sum()) for i in dataset.ids)
    assert counts[0].sum() == total and counts.shape == (2, dataset.num_classes)
    assert np.all(counts[1] >= counts[0])


def test_checkpoint_class_count_mismatch(base, tmp_path):
    _, config, _, masks = base
    out = tmp_path / "fcn"
    out.mkdir()
    save_checkpoint(out / ts.CHECKPOINT, {"model_name": "fcn", "num_classes": 99, "iteration": 1})
    with pytest.raises(ValueError, match="has 99 classes but the configured dataset has 6"):
        ts.train_model(config, "fcn", masks, out)
    with pytest.raises(ValueError, match="has 99 classes"):
        save_checkpoint(out / ts.MODEL_FILE, {"model_name": "fcn", "num_classes": 99, "backbone": "tiny"})
        ts.load_trained(out / ts.MODEL_FILE, num_classes=6)


# --------------------------------------------------------------------------- training + resume
class Killed(Exception):
    pass


def _weights(path: Path) -> dict:
    return load_checkpoint(path)["model"]


def test_resume_after_kill_equals_uninterrupted(base, tmp_path):
    _, config, _, masks = base
    straight = MemoryTracker()
    res = ts.train_model(config, "fcn", masks, tmp_path / "a", straight)
    assert res["iterations"] == 6 and res["resumed_from"] == 0
    assert set(res["final"]) >= {"loss", "decode.loss_ce", "aux.loss_ce", "lr"}
    assert len(straight.history("loss")) == 6 and all(math.isfinite(v) for v in straight.history("loss"))

    def kill_at_5(it):
        if it == 5:
            raise Killed()
    with pytest.raises(Killed):
        ts.train_model(config, "fcn", masks, tmp_path / "b", MemoryTracker(), on_iteration=kill_at_5)
    assert load_checkpoint(tmp_path / "b" / ts.CHECKPOINT)["iteration"] == 3
    assert not (tmp_path / "b" / ts.RESULT_FILE).exists()
    resumed = MemoryTracker()
    res_b = ts.train_model(config, "fcn", masks, tmp_path / "b", resumed)
    assert res_b["resumed_from"] == 3
    assert resumed.history("loss") == pytest.approx(straight.history("loss")[3:], abs=0)
    wa, wb = _weights(tmp_path / "a" / ts.MODEL_FILE), _weights(tmp_path / "b" / ts.MODEL_FILE)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    log = [json.loads(x) for x in (tmp_path / "b" / ts.LOG_FILE).read_text().splitlines()]
    assert [r["iteration"] for r in log] == [1, 2, 3, 4, 5, 6]
    # a finished model is not trained again
    assert ts.train_model(config, "fcn", masks, tmp_path / "b")["resumed_from"] == 3


def test_stage_trains_each_model_into_own_dir(base, tmp_path):
    _, config, _, masks = base
    options = {**TINY_FCN, "pspnet": {"channels": 8, "aux_channels": 8, "backbone_options": {"width": 8}}}
    config = config.model_copy(update={"segmentor": config.segmentor.model_copy(update={
        "models": ["fcn", "pspnet"], "model_options": options, "iterations": 3, "class_balanced": True})})
    tracker = MemoryTracker()
    result = ts.run(config, {"refine_crf": StageResult("refine_crf", "k", str(masks))}, tmp_path, tracker)
    for name in ("fcn", "pspnet"):
        assert (tmp_path / name / ts.MODEL_FILE).is_file() and (tmp_path / name / ts.CHECKPOINT).is_file()
        assert len(tracker.children[name].history("loss")) == 3
        assert isinstance(result.metrics[f"{name}_loss"], float)
        assert tracker.children[name].params["class_weights"] is not None
    assert "fcn loss" in result.metrics["headline"] and result.files["pspnet"] == "pspnet/model.pt"


def test_setr_position_embeddings_sized_for_the_crop(base, tmp_path):
    """SETR's img_size follows the crop (rounded up to the 16-px patch: 40 -> 48, a 3x3 grid),
    is saved with the options and rebuilt by load_trained."""
    _, config, dataset, masks = base
    options = {"setr_naive": {"backbone": "vit_tiny", "channels": 8}}
    config = config.model_copy(update={"segmentor": config.segmentor.model_copy(update={
        "models": ["setr_naive"], "model_options": options, "iterations": 1, "crop_size": 40})})
    ts.run(config, {"refine_crf": StageResult("refine_crf", "k", str(masks))}, tmp_path, MemoryTracker())
    model, state = ts.load_trained(tmp_path / "setr_naive" / ts.MODEL_FILE, dataset.num_classes)
    assert state["options"]["img_size"] == 48
    assert model.backbone.encoder.pos_embedding.shape[1] == 1 + 3 * 3
    explicit = {"setr_naive": {**options["setr_naive"], "img_size": 64}}  # an explicit one is kept
    config = config.model_copy(update={"segmentor": config.segmentor.model_copy(update={
        "model_options": explicit})})
    ts.run(config, {"refine_crf": StageResult("refine_crf", "k", str(masks))}, tmp_path / "b", MemoryTracker())
    _, state = ts.load_trained(tmp_path / "b" / "setr_naive" / ts.MODEL_FILE, dataset.num_classes)
    assert state["options"]["img_size"] == 64


@pytest.mark.slow
def test_parallel_processes_match_in_process(base, tmp_path):
    """``parallel=True`` trains in child processes; same config -> same weights and logs."""
    _, config, _, masks = base
    config = config.model_copy(update={"segmentor": config.segmentor.model_copy(update={"iterations": 2})})
    in_proc = tmp_path / "in"
    ts.run(config, {"refine_crf": StageResult("refine_crf", "k", str(masks))}, in_proc, MemoryTracker())
    par = config.model_copy(update={"segmentor": config.segmentor.model_copy(update={"parallel": True})})
    tracker = MemoryTracker()
    ts.run(par, {"refine_crf": StageResult("refine_crf", "k", str(masks))}, tmp_path / "par", tracker)
    wa, wb = _weights(in_proc / "fcn" / ts.MODEL_FILE), _weights(tmp_path / "par" / "fcn" / ts.MODEL_FILE)
    assert all(torch.allclose(wa[k].float(), wb[k].float(), atol=1e-5) for k in wa)
    assert len(tracker.children["fcn"].history("loss")) == 2



# --------------------------------------------------------------------------- optimizer choice
def test_optimizer_default_sgd_and_bad_name_rejected(base):
    _, config, _, _ = base
    assert config.segmentor.optimizer == "sgd"
    with pytest.raises(ValueError, match="optimizer"):
        config.segmentor.model_validate({**config.segmentor.model_dump(), "optimizer": "adam"})


def test_optimizer_adamw_groups_and_decoupled_decay(base):
    """AdamW keeps the backbone/head groups and the head multiplier; with zero gradients one
    step is pure decoupled decay, ``θ' = θ (1 - lr_g · wd)`` (Adam + L2 would move each
    weight by about ``lr_g`` instead)."""
    _, config, _, _ = base
    from models.segmentors import build_segmentor
    model = build_segmentor("fcn", 6, backbone="tiny", **TINY_FCN["fcn"])
    cfg = config.segmentor.model_copy(update={"optimizer": "adamw", "head_lr_mult": 10.0, "lr": 1e-3,
                                              "weight_decay": 0.05, "warmup_iters": 0})
    optimizer, scheduler = ts.build_optimizer(model, cfg)
    assert type(optimizer) is torch.optim.AdamW
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert groups["backbone"]["lr"] == pytest.approx(1e-3) and groups["head"]["lr"] == pytest.approx(1e-2)
    for g in groups.values():
        assert g["betas"] == ts.ADAMW_BETAS and g["eps"] == ts.ADAMW_EPS and g["weight_decay"] == 0.05
    assert sum(len(g["params"]) for g in groups.values()) == len(list(model.parameters()))
    before = {id(p): p.detach().clone() for p in model.parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    scheduler.step()
    for name, lr in (("backbone", 1e-3), ("head", 1e-2)):
        for p in groups[name]["params"]:
            torch.testing.assert_close(p.detach(), before[id(p)] * (1 - lr * 0.05))
    # the poly schedule is the same as SGD's
    assert groups["backbone"]["lr"] == pytest.approx(1e-3 * ts.lr_factor(1, cfg))


def test_resume_after_kill_equals_uninterrupted_adamw(base, tmp_path):
    """The AdamW moments travel in the checkpoint: a killed and resumed run ends with the same
    weights and optimizer state as an uninterrupted one."""
    _, config, _, masks = base
    config = config.model_copy(update={"segmentor": config.segmentor.model_copy(update={
        "optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.01})})
    straight = MemoryTracker()
    ts.train_model(config, "fcn", masks, tmp_path / "a", straight)

    def kill_at_4(it):
        if it == 4:
            raise Killed()
    with pytest.raises(Killed):
        ts.train_model(config, "fcn", masks, tmp_path / "b", MemoryTracker(), on_iteration=kill_at_4)
    resumed = MemoryTracker()
    assert ts.train_model(config, "fcn", masks, tmp_path / "b", resumed)["resumed_from"] == 3
    assert resumed.history("loss") == pytest.approx(straight.history("loss")[3:], abs=0)
    wa, wb = _weights(tmp_path / "a" / ts.MODEL_FILE), _weights(tmp_path / "b" / ts.MODEL_FILE)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    oa = load_checkpoint(tmp_path / "a" / ts.CHECKPOINT)["optimizer"]
    ob = load_checkpoint(tmp_path / "b" / ts.CHECKPOINT)["optimizer"]
    assert oa["state"].keys() == ob["state"].keys() and len(oa["state"]) > 0
    for k in oa["state"]:
        assert set(oa["state"][k]) >= {"exp_avg", "exp_avg_sq"}
        assert all(torch.equal(torch.as_tensor(oa["state"][k][n]), torch.as_tensor(ob["state"][k][n]))
                   for n in oa["state"][k])
