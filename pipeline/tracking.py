"""The tracking interface stages log through.

Stages call only these methods; they never import MLflow. :class:`Tracker` itself records
nothing (used in tests and plain runs); the orchestration layer provides an MLflow-backed
subclass (one parent run per pipeline run, one child run per stage / segmentor).
"""

from pathlib import Path
from typing import Any, Mapping


class Tracker:
    """No-op tracker; subclasses send the calls somewhere."""

    run_id: str | None = None

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Flat ``name -> value`` parameters (use ``pipeline.config.flatten``)."""

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Scalar metrics at an optional step (epoch or iteration); batch them per call."""

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """A file (or directory) to keep with the run."""

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """String tags on the run."""

    def child(self, name: str) -> "Tracker":
        """A nested tracker for a sub-unit (e.g. one segmentor inside stage 4)."""
        return self

    def log_model(self, checkpoint: Path, extra: Mapping[str, Any] | None = None) -> str | None:
        """A finished segmentor checkpoint as the run's model (``pipeline.model_registry``);
        returns its URI, None when nothing was logged (as here)."""
        return None

    def register_model(self, model_uri: str, name: str, tags: Mapping[str, Any]) -> str | None:
        """A new registry version of ``name`` from ``model_uri``, tagged; returns
        ``models:/<name>/<version>``, None when nothing was registered (as here)."""
        return None

    def log_image(self, path: Path, key: str, step: int = 0) -> None:
        """An image (PNG) under ``key`` at ``step``: runs logging the same keys line up in
        MLflow's image grid (previews use the image id as key)."""

    def log_input(self, name: str, digest: str, source: str, context: str,
                  profile: Mapping[str, Any] | None = None) -> None:
        """A data set the run read (``context``: its role, e.g. ``train``), identified by
        ``digest`` (e.g. a hash of its id list or the stage key that produced it)."""

    def close(self, status: str = "FINISHED") -> None:
        """End the run this tracker writes to (no-op here)."""


class MemoryTracker(Tracker):
    """Keeps everything in memory: for tests and for notebooks."""

    def __init__(self, name: str = "root"):
        self.name = name
        self.params: dict[str, Any] = {}
        self.metrics: list[tuple[int | None, dict[str, float]]] = []
        self.artifacts: list[tuple[Path, str | None]] = []
        self.tags: dict[str, str] = {}
        self.children: dict[str, "MemoryTracker"] = {}
        self.status: str | None = None
        self.models: list[tuple[Path, dict[str, Any]]] = []
        self.registered: list[tuple[str, str, dict[str, Any]]] = []
        self.images: list[tuple[Path, str, int]] = []
        self.inputs: list[dict[str, Any]] = []

    def log_params(self, params):
        self.params.update(params)

    def log_metrics(self, metrics, step=None):
        self.metrics.append((step, {k: float(v) for k, v in metrics.items()}))

    def log_artifact(self, path, artifact_path=None):
        self.artifacts.append((Path(path), artifact_path))

    def set_tags(self, tags):
        self.tags.update(tags)

    def child(self, name):
        return self.children.setdefault(name, MemoryTracker(name))

    def log_model(self, checkpoint, extra=None):
        self.models.append((Path(checkpoint), dict(extra or {})))
        return f"memory:/{self.name}/model"

    def register_model(self, model_uri, name, tags):
        self.registered.append((model_uri, name, dict(tags)))
        return f"models:/{name}/{len(self.registered)}"

    def log_image(self, path, key, step=0):
        self.images.append((Path(path), key, step))

    def log_input(self, name, digest, source, context, profile=None):
        self.inputs.append({"name": name, "digest": digest, "source": source, "context": context,
                            "profile": dict(profile or {})})

    def close(self, status="FINISHED"):
        self.status = status

    def history(self, name: str) -> list[float]:
        """Values logged for one metric, in order."""
        return [m[name] for _, m in self.metrics if name in m]


NULL_TRACKER = Tracker()
