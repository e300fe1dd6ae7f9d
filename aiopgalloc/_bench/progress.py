"""Progress reporting: a ``rich`` progress bar on a terminal, else one plain
line per step on stderr.

``rich`` is optional (``pip install 'aiopgalloc[bench]'``) and imported
only here, through ``importlib`` so the library does not depend on it.  Its
live bar is used when it is importable and stderr is a terminal; on a pipe or
in a log the plain reporter prints one line per step instead, which reads
well in both.
"""

from __future__ import annotations

import importlib
import sys
import time
from typing import Any, TextIO

__all__ = ["NullProgress", "PlainProgress", "RichProgress", "make_progress"]


class NullProgress:
    """Reports nothing."""

    def begin(self, key: int, title: str, total: int) -> None:
        """Ignored."""

    def step(self, detail: str) -> None:
        """Ignored."""

    def end(self) -> None:
        """Ignored."""

    def close(self) -> None:
        """Ignored."""


class PlainProgress:
    """One line per step on a stream (stderr by default)::

    [w1 3/18  12.4 s] churn: mmap, repetition 1/3
    """

    def __init__(self, workloads: int, stream: TextIO | None = None) -> None:
        self._stream = stream if stream is not None else sys.stderr
        self._workloads = workloads
        self._index = 0
        self._key = 0
        self._title = ""
        self._total = 0
        self._done = 0
        self._t0 = time.perf_counter()

    def _print(self, text: str) -> None:
        print(text, file=self._stream, flush=True)

    def begin(self, key: int, title: str, total: int) -> None:
        """A workload starts."""
        self._index += 1
        self._key, self._title, self._total, self._done = key, title, total, 0
        self._print(f"[{self._index}/{self._workloads}] workload {key}: {title} ({total} steps)")

    def step(self, detail: str) -> None:
        """One step done."""
        self._done += 1
        elapsed = time.perf_counter() - self._t0
        self._print(
            f"  [w{self._key} {self._done}/{self._total} {elapsed:6.1f} s] {self._title}: {detail}"
        )

    def end(self) -> None:
        """The workload is done."""

    def close(self) -> None:
        """The suite is done."""
        self._print(f"done in {time.perf_counter() - self._t0:.1f} s")


class RichProgress:
    """A ``rich`` bar for the whole suite and one for the current workload."""

    def __init__(self, workloads: int, rich_progress: Any, rich_console: Any) -> None:
        console = rich_console.Console(stderr=True)
        p = rich_progress
        self._progress = p.Progress(
            p.SpinnerColumn(),
            p.TextColumn("{task.description}"),
            p.BarColumn(),
            p.MofNCompleteColumn(),
            p.TimeElapsedColumn(),
            p.TextColumn("{task.fields[detail]}"),
            console=console,
            transient=False,
        )
        self._progress.start()
        self._overall = self._progress.add_task("suite", total=workloads, detail="")
        self._task: Any = None
        self._total = 0

    def begin(self, key: int, title: str, total: int) -> None:
        """A workload starts: a new bar."""
        self._task = self._progress.add_task(f"{key}. {title}", total=total, detail="")
        self._total = total

    def step(self, detail: str) -> None:
        """Advance the workload's bar."""
        if self._task is not None:
            self._progress.update(self._task, advance=1, detail=detail)

    def end(self) -> None:
        """The workload is done: complete its bar, advance the suite's."""
        if self._task is not None:
            self._progress.update(self._task, completed=self._total, detail="")
        self._progress.update(self._overall, advance=1)
        self._task = None

    def close(self) -> None:
        """Stop the live display."""
        self._progress.stop()


def make_progress(
    workloads: int, enabled: bool = True
) -> NullProgress | PlainProgress | RichProgress:
    """The best reporter available: rich on a terminal, else plain lines."""
    if not enabled:
        return NullProgress()
    if sys.stderr.isatty():
        try:
            rich_progress = importlib.import_module("rich.progress")
            rich_console = importlib.import_module("rich.console")
        except ImportError:
            pass
        else:
            return RichProgress(workloads, rich_progress, rich_console)
    return PlainProgress(workloads)
