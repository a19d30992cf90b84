"""Stage 5 (evaluation): test-time augmentation, sliding windows, outputs, bad input, and the
acceptance run (two segmentors trained on the synthetic ground truth score well above chance)."""

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from models.segmentors import Segmentor
from pipeline.config import load_config
from pipeline.data import build_dataset
from pipeline.data.palette import read_label_png
from pipeline.metrics import ConfusionMatrix
from pipeline.runtime import load_checkpoint, save_checkpoint
from pipeline.storage import StageResult
from pipeline.tracking import MemoryTracker
from stages import evaluate as ev
from stages import train_segmentor as ts

pytestmark = pytest.mark.usefixtures("one_thread")


class Pointwise(Segmentor):
    """A 1x1-conv segmentor: equivariant to flips and (on constant regions) to rescaling."""

    def __init__(self, num_classes=4):
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Identity()
        self.head = nn.Conv2d(3, num_classes, 1)

    def forward(self, x):
        return {"out": self.head(x)}


def symmetric_image(h=20, w=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    half = torch.randn(1, 3, h, w // 2, generator=g)
    return torch.cat([half, half.flip(-1)], dim=-1)


# --------------------------------------------------------------------------- inference
def test_flip_tta_on_symmetric_input_equals_single_scale_for_equivariant_model():
    model, x = Pointwise().eval(), symmetric_image()
    single = ev.predict_probs(model, x)
    flipped = ev.predict_probs(model, x, flip=True)
    assert torch.allclose(single, flipped, atol=1e-6)


def test_multiscale_flip_on_constant_input_equals_single_scale():
    model = Pointwise().eval()
    x = torch.ones(1, 3, 24, 24) * torch.tensor([0.3, -1.0, 2.0]).view(1, 3, 1, 1)
    single = ev.predict_probs(model, x)
    ms = ev.predict_probs(model, x, scales=[0.5, 0.75, 1.0, 1.5], flip=True)
    assert torch.allclose(single, ms, atol=1e-6)
    assert torch.allclose(single.sum(1), torch.ones(1, 24, 24), atol=1e-6)


def test_tta_of_real_segmentor_on_symmetric_input_is_symmetric_mean():
    from models.segmentors import build_segmentor
    torch.manual_seed(0)
    model = build_segmentor("fcn", 5, backbone="tiny", channels=8, aux_channels=8,
                            backbone_options={"width": 8}).eval()
    x = symmetric_image(32, 32)
    single = ev.predict_probs(model, x)
    tta = ev.predict_probs(model, x, flip=True)
    # the model itself is not flip-equivariant, but the flip-averaged prediction must be the
    # mean of the prediction and its mirror, hence mirror-symmetric on a symmetric input
    assert torch.allclose(tta, (single + single.flip(-1)) / 2, atol=1e-6)
    assert torch.allclose(tta, tta.flip(-1), atol=1e-6)
    assert not torch.allclose(single, single.flip(-1), atol=1e-4)
    ms = ev.predict_probs(model, x, scales=[0.75, 1.0, 1.25], flip=True)
    assert ms.shape == (1, 5, 32, 32) and torch.allclose(ms, ms.flip(-1), atol=1e-6)


def test_slide_windows_cover_and_match_whole():
    assert ev._window_starts(10, 4, 3) == [0, 3, 6]
    assert ev._window_starts(11, 4, 3) == [0, 3, 6, 7]
    assert ev._window_starts(4, 8, 3) == [0]
    model = Pointwise().eval()
    x = torch.randn(1, 3, 29, 37)
    whole = ev.predict_probs(model, x)
    slide = ev.predict_probs(model, x, mode="slide", crop_size=16, stride=10)
    assert torch.allclose(whole, slide, atol=1e-6)
    with pytest.raises(ValueError, match="stride"):
        ev.slide_logits(model, x, crop=8, stride=9)
    with pytest.raises(ValueError, match="mode"):
        ev.predict_probs(model, x, mode="tiles")


def test_slide_averages_overlapping_logits():
    class Counter(Segmentor):
        """Logit 1 everywhere: averaged overlaps stay 1, summed ones would not."""
        def __init__(self):
            super().__init__()
            self.backbone = nn.Identity()

        def forward(self, x):
            return {"out": torch.ones(x.shape[0], 2, x.shape[2], x.shape[3])}
    logits = ev.slide_logits(Counter(), torch.zeros(1, 3, 20, 20), crop=8, stride=4)
    assert torch.allclose(logits, torch.ones_like(logits))


# --------------------------------------------------------------------------- pictures + tables
def test_overlay_and_grid():
    image = np.full((4, 5, 3), 100, np.uint8)
    mask = np.zeros((4, 5), np.uint8)
    mask[0, 0], mask[1, 1] = 1, 255
    out = ev.overlay(image, mask, alpha=0.5)
    assert np.array_equal(out[1, 1], image[1, 1]) and np.array_equal(out[2, 2], image[2, 2])
    assert np.array_equal(out[0, 0], np.round(0.5 * 100 + 0.5 * np.array([128, 0, 0])).astype(np.uint8))
    grid = ev.preview_grid(image, mask, mask)
    assert grid.shape == (4, 5 * 3 + 8, 3)
    assert np.all(grid[:, 5:9] == 255) and np.array_equal(grid[:, :5], image)
    # void: the ignore label gets the palette's void colour (224, 224, 192)
    shown = ev.overlay(image, mask, alpha=0.5, void=True)
    assert np.array_equal(shown[1, 1], np.round(0.5 * 100 + 0.5 * np.array([224, 224, 192])).astype(np.uint8))
    assert np.array_equal(shown[2, 2], image[2, 2])


def test_map_overlay_tints_by_strongest_class():
    from pipeline.maps_io import ImageMaps
    image = np.full((2, 3, 3), 100, np.uint8)
    maps = np.zeros((2, 2, 3), np.float32)
    maps[0, 0, 0], maps[1, 0, 0] = 0.5, 0.25    # class 1 strongest at (0, 0), m = 0.5
    maps[1, 0, 1] = 1.0                          # class 2 at (0, 1), m = 1
    out = ev.map_overlay(image, ImageMaps(np.array([1, 2]), maps, maps), alpha=0.8)
    red, green = np.array([128, 0, 0]), np.array([0, 128, 0])
    assert np.array_equal(out[0, 0], np.round(0.6 * 100 + 0.4 * red).astype(np.uint8))
    assert np.array_equal(out[0, 1], np.round(0.2 * 100 + 0.8 * green).astype(np.uint8))
    assert np.array_equal(out[1], image[1])      # no activation: the image
    empty = ImageMaps(np.zeros(0, np.int64), np.zeros((0, 2, 3), np.float32), np.zeros((0, 2, 3), np.float32))
    assert np.array_equal(ev.map_overlay(image, empty), image)
    with pytest.raises(ValueError, match="do not fit the image"):
        ev.map_overlay(np.zeros((4, 4, 3), np.uint8), ImageMaps(np.array([1, 2]), maps, maps))
    grid = ev.pipeline_preview(image, ImageMaps(np.array([1, 2]), maps, maps), np.zeros((2, 3), np.uint8),
                               np.zeros((2, 3), np.uint8), np.zeros((2, 3), np.uint8))
    assert grid.shape == (2, 5 * 3 + 4 * 4, 3)


def test_confusion_image_and_tables(tmp_path):
    matrix = np.array([[8, 2], [0, 0]])
    picture = ev.confusion_image(matrix, ["bg", "a"], cell=10)
    assert picture.shape == (28 + 20, 28 + 20, 3)
    # row 0: 80 % on the diagonal is darker than the 20 % cell; the empty row stays white
    assert picture[28 + 5, 28 + 5].sum() < picture[28 + 5, 28 + 15].sum()
    assert np.all(picture[28 + 15, 28 + 5] == 255)
    rows = ev.per_class_rows(["bg", "a"], {
        "m": {"miou": 0.5, "per_class_iou": {"bg": 0.75, "a": 0.25}},
        "pseudo_masks": {"miou": 0.4, "ignore_dropped": {"per_class_iou": {"bg": 0.8, "a": None}}}})
    assert rows == [["class", "m", "pseudo_masks"], ["bg", "75.00", "80.00"], ["a", "25.00", ""],
                    ["mIoU", "50.00", "40.00"]]
    ev.write_tables(tmp_path, rows)
    assert list(csv.reader(open(tmp_path / "per_class_iou.csv"))) == rows
    assert "| bg | 75.00 | 80.00 |" in (tmp_path / "per_class_iou.md").read_text()


# --------------------------------------------------------------------------- with trained models
TINY = {"fcn": {"channels": 16, "aux_channels": 8, "backbone_options": {"width": 16}},
        "deeplab_largefov": {"channels": 64, "dilation": 2, "backbone_options": {"width": 16}}}


def tiny_config(root: Path, iterations: int, models=("fcn",)):
    config = load_config("demo")
    data = {**config.data.model_dump(), "root": str(root / "data"),
            "synthetic": {"num_classes": 3, "num_train": 40, "num_val": 12, "image_size": 48}}
    seg = {**config.segmentor.model_dump(), "models": list(models), "model_options": TINY,
           "iterations": iterations, "batch_size": 8, "crop_size": 48, "scale_range": [0.75, 1.5],
           "lr": 0.02, "warmup_iters": 5, "checkpoint_every": 1000, "log_every": 10, "amp": False,
           "num_workers": 0}
    evaluation = {**config.evaluation.model_dump(), "previews": 2, "crop_size": 32, "stride": 24}
    return config.model_validate({**config.model_dump(), "workdir": str(root / "work"), "data": data,
                                  "segmentor": seg, "evaluation": evaluation})


def gt_mask_dir(config, root: Path) -> Path:
    """The synthetic ground truth copied into a pseudo-mask directory (stage 3 stand-in)."""
    dataset = build_dataset(config.data, config.data.train_split)
    masks = root / "masks"
    masks.mkdir(exist_ok=True)
    for image_id in dataset.ids:
        shutil.copy(dataset.mask_path(image_id), masks / f"{image_id}.png")
    return masks


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    config = tiny_config(root, iterations=4)
    masks = gt_mask_dir(config, root)
    seg_dir = root / "seg"
    ts.run(config, {"refine_crf": StageResult("refine_crf", "k", str(masks))}, seg_dir)
    return root, config, masks, seg_dir


def test_evaluate_segmentor_outputs(trained, tmp_path):
    root, config, _, seg_dir = trained
    val = build_dataset(config.data, "val")
    summary = ev.evaluate_segmentor(seg_dir / "fcn" / ts.MODEL_FILE, val, config.evaluation, tmp_path,
                                    torch.device("cpu"))
    preds = sorted(p.stem for p in (tmp_path / "predictions").glob("*.png"))
    assert preds == sorted(val.ids)
    cm = ConfusionMatrix(val.num_classes)
    for image_id in val.ids:
        cm.update(read_label_png(tmp_path / "predictions" / f"{image_id}.png"), val.load_mask(image_id))
    assert summary["miou"] == pytest.approx(cm.miou())
    stored = json.loads((tmp_path / "confusion_matrix.json").read_text())
    assert stored["matrix"] == cm.matrix.tolist() and stored["classes"] == val.class_names
    assert len(list((tmp_path / "previews").glob("*.png"))) == 2
    with Image.open(tmp_path / "confusion_matrix.png") as im:
        assert im.size[0] > 28
    # a rerun reads the stored predictions back (resume) and gives the same numbers
    (tmp_path / "confusion_matrix.json").unlink()
    again = ev.evaluate_segmentor(seg_dir / "fcn" / ts.MODEL_FILE, val, config.evaluation, tmp_path,
                                  torch.device("cpu"))
    assert again["confusion_matrix"] == summary["confusion_matrix"]


def test_pipeline_previews_show_each_product_and_resume(trained, tmp_path):
    from pipeline.maps_io import load_maps
    root, config, masks, seg_dir = trained
    train = build_dataset(config.data, config.data.train_split)
    maps = gt_maps_dir(config, root)
    mask_copy = tmp_path / "masks"
    shutil.copytree(masks, mask_copy)
    (mask_copy / f"{train.ids[0]}.png").unlink()  # the first image has no pseudo-mask: skipped
    out = tmp_path / "fcn"
    model_path = seg_dir / "fcn" / ts.MODEL_FILE
    chosen = ev.write_pipeline_previews(model_path, train, maps, mask_copy, config.evaluation, out,
                                        torch.device("cpu"))
    assert chosen == train.ids[1:3]
    assert sorted(p.stem for p in (out / "pipeline_previews").glob("*.png")) == chosen
    image_id = chosen[0]
    image, gt = train.load_image(image_id), train.load_mask(image_id)
    model, _ = ts.load_trained(model_path, train.num_classes)
    pred = ev.predict_image(model, image, config.evaluation, torch.device("cpu"))
    expected = ev.side_by_side([image, ev.map_overlay(image, load_maps(maps / f"{image_id}.npy")),
                                ev.overlay(image, read_label_png(mask_copy / f"{image_id}.png"), void=True),
                                ev.overlay(image, pred), ev.overlay(image, gt)])
    assert np.array_equal(np.asarray(Image.open(out / "pipeline_previews" / f"{image_id}.png")), expected)
    # finished previews are kept: a rerun loads no model and rewrites nothing
    stamp = (out / "pipeline_previews" / f"{image_id}.png").stat().st_mtime_ns
    assert ev.write_pipeline_previews(tmp_path / "no-such-model.pt", train, maps, mask_copy,
                                      config.evaluation, out, torch.device("cpu")) == chosen
    assert (out / "pipeline_previews" / f"{image_id}.png").stat().st_mtime_ns == stamp
    # a pseudo-mask of the wrong size is named
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(mask_copy / f"{train.ids[3]}.png")
    shutil.rmtree(out)
    evaluation = config.evaluation.model_copy(update={"previews": 3})
    with pytest.raises(ValueError, match=rf"{train.ids[3]}\.png has size \(5, 5\)"):
        ev.write_pipeline_previews(model_path, train, maps, mask_copy, evaluation, out, torch.device("cpu"))


def test_crf_post_processing_runs(trained, tmp_path):
    from stages.refine_crf import resolve_params
    root, config, _, seg_dir = trained
    val = build_dataset(config.data, "val")
    model, _ = ts.load_trained(seg_dir / "fcn" / ts.MODEL_FILE, val.num_classes)
    image = val.load_image(val.ids[0])
    plain = ev.predict_image(model, image, config.evaluation, torch.device("cpu"))
    refined = ev.predict_image(model, image, config.evaluation, torch.device("cpu"),
                               resolve_params(config.crf))
    assert refined.shape == plain.shape == image.shape[:2] and refined.max() < val.num_classes


def test_checkpoint_class_count_mismatch_is_refused(trained, tmp_path):
    root, config, masks, seg_dir = trained
    bad = tmp_path / "seg"
    shutil.copytree(seg_dir, bad)
    state = load_checkpoint(bad / "fcn" / ts.MODEL_FILE)
    state["num_classes"] = 21
    save_checkpoint(bad / "fcn" / ts.MODEL_FILE, state)
    upstream = {"generate_cams": StageResult("generate_cams", "k", str(tmp_path)),
                "refine_crf": StageResult("refine_crf", "k", str(masks)),
                "train_segmentor": StageResult("train_segmentor", "k", str(bad))}
    with pytest.raises(ValueError, match=r"has 21 classes but the configured dataset has 4"):
        ev.run(config, upstream, tmp_path / "out")
    assert not (tmp_path / "out" / "fcn").exists()


def test_stage_loads_each_segmentor_once(trained, tmp_path, monkeypatch):
    """Scoring and the pipeline previews share one loaded model per segmentor."""
    root, config, masks, seg_dir = trained
    loads, real = [], ev.load_trained
    monkeypatch.setattr(ev, "load_trained", lambda path, **kw: loads.append(Path(path)) or real(path, **kw))
    upstream = {"generate_cams": StageResult("generate_cams", "k", str(gt_maps_dir(config, root))),
                "refine_crf": StageResult("refine_crf", "k", str(masks)),
                "train_segmentor": StageResult("train_segmentor", "k", str(seg_dir))}
    ev.run(config, upstream, tmp_path / "out")
    assert loads == [seg_dir / "fcn" / ts.MODEL_FILE]
    for kind in ("previews", "pipeline_previews"):
        assert len(list((tmp_path / "out" / "fcn" / kind).glob("*.png"))) == config.evaluation.previews


# --------------------------------------------------------------------------- acceptance
def gt_maps_dir(config, root: Path) -> Path:
    """Stage 2 stand-in: per image, one map per present class = its ground-truth region."""
    from pipeline.maps_io import map_path, save_maps
    dataset = build_dataset(config.data, config.data.train_split)
    maps_dir = root / "maps"
    maps_dir.mkdir(exist_ok=True)
    for image_id in dataset.ids:
        mask = dataset.load_mask(image_id)
        classes = [c for c in range(1, dataset.num_classes) if (mask == c).any()]
        maps = np.stack([(mask == c).astype(np.float32) for c in classes]) if classes else \
            np.zeros((0,) + mask.shape, np.float32)
        save_maps(map_path(maps_dir, image_id), classes, maps)
    return maps_dir


ACCEPT = {"sanet": {"backbone_options": {"width": 16}},
          "deeplab_largefov": {"channels": 128, "dilation": 2, "dropout_ratio": 0.0,
                               "backbone_options": {"width": 16}}}


@pytest.mark.slow
def test_two_segmentors_trained_on_masks_beat_chance(tmp_path):
    """Stages 4+5 end to end: SANet and DeepLab-LargeFOV trained briefly on the synthetic
    ground truth (as pseudo-masks) score well above the all-background mIoU on val; the maps
    and pseudo-masks (built from the ground truth here) score 1."""
    config = load_config("demo")
    data = {**config.data.model_dump(), "root": str(tmp_path / "data"),
            "synthetic": {"num_classes": 1, "num_train": 48, "num_val": 16, "image_size": 48}}
    seg = {**config.segmentor.model_dump(), "models": ["sanet", "deeplab_largefov"],
           "model_options": ACCEPT, "iterations": 120, "batch_size": 8, "crop_size": 48,
           "scale_range": [0.75, 1.5], "lr": 0.1, "warmup_iters": 0, "checkpoint_every": 1000,
           "log_every": 20, "amp": False, "num_workers": 0}
    evaluation = {**config.evaluation.model_dump(), "previews": 3}
    config = config.model_validate({**config.model_dump(), "workdir": str(tmp_path / "work"),
                                    "data": data, "segmentor": seg, "evaluation": evaluation})
    masks, maps = gt_mask_dir(config, tmp_path), gt_maps_dir(config, tmp_path)
    tracker = MemoryTracker()
    seg_result = ts.run(config, {"refine_crf": StageResult("refine_crf", "k", str(masks))},
                        tmp_path / "seg", tracker.child("train_segmentor"))
    for name in ("sanet", "deeplab_largefov"):
        losses = tracker.children["train_segmentor"].children[name].history("loss")
        assert losses[-1] < losses[0], f"{name} loss did not decrease: {losses}"
    upstream = {"generate_cams": StageResult("generate_cams", "k", str(maps)),
                "refine_crf": StageResult("refine_crf", "k", str(masks)),
                "train_segmentor": seg_result}
    result = ev.run(config, upstream, tmp_path / "eval", tracker.child("evaluate"))
    m = result.metrics
    assert m["maps_miou"] == pytest.approx(1.0) and m["pseudo_mask_miou"] == pytest.approx(1.0)
    stored = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert stored["conventions"]["segmentor_split"] == "val"
    logged = tracker.children["evaluate"]
    assert logged.history("pseudo_mask_iou/background") == [pytest.approx(1.0)]
    for name in ("sanet", "deeplab_largefov"):
        per_class = stored["scores"][name]["per_class_iou"]
        assert {k: logged.children[name].history(f"iou/{k}") for k in per_class if per_class[k] is not None} \
            == {k: [pytest.approx(v)] for k, v in per_class.items() if v is not None}
        chance = stored["scores"][name]["all_background_miou"]
        assert m[f"{name}_miou"] > chance + 0.1, (name, m[f"{name}_miou"], chance)
        assert len(list((tmp_path / "eval" / name / "previews").glob("*.png"))) == 3
        assert len(list((tmp_path / "eval" / name / "pipeline_previews").glob("*.png"))) == 3
        assert result.files[f"{name}_pipeline_previews"] == f"{name}/pipeline_previews"
        assert (tmp_path / "eval" / name / "confusion_matrix.png").is_file()
    table = (tmp_path / "eval" / "per_class_iou.md").read_text()
    assert "| background |" in table and "sanet" in table and "pseudo_masks" in table
    assert "sanet" in m["headline"] and "pseudo-masks 100.0" in m["headline"]

