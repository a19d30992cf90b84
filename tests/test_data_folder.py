"""The ``folder`` dataset (images/ + labels file, masks optional): reading, splits, errors
naming file and line, ``wsss data info``, and the five stages on a folder set without masks."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import DataConfig, SyntheticConfig, load_config
from pipeline.data import DatasetError, build_dataset
from pipeline.data.folder import folder_dataset, hash_split, write_folder_dataset
from pipeline.data.voc import voc_dataset

SYN = SyntheticConfig(num_classes=3, num_train=10, num_val=6, image_size=48, seed=3)


@pytest.fixture(scope="module")
def folder_base(generated, tmp_path_factory):
    """The synthetic tree written as a folder dataset, nested over 2 directories, no masks."""
    root = tmp_path_factory.mktemp("folder") / "set"
    for split in ("train", "val"):
        write_folder_dataset(voc_dataset(generated, split, name="synthetic"), root, split=split, nest=2)
    return root


@pytest.fixture
def folder(folder_base, tmp_path):
    root = tmp_path / "set"
    shutil.copytree(folder_base, root)
    return root


def data_cfg(root, **extra) -> DataConfig:
    return DataConfig(dataset="folder", root=root, **extra)


def test_reads_images_labels_and_split_column(folder, generated):
    synthetic = voc_dataset(generated, "train", name="synthetic")
    ds = build_dataset(data_cfg(folder), "train")
    assert not ds.has_masks and len(ds) == 10
    assert ds.class_names == ["background"] + sorted(synthetic.class_names[1:])
    assert ds.ids[0] == "group0__train_00000" and ds.ids[1] == "group1__train_00001"
    for item, syn_id in zip(ds.ids, synthetic.ids):
        expected = {synthetic.class_names[c + 1] for c in np.flatnonzero(synthetic.labels(syn_id))}
        assert {ds.class_names[c + 1] for c in np.flatnonzero(ds.labels(item))} == expected
        assert np.array_equal(ds.load_image(item), synthetic.load_image(syn_id))
    sample = ds[0]
    assert sample["mask"].shape == sample["image"].shape[1:] and (sample["mask"] == 255).all()
    with pytest.raises(DatasetError, match="no masks"):
        ds.load_mask(ds.ids[0])
    assert len(build_dataset(data_cfg(folder), "all")) == 16
    ds.validate()
    ds.check_headers()


def test_configured_class_order_and_hash_split(folder):
    lines = (folder / "labels.csv").read_text().splitlines()
    (folder / "labels.csv").write_text("\n".join(l.rsplit(",", 1)[0].replace(";", "|") for l in lines) + "\n")
    names = sorted({n for l in lines[1:] for n in l.split(",")[1].split(";")}, reverse=True)
    train = build_dataset(data_cfg(folder, classes=names, val_fraction=0.3), "train")
    val = build_dataset(data_cfg(folder, classes=names, val_fraction=0.3), "val")
    assert train.class_names == ["background"] + names
    assert sorted(train.ids + val.ids) == sorted(build_dataset(data_cfg(folder), "all").ids)
    assert set(train.ids).isdisjoint(val.ids)
    assert all(hash_split(i, 0.3, 0) == "val" for i in val.ids)
    other = build_dataset(data_cfg(folder, classes=names, val_fraction=0.3, split_seed=1), "val")
    assert other.ids != val.ids
    with pytest.raises(DatasetError, match="split 'test' unknown"):
        build_dataset(data_cfg(folder), "test")


def test_json_lines(folder):
    rows = [l.split(",") for l in (folder / "labels.csv").read_text().splitlines()[1:]]
    (folder / "labels.csv").unlink()
    (folder / "labels.jsonl").write_text("\n".join(
        json.dumps({"image": r[0].rsplit(".", 1)[0], "labels": r[1].split(";"), "split": r[2]})
        for r in rows) + "\n")
    assert len(build_dataset(data_cfg(folder), "val")) == 6
    with open(folder / "labels.jsonl", "a") as f:
        f.write('{"image": "x.jpg"\n')
    with pytest.raises(DatasetError, match=r"labels.jsonl:17: not valid JSON"):
        build_dataset(data_cfg(folder), "val")


@pytest.mark.parametrize("edit, message", [
    (lambda l: l[:3] + ["group0/nothere.jpg,a_b,train"] + l[3:], r"labels.csv:4: image 'group0/nothere.jpg' does not exist"),
    (lambda l: l + [l[2]], r"labels.csv:18: image 'group1/train_00001.jpg' is listed twice \(first at line 3\)"),
    (lambda l: l[:5] + [l[5].split(",")[0] + ",,train"] + l[6:], r"labels.csv:6: image 'group0/train_00004.jpg' has no labels"),
    (lambda l: l[:-1], r"1 image\(s\) under .*images have no labels \(no row\): group1/val_00005.jpg"),
    (lambda l: ["file,labels"] + l[1:], r"labels.csv:1: the header must name the columns 'image' and 'labels'"),
    (lambda l: l[:2] + [l[2].replace(",train", ",")] + l[3:], r"labels.csv:3: .* has an empty split"),
])
def test_bad_rows_name_file_and_line(folder, edit, message):
    path = folder / "labels.csv"
    path.write_text("\n".join(edit(path.read_text().splitlines())) + "\n")
    with pytest.raises(DatasetError, match=message):
        build_dataset(data_cfg(folder), "train")


def test_unknown_class_and_duplicate_id(folder):
    with pytest.raises(DatasetError, match=r"labels.csv:\d+: unknown class\(es\) '.*' \(data.classes: a, b\)"):
        build_dataset(data_cfg(folder, classes=["a", "b"]), "train")
    shutil.copyfile(folder / "images/group0/train_00000.jpg", folder / "images/group0/train_00000.png")
    path = folder / "labels.csv"
    path.write_text(path.read_text() + "group0/train_00000.png,x,train\n")
    with pytest.raises(DatasetError, match=r"labels.csv:18: image 'group0/train_00000.png' has the id "
                                           r"'group0__train_00000' of line 2"):
        build_dataset(data_cfg(folder), "train")


def test_unreadable_image_fails_data_info_before_compute(folder, capsys):
    from pipeline.cli import main

    (folder / "images/group1/val_00003.jpg").write_bytes(b"not an image")
    args = ["data", "info", "--set", "data.dataset=folder", "--set", f"data.root={folder}"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "val_00003.jpg" in err and "unreadable" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(DatasetError, match="val_00003.jpg"):
        build_dataset(data_cfg(folder), "val").check_headers()


def test_masks_used_when_present_all_or_none(folder, generated):
    synthetic = voc_dataset(generated, "val", name="synthetic")
    for index, item in enumerate(synthetic.ids):
        from pipeline.data.palette import save_label_png
        save_label_png(folder / "masks" / f"group{index % 2}" / f"{item}.png", synthetic.load_mask(item))
    val = build_dataset(data_cfg(folder), "val")
    assert val.has_masks and np.array_equal(val.load_mask(val.ids[0]), synthetic.load_mask(synthetic.ids[0]))
    assert not build_dataset(data_cfg(folder), "train").has_masks     # masks per split
    (folder / "masks/group1/val_00001.png").unlink()
    with pytest.raises(DatasetError, match=r"5 of the 6 images of split 'val' have a mask.*val_00001.png"):
        build_dataset(data_cfg(folder), "val")


TINY = [
    "classifier.epochs=1", "classifier.image_size=48", "classifier.lr_steps=[1]",
    "classifier.contrastive_from_epoch=0", "maps.workers=1", "crf.workers=1",
    "segmentor.iterations=4", "segmentor.crop_size=48", "segmentor.checkpoint_every=4",
    "segmentor.warmup_iters=2", "segmentor.log_every=2", "segmentor.models=[fcn]",
    "segmentor.model_options={fcn: {channels: 16, aux_channels: 8}}",
    "evaluation.crop_size=48", "evaluation.previews=2",
]


def test_five_stages_without_masks(folder, tmp_path, one_thread):
    import stages

    config = load_config("demo", [f"workdir={tmp_path / 'work'}", "data.dataset=folder",
                                  f"data.root={folder}", *TINY])
    assert stages.check_run_inputs(config) == ["train", "val"]
    results = stages.run_pipeline(config)
    assert "not scored" in results["generate_cams"].metrics["headline"]
    assert results["refine_crf"].metrics["miou"] is None
    evaluation = results["evaluate"]
    out = Path(evaluation.path)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["masks"]["absent"] == ["folder val", "folder train"]
    assert set(metrics["label_agreement"]) == {"classifier", "fcn"}
    assert metrics["label_agreement"]["classifier"]["images"] == 6
    assert 0 <= metrics["scores"]["pseudo_masks"]["labelled_fraction"] <= 1
    assert evaluation.metrics["fcn_miou"] is None and evaluation.metrics["fcn_label_f1"] is not None
    assert "no ground-truth masks" in evaluation.metrics["headline"]
    assert len(list((out / "fcn" / "predictions").glob("*.png"))) == 6
    assert (out / "label_agreement.md").is_file() and not (out / "per_class_iou.csv").exists()


def test_five_stages_with_masks_score_everything(generated, tmp_path, one_thread):
    import stages

    root = tmp_path / "set"
    for split in ("train", "val"):
        write_folder_dataset(voc_dataset(generated, split, name="synthetic"), root, masks=True, split=split)
    config = load_config("demo", [f"workdir={tmp_path / 'work'}", "data.dataset=folder",
                                  f"data.root={root}", *TINY])
    metrics = stages.run_pipeline(config)["evaluate"].metrics
    assert all(isinstance(metrics[k], float) for k in ("maps_miou", "pseudo_mask_miou", "fcn_miou"))
    assert "masks_absent" not in metrics and "no ground-truth" not in metrics["headline"]
