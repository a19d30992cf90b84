"""Local services: a Prefect server, a ``process`` work pool + worker, an MLflow server.

``wsss up`` starts what is not already running (idempotent), ``wsss down`` stops exactly
the processes it recorded, ``wsss status`` prints URLs and health. Everything lives under
the project's work directory (``work/`` or ``$WSSS_HOME``)::

    work/services/services.json      pids, process start times, ports, URLs, log files
    work/services/logs/*.log         one log per service
    work/services/prefect/           PREFECT_HOME: profiles and the SQLite database
    work/mlflow/mlflow.db            MLflow backend store (SQLite)
    work/mlflow/artifacts/           MLflow artifacts

Every service binds 127.0.0.1 only. Each runs in its own session / process group, so
``down`` signals the whole group (servers fork uvicorn/gunicorn workers; the worker forks
one process per flow run) and nothing else. A pid is only ever signalled when its start time
still matches the one recorded, so a recycled pid is never hit. An idle Prefect worker
ignores the first SIGTERM: ``down`` sends a second one, then SIGKILL after a grace period.
"""

import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from flows.paths import home as default_home, project_root
from pipeline.storage import atomic_write_json

HOST = "127.0.0.1"
POOL = "wsss-process"
DEFAULT_PREFECT_PORT = 4200
DEFAULT_MLFLOW_PORT = 5000
ORDER = ("prefect", "mlflow", "worker")  # start order; stopped in reverse

# Housekeeping loops of the Prefect server (late runs, pause expirations, cancellation
# clean-up, foreman, repossessor, clean-up reconciler, new-deployment scheduling) run every
# 5-20 s by default. On a single-user local server once a minute is soon enough, and the
# difference is CPU the pipeline gets back: the idle server used 3.2 CPU-s per minute with
# the defaults and a 1-s worker poll, 2.1 with these settings.
SERVER_LOOP_SECONDS = 60
SERVER_LOOPS = ("CLEANUP_RECONCILER", "LATE_RUNS", "PAUSE_EXPIRATIONS", "CANCELLATION_CLEANUP",
                "FOREMAN", "REPOSSESSOR")
# The two servers run at a lower CPU priority, so that on a small machine their work (the
# Prefect server's loops and event handling, MLflow's requests) goes into the moments a core
# is idle (the pipeline's single-threaded steps) instead of pre-empting the pipeline's compute
# threads. The worker keeps normal priority: flow runs are its children and inherit it.
SERVER_NICENESS = 10
# A flow run on a process pool normally starts as ``python -m prefect.runner._workspace_supervisor``,
# which imports Prefect, prepares a workspace from the deployment's pull steps and then execs
# ``python -m prefect.engine`` -- a second interpreter start-up and Prefect import. The engine
# runs the pull steps itself (our deployments have one: ``set_working_directory``), so the
# pool's default command starts it directly: a run went from created to running in 4.3-4.7 s
# instead of 5.5-6.7 s (A/B in one services session, alternating).
ENGINE_COMMAND = (sys.executable, "-m", "prefect.engine")
# the worker asks for scheduled runs every 2 s (pick-up within 1 s on average); each query
# costs the server ~30 ms of CPU
WORKER_QUERY_SECONDS = 2


def server_env() -> dict[str, str]:
    """Prefect server settings for a local, single-user server (see SERVER_LOOP_SECONDS)."""
    env = {f"PREFECT_SERVER_SERVICES_{loop}_LOOP_SECONDS": str(SERVER_LOOP_SECONDS)
           for loop in SERVER_LOOPS}
    env["PREFECT_SERVER_SERVICES_SCHEDULER_RECENT_DEPLOYMENTS_LOOP_SECONDS"] = str(SERVER_LOOP_SECONDS)
    return env


class ServiceError(RuntimeError):
    """A service did not start, or a command against it failed; the message says which log to read."""


@dataclass
class Service:
    name: str
    pid: int
    start_time: str
    log: str
    port: int | None = None
    url: str | None = None
    command: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------- process helpers
def _proc_start_time(pid: int) -> str | None:
    """Start time of ``pid`` (clock ticks since boot, /proc/<pid>/stat field 22); None when
    the process does not exist or is a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        if sys.platform.startswith("linux"):
            return None
        try:  # no /proc: liveness only
            os.kill(pid, 0)
            return "unknown"
        except OSError:
            return None
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] in ("Z", "X"):
        return None
    return fields[19]


def _reap(pid: int) -> None:
    """Collect a child that exited (only matters when this process started it)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def is_alive(service: Service) -> bool:
    _reap(service.pid)
    start = _proc_start_time(service.pid)
    return start is not None and (start == service.start_time or "unknown" in (start, service.start_time))


def _stat_fields(pid: int) -> list[str] | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()


def cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) of ``pid`` and of the children it has reaped; 0 for a
    process that is gone."""
    fields = _stat_fields(pid)
    return sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK") if fields else 0.0


def descendants(pid: int) -> list[tuple[int, str]]:
    """Live descendants of ``pid`` as (pid, start time), found through the parent links in
    /proc. They matter because a Prefect worker starts each flow run in a new session, out
    of the worker's process group."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields and fields[0] not in ("Z", "X"):
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], list(children.get(pid, []))
    while todo:
        child = todo.pop()
        start = _proc_start_time(child)
        if start is not None:
            found.append((child, start))
        todo.extend(children.get(child, []))
    return found


def group_members(pgid: int) -> list[int]:
    """Live processes of process group ``pgid`` (Linux /proc)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            members.append(int(entry.name))
    return members


def free_port(preferred: int | None = None) -> int:
    """``preferred`` when it can be bound on 127.0.0.1, else any free port."""
    for port in ([preferred] if preferred else []) + [0]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((HOST, port))
            except OSError:
                continue
            return sock.getsockname()[1]
    raise ServiceError("no free TCP port on 127.0.0.1")


def http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return 200 <= response.status < 300
    except (OSError, ValueError):
        return False


# ---------------------------------------------------------------------- layout / state
@dataclass
class Layout:
    home: Path

    @property
    def services(self) -> Path:
        return self.home / "services"

    @property
    def state_file(self) -> Path:
        return self.services / "services.json"

    @property
    def logs(self) -> Path:
        return self.services / "logs"

    @property
    def prefect_home(self) -> Path:
        return self.services / "prefect"

    @property
    def mlflow_db(self) -> Path:
        return self.home / "mlflow" / "mlflow.db"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.home / "mlflow" / "artifacts"


def load_state(layout: Layout) -> dict[str, Service]:
    if not layout.state_file.is_file():
        return {}
    try:
        data = json.loads(layout.state_file.read_text())
    except json.JSONDecodeError as err:
        raise ServiceError(f"{layout.state_file} is not valid JSON ({err}); delete it after "
                           "checking that no service it lists is still running") from None
    return {name: Service(**entry) for name, entry in data.items()}


def save_state(layout: Layout, state: dict[str, Service]) -> None:
    atomic_write_json(layout.state_file, {name: asdict(s) for name, s in state.items()})


def client_env(layout: Layout, state: dict[str, Service], base: dict | None = None) -> dict[str, str]:
    """Environment for Prefect / MLflow clients (CLI calls, the worker and its flow runs)."""
    env = dict(os.environ if base is None else base)
    env.update({"WSSS_HOME": str(layout.home), "PREFECT_HOME": str(layout.prefect_home),
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_CLI_COLORS": "false",
                "PREFECT_CLI_WRAP_LINES": "false"})
    if "prefect" in state:
        env["PREFECT_API_URL"] = f"{state['prefect'].url}/api"
    if "mlflow" in state:
        env["MLFLOW_TRACKING_URI"] = state["mlflow"].url
    return env


# ---------------------------------------------------------------------- start / stop
def _spawn(layout: Layout, name: str, command: list[str], env: dict[str, str],
           port: int | None = None, url: str | None = None, niceness: int = 0) -> Service:
    """Start ``command`` in its own session, output appended to ``logs/<name>.log``;
    ``niceness`` > 0 lowers its CPU priority (and that of everything it starts)."""
    layout.logs.mkdir(parents=True, exist_ok=True)
    log_path = layout.logs / f"{name}.log"
    with open(log_path, "ab") as log:
        log.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(command)}\n".encode())
        log.flush()
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, env=env, cwd=project_root(),
                                   start_new_session=True,
                                   preexec_fn=(lambda: os.nice(niceness)) if niceness else None)
    start = _proc_start_time(process.pid) or "unknown"
    return Service(name, process.pid, start, str(log_path), port, url, command)


def _wait_healthy(service: Service, check: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if not is_alive(service):
            raise ServiceError(f"{service.name} exited during start-up; see {service.log}:\n"
                               + _tail(Path(service.log)))
        time.sleep(0.25)
    raise ServiceError(f"{service.name} not healthy after {timeout:.0f}s; see {service.log}:\n"
                       + _tail(Path(service.log)))


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _prefect_command() -> list[str]:
    return [sys.executable, "-m", "prefect"]


def health(service: Service) -> bool:
    if not is_alive(service):
        return False
    if service.name == "prefect":
        return http_ok(f"{service.url}/api/health")
    if service.name == "mlflow":
        return http_ok(f"{service.url}/health")
    return True


def up(home: Path | None = None, prefect_port: int = DEFAULT_PREFECT_PORT,
       mlflow_port: int = DEFAULT_MLFLOW_PORT, say: Callable[[str], None] = print,
       timeout: float = 120.0) -> dict[str, Service]:
    """Start the services that are not running; returns the state (also saved to disk)."""
    layout = Layout(Path(home or default_home()).resolve())
    layout.services.mkdir(parents=True, exist_ok=True)
    layout.prefect_home.mkdir(parents=True, exist_ok=True)
    layout.mlflow_artifacts.mkdir(parents=True, exist_ok=True)
    state = load_state(layout)
    for name in list(state):
        if not is_alive(state[name]):
            say(f"{name}: recorded pid {state[name].pid} is gone, restarting")
            del state[name]
    started = []

    if "prefect" not in state:
        port = free_port(prefect_port)
        env = client_env(layout, {})
        env.update({"PREFECT_SERVER_API_HOST": HOST, "PREFECT_SERVER_API_PORT": str(port),
                    "PREFECT_UI_API_URL": f"http://{HOST}:{port}/api", **server_env()})
        env.pop("PREFECT_API_URL", None)
        state["prefect"] = _spawn(layout, "prefect", _prefect_command() + [
            "server", "start", "--host", HOST, "--port", str(port)], env, port, f"http://{HOST}:{port}",
            niceness=SERVER_NICENESS)
        started.append("prefect")
        if "worker" in state:  # a worker bound to the old server: restart it too
            stop_service(state.pop("worker"))
    if "mlflow" not in state:
        port = free_port(mlflow_port)
        command = [sys.executable, "-m", "mlflow", "server", "--host", HOST, "--port", str(port),
                   "--workers", "1", "--backend-store-uri", f"sqlite:///{layout.mlflow_db}",
                   "--artifacts-destination", str(layout.mlflow_artifacts)]
        layout.mlflow_db.parent.mkdir(parents=True, exist_ok=True)
        env = client_env(layout, {})
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no GenAI job runner (7 processes, 1.3 GB)
        state["mlflow"] = _spawn(layout, "mlflow", command, env, port, f"http://{HOST}:{port}",
                                 niceness=SERVER_NICENESS)
        started.append("mlflow")
    save_state(layout, state)  # recorded before waiting: `down` can stop a hung start
    try:
        for name in ("prefect", "mlflow"):
            if name in started:
                _wait_healthy(state[name], lambda s=state[name]: health(s), timeout)
                say(f"{name}: up at {state[name].url} (pid {state[name].pid})")
        if "worker" not in state:
            ensure_pool(f"{state['prefect'].url}/api", process_job_template())
            env = client_env(layout, state)
            env.update({"PREFECT_WORKER_QUERY_SECONDS": str(WORKER_QUERY_SECONDS),
                        "PREFECT_WORKER_PREFETCH_SECONDS": "5",
                        "PREFECT_RUNNER_POLL_FREQUENCY": "1"})
            state["worker"] = _spawn(layout, "worker", _prefect_command() + [
                "worker", "start", "--pool", POOL, "--type", "process", "--name", "wsss-worker"], env)
            save_state(layout, state)
            _wait_healthy(state["worker"], lambda: _worker_online(layout, state), timeout)
            say(f"worker: polling pool {POOL} (pid {state['worker'].pid})")
    finally:
        save_state(layout, state)
    return state


def process_job_template() -> dict:
    """Prefect's base job template for ``process`` pools, with ``ENGINE_COMMAND`` (this
    interpreter) as the default flow-run command; a deployment can still set its own."""
    from prefect.workers.process import ProcessWorker

    template = ProcessWorker.get_default_base_job_template()
    template["variables"]["properties"]["command"]["default"] = shlex.join(ENGINE_COMMAND)
    return template


def api_request(url: str, method: str, body: dict | None = None, timeout: float = 10.0) -> dict:
    """One JSON request to a server's REST API (urllib: no Prefect client import here)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        text = response.read()
    return json.loads(text) if text else {}


def ensure_pool(api_url: str, template: dict) -> None:
    """Create the work pool ``POOL`` with ``template``, or give an existing one that template
    (a pool survives ``down``/``up`` in the server's database), before the worker starts."""
    try:
        api_request(f"{api_url}/work_pools/", "POST",
                    {"name": POOL, "type": "process", "base_job_template": template})
    except urllib.error.HTTPError as err:
        if err.code != 409:  # 409: the pool exists
            raise ServiceError(f"creating work pool {POOL} failed: HTTP {err.code} {err.read()[:300]!r}")
        api_request(f"{api_url}/work_pools/{POOL}", "PATCH", {"base_job_template": template})


def _worker_online(layout: Layout, state: dict[str, Service]) -> bool:
    """The worker log says it is polling (cheap; avoids importing the Prefect client here)."""
    text = Path(state["worker"].log).read_text(errors="replace")
    marker = text.rfind("--- ")
    return "started!" in text[marker:] or "Worker 'wsss-worker' started" in text[marker:]


def _run_cli(command: list[str], env: dict[str, str], layout: Layout, what: str,
             timeout: float = 300.0) -> str:
    result = subprocess.run(command, env=env, cwd=project_root(), capture_output=True, text=True,
                            timeout=timeout)
    if result.returncode != 0:
        raise ServiceError(f"{what} failed ({' '.join(command[2:])}):\n{result.stdout[-3000:]}"
                           f"\n{result.stderr[-3000:]}")
    return result.stdout


def stop_service(service: Service, grace: float = 10.0, sig: int = signal.SIGTERM) -> bool:
    """Stop one recorded service, its process group and its descendants (flow runs a worker
    started in their own sessions): ``sig`` (SIGTERM), a second SIGTERM after 3 s (an idle
    worker ignores the first), SIGKILL after ``grace``. False when it was not running."""
    if not is_alive(service):
        return False
    pgid = service.pid  # started with start_new_session: the pid leads its own group
    family = descendants(service.pid)

    def signal_all(signum):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signum)
        for pid, start in family:
            if _proc_start_time(pid) == start:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signum)

    def remaining():
        _reap(service.pid)
        return group_members(pgid) + [p for p, start in family if _proc_start_time(p) == start]

    signal_all(sig)
    deadline = time.monotonic() + grace
    second = time.monotonic() + 3.0
    sent_second = sig == signal.SIGKILL
    while time.monotonic() < deadline and remaining():
        if not sent_second and time.monotonic() >= second:
            signal_all(signal.SIGTERM)
            sent_second = True
        time.sleep(0.2)
    if remaining():
        signal_all(signal.SIGKILL)
        for _ in range(50):
            if not remaining():
                break
            time.sleep(0.1)
    return True


def down(home: Path | None = None, say: Callable[[str], None] = print) -> list[str]:
    """Stop the recorded services (worker first); returns the names that were running."""
    layout = Layout(Path(home or default_home()).resolve())
    state = load_state(layout)
    if not state:
        say("no services running")
    stopped = []
    for name in reversed(ORDER):
        service = state.get(name)
        if service is None:
            continue
        if stop_service(service):
            stopped.append(name)
            say(f"{name}: stopped (pid {service.pid})")
        else:
            say(f"{name}: was not running")
        del state[name]
        save_state(layout, state)
    if layout.state_file.is_file() and not state:
        layout.state_file.unlink()
    return stopped


def status(home: Path | None = None) -> list[dict]:
    """One row per service: name, pid, URL, alive, healthy, log."""
    layout = Layout(Path(home or default_home()).resolve())
    state = load_state(layout)
    rows = []
    for name in ORDER:
        service = state.get(name)
        if service is None:
            rows.append({"service": name, "pid": "", "url": "", "state": "stopped", "log": ""})
            continue
        alive = is_alive(service)
        state_text = "healthy" if alive and health(service) else ("starting/unhealthy" if alive else "dead")
        url = service.url or f"pool {POOL}"
        rows.append({"service": name, "pid": str(service.pid), "url": url, "state": state_text,
                     "log": service.log})
    return rows


def require_running(home: Path | None = None) -> tuple[Layout, dict[str, Service]]:
    """The running services' state; a clear error when any is missing or unhealthy."""
    layout = Layout(Path(home or default_home()).resolve())
    state = load_state(layout)
    missing = [n for n in ORDER if n not in state or not health(state[n])]
    if missing:
        raise ServiceError(f"service(s) {', '.join(missing)} not running under {layout.home}: run `wsss up`")
    return layout, state
