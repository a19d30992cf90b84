"""``wsss export``: a trained segmentor as a TorchScript or ONNX file for deployment (not a
pipeline stage).

The model (``--model M``) is resolved exactly as ``wsss predict`` resolves it
(:func:`stages.predict.load_model`: a ``model.pt``, a model / ``train_segmentor`` output / work
directory, an MLflow run id, ``runs:/...`` or ``models:/<name>/<version>``), loaded on the CPU in
eval mode and wrapped in :class:`LogitsModule`:

* input ``image``: float32 ``(N, 3, H, W)``, RGB normalised as in training,
  ``(pixel / 255 - mean) / std`` with the ImageNet mean / std of the sidecar;
* output ``logits``: float32 ``(N, C, H, W)``, the main logits resized (bilinear,
  ``align_corners=False``) to the input size as stage 5 does; ``argmax`` over ``C`` is the class.

Export: TorchScript by ``torch.jit.trace``; ONNX by torch's TorchScript-based exporter
(``torch.onnx.export(..., dynamo=False)``, opset :data:`OPSET`; fast, and it needs no
``onnxscript``) with dynamic batch / height / width axes. The sample is ``--size`` or else
the model's training crop (``segmentor.crop_size`` of the ``train_segmentor`` manifest beside
the checkpoint; :data:`DEFAULT_SIZE` when there is none, e.g. an MLflow model).

Verification, on the file as written (before it gets its name): the exported model's logits
must equal the PyTorch model's within :data:`TOLERANCE` (max abs difference) on a fresh
sample of the export size, else :class:`ExportMismatchError` (the measured difference, nothing
written). A second sample of another size and batch 2 (:func:`second_shape`) tests the
dynamic axes: a graph that fails there or differs (shape arithmetic baked into the trace, e.g.
HRNet's fusion, ISANet's partitions) is re-exported with a fixed height / width for ONNX and
marked fixed-size for TorchScript (``input.dynamic_size: false`` in the sidecar, with the
reason). A model the exporter cannot handle (SETR: the trace of Python ``round()`` on sizes;
PSPNet / ANN: ONNX's adaptive average pooling needs a feature map that is a multiple of the
pooling bins; CCNet: onnxruntime has no ``EyeLike`` kernel) raises :class:`ExportError`
naming the model and the cause. ONNX outputs are checked with onnxruntime when installed,
else with ``onnx.reference.ReferenceEvaluator``.

Files: ``PATH`` (temp file + rename: a failed export leaves nothing, an earlier file at
``PATH`` stays as it was) and the sidecar ``PATH.json`` (:func:`sidecar_path`): class names,
palette, input normalisation and size, the source model, the measured difference and the
torch / onnx / onnxruntime versions.
"""

import importlib.util
import json
import math
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable
from unittest import mock

import numpy as np
import torch
from torch import nn

from models.segmentors import resize_to
from pipeline.data.palette import voc_palette
from pipeline.data.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize
from pipeline.errors import InputError
from pipeline.storage import atomic_path, atomic_write_json
from stages.predict import LoadedModel, load_model

FORMATS = ("torchscript", "onnx")
TOLERANCE = 1e-4
OPSET = 17
DEFAULT_SIZE = 512            # segmentor.crop_size's default, for models without a manifest
ONNX_EXTRA = "pip install 'wsss[onnx]'"
INPUT_NAME, OUTPUT_NAME = "image", "logits"


#: (model name prefix, format or None for both) -> the known cause of a failed export
KNOWN_LIMITS = {
    ("setr", None): "SETR's ViT interpolates its position embeddings with Python round() on the input "
                    "size, which tracing cannot record",
    ("ccnet", "onnx"): "onnxruntime has no EyeLike kernel, which the criss-cross attention's diagonal "
                       "mask exports to",
    ("pspnet", "onnx"): "ONNX has no adaptive average pooling: the export needs a --size whose feature "
                        "map is a multiple of every pyramid bin (1, 2, 3, 6), e.g. 48 or 96 at stride 8",
    ("ann", "onnx"): "ONNX has no adaptive average pooling: the export needs a --size whose feature map "
                     "is a multiple of every pyramid bin (1, 3, 6, 8), e.g. 192 at stride 8",
}


def known_limit(model_name: str, fmt: str) -> str | None:
    """Why ``model_name`` is known not to export to ``fmt`` (see :data:`KNOWN_LIMITS`)."""
    for (prefix, which), text in KNOWN_LIMITS.items():
        if model_name.startswith(prefix) and which in (None, fmt):
            return text
    return None


class ExportError(RuntimeError):
    """The model cannot be exported in that format; the message names the model and why."""


class ExportMismatchError(ExportError):
    """The exported model's output differs from the PyTorch model's beyond the tolerance."""


class MissingExtraError(InputError):
    """``--format onnx`` without the ``onnx`` package (the ``onnx`` extra)."""


class LogitsModule(nn.Module):
    """A segmentor as ``image -> logits`` at the input's size (module docstring)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return resize_to(self.model(image)["out"], image.shape[-2:])


@dataclass
class ExportResult:
    path: Path
    sidecar: Path
    max_abs_diff: float
    dynamic_size: bool
    seconds: float
    meta: dict[str, Any] = field(default_factory=dict)


def sidecar_path(path: Path) -> Path:
    return Path(f"{path}.json")


def require_onnx() -> None:
    """Raise :class:`MissingExtraError` when ``onnx`` is not importable (no torch import)."""
    if importlib.util.find_spec("onnx") is None:
        raise MissingExtraError(f"--format onnx needs the onnx package: {ONNX_EXTRA}")


def parse_size(text: str | int | None) -> tuple[int, int] | None:
    """``"512"`` -> (512, 512), ``"480x640"`` -> (480, 640) (height x width)."""
    if text is None:
        return None
    parts = str(text).lower().split("x")
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or min(values) < 1:
        raise InputError(f"--size {text!r}: expected N or HxW (positive integers)")
    return values


def training_size(loaded: LoadedModel) -> tuple[tuple[int, int], str]:
    """The export size of a loaded model and where it comes from: the training crop of the
    ``train_segmentor`` output holding its checkpoint, else :data:`DEFAULT_SIZE`."""
    checkpoint = Path(loaded.source)
    manifest = checkpoint.parent.parent / "manifest.json"
    if checkpoint.is_file() and manifest.is_file():
        try:
            crop = json.loads(manifest.read_text())["config"]["segmentor"]["crop_size"]
            return (int(crop), int(crop)), f"segmentor.crop_size of {manifest}"
        except (ValueError, KeyError, TypeError):
            pass
    return (DEFAULT_SIZE, DEFAULT_SIZE), "default (no training manifest; --size to change)"


def second_shape(size: tuple[int, int]) -> tuple[int, int, int, int]:
    """The shape that tests dynamic axes: batch 2, height x1.5 and width x1.25 (multiples of
    8, so larger than the export size on both sides and not square)."""
    h, w = size
    return (2, 3, 8 * math.ceil(h * 1.5 / 8), 8 * math.ceil(w * 1.25 / 8))


def sample(shape, seed: int) -> torch.Tensor:
    """A normalised random photo: uniform uint8 pixels through the training normalisation."""
    g = torch.Generator().manual_seed(seed)
    return normalize(torch.randint(0, 256, tuple(shape), generator=g).to(torch.uint8))


@torch.no_grad()
def torch_logits(module: nn.Module, x: torch.Tensor) -> np.ndarray:
    """The PyTorch model's logits, the reference of the check."""
    return module(x).float().numpy()


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    # TorchScript interpreter errors put the real cause last
    text = lines[-1] if lines and "TorchScript interpreter" in lines[0] else (lines[0] if lines else "")
    text = text.split(" Please feel free to request support")[0]
    if re.match(r"^\w+(Error|Exception): ", text):
        return text[:240]
    return f"{type(err).__name__}: {text[:240]}"


def _hint(name: str, fmt: str) -> str:
    known = known_limit(name, fmt)
    return f" [known limit: {known}]" if known else ""


def _runtime_name(fmt: str) -> str:
    if fmt == "torchscript":
        return "torch.jit"
    return "onnxruntime" if importlib.util.find_spec("onnxruntime") else "onnx.reference"


def _shape_text(shape) -> str:
    return "x".join(str(int(v)) for v in shape)


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        return math.inf
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max(initial=0.0))


# --------------------------------------------------------------------------- exporters
@torch.no_grad()
def _write_torchscript(module: nn.Module, x: torch.Tensor, path: Path, dynamic_size: bool,
                       opset: int) -> None:
    with warnings.catch_warnings():   # tracer warnings: the output check replaces them
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(module, x, check_trace=False)
        torch.jit.save(traced, str(path))


def _torchscript_runner(path: Path) -> tuple[Callable[[np.ndarray], np.ndarray], str]:
    with warnings.catch_warnings():   # torch.jit's deprecation notice
        warnings.simplefilter("ignore")
        loaded = torch.jit.load(str(path), map_location="cpu").eval()

    @torch.no_grad()
    def run(x: np.ndarray) -> np.ndarray:
        return loaded(torch.from_numpy(x)).float().numpy()

    return run, f"torch.jit {torch.__version__}"


@torch.no_grad()
def _write_onnx(module: nn.Module, x: torch.Tensor, path: Path, dynamic_size: bool,
                opset: int) -> None:
    axes = {0: "batch", 2: "height", 3: "width"} if dynamic_size else {0: "batch"}
    was_logging = getattr(torch._C, "_jit_is_onnx_log_enabled", lambda: False)()
    # the legacy exporter switches its log on whatever it was (torch 2.14: it tests the function
    # ``_jit_is_onnx_log_enabled`` for truth instead of calling it) and then prints the whole
    # graph on a failed export, which ExportError reports in one line instead
    with warnings.catch_warnings(), mock.patch.object(torch._C, "_jit_onnx_log", lambda *args: None, create=True):
        warnings.simplefilter("ignore")   # tracer / deprecation warnings
        try:
            torch.onnx.export(module, (x,), str(path), dynamo=False, input_names=[INPUT_NAME],
                              output_names=[OUTPUT_NAME], opset_version=opset,
                              dynamic_axes={INPUT_NAME: axes, OUTPUT_NAME: axes})
        finally:
            getattr(torch._C, "_jit_set_onnx_log_enabled", lambda on: None)(was_logging)
    import onnx

    onnx.checker.check_model(str(path))


def _onnx_runner(path: Path) -> tuple[Callable[[np.ndarray], np.ndarray], str]:
    try:
        import onnxruntime
    except ImportError:
        onnxruntime = None
    if onnxruntime is not None:
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 4      # its errors reach us as exceptions
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return (lambda x: session.run(None, {INPUT_NAME: x})[0]), f"onnxruntime {onnxruntime.__version__}"
    import onnx
    from onnx.reference import ReferenceEvaluator

    evaluator = ReferenceEvaluator(str(path))
    return (lambda x: evaluator.run(None, {INPUT_NAME: x})[0]), f"onnx.reference {onnx.__version__}"


def _versions(fmt: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"torch": torch.__version__}
    packages = ("wsss", "onnx", "onnxruntime") if fmt == "onnx" else ("wsss",)
    for package in packages:
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            continue
    return out


# --------------------------------------------------------------------------- export
def export_model(loaded: LoadedModel, fmt: str, out: Path, size: tuple[int, int] | None = None,
                 opset: int = OPSET, say: Callable[[str], None] | None = None) -> ExportResult:
    """Export ``loaded`` to ``out`` in ``fmt`` and write its sidecar (module docstring)."""
    if fmt not in FORMATS:
        raise InputError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if fmt == "onnx":
        require_onnx()
    say = say or (lambda text: None)
    out = Path(out)
    name = loaded.model_name or "segmentor"
    if size is None:
        size, size_from = training_size(loaded)
    else:
        size_from = "--size"
    started = time.time()
    module = LogitsModule(loaded.model.float().cpu()).eval()
    trace_x = sample((1, 3, *size), seed=0)
    check_x = sample((1, 3, *size), seed=1)
    other_x = sample(second_shape(size), seed=2)
    with torch.no_grad():
        try:
            reference = torch_logits(module, check_x)
        except Exception as err:
            raise ExportError(f"{name}: the PyTorch model fails on a {_shape_text(check_x.shape)} input "
                              f"({_first_line(err)}); pick another --size") from None
        try:
            other_reference = torch_logits(module, other_x)
        except Exception:
            other_reference = None
    write, runner = {"torchscript": (_write_torchscript, _torchscript_runner),
                     "onnx": (_write_onnx, _onnx_runner)}[fmt]
    with atomic_path(out) as tmp:
        dynamic, why_fixed = True, None
        for attempt in ("dynamic", "fixed"):
            try:
                write(module, trace_x, tmp, attempt == "dynamic", opset)
            except Exception as err:
                if fmt == "onnx" and attempt == "dynamic":
                    why_fixed = f"dynamic height/width axes do not export ({_first_line(err)})"
                    continue
                raise ExportError(f"{name} cannot be exported to {fmt}: {_first_line(err)}"
                                  f"{_hint(name, fmt)}") from None
            try:
                run, checked_with = runner(tmp)
                exported = run(check_x.numpy())
            except Exception as err:
                raise ExportError(f"{name}: the exported {fmt} model does not run in {_runtime_name(fmt)} "
                                  f"({_first_line(err)}){_hint(name, fmt)}") from None
            diff = _max_diff(exported, reference)
            if not diff <= TOLERANCE:
                raise ExportMismatchError(
                    f"{name}: the exported {fmt} model differs from the PyTorch model by "
                    f"{diff:.3g} (max abs logit difference on a {_shape_text(check_x.shape)} sample; "
                    f"tolerance {TOLERANCE:g}); nothing written")
            if attempt == "fixed":
                dynamic = False
                break
            if other_reference is None:
                problem = "the PyTorch model itself fails there"
            else:
                try:
                    other_diff = _max_diff(run(other_x.numpy()), other_reference)
                    problem = None if other_diff <= TOLERANCE else f"max abs difference {other_diff:.3g}"
                except Exception as err:
                    problem = _first_line(err)[:200]
            if problem is None:
                diff = max(diff, other_diff)
                break
            why_fixed = (f"the traced graph is valid only at {size[0]}x{size[1]} (at "
                         f"{_shape_text(other_x.shape)}: {problem})")
            if fmt == "torchscript":
                dynamic = False
                break
        verified = [list(check_x.shape), list(other_x.shape)]
        if not dynamic:                  # the batch axis is still dynamic: check batch 2
            batch_x = sample((2, 3, *size), seed=3)
            try:
                batch_diff = _max_diff(run(batch_x.numpy()), torch_logits(module, batch_x))
            except Exception as err:
                batch_diff, diff_text = math.inf, _first_line(err)
            else:
                diff_text = f"{batch_diff:.3g}"
            if not batch_diff <= TOLERANCE:
                raise ExportMismatchError(
                    f"{name}: the exported {fmt} model fails on a batch of 2 ({diff_text}; tolerance "
                    f"{TOLERANCE:g}); nothing written")
            diff, verified = max(diff, batch_diff), [list(check_x.shape), list(batch_x.shape)]
            say(f"[wsss] export: {name}: {why_fixed}; exported for a fixed {size[0]}x{size[1]} input")
        seconds = time.time() - started
        num_classes = int(reference.shape[1])
        palette = np.asarray(voc_palette(), dtype=int).reshape(256, 3)[:num_classes].tolist()
        meta = {
            "format": fmt, "file": out.name, "model_name": loaded.model_name, "source": loaded.source,
            "class_names": list(loaded.class_names), "num_classes": num_classes, "palette": palette,
            "input": {"name": INPUT_NAME, "dtype": "float32", "layout": "NCHW", "colour": "RGB",
                      "scale": 1 / 255, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                      "normalise": "(pixel / 255 - mean) / std", "size": list(size),
                      "size_from": size_from, "dynamic_batch": True, "dynamic_size": dynamic,
                      **({} if dynamic else {"fixed_size_reason": why_fixed})},
            "output": {"name": OUTPUT_NAME, "dtype": "float32", "layout": "NCHW",
                       "meaning": "logits at the input size; argmax over C = class index"},
            "verification": {"max_abs_diff": diff, "tolerance": TOLERANCE, "shapes": verified,
                             "checked_with": checked_with},
            **({"opset": opset} if fmt == "onnx" else {}),
            "versions": _versions(fmt), "export_seconds": round(seconds, 3),
        }
        atomic_write_json(sidecar_path(out), meta)
    return ExportResult(out, sidecar_path(out), diff, dynamic, seconds, meta)


def export(spec: str, fmt: str, out: Path, size: tuple[int, int] | None = None,
           segmentor: str | None = None, tracking_uri: str | None = None, opset: int = OPSET,
           say: Callable[[str], None] | None = None) -> ExportResult:
    """Resolve ``--model spec`` as ``wsss predict`` does, then :func:`export_model`."""
    if fmt == "onnx":
        require_onnx()
    loaded = load_model(spec, torch.device("cpu"), segmentor=segmentor, tracking_uri=tracking_uri)
    return export_model(loaded, fmt, out, size=size, opset=opset, say=say)
