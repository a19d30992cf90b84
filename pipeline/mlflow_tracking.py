"""MLflow-backed :class:`~pipeline.tracking.Tracker`.

Run layout (one experiment per preset / deployment)::

    experiment "wsss-<config.name>"   (explicit artifact location, classic runs view tag)
      parent run  "<flow run name>"   tags: Prefect flow-run id, deployment, git commit, full config
        child run "train_classifier"  params: the stage's flattened config; metrics per epoch
        child run "generate_cams"
        child run "refine_crf"
        child run "train_segmentor"
          grandchild "sanet", "deeplab_largefov", ...   (one per segmentor: ``tracker.child(model)``)
        child run "evaluate"

Everything goes through :class:`mlflow.tracking.MlflowClient` with explicit run ids: a child
run names its parent with the ``mlflow.parentRunId`` tag, never through the fluent API's
thread-local active-run stack (``start_run(nested=True)`` from a Prefect worker thread silently
makes a top-level run). Metrics are buffered and sent with ``log_batch`` (each MLflow call
costs ~20 ms against SQLite): the buffer is flushed when it holds ``flush_every`` values, when
``flush_seconds`` have passed since the last flush, and on :meth:`MlflowTracker.flush` /
:meth:`MlflowTracker.close`.

Previews go through ``log_image(key=<image id>, step=...)``, so MLflow's image grid lines runs
up by image; stage runs sample system metrics (CPU, memory, disk, network; GPU when pynvml is
installed) with MLflow's ``SystemMetricsMonitor`` while they run (needs psutil); ``log_input``
records the data sets a run read (name, source, digest) as MLflow dataset inputs.

Every run carries the host, pid and pid start time of the process that created it
(``wsss.host``, ``wsss.pid``, ``wsss.pid_start``): a run left RUNNING by a killed process is
found by the next flow run (:func:`reconcile_killed_runs`) and marked KILLED.
"""

import json
import logging
import math
import os
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

from pipeline.config import config_to_dict, flatten
from pipeline.processes import owner, owner_alive
from pipeline.tracking import Tracker

log = logging.getLogger(__name__)

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
PARENT_TAG = "mlflow.parentRunId"
RUN_NAME_TAG = "mlflow.runName"
NOTE_TAG = "mlflow.note.content"
GIT_COMMIT_TAG = "mlflow.source.git.commit"
OWNER_TAGS = {"host": "wsss.host", "pid": "wsss.pid", "start": "wsss.pid_start"}
RECONCILED_TAG = "wsss.reconciled"

# MLflow limits (mlflow.utils.validation): 100 params/tags and 1000 metrics per batch,
# 6000 characters per param value, 8000 per tag value.
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
MAX_PARAM_LENGTH = 6000
MAX_TAG_LENGTH = 8000


def experiment_name(config_name: str) -> str:
    """The MLflow experiment of a preset / deployment: ``wsss-<name>``."""
    return f"wsss-{config_name}"


def git_commit(directory: Path) -> str:
    """``<sha>`` of HEAD in ``directory`` (``<sha>-dirty`` with uncommitted changes), or
    ``unknown`` outside a git checkout."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=directory, capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=directory,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{sha}-dirty" if dirty else sha


def _client(tracking_uri: str):
    from mlflow.tracking import MlflowClient  # slow import (~1.5 s): only when tracking is on

    return MlflowClient(tracking_uri=tracking_uri)


def ensure_experiment(client, name: str, artifact_root: Path) -> str:
    """Id of experiment ``name``, created with an explicit artifact location under
    ``artifact_root`` and the classic-runs-view tag when it does not exist yet."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            client.restore_experiment(experiment.experiment_id)
        if experiment.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
            client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return experiment.experiment_id
    location = (Path(artifact_root).resolve() / name).as_uri()
    try:
        return client.create_experiment(name, artifact_location=location,
                                        tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    except Exception:  # created concurrently by another flow run: use that one
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= MAX_PARAM_LENGTH else text[: MAX_PARAM_LENGTH - 3] + "..."


def _tag_value(value: Any) -> str:
    text = str(value)
    return text if len(text) <= MAX_TAG_LENGTH else text[: MAX_TAG_LENGTH - 3] + "..."


def _chunks(items: list, size: int) -> Iterable[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


class MlflowTracker(Tracker):
    """Writes to one MLflow run; :meth:`child` opens nested runs with an explicit parent id.

    Thread-safe: the metric buffer is guarded by a lock, so a stage may log from worker
    threads. Non-finite metric values are dropped with a warning (MLflow's UI cannot plot
    them); non-numeric ones are ignored (strings belong in tags).
    """

    def __init__(self, client, run_id: str, experiment_id: str, name: str = "run",
                 flush_every: int = 200, flush_seconds: float = 10.0):
        self.client = client
        self.run_id = run_id
        self.experiment_id = experiment_id
        self.name = name
        self.flush_every = flush_every
        self.flush_seconds = flush_seconds
        self.children: dict[str, "MlflowTracker"] = {}
        self._buffer: list = []
        self._params: dict[str, str] = {}
        self._lock = threading.Lock()
        self._last_flush = time.monotonic()
        self._closed = False
        self._monitor = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def start(cls, client, experiment_id: str, run_name: str, parent_run_id: str | None = None,
              tags: Mapping[str, Any] | None = None, **options) -> "MlflowTracker":
        """Create a run (a child of ``parent_run_id`` when given) and a tracker on it."""
        all_tags = {OWNER_TAGS[k]: v for k, v in owner().items()}
        all_tags.update({k: _tag_value(v) for k, v in (tags or {}).items()})
        if parent_run_id:
            all_tags[PARENT_TAG] = parent_run_id
        run = client.create_run(experiment_id, tags=all_tags, run_name=run_name)
        return cls(client, run.info.run_id, experiment_id, name=run_name, **options)

    @classmethod
    def attach(cls, tracking_uri: str, run_id: str, **options) -> "MlflowTracker":
        """A tracker on an existing run (e.g. the flow's parent run, from inside a task)."""
        client = _client(tracking_uri)
        run = client.get_run(run_id)
        return cls(client, run_id, run.info.experiment_id, name=run.info.run_name, **options)

    # ------------------------------------------------------------------ Tracker API
    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        new = {}
        for key, value in params.items():
            text = _param_value(value)
            if key in self._params:
                if self._params[key] != text:  # MLflow params are immutable: keep the first
                    log.warning("run %s: param %s already logged as %r, ignoring %r",
                                self.run_id, key, self._params[key], text)
                continue
            new[key] = text
        for chunk in _chunks(sorted(new.items()), MAX_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in chunk])
        self._params.update(new)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = []
        for key, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "__float__"):
                continue
            try:
                value = float(value)
            except (TypeError, ValueError):
                continue
            if not math.isfinite(value):
                log.warning("run %s: metric %s=%s is not finite, not logged", self.run_id, key, value)
                continue
            items.append(Metric(key, value, now, int(step) if step is not None else 0))
        with self._lock:
            self._buffer.extend(items)
            due = (len(self._buffer) >= self.flush_every
                   or time.monotonic() - self._last_flush >= self.flush_seconds)
        if due:
            self.flush()

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        elif path.is_file():
            self.client.log_artifact(self.run_id, str(path), artifact_path)
        else:
            raise FileNotFoundError(f"artifact {path} does not exist")

    def set_tags(self, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, _tag_value(v)) for k, v in tags.items()]
        for chunk in _chunks(items, MAX_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, tags=chunk)

    def log_image(self, path: Path, key: str, step: int = 0) -> None:
        """The PNG at ``path`` as an MLflow image under ``key`` at ``step``."""
        import numpy as np
        from PIL import Image

        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
        self.client.log_image(self.run_id, pixels, key=key.replace(":", "_"), step=int(step),
                              synchronous=True)

    def log_input(self, name: str, digest: str, source: str, context: str,
                  profile: Mapping[str, Any] | None = None) -> None:
        """One dataset input (``mlflow.data.context`` = ``context``) of this run."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        dataset = Dataset(name=name, digest=digest[:36], source_type="local",
                          source=json.dumps({"uri": source}),
                          profile=json.dumps(dict(profile or {}), default=str))
        self.client.log_inputs(self.run_id, [DatasetInput(dataset, [InputTag("mlflow.data.context", context)])])

    def start_system_metrics(self, sampling_interval: float = 10.0) -> bool:
        """Sample CPU / memory / disk / network (and GPU with pynvml) into this run until it
        closes (MLflow's ``system/...`` metrics). False, doing nothing, without psutil."""
        try:
            import psutil  # noqa: F401
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
        except ImportError:
            return False
        uri = self.client._tracking_client.tracking_uri
        self._monitor = SystemMetricsMonitor(self.run_id, sampling_interval=sampling_interval, tracking_uri=uri)
        self._monitor.start()
        return True

    def log_model(self, checkpoint: Path, extra: Mapping[str, Any] | None = None) -> str:
        """``pipeline.model_registry.log_segmentor`` into this run."""
        from pipeline.model_registry import log_segmentor

        return log_segmentor(self.client, self.run_id, Path(checkpoint), extra)

    def register_model(self, model_uri: str, name: str, tags: Mapping[str, Any]) -> str:
        """``pipeline.model_registry.register_segmentor`` with this tracker's client."""
        from pipeline.model_registry import register_segmentor

        return register_segmentor(self.client, model_uri, name, tags)

    def child(self, name: str) -> "MlflowTracker":
        """The nested run ``name`` (created on first use, then reused)."""
        if name not in self.children:
            self.children[name] = MlflowTracker.start(
                self.client, self.experiment_id, name, parent_run_id=self.run_id,
                tags={"wsss.unit": name}, flush_every=self.flush_every,
                flush_seconds=self.flush_seconds)
        return self.children[name]

    def flush(self) -> None:
        """Send the buffered metrics (in batches of at most 1000)."""
        with self._lock:
            pending, self._buffer = self._buffer, []
            self._last_flush = time.monotonic()
        for chunk in _chunks(pending, MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=chunk)

    def close(self, status: str = "FINISHED") -> None:
        """Flush, close the still-open child runs with the same status, end the run."""
        if self._closed:
            return
        for child in self.children.values():
            child.close(status)
        if self._monitor is not None:
            self._monitor.finish()
            self._monitor = None
        self.flush()
        self.client.set_terminated(self.run_id, status=status)
        self._closed = True


def reconcile_killed_runs(client, experiment_id: str, note: str) -> list:
    """Mark KILLED the runs of ``experiment_id`` still RUNNING whose creating process (on this
    host) is gone — what a ``kill -9`` of a flow run leaves — with ``note`` as the
    ``wsss.reconciled`` tag. Runs of live processes or other hosts are left alone. Returns the
    runs it marked."""
    marked = []
    for run in client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'",
                                  max_results=1000):
        tags = run.data.tags
        if owner_alive(*(tags.get(OWNER_TAGS[k]) for k in ("host", "pid", "start"))) is False:
            client.set_tag(run.info.run_id, RECONCILED_TAG, _tag_value(note))
            client.set_terminated(run.info.run_id, status="KILLED")
            marked.append(run)
    return marked


# ---------------------------------------------------------------------- pipeline-level runs
def default_tracking_uri(home: Path) -> str:
    """``$MLFLOW_TRACKING_URI`` when set (the services export it), else a SQLite database
    under the project's work directory."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    db = Path(home).resolve() / "mlflow" / "mlflow.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{db}"


def start_pipeline_run(config, tracking_uri: str, artifact_root: Path, run_name: str,
                       tags: Mapping[str, Any] | None = None) -> MlflowTracker:
    """The parent run of one pipeline (flow) run in experiment ``wsss-<config.name>``: the
    full config as flattened params, a ``wsss.config`` JSON tag and a ``config.json`` artifact."""
    client = _client(tracking_uri)
    experiment_id = ensure_experiment(client, experiment_name(config.name), artifact_root)
    full = config_to_dict(config)
    tracker = MlflowTracker.start(client, experiment_id, run_name,
                                  tags={**(tags or {}), "wsss.config": json.dumps(full, sort_keys=True)})
    tracker.log_params(flatten(full))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.json"
        path.write_text(json.dumps(full, indent=2, sort_keys=True) + "\n")
        tracker.log_artifact(path)
    return tracker
