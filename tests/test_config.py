"""Configuration: presets, files, dotted overrides and validation errors with field paths."""

import json

import pytest

from pipeline.cli import main as cli_main
from pipeline.config import (ConfigError, PipelineConfig, apply_overrides, flatten, load_config,
                             parse_override, preset)


@pytest.mark.parametrize("name", ["voc", "coco", "demo"])
def test_presets_validate(name):
    config = preset(name)
    assert isinstance(config, PipelineConfig)
    assert config.name == name


def test_voc_preset_has_paper_settings():
    config = preset("voc")
    assert config.data.dataset == "voc" and config.data.train_split == "train_aug"
    assert config.classifier.lr == 1e-3 and config.classifier.lr_steps == [5, 10]
    assert config.classifier.epochs == 15 and config.classifier.batch_size == 5
    assert config.maps.num_related == 3


def test_override_sets_nested_value():
    config = load_config("demo", ["crf.iterations=5", "segmentor.models=[sanet, fcn]",
                                  "data.synthetic.num_train=10"])
    assert config.crf.iterations == 5
    assert config.segmentor.models == ["sanet", "fcn"]
    assert config.data.synthetic.num_train == 10


def test_parse_override_types():
    assert parse_override("a.b=0.5") == (["a", "b"], 0.5)
    assert parse_override("a=true") == (["a"], True)
    assert parse_override("a=null") == (["a"], None)
    assert parse_override("a=hello") == (["a"], "hello")
    with pytest.raises(ConfigError, match="section.field=value"):
        parse_override("noequals")
    with pytest.raises(ConfigError, match="empty field"):
        parse_override("a..b=1")


def test_override_into_scalar_is_rejected():
    with pytest.raises(ConfigError, match="seed is not a section"):
        apply_overrides({"seed": 1}, ["seed.x=2"])


@pytest.mark.parametrize("override, path, words", [
    ("crf.iterations=five", "crf.iterations", "valid integer"),
    ("crf.bogus=1", "crf.bogus", "Extra inputs"),
    ("segmentor.lr=-0.1", "segmentor.lr", "greater than 0"),
    ("data.synthetic.num_classes=50", "data.synthetic.num_classes", "less than or equal"),
    ("data.dataset=imagenet", "data.dataset", "synthetic"),
    ("maps.scales=[]", "maps.scales", "at least 1"),
    ("segmentor.scale_range=[2.0, 1.0]", "segmentor", "scale_range"),
])
def test_invalid_values_name_the_field(override, path, words):
    with pytest.raises(ConfigError) as err:
        load_config("demo", [override])
    assert path in str(err.value) and words in str(err.value)


def test_yaml_file_with_preset_and_override(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("preset: voc\ncrf:\n  preset: irn\nseed: 7\n")
    config = load_config(path, ["crf.iterations=3"])
    assert config.name == "voc" and config.seed == 7
    assert config.crf.preset == "irn" and config.crf.iterations == 3


def test_json_file(tmp_path):
    path = tmp_path / "exp.json"
    path.write_text(json.dumps({"seed": 3, "evaluation": {"flip": True}}))
    config = load_config(path)
    assert config.seed == 3 and config.evaluation.flip is True


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(bad)
    nested = tmp_path / "nested.yaml"
    nested.write_text("classifier:\n  epochs: 0\n")
    with pytest.raises(ConfigError, match="classifier.epochs"):
        load_config(nested)
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("imagenet")


def test_flatten():
    assert flatten({"a": {"b": 1, "c": {"d": 2}}, "e": 3}) == {"a.b": 1, "a.c.d": 2, "e": 3}


def test_cli_config_prints_and_reports_errors(capsys):
    assert cli_main(["config", "--config", "demo", "--set", "seed=5"]) == 0
    assert json.loads(capsys.readouterr().out)["seed"] == 5
    assert cli_main(["config", "--set", "crf.iterations=x"]) == 2
    assert "crf.iterations" in capsys.readouterr().err


def test_crf_combination_checked_at_load_time():
    """A preset switch that leaves the other preset's thresholds set fails when the config
    is loaded (not when stage 3 starts), naming the fields and the fix."""
    with pytest.raises(ConfigError, match=r"crf: .*bg_low_threshold.*bg_threshold and crf.bg_low_threshold to null"):
        load_config("demo", ["crf.preset=psa"])  # the demo preset is irn with its thresholds
    fixed = load_config("demo", ["crf.preset=psa", "crf.bg_threshold=null", "crf.bg_low_threshold=null"])
    assert fixed.crf.preset == "psa" and fixed.crf.bg_low_threshold is None
    with pytest.raises(ConfigError, match=r"crf.alpha_high .* must be >= crf.alpha"):
        load_config("voc", ["crf.alpha=8", "crf.alpha_high=2"])
