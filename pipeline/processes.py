"""Worker processes that end with the process that started them.

A ``kill -9`` of ``wsss run`` gives its pool workers no chance to be told: without help they
are re-parented to init and keep running (writing files a rerun is about to write, then
waiting forever for work). :func:`die_with_parent` is a pool initializer that prevents it
two ways:

* Linux: ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` (through ctypes): the kernel kills the worker
  the moment its parent exits, however it exits. The signal follows the *thread* that
  forked the worker, so start pools from a thread that outlives them (the stage's own
  thread does: the pool is closed before the stage returns).
* everywhere (and as a second line on Linux): a daemon thread in the worker that polls
  :func:`os.getppid` every ``interval`` seconds and ends the worker once the parent is gone
  (its parent id changes on re-parenting). It needs the GIL, so a worker inside a long
  C call notices at the end of that call.

:func:`owner` / :func:`owner_alive` identify the process that made a record (host, pid and
the pid's start time, so a recycled pid is not mistaken for it): a rerun marks the MLflow
and Prefect records of a killed run as such.

Only the standard library: importing this module stays cheap.
"""

import ctypes
import ctypes.util
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

PR_SET_PDEATHSIG = 1            # <linux/prctl.h>
WATCHDOG_INTERVAL_S = 0.5
ORPHAN_EXIT_CODE = 70           # what a worker that outlived its parent exits with


def set_parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent exits (Linux only);
    True when it is armed."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent_pid: int, interval: float) -> None:
    while os.getppid() == parent_pid:
        time.sleep(interval)
    os._exit(ORPHAN_EXIT_CODE)


def start_parent_watchdog(parent_pid: int, interval: float = WATCHDOG_INTERVAL_S) -> threading.Thread:
    """A daemon thread ending this process (``os._exit``) once ``parent_pid`` is no longer
    its parent."""
    thread = threading.Thread(target=_watch_parent, args=(parent_pid, interval), daemon=True,
                              name="wsss-parent-watchdog")
    thread.start()
    return thread


def die_with_parent(parent_pid: int, interval: float = WATCHDOG_INTERVAL_S) -> None:
    """Pool initializer (``initializer=die_with_parent, initargs=(os.getpid(),)``): this
    worker ends when ``parent_pid`` does; see the module docstring."""
    set_parent_death_signal()
    if os.getppid() != parent_pid:   # the parent died before the signal was armed
        os._exit(ORPHAN_EXIT_CODE)
    start_parent_watchdog(parent_pid, interval)


# --------------------------------------------------------------------------- record owners
def process_start_time(pid: int) -> str | None:
    """Start time of ``pid`` (clock ticks since boot, /proc/<pid>/stat field 22); None when
    it does not exist or is a zombie; "" where there is no /proc (only existence is known)."""
    try:
        fields = Path(f"/proc/{int(pid)}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return None
    except OSError:
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return ""
    return None if fields[0] == "Z" else fields[19]


def owner() -> dict[str, str]:
    """Host, pid and pid start time of this process."""
    return {"host": socket.gethostname(), "pid": str(os.getpid()),
            "start": process_start_time(os.getpid()) or ""}


def owner_alive(host: str | None, pid: str | None, start: str | None) -> bool | None:
    """Whether the process :func:`owner` described is still running; None when it cannot be
    told (another host, or no owner recorded)."""
    if not host or not pid or host != socket.gethostname():
        return None
    now = process_start_time(int(pid))
    return now is not None and (not start or not now or now == start)
