"""Model registry round trip through a real MLflow tracking server on a loopback port: stage 4
logs each segmentor once (PyTorch flavour, pinned pip requirements, input example), stage 5
registers ``wsss-<preset>-<model>`` tagged with the headline metrics; the registered model
loads with ``mlflow.pytorch.load_model`` and through ``wsss predict --model models:/...``."""

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import load_config
from pipeline.data.palette import read_label_png
from pipeline.model_registry import registered_name

mlflow = pytest.importorskip("mlflow")

TINY = [
    "data.synthetic.num_train=8", "data.synthetic.num_val=4", "data.synthetic.image_size=48",
    "classifier.epochs=1", "classifier.image_size=48", "classifier.lr_steps=[1]",
    "classifier.contrastive_from_epoch=0", "maps.workers=1", "crf.workers=1",
    "segmentor.iterations=4", "segmentor.crop_size=48", "segmentor.checkpoint_every=2",
    "segmentor.warmup_iters=2", "segmentor.log_every=2", "segmentor.models=[fcn]",
    "segmentor.model_options={fcn: {channels: 16, aux_channels: 8}}",
    "evaluation.crop_size=48", "evaluation.previews=0",
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``mlflow server`` on a free loopback port with a SQLite store; stopped afterwards."""
    from flows.services import free_port, http_ok

    home = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{home / 'mlflow.db'}",
         "--artifacts-destination", str(home / "artifacts")],
        stdout=open(home / "server.log", "wb"), stderr=subprocess.STDOUT,
        env={**__import__("os").environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
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


def test_registry_round_trip(server, tmp_path, monkeypatch, capsys):
    import stages
    from mlflow.tracking import MlflowClient

    from pipeline.cli import main
    from pipeline.mlflow_tracking import start_pipeline_run

    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)
    torch.set_num_threads(1)
    config = load_config("demo", [f"workdir={tmp_path / 'work'}", f"data.root={tmp_path / 'data'}", *TINY])
    tracker = start_pipeline_run(config, server, tmp_path / "unused", run_name="registry-test")
    try:
        results = stages.run_pipeline(config, tracker=tracker)
    finally:
        tracker.close()
    name = registered_name("demo", "fcn")
    uri = results["evaluate"].metrics["fcn_registered_model"]
    assert uri == f"models:/{name}/1"

    client = MlflowClient(server)
    version = client.get_model_version(name, "1")
    assert version.tags["headline"] == results["evaluate"].metrics["headline"]
    assert float(version.tags["segmentor_miou"]) == pytest.approx(results["evaluate"].metrics["fcn_miou"])
    # logged once, in the segmentor's own run of stage 4
    seg_run = results["train_segmentor"].metrics["fcn_model_uri"].split("/")[1]
    assert version.run_id == seg_run
    assert [a.path for a in client.list_artifacts(seg_run) if a.path.startswith("model")] == ["model"]
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp_path / "dl")))
    requirements = (local / "requirements.txt").read_text()
    from importlib.metadata import version as installed
    assert f"torch=={installed('torch')}" in requirements.splitlines()
    assert (local / "input_example.json").is_file() or list(local.glob("input_example*"))

    model = mlflow.pytorch.load_model(uri)
    checkpoint = Path(results["train_segmentor"].path) / "fcn" / "model.pt"
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    x = torch.randn(1, 3, 48, 48)
    from stages.train_segmentor import load_trained
    reference, _ = load_trained(checkpoint)
    with torch.no_grad():
        assert torch.allclose(model.eval()(x)["out"], reference(x)["out"], atol=1e-6)
    assert state["num_classes"] == 6

    images = sorted((Path(config.data.root) / "JPEGImages").glob("val_*.jpg"))
    out = tmp_path / "pred"
    assert main(["predict", "--model", uri, "--input", *map(str, images), "--out", str(out)]) == 0
    stage5 = Path(results["evaluate"].path) / "fcn" / "predictions"
    for image in images:
        assert np.array_equal(read_label_png(out / f"{image.stem}.png"), read_label_png(stage5 / f"{image.stem}.png"))
