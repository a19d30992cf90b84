"""Synthetic generator, pair sampler, class index, joint transforms and the ``wsss data`` CLI."""

import json
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
from torchvision import tv_tensors

from pipeline.cli import main
from pipeline.config import SyntheticConfig
from pipeline.data import generate_synthetic, is_generated, voc_dataset
from pipeline.data.palette import read_label_png, save_label_png
from pipeline.data.pairs import PairSampler, class_index, related_images
from pipeline.data.transforms import eval_transform, normalize, resize_transform, train_transform

SYN = SyntheticConfig(num_classes=4, num_train=5, num_val=3, image_size=40, seed=7)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- synthetic
def test_synthetic_same_config_byte_identical(tmp_path):
    generate_synthetic(tmp_path / "a", SYN)
    generate_synthetic(tmp_path / "b", SYN)
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert len(a) == 5 + 5 + 3 + 3 + 2 + 1             # jpg + png per image, 2 lists, dataset.json
    assert a == b
    generate_synthetic(tmp_path / "c", SYN.model_copy(update={"seed": 8}))
    c = _files(tmp_path / "c")
    assert c["JPEGImages/train_00000.jpg"] != a["JPEGImages/train_00000.jpg"]


def test_synthetic_layout_and_unfinished_tree_regenerated(tmp_path):
    root = tmp_path / "syn"
    meta = generate_synthetic(root, SYN)
    assert meta["class_names"][0] == "background" and len(meta["class_names"]) == 5
    assert is_generated(root, SYN) and not is_generated(root, SYN.model_copy(update={"num_val": 2}))
    ds = voc_dataset(root, "val")
    assert ds.class_names == meta["class_names"]
    masks = np.stack([ds.load_mask(i) for i in ds.ids])
    assert set(np.unique(masks).tolist()) <= set(range(5))
    # shapes are not trivial: objects cover part of the image, never all of it
    coverage = (masks > 0).mean(axis=(1, 2))
    assert ((coverage > 0.01) & (coverage < 0.95)).all()
    (root / "dataset.json").unlink()                    # interrupted generation
    (root / "JPEGImages" / "val_00001.jpg").write_bytes(b"half")
    generate_synthetic(root, SYN)
    assert is_generated(root, SYN)
    voc_dataset(root, "val").validate()


def test_synthetic_colour_not_separating_classes(tmp_path):
    """Colours vary per instance: mean colours of one class spread widely."""
    root = tmp_path / "syn"
    generate_synthetic(root, SyntheticConfig(num_classes=2, num_train=12, num_val=1, image_size=48, seed=1))
    ds = voc_dataset(root, "train")
    means = {1: [], 2: []}
    for item in ds.ids:
        image, mask = ds.load_pair(item)
        for c in (1, 2):
            if (mask == c).sum() > 20:
                means[c].append(image[mask == c].mean(axis=0))
    for c, values in means.items():
        assert len(values) >= 2
        assert np.ptp(np.stack(values), axis=0).max() > 40, c


# --------------------------------------------------------------------------- pairs
LABELS = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 1], [0, 0, 1], [1, 0, 1], [0, 1, 0], [1, 0, 0]],
                  dtype=np.float32)


def test_class_index_and_related_images():
    index = class_index(LABELS)
    assert index == {0: [0, 1, 5, 7], 1: [1, 2, 6], 2: [3, 4, 5]}
    rng = np.random.default_rng(0)
    related = related_images(index, 1, 1, 50, rng)
    assert len(related) == 50 and set(related) == {2, 6}     # class 1 images other than 1
    assert related_images({0: [3]}, 3, 0, 2, rng) == [3, 3]    # alone: itself
    assert related_images(index, 0, 0, 0, rng) == []
    with pytest.raises(ValueError, match="class 9"):
        related_images(index, 0, 9, 1, rng)


def test_pair_sampler_partners_share_a_label_and_are_seeded():
    sampler = PairSampler(LABELS, seed=5)
    for epoch in range(5):
        pairs = sampler.pairs(epoch)
        assert sorted(i for i, _ in pairs) == list(range(8))
        for i, j in pairs:
            assert i != j and (LABELS[i] * LABELS[j]).sum() >= 1
    assert sampler.pairs(3) == PairSampler(LABELS, seed=5).pairs(3)
    assert sampler.pairs(0) != sampler.pairs(1) or sampler.pairs(0) != sampler.pairs(2)
    assert PairSampler(LABELS, seed=6).pairs(0) != sampler.pairs(0) or \
        PairSampler(LABELS, seed=7).pairs(0) != sampler.pairs(0)


def test_pair_sampler_random_fraction():
    n = 400
    rng = np.random.default_rng(0)
    labels = np.eye(4, dtype=np.float32)[rng.integers(0, 4, n)]   # one label per image
    for fraction in (0.0, 0.5):
        pairs = PairSampler(labels, random_fraction=fraction, seed=1).pairs(0)
        unrelated = sum((labels[i] * labels[j]).sum() == 0 for i, j in pairs)
        # random partners share the single label with probability ~1/4
        expected = fraction * n * 0.75
        assert abs(unrelated - expected) <= 0.2 * n * fraction + 1e-9, (fraction, unrelated)
    with pytest.raises(ValueError, match="random_fraction"):
        PairSampler(labels, random_fraction=1.5)


# --------------------------------------------------------------------------- transforms
def _coded_pair(h=24, w=32):
    """Mask of 8-px blocks with values 0..5; image channel 0 = 40 * mask (so image encodes mask)."""
    yy, xx = np.mgrid[0:h, 0:w]
    mask = ((yy // 8) * 3 + xx // 8) % 6
    image = np.stack([40 * mask, 40 * mask, 255 - 40 * mask]).astype(np.uint8)
    return tv_tensors.Image(torch.from_numpy(image)), tv_tensors.Mask(torch.from_numpy(mask.astype(np.int64)))


def test_train_transform_keeps_alignment_and_pads_255():
    image, mask = _coded_pair()
    torch.manual_seed(0)
    t = train_transform(48, scale_range=(1.0, 1.0), colour_jitter=None)
    padded_seen = False
    for _ in range(10):
        out_image, out_mask = t(image, mask)
        assert out_image.shape == (3, 48, 48) and out_mask.shape == (48, 48)
        assert isinstance(out_mask, tv_tensors.Mask) and out_image.dtype == torch.uint8
        valid = out_mask != 255
        assert torch.equal(out_image[0][valid].long(), 40 * out_mask[valid])
        assert (out_image[:, ~valid] == 0).all()
        padded_seen |= bool((~valid).any())
    assert padded_seen


def test_train_transform_scaled_crop_aligned():
    image, mask = _coded_pair(64, 64)
    torch.manual_seed(1)
    t = train_transform(32, scale_range=(0.5, 2.0), colour_jitter=(0.3, 0.3, 0.3, 0.1))
    for _ in range(5):
        out_image, out_mask = t(image, mask)
        assert out_image.shape == (3, 32, 32)
        assert set(out_mask.unique().tolist()) <= set(range(6)) | {255}
    t = train_transform(32, scale_range=(2.0, 2.0), colour_jitter=None)
    out_image, out_mask = t(image, mask)
    # interior pixels (3x3 neighbourhood of one label): the bilinear image equals the code
    m = out_mask[None, None].float()
    uniform = (torch.nn.functional.max_pool2d(m, 3, 1, 1) == -torch.nn.functional.max_pool2d(-m, 3, 1, 1))[0, 0]
    interior = uniform & (out_mask != 255)
    assert interior.float().mean() > 0.5
    diff = (out_image[0][interior].long() - 40 * out_mask[interior]).abs()
    assert diff.max() <= 4


def test_resize_eval_and_normalize():
    image, mask = _coded_pair()
    out_image, out_mask = resize_transform(16)(image, mask)
    assert out_image.shape == (3, 16, 16) and out_mask.shape == (16, 16)
    assert set(out_mask.unique().tolist()) <= set(range(6))       # nearest: no new labels
    same_image, same_mask = eval_transform()(image, mask)
    assert torch.equal(same_image, image) and torch.equal(same_mask, mask)
    x = normalize(torch.full((3, 2, 2), 255, dtype=torch.uint8))
    expected = (1 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(x[:, 0, 0], expected)


# --------------------------------------------------------------------------- CLI
def _syn_args(root: Path) -> list[str]:
    return ["--config", "demo", "--set", f"data.root={root}", "--set", "data.synthetic.num_train=4",
            "--set", "data.synthetic.num_val=2", "--set", "data.synthetic.image_size=32"]


def test_cli_synth_and_info(tmp_path, capsys):
    root = tmp_path / "syn"
    assert main(["data", "synth", *_syn_args(root)]) == 0
    out = capsys.readouterr().out
    assert str(root.resolve()) in out and "4 train" in out and "2 val" in out
    assert json.loads((root / "dataset.json").read_text())["splits"] == {"train": 4, "val": 2}
    assert main(["data", "info", *_syn_args(root)]) == 0
    out = capsys.readouterr().out
    assert "synthetic train: 4 images, 5 classes" in out and "synthetic val: 2 images" in out
    assert "striped_disk" in out


def test_cli_errors_one_line_exit_2(tmp_path, capsys):
    code = main(["data", "info", "--config", "coco", "--set", f"data.root={tmp_path / 'nowhere'}"])
    err = capsys.readouterr().err
    assert code == 2 and "nowhere" in err and "does not exist" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert main(["data", "info", "--set", "data.bogus=1"]) == 2
    assert "bogus" in capsys.readouterr().err
    assert main(["data", "synth", "--config", "voc"]) == 2


def test_cli_prepare_offline_says_what_to_download(tmp_path, capsys, monkeypatch):
    calls = []

    def offline(url, download_root, extract_root=None, md5=None, **kw):
        calls.append((url, md5))
        raise URLError("no internet")

    monkeypatch.setattr("pipeline.data.commands.download_and_extract_archive", offline)
    voc_root = tmp_path / "VOCdevkit" / "VOC2012"
    assert main(["data", "prepare", "voc", "--set", f"data.root={voc_root}"]) == 1
    err = capsys.readouterr().err
    assert "VOCtrainval_11-May-2012.tar" in err and "6cd6e144f989b92b3379bac3b3de84fd" in err
    assert "benchmark.tgz" in err and str(tmp_path / "downloads") in err
    assert [md5 for _, md5 in calls] == ["6cd6e144f989b92b3379bac3b3de84fd", "82b4d87ceb2ed10f6038a1cba92111cb"]

    assert main(["data", "prepare", "coco", "--set", f"data.root={tmp_path / 'coco'}",
                 "--set", "data.coco_year=2017"]) == 1
    err = capsys.readouterr().err
    for name in ("train2017.zip", "val2017.zip", "annotations_trainval2017.zip"):
        assert name in err
    assert str(tmp_path / "coco" / "downloads") in err
    assert main(["data", "prepare", "voc", "--set", f"data.root={tmp_path / 'elsewhere'}"]) == 2


def test_cli_prepare_voc_lays_out_train_aug(tmp_path, capsys, monkeypatch):
    """Download succeeds (faked): SBD's .mat masks become SegmentationClassAug PNGs and
    train_aug = (SBD train + SBD val + VOC train) - VOC val."""
    from PIL import Image
    from scipy.io import savemat

    base = tmp_path / "data"
    voc = base / "VOCdevkit" / "VOC2012"
    sbd = base / "benchmark_RELEASE" / "dataset"

    def fake_download(url, download_root, extract_root=None, md5=None, **kw):
        assert Path(download_root) == base / "downloads" and Path(extract_root) == base
        if url.endswith(".tar"):
            (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
            (voc / "JPEGImages").mkdir()
            for item in ("a", "b", "c", "d"):
                Image.fromarray(np.zeros((6, 5, 3), np.uint8)).save(voc / "JPEGImages" / f"{item}.jpg")
            for item in ("a", "b"):
                save_label_png(voc / "SegmentationClass" / f"{item}.png", np.full((6, 5), 3, np.uint8))
            (voc / "ImageSets/Segmentation/train.txt").write_text("a\n")
            (voc / "ImageSets/Segmentation/val.txt").write_text("b\n")
        else:
            (sbd / "cls").mkdir(parents=True)
            for item in ("b", "c", "d"):
                seg = np.full((6, 5), 7, np.uint8)
                savemat(sbd / "cls" / f"{item}.mat", {"GTcls": {"Segmentation": seg, "CategoriesPresent": [7]}})
            (sbd / "train.txt").write_text("c\nb\n")
            (sbd / "val.txt").write_text("d\n")

    monkeypatch.setattr("pipeline.data.commands.download_and_extract_archive", fake_download)
    assert main(["data", "prepare", "voc", "--set", f"data.root={voc}"]) == 0
    assert "train_aug: 3 ids" in capsys.readouterr().out
    assert (voc / "ImageSets/Segmentation/train_aug.txt").read_text().split() == ["a", "c", "d"]
    assert (read_label_png(voc / "SegmentationClassAug" / "c.png") == 7).all()      # from SBD
    assert (read_label_png(voc / "SegmentationClassAug" / "b.png") == 3).all()      # VOC's own
    ds = voc_dataset(voc, "train_aug")
    assert ds.ids == ["a", "c", "d"] and ds.labels("c")[6] == 1
