"""Orchestration overhead: the demo pipeline through the Prefect deployment vs the same stage
functions called directly, one run each (or N pairs), fresh work directories.

    .venv/bin/python benchmarks/overhead.py [--repeat N] [--concurrent] [--set FIELD=VALUE ...]
                                            [--home DIR]

Both sides are timed the way a user meets them, as one command in a fresh interpreter:

* direct: ``wsss run --config demo`` (``stages.run_pipeline`` without tracking);
* deployment: ``prefect deployment run wsss/demo --watch`` from its start to its exit, which
  includes the CLI's own start, run pick-up by the worker, the flow-run process start,
  Prefect task bookkeeping, progress artifacts and all MLflow logging.

Both pay Python start-up and the torch / stage imports (about 5 s); only the deployment pays
the Prefect and MLflow imports and calls. Printed: the seconds of each, the ratio deployment
/ direct (target <= 1.10), the time outside the flow body, the deployment run's timeline from
the Prefect API's timestamps (CLI start, pick-up and flow-run process start, MLflow parent
run, flow body, the CLI's wait after the end), the CPU seconds of the direct run and of each
process during the deployment run (Prefect server, MLflow server, worker + flow run, the
watching CLI), and each stage's own seconds on both sides (from the stage manifests / the
flow summary) with the fixed costs around a deployment run (services start,
``prefect deploy --all``). The data set is generated before either run.

Two ways to pair the runs:

* default, one after the other: the direct run first with no services running, then the
  services are started under ``--home`` (default: a temporary directory) on free ports, the
  deployment runs on the whole machine, and the services are stopped. This is the demo as a
  user meets it, but on a shared VM the machine's speed drifts between the two runs: the same
  ``wsss run`` took 352 to 441 CPU-s from one pair to the next, as much as the overhead being
  measured or more. ``--repeat N`` alternates N pairs and prints the median ratio.
* ``--concurrent``: both sides start together, the direct run pinned to one core and the
  services, the CLI, the worker and the flow run to the other (cores swapped from one pair to
  the next). The drift then hits both sides alike, at the price of one core (one torch
  thread) each, and the services' CPU is charged to the deployment in full instead of
  partly hiding in the moments the pipeline leaves a core idle.
"""

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from flows import cli, services  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.storage import is_complete, read_manifest  # noqa: E402
from stages import STAGE_ORDER  # noqa: E402


def stage_seconds(workdir: Path) -> dict[str, float]:
    """Each finished stage's own duration, from its manifest."""
    return {name: read_manifest(out)["duration_s"] for name in STAGE_ORDER
            for out in sorted((workdir / name).glob("*")) if is_complete(out)}


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) of ``pid`` and its live descendants, with their reaped
    children; 0 for a process that is gone."""
    return sum(services.cpu_seconds(member)
               for member in [pid] + [child for child, _ in services.descendants(pid)])


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class DirectRun:
    """``wsss run --config demo`` in a fresh interpreter, started at construction (pinned to
    ``cpus`` when given; output to ``<workdir>.log``); a thread reaps it the moment it ends,
    :meth:`finish` waits for that."""

    def __init__(self, base: Path, overrides: list[str], index: int, cpus: set[int] | None = None):
        self.workdir = base / f"direct-{index}"
        command = [sys.executable, "-m", "pipeline.cli", "run", "--config", "demo"]
        for override in [f"workdir={self.workdir}", *overrides]:
            command += ["--set", override]
        self.log = base / f"direct-{index}.log"
        with open(self.log, "w") as log:
            self.start = time.perf_counter()
            self.process = subprocess.Popen(
                command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
        self._reaper = threading.Thread(target=self._reap, daemon=True)
        self._reaper.start()

    def _reap(self) -> None:
        _, status, usage = os.wait4(self.process.pid, 0)
        self.seconds = time.perf_counter() - self.start
        self.cpu_seconds = usage.ru_utime + usage.ru_stime  # its own and its children's
        self.process.returncode = os.waitstatus_to_exitcode(status)

    def ended(self) -> bool:
        return not self._reaper.is_alive()

    def kill(self) -> None:
        self.process.kill()
        self._reaper.join()

    def finish(self) -> tuple[float, float, Path]:
        """Seconds, CPU seconds and the work directory."""
        self._reaper.join()
        if self.process.returncode != 0:
            raise SystemExit(f"wsss run failed (log {self.log}):\n{self.log.read_text()[-3000:]}")
        return self.seconds, self.cpu_seconds, self.workdir


def run_deployment(home: Path, base: Path, overrides: list[str], index: int,
                   beside: DirectRun | None = None):
    """The deployment run, its summary, its timeline (seconds between the Prefect API's
    timestamps) and the CPU seconds each process spent during it (``beside``: a direct run
    going on at the same time, whose CPU is not the watching CLI's)."""
    config = load_config("demo", [f"workdir={base / f'deployment-{index}'}", *overrides])
    state = services.load_state(services.Layout(home))
    pids = {"Prefect server": state["prefect"].pid, "MLflow server": state["mlflow"].pid,
            "worker + flow run": state["worker"].pid}
    before = {name: tree_cpu_seconds(pid) for name, pid in pids.items()}
    cli_cpu0, start = children_cpu_seconds(), time.time()
    code, run_id, output = cli.submit(home, "demo", config, echo=False)
    end = time.time()
    if code != 0:
        raise SystemExit(f"prefect deployment run failed:\n{output[-3000:]}")
    cpu = {name: tree_cpu_seconds(pid) - before[name] for name, pid in pids.items()}
    cpu["watching CLI"] = children_cpu_seconds() - cli_cpu0
    if beside is not None and beside.ended():
        cpu["watching CLI"] -= beside.cpu_seconds  # reaped meanwhile: in RUSAGE_CHILDREN too
    summary = cli.read_summary(config, run_id)
    run = services.api_request(f"{state['prefect'].url}/api/flow_runs/{run_id}", "GET")
    created, running, finished = (datetime.fromisoformat(run[k]).timestamp()
                                  for k in ("created", "start_time", "end_time"))
    timeline = {
        "CLI start until the flow run exists": created - start,
        "pick-up, flow-run process start, Prefect import, flow load": running - created,
        "MLflow parent run, summary, Prefect bookkeeping": finished - running - summary["seconds"],
        "flow body (the stages)": summary["seconds"],
        "end of the run until the CLI exits (its 3-s straggler wait)": end - finished,
    }
    return end - start, summary, timeline, cpu


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--home", default=None, help="services home (default: temporary)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="pairs of runs (default 1); the median ratio is printed")
    parser.add_argument("--concurrent", action="store_true",
                        help="start both sides of a pair together, each pinned to its own core "
                             "(the deployment's services on its core): the machine's drift "
                             "hits both alike")
    parser.add_argument("--keep", action="store_true", help="keep the work directories")
    args = parser.parse_args(argv)

    base = Path(tempfile.mkdtemp(prefix="wsss-overhead-"))
    home = Path(args.home) if args.home else base / "home"
    common = [f"data.root={base / 'data'}", *args.overrides]
    # the synthetic data set is generated by the first stage that needs it: do it up front so
    # neither side pays for it
    from pipeline.data import build_dataset

    data_cfg = load_config("demo", common).data
    build_dataset(data_cfg, data_cfg.train_split)
    build_dataset(data_cfg, data_cfg.val_split)

    cpus = sorted(os.sched_getaffinity(0))
    if args.concurrent and len(cpus) < 2:
        raise SystemExit(f"--concurrent needs two CPUs; this process may use {cpus}")
    ratios = []
    for index in range(args.repeat):
        direct_run, pinned = None, ""
        try:
            if args.concurrent:  # swap the cores from one pair to the next
                direct_cpu, deployment_cpu = cpus[index % 2], cpus[(index + 1) % 2]
                pinned = f" (direct on cpu {direct_cpu}, deployment on cpu {deployment_cpu}, started together)"
                os.sched_setaffinity(0, {deployment_cpu})  # services, CLI, worker, flow run
            else:
                direct, direct_cpu_s, direct_dir = DirectRun(base, common, index).finish()
            t0 = time.perf_counter()
            services.up(home, prefect_port=0, mlflow_port=0, say=lambda s: None)
            up_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            cli.deploy(home)
            deploy_s = time.perf_counter() - t0
            if args.concurrent:
                direct_run = DirectRun(base, common, index, {direct_cpu})
            through, summary, timeline, cpu = run_deployment(home, base, common, index, direct_run)
            if direct_run:
                direct, direct_cpu_s, direct_dir = direct_run.finish()
                direct_run = None
        finally:
            if direct_run:
                direct_run.kill()
            services.down(home, say=lambda s: None)
            os.sched_setaffinity(0, set(cpus))
        ratios.append(through / direct)
        print(f"\npair {index + 1}/{args.repeat}{pinned}")
        print(f"direct (wsss run --config demo):      {direct:8.1f} s")
        print(f"deployment (prefect deployment run):  {through:8.1f} s   "
              f"(flow body {summary['seconds']:.1f} s, outside it {through - summary['seconds']:.1f} s: "
              f"see the timeline)")
        print(f"overhead ratio deployment / direct:   {through / direct:8.3f}   (target <= 1.10)")
        print(f"absolute overhead:                    {through - direct:8.1f} s")
        print(f"fixed costs before it: wsss up {up_s:.1f} s, prefect deploy --all {deploy_s:.1f} s")
        print("deployment timeline (Prefect API timestamps):")
        for what, seconds in timeline.items():
            print(f"  {what:62s} {seconds:6.1f} s")
        print(f"CPU seconds: direct run {direct_cpu_s:.1f}; during the deployment run: "
              + ", ".join(f"{name} {value:.1f}" for name, value in cpu.items())
              + f" (total {sum(cpu.values()):.1f})")
        print("stage seconds        direct   deployment   difference")
        direct_stages = stage_seconds(direct_dir)
        flow_stages = {row["stage"]: row["seconds"] for row in summary["stages"]}
        for name in STAGE_ORDER:
            mine, theirs = direct_stages.get(name, float("nan")), flow_stages.get(name, float("nan"))
            print(f"  {name:18s} {mine:8.1f} {theirs:12.1f} {theirs - mine:+12.1f}", flush=True)
    if len(ratios) > 1:
        print(f"\nratios {', '.join(f'{r:.3f}' for r in ratios)}; median {statistics.median(ratios):.3f}")
    if not args.keep:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
