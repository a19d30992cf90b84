"""Scale-out paths run for real (docs/scale_out.md): stage 3 on a multi-process Dask
``LocalCluster`` reached through ``crf.dask_address``, and stage 4 under the actual
``torchrun --nproc_per_node=2 -m pipeline.cli run`` command line (gloo on CPU)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import stages
from pipeline.config import CRFConfig, DataConfig, PipelineConfig, SyntheticConfig, load_config
from pipeline.data import build_dataset
from pipeline.maps_io import map_path, save_maps
from pipeline.storage import StageResult, is_complete
from stages import refine_crf

REPO = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- stage 3 on Dask
def _data(root: Path) -> DataConfig:
    return DataConfig(dataset="synthetic", root=root, synthetic=SyntheticConfig(
        num_classes=3, num_train=8, num_val=2, image_size=48, seed=5))


def _noisy_maps(root: Path, maps_dir: Path) -> list[str]:
    """Stage-2-like map files: the ground truth of every train image plus noise."""
    dataset = build_dataset(_data(root), "train")
    rng = np.random.default_rng(1)
    for image_id in dataset.ids:
        mask = dataset.load_mask(image_id)
        classes = np.flatnonzero(dataset.labels(image_id)) + 1
        maps = [np.clip(0.7 * (mask == c) + rng.normal(0.1, 0.2, mask.shape), 0, 1) for c in classes]
        save_maps(map_path(maps_dir, image_id), classes,
                  np.stack(maps) if maps else np.zeros((0, *mask.shape)))
    return dataset.ids


# a `dask worker --preload`: the project's packages cannot be imported there (a machine
# without the project installed), whatever this checkout's install mode
_NO_PROJECT = """
import importlib.abc, sys

class NoProject(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("pipeline", "stages", "models", "flows"):
            raise ModuleNotFoundError(f"No module named {name!r}")

sys.meta_path.insert(0, NoProject())
"""


@pytest.mark.timeout(300)      # a stuck cluster fails with the threads' stacks, not at the 600 s default
def test_crf_stage_on_a_two_process_dask_cluster_matches_the_local_run(tmp_path):
    """Two worker processes (``processes=True``, loopback, no dashboard), reached only through
    ``crf.dask_address`` as a user's cluster would be: the workers import this checkout's
    modules (the stage checks it before submitting), run every chunk, and write PNGs
    byte-identical to the local run's; a worker that cannot import the project is refused."""
    distributed = pytest.importorskip("distributed", reason="the Dask CRF path needs `distributed` "
                                      "(pip install -e .[dask])")
    root = tmp_path / "data"
    build_dataset(_data(root), "train")
    maps_dir = tmp_path / "maps"
    ids = _noisy_maps(root, maps_dir)
    upstream = {"generate_cams": StageResult(stage="generate_cams", key="maps0", path=str(maps_dir))}

    def config(**crf) -> PipelineConfig:
        return PipelineConfig(workdir=tmp_path / "work", data=_data(root),
                              crf=CRFConfig(preset="psa", chunk_size=2, **crf))

    local = refine_crf.run(config(), upstream, tmp_path / "local")

    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  host="127.0.0.1", dashboard_address=None,
                                  worker_dashboard_address=None) as cluster, \
            distributed.Client(cluster) as observer:
        assert cluster.scheduler_address.startswith("tcp://127.0.0.1:")
        workers = set(observer.scheduler_info()["workers"])
        assert len(workers) == 2 and all(w.startswith("tcp://127.0.0.1:") for w in workers)
        pids = observer.run(os.getpid)
        assert os.getpid() not in pids.values() and len(set(pids.values())) == 2
        # what the stage checks before it submits: each worker imports *this* checkout
        reports = observer.run(refine_crf.worker_report, [str(maps_dir)])
        assert {r["module"] for r in reports.values()} == {refine_crf.__file__}
        assert {r["code"] for r in reports.values()} == {refine_crf.code_fingerprint()}
        assert all(r["missing"] == [] for r in reports.values())

        with distributed.get_task_stream(observer) as stream:
            dask = refine_crf.run(config(dask_address=cluster.scheduler_address), upstream,
                                  tmp_path / "dask")
        chunks = [t for t in stream.data if t["key"].startswith("refine_chunk")]
        assert len(chunks) == len(ids) // 2                    # 4 chunks of 2 images
        assert {t["worker"] for t in chunks} <= workers         # ran on the cluster, not here

        # a third worker, started as `dask worker` in an environment without the project:
        # the stage refuses before it submits anything, naming that worker
        (tmp_path / "no_project.py").write_text(_NO_PROJECT)
        outsider = subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_worker", cluster.scheduler_address,
             "--no-nanny", "--nthreads", "1", "--host", "127.0.0.1", "--no-dashboard",
             "--preload", str(tmp_path / "no_project.py")],
            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            observer.wait_for_workers(3, timeout=60)
            third = (set(observer.scheduler_info()["workers"]) - workers).pop()
            with pytest.raises(refine_crf.DaskWorkerError,
                               match=rf"worker {third} cannot run stage 3 .*No module named 'stages'"):
                refine_crf.run(config(dask_address=cluster.scheduler_address), upstream, tmp_path / "refused")
        finally:
            outsider.terminate()
            outsider.wait(timeout=30)
        assert not list((tmp_path / "refused").glob("*.png"))

    def pngs(directory: Path) -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in sorted(directory.glob("*.png"))}

    assert sorted(pngs(tmp_path / "dask")) == sorted(f"{i}.png" for i in ids)
    assert pngs(tmp_path / "dask") == pngs(tmp_path / "local")
    manifest = refine_crf.MANIFEST_CSV
    assert (tmp_path / "dask" / manifest).read_text() == (tmp_path / "local" / manifest).read_text()
    assert dask.metrics["miou"] == local.metrics["miou"] and dask.metrics["refined"] == len(ids)


def test_dask_worker_reports_name_the_worker_and_the_fix():
    """A worker with another version of the project, or without the input paths (no shared
    file system), fails the stage with one message naming the worker, before any chunk is
    submitted (simulated reports; a worker without the project is refused in the test above)."""
    here = {"module": refine_crf.__file__, "code": refine_crf.code_fingerprint(), "missing": []}
    refine_crf.check_worker_reports({"tcp://w1:1": here})
    with pytest.raises(refine_crf.DaskWorkerError, match=r"tcp://w2:2 .*other code.*same version"):
        refine_crf.check_worker_reports({"tcp://w1:1": here, "tcp://w2:2": {**here, "code": "x"}})
    with pytest.raises(refine_crf.DaskWorkerError, match=r"tcp://w1:1 cannot see /data/a.npy.*shared"):
        refine_crf.check_worker_reports({"tcp://w1:1": {**here, "missing": ["/data/a.npy"]}})
    wrapped = Exception('ModuleNotFoundError("No module named \'stages\'")')   # as client.run returns it
    with pytest.raises(refine_crf.DaskWorkerError,
                       match=r"tcp://w3:3 cannot run stage 3 \(ModuleNotFoundError.*pip install -e"):
        refine_crf.check_worker_reports({"tcp://w1:1": here, "tcp://w3:3": wrapped})
    with pytest.raises(refine_crf.DaskWorkerError, match="no workers"):
        refine_crf.check_worker_reports({})


# --------------------------------------------------------------------------- stage 4 under torchrun
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# loaded by every process of the torchrun job (PYTHONPATH): records who writes a COMPLETE marker
_MARKER_PROBE = """
import os
if os.environ.get("WSSS_TEST_MARKER_LOG"):
    import pipeline.storage as _storage
    _original = _storage.mark_complete

    def _logged(directory):
        with open(os.environ["WSSS_TEST_MARKER_LOG"], "a") as log:
            log.write(f"{os.environ.get('RANK', '-')} {directory}\\n")
        _original(directory)

    _storage.mark_complete = _logged
"""


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with the gloo backend is not available")
@pytest.mark.timeout(360)
def test_segmentor_stage_under_torchrun_two_cpu_processes(tmp_path):
    """`torchrun --nproc_per_node=2 -m pipeline.cli run --stages train_segmentor` (the command
    docs/scale_out.md gives, as `python -m torch.distributed.run`): stages 1-3 are complete
    beforehand (one process), so both ranks reuse them and train stage 4 with DDP; rank 0
    alone writes the completion marker."""
    config_file = tmp_path / "ddp.yaml"
    config_file.write_text("\n".join([
        "preset: demo", f"workdir: {tmp_path / 'work'}", "device: cpu", "threads: 1",
        "data: {root: %s, synthetic: {num_train: 12, num_val: 4, num_classes: 3, image_size: 32}}"
        % (tmp_path / "data"),
        "classifier: {epochs: 1, batch_size: 4, image_size: 32, feature_channels: 8, "
        "backbone_options: {width: 4}}",
        "maps: {num_related: 1}",
        "crf: {workers: 1}",
        "segmentor: {models: [fcn], iterations: 4, batch_size: 4, crop_size: 32, checkpoint_every: 2, "
        "log_every: 1, num_workers: 0, model_options: {fcn: {channels: 8, aux_channels: 8, "
        "backbone_options: {width: 8}}}}"]))
    config = load_config(str(config_file))
    stages.check_run_inputs(config, ["refine_crf"])          # generates the synthetic data
    before = stages.run_pipeline(config, stages=["refine_crf"])
    assert all(is_complete(Path(r.path)) for r in before.values())

    probe = tmp_path / "probe"
    probe.mkdir()
    (probe / "sitecustomize.py").write_text(_MARKER_PROBE)
    markers = tmp_path / "markers.log"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(probe), str(REPO)]), OMP_NUM_THREADS="1",
               WSSS_TEST_MARKER_LOG=str(markers))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
                           "-m", "pipeline.cli", "run", "--config", str(config_file),
                           "--stages", "train_segmentor"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]

    done = list((tmp_path / "work" / "train_segmentor").glob("*/COMPLETE"))
    assert len(done) == 1
    out = done[0].parent
    written = markers.read_text().splitlines()
    assert written == [f"0 {out}"]                  # once, by rank 0; stages 1-3 were reused
    summary = json.loads((out / "fcn" / "result.json").read_text())
    assert summary["world_size"] == 2 and summary["iterations"] == 4
    assert json.loads((out / "manifest.json").read_text())["inputs"] == {"refine_crf": before["refine_crf"].key}

    from stages import train_segmentor as ts
    from pipeline.runtime import load_checkpoint
    state = load_checkpoint(out / "fcn" / ts.CHECKPOINT)
    assert state["iteration"] == 4 and not any(k.startswith("module.") for k in state["model"])
    num_classes = build_dataset(config.data, "train").num_classes
    assert state["num_classes"] == num_classes
    model, _ = ts.load_trained(out / "fcn" / ts.MODEL_FILE, num_classes)
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 32, 32))["out"].shape[:2] == (1, num_classes)
