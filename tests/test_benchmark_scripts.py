"""The GPU benchmark runs at a tiny size on the CPU, so it does not rot between GPU sessions."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_benchmark_tiny_on_cpu(tmp_path, capsys):
    gpu = _load("gpu")
    assert gpu.main(["--tiny", "--samples", "1", "--json", str(tmp_path / "out.json")]) == 0
    rows = json.loads((tmp_path / "out.json").read_text())["rows"]
    assert [r["stage"] for r in rows] == ["train_classifier", "generate_cams", "train_segmentor:sanet"]
    assert all(r["seconds_per_step"] > 0 and r["rate"] > 0 and r["tflop_per_step"] > 0 for r in rows)
    assert rows[0]["rate"] == pytest.approx(5 / rows[0]["seconds_per_step"])   # 5 pairs per step
    assert "pairs/s" in capsys.readouterr().out


def test_mmseg_reference_table_names_real_configs():
    gpu = _load("gpu")
    for config, memory, miou in gpu.MMSEG_VOC12AUG.values():
        assert config.endswith("_4xb4-20k_voc12aug-512x512") and 0 < memory < 16 and 60 < miou < 80
