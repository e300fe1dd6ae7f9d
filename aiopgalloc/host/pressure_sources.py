"""The memory-pressure sources themselves: the event types, the shared base,
and the sources that read the kernel's own files (cgroup v1
``memory.pressure_level``, PSI triggers, v2 ``memory.events``) plus the one
fired by code (:class:`ManualPressure`).

:mod:`aiopgalloc.host.pressure` is the public face: it re-exports every name
here, explains what each kernel interface offers, and chooses among the
sources (:func:`~aiopgalloc.host.pressure.choose_pressure_source`).  systemd's
watch protocol lives in :mod:`aiopgalloc.host.pressure_systemd`.
"""

from __future__ import annotations

import enum
import errno
import os
import threading
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Literal, Protocol, Self, runtime_checkable

from .cgroup import parse_flat_keyed
from .epoll import (
    EPOLLIN,
    EPOLLPRI,
    CoalescingFdSource,
    EpollWaiter,
    SourceGone,
    count_pri_wake,
    drain_eventfd,
    new_eventfd,
    signal_eventfd,
)

__all__ = [
    "CgroupV1Pressure",
    "ManualPressure",
    "MemoryEvents",
    "NoPressureSourceError",
    "PressureEvent",
    "PressureLevel",
    "PressureSource",
    "PressureSourceBase",
    "PressureSourceGone",
    "PsiTrigger",
    "memory_events_delta",
    "with_context",
]


class PressureLevel(enum.IntEnum):
    """How urgent a pressure notification is (cgroup v1's three levels)."""

    LOW = 1
    MEDIUM = 2
    CRITICAL = 3


@dataclass(frozen=True)
class PressureEvent:
    """One delivered notification.

    ``level`` is the highest level seen since the previous delivery,
    ``source`` the name of the source, ``count`` the number of raw kernel
    events coalesced into this one (at least 1).
    """

    level: PressureLevel
    source: str
    count: int


class PressureSourceGone(SourceGone):
    """The thing a source watched disappeared (its cgroup was removed, the
    systemd socket closed).  Iteration ends with this error."""


class NoPressureSourceError(OSError):
    """No pressure source could be set up; ``report`` lists every attempt."""

    def __init__(self, report: list[str]) -> None:
        self.report = list(report)
        super().__init__("no memory-pressure source works here:\n  " + "\n  ".join(report))


@runtime_checkable
class PressureSource(Protocol):
    """What the allocator consumes: an async context manager that is an
    async iterator of :class:`PressureEvent`.  One consumer at a time."""

    name: str

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    def __aiter__(self) -> AsyncIterator[PressureEvent]: ...


def with_context(exc: OSError, what: str, path: Path | str) -> OSError:
    """A copy of ``exc`` that says what we were doing and names ``path``.

    The errno is kept, so the ``OSError`` subclass (``FileNotFoundError``,
    ``PermissionError``, ...) survives the rewording."""
    return OSError(exc.errno or errno.EIO, f"{what}: {exc.strerror or exc}", str(path))


class PressureSourceBase(CoalescingFdSource[PressureEvent]):
    """The shared base of the pressure sources: a
    :class:`~aiopgalloc.host.epoll.CoalescingFdSource` whose events are
    :class:`PressureEvent` and which ends with :class:`PressureSourceGone`."""

    gone_error = PressureSourceGone

    def _event(self, level: int, count: int) -> PressureEvent:
        return PressureEvent(PressureLevel(level), self.name, count)


_V1_LEVELS: dict[str, PressureLevel] = {
    "low": PressureLevel.LOW,
    "medium": PressureLevel.MEDIUM,
    "critical": PressureLevel.CRITICAL,
}
_V1_MODES = ("default", "hierarchy", "local")


class CgroupV1Pressure(PressureSourceBase):
    """cgroup v1 ``memory.pressure_level`` notifications for ``cgroup_dir``.

    Listens at ``level`` ("low", "medium", "critical") and every level above
    it, so each event carries the highest level reclaim reached.  ``mode``:
    ``None`` (kernel default), "default", "hierarchy" or "local".  Each wake
    costs one read per eventfd and a stat.  ``__aenter__`` raises ``OSError``
    naming the file when registration is refused; iteration ends with
    :class:`PressureSourceGone` when the cgroup is removed.
    """

    def __init__(
        self,
        cgroup_dir: Path,
        level: str = "low",
        mode: str | None = None,
        *,
        min_interval: float = 0.0,
        name: str | None = None,
    ) -> None:
        if level not in _V1_LEVELS:
            raise ValueError(f"level must be one of {sorted(_V1_LEVELS)}, not {level!r}")
        if mode is not None and mode not in _V1_MODES:
            raise ValueError(f"mode must be None or one of {_V1_MODES}, not {mode!r}")
        self.cgroup_dir = Path(cgroup_dir)
        self.level = level
        self.mode = mode
        super().__init__(name or f"cgroup-v1:{self.cgroup_dir}:{level}", min_interval=min_interval)
        self._efds: dict[PressureLevel, int] = {}

    @property
    def eventfds(self) -> Mapping[PressureLevel, int]:
        """The registered eventfd of each level listened to (read-only;
        empty while the source is not open).

        The kernel signals through these; a test or a benchmark may write
        one (``os.eventfd_write``) to stand in for the kernel.  Closing or
        reading them is the source's business."""
        return MappingProxyType(self._efds if self.is_open else {})

    def _setup(self) -> int:
        self._efds = {}
        ep = self._own_epoll()
        pl_path = self.cgroup_dir / "memory.pressure_level"
        ec_path = self.cgroup_dir / "cgroup.event_control"
        for word, lvl in _V1_LEVELS.items():
            if lvl < _V1_LEVELS[self.level]:
                continue
            efd = self._own_fd(new_eventfd())
            try:
                plfd = os.open(pl_path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                raise with_context(exc, "cannot open memory.pressure_level", pl_path) from exc
            try:
                ecfd = os.open(ec_path, os.O_WRONLY | os.O_CLOEXEC)
                try:
                    spec = f"{efd} {plfd} {word}" + (f",{self.mode}" if self.mode else "")
                    os.write(ecfd, spec.encode())  # the kernel wants it in one write
                finally:
                    os.close(ecfd)
            except OSError as exc:
                raise with_context(exc, "cannot register a pressure_level event", ec_path) from exc
            finally:
                # The registration holds its own references; the kernel does
                # not need our fd of memory.pressure_level any more.
                os.close(plfd)
            ep.register(efd, EPOLLIN)
            self._efds[lvl] = efd
        return ep.fileno()

    def _collect(self, woken: bool) -> tuple[int, int]:
        counts = {lvl: drain_eventfd(fd) for lvl, fd in self._efds.items()}
        fired = [lvl for lvl, n in counts.items() if n > 0]
        if not fired:
            return 0, 0
        if not os.path.isdir(self.cgroup_dir):
            raise PressureSourceGone(errno.ENODEV, f"memory cgroup {self.cgroup_dir} was removed")
        return max(fired), max(counts.values())


class PsiTrigger(PressureSourceBase):
    """A PSI trigger on a ``memory.pressure`` file (or ``/proc/pressure/memory``).

    Fires when some (``kind="some"``) or all (``"full"``) tasks stalled on
    memory for more than ``stall_us`` within ``window_us``, at most once per
    window; every event has the fixed ``level``.  ``__aenter__`` raises
    ``OSError`` when the file is missing (no PSI), not writable, or the
    trigger is refused (EINVAL, with a hint about 2 s windows); iteration
    ends with :class:`PressureSourceGone` when the cgroup is removed.  Cost
    per wake: one non-blocking ``epoll_wait``.  Latency: here a fresh 2 s
    trigger fired about 2 s after a short stall, where cgroup v1 speaks
    within tens of milliseconds.
    """

    def __init__(
        self,
        path: Path,
        kind: Literal["some", "full"] = "some",
        stall_us: int = 150_000,
        window_us: int = 2_000_000,
        *,
        level: PressureLevel = PressureLevel.LOW,
        min_interval: float = 0.0,
        name: str | None = None,
    ) -> None:
        if kind not in ("some", "full"):
            raise ValueError(f"kind must be 'some' or 'full', not {kind!r}")
        for arg, value in (("stall_us", stall_us), ("window_us", window_us)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{arg} must be an int")
        if not 500_000 <= window_us <= 10_000_000:
            raise ValueError("window_us must be between 500000 and 10000000 (0.5 s .. 10 s)")
        if not 0 < stall_us <= window_us:
            raise ValueError("stall_us must be positive and at most window_us")
        self.path = Path(path)
        self.kind = kind
        self.stall_us = stall_us
        self.window_us = window_us
        self.level = PressureLevel(level)
        super().__init__(name or f"psi:{self.path}:{kind}", min_interval=min_interval)
        self._ep: EpollWaiter | None = None

    @property
    def trigger(self) -> bytes:
        """The exact bytes written to arm the trigger (NUL-terminated)."""
        return f"{self.kind} {self.stall_us} {self.window_us}".encode() + b"\0"

    def _setup(self) -> int:
        try:
            fd = self._own_fd(os.open(self.path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC))
        except OSError as exc:
            raise with_context(exc, "cannot open PSI file", self.path) from exc
        try:
            os.write(fd, self.trigger)
        except OSError as exc:
            hint = ""
            if exc.errno == errno.EINVAL:
                hint = " (without CAP_SYS_RESOURCE the window must be a multiple of 2 s)"
            what = f"kernel refused trigger {self.trigger[:-1].decode()!r}{hint}"
            raise with_context(exc, what, self.path) from exc
        self._ep = self._own_epoll()
        self._ep.register(fd, EPOLLPRI)
        return self._ep.fileno()

    def _collect(self, woken: bool) -> tuple[int, int]:
        assert self._ep is not None
        n = count_pri_wake(self._ep, woken, f"PSI trigger on {self.path}")
        return (self.level, n) if n else (0, 0)


_MEMORY_EVENT_KEYS = ("high", "max", "oom", "oom_kill")


def memory_events_delta(
    old: Mapping[str, int], new: Mapping[str, int]
) -> tuple[PressureLevel | None, int]:
    """Decide what a change of ``memory.events`` means.

    ``max``, ``oom`` or ``oom_kill`` grew: CRITICAL; only ``high`` grew:
    MEDIUM; anything else (``low``, unknown keys): ``(None, 0)``.  The count
    is the growth of ``high`` plus ``max`` (at least 1 when the level is set).
    Pure.
    """
    grew = {k: max(0, new.get(k, 0) - old.get(k, 0)) for k in _MEMORY_EVENT_KEYS}
    if grew["max"] or grew["oom"] or grew["oom_kill"]:
        level = PressureLevel.CRITICAL
    elif grew["high"]:
        level = PressureLevel.MEDIUM
    else:
        return None, 0
    return level, max(1, grew["high"] + grew["max"])


class MemoryEvents(PressureSourceBase):
    """Watch a cgroup v2 ``memory.events`` file (read-only) for ``high`` and
    ``max`` events.

    The fallback where no trigger can be written.  Each change wakes the
    source (POLLPRI); the file is re-read and compared with the previous
    reading (see :func:`memory_events_delta`); changes of other counters
    deliver nothing.  A removed cgroup is noticed at the next wake (ENODEV
    on the read) and ends iteration with :class:`PressureSourceGone`.  Cost
    per wake: one ``epoll_wait`` and one small read.
    """

    def __init__(self, path: Path, *, min_interval: float = 0.0, name: str | None = None) -> None:
        self.path = Path(path)
        super().__init__(name or f"memory.events:{self.path}", min_interval=min_interval)
        self._fd = -1
        self._ep: EpollWaiter | None = None
        self._last: dict[str, int] = {}

    def _read(self) -> dict[str, int]:
        try:
            return parse_flat_keyed(os.pread(self._fd, 65536, 0).decode())
        except OSError as exc:
            if exc.errno == errno.ENODEV:
                raise PressureSourceGone(errno.ENODEV, f"{self.path} is gone") from exc
            raise

    def _setup(self) -> int:
        try:
            self._fd = self._own_fd(os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC))
        except OSError as exc:
            raise with_context(exc, "cannot open memory.events", self.path) from exc
        self._ep = self._own_epoll()
        try:
            self._ep.register(self._fd, EPOLLPRI)
        except OSError as exc:
            raise with_context(exc, "cannot poll", self.path) from exc
        # The first read sets the baseline and clears the change flag a new
        # kernfs fd starts with.
        self._last = self._read()
        return self._ep.fileno()

    def _collect(self, woken: bool) -> tuple[int, int]:
        assert self._ep is not None
        self._ep.poll()  # flags say nothing here; the re-read is what counts
        new = self._read()
        old, self._last = self._last, new
        level, count = memory_events_delta(old, new)
        return (level or 0, count)


class ManualPressure(PressureSourceBase):
    """A source fired by code: ``notify(level)`` from any thread or task.

    For tests and custom policies (a watchdog thread reading its own metric).
    ``notify`` takes a lock and, only when nothing was pending, writes one
    eventfd (about a microsecond); it never needs the event loop.  Calls made
    while the source is not open are kept and delivered once it is.
    """

    def __init__(self, name: str = "manual", *, min_interval: float = 0.0) -> None:
        super().__init__(name, min_interval=min_interval)
        self._lock = threading.Lock()
        self._efd = -1
        self._pending_level: PressureLevel | None = None
        self._pending_count = 0

    def notify(self, level: PressureLevel = PressureLevel.LOW) -> None:
        """Record one pressure notification at ``level`` and wake the
        iterator.  Thread-safe; raises ``ValueError`` for an unknown level."""
        level = PressureLevel(level)
        with self._lock:
            was = self._pending_count
            self._pending_count += 1
            if self._pending_level is None or level > self._pending_level:
                self._pending_level = level
            # One wake per batch: the consumer takes the whole batch under
            # the lock, so later notifies of the batch need no syscall.
            if was == 0 and self._efd >= 0:
                signal_eventfd(self._efd)

    def _close_efd(self, fd: int) -> None:
        # Under the lock, so a notify() in another thread never writes to a
        # closed (or already reused) fd number.
        with self._lock:
            self._efd = -1
            os.close(fd)

    def _setup(self) -> int:
        fd = new_eventfd()
        self._own_fd(fd, lambda: self._close_efd(fd))
        with self._lock:
            self._efd = fd
            if self._pending_count:
                signal_eventfd(fd)
        return fd

    def _collect(self, woken: bool) -> tuple[int, int]:
        drain_eventfd(self._efd)
        with self._lock:
            level, count = self._pending_level, self._pending_count
            self._pending_level, self._pending_count = None, 0
        return (level or 0, count)
