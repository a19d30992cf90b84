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

Only the standard library: importing this module stays cheap.
"""

import ctypes
import ctypes.util
import os
import signal
import sys
import threading
import time

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
