"""Trained segmentors as MLflow models (PyTorch flavour) in the model registry.

* :func:`log_segmentor`: once per segmentor, at the end of its training (stage 4, through
  :meth:`pipeline.tracking.Tracker.log_model`): the finished ``model.pt`` rebuilt as a module
  and saved with ``mlflow.pytorch.save_model`` (explicit pip requirements, a small input
  example, :data:`META_FILE` with the class names as an extra file), then uploaded as the
  run's ``model`` artifact. Returns its URI, ``runs:/<run id>/model``.
* :func:`register_segmentor`: after stage 5 (:meth:`Tracker.register_model`): a new version of
  ``wsss-<preset>-<model>`` (:func:`registered_name`) whose source is that artifact, tagged
  with the pipeline run's headline metrics.

So ``mlflow.pytorch.load_model("models:/wsss-demo-sanet/1")`` gives the module (logits under
``out``) and ``wsss predict --model models:/wsss-demo-sanet/1`` segments photos with it.
"""

import json
import re
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np

META_FILE = "wsss_model.json"
ARTIFACT_PATH = "model"
EXAMPLE_SIZE = 64


def registered_name(preset: str, model_name: str) -> str:
    """``wsss-<preset>-<model>`` with characters the registry dislikes replaced by ``-``."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", f"wsss-{preset}-{model_name}")


def pip_requirements() -> list[str]:
    """The packages a loaded model needs, pinned to the versions that saved it."""
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for package in ("torch", "torchvision", "numpy", "mlflow", "timm"):
        try:
            pins.append(f"{package}=={version(package)}")
        except PackageNotFoundError:
            continue
    return pins


def _module(checkpoint: Path):
    """The segmentor of a finished ``model.pt`` (stage 4's format) and its metadata."""
    import torch

    from models.segmentors import build_segmentor

    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    model = build_segmentor(state["model_name"], state["num_classes"], backbone=state["backbone"],
                            pretrained=False, **state.get("options", {}))
    model.load_state_dict(state["model"])
    meta = {"model_name": state["model_name"], "num_classes": state["num_classes"],
            "class_names": list(state.get("class_names") or []), "backbone": state["backbone"],
            "options": state.get("options", {}), "output": "dict: 'out' = logits (N, C, h, w)"}
    return model.eval(), meta


def _signature(num_classes: int):
    """Normalised RGB batches (N, 3, H, W) float32 in; the ``out`` logits (N, C, h, w) out
    (given, not inferred: the segmentors return a dict, which MLflow cannot infer from)."""
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    return ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3, -1, -1))]),
                          outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, num_classes, -1, -1), "out")]))


def log_segmentor(client, run_id: str, checkpoint: Path, extra: Mapping[str, Any] | None = None) -> str:
    """Log ``checkpoint`` as the PyTorch-flavour model of run ``run_id``; returns its URI."""
    import mlflow.pytorch

    model, meta = _module(Path(checkpoint))
    meta.update(extra or {})
    example = np.zeros((1, 3, EXAMPLE_SIZE, EXAMPLE_SIZE), np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        meta_path = Path(tmp) / META_FILE
        meta_path.write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")
        local = Path(tmp) / ARTIFACT_PATH
        mlflow.pytorch.save_model(model, str(local), pip_requirements=pip_requirements(),
                                  input_example=example, signature=_signature(meta["num_classes"]),
                                  extra_files=[str(meta_path)], serialization_format="pickle")
        client.log_artifacts(run_id, str(local), ARTIFACT_PATH)
    return f"runs:/{run_id}/{ARTIFACT_PATH}"


def register_segmentor(client, model_uri: str, name: str, tags: Mapping[str, Any]) -> str:
    """A new version of registered model ``name`` from ``model_uri`` (``runs:/<id>/model``),
    tagged; returns ``models:/<name>/<version>``."""
    from mlflow.exceptions import MlflowException

    match = re.fullmatch(r"runs:/([0-9a-f]+)/(.+)", model_uri)
    if not match:
        raise ValueError(f"register_segmentor: expected runs:/<run id>/<path>, got {model_uri!r}")
    run_id, path = match.groups()
    try:
        client.create_registered_model(name, description="wsss segmentor (pipeline.model_registry)")
    except MlflowException as err:
        if "RESOURCE_ALREADY_EXISTS" not in str(err.error_code):
            raise
    source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{path}"
    version = client.create_model_version(name, source, run_id=run_id,
                                          tags={k: str(v) for k, v in tags.items() if v is not None})
    return f"models:/{name}/{version.version}"
