"""`wsss plan`: projections from a sample of each stage, and refusal when the run won't fit."""

import math
from collections import namedtuple

import pytest

from pipeline import cli
from pipeline.config import load_config
from stages import plan


def tiny_config(root, workdir):
    return load_config("demo", [
        f"workdir={workdir}", f"data.root={root}", "data.synthetic.num_train=12", "data.synthetic.num_val=4",
        "data.synthetic.num_classes=3", "data.synthetic.image_size=48", "classifier.image_size=48",
        "classifier.epochs=3", "classifier.batch_size=4", "classifier.feature_channels=16",
        "classifier.backbone_options={width: 8}", "classifier.num_workers=0", "segmentor.iterations=50",
        "segmentor.crop_size=48", "segmentor.batch_size=2", "device=cpu"])


@pytest.fixture(scope="module")
def estimates(tmp_path_factory):
    root, work = tmp_path_factory.mktemp("data"), tmp_path_factory.mktemp("work")
    config = tiny_config(root, work)
    return config, *plan.make_estimates(config, samples=1)


def test_every_stage_is_projected(estimates):
    config, summary, found = estimates
    assert summary.splits == {"train": 12, "val": 4} and summary.num_classes == 4
    assert sum(summary.label_counts.values()) >= 12
    names = [e.stage for e in found]
    assert names == ["train_classifier", "generate_cams", "refine_crf", "train_segmentor:sanet",
                     "train_segmentor:deeplab_largefov", "evaluate"]
    by_name = {e.stage: e for e in found}
    assert by_name["train_classifier"].steps == math.ceil(12 / 4) * 3
    assert by_name["generate_cams"].steps == 12 and by_name["train_segmentor:sanet"].steps == 50
    assert all(e.seconds_per_step > 0 and e.disk_mb >= 0 and e.host_peak_mb > 0 for e in found)
    # checkpoints: (epochs + 2) copies of the classifier's weights
    assert by_name["train_classifier"].disk_mb > by_name["generate_cams"].disk_mb
    table = plan.format_plan(summary, found)
    assert "total" in table and "train_segmentor:sanet" in table


def test_refuses_when_the_disk_is_too_small(estimates, monkeypatch):
    config, _, found = estimates
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(plan.shutil, "disk_usage", lambda path: usage(10, 10, 1024))   # 1 KB free
    with pytest.raises(plan.PlanError, match="not enough disk.*GB free"):
        plan.check_fits(config, found)
    monkeypatch.setattr(plan.shutil, "disk_usage", lambda path: usage(10, 10, 1 << 50))
    plan.check_fits(config, found)


def test_cli_exits_2_with_one_line(tmp_path, monkeypatch, capsys):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(plan.shutil, "disk_usage", lambda path: usage(10, 10, 1024))
    args = ["plan", "--config", "demo", "--samples", "1", "--stages", "refine_crf",
            "--set", f"workdir={tmp_path}", "--set", f"data.root={tmp_path / 'data'}",
            "--set", "data.synthetic.num_train=6", "--set", "data.synthetic.num_val=2",
            "--set", "data.synthetic.image_size=48"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not enough disk" in err[0]
