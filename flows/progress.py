"""What a running stage shows in Prefect: log lines per epoch and a progress artifact.

:class:`StageTracker` wraps the tracker a stage writes to (MLflow or the no-op one) and
forwards every call unchanged; on the side it

* turns ``log_metrics(..., step=n)`` into a run-log line (at most one every
  ``log_every_s`` seconds per sub-unit and group of metric names — ``epoch/...`` and
  ``step/...`` are separate groups — so per-epoch lines all show and per-iteration ones
  are thinned),
* keeps a Prefect progress artifact (``create_progress_artifact`` /
  ``update_progress_artifact``) up to date as items finish.

Progress is measured without the stage's help, from what it already produces:

* steps: the highest ``step`` logged so far, over the expected number of steps
  (classifier epochs; segmentor iterations, per model, summed over the models);
* files: for the per-image stages, the number of output files (``*.npy`` maps,
  ``*.png`` masks) in the stage directory over the number of images of the split, counted
  by a background thread every ``poll_s`` seconds.

Updates are throttled to one API call per ``min_interval_s`` (each costs a few ms against
the Prefect server).
"""

import logging
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from pipeline.tracking import Tracker


class Progress:
    """A Prefect progress artifact (percent), throttled; no-op outside a Prefect run."""

    def __init__(self, key: str, description: str, min_interval_s: float = 5.0,
                 create: Callable | None = None, update: Callable | None = None):
        if create is None or update is None:
            from prefect.artifacts import create_progress_artifact, update_progress_artifact

            create, update = create_progress_artifact, update_progress_artifact
        self._update = update
        self.description = description
        self.min_interval_s = min_interval_s
        self.percent = 0.0
        self._last = float("-inf")  # the first update is sent at once
        self._lock = threading.Lock()
        self.artifact_id = create(0.0, key=key, description=description)

    def set(self, fraction: float, force: bool = False) -> None:
        percent = round(100.0 * min(max(fraction, 0.0), 1.0), 1)
        with self._lock:
            now = time.monotonic()
            if percent <= self.percent and not force:
                return
            if not force and now - self._last < self.min_interval_s:
                self.percent = max(self.percent, percent)  # sent with the next update
                return
            self.percent, self._last = max(self.percent, percent), now
            value = self.percent
        self._update(self.artifact_id, value, description=self.description)

    def finish(self) -> None:
        self.percent = min(self.percent, 99.9)
        self.set(1.0, force=True)


class StepCounter:
    """Fraction done from logged steps: ``sum over units of min(max step, steps_per_unit) /
    (steps_per_unit * units)``; steps count finished epochs / iterations. With ``prefix`` set,
    only calls logging a metric whose name starts with it count (the classifier logs
    ``epoch/...`` per epoch and ``step/...`` per optimiser step)."""

    def __init__(self, steps_per_unit: int, units: int = 1, prefix: str = ""):
        self.steps_per_unit = max(int(steps_per_unit), 1)
        self.units = max(int(units), 1)
        self.prefix = prefix
        self.best: dict[str, int] = {}

    def counts(self, metrics: Mapping[str, Any]) -> bool:
        return not self.prefix or any(k.startswith(self.prefix) for k in metrics)

    def observe(self, unit: str, step: int) -> float:
        self.best[unit] = max(self.best.get(unit, 0), int(step))
        done = sum(min(s, self.steps_per_unit) for s in self.best.values())
        return done / (self.steps_per_unit * self.units)


class FileCounter(threading.Thread):
    """Background thread: fraction = files matching ``pattern`` in ``directory`` / ``total``."""

    def __init__(self, directory: Path, pattern: str, total: int, report: Callable[[float], None],
                 poll_s: float = 2.0):
        super().__init__(daemon=True, name=f"progress-{Path(directory).name}")
        self.directory, self.pattern, self.total = Path(directory), pattern, max(int(total), 1)
        self.report, self.poll_s = report, poll_s
        self._stop_event = threading.Event()

    def count(self) -> int:
        return sum(1 for _ in self.directory.glob(self.pattern)) if self.directory.is_dir() else 0

    def run(self) -> None:
        while not self._stop_event.wait(self.poll_s):
            self.report(self.count() / self.total)

    def stop(self) -> None:
        self._stop_event.set()


class StageTracker(Tracker):
    """Forwards to ``inner``; adds log lines and progress (see the module docstring)."""

    def __init__(self, inner: Tracker, name: str, logger: logging.Logger | logging.LoggerAdapter,
                 progress: Progress | None = None, steps: StepCounter | None = None,
                 log_every_s: float = 5.0, _root: "StageTracker | None" = None):
        self.inner = inner
        self.name = name
        self.logger = logger
        self.progress = progress
        self.steps = steps
        self.log_every_s = log_every_s
        self.root = _root or self
        self._last_line: dict[tuple, float] = {}  # per group of metric names
        self.children: dict[str, StageTracker] = {}
        self.logged: set[Path] = set()  # files the stage logged itself on its own run

    @property
    def run_id(self) -> str | None:  # the manifest records the run that produced the output
        return self.inner.run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.inner.log_params(params)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.inner.log_metrics(metrics, step)
        if step is None:
            return
        now = time.monotonic()
        group = tuple(sorted({k.split("/")[0] for k in metrics}))  # "epoch/..." vs "step/..."
        if now - self._last_line.get(group, -1e9) >= self.log_every_s:
            self._last_line[group] = now
            shown = ", ".join(f"{k}={float(v):.4g}" for k, v in metrics.items()
                              if isinstance(v, (int, float)) or hasattr(v, "__float__"))
            self.logger.info("%s step %s: %s", self.name, step, shown)
        root = self.root
        if root.steps is not None and root.progress is not None and root.steps.counts(metrics):
            root.progress.set(root.steps.observe(self.name, step))

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.inner.log_artifact(path, artifact_path)
        if self.root is self:
            self.logged.add(Path(path).resolve())

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self.inner.set_tags(tags)

    def child(self, name: str) -> "StageTracker":
        if name not in self.children:
            self.children[name] = StageTracker(self.inner.child(name), f"{self.name}/{name}",
                                               self.logger, log_every_s=self.log_every_s,
                                               _root=self.root)
        return self.children[name]

    def close(self, status: str = "FINISHED") -> None:
        for child in self.children.values():
            child.close(status)
        self.inner.close(status)
