"""The Prefect flow ``wsss``: one task per pipeline stage, nothing else.

Each task calls :func:`stages.run_stage`, which owns the pipeline bookkeeping (provenance
key, output directory, reuse of complete outputs, resume of interrupted ones, manifest,
completion marker). The flow adds orchestration only:

* the stage plan: the selected ``stages`` plus the stages they read (reused when their
  output is complete, computed otherwise); ``force`` recomputes the selected ones;
* caching across flow runs is the runner's on-disk provenance key
  ``sha256(stage config, upstream keys, source of the stage module and every project module
  it imports)`` checked against the completion marker *on disk* — so a "cache hit" whose
  files were deleted recomputes, which Prefect's own result cache cannot tell. Prefect task
  caching is therefore off (``NO_CACHE``); a reused stage ends in a ``Cached`` state;
* the per-stage file lock (``<workdir>/.locks/<stage>-<key>.lock``,
  :func:`pipeline.storage.stage_lock`, the one ``stages.run_stage`` takes for every entry
  point): the task takes it before it opens its MLflow child run, so two flow runs (or a
  flow run and a ``wsss run``) with the same config wait for each other instead of writing
  the same directory at once; runs with different configs have different keys, hence
  different directories;
* MLflow: one parent run per flow run (Prefect flow-run id, deployment, git commit, full
  config), one child run per stage with the parent id passed explicitly, one grandchild per
  segmentor (the stage calls ``tracker.child(model)``); a reused stage's child run is
  tagged ``wsss.cached=true`` and points at the run that produced the output
  (``wsss.source_run_id``);
* records of a killed flow run (``kill -9``: no hook runs) are closed by the next flow run
  (:func:`reconcile_killed_records`): MLflow runs KILLED, the Prefect flow and task runs Crashed;
* Prefect UI: log lines per epoch, a progress artifact per stage, and a final summary table
  artifact (stage, key, cached?, duration, headline metric).

Do not add ``from __future__ import annotations`` here: runs executed by ``serve`` / a
worker would then fail to validate the pydantic ``config`` parameter.
"""

import os
import time
from pathlib import Path
from typing import Any, Literal, Optional

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed

from flows.paths import home, project_root, resolve_workdir
from flows.progress import LOCAL_VIEWS, Progress, StageTracker, artifact_sink, stage_progress
from pipeline.cli_run import format_summary
from pipeline.config import PipelineConfig, flatten, preset
from pipeline.storage import StageResult, atomic_write_json, hash_text, is_complete, stage_dir, stage_lock
from pipeline.tracking import NULL_TRACKER, Tracker
from stages import (STAGE_ORDER, STAGES, check_run_inputs, check_stage_names, needed_stages, run_stage,
                    splits_read, stage_config, stage_key)

StageName = Literal[STAGE_ORDER]  # type: ignore[valid-type]  # the five names, for the schema
SUMMARY_KEY = "wsss-summary"
MAX_ARTIFACT_BYTES = 200 * 2**20
MAX_ARTIFACT_FILES = 200
TRACKING_ENV = "WSSS_TRACKING"  # "off" disables MLflow (plain Prefect runs, unit tests)


# ---------------------------------------------------------------------- tracking handle
def tracking_enabled() -> bool:
    return os.environ.get(TRACKING_ENV, "on").lower() not in ("off", "0", "false", "no")


def _stage_tracker(tracking: Optional[dict], name: str, config: PipelineConfig,
                   upstream: Optional[dict] = None, computes: bool = True, logger=None) -> Tracker:
    """The MLflow child run of stage ``name`` under the flow's parent run (explicit parent id),
    with the data sets it reads as inputs and, when it ``computes``, system metrics."""
    if not tracking:
        return NULL_TRACKER
    from pipeline.mlflow_tracking import MlflowTracker, _client

    client = _client(tracking["uri"])
    tracker = MlflowTracker.start(client, tracking["experiment_id"], name,
                                  parent_run_id=tracking["parent_run_id"],
                                  tags={"wsss.stage": name})
    tracker.log_params(flatten(stage_config(config, name)))
    try:
        log_stage_inputs(tracker, config, name, upstream or {})
        if computes:
            tracker.start_system_metrics()
    except Exception as err:  # lineage and system metrics are bookkeeping: never fail a stage
        if logger:
            logger.warning("%s: MLflow inputs / system metrics not recorded (%s: %s)",
                           name, type(err).__name__, err)
    return tracker


def log_stage_inputs(tracker: Tracker, config: PipelineConfig, name: str,
                     upstream: dict[str, StageResult]) -> None:
    """``tracker.log_input`` for every split stage ``name`` reads (name ``<dataset>:<split>``,
    the data root, a digest of the split's id list, the image count) and, for stage 4, the
    pseudo-mask set it trains on (digest: the refine_crf stage key)."""
    from pipeline.data import build_dataset

    root = str(resolve_workdir(config.data.root))
    for split in dict.fromkeys(splits_read(config, name)):
        ids = list(build_dataset(config.data, split).ids)
        tracker.log_input(f"{config.data.dataset}:{split}", hash_text("\n".join(ids)), root, split,
                          {"split": split, "images": len(ids), "root": root})
    masks = upstream.get("refine_crf")
    if name == "train_segmentor" and masks is not None:
        tracker.log_input("pseudo_masks", masks.key, str(resolve_workdir(masks.path)), "train",
                          {"stage": "refine_crf", "key": masks.key, "crf.preset": config.crf.preset,
                           "crf.source": config.crf.source})


def _progress_for(name: str, config: PipelineConfig, out_dir: Path, flow_run_key: str):
    """Progress of stage ``name`` (see flows.progress): the Prefect artifact, plus the
    terminal views of an in-process run (``wsss flow``)."""
    key = f"{flow_run_key}-{name}".replace("_", "-").lower()
    sinks = (artifact_sink(Progress(key, f"{name}: progress")),) + tuple(v.sink() for v in LOCAL_VIEWS)
    progress, steps, counter = stage_progress(name, config, out_dir, sinks)
    for view in LOCAL_VIEWS:
        view.start(name, progress, counter)
    return progress, steps, counter


# ---------------------------------------------------------------------- the stage task
def _run_stage_task(name: str, config: PipelineConfig, upstream: dict[str, StageResult],
                    force: bool = False, tracking: Optional[dict] = None,
                    progress_key: str = "wsss"):
    """Body of every stage task: lock, track, ``stages.run_stage``, report."""
    logger = get_run_logger()
    key = stage_key(config, name, {u: upstream[u].key for u in STAGES[name].upstream})
    out_dir = stage_dir(config.workdir, name, key)
    logger.info("%s: key %s -> %s", name, key, resolve_workdir(out_dir))
    with stage_lock(config.workdir, name, key, say=logger.warning):
        will_reuse = is_complete(out_dir) and not force
        inner = _stage_tracker(tracking, name, config, upstream, computes=not will_reuse, logger=logger)
        progress, steps, counter = (None, None, None) if will_reuse else \
            _progress_for(name, config, out_dir, progress_key)
        tracker = StageTracker(inner, name, logger, progress=progress, steps=steps)
        if counter:
            counter.start()
        try:
            result = run_stage(name, config, upstream, tracker, force=force)
        except BaseException:
            tracker.close("FAILED")
            raise
        finally:
            if counter:
                counter.stop()
        for view in LOCAL_VIEWS:
            view.end(result)   # finishes the progress too
        if progress and not LOCAL_VIEWS:
            progress.finish()
        try:
            _report_stage(inner, result, tracking, already=tracker.logged)
            tracker.close("FINISHED")
        except Exception as err:  # the stage's output is complete: tracking must not undo it
            logger.warning("%s: MLflow reporting failed (%s: %s); the output is complete",
                           name, type(err).__name__, err)
    verb = "reused" if result.cached else f"done in {result.duration_s:.1f}s"
    logger.info("%s: %s %s", name, verb, _headline(result))
    if result.cached:
        return Completed(data=result, name="Cached", message=f"reused output {result.key}")
    return result


def _report_stage(inner: Tracker, result: StageResult, tracking: Optional[dict],
                  already: set = frozenset()) -> None:
    """Metrics, tags and artifacts of a finished (or reused) stage on its MLflow child run:
    the manifest, and the files the stage lists in ``result.files`` that lie inside its
    output directory (files up to 200 MB, directories up to 200 files; per-image outputs
    stay on disk)."""
    if not tracking:
        return
    numeric = {k: v for k, v in result.metrics.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if numeric:
        inner.log_metrics(numeric)
    tags = {"wsss.key": result.key, "wsss.output": str(resolve_workdir(result.path)),
            "wsss.cached": str(result.cached).lower()}
    if isinstance(result.metrics.get("headline"), str):
        tags["wsss.headline"] = result.metrics["headline"]
    if result.cached:
        tags["wsss.source_run_id"] = str(result.run_id)
        tags["mlflow.note.content"] = (f"Reused output `{result.key}` of stage {result.stage}, "
                                       f"produced by run {result.run_id}.")
    inner.set_tags(tags)
    out = Path(result.path).resolve()
    if (out / "manifest.json").is_file():
        inner.log_artifact(out / "manifest.json")
    if result.cached:
        return
    for rel in sorted(set(result.files.values())) if result.files else []:
        path = (out / rel).resolve()
        if path in already or path == out or out not in path.parents:
            continue  # logged by the stage, the whole output, or another stage's file
        parent = path.parent.relative_to(out).as_posix()
        if path.is_file() and path.stat().st_size <= MAX_ARTIFACT_BYTES:
            inner.log_artifact(path, None if parent == "." else parent)
        elif path.is_dir() and sum(1 for _ in path.rglob("*")) <= MAX_ARTIFACT_FILES:
            inner.log_artifact(path, path.relative_to(out).as_posix())


def _headline(result: StageResult) -> str:
    headline = result.metrics.get("headline")
    if isinstance(headline, str):
        return headline
    numeric = [(k, v) for k, v in result.metrics.items() if isinstance(v, (int, float))]
    return f"{numeric[0][0]}={numeric[0][1]:.4g}" if numeric else ""


STAGE_TASKS = {name: task(_run_stage_task, name=name, cache_policy=NO_CACHE, persist_result=False)
               for name in STAGE_ORDER}


# ---------------------------------------------------------------------- the flow
def _start_tracking(config: PipelineConfig, run_name: str, tags: dict[str, str]):
    from pipeline.mlflow_tracking import default_tracking_uri, start_pipeline_run

    uri = default_tracking_uri(home())
    parent = start_pipeline_run(config, uri, home() / "mlflow" / "artifacts", run_name, tags=tags)
    return parent, {"uri": uri, "experiment_id": parent.experiment_id, "parent_run_id": parent.run_id}


def reconcile_killed_records(parent: Tracker, run_name: str, logger) -> list[str]:
    """The records a killed flow run left open: its MLflow runs still RUNNING whose process is
    gone become KILLED, and its Prefect flow run and task runs still in a non-final state
    become Crashed. Found through the MLflow parent runs' ``prefect.flow_run_id`` tag; errors
    are logged, never raised (bookkeeping must not fail a run). Returns the flow-run ids."""
    from pipeline.mlflow_tracking import PARENT_TAG, reconcile_killed_runs

    note = f"its process was gone when flow run {run_name} started: marked KILLED"
    try:
        killed = reconcile_killed_runs(parent.client, parent.experiment_id, note)
    except Exception as err:
        logger.warning("could not reconcile stale MLflow runs (%s: %s)", type(err).__name__, err)
        return []
    flow_runs = [r.data.tags["prefect.flow_run_id"] for r in killed
                 if PARENT_TAG not in r.data.tags and r.data.tags.get("prefect.flow_run_id", "local") != "local"]
    if killed:
        logger.warning("marked %d MLflow run(s) of killed flow runs KILLED: %s", len(killed),
                       ", ".join(r.info.run_id for r in killed))
    for flow_run_id in flow_runs:
        try:
            _crash_prefect_run(flow_run_id, f"its process was killed; found by flow run {run_name}")
        except Exception as err:
            logger.warning("could not mark flow run %s Crashed (%s: %s)", flow_run_id, type(err).__name__, err)
    return flow_runs


def _crash_prefect_run(flow_run_id: str, message: str) -> None:
    """The flow run (unless already final) and its unfinished task runs -> Crashed."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (FlowRunFilter, FlowRunFilterId, TaskRunFilter,
                                                TaskRunFilterState, TaskRunFilterStateType)
    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed

    open_types = [StateType.RUNNING, StateType.PENDING, StateType.SCHEDULED, StateType.PAUSED]
    with get_client(sync_client=True) as client:
        if not client.read_flow_run(flow_run_id).state.is_final():
            client.set_flow_run_state(flow_run_id, Crashed(message=message), force=True)
        tasks = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
            task_run_filter=TaskRunFilter(state=TaskRunFilterState(type=TaskRunFilterStateType(any_=open_types))))
        for task_run in tasks:
            client.set_task_run_state(task_run.id, Crashed(message=message), force=True)


def summary_rows(results: dict[str, StageResult]) -> list[dict[str, Any]]:
    return [{"stage": r.stage, "key": r.key, "cached": "yes" if r.cached else "no",
             "seconds": round(r.duration_s, 1), "headline": _headline(r)} for r in results.values()]


@flow(name="wsss", log_prints=True, persist_result=False)
def wsss(config: PipelineConfig = preset("demo"),
         stages: list[StageName] = list(STAGE_ORDER),
         force: bool = False, validate: bool = False) -> dict[str, dict[str, Any]]:
    """Weakly-supervised semantic segmentation, end to end: train the MCIS classifier, make
    localization maps, refine them with a dense CRF, train the segmentors on the pseudo-masks,
    evaluate. ``stages`` picks a subset (their inputs are reused or computed); ``force``
    recomputes the selected stages. Before any stage, every file of every split the run will
    read must exist with a readable header; ``validate`` decodes them all instead."""
    from prefect.runtime import deployment, flow_run

    logger = get_run_logger()
    selected = check_stage_names(stages)
    plan = needed_stages(selected)
    run_id, run_name = str(flow_run.id or "local"), flow_run.name or "local"
    workdir = resolve_workdir(config.workdir)
    logger.info("wsss %s: stages %s (selected %s, force=%s), workdir %s",
                config.name, ", ".join(plan), ", ".join(selected), force, workdir)
    checked = check_run_inputs(config, selected, force=force, decode=validate)
    logger.info("inputs %s: split(s) %s", "decoded" if validate else "checked", ", ".join(checked) or "none")

    parent, tracking = None, None
    if tracking_enabled():
        parent, tracking = _start_tracking(config, run_name, {
            "prefect.flow_run_id": run_id, "prefect.flow_run_name": run_name,
            "prefect.deployment": deployment.name or "none",
            "prefect.flow_run_url": flow_run.ui_url or "",
            "mlflow.source.git.commit": _git_commit(), "wsss.stages": ",".join(plan),
            "wsss.force": str(force).lower(), "wsss.workdir": str(workdir)})
        logger.info("MLflow run %s (experiment %s) at %s", parent.run_id, tracking["experiment_id"],
                    tracking["uri"])
        reconcile_killed_records(parent, run_name, logger)

    results: dict[str, StageResult] = {}
    start = time.time()
    try:
        for name in plan:
            upstream = {u: results[u] for u in STAGES[name].upstream}
            state = STAGE_TASKS[name](name, config, upstream, force=force and name in selected,
                                      tracking=tracking, progress_key=f"wsss-{run_id[:8]}",
                                      return_state=True)
            results[name] = state.result()  # re-raises a failed stage's exception
    except BaseException:
        if parent:
            parent.close("FAILED")
        raise

    rows = summary_rows(results)
    table = format_summary(results.values())
    create_table_artifact(rows, key=SUMMARY_KEY, description=f"wsss {config.name}: stage summary")
    summary = {"flow_run_id": run_id, "flow_run_name": run_name, "config_name": config.name,
               "workdir": str(workdir), "seconds": round(time.time() - start, 1), "stages": rows,
               "peak_rss_mb": peak_rss_mb(),
               "mlflow_run_id": parent.run_id if parent else None,
               "mlflow_experiment_id": tracking["experiment_id"] if tracking else None,
               "results": {n: r.to_dict() for n, r in results.items()}}
    summary_path = workdir / "runs" / f"{run_id}.json"
    atomic_write_json(summary_path, summary)
    logger.info("summary (%s):\n%s", summary_path, table)
    if parent:
        parent.log_metrics({f"{r.stage}.{k}": v for r in results.values() for k, v in r.metrics.items()
                            if isinstance(v, (int, float)) and not isinstance(v, bool)})
        parent.set_tags({f"wsss.cached.{r.stage}": str(r.cached).lower() for r in results.values()})
        parent.log_artifact(summary_path, "summary")
        parent.close("FINISHED")
    create_markdown_artifact("```\n" + table + "\n```", key=f"{SUMMARY_KEY}-text",
                             description="the table `wsss demo` prints")
    return {n: r.to_dict() for n, r in results.items()}


def peak_rss_mb() -> float:
    """Peak resident memory of this process and of its largest finished child (stage worker
    pools), in MB (Linux reports ru_maxrss in KB)."""
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return round(max(own, children) / 1024, 1)


def _git_commit() -> str:
    from pipeline.mlflow_tracking import git_commit

    return git_commit(project_root())
