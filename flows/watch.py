"""Following a deployment run from the Prefect REST API (``wsss submit --watch``, ``wsss demo``).

Instead of ``prefect deployment run --watch`` (which prints the raw event stream: dozens of
``prefect.artifact.updated`` lines and no counts), :func:`watch_flow_run` polls, every
``poll_s`` seconds, what the run already records:

* its task runs (one per stage): a stage's start, and its end, cache hit (state ``Cached``)
  or failure, as single lines;
* its progress artifacts, whose descriptions carry the counts and the latest metrics
  (``flows.progress.format_detail``): the stage's live bar or plain progress line;
* its log entries at WARNING and above, one line each;

all drawn by a :class:`pipeline.console.Console`, until the flow run is in a final state.
"""

import time
from datetime import datetime, timezone
from typing import Callable

from flows.progress import parse_detail
from pipeline.console import Console

FINAL_STATES = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
LEVELS = {50: "CRITICAL", 40: "ERROR", 30: "WARNING"}


def _stage_of(name: str, stages: tuple[str, ...]) -> str | None:
    """``train_classifier-3a1`` (a task run's name) -> ``train_classifier``."""
    return next((s for s in stages if name == s or name.startswith(f"{s}-")), None)


def _seconds_since(stamp: str | None) -> float:
    if not stamp:
        return 0.0
    then = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    return max((datetime.now(timezone.utc) - then).total_seconds(), 0.0)


class FlowRunWatcher:
    """The state of one watch: what has been shown so far (see the module docstring).
    ``request(path, method, body)`` is one call to the Prefect API (a JSON answer)."""

    def __init__(self, request: Callable[[str, str, dict | None], object], run_id: str,
                 console: Console, stages: tuple[str, ...]):
        self.request, self.run_id, self.console, self.stages = request, run_id, console, stages
        self.task_states: dict[str, str] = {}    # task run id -> last state type shown
        self.task_stage: dict[str, str] = {}     # task run id -> stage
        self.task_start: dict[str, str] = {}     # task run id -> start time
        self.details: dict[str, str] = {}        # stage -> last progress description shown
        self.log_ids: set[str] = set()
        self.started: set[str] = set()          # task run ids whose start line is shown

    # ------------------------------------------------------------------ one poll
    def poll(self) -> str:
        """Show what changed since the last poll; returns the flow run's state type."""
        run = self.request(f"/flow_runs/{self.run_id}", "GET", None)
        self._tasks()
        self._progress()
        self._logs()
        return (run.get("state") or {}).get("type", "PENDING")

    def _tasks(self) -> None:
        runs = self.request("/task_runs/filter", "POST", {
            "flow_runs": {"id": {"any_": [self.run_id]}}, "sort": "EXPECTED_START_TIME_ASC"})
        for task in runs:
            stage = _stage_of(task.get("name", ""), self.stages)
            state = task.get("state") or {}
            kind, name = state.get("type", "PENDING"), state.get("name", "")
            if stage is None or self.task_states.get(task["id"]) == (kind, name):
                continue
            self.task_stage[task["id"]] = stage
            if task.get("start_time"):
                self.task_start[task["id"]] = task["start_time"]
            self.task_states[task["id"]] = (kind, name)
            if kind == "RUNNING" and task["id"] not in self.started:
                self.started.add(task["id"])
                self.console.started(stage)
            elif kind == "COMPLETED" and name == "Cached":
                self.console.cached(stage, f"({state.get('message') or 'reused'})")
            elif kind == "COMPLETED":
                self._progress()  # the bar's last state before its end line
                self.console.finished(stage, f"done in {task.get('total_run_time') or 0:.1f}s")
            elif kind in ("FAILED", "CRASHED", "CANCELLED"):
                self.console.finished(stage, f"{name or kind}: {state.get('message') or ''}".rstrip(": "))

    def _progress(self) -> None:
        artifacts = self.request("/artifacts/filter", "POST", {
            "artifacts": {"flow_run_id": {"any_": [self.run_id]}, "type": {"any_": ["progress"]}}})
        for artifact in artifacts:
            stage = self.task_stage.get(str(artifact.get("task_run_id")))
            description = artifact.get("description") or ""
            if stage is None or self.details.get(stage) == description:
                continue
            if self.task_states.get(str(artifact.get("task_run_id")), ("",))[0] != "RUNNING":
                continue  # finished: its end line is shown instead
            self.details[stage] = description
            parsed = parse_detail(description.split(": ", 1)[-1])
            done, total, unit, metrics = parsed or (0, 0, "", "")
            if not parsed and isinstance(artifact.get("data"), (int, float)):
                done, total, unit = int(round(artifact["data"])), 100, "%"
            elapsed = _seconds_since(self.task_start.get(str(artifact.get("task_run_id"))))
            self.console.update(stage, done, total, unit, metrics, elapsed)

    def _logs(self) -> None:
        logs = self.request("/logs/filter", "POST", {
            "logs": {"flow_run_id": {"any_": [self.run_id]}, "level": {"ge_": 30}},
            "sort": "TIMESTAMP_ASC", "limit": 200})
        for entry in logs:
            if entry["id"] in self.log_ids:
                continue
            self.log_ids.add(entry["id"])
            level = LEVELS.get(entry.get("level", 30) // 10 * 10, "WARNING")
            self.console.message(str(entry.get("message", "")).strip(), level)


def watch_flow_run(request: Callable[[str, str, dict | None], object], run_id: str, console: Console,
                   stages: tuple[str, ...], poll_s: float = 2.0, timeout: float | None = None,
                   sleep: Callable[[float], None] = time.sleep) -> str:
    """Show the run's progress until its state is final (or ``timeout`` seconds passed);
    returns the final state type (``TIMEOUT`` on a timeout). A failed API call is retried at
    the next poll (the server may be briefly busy)."""
    watcher = FlowRunWatcher(request, run_id, console, stages)
    start = time.monotonic()
    state = "PENDING"
    while True:
        try:
            state = watcher.poll()
        except (OSError, ValueError) as err:
            console.message(f"could not read the flow run from the Prefect API ({err}); retrying", "WARNING")
        if state in FINAL_STATES:
            return state
        if timeout is not None and time.monotonic() - start >= timeout:
            return "TIMEOUT"
        sleep(poll_s)
