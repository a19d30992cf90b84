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

Both feed a :class:`StageProgress` (items done of total, the unit, the latest metrics),
which sends each change to its sinks: the Prefect artifact (the percent, and the counts and
latest metrics in its description, :func:`format_detail`, which a watching CLI reads back
with :func:`parse_detail`) and a terminal view (``pipeline.console``). ``wsss run``, the
flow's tasks and ``wsss flow`` all measure progress this one way.

Updates are throttled to one API call per ``min_interval_s`` (each costs a few ms against
the Prefect server).
"""

import logging
import re
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

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

    def set(self, fraction: float, force: bool = False, detail: str | None = None) -> None:
        """Send the percent (monotone, throttled); ``detail`` replaces the text after the
        stage name in the description (counts and latest metrics, see :func:`format_detail`)."""
        percent = round(100.0 * min(max(fraction, 0.0), 1.0), 1)
        with self._lock:
            if detail is not None:
                self.description = f"{self.description.split(':')[0]}: {detail}"
            now = time.monotonic()
            if percent <= self.percent and not force:
                return
            if not force and now - self._last < self.min_interval_s:
                self.percent = max(self.percent, percent)  # sent with the next update
                return
            self.percent, self._last = max(self.percent, percent), now
            value = self.percent
        self._update(self.artifact_id, value, description=self.description)

    def finish(self, detail: str | None = None) -> None:
        self.percent = min(self.percent, 99.9)
        self.set(1.0, force=True, detail=detail)


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

    @property
    def total(self) -> int:
        return self.steps_per_unit * self.units

    @property
    def done(self) -> int:
        return sum(min(s, self.steps_per_unit) for s in self.best.values())

    def observe(self, unit: str, step: int) -> float:
        self.best[unit] = max(self.best.get(unit, 0), int(step))
        return self.done / self.total


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


_DETAIL = re.compile(r"^(\d+)/(\d+) (\S+)(?: · (.*))?$")


def format_metrics(metrics: Mapping[str, Any], limit: int = 2) -> str:
    """The latest metrics in a few characters: loss terms first, at most ``limit``."""
    numeric = {k: float(v) for k, v in metrics.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    names = sorted(numeric, key=lambda k: (k.rsplit("/", 1)[-1] != "loss", "loss" not in k))[:limit]
    return ", ".join(f"{k}={numeric[k]:.4g}" for k in names)


def format_detail(done: int, total: int, unit: str, metrics: str = "") -> str:
    """``12/40 epochs · step/loss=0.312``: what the artifact description and the terminal show."""
    text = f"{done}/{total} {unit}"
    return f"{text} · {metrics}" if metrics else text


def parse_detail(text: str) -> Optional[tuple[int, int, str, str]]:
    """(done, total, unit, metrics) back from a :func:`format_detail` string (or None)."""
    match = _DETAIL.match(text.strip())
    if not match:
        return None
    return int(match.group(1)), int(match.group(2)), match.group(3), match.group(4) or ""


class StageProgress:
    """One stage's progress: ``done`` of ``total`` items (``unit``: epochs, iterations,
    images; total 0 when unknown), the latest metrics and the start time. Every change goes
    to each sink, a callable ``sink(progress, final)``; a failing sink never fails the stage."""

    def __init__(self, stage: str, total: int, unit: str,
                 sinks: tuple[Callable[["StageProgress", bool], None], ...] = ()):
        self.stage, self.total, self.unit = stage, max(int(total), 0), unit
        self.sinks = tuple(sinks)
        self.done = 0
        self.metrics: dict[str, float] = {}
        self.started = time.time()
        self._lock = threading.Lock()

    @property
    def fraction(self) -> float:
        return min(self.done / self.total, 1.0) if self.total else 0.0

    def detail(self) -> str:
        return format_detail(self.done, self.total, self.unit, format_metrics(self.metrics))

    def count(self, done: int) -> None:
        """Items done so far (never goes back); sent to the sinks, which throttle."""
        with self._lock:
            done = max(self.done, int(done))
            self.done = min(done, self.total) if self.total else done
        self._send(False)

    def note(self, metrics: Mapping[str, Any]) -> None:
        """The metrics a stage just logged (shown with the next update)."""
        with self._lock:
            self.metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}

    def finish(self) -> None:
        if self.total:
            self.done = self.total
        self._send(True)

    def _send(self, final: bool) -> None:
        for sink in self.sinks:
            try:
                sink(self, final)
            except Exception:  # progress is cosmetic
                pass


def artifact_sink(artifact: Progress) -> Callable[[StageProgress, bool], None]:
    """A sink that keeps a Prefect progress artifact up to date (percent + detail)."""

    def send(progress: StageProgress, final: bool) -> None:
        if final:
            artifact.finish(progress.detail())
        else:
            artifact.set(progress.fraction, detail=progress.detail())

    return send


def stage_progress(name: str, config, out_dir: Path,
                   sinks: tuple[Callable[[StageProgress, bool], None], ...] = ()):
    """How stage ``name``'s progress is measured: (StageProgress, StepCounter or None,
    FileCounter or None; the caller starts and stops the counter thread)."""
    steps, counter = None, None
    if name == "train_classifier":
        steps = StepCounter(config.classifier.epochs, prefix="epoch/")
        progress = StageProgress(name, steps.total, "epochs", sinks)
    elif name == "train_segmentor":
        steps = StepCounter(config.segmentor.iterations, units=len(config.segmentor.models))
        progress = StageProgress(name, steps.total, "iterations", sinks)
    elif name in ("generate_cams", "refine_crf"):
        total = _split_size(config)
        progress = StageProgress(name, total, "images", sinks)
        if total:
            pattern = "*.npy" if name == "generate_cams" else "*.png"
            counter = FileCounter(out_dir, pattern, total, lambda fraction: progress.count(round(fraction * total)))
    else:
        progress = StageProgress(name, 0, "", sinks)
    return progress, steps, counter


def _split_size(config) -> int:
    """Images of the split stages 2-3 cover (0 when it cannot be read: progress is cosmetic)."""
    try:
        from pipeline.data import build_dataset

        return len(build_dataset(config.data, config.maps.split or config.data.train_split).ids)
    except Exception:
        return 0


class StageTracker(Tracker):
    """Forwards to ``inner``; adds log lines and progress (see the module docstring)."""

    def __init__(self, inner: Tracker, name: str, logger: logging.Logger | logging.LoggerAdapter,
                 progress: StageProgress | None = None, steps: StepCounter | None = None,
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
        if root.progress is None:
            return
        root.progress.note(metrics)
        if root.steps is not None and root.steps.counts(metrics):
            root.steps.observe(self.name, step)
        root.progress.count(root.steps.done if root.steps is not None else root.progress.done)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.inner.log_artifact(path, artifact_path)
        if self.root is self:
            self.logged.add(Path(path).resolve())

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self.inner.set_tags(tags)

    def log_image(self, path: Path, key: str, step: int = 0) -> None:
        self.inner.log_image(path, key, step)

    def log_model(self, checkpoint: Path, extra=None):
        return self.inner.log_model(checkpoint, extra)

    def register_model(self, model_uri: str, name: str, tags):
        return self.inner.register_model(model_uri, name, tags)

    def log_input(self, name: str, digest: str, source: str, context: str, profile=None) -> None:
        self.inner.log_input(name, digest, source, context, profile)

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


# ---------------------------------------------------------------------- terminal views
def console_sink(console) -> Callable[[StageProgress, bool], None]:
    """A sink that draws the stage on a :class:`pipeline.console.Console`."""

    def send(progress: StageProgress, final: bool) -> None:
        console.update(progress.stage, progress.done, progress.total, progress.unit,
                       format_metrics(progress.metrics), time.time() - progress.started, final=final)

    return send


class TerminalStages:
    """Terminal progress of stages run in this process (``wsss run``; ``wsss flow`` through
    :data:`LOCAL_VIEWS`): a start line, the live bar fed by the stage's tracker and file
    counter, and an end or cache-hit line."""

    def __init__(self, console, logger: logging.Logger | None = None):
        self.console = console
        self.logger = logger or logging.getLogger("wsss.progress")
        self._running: dict[str, tuple[StageProgress, Optional[FileCounter]]] = {}

    def sink(self) -> Callable[[StageProgress, bool], None]:
        return console_sink(self.console)

    def start(self, name: str, progress: StageProgress, counter: Optional[FileCounter]) -> None:
        self._running[name] = (progress, counter)
        self.console.started(name, progress.total, progress.unit)

    def wrap(self, name: str, config, out_dir: Path, will_reuse: bool, tracker: Tracker) -> Tracker:
        """``stages.run_pipeline``'s ``on_start``: a progress-reporting tracker for a stage
        that will compute; the tracker unchanged for one that will be reused."""
        if will_reuse:
            return tracker
        progress, steps, counter = stage_progress(name, config, out_dir, (self.sink(),))
        self.start(name, progress, counter)
        if counter:
            counter.start()
        return StageTracker(tracker, name, self.logger, progress=progress, steps=steps)

    def end(self, result) -> None:
        """The stage's end line (its bar finished first) or its cache-hit line."""
        progress, counter = self._running.pop(result.stage, (None, None))
        if counter:
            counter.stop()
        if result.cached:
            self.console.cached(result.stage, f"(key {result.key}) -> {result.path}")
            return
        if progress:
            progress.finish()
        self.console.finished(result.stage, f"done in {result.duration_s:.1f}s -> {result.path}")


# terminal views of in-process flow runs (``wsss flow`` adds one): the flow's stage tasks
# report to them besides the Prefect artifact
LOCAL_VIEWS: list[TerminalStages] = []
