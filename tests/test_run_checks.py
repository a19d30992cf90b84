"""Checks when a run starts (issue 22, item 3): config names, then every file of every split
the run will read, before any stage computes; ``--validate`` decodes them all. Input errors
from ``wsss`` are one line and exit 2 (``--debug``: the traceback)."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

import stages
from pipeline.config import ConfigError, SyntheticConfig, load_config
from pipeline.data import DatasetError

SYN = SyntheticConfig(num_classes=3, num_train=4, num_val=3, image_size=32, seed=11)


def _sets(*overrides: str) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def _voc(tree: Path, tmp_path: Path, *overrides: str) -> list[str]:
    """Overrides reading the synthetic tree as a VOC dataset (nothing is regenerated)."""
    return [f"workdir={tmp_path / 'work'}", "data.dataset=voc", f"data.root={tree}", *overrides]


def _wsss(*argv: str) -> tuple[subprocess.CompletedProcess, float]:
    """``wsss <argv>`` in a fresh interpreter; also prints whether torch got imported."""
    code = ("import sys\nfrom pipeline.cli import main\ncode = main(sys.argv[1:])\n"
            "print('torch imported:', 'torch' in sys.modules)\nsys.exit(code)")
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
    return result, time.monotonic() - start


def test_unknown_segmentor_is_refused_when_the_config_loads():
    with pytest.raises(ConfigError, match=r"segmentor\.models: .*unknown segmentor\(s\) 'foonet'; available: .*sanet"):
        load_config("demo", ["segmentor.models=[sanet, foonet]"])
    result, seconds = _wsss("run", *_sets("segmentor.models=[sanet, foonet]"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "segmentor.models" in result.stderr and "'foonet'" in result.stderr
    assert "torch imported: False" in result.stdout            # refused before torch is imported
    assert seconds < 60          # no stage ran (a stage alone takes minutes); generous for loaded machines


def test_registry_names_read_from_source_equal_the_imported_registry():
    from models.segmentors import available
    from pipeline.registry import segmentor_names

    assert list(segmentor_names()) == available()


def test_missing_val_image_fails_before_stage_one(tree, tmp_path):
    (tree / "JPEGImages" / "val_00001.jpg").unlink()
    result, seconds = _wsss("run", *_sets(*_voc(tree, tmp_path)))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and "val_00001.jpg does not exist" in result.stderr
    assert not (tmp_path / "work" / "train_classifier").exists()     # no stage started
    assert seconds < 60          # no stage ran (a stage alone takes minutes); generous for loaded machines
    debug, _ = _wsss("run", "--debug", *_sets(*_voc(tree, tmp_path)))
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "DatasetError" in debug.stderr


def test_size_mismatch_found_by_the_header_check(tree, tmp_path):
    from PIL import Image

    Image.new("RGB", (20, 32)).save(tree / "JPEGImages" / "train_00002.jpg")
    config = load_config("demo", _voc(tree, tmp_path))
    with pytest.raises(DatasetError, match=r"train_00002\.jpg is 20x32 but mask .*train_00002\.png is 32x32"):
        stages.check_run_inputs(config)


def test_truncated_image_needs_validate(tree, tmp_path):
    path = tree / "JPEGImages" / "val_00002.jpg"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 3 // 4])                 # the header survives
    config = load_config("demo", _voc(tree, tmp_path))
    assert stages.check_run_inputs(config) == ["train", "val"]   # cheap check: headers only
    with pytest.raises(DatasetError, match=r"val_00002\.jpg .*truncated"):
        stages.check_run_inputs(config, decode=True)
    result, _ = _wsss("run", "--validate", *_sets(*_voc(tree, tmp_path)))
    assert result.returncode == 2 and "val_00002.jpg" in result.stderr and "Traceback" not in result.stderr


def test_only_the_splits_of_stages_that_will_compute_are_checked(tree, tmp_path, monkeypatch):
    config = load_config("demo", _voc(tree, tmp_path, "evaluation.split=test"))
    assert stages.splits_read(config, "evaluate") == ("test", "train")
    assert stages.check_run_inputs(config, ["refine_crf"]) == ["train"]     # stages 1-3 only
    with pytest.raises(DatasetError, match=r"split file .*test\.txt does not exist"):
        stages.check_run_inputs(config)
    monkeypatch.setattr(stages, "stages_to_compute", lambda *args, **kw: [])  # all complete
    assert stages.check_run_inputs(config) == []


def test_evaluate_scores_the_splits_the_check_reads(tmp_path):
    from stages.evaluate import scored_train_split

    for overrides in ([], ["maps.split=val"], ["evaluation.train_split=val", "evaluation.split=train"]):
        config = load_config("demo", overrides)
        assert stages.splits_read(config, "evaluate")[1] == scored_train_split(config)
