"""``wsss up | down | status | deploy | deployments | submit | flow | demo``.

``wsss demo`` is the main job: start the services (``wsss up``), deploy (``prefect deploy
--all`` from prefect.yaml), run ``prefect deployment run wsss/demo``, follow its progress
from the Prefect API (``flows.watch``: one bar or line per stage) and print the summary
table with the Prefect and MLflow UI links. Everything lives under the project's work
directory ``work/`` (``$WSSS_HOME`` to move it).
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from pipeline.cli import add_config_arguments, config_from_args

FLOW_RUN_ID = re.compile(r"UUID:\s*([0-9a-f-]{36})")


def _say(text: str) -> None:
    print(f"[wsss] {text}", flush=True)


def _home(args) -> Path:
    from flows.paths import home

    return Path(args.home).resolve() if getattr(args, "home", None) else home()


def _print_rows(rows: list[dict]) -> None:
    if not rows:
        return
    from pipeline.cli_run import format_table

    keys = list(rows[0])
    print(format_table([keys] + [[str(r[k]) for k in keys] for r in rows]))


# ---------------------------------------------------------------------- services
def _cmd_up(args) -> int:
    from flows import services

    start = time.time()
    try:
        services.up(_home(args), args.prefect_port, args.mlflow_port, say=_say)
    except services.ServiceError as err:
        print(f"wsss up: {err}", file=sys.stderr)
        return 1
    _say(f"services ready in {time.time() - start:.1f}s")
    _print_rows(services.status(_home(args)))
    return 0


def _cmd_down(args) -> int:
    from flows import services

    services.down(_home(args), say=_say)
    return 0


def _cmd_status(args) -> int:
    from flows import services

    rows = services.status(_home(args))
    _print_rows(rows)
    return 0 if all(r["state"] == "healthy" for r in rows) else 1


# ---------------------------------------------------------------------- deployments
def _cmd_deployments(args) -> int:
    from flows import deployments
    from flows.paths import project_root

    root = project_root()
    if args.write:
        _say(f"wrote {deployments.write(root)}")
        return 0
    stale = deployments.stale(root)
    if stale:
        print(f"prefect.yaml is stale for: {', '.join(stale)}; run `wsss deployments --write`",
              file=sys.stderr)
        return 1
    _say("prefect.yaml matches the presets")
    return 0


def deploy(home: Path) -> None:
    """``prefect deploy --all`` from the project root against the running services."""
    from flows import deployments, services
    from flows.paths import project_root

    layout, state = services.require_running(home)
    root = project_root()
    stale = deployments.stale(root)
    if stale:
        _say(f"warning: prefect.yaml differs from the presets for {', '.join(stale)} "
             "(`wsss deployments --write` regenerates it); runs started by wsss pass the full config")
    env = services.client_env(layout, state)
    result = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"],
                            cwd=root, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise services.ServiceError(f"`prefect deploy --all` failed:\n{result.stdout[-4000:]}\n"
                                    f"{result.stderr[-4000:]}")


def _cmd_deploy(args) -> int:
    from flows import services

    start = time.time()
    try:
        deploy(_home(args))
    except services.ServiceError as err:
        print(f"wsss deploy: {err}", file=sys.stderr)
        return 1
    from pipeline.config import PRESETS

    _say(f"deployed {', '.join(f'wsss/{name}' for name in PRESETS)} in {time.time() - start:.1f}s")
    return 0


# ---------------------------------------------------------------------- runs
def submit(home: Path, deployment: str, config, stages: list[str] | None = None, force: bool = False,
           watch: bool = True, echo: bool = True, timeout: float | None = None,
           validate: bool = False, console=None) -> tuple[int, str | None, str]:
    """``prefect deployment run wsss/<deployment>`` with the full config as parameter (and
    ``validate``: the flow decodes every input file first), then, with ``watch``, the run's
    progress read from the Prefect API (:mod:`flows.watch`: stage lines, progress bars,
    warnings) until it ends; returns (exit code: 0 when the run completed, flow-run id, the
    creating command's output)."""
    from flows import services
    from pipeline.config import config_to_dict

    layout, state = services.require_running(home)
    params = {"config": config_to_dict(config)}
    if stages:
        params["stages"] = stages
    if force:
        params["force"] = True
    if validate:
        params["validate"] = True
    command = [sys.executable, "-m", "prefect", "deployment", "run", f"wsss/{deployment}",
               "--params", json.dumps(params)]
    env = services.client_env(layout, state)
    env["COLUMNS"] = "200"
    result = subprocess.run(command, cwd=_root(), env=env, capture_output=True, text=True)
    output = result.stdout + result.stderr
    match = FLOW_RUN_ID.search(output)
    run_id = match.group(1) if match else None
    if result.returncode != 0 or run_id is None:
        if echo:
            print(output, end="", flush=True)
        return result.returncode or 1, run_id, output
    if echo:
        name = re.search(r"Created flow run '([^']+)'", output)
        _say(f"flow run {name.group(1) if name else run_id} created ({run_id}): "
             f"{state['prefect'].url}/runs/flow-run/{run_id}")
    if not watch:
        return 0, run_id, output
    final = _watch(state, run_id, console, echo, timeout)
    return (0 if final == "COMPLETED" else 1), run_id, output


def _watch(state: dict, run_id: str, console, echo: bool, timeout: float | None) -> str:
    """The run's progress from the Prefect API on ``console`` (a silent one without ``echo``)."""
    import io

    from flows.services import api_request
    from flows.watch import watch_flow_run
    from pipeline.console import Console
    from stages import STAGE_ORDER

    api = f"{state['prefect'].url}/api"
    own = console is None
    console = console or (Console() if echo else Console(io.StringIO(), live=False))
    try:
        return watch_flow_run(lambda path, method, body: api_request(api + path, method, body),
                              run_id, console, STAGE_ORDER, timeout=timeout)
    finally:
        if own:
            console.close()


def failure_message(state: dict, run_id: str) -> str:
    """Name and message of the flow run's state, and of its failed task runs (Prefect REST API)."""
    from flows.services import api_request

    api = f"{state['prefect'].url}/api"
    try:
        run = api_request(f"{api}/flow_runs/{run_id}", "GET")
        tasks = api_request(f"{api}/task_runs/filter", "POST", {
            "flow_runs": {"id": {"any_": [run_id]}},
            "task_runs": {"state": {"type": {"any_": ["FAILED", "CRASHED"]}}}})
    except (OSError, ValueError) as err:
        return f"(could not read the flow run from the Prefect API: {err})"
    lines = [f"flow run {run.get('name')}: {run['state']['name']}: {run['state'].get('message') or ''}"]
    lines += [f"task {t['name']}: {t['state']['name']}: {t['state'].get('message') or ''}" for t in tasks]
    return "\n".join(lines)


def _root() -> Path:
    from flows.paths import project_root

    return project_root()


def read_summary(config, run_id: str) -> dict | None:
    """The summary the flow wrote to ``<workdir>/runs/<flow-run id>.json``."""
    from flows.paths import resolve_workdir

    path = resolve_workdir(config.workdir, _root()) / "runs" / f"{run_id}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def print_summary(summary: dict, state: dict) -> None:
    from pipeline.mlflow_tracking import experiment_name

    print()
    columns = ("stage", "key", "cached", "seconds", "headline")
    _print_rows([{c: row.get(c, "") for c in columns} for row in summary["stages"]])
    print(f"\npipeline time {summary['seconds']:.1f}s, peak RSS {summary.get('peak_rss_mb', 0):.0f} MB, "
          f"outputs under {summary['workdir']}")
    prefect_url = state["prefect"].url
    print(f"Prefect UI: {prefect_url}/runs/flow-run/{summary['flow_run_id']}")
    if summary.get("mlflow_run_id"):
        mlflow_url = state["mlflow"].url
        experiment_id = summary.get("mlflow_experiment_id")
        if experiment_id:
            print(f"MLflow UI:  {mlflow_url}/#/experiments/{experiment_id}/runs/{summary['mlflow_run_id']}")
        else:
            print(f"MLflow UI:  {mlflow_url} (experiment {experiment_name(summary['config_name'])}, "
                  f"run {summary['mlflow_run_id']})")


def _run_and_report(args, deployment: str, config) -> int:
    from flows import services

    home = _home(args)
    stages = args.stages.split(",") if args.stages else None
    code, run_id, output = submit(home, deployment, config, stages, args.force, watch=not args.no_watch,
                                  validate=args.validate)
    if run_id is None:
        print("wsss: could not create the flow run (output above)", file=sys.stderr)
        return code or 1
    if args.no_watch:
        return code
    _, state = services.require_running(home)
    summary = read_summary(config, run_id)
    if summary is None:
        print(f"wsss: flow run {run_id} failed:\n{failure_message(state, run_id)}\n"
              f"logs: {state['prefect'].url}/runs/flow-run/{run_id} and {state['worker'].log}",
              file=sys.stderr)
        return code or 1
    print_summary(summary, state)
    return code


def _cmd_submit(args) -> int:
    from flows import services

    if args.config is None:
        args.config = args.deployment
    try:
        return _run_and_report(args, args.deployment, config_from_args(args))
    except services.ServiceError as err:
        print(f"wsss submit: {err}", file=sys.stderr)
        return 1


def _cmd_demo(args) -> int:
    from flows import services

    config = config_from_args(args)  # validated before anything starts
    start = time.time()
    try:
        _say("starting services (wsss up)")
        services.up(_home(args), args.prefect_port, args.mlflow_port, say=_say)
        _say(f"services up after {time.time() - start:.1f}s; deploying (prefect deploy --all)")
        deploy(_home(args))
        _say(f"deployed after {time.time() - start:.1f}s; running wsss/demo")
        code = _run_and_report(args, "demo", config)
    except services.ServiceError as err:
        print(f"wsss demo: {err}", file=sys.stderr)
        return 1
    _say(f"demo finished in {time.time() - start:.1f}s (services keep running: `wsss down` stops them)")
    return code


def _cmd_flow(args) -> int:
    """The flow in this process (Prefect's ephemeral API unless PREFECT_API_URL is set), with
    the terminal progress of ``wsss run``; Prefect's own console log shows warnings and errors
    only (the run's full log stays in the API and the UI)."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
    from flows.progress import LOCAL_VIEWS, TerminalStages
    from flows.wsss import wsss
    from pipeline.console import Console

    config = config_from_args(args)
    stages = args.stages.split(",") if args.stages else None
    with Console() as console:
        view = TerminalStages(console)
        LOCAL_VIEWS.append(view)
        try:
            results = wsss(config=config, **({"stages": stages} if stages else {}), force=args.force,
                           validate=args.validate)
        finally:
            LOCAL_VIEWS.remove(view)
    from pipeline.cli_run import format_summary
    from pipeline.storage import StageResult

    print(format_summary([StageResult.from_dict(r) for r in results.values()]))
    return 0


# ---------------------------------------------------------------------- registration
def _service_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--home", default=None,
                        help="the project's work directory (default: $WSSS_HOME or <project>/work)")


def _port_arguments(parser: argparse.ArgumentParser) -> None:
    from flows.services import DEFAULT_MLFLOW_PORT, DEFAULT_PREFECT_PORT

    parser.add_argument("--prefect-port", type=int, default=DEFAULT_PREFECT_PORT,
                        help="Prefect server port (a free one is used when it is taken)")
    parser.add_argument("--mlflow-port", type=int, default=DEFAULT_MLFLOW_PORT,
                        help="MLflow server port (a free one is used when it is taken)")


def _run_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--stages", default="", help="comma-separated subset (default: all five)")
    parser.add_argument("--force", action="store_true", help="recompute the selected stages")
    parser.add_argument("--validate", action="store_true",
                        help="the flow decodes every image and mask it will read before the first stage")


def add_commands(sub) -> None:
    up = sub.add_parser("up", help="start the Prefect server, worker and MLflow server (idempotent)")
    _service_arguments(up)
    _port_arguments(up)
    up.set_defaults(func=_cmd_up)

    down = sub.add_parser("down", help="stop the services `wsss up` started")
    _service_arguments(down)
    down.set_defaults(func=_cmd_down)

    status = sub.add_parser("status", help="URLs and health of the services")
    _service_arguments(status)
    status.set_defaults(func=_cmd_status)

    dep = sub.add_parser("deploy", help="prefect deploy --all (deployments voc, coco, demo, voc-mini)")
    _service_arguments(dep)
    dep.set_defaults(func=_cmd_deploy)

    gen = sub.add_parser("deployments", help="check (default) or --write prefect.yaml from the presets")
    gen.add_argument("--write", action="store_true")
    gen.set_defaults(func=_cmd_deployments)

    run = sub.add_parser("submit", help="prefect deployment run wsss/<deployment> with a config")
    run.add_argument("deployment", choices=["voc", "coco", "demo"])
    _run_arguments(run)
    _service_arguments(run)
    run.add_argument("--no-watch", action="store_true", help="return once the run is created")
    run.set_defaults(func=_cmd_submit, config=None)  # default: the deployment's preset

    demo = sub.add_parser("demo", help="the main job: up, deploy, run wsss/demo, print the summary")
    _run_arguments(demo)
    _service_arguments(demo)
    _port_arguments(demo)
    demo.set_defaults(func=_cmd_demo, no_watch=False)

    flow = sub.add_parser("flow", help="run the Prefect flow in this process (no deployment)")
    _run_arguments(flow)
    flow.set_defaults(func=_cmd_flow)
