"""``wsss export``: a stage-4 segmentor as TorchScript / ONNX equal to the PyTorch model (stage 5's
logits) on fresh inputs of other sizes, the sidecar, refusals (tolerance, unsupported models,
bad --model, missing extra) that leave nothing behind, and several zoo architectures."""

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from models.segmentors import build_segmentor
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.data import build_dataset
from pipeline.runtime import save_checkpoint
from pipeline.storage import StageResult
from stages import export as ex
from stages import run_stage
from stages.evaluate import whole_logits
from stages.train_segmentor import MODEL_FILE, load_trained

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")]

CROP = 40          # the training crop: the default export size
TINY = {"channels": 16, "aux_channels": 8, "backbone_options": {"width": 8}}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny FCN trained by stage 4 (6 iterations on 16 synthetic images, ground-truth masks as
    pseudo-masks) in a work directory: (workdir, model.pt)."""
    root = tmp_path_factory.mktemp("export")
    config = load_config("demo")
    seg = {"models": ["fcn"], "backbone": "tiny", "pretrained": False, "model_options": {"fcn": TINY},
           "iterations": 6, "batch_size": 4, "crop_size": CROP, "lr": 0.01, "warmup_iters": 2,
           "checkpoint_every": 6, "log_every": 3, "amp": False, "num_workers": 0}
    data = {"root": str(root / "data"), "synthetic": {"num_train": 16, "num_val": 4, "image_size": 48}}
    config = config.model_validate({**config.model_dump(), "workdir": str(root / "work"),
                                    "data": {**config.data.model_dump(), **data}, "segmentor": seg})
    dataset = build_dataset(config.data, "train")
    masks = root / "masks"
    masks.mkdir()
    for image_id in dataset.ids:
        shutil.copy(dataset.mask_path(image_id), masks / f"{image_id}.png")
    result = run_stage("train_segmentor", config, {"refine_crf": StageResult("refine_crf", "k", str(masks))})
    return root / "work", Path(result.path) / "fcn" / MODEL_FILE


def fresh(shape, seed=123):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def reference(checkpoint: Path, x: torch.Tensor) -> np.ndarray:
    """Stage 5's logits (``stages.evaluate.whole_logits``) of the trained model."""
    model, _ = load_trained(checkpoint)
    with torch.no_grad():
        return whole_logits(model, x).numpy()


def run_onnx(path: Path, x: torch.Tensor) -> np.ndarray:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"image": x.numpy()})[0]


def run_exported(path, fmt: str, x: torch.Tensor) -> np.ndarray:
    """Logits of the exported file (onnxruntime for ONNX, torch.jit for TorchScript)."""
    if fmt == "onnx":
        return run_onnx(path, x)
    with torch.no_grad():
        return torch.jit.load(str(path))(x).numpy()


def test_torchscript_round_trip_and_sidecar(trained, tmp_path, capsys):
    workdir, checkpoint = trained
    out = tmp_path / "deploy" / "fcn.pt"
    assert main(["export", "--model", str(workdir), "--format", "torchscript", "--out", str(out)]) == 0
    assert "dynamic batch/height/width" in capsys.readouterr().out
    scripted = torch.jit.load(str(out)).eval()
    x = fresh((3, 3, 56, 72))                          # other batch, size and aspect than the export
    with torch.no_grad():
        got = scripted(x).numpy()
    state = torch.load(checkpoint, weights_only=False)
    assert got.shape == (3, state["num_classes"], 56, 72)
    assert np.abs(got - reference(checkpoint, x)).max() <= 1e-4

    meta = json.loads(ex.sidecar_path(out).read_text())
    assert meta["class_names"] == state["class_names"] and meta["num_classes"] == state["num_classes"]
    assert len(meta["palette"]) == state["num_classes"] and meta["palette"][:2] == [[0, 0, 0], [128, 0, 0]]
    assert meta["source"] == str(checkpoint) and meta["model_name"] == "fcn"
    assert meta["input"]["size"] == [CROP, CROP] and "segmentor.crop_size" in meta["input"]["size_from"]
    assert meta["input"]["mean"] == [0.485, 0.456, 0.406] and meta["input"]["std"] == [0.229, 0.224, 0.225]
    assert meta["input"]["dynamic_size"] is True
    assert 0 <= meta["verification"]["max_abs_diff"] <= 1e-4
    assert meta["verification"]["shapes"] == [[1, 3, CROP, CROP], [2, 3, 64, 56]]
    assert meta["versions"]["torch"] == torch.__version__
    assert sorted(p.name for p in out.parent.iterdir()) == ["fcn.pt", "fcn.pt.json"]


def test_onnx_equals_pytorch_with_dynamic_axes(trained, tmp_path):
    pytest.importorskip("onnx", reason="the onnx extra is not installed")
    pytest.importorskip("onnxruntime", reason="onnxruntime (the onnx extra) is not installed")
    workdir, checkpoint = trained
    out = tmp_path / "fcn.onnx"
    assert main(["export", "--model", str(checkpoint.parent), "--format", "onnx", "--out", str(out),
                 "--size", "48x32"]) == 0
    for shape in ((1, 3, 48, 32), (2, 3, 64, 88), (1, 3, 33, 47)):
        x = fresh(shape)
        assert np.abs(run_onnx(out, x) - reference(checkpoint, x)).max() <= 1e-4, shape
    meta = json.loads(ex.sidecar_path(out).read_text())
    assert meta["input"]["size"] == [48, 32] and meta["input"]["size_from"] == "--size"
    assert meta["input"]["dynamic_size"] is True and meta["opset"] == 17
    assert meta["verification"]["checked_with"].startswith("onnxruntime")
    assert {"torch", "onnx", "onnxruntime"} <= set(meta["versions"])


def test_onnx_checked_with_reference_evaluator_without_onnxruntime(trained, tmp_path, monkeypatch):
    pytest.importorskip("onnx", reason="the onnx extra is not installed")
    _, checkpoint = trained
    monkeypatch.setitem(sys.modules, "onnxruntime", None)          # import onnxruntime fails
    result = ex.export(str(checkpoint), "onnx", tmp_path / "m.onnx", size=(32, 32))
    assert result.meta["verification"]["checked_with"].startswith("onnx.reference")
    assert result.max_abs_diff <= 1e-4 and result.dynamic_size


def test_refused_beyond_tolerance_leaves_nothing(trained, tmp_path, monkeypatch, capsys):
    _, checkpoint = trained
    out = tmp_path / "fcn.pt"
    out.write_bytes(b"an earlier export")
    real = ex.torch_logits
    monkeypatch.setattr(ex, "torch_logits", lambda module, x: real(module, x) + 2e-3)
    assert main(["export", "--model", str(checkpoint), "--format", "torchscript", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "differs from the PyTorch model by 0.002" in err and "tolerance 0.0001" in err
    assert len(err.strip().splitlines()) == 1
    assert out.read_bytes() == b"an earlier export"                 # untouched
    assert [p.name for p in tmp_path.iterdir()] == ["fcn.pt"]        # no temp file, no sidecar


def test_bad_model_size_and_missing_extra(trained, tmp_path, monkeypatch, capsys):
    out = tmp_path / "o" / "m.pt"
    assert main(["export", "--model", str(tmp_path / "none"), "--format", "torchscript", "--out", str(out)]) == 2
    assert "not a file, a directory, an MLflow run id" in capsys.readouterr().err
    assert main(["export", "--model", str(trained[0]), "--format", "torchscript", "--out", str(out),
                 "--size", "4x"]) == 2
    assert "--size '4x': expected N or HxW" in capsys.readouterr().err
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else real(name, *a))
    assert main(["export", "--model", str(trained[0]), "--format", "onnx", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "wsss: --format onnx needs the onnx package: pip install 'wsss[onnx]'"
    assert not out.parent.exists()


# --------------------------------------------------------------------------- the zoo
def zoo_checkpoint(directory: Path, name: str, options: dict) -> Path:
    """A stage-4-format ``model.pt`` of a randomly initialised tiny model."""
    torch.manual_seed(0)
    model = build_segmentor(name, 3, backbone="tiny", **options)
    path = directory / name / MODEL_FILE
    save_checkpoint(path, {"model_name": name, "num_classes": 3, "class_names": ["background", "a", "b"],
                           "backbone": "tiny", "options": options, "model": model.state_dict()})
    return path


ZOO = {
    "deeplabv3plus": dict(TINY, c1_channels=8),
    "danet": TINY,
    "ocrnet": {"channels": 16, "ocr_channels": 8, "region_channels": 8, "backbone_options": {"width": 8}},
}
FORMATS = ["torchscript", pytest.param("onnx", marks=pytest.mark.skipif(
    importlib.util.find_spec("onnxruntime") is None, reason="the onnx extra is not installed"))]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_models_export(name, fmt, tmp_path):
    checkpoint = zoo_checkpoint(tmp_path, name, ZOO[name])
    out = tmp_path / f"{name}.{fmt}"
    result = ex.export(str(checkpoint), fmt, out, size=(48, 48))
    assert result.dynamic_size and result.max_abs_diff <= 1e-4
    x = fresh((2, 3, 40, 64))
    got = run_exported(out, fmt, x)
    assert np.abs(got - reference(checkpoint, x)).max() <= 1e-4


@pytest.mark.parametrize("name, fmt, size, reason", [
    # ISANet partitions the feature map by its traced size: the graph holds only at that size
    ("isanet", "torchscript", 32, "the traced graph is valid only at 32x32"),
    # PSPNet's adaptive pooling exports for a fixed size whose features are a multiple of the bins
    pytest.param("pspnet", "onnx", 48, "dynamic height/width axes do not export", marks=pytest.mark.skipif(
        importlib.util.find_spec("onnxruntime") is None, reason="the onnx extra is not installed")),
])
def test_fixed_size_fallback_is_recorded(name, fmt, size, reason, tmp_path, capsys):
    options = dict(TINY, isa_channels=8, down_factor=(4, 4)) if name == "isanet" else TINY
    checkpoint = zoo_checkpoint(tmp_path, name, options)
    out = tmp_path / f"{name}.{fmt}"
    result = ex.export(str(checkpoint), fmt, out, size=(size, size), say=print)
    assert not result.dynamic_size and result.max_abs_diff <= 1e-4
    assert result.meta["input"]["fixed_size_reason"].startswith(reason)
    assert result.meta["verification"]["shapes"] == [[1, 3, size, size], [2, 3, size, size]]
    assert capsys.readouterr().out.strip().endswith(f"exported for a fixed {size}x{size} input")
    x = fresh((2, 3, size, size))
    got = run_exported(out, fmt, x)
    assert np.abs(got - reference(checkpoint, x)).max() <= 1e-4


@pytest.mark.parametrize("name, fmt, options", [
    ("setr_naive", "torchscript", {"img_size": 32, "channels": 16}),
    pytest.param("ccnet", "onnx", TINY, marks=pytest.mark.skipif(
        importlib.util.find_spec("onnxruntime") is None, reason="the onnx extra is not installed")),
    pytest.param("pspnet", "onnx", TINY, marks=pytest.mark.skipif(   # 4x4 features, bins 3 and 6
        importlib.util.find_spec("onnxruntime") is None, reason="the onnx extra is not installed")),
])
def test_unsupported_models_say_why(name, fmt, options, tmp_path, capsys):
    checkpoint = zoo_checkpoint(tmp_path / "models", name, options)
    out = tmp_path / "out" / f"{name}.{fmt}"
    assert main(["export", "--model", str(checkpoint), "--format", fmt, "--out", str(out), "--size", "32"]) == 1
    printed = capsys.readouterr()
    err = printed.err.strip()
    assert err.startswith(f"wsss export: {name}") and "[known limit: " in err and len(err.splitlines()) == 1
    assert printed.out == ""                                   # no graph dump of the exporter
    assert list(out.parent.iterdir()) == []
