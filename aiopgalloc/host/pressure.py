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
"""

from __future__ import annotations

import base64
import binascii
import enum
import errno
import os
import socket
import stat
import threading
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal, Protocol, Self, runtime_checkable

from .cgroup import CgroupInfo, current_memory_cgroup, parse_flat_keyed, unified_cgroup_dir
from .epoll import (
    EPOLLIN,
    EPOLLPRI,
    CoalescingFdSource,
    EpollWaiter,
    SourceGone,
    count_pri_wake,
    drain_eventfd,
    drain_stream,
    new_eventfd,
    signal_eventfd,
)

__all__ = [
    "HOST_PSI_MEMORY",
    "CgroupV1Pressure",
    "ManualPressure",
    "MemoryEvents",
    "NoPressureSourceError",
    "PressureEvent",
    "PressureLevel",
    "PressureSource",
    "PressureSourceGone",
    "PsiTrigger",
    "SystemdPressureWatch",
    "choose_pressure_source",
    "memory_events_delta",
    "parse_flat_keyed",
    "parse_systemd_environ",
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


def _with_context(exc: OSError, what: str, path: Path | str) -> OSError:
    # Same errno (so the OSError subclass survives), plus what we were doing.
    return OSError(exc.errno or errno.EIO, f"{what}: {exc.strerror or exc}", str(path))


class _PressureSource(CoalescingFdSource[PressureEvent]):
    """The shared base of the sources below: events are PressureEvents."""

    gone_error = PressureSourceGone

    def _event(self, level: int, count: int) -> PressureEvent:
        return PressureEvent(PressureLevel(level), self.name, count)


_V1_LEVELS: dict[str, PressureLevel] = {
    "low": PressureLevel.LOW,
    "medium": PressureLevel.MEDIUM,
    "critical": PressureLevel.CRITICAL,
}
_V1_MODES = ("default", "hierarchy", "local")


class CgroupV1Pressure(_PressureSource):
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
                raise _with_context(exc, "cannot open memory.pressure_level", pl_path) from exc
            try:
                ecfd = os.open(ec_path, os.O_WRONLY | os.O_CLOEXEC)
                try:
                    spec = f"{efd} {plfd} {word}" + (f",{self.mode}" if self.mode else "")
                    os.write(ecfd, spec.encode())  # the kernel wants it in one write
                finally:
                    os.close(ecfd)
            except OSError as exc:
                raise _with_context(exc, "cannot register a pressure_level event", ec_path) from exc
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


class PsiTrigger(_PressureSource):
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
            raise _with_context(exc, "cannot open PSI file", self.path) from exc
        try:
            os.write(fd, self.trigger)
        except OSError as exc:
            hint = ""
            if exc.errno == errno.EINVAL:
                hint = " (without CAP_SYS_RESOURCE the window must be a multiple of 2 s)"
            what = f"kernel refused trigger {self.trigger[:-1].decode()!r}{hint}"
            raise _with_context(exc, what, self.path) from exc
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


class MemoryEvents(_PressureSource):
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
            raise _with_context(exc, "cannot open memory.events", self.path) from exc
        self._ep = self._own_epoll()
        try:
            self._ep.register(self._fd, EPOLLPRI)
        except OSError as exc:
            raise _with_context(exc, "cannot poll", self.path) from exc
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


def parse_systemd_environ(environ: Mapping[str, str]) -> tuple[str, bytes | None] | None:
    """Read ``$MEMORY_PRESSURE_WATCH`` and ``$MEMORY_PRESSURE_WRITE``.

    Returns ``None`` when the watch variable is unset or empty, otherwise the
    path (``"/dev/null"`` included, the caller decides) and the decoded write
    bytes (``None`` when unset or empty).  Raises ``ValueError`` for a write
    value that is not base64.  Pure.
    """
    watch = environ.get("MEMORY_PRESSURE_WATCH", "").strip()
    if not watch:
        return None
    raw = environ.get("MEMORY_PRESSURE_WRITE", "").strip()
    if not raw:
        return watch, None
    try:
        return watch, base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"MEMORY_PRESSURE_WRITE is not valid base64: {raw!r}") from exc


class SystemdPressureWatch(_PressureSource):
    """systemd's memory-pressure protocol: watch what the service manager
    names in ``$MEMORY_PRESSURE_WATCH``.

    A regular or kernfs file (normally the unit's ``memory.pressure``) is
    opened, ``write`` is written to it (normally a PSI trigger) and it is
    watched for POLLPRI, with the same rules as :class:`PsiTrigger`.  An
    ``AF_UNIX`` stream socket is connected (a blocking connect, immediate for
    a listening local socket), ``write`` is sent to it, and it is watched for
    POLLIN; a peer that closes ends iteration with
    :class:`PressureSourceGone`.  A FIFO is watched for POLLIN and opened
    read-write, so a departing writer does not leave it reporting hang-up
    forever; ``write`` is not written to a FIFO, since we would read our own
    bytes back as an event.  For sockets and FIFOs the count of an event is
    the number of bytes drained.  Every event has the fixed ``level``.
    Build it from the environment with :meth:`from_environ`.
    """

    def __init__(
        self,
        path: str | Path,
        write: bytes | None = None,
        *,
        level: PressureLevel = PressureLevel.LOW,
        min_interval: float = 0.0,
        name: str | None = None,
    ) -> None:
        self.path = Path(path)
        self.write = write or None
        self.level = PressureLevel(level)
        super().__init__(name or f"systemd:{self.path}", min_interval=min_interval)
        self._ep: EpollWaiter | None = None
        self._stream_fd = -1
        self._sock: socket.socket | None = None

    @classmethod
    def from_environ(
        cls,
        environ: Mapping[str, str] | None = None,
        *,
        level: PressureLevel = PressureLevel.LOW,
        min_interval: float = 0.0,
        name: str | None = None,
    ) -> SystemdPressureWatch | None:
        """Build the source from the environment (default ``os.environ``).

        ``None`` when ``$MEMORY_PRESSURE_WATCH`` is unset, empty or
        ``/dev/null`` (pressure handling disabled).  The keyword arguments go
        to the constructor.  Raises ``ValueError`` for bad base64.
        """
        parsed = parse_systemd_environ(os.environ if environ is None else environ)
        if parsed is None or parsed[0] == "/dev/null":
            return None
        return cls(parsed[0], parsed[1], level=level, min_interval=min_interval, name=name)

    def _setup(self) -> int:
        self._ep, self._sock, self._stream_fd = None, None, -1
        try:
            mode = os.stat(self.path).st_mode
            if stat.S_ISSOCK(mode):
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self._own_fd(sock.fileno(), sock.close)
                sock.connect(os.fspath(self.path))
                if self.write:
                    sock.sendall(self.write)
                sock.setblocking(False)
                self._sock, self._stream_fd = sock, sock.fileno()
                return self._stream_fd
            flags = os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
            if stat.S_ISFIFO(mode):
                fd = self._own_fd(os.open(self.path, flags | os.O_RDWR))
                self._stream_fd = fd
                return fd
            fd = self._own_fd(
                os.open(self.path, flags | (os.O_RDWR if self.write else os.O_RDONLY))
            )
            if self.write:
                os.write(fd, self.write)
            self._ep = self._own_epoll()
            self._ep.register(fd, EPOLLPRI)
            return self._ep.fileno()
        except OSError as exc:
            raise _with_context(exc, "cannot watch MEMORY_PRESSURE_WATCH", self.path) from exc

    def _collect(self, woken: bool) -> tuple[int, int]:
        if self._ep is not None:
            n = count_pri_wake(self._ep, woken, f"pressure file {self.path}")
        else:
            n = drain_stream(self._stream_fd, str(self.path))
        return (self.level, n) if n else (0, 0)


class ManualPressure(_PressureSource):
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


HOST_PSI_MEMORY = Path("/proc/pressure/memory")
"""The host-wide PSI file for memory (the last resort of the chooser)."""

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
    pressure handling off: nothing else is tried.  Raises
    :class:`NoPressureSourceError` (its message lists every attempt) when
    nothing works.  Cost: a few file reads and trigger writes, about a
    millisecond.
    """
    memcg = cgroup if cgroup is not None else current_memory_cgroup()
    v2_dir = memcg.path if memcg is not None and memcg.version == 2 else unified_cgroup_dir()
    report: list[str] = []
    chosen: tuple[_PressureSource, str] | None = None

    try:
        systemd = parse_systemd_environ(environ)
    except ValueError as exc:
        systemd, systemd_error = None, str(exc)
    else:
        systemd_error = "MEMORY_PRESSURE_WATCH is not set"
    if systemd is not None and systemd[0] == "/dev/null":
        report.append(f"{_LABELS[0]}: disabled by the service manager (set to /dev/null)")
        report.extend(f"{label}: not tried, pressure handling is disabled" for label in _LABELS[1:])
        raise NoPressureSourceError(report)

    candidates: list[tuple[str, Callable[[], _PressureSource] | str]] = []
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
