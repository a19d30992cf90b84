"""Stage 2: MCIS maps from cached features, the stage end to end, resume, bad input."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.coattention import CoAttentionClassifier
from pipeline.config import load_config
from pipeline.feature_cache import FeatureCache
from pipeline.maps_io import load_maps, map_path, save_maps, upsample
from pipeline.storage import StageResult
from pipeline.tracking import MemoryTracker
from stages import generate_cams, train_classifier
from stages.generate_cams import (BASE_VIEW, SELF_VIEWS, make_plan, mcis_maps, network_input,
                                  official_aggregate, official_maps, plain_cams, view_features)
from stages.train_classifier import CheckpointError


def small_config(root: Path, *extra):
    return load_config("demo", [
        f"data.root={root}", "data.synthetic.num_train=16", "data.synthetic.num_val=4",
        "data.synthetic.num_classes=3", "data.synthetic.image_size=48", "classifier.image_size=48",
        "classifier.epochs=2", "classifier.batch_size=4", "classifier.feature_channels=16",
        "classifier.backbone_options={width: 8}", "classifier.lr=0.01", "classifier.self_pairs=false",
        "classifier.num_workers=0", "maps.workers=1", "maps.batch_size=4", "device=cpu", *extra])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    out = tmp_path_factory.mktemp("classifier")
    config = small_config(root)
    result = train_classifier.run(config, {}, out, MemoryTracker())
    return root, result


# ------------------------------------------------------------------ the map rule
def _reference_maps(model, x, partners, related, classes, size):
    """Official rule recomputed naively: every pair through model.forward (backbone again)."""
    def to_image(m, flip=False):
        out = F.interpolate(m[None, None], size=size, mode="bicubic", align_corners=False)[0, 0]
        return torch.flip(out, dims=[1]) if flip else out

    def norm(m):
        m = m.clamp(min=0)
        return m / m.max().clamp(min=1e-5)

    result = []
    for c in classes:
        cands = []
        if related[c]:
            logits = torch.stack([model(x, partners[r])["co_m"][0, c] for r in related[c]]).mean(0)
            cands.append((to_image(logits), None))
        flipped = torch.flip(x, dims=[3])
        out = model(x, flipped)
        cands.append((to_image(out["co_m"][0, c]), out["co_m"][0, c].mean()))
        cands.append((to_image(out["co_n"][0, c], flip=True), out["co_n"][0, c].mean()))
        for s in (0.75, 2.0):
            h, w = x.shape[-2:]
            xs = F.interpolate(x, size=(round(h * s), round(w * s)), mode="bilinear", align_corners=False)
            co = model(x, xs)["co_m"][0, c]
            cands.append((to_image(co), co.mean()))
        total = sum(norm(m) for i, (m, s) in enumerate(cands) if i == 0 or torch.sigmoid(s) > 0.1)
        result.append(total / len(cands))
    return torch.stack(result).clamp(0, 1)


def test_cached_feature_maps_equal_recomputed():
    torch.manual_seed(0)
    model = CoAttentionClassifier(3, backbone="tiny", feature_channels=16,
                                  backbone_options={"width": 8}).eval()
    x = torch.randn(1, 3, 40, 48)
    partners_x = {"a": torch.randn(1, 3, 40, 48), "b": torch.randn(1, 3, 32, 32)}
    related = {0: ["a", "b", "a"], 2: ["b"]}
    with torch.no_grad():
        cache = {name: model.features(p) for name, p in partners_x.items()}   # computed once each
        feats = view_features(model, x, [BASE_VIEW, *SELF_VIEWS])
        ours = mcis_maps(model, feats, [BASE_VIEW], [0, 2], related, cache, (50, 60), self_pairs=True)
        ref = _reference_maps(model, x, partners_x, related, [0, 2], (50, 60))
    assert ours.shape == (2, 50, 60)
    assert torch.allclose(ours, ref, atol=1e-4)
    assert ours.min() >= 0 and ours.max() <= 1


def test_backbone_runs_once_per_view(monkeypatch):
    model = CoAttentionClassifier(3, backbone="tiny", feature_channels=8,
                                  backbone_options={"width": 4}).eval()
    calls = []
    original = model.backbone.forward
    monkeypatch.setattr(model.backbone, "forward", lambda x: calls.append(x.shape) or original(x))
    x = torch.randn(1, 3, 32, 32)
    views = [(1.0, False), (1.0, True), (0.5, False)]
    feats = view_features(model, x, list(dict.fromkeys(views + [BASE_VIEW, *SELF_VIEWS])))
    cache = {"p": model.features(torch.randn(1, 3, 32, 32))}
    calls.clear()
    mcis_maps(model, feats, views, [1], {1: ["p", "p", "p"]}, cache, (32, 32), self_pairs=True)
    plain_cams(model, feats, views, [1], (32, 32))
    assert calls == []          # pairs and CAMs never run the backbone again


def test_plain_cams_normalised_and_flip_consistent():
    torch.manual_seed(0)
    model = CoAttentionClassifier(2, backbone="tiny", feature_channels=8,
                                  backbone_options={"width": 4}).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        feats = view_features(model, x, [(1.0, False), (1.0, True)])
        cams = plain_cams(model, feats, [(1.0, False), (1.0, True)], [0, 1], (32, 32))
        # a symmetric input gives a symmetric flip-averaged CAM
        sym = torch.cat([x[..., :16], torch.flip(x[..., :16], dims=[3])], dim=3)
        f_sym = view_features(model, sym, [(1.0, False), (1.0, True)])
        c_sym = plain_cams(model, f_sym, [(1.0, False), (1.0, True)], [0], (32, 32))
    assert cams.shape == (2, 32, 32)
    assert torch.allclose(cams.flatten(1).amax(1), torch.ones(2), atol=1e-5) or cams.max() == 0
    assert torch.allclose(c_sym, torch.flip(c_sym, dims=[2]), atol=1e-5)


def _official_aggregate_np(list_atten):
    """Transcription of the official test.py ``aggregate`` (without its uint8 cast)."""
    att = list_atten[0].copy()
    att[att < 0] = 0
    att = att / (att.max() + 1e-8) * 255
    for i in list_atten[1:]:
        if 1 / (1 + np.exp(-np.mean(i))) > 0.1:
            att_more = i.copy()
            att_more[att_more < 0] = 0
            att_more = att_more / (att_more.max() + 1e-8) * 255
            att = att_more + att
    return att / len(list_atten)


def test_official_aggregate_order_and_gate():
    first = -np.ones((4, 4), np.float32) * 5        # mean far below the gate, but first: kept
    first[1, 2] = 2.0
    gated_out = -np.ones((4, 4), np.float32) * 3     # sigmoid(-3) = 0.047 < 0.1: dropped
    gated_out[0, 0] = 9.0
    kept = np.zeros((4, 4), np.float32)
    kept[3, 3] = 4.0                                 # sigmoid(0.25) > 0.1: kept
    cands = [first, gated_out, kept]
    ours = official_aggregate([torch.from_numpy(c)[None] for c in cands])[0].numpy()
    ref = _official_aggregate_np(cands) / 255
    assert np.allclose(ours, ref, atol=1e-6)
    assert ours[1, 2] == pytest.approx(1 / 3) and ours[3, 3] == pytest.approx(1 / 3) and ours[0, 0] == 0
    # the first map is the one that always counts: reversed order drops `first` instead
    rev = official_aggregate([torch.from_numpy(c)[None] for c in cands[::-1]])[0].numpy()
    assert rev[1, 2] == 0 and np.allclose(rev, _official_aggregate_np(cands[::-1]) / 255, atol=1e-6)


def test_official_maps_equal_a_transcription_of_test_py():
    """Candidates [co_feature2_1, co_feature2_2 (flipped back), co_feature3_2 and co_feature4_2
    (the copies' sides, bicubic to 32x32 here 6x6), related average], aggregated, resized."""
    torch.manual_seed(0)
    model = CoAttentionClassifier(3, backbone="tiny", feature_channels=16,
                                  backbone_options={"width": 8}).eval()
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (37, 53, 3), dtype=np.uint8)
    partner_images = {"a": rng.integers(0, 255, (40, 30, 3), dtype=np.uint8),
                      "b": rng.integers(0, 255, (20, 64, 3), dtype=np.uint8)}
    side = 48
    x = network_input(image, side)
    copies_x = [network_input(image, side, flip=True), network_input(image, int(side * 0.75)),
                network_input(image, 2 * side)]
    partners_x = {n: network_input(im, side) for n, im in partner_images.items()}
    related = {0: ["a", "b", "a"], 2: ["b", "b", "b"]}
    classes, size = [0, 2], (37, 53)
    with torch.no_grad():
        ours = official_maps(model, model.features(x), [model.features(c) for c in copies_x], classes,
                             related, {n: model.features(p) for n, p in partners_x.items()}, 3)
        # reference: every pair through model.forward, as test.py calls model(img)
        out2 = model(x, copies_x[0])
        co2_1, co2_2 = out2["co_m"][0], out2["co_n"][0].flip(2)
        h, w = co2_1.shape[-2:]
        co3_2 = F.interpolate(model(x, copies_x[1])["co_n"], (h, w), mode="bicubic", align_corners=False)[0]
        co4_2 = F.interpolate(model(x, copies_x[2])["co_n"], (h, w), mode="bicubic", align_corners=False)[0]
        ref = []
        for c in classes:
            rel = torch.stack([model(x, partners_x[r])["co_m"][0] for r in related[c]]).mean(0)
            cands = [m[c].numpy() for m in (co2_1, co2_2, co3_2, co4_2, rel)]
            ref.append(torch.from_numpy(_official_aggregate_np(cands) / 255).float())
    ref = torch.stack(ref)
    assert ours.shape == (2, h, w)                   # at feature resolution (the official 32x32)
    assert torch.allclose(ours, ref, atol=1e-4)
    # upsampled on read as test.py resizes: bicubic to the image, clipped to [0, 1]
    full = upsample(ours.numpy(), size)
    expected = F.interpolate(ref[:, None], size, mode="bicubic", align_corners=False)[:, 0].clamp(0, 1)
    assert full.shape == (2, 37, 53) and np.allclose(full, expected.numpy(), atol=1e-4)


def test_network_input_squashes_like_pil():
    """The official loader squashes with PIL's bilinear resize; ours (antialiased, on uint8)
    agrees within a grey level or two."""
    from PIL import Image
    from pipeline.data.transforms import normalize
    image = np.random.default_rng(1).integers(0, 255, (75, 100, 3), dtype=np.uint8)
    for side in (32, 192):
        pil = np.asarray(Image.fromarray(image).resize((side, side), Image.BILINEAR))
        ref = normalize(torch.from_numpy(pil.copy()).permute(2, 0, 1))[None]
        ours = network_input(image, side)
        assert ours.shape == (1, 3, side, side)
        assert (ours - ref).abs().max() < 3 / 255 / 0.224


# ------------------------------------------------------------------ planning
class LabelsOnly:
    def __init__(self, labels):
        self._labels = np.asarray(labels, np.float32)
        self.ids = [f"im{i}" for i in range(len(self._labels))]

    def __len__(self):
        return len(self.ids)

    def label_matrix(self):
        return self._labels


def test_plan_counts_unlabelled_short_and_lonely():
    labels = [[1, 0, 0], [1, 1, 0], [0, 0, 0], [1, 0, 1], [1, 0, 0], [1, 0, 0]]
    plan = make_plan(LabelsOnly(labels), k=3, seed=0)
    assert plan.unlabelled == 1 and "im2" not in plan.classes
    assert plan.classes["im1"] == [0, 1]
    assert len(plan.related["im0"][0]) == 3 and "im0" not in plan.related["im0"][0]
    assert all("im0" != r for r in plan.related["im0"][0])
    # class 1 only in im1, class 2 only in im3: no other image of the class
    assert plan.related["im1"][1] == [] and plan.related["im3"][2] == []
    assert plan.lonely_classes == 2
    plan = make_plan(LabelsOnly(labels), k=6, seed=0)     # class 0 has 4 others < 6
    assert plan.short_classes == 5 and sorted(plan.related["im0"][0]) == ["im1", "im3", "im4", "im5"]
    again = make_plan(LabelsOnly(labels), k=3, seed=0)
    assert again.related == make_plan(LabelsOnly(labels), k=3, seed=0).related   # seeded


def test_plan_pool_draws_from_the_nearest_in_a_seeded_order():
    labels = [[1, 0]] * 40 + [[0, 1]] * 3 + [[1, 1]]
    plan = make_plan(LabelsOnly(labels), k=3, seed=0, pool=4)
    assert sorted(plan.ids) == sorted(f"im{i}" for i in range(44)) and plan.ids != sorted(plan.ids)
    position = {item: p for p, item in enumerate(plan.ids)}
    class0 = sorted((i for i in plan.ids if i != "im40" and int(i[2:]) < 40 or i == "im43"),
                    key=position.get)
    for item in class0:
        rank = class0.index(item)
        allowed = set(class0[max(0, min(rank - 2, len(class0) - 5)):][:5]) - {item}
        assert len(allowed) == 4 and set(plan.related[item][0]) <= allowed, item
    # a class with fewer images than the pool draws from all of them
    assert set(plan.related["im43"][1]) <= {"im40", "im41", "im42"}
    whole = make_plan(LabelsOnly(labels), k=3, seed=0, pool=0)
    assert whole.ids == plan.ids                         # same order, wider draw
    spread = {r for item in class0 for r in whole.related[item][0]}
    assert len(spread) > 20


def test_feature_cache_drops_after_last_use_and_evicts_furthest():
    t = torch.zeros(256, dtype=torch.float16)            # 512 bytes each
    uses = {"a": [0, 1], "b": [0, 5], "c": [2], "d": [3, 4]}
    cache = FeatureCache(uses, capacity_bytes=2 * 512)
    cache.put("a", t, 0)
    cache.put("b", t, 0)
    cache.release(0)
    assert "a" in cache and "b" in cache                 # a is used again at 1
    cache.release(1)
    assert "a" not in cache and "b" in cache and cache.bytes == 512
    cache.put("c", t, 2)
    cache.put("d", t, 3, keep={"c"})                     # full: b (next use 5) goes, not c
    assert "b" not in cache and "c" in cache and "d" in cache
    cache.put("b", t, 5)                                 # needed again: recomputed
    assert cache.stats()["recomputed"] == 1 and cache.peak_bytes == 2 * 512
    with pytest.raises(ValueError, match="capacity"):
        FeatureCache(uses, 0)


def test_map_files_at_feature_resolution_upsample_on_read(tmp_path):
    small = np.array([[[0.0, 1.0], [0.5, 0.25]]], np.float32)
    save_maps(tmp_path / "x.npy", [2], small, small * 0.5, size=(6, 9))
    record = load_maps(tmp_path / "x.npy")
    expected = F.interpolate(torch.from_numpy(small)[:, None], (6, 9), mode="bicubic",
                             align_corners=False)[:, 0].clamp(0, 1).numpy()
    assert record.size == (6, 9) and np.allclose(record.maps, expected, atol=1e-3)
    half = F.interpolate(torch.from_numpy(small * 0.5)[:, None], (6, 9), mode="bicubic",
                         align_corners=False)[:, 0].clamp(0, 1).numpy()
    assert np.allclose(record.cams, half, atol=1e-3)
    from pipeline.maps_io import map_header
    assert map_header(tmp_path / "x.npy")[1] == (6, 9)
    save_maps(tmp_path / "full.npy", [2], expected, half)
    grown = (tmp_path / "full.npy").stat().st_size - (tmp_path / "x.npy").stat().st_size
    assert grown == 2 * 2 * (6 * 9 - 2 * 2)              # float16 maps + cams at 6 x 9, not 2 x 2
    assert load_maps(tmp_path / "full.npy").size == (6, 9)


# ------------------------------------------------------------------ the stage
def test_stage_writes_maps_scores_and_resumes(trained, tmp_path):
    root, classifier = trained
    config = small_config(root, "maps.protocol=multiscale", "maps.image_size=null",
                          "maps.scales=[1.0, 0.5]", "maps.flip=true")
    tracker = MemoryTracker()
    result = generate_cams.run(config, {"train_classifier": classifier}, tmp_path, tracker)
    from pipeline.data import build_dataset
    dataset = build_dataset(config.data, "train")
    for item in dataset.ids:
        record = load_maps(map_path(tmp_path, item))
        assert record.size == dataset.load_mask(item).shape
        assert record.classes.tolist() == (np.flatnonzero(dataset.labels(item)) + 1).tolist()
        for maps in (record.maps, record.cams):
            assert maps.min() >= 0 and maps.max() <= 1
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".npy")) == ["map_eval.json"]
    assert result.metrics["features_computed"] == len(dataset.ids)     # once each
    assert result.metrics["features_recomputed"] == 0
    metrics = result.metrics
    assert {"headline", "maps_miou", "cams_miou", "background_miou"} <= set(metrics)
    assert "MCIS maps" in metrics["headline"] and (tmp_path / "map_eval.json").is_file()

    # resume: a deleted map is recomputed identically, the others are skipped
    victim = map_path(tmp_path, dataset.ids[3])
    before = load_maps(victim)
    victim.unlink()
    again = generate_cams.run(config, {"train_classifier": classifier}, tmp_path, MemoryTracker())
    assert again.metrics["resumed_skipped"] == len(dataset.ids) - 1
    after = load_maps(victim)
    # batch composition differs on the rerun (1 image vs 4): equal up to float16 rounding
    assert np.allclose(before.maps, after.maps, atol=2e-3) and np.allclose(before.cams, after.cams, atol=2e-3)


def test_official_protocol_stage(trained, tmp_path):
    """Default protocol: images squashed to the classifier's size, maps back at image size."""
    root, classifier = trained
    config = small_config(root)
    assert config.maps.protocol == "official"
    result = generate_cams.run(config, {"train_classifier": classifier}, tmp_path, MemoryTracker())
    from pipeline.data import build_dataset
    dataset = build_dataset(config.data, "train")
    for item in dataset.ids[:4]:
        record = load_maps(map_path(tmp_path, item))
        assert record.size == dataset.load_mask(item).shape
        assert record.maps.min() >= 0 and record.maps.max() <= 1 and record.maps.max() > 0
    assert result.metrics["maps_miou"] >= 0


def test_two_worker_processes_give_the_same_maps(trained, tmp_path):
    root, classifier = trained
    one = small_config(root)
    two = small_config(root, "maps.workers=2")
    generate_cams.run(one, {"train_classifier": classifier}, tmp_path / "one", MemoryTracker())
    generate_cams.run(two, {"train_classifier": classifier}, tmp_path / "two", MemoryTracker())
    for path in sorted((tmp_path / "one").glob("*.npy")):
        a, b = load_maps(path), load_maps(tmp_path / "two" / path.name)
        assert np.allclose(a.maps, b.maps, atol=2e-3) and np.allclose(a.cams, b.cams, atol=2e-3)


def test_bad_checkpoint_inputs(trained, tmp_path):
    root, classifier = trained
    upstream = {"train_classifier": classifier}
    with pytest.raises(CheckpointError, match="checkpoint_epoch=7.*epochs \\[1, 2\\]"):
        generate_cams.run(small_config(root, "classifier.epochs=7", "maps.checkpoint_epoch=7"), upstream,
                          tmp_path, MemoryTracker())
    with pytest.raises(CheckpointError, match="backbone 'tiny'.*'resnet50' is expected"):
        generate_cams.run(small_config(root, "classifier.backbone=resnet50"), upstream, tmp_path,
                          MemoryTracker())
    other = small_config(tmp_path / "data4", "data.synthetic.num_classes=4")
    with pytest.raises(CheckpointError, match="3 classes.*4 foreground"):
        generate_cams.run(other, upstream, tmp_path / "out", MemoryTracker())
    assert not list((tmp_path / "out").glob("*.npy")) if (tmp_path / "out").exists() else True
    with pytest.raises(CheckpointError, match="no classifier checkpoint"):
        generate_cams.run(small_config(root), {"train_classifier": StageResult(
            "train_classifier", "k", str(tmp_path / "empty"))}, tmp_path, MemoryTracker())


def test_cam_method_writes_plain_cams_as_maps(tmp_path):
    root = tmp_path / "data"
    config = small_config(root, "classifier.method=cam", "classifier.epochs=1")
    stage1 = train_classifier.run(config, {}, tmp_path / "cls", MemoryTracker())
    result = generate_cams.run(config, {"train_classifier": stage1}, tmp_path / "maps", MemoryTracker())
    files = sorted((tmp_path / "maps").glob("*.npy"))
    assert files and result.metrics["features_computed"] == len(files)     # no partners
    for path in files:
        record = load_maps(path)
        assert np.array_equal(record.maps, record.cams)
