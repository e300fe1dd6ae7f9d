"""Memory-pressure sources as async iterators that every anyio backend awaits.

A source is an async context manager (``__aenter__`` opens its fds and
registers its triggers, ``__aexit__`` removes them) and an async iterator of
:class:`PressureEvent`.  The allocator holds one and sheds evictable memory
whenever an event arrives::

    async with source:
        async for event in source:
            start_evictions(event.level)

What Linux offers, and what each source builds on
-------------------------------------------------

* cgroup v1 ``memory.pressure_level`` (:class:`CgroupV1Pressure`): the
  vmpressure notifier.  Registration is one write of ``"<eventfd> <fd of
  memory.pressure_level> <level>[,<mode>]"`` to ``cgroup.event_control``;
  afterwards the kernel adds 1 to the eventfd each time reclaim in the cgroup
  reaches that level.  A listener for level L is signalled for every event at
  L or above, so with one eventfd per level the highest non-zero counter names
  the level.  Closing the eventfd unregisters.  Removing the cgroup signals
  every registered eventfd one last time, which is why a wake is followed by
  a check that the cgroup still exists.  Under real pressure the kernel
  signals hundreds to thousands of times a second (measured here: about 200
  in the quarter second it took to stream 512 MiB through a 64 MiB cgroup);
  the eventfd adds them up between reads.

* PSI triggers (:class:`PsiTrigger`): a ``memory.pressure`` file (per v2
  cgroup, or ``/proc/pressure/memory`` for the whole host) opened read-write;
  writing ``"some|full <stall us> <window us>\\0"`` arms a trigger that fires
  (POLLPRI) when tasks stalled on memory for more than the stall time within
  the window, at most once per window.  One trigger per fd; closing the fd
  removes it.  The NUL matters: ``/proc/pressure/*`` overwrites the last byte
  written with a terminator, so without one the window loses a digit (EINVAL
  on this machine).  Without CAP_SYS_RESOURCE only windows that are whole
  multiples of 2 s are accepted, and root in a container often lacks it.
  POLLERR means the trigger was destroyed: its cgroup is gone.

* ``memory.events`` (:class:`MemoryEvents`): v2 counters (low, high, max,
  oom, oom_kill) that signal POLLPRI on every change.  Read-only, so it works
  where triggers cannot be written; it only speaks once the cgroup already
  hit ``memory.high`` or ``memory.max``, which makes it a late signal.

* systemd's protocol (:class:`SystemdPressureWatch`): the service manager
  passes ``$MEMORY_PRESSURE_WATCH`` (what to watch) and, base64-encoded,
  ``$MEMORY_PRESSURE_WRITE`` (what to write to it first, normally a PSI
  trigger).  A FIFO or a socket signals with POLLIN instead; ``/dev/null``
  means memory pressure handling was switched off for the service.

POLLPRI reaches the event loop through a private epoll fd; see
:mod:`aiopgalloc.host.epoll` for how that works and why a PSI wake counts as
an event even when the epoll fd reports nothing afterwards.

Coalescing (the machinery is :class:`~aiopgalloc.host.epoll.CoalescingFdSource`):
each source holds at most one pending notification, with the highest level
seen and the number of raw kernel events since the last delivery; the kernel
keeps accumulating while nobody iterates, so a slow consumer sees fewer,
fatter events, never a backlog.  ``min_interval`` spaces deliveries out.

Where the code lives
--------------------

This module is the public face: it re-exports every public name and picks
the source (:func:`choose_pressure_source`).  The sources are in
:mod:`aiopgalloc.host.pressure_sources` (kernel files and
:class:`ManualPressure`) and :mod:`aiopgalloc.host.pressure_systemd`.  The
chooser looks up :func:`~aiopgalloc.host.cgroup.current_memory_cgroup`,
:func:`~aiopgalloc.host.cgroup.unified_cgroup_dir` and
:data:`HOST_PSI_MEMORY` when it runs, so a test can point them elsewhere
with ``monkeypatch``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

from . import cgroup as _cgroup
from .cgroup import CgroupInfo, parse_flat_keyed
from .faults import faults
from .pressure_sources import (
    CgroupV1Pressure,
    ManualPressure,
    MemoryEvents,
    NoPressureSourceError,
    PressureEvent,
    PressureLevel,
    PressureSource,
    PressureSourceBase,
    PressureSourceGone,
    PsiTrigger,
    memory_events_delta,
)
from .pressure_systemd import SystemdPressureWatch, parse_systemd_environ

__all__ = [
    "HOST_PSI_MEMORY",
    "SYSTEMD_OFF_NOTE",
    "CgroupV1Pressure",
    "ManualPressure",
    "MemoryEvents",
    "NoPressureSourceError",
    "PressureEvent",
    "PressureHandlingOff",
    "PressureLevel",
    "PressureSource",
    "PressureSourceBase",
    "PressureSourceGone",
    "PsiTrigger",
    "SystemdPressureWatch",
    "choose_pressure_source",
    "memory_events_delta",
    "parse_flat_keyed",
    "parse_systemd_environ",
]


HOST_PSI_MEMORY = Path("/proc/pressure/memory")
"""The host-wide PSI file for memory (the last resort of the chooser)."""

SYSTEMD_OFF_NOTE = "MEMORY_PRESSURE_WATCH=/dev/null: turned off by systemd"
"""Why there is no pressure source when the service manager switched
pressure handling off (systemd sets ``/dev/null`` for
``MemoryPressureWatch=off``)."""


class PressureHandlingOff(NoPressureSourceError):
    """Memory-pressure handling was switched off on purpose (today: by the
    service manager, ``MEMORY_PRESSURE_WATCH=/dev/null``), so no source is
    chosen.  Not a failure: ``open_memory_file`` opens the file with host
    pressure off and says why (``note``, also in ``FileStats.pressure_note``).
    A ``NoPressureSourceError``, so code that catches that still does."""

    def __init__(self, report: list[str], note: str) -> None:
        super().__init__(report)
        self.note = note


_LABELS = (
    "systemd MEMORY_PRESSURE_WATCH",
    "cgroup v1 memory.pressure_level",
    "cgroup v2 memory.pressure (PSI)",
    "cgroup v2 memory.events",
    "host-wide /proc/pressure/memory (PSI)",
)


def choose_pressure_source(
    environ: Mapping[str, str] = os.environ,
    cgroup: CgroupInfo | None = None,
    *,
    min_interval: float = 0.0,
) -> tuple[PressureSource, list[str]]:
    """Pick the best pressure source this process can use, and say why.

    Preference: systemd's ``$MEMORY_PRESSURE_WATCH``; cgroup v1
    ``memory.pressure_level`` (level low); a PSI trigger on the v2 cgroup's
    ``memory.pressure``; the v2 ``memory.events``; host-wide
    ``/proc/pressure/memory``.  Each candidate is really set up and torn down
    again (:meth:`probe`), so the returned source (not yet entered) is known
    to work.  ``cgroup`` defaults to :func:`current_memory_cgroup`.  The
    report has one line per candidate: chosen, or why not.

    ``MEMORY_PRESSURE_WATCH=/dev/null`` means the service manager switched
    pressure handling off: nothing else is tried and
    :class:`PressureHandlingOff` is raised (a :class:`NoPressureSourceError`
    whose ``note`` says why).  Raises :class:`NoPressureSourceError` (its
    message lists every attempt) when nothing works.  Cost: a few file reads
    and trigger writes, about a millisecond.
    """
    memcg = cgroup if cgroup is not None else _cgroup.current_memory_cgroup()
    if memcg is not None and memcg.version == 2:
        v2_dir: Path | None = memcg.path
    else:
        v2_dir = _cgroup.unified_cgroup_dir()
    report: list[str] = []
    chosen: tuple[PressureSourceBase, str] | None = None

    try:
        systemd = parse_systemd_environ(environ)
    except ValueError as exc:
        systemd, systemd_error = None, str(exc)
    else:
        systemd_error = "MEMORY_PRESSURE_WATCH is not set"
    if systemd is not None and systemd[0] == "/dev/null":
        report.append(f"{_LABELS[0]}: disabled by the service manager (set to /dev/null)")
        report.extend(f"{label}: not tried, pressure handling is disabled" for label in _LABELS[1:])
        raise PressureHandlingOff(report, SYSTEMD_OFF_NOTE)

    candidates: list[tuple[str, Callable[[], PressureSourceBase] | str]] = []
    if systemd is not None:
        path, data = systemd
        candidates.append(
            (_LABELS[0], lambda: SystemdPressureWatch(path, data, min_interval=min_interval))
        )
    else:
        candidates.append((_LABELS[0], systemd_error))
    if memcg is not None and memcg.version == 1:
        memcg_dir = memcg.path
        candidates.append(
            (_LABELS[1], lambda: CgroupV1Pressure(memcg_dir, "low", min_interval=min_interval))
        )
    else:
        why = "no memory cgroup found" if memcg is None else "the memory controller is on v2"
        candidates.append((_LABELS[1], why))
    if v2_dir is not None:
        psi_path, events_path = v2_dir / "memory.pressure", v2_dir / "memory.events"
        candidates.append((_LABELS[2], lambda: PsiTrigger(psi_path, min_interval=min_interval)))
        if events_path.exists():
            candidates.append(
                (_LABELS[3], lambda: MemoryEvents(events_path, min_interval=min_interval))
            )
        else:
            candidates.append((_LABELS[3], f"{events_path} does not exist"))
    else:
        candidates.append((_LABELS[2], "no cgroup2 file system is mounted"))
        candidates.append((_LABELS[3], "no cgroup2 file system is mounted"))
    host = HOST_PSI_MEMORY
    candidates.append((_LABELS[4], lambda: PsiTrigger(host, min_interval=min_interval)))

    for label, make in candidates:
        if chosen is not None:
            report.append(f"{label}: not tried, {chosen[1]} chosen first")
        elif isinstance(make, str):
            report.append(f"{label}: not chosen: {make}")
        else:
            try:
                faults.check("pressure")
                source = make()
                source.probe()
            except (OSError, ValueError) as exc:
                report.append(f"{label}: not chosen: {exc}")
            else:
                chosen = (source, label)
                report.append(f"{label}: chosen ({source.name})")
    if chosen is None:
        raise NoPressureSourceError(report)
    return chosen[0], report
