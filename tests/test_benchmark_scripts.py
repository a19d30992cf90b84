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


def _method(maps, masks, segs, seconds=60.0):
    return {"seconds": seconds, "maps": {"miou": maps, "threshold": 0.3, "per_class_iou": {"cat": maps}},
            "plain_cams": {"miou": maps, "threshold": 0.3}, "train_background_miou": 0.035,
            "empty_class_maps": {"maps": 1, "cams": 0, "total": 10},
            "pseudo_masks": {"miou": masks}, "crf_gain": masks - maps,
            "segmentors": {name: {"miou": v} for name, v in segs.items()}, "val_background_miou": 0.04}


def test_quality_voc_mini_targets_and_table_from_a_hand_made_report():
    bench = _load("quality_voc_mini")
    report = {"methods": {"cam": _method(0.30, 0.34, {"sanet": 0.30, "deeplab_largefov": 0.28}),
                          "mcis": _method(0.32, 0.33, {"sanet": 0.36, "deeplab_largefov": 0.31})},
              "ground_truth": {"sanet": {"miou": 0.40, "seconds": 60.0}, "deeplab_largefov": {"miou": 0.5, "seconds": 60.0}}}
    rows = {r["target"].split(" ")[0] + r["target"].split(" ")[1]: r for r in bench.targets(report)}
    gain = rows["MCISmaps"]
    assert gain["value"] == pytest.approx(2.0) and not gain["met"]              # 32 - 30 < 3
    assert rows["campseudo-masks"]["value"] == pytest.approx(4.0) and rows["campseudo-masks"]["met"]
    assert rows["mcispseudo-masks"]["value"] == pytest.approx(1.0) and not rows["mcispseudo-masks"]["met"]
    best = rows["bestsegmentor"]
    assert "sanet on mcis" in best["target"] and best["value"] == pytest.approx(0.36 / 0.40) and best["met"]
    separation = {"miou": 0.32, "threshold": 0.7, "mean_auc": 0.73, "inside": 0.62, "outside": 0.40,
                  "foreground_precision": 0.32, "foreground_recall": 0.55}
    report["methods"]["mcis"]["diagnostics"] = {
        "maps": separation, "cams": {**separation, "outside": 0.21},
        "attention": {"pairs": 12, "on_object": 0.394, "off_object": 0.288, "uniform": 0.158,
                      "entropy": 0.04, "logit_on": 5.5, "logit_off": 3.4}}
    report["targets"] = bench.targets(report)
    table = bench.format_table(report)
    assert "ground-truth masks" in table and "40.0" in table and "MISSED MCIS maps" in table
    assert "1 of 10 (image, class) maps are all zero" in table
    assert "MCIS maps: mean AUC object vs rest 73.0, map on / off the object 0.62 / 0.40" in table
    assert "classifier: mean AUC object vs rest 73.0, map on / off the object 0.62 / 0.21" in table
    assert "object 39.4 % from the object, 28.8 % from elsewhere (uniform 15.8 %)" in table
