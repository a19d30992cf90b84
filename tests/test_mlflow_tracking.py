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


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """``mlflow server`` on a free loopback port with a SQLite store; stopped afterwards."""
    import os
    import subprocess
    import sys
    import time

    from flows.services import free_port, http_ok

    home = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{home / 'mlflow.db'}",
         "--artifacts-destination", str(home / "artifacts")],
        stdout=open(home / "server.log", "wb"), stderr=subprocess.STDOUT,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while not http_ok(f"{url}/health"):
            assert proc.poll() is None and time.time() < deadline, (home / "server.log").read_text()[-2000:]
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_stage_runs_carry_images_with_steps_system_metrics_and_inputs(mlflow_server, tmp_path, monkeypatch):
    """Against a real server: a stage run records the data set it read (digest of the id
    list) and, for stage 4, the pseudo-mask set (digest = its stage key), samples system
    metrics while open, and logs previews as images keyed by image id at a step."""
    import time

    import numpy as np
    from mlflow.tracking import MlflowClient

    from flows.wsss import _stage_tracker
    from pipeline.data import build_dataset, generate_synthetic
    from pipeline.storage import StageResult, hash_text
    from stages.evaluate import log_previews, save_rgb_png

    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")
    config = load_config("demo", [f"workdir={tmp_path / 'work'}", f"data.root={tmp_path / 'data'}",
                                  "data.synthetic.num_train=4", "data.synthetic.num_val=2",
                                  "data.synthetic.image_size=32"])
    generate_synthetic(config.data.root, config.data.synthetic)
    parent = start_pipeline_run(config, mlflow_server, tmp_path / "artifacts", "flow-run-1")
    tracking = {"uri": mlflow_server, "experiment_id": parent.experiment_id, "parent_run_id": parent.run_id}
    masks = StageResult(stage="refine_crf", key="crfkey0123456789", path=str(tmp_path / "masks"))
    stage = _stage_tracker(tracking, "train_segmentor", config, {"refine_crf": masks})
    previews = tmp_path / "sanet" / "previews"
    previews.mkdir(parents=True)
    save_rgb_png(previews / "img_0.png", np.full((8, 24, 3), 200, np.uint8))
    log_previews(stage.child("sanet"), tmp_path / "sanet", step=300)
    time.sleep(2.0)
    stage.close()
    parent.close()

    client = MlflowClient(mlflow_server)
    run = client.get_run(stage.run_id)
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    ids = build_dataset(config.data, "train").ids
    assert inputs["synthetic:train"].dataset.digest == hash_text("\n".join(ids))
    assert inputs["synthetic:train"].tags[0].value == "train"
    assert inputs["pseudo_masks"].dataset.digest == masks.key
    assert any(k.startswith("system/cpu_utilization") for k in run.data.metrics), run.data.metrics
    assert any(k.startswith("system/system_memory") for k in run.data.metrics)
    sanet = client.get_run(stage.children["sanet"].run_id)
    images = [a.path for a in client.list_artifacts(sanet.info.run_id, "images")]
    assert any("previews" in p and "img_0" in p and "300" in p for p in images), images
