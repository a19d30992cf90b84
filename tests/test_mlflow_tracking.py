"""pipeline.mlflow_tracking: batching and limits against a recording client, then the run
layout against a real MLflow SQLite store (explicit parent ids, also from another thread)."""

import math
import threading
from types import SimpleNamespace

import pytest

from pipeline.config import load_config
from pipeline.mlflow_tracking import MlflowTracker, experiment_name, git_commit, start_pipeline_run

pytest.importorskip("mlflow")


class RecordingClient:
    """Stands in for MlflowClient: records every call."""

    def __init__(self):
        self.batches, self.terminated, self.created = [], [], []

    def log_batch(self, run_id, metrics=(), params=(), tags=()):
        self.batches.append((run_id, list(metrics), list(params), list(tags)))

    def set_terminated(self, run_id, status=None):
        self.terminated.append((run_id, status))

    def create_run(self, experiment_id, tags=None, run_name=None):
        run_id = f"run{len(self.created)}"
        self.created.append((run_id, run_name, dict(tags or {})))
        return SimpleNamespace(info=SimpleNamespace(run_id=run_id))


def test_metrics_are_buffered_and_sent_in_batches():
    client = RecordingClient()
    tracker = MlflowTracker(client, "r", "0", flush_every=50, flush_seconds=1e9)
    for step in range(120):
        tracker.log_metrics({"loss": 1.0 / (step + 1), "lr": 0.1}, step=step)
    sent = [b for b in client.batches if b[1]]
    assert [len(b[1]) for b in sent] == [50, 50, 50, 50]  # 240 values, 40 still buffered
    tracker.close()
    sent = [b for b in client.batches if b[1]]
    assert sum(len(b[1]) for b in sent) == 240
    assert [m.step for m in sent[0][1][:4]] == [0, 0, 1, 1]
    assert client.terminated == [("r", "FINISHED")]
    tracker.close()  # idempotent
    assert len(client.terminated) == 1


def test_bad_values_and_param_limits():
    client = RecordingClient()
    tracker = MlflowTracker(client, "r", "0", flush_every=1)
    tracker.log_metrics({"nan": math.nan, "inf": math.inf, "text": "abc", "flag": True, "ok": 2})
    metrics = [m for b in client.batches for m in b[1]]
    assert [(m.key, m.value) for m in metrics] == [("ok", 2.0)]
    tracker.log_params({f"p{i}": i for i in range(250)} | {"long": "x" * 10000})
    batches = [b[2] for b in client.batches if b[2]]
    assert [len(b) for b in batches] == [100, 100, 51]
    long = next(p for b in batches for p in b if p.key == "long")
    assert len(long.value) == 6000
    tracker.log_params({"p1": 1, "p2": 99})  # same value: skipped; changed value: kept first
    assert len([b for b in client.batches if b[2]]) == 3


def test_child_runs_name_their_parent_explicitly():
    client = RecordingClient()
    tracker = MlflowTracker(client, "parent", "7")
    child = tracker.child("sanet")
    assert tracker.child("sanet") is child
    import os
    import socket

    owner = {"wsss.host": socket.gethostname(), "wsss.pid": str(os.getpid())}
    tags = client.created[0][2]
    assert client.created == [("run0", "sanet", {"mlflow.parentRunId": "parent", "wsss.unit": "sanet",
                                                 **owner, "wsss.pid_start": tags["wsss.pid_start"]})]
    tracker.close("FAILED")
    assert client.terminated == [("run0", "FAILED"), ("parent", "FAILED")]


def test_real_store_layout(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    config = load_config("demo")
    parent = start_pipeline_run(config, uri, tmp_path / "artifacts", "flow-run-1",
                                tags={"prefect.flow_run_id": "abc"})
    results = {}

    def stage():  # another thread, as a Prefect task may run: the parent id is explicit
        child = MlflowTracker.start(parent.client, parent.experiment_id, "refine_crf",
                                    parent_run_id=parent.run_id)
        child.log_metrics({"miou": 0.5})
        child.child("sanet").log_metrics({"loss": 1.0}, step=3)
        child.close()
        results["child"] = child.run_id

    thread = threading.Thread(target=stage)
    thread.start()
    thread.join()
    parent.close()

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(experiment_name("demo"))
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert experiment.artifact_location == (tmp_path / "artifacts" / "wsss-demo").resolve().as_uri()
    run = client.get_run(parent.run_id)
    assert run.data.tags["prefect.flow_run_id"] == "abc"
    assert run.data.params["crf.preset"] == "irn"
    assert [a.path for a in client.list_artifacts(parent.run_id)] == ["config.json"]
    child = client.get_run(results["child"])
    assert child.data.tags["mlflow.parentRunId"] == parent.run_id
    assert child.data.metrics == {"miou": 0.5} and child.info.status == "FINISHED"
    grandchild = client.search_runs([experiment.experiment_id],
                                    f"tags.mlflow.parentRunId = '{results['child']}'")[0]
    assert grandchild.info.run_name == "sanet"
    assert client.get_metric_history(grandchild.info.run_id, "loss")[0].step == 3


def test_git_commit(tmp_path):
    assert git_commit(tmp_path) == "unknown"
