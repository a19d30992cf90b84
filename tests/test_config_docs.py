"""docs/configuration.md is generated from pipeline/config.py and kept up to date."""

from pathlib import Path

from pipeline.cli import config_reference, main
from pipeline.config import PipelineConfig
from pipeline.config_docs import REGENERATE, type_name

DOC = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"


def test_committed_reference_is_up_to_date():
    assert DOC.read_text() == config_reference(), (
        f"docs/configuration.md is stale: regenerate it with `.venv/bin/{REGENERATE}`")


def test_reference_lists_every_field_with_type_default_and_description():
    text = config_reference()
    for section in ("classifier", "maps", "crf", "segmentor", "evaluation", "data.synthetic"):
        assert f"## `{section}` — " in text
    row = next(line for line in text.splitlines() if line.startswith("| `crf.iterations` |"))
    assert "int \\| None (≥ 1)" in row and "`null`" in row and "mean-field iterations" in row
    for name in PipelineConfig.model_fields["classifier"].annotation.model_fields:
        assert f"| `classifier.{name}` |" in text


def test_reference_marks_fields_outside_the_stage_keys_and_preset_values():
    rows = {line.split("|")[1].strip(): line for line in config_reference().splitlines()
            if line.startswith("| `")}
    assert "*not in key*" in rows["`crf.workers`"] and "*not in key*" in rows["`threads`"]
    assert "*not in key*" not in rows["`crf.iterations`"]
    assert "demo: `40`" in rows["`classifier.epochs`"]        # where a preset differs


def test_type_names_are_readable():
    from typing import Literal, Optional

    assert type_name(Optional[int]) == "int \\| None"
    assert type_name(Literal["a", "b"]) == "a \\| b"
    assert type_name(list[float]) == "list[float]"


def test_wsss_config_reference_prints_the_document(capsys):
    assert main(["config", "--reference"]) == 0
    assert capsys.readouterr().out == config_reference()
