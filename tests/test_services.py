"""Service bookkeeping of ``wsss up`` / ``wsss down`` without starting the real servers
(those are started and stopped in tests/test_e2e_demo.py): stopping exactly the recorded
process group plus its descendants (a worker's flow runs live in their own sessions), the
second SIGTERM an idle worker needs, recycled pids, state files, ports."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows import services

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")

# A "worker": ignores the first SIGTERM (as an idle Prefect worker does), starts a child in
# its own session (as the worker does for each flow run) and a child in its own group.
WORKER = r"""
import os, signal, subprocess, sys, time
count = {"n": 0}
def on_term(*_):
    count["n"] += 1
    if count["n"] >= 2:
        sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
sleeper = [sys.executable, "-c", "import time; time.sleep(600)"]
subprocess.Popen(sleeper, start_new_session=True)   # a flow run
subprocess.Popen(sleeper)                           # a helper in the same group
print("ready", flush=True)
while True:
    time.sleep(0.1)
"""


def _spawn_worker(tmp_path) -> services.Service:
    layout = services.Layout(tmp_path)
    service = services._spawn(layout, "worker", [sys.executable, "-c", WORKER], dict(os.environ))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if "ready" in Path(service.log).read_text() and len(services.descendants(service.pid)) == 2:
            return service
        time.sleep(0.1)
    raise AssertionError("fake worker did not start")


def test_stop_service_needs_second_sigterm_and_takes_descendants(tmp_path):
    service = _spawn_worker(tmp_path)
    family = [pid for pid, _ in services.descendants(service.pid)]
    assert len(family) == 2
    assert len(services.group_members(service.pid)) == 2  # leader + same-group helper
    start = time.monotonic()
    assert services.stop_service(service, grace=20) is True
    assert time.monotonic() - start < 15  # the second SIGTERM, not the SIGKILL fallback, ended it
    assert not services.is_alive(service)
    assert services.group_members(service.pid) == []
    assert all(services._proc_start_time(pid) is None for pid in family)
    assert services.stop_service(service) is False  # already stopped


def test_recycled_pid_is_not_ours(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        real = services.Service("x", proc.pid, services._proc_start_time(proc.pid), "log")
        assert services.is_alive(real)
        recycled = services.Service("x", proc.pid, "1", "log")  # same pid, other start time
        assert not services.is_alive(recycled)
        assert services.stop_service(recycled) is False
        assert proc.poll() is None  # never signalled
    finally:
        proc.kill()
        proc.wait()


def test_state_roundtrip_and_bad_state_file(tmp_path):
    layout = services.Layout(tmp_path)
    state = {"prefect": services.Service("prefect", 1, "5", "p.log", 4200, "http://127.0.0.1:4200")}
    services.save_state(layout, state)
    assert services.load_state(layout) == state
    env = services.client_env(layout, state, base={})
    assert env["PREFECT_API_URL"] == "http://127.0.0.1:4200/api"
    assert env["WSSS_HOME"] == str(tmp_path) and env["PREFECT_HOME"].startswith(str(tmp_path))
    layout.state_file.write_text("{not json")
    with pytest.raises(services.ServiceError, match="services.json"):
        services.load_state(layout)


def test_down_and_status_without_services(tmp_path):
    lines = []
    assert services.down(tmp_path, say=lines.append) == []
    assert lines == ["no services running"]
    assert [r["state"] for r in services.status(tmp_path)] == ["stopped"] * 3
    with pytest.raises(services.ServiceError, match="wsss up"):
        services.require_running(tmp_path)


def test_down_forgets_dead_services(tmp_path):
    layout = services.Layout(tmp_path)
    services.save_state(layout, {"mlflow": services.Service("mlflow", 2**22 + 7, "1", "m.log")})
    lines = []
    assert services.down(tmp_path, say=lines.append) == []
    assert lines == ["mlflow: was not running"]
    assert not layout.state_file.exists()


def test_free_port_avoids_a_taken_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        taken = sock.getsockname()[1]
        port = services.free_port(taken)
    assert port != taken and port > 0


def test_cli_status_exit_code(tmp_path, capsys):
    from pipeline.cli import main

    assert main(["status", "--home", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "prefect" in out and "stopped" in out
    assert json.loads(json.dumps(services.status(tmp_path)))[0]["service"] == "prefect"


def test_server_settings_are_real_prefect_settings(monkeypatch):
    """The loop intervals the server is started with are Prefect settings it reads (a typo in
    a PREFECT_* name would be ignored silently, and the server would keep its 5-s loops)."""
    from prefect.settings import Settings

    env = services.server_env()
    assert len(env) == len(services.SERVER_LOOPS) + 1
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    loops = Settings().server.services
    seconds = services.SERVER_LOOP_SECONDS
    for loop in services.SERVER_LOOPS:
        assert getattr(loops, loop.lower()).loop_seconds == seconds, loop
    assert loops.scheduler.recent_deployments_loop_seconds == seconds
    monkeypatch.setenv("PREFECT_WORKER_QUERY_SECONDS", str(services.WORKER_QUERY_SECONDS))
    assert Settings().worker.query_seconds == services.WORKER_QUERY_SECONDS


def test_spawn_lowers_priority_of_the_service_and_its_children(tmp_path):
    layout = services.Layout(tmp_path)
    parent = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
              "'import time; time.sleep(60)']); print('ready', flush=True); time.sleep(60)")
    service = services._spawn(layout, "server", [sys.executable, "-c", parent], dict(os.environ),
                              niceness=7)
    try:
        deadline = time.monotonic() + 60
        while not services.descendants(service.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        base = os.getpriority(os.PRIO_PROCESS, 0)
        assert os.getpriority(os.PRIO_PROCESS, service.pid) == min(base + 7, 19)
        child = services.descendants(service.pid)[0][0]
        assert os.getpriority(os.PRIO_PROCESS, child) == min(base + 7, 19)
    finally:
        services.stop_service(service)


def test_cpu_seconds_counts_the_process_and_its_reaped_children():
    child = subprocess.run([sys.executable, "-c", "import time\nt = time.process_time()\n"
                            "while time.process_time() - t < 0.3: pass"])
    assert child.returncode == 0
    usage = os.times()
    mine = usage.user + usage.system + usage.children_user + usage.children_system
    # /proc counts in clock ticks: equal to os.times() up to a tick or two
    assert services.cpu_seconds(os.getpid()) == pytest.approx(mine, abs=0.05)
    assert services.cpu_seconds(os.getpid()) >= 0.3
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert services.cpu_seconds(dead.pid) == 0.0
