"""Following a deployment run from the Prefect API: stage lines, progress lines, warnings."""

import io

from flows.watch import FlowRunWatcher, watch_flow_run
from pipeline.console import Console

STAGES = ("train_classifier", "generate_cams")


class FakeApi:
    """Answers the four requests flows.watch makes from a list of snapshots (one per poll)."""

    def __init__(self, snapshots):
        self.snapshots, self.poll = snapshots, -1
        self.paths = []

    def __call__(self, path, method, body):
        self.paths.append(path)
        if path.startswith("/flow_runs/"):
            self.poll = min(self.poll + 1, len(self.snapshots) - 1)
        snap = self.snapshots[self.poll]
        if path.startswith("/flow_runs/"):
            return {"state": {"type": snap["flow"]}}
        return {"/task_runs/filter": snap.get("tasks", []), "/artifacts/filter": snap.get("artifacts", []),
                "/logs/filter": snap.get("logs", [])}[path]


def task(stage, kind, name="", message="", seconds=None):
    return {"id": f"t-{stage}", "name": f"{stage}-abc", "start_time": "2026-01-01T00:00:00Z",
            "total_run_time": seconds, "state": {"type": kind, "name": name or kind.title(), "message": message}}


def artifact(stage, description, percent):
    return {"task_run_id": f"t-{stage}", "description": description, "data": percent}


def test_watch_shows_stage_lines_progress_and_warnings_not_events():
    api = FakeApi([
        {"flow": "RUNNING", "tasks": [task("train_classifier", "COMPLETED", "Cached", "reused output k1")]},
        {"flow": "RUNNING", "tasks": [task("train_classifier", "COMPLETED", "Cached", "reused output k1"),
                                      task("generate_cams", "RUNNING")],
         "artifacts": [artifact("generate_cams", "generate_cams: 40/160 images", 25.0)]},
        {"flow": "RUNNING", "tasks": [task("train_classifier", "COMPLETED", "Cached", "reused output k1"),
                                      task("generate_cams", "RUNNING")],
         "artifacts": [artifact("generate_cams", "generate_cams: 120/160 images · features_recomputed=2", 75.0)],
         "logs": [{"id": "l1", "level": 30, "message": "waiting for lock held by pid 7"}]},
        {"flow": "COMPLETED", "tasks": [task("train_classifier", "COMPLETED", "Cached", "reused output k1"),
                                        task("generate_cams", "COMPLETED", seconds=12.5)],
         "logs": [{"id": "l1", "level": 30, "message": "waiting for lock held by pid 7"}]},
    ])
    out = io.StringIO()
    final = watch_flow_run(api, "run-1", Console(out, live=False, every_s=0), STAGES, sleep=lambda s: None)
    lines = out.getvalue().splitlines()
    assert final == "COMPLETED"
    assert lines[0] == "[wsss] train_classifier: cached (reused output k1)"
    assert lines[1] == "[wsss] generate_cams: started"
    assert lines[2].startswith("[wsss] generate_cams 40/160 images 25% elapsed ") and " eta " in lines[2]
    assert lines[3].startswith("[wsss] generate_cams 120/160 images 75% features_recomputed=2 elapsed ")
    assert lines[4] == "[wsss] warning: waiting for lock held by pid 7"
    assert lines[5] == "[wsss] generate_cams: done in 12.5s"
    assert len(lines) == 6 and not any("prefect.artifact" in line for line in lines)


def test_failed_stage_and_timeout():
    api = FakeApi([{"flow": "RUNNING", "tasks": [task("train_classifier", "FAILED", "Failed", "loss became nan")],
                    "logs": [{"id": "e", "level": 40, "message": "Task run failed"}]}])
    out = io.StringIO()
    final = watch_flow_run(api, "run-2", Console(out, live=False), STAGES, timeout=0.0, sleep=lambda s: None)
    assert final == "TIMEOUT"
    text = out.getvalue()
    assert "[wsss] train_classifier: Failed: loss became nan" in text and "[wsss] error: Task run failed" in text


def test_api_errors_are_retried():
    calls = []

    def flaky(path, method, body):
        calls.append(path)
        if len(calls) == 1:
            raise OSError("connection refused")
        return {"state": {"type": "COMPLETED"}} if path.startswith("/flow_runs/") else []

    out = io.StringIO()
    assert watch_flow_run(flaky, "r", Console(out, live=False), STAGES, sleep=lambda s: None) == "COMPLETED"
    assert "retrying" in out.getvalue()
    assert isinstance(FlowRunWatcher(flaky, "r", Console(out), STAGES).poll(), str)
