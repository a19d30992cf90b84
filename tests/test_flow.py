"""The Prefect flow ``wsss`` under the Prefect test harness, with recording stand-ins for the
five stage modules (the real stages are exercised end to end in tests/test_e2e_demo.py).

Checks the caching pattern of issue 6: all stages, then a single-stage rerun (upstream
reused), a CRF change (3 recomputed; 4-5 only when asked), deleted files (recomputed),
``force``; and the MLflow layout (parent run, one child per stage with explicit parent id,
one grandchild per segmentor, cached children pointing at the producing run).
"""

import ast
import io
import shutil
import sys
import types
from pathlib import Path

import pytest

import stages
from pipeline.config import load_config
from pipeline.storage import StageResult, atomic_write_json

pytest.importorskip("prefect")
pytest.importorskip("mlflow")

SEGMENTORS = ["sanet", "deeplab_largefov"]


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    """Prefect test harness + a private MLflow SQLite store + WSSS_HOME (module-wide: ~15 s)."""
    from prefect.testing.utilities import prefect_test_harness

    home = tmp_path_factory.mktemp("home")
    mp = pytest.MonkeyPatch()
    mp.setenv("WSSS_HOME", str(home))
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{home}/mlflow.db")
    mp.setenv("WSSS_TRACKING", "on")
    with prefect_test_harness(server_startup_timeout=120):
        yield home
    mp.undo()


@pytest.fixture
def fake_stages(monkeypatch):
    """Stand-ins writing one file each; train_segmentor trains "two models" via tracker.child."""
    calls = []

    def make(name):
        module = types.ModuleType(f"stages.{name}")

        def run(config, upstream, out_dir, tracker):
            calls.append(name)
            out_dir = Path(out_dir)
            (out_dir / "out.txt").write_text(",".join(f"{k}={v.key}" for k, v in sorted(upstream.items())))
            atomic_write_json(out_dir / "metrics.json", {"calls": len(calls)})
            units = [tracker.child(m) for m in SEGMENTORS] if name == "train_segmentor" else [tracker]
            for unit in units:
                for step in range(3):
                    unit.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
            return StageResult(stage=name, key="", path=str(out_dir),
                               metrics={"value": float(len(calls)), "headline": f"{name} done"},
                               files={"metrics": "metrics.json"})

        module.run = run
        return module

    for name in stages.STAGE_ORDER:
        monkeypatch.setitem(sys.modules, f"stages.{name}", make(name))
    return calls


def _config(tmp_path, *overrides):
    """The demo config on a small synthetic dataset under ``tmp_path`` (the flow checks the
    inputs of the stages it will compute, generating synthetic data, before the first one)."""
    return load_config("demo", [f"workdir={tmp_path / 'work'}", f"data.root={tmp_path / 'data'}",
                                "data.synthetic.num_train=6", "data.synthetic.num_val=2",
                                "data.synthetic.image_size=32", *overrides])


def _cached(results):
    return {name: r["cached"] for name, r in results.items()}


def test_flow_caching_pattern_and_mlflow_runs(harness, fake_stages, tmp_path):
    from mlflow.tracking import MlflowClient

    from flows.wsss import wsss

    first = wsss(config=_config(tmp_path))
    assert fake_stages == list(stages.STAGE_ORDER)
    assert not any(_cached(first).values())

    # single-stage rerun: upstream reused, nothing downstream run
    fake_stages.clear()
    rerun = wsss(config=_config(tmp_path), stages=["refine_crf"])
    assert list(rerun) == ["train_classifier", "generate_cams", "refine_crf"]
    assert fake_stages == [] and all(_cached(rerun).values())

    # a CRF parameter changes: stage 3 recomputed, 1-2 reused, 4-5 not asked
    fake_stages.clear()
    crf = wsss(config=_config(tmp_path, "crf.iterations=3"), stages=["refine_crf"])
    assert fake_stages == ["refine_crf"]
    assert crf["generate_cams"]["key"] == first["generate_cams"]["key"]
    assert crf["refine_crf"]["key"] != first["refine_crf"]["key"]

    # ...and 4-5 when asked; 3 is now reused
    fake_stages.clear()
    full = wsss(config=_config(tmp_path, "crf.iterations=3"))
    assert fake_stages == ["train_segmentor", "evaluate"]
    assert _cached(full) == {"train_classifier": True, "generate_cams": True, "refine_crf": True,
                             "train_segmentor": False, "evaluate": False}

    # a cache hit whose files were deleted recomputes that stage (and only that one)
    shutil.rmtree(first["generate_cams"]["path"])
    fake_stages.clear()
    again = wsss(config=_config(tmp_path), stages=["generate_cams"])
    assert fake_stages == ["generate_cams"]
    assert again["generate_cams"]["key"] == first["generate_cams"]["key"]

    # force recomputes the selected stage only
    fake_stages.clear()
    forced = wsss(config=_config(tmp_path), stages=["refine_crf"], force=True)
    assert fake_stages == ["refine_crf"]
    assert _cached(forced) == {"train_classifier": True, "generate_cams": True, "refine_crf": False}

    # MLflow: parent per flow run, children with explicit parent ids, segmentor grandchildren
    client = MlflowClient()
    experiment = client.get_experiment_by_name("wsss-demo")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert experiment.artifact_location.startswith(Path(harness).resolve().as_uri())
    runs = client.search_runs([experiment.experiment_id], max_results=500)
    by_id = {r.info.run_id: r for r in runs}
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 6
    assert all(r.data.tags["prefect.flow_run_id"] and "wsss.config" in r.data.tags for r in parents)
    assert all(r.data.tags["prefect.deployment"] == "none" for r in parents)
    first_parent = first["train_classifier"]["run_id"]
    first_parent = by_id[first_parent].data.tags["mlflow.parentRunId"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == first_parent]
    assert sorted(r.info.run_name for r in children) == sorted(stages.STAGE_ORDER)
    assert all(r.info.status == "FINISHED" for r in children)
    seg = next(r for r in children if r.info.run_name == "train_segmentor")
    grandchildren = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == seg.info.run_id]
    assert sorted(r.info.run_name for r in grandchildren) == sorted(SEGMENTORS)
    history = client.get_metric_history(grandchildren[0].info.run_id, "loss")
    assert [m.step for m in history] == [0, 1, 2]
    crf_child = next(r for r in children if r.info.run_name == "refine_crf")
    assert crf_child.data.params["crf.preset"] == "irn"
    assert crf_child.data.metrics["value"] == 3.0
    assert {a.path for a in client.list_artifacts(crf_child.info.run_id)} >= {"manifest.json", "metrics.json"}

    # the reused refine_crf of the second flow run points at the run that produced it
    second_parent = by_id[rerun["train_classifier"]["run_id"]]  # cached result: producer's run
    assert second_parent.info.run_id == first["train_classifier"]["run_id"]
    cached_children = [r for r in runs if r.data.tags.get("wsss.cached") == "true"
                       and r.info.run_name == "refine_crf"]
    assert cached_children
    assert any(r.data.tags["wsss.source_run_id"] == first["refine_crf"]["run_id"] for r in cached_children)


def test_flow_rejects_bad_parameters_with_field_path(harness):
    from prefect.exceptions import ParameterTypeError

    from flows.wsss import wsss

    with pytest.raises(ParameterTypeError, match=r"crf\.iterations|iterations"):
        wsss.validate_parameters({"config": {"crf": {"iterations": "five"}}})
    with pytest.raises(ParameterTypeError, match="stages"):
        wsss.validate_parameters({"stages": ["refine_crff"]})


def test_flow_schema_comes_from_the_config_model():
    from prefect.utilities.callables import parameter_schema

    from flows.wsss import wsss

    schema = parameter_schema(wsss.fn).model_dump()
    assert set(schema["properties"]) == {"config", "stages", "force", "validate"}
    definitions = schema.get("definitions") or schema.get("$defs")
    assert "PipelineConfig" in definitions and "CRFConfig" in definitions


def test_flow_modules_do_not_postpone_annotations():
    for path in Path(__file__).resolve().parent.parent.joinpath("flows").glob("*.py"):
        tree = ast.parse(path.read_text())
        future = [a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                  and n.module == "__future__" for a in n.names]
        assert "annotations" not in future, path


def test_prefect_yaml_matches_presets():
    from flows import deployments
    from flows.paths import project_root

    root = Path(__file__).resolve().parent.parent
    assert deployments.stale(root) == [], "run `wsss deployments --write`"
    spec = deployments.project_spec()
    assert [d["name"] for d in spec["deployments"]] == ["voc", "coco", "demo", "voc-mini"]
    assert all(d["work_pool"]["name"] == "wsss-process" for d in spec["deployments"])
    assert project_root() == root


def test_concurrent_runs_same_config_compute_once_different_configs_apart(harness, fake_stages, tmp_path):
    import threading

    from flows.wsss import wsss

    results = {}

    def run(label, *overrides):
        results[label] = wsss(config=_config(tmp_path, *overrides), stages=["refine_crf"])

    threads = [threading.Thread(target=run, args=(label, *o)) for label, o in
               [("a", ()), ("b", ()), ("c", ("crf.iterations=7",))]]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # a and b share every key: each stage ran once, the other run waited and reused it
    assert sorted(fake_stages) == sorted(["train_classifier", "generate_cams", "refine_crf", "refine_crf"])
    assert {n: r["key"] for n, r in results["a"].items()} == {n: r["key"] for n, r in results["b"].items()}
    assert sum(r["cached"] for r in (results["a"]["refine_crf"], results["b"]["refine_crf"])) == 1
    # c differs in stage 3 only: its own directory
    assert results["c"]["refine_crf"]["path"] != results["a"]["refine_crf"]["path"]
    assert results["c"]["generate_cams"]["path"] == results["a"]["generate_cams"]["path"]


def test_flow_checks_inputs_before_the_first_stage(harness, fake_stages, tmp_path):
    """A missing val image fails the flow before stage 1 (no stage ran); a truncated one only
    with ``validate`` (the full decode)."""
    from flows.wsss import wsss
    from pipeline.data import DatasetError, generate_synthetic

    config = _config(tmp_path)
    generate_synthetic(config.data.root, config.data.synthetic)
    image = Path(config.data.root) / "JPEGImages" / "val_00001.jpg"
    data = image.read_bytes()
    image.unlink()
    with pytest.raises(DatasetError, match=r"val_00001\.jpg does not exist"):
        wsss(config=config)
    assert fake_stages == []
    image.write_bytes(data[: len(data) * 3 // 4])
    with pytest.raises(DatasetError, match=r"val_00001\.jpg .*truncated"):
        wsss(config=config, validate=True)
    assert fake_stages == []
    wsss(config=config)                      # the header check passes: the stages run
    assert fake_stages == list(stages.STAGE_ORDER)


def test_rerun_marks_the_records_of_a_killed_flow_run(harness, fake_stages, tmp_path):
    """What a kill -9 of a flow run leaves (MLflow parent and stage runs RUNNING, the Prefect
    flow run and its task run Running) is closed by the next flow run: KILLED / Crashed. A
    RUNNING run of a live process is left alone."""
    import os
    import subprocess

    from prefect.client.orchestration import get_client
    from prefect.states import Running

    from flows.wsss import STAGE_TASKS, wsss
    from pipeline.mlflow_tracking import (MlflowTracker, _client, default_tracking_uri,
                                          ensure_experiment, experiment_name)

    config = _config(tmp_path)
    with get_client(sync_client=True) as prefect:
        flow_run = prefect.create_flow_run(wsss, parameters={}, state=Running())
        task_run = prefect.create_task_run(STAGE_TASKS["train_classifier"], flow_run_id=flow_run.id,
                                           dynamic_key="0", state=Running())
    client = _client(default_tracking_uri(harness))
    experiment = ensure_experiment(client, experiment_name(config.name), harness / "mlflow" / "artifacts")
    gone = subprocess.Popen(["true"])
    gone.wait()                                          # a pid whose process has exited
    parent = MlflowTracker.start(client, experiment, "killed", tags={
        "prefect.flow_run_id": str(flow_run.id), "wsss.pid": str(gone.pid)})
    # the stage run: this pid but another start time, i.e. a recycled pid
    stage = MlflowTracker.start(client, experiment, "train_classifier", parent_run_id=parent.run_id,
                                tags={"wsss.pid": str(os.getpid()), "wsss.pid_start": "1"})
    live = MlflowTracker.start(client, experiment, "still running")      # this live process

    wsss(config=config, stages=["train_classifier"])

    assert client.get_run(parent.run_id).info.status == "KILLED"
    assert client.get_run(stage.run_id).info.status == "KILLED"
    assert "marked KILLED" in client.get_run(parent.run_id).data.tags["wsss.reconciled"]
    assert client.get_run(live.run_id).info.status == "RUNNING"
    live.close()
    with get_client(sync_client=True) as prefect:
        assert prefect.read_flow_run(flow_run.id).state.type.value == "CRASHED"
        assert prefect.read_task_run(task_run.id).state.type.value == "CRASHED"


def test_wsss_flow_prints_stage_progress_and_a_watch_reads_it_back_from_the_api(harness, fake_stages,
                                                                                tmp_path, capsys):
    """`wsss flow` off a terminal: a start line, progress lines and an end line per stage,
    not Prefect's event stream; the progress artifacts carry the counts, and flows.watch
    reads the run back from the real Prefect API (task runs, artifacts, logs)."""
    from prefect.settings import PREFECT_API_URL

    from flows.progress import parse_detail
    from flows.services import api_request
    from flows.watch import watch_flow_run
    from pipeline.cli import main
    from pipeline.console import Console

    overrides = [f"workdir={tmp_path / 'work'}", f"data.root={tmp_path / 'data'}", "data.synthetic.num_train=6",
                 "data.synthetic.num_val=2", "data.synthetic.image_size=32", "segmentor.iterations=3"]
    assert main(["flow", *[a for o in overrides for a in ("--set", o)]]) == 0
    out = capsys.readouterr().out
    for name in stages.STAGE_ORDER:
        assert f"[wsss] {name}: started" in out and f"[wsss] {name}: done in" in out
    assert "[wsss] train_segmentor 6/6 iterations 100% loss=" in out
    assert "prefect.artifact" not in out

    api = PREFECT_API_URL.value().rstrip("/")
    request = lambda path, method, body: api_request(api + path, method, body)  # noqa: E731
    run = request("/flow_runs/filter", "POST", {"sort": "EXPECTED_START_TIME_DESC", "limit": 1})[0]
    artifacts = request("/artifacts/filter", "POST", {"artifacts": {
        "flow_run_id": {"any_": [run["id"]]}, "type": {"any_": ["progress"]}}})
    details = {a["description"].split(":")[0]: parse_detail(a["description"].split(": ", 1)[1]) for a in artifacts}
    assert details["train_segmentor"][:3] == (6, 6, "iterations")
    shown = io.StringIO()
    assert watch_flow_run(request, run["id"], Console(shown, live=False), stages.STAGE_ORDER,
                          sleep=lambda s: None) == "COMPLETED"
    for name in stages.STAGE_ORDER:
        assert f"[wsss] {name}: done in" in shown.getvalue()
