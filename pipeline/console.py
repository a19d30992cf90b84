"""What the terminal shows while stages run: one live bar per stage, or plain lines.

:class:`Console` takes the same few events from every entry point (``wsss run`` and
``wsss flow`` in-process through ``flows.progress.StageProgress``; ``wsss submit --watch`` /
``wsss demo`` from the Prefect API through ``flows.watch``):

* ``started(stage, total, unit)`` and ``finished(stage, text)`` / ``cached(stage, text)``:
  one line each;
* ``update(stage, done, total, unit, metrics, elapsed)``: the stage's live bar (items done of
  total, the latest loss or metric, elapsed, ETA);
* ``message(text, level)``: warnings and errors of the run, one line each.

On a terminal the bars are animated with rich (installed with Prefect); otherwise (CI logs,
pipes) each update is a plain line ``[wsss] <stage> 12/40 epochs 30% loss=0.31 elapsed 0:41
eta 1:35``, at most one per stage every ``every_s`` seconds plus the last one, so logs stay
readable.
"""

import sys
import threading
import time
from typing import TextIO

PREFIX = "[wsss]"


def clock(seconds: float | None) -> str:
    """``95`` -> ``1:35``; ``3725`` -> ``1:02:05``; None -> ``?``."""
    if seconds is None or seconds != seconds or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def eta(done: int, total: int, elapsed: float) -> float | None:
    """Seconds left at the rate so far (None before the first item or without a total)."""
    if not total or done <= 0:
        return None
    return elapsed * (total - done) / done


def progress_line(stage: str, done: int, total: int, unit: str, metrics: str, elapsed: float) -> str:
    """One plain progress line (no prefix)."""
    parts = [stage]
    if total:
        parts += [f"{done}/{total} {unit}", f"{100.0 * done / total:.0f}%"]
    if metrics:
        parts.append(metrics)
    parts.append(f"elapsed {clock(elapsed)}")
    if total:
        parts.append(f"eta {clock(eta(done, total, elapsed))}")
    return " ".join(parts)


class Console:
    """Terminal progress of one run (see the module docstring). ``live=None``: animated
    when ``stream`` is a terminal."""

    def __init__(self, stream: TextIO | None = None, live: bool | None = None, every_s: float = 10.0):
        self.stream = stream or sys.stdout
        self.live = self.stream.isatty() if live is None else live
        self.every_s = every_s
        self._last: dict[str, float] = {}
        self._tasks: dict[str, int] = {}
        self._lock = threading.Lock()
        self._bars = None
        if self.live:
            self._start_bars()

    # ------------------------------------------------------------------ events
    def say(self, text: str) -> None:
        """A single line (stage starts and ends, cache hits, the runner's notes)."""
        self._print(f"{PREFIX} {text}")

    def message(self, text: str, level: str = "WARNING") -> None:
        self._print(f"{PREFIX} {level.lower()}: {text}")

    def started(self, stage: str, total: int = 0, unit: str = "") -> None:
        self.say(f"{stage}: started" + (f" ({total} {unit})" if total else ""))
        with self._lock:
            self._last.pop(stage, None)
            if self._bars is not None and stage not in self._tasks:
                self._tasks[stage] = self._bars.add_task(stage, total=total or None, unit=unit, metrics="")

    def update(self, stage: str, done: int, total: int, unit: str, metrics: str, elapsed: float,
               final: bool = False) -> None:
        if self._bars is not None:
            with self._lock:
                task = self._tasks.get(stage)
            if task is not None:
                self._bars.update(task, completed=done, total=total or None, unit=unit, metrics=metrics)
            return
        now = time.monotonic()
        with self._lock:
            last = self._last.get(stage)
            if not final and last is not None and now - last < self.every_s:
                return
            self._last[stage] = now
        self._print(f"{PREFIX} {progress_line(stage, done, total, unit, metrics, elapsed)}")

    def finished(self, stage: str, text: str) -> None:
        self._drop_bar(stage)
        self.say(f"{stage}: {text}")

    def cached(self, stage: str, text: str) -> None:
        self._drop_bar(stage)
        self.say(f"{stage}: cached {text}")

    def close(self) -> None:
        if self._bars is not None:
            self._bars.stop()
            self._bars = None

    def __enter__(self) -> "Console":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ output
    def _print(self, line: str) -> None:
        if self._bars is not None:
            self._bars.console.print(line, markup=False, highlight=False, soft_wrap=True)
        else:  # not print(): the flow's log_prints would turn it into a Prefect log entry
            self.stream.write(line + "\n")
            self.stream.flush()

    def _drop_bar(self, stage: str) -> None:
        with self._lock:
            task = self._tasks.pop(stage, None)
        if task is not None and self._bars is not None:
            self._bars.remove_task(task)

    def _start_bars(self) -> None:
        from rich.console import Console as RichConsole
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        self._bars = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                              MofNCompleteColumn(), TextColumn("{task.fields[unit]}"),
                              TextColumn("{task.fields[metrics]}"), TimeElapsedColumn(),
                              TextColumn("eta"), TimeRemainingColumn(),
                              console=RichConsole(file=self.stream), transient=False)
        self._bars.start()
