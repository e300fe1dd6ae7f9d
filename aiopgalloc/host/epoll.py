"""Waiting on kernel fds from any anyio backend: POLLPRI through a private
epoll fd, eventfds as thread-safe wake-ups, and the coalescing async iterator
the pressure sources are built on (:class:`CoalescingFdSource`).

Why an epoll fd of our own
--------------------------

The kernel announces memory pressure on a PSI trigger fd (``memory.pressure``,
``/proc/pressure/memory``) and on kernfs files such as ``memory.events`` with
POLLPRI, the "exceptional condition" bit, not with POLLIN.  asyncio's selector
loop, uvloop (libuv) and trio all register fds for input and output only, so
``anyio.wait_readable`` on such an fd either never wakes or, because these
files also report POLLIN all the time, wakes in a busy loop.

An epoll fd is itself pollable, and it reads as ready (POLLIN) whenever one of
its members has an event of the kind it was registered for.  So each source
makes a private epoll fd, registers the kernel's fd in it for EPOLLPRI, and
hands the *epoll* fd to ``anyio.wait_readable``: the event loop, whatever it
is, then waits on POLLPRI for us.  EPOLLERR and EPOLLHUP are always reported
by epoll whether asked for or not.

Two kernel facts the sources built on this must respect (checked on this
project's machines, kernel 6.18):

1. A PSI trigger's poll method consumes its event: it reports POLLPRI once
   per firing and clears the flag while doing so.  When the event loop asks
   whether our epoll fd is ready, the kernel re-polls the members to find out,
   and that readiness check is what takes the POLLPRI.  By the time our task
   runs, ``epoll.poll(0)`` usually returns nothing.  The wake-up itself is the
   event: a PSI source counts every wake as one firing.  POLLERR, by contrast,
   is sticky: once the trigger is destroyed (its cgroup removed) every poll
   reports POLLPRI|POLLERR, so ``poll(0)`` still sees it.

2. kernfs files (``memory.events``, ``cgroup.events``) report
   POLLPRI|POLLERR together on *every* change, and keep reporting it until the
   file is read again from offset 0.  A fresh fd reports it once before the
   first read.  So POLLERR alone does not mean "gone" for them, and the file
   must be re-read on every wake: the loops are level-triggered, and an
   unread change would wake us forever.  A removed cgroup shows up as ENODEV
   on that read, but removing it does not by itself wake a watcher (unlike a
   PSI trigger, whose destruction notifies): it is noticed at the next wake.

Why eventfds
------------

An eventfd is a 64-bit counter behind an fd: ``write`` adds, ``read`` returns
the sum and resets it to zero, and the fd polls readable while the sum is not
zero.  It is the one wake-up that every event loop can wait for and that any
thread (or the kernel, for cgroup v1 ``memory.pressure_level``) can signal
without touching the loop.  The counter is also free coalescing: a thousand
signals between two reads cost one wake-up and read back as 1000.  asyncio
watches fds level-triggered, so an eventfd must be drained on every wake.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import select
from collections.abc import AsyncIterator, Callable
from functools import partial
from types import TracebackType
from typing import Generic, Literal, Self, TypeVar

import anyio

__all__ = [
    "CoalescingFdSource",
    "EpollWaiter",
    "SourceGone",
    "count_pri_wake",
    "drain_eventfd",
    "drain_stream",
    "new_eventfd",
    "signal_eventfd",
]

EPOLLPRI: int = select.EPOLLPRI
EPOLLIN: int = select.EPOLLIN
EPOLLERR: int = select.EPOLLERR
EPOLLHUP: int = select.EPOLLHUP


def new_eventfd() -> int:
    """Create a non-blocking, close-on-exec eventfd with counter zero.

    The caller owns the fd.  Raises ``OSError`` (EMFILE/ENFILE) when the
    process or system is out of file descriptors.
    """
    return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)


def drain_eventfd(fd: int) -> int:
    """Read and reset the counter of eventfd ``fd``; 0 if nothing was pending.

    One ``read`` system call (about a microsecond).
    """
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


def signal_eventfd(fd: int, value: int = 1) -> None:
    """Add ``value`` to the counter of eventfd ``fd``, from any thread.

    Never blocks: a counter about to overflow (which takes 2**64 signals) is
    left as it is, it is already pending.
    """
    with contextlib.suppress(BlockingIOError):
        os.eventfd_write(fd, value)


class EpollWaiter:
    """A private epoll fd that one anyio task at a time can await.

    Register the fds whose events the event loop cannot watch (EPOLLPRI),
    then ``await wait()`` and call ``poll()`` to see what is pending.  See the
    module notes for why ``poll()`` may come back empty after a real wake.
    Cost: one ``epoll_create1`` to build, one ``epoll_ctl`` per fd, one
    non-blocking ``epoll_wait`` per ``poll()``.
    """

    __slots__ = ("_ep",)

    def __init__(self) -> None:
        # select.epoll always sets EPOLL_CLOEXEC.
        self._ep: select.epoll | None = select.epoll()

    def _epoll(self) -> select.epoll:
        if self._ep is None:
            raise anyio.ClosedResourceError("the epoll waiter is closed")
        return self._ep

    def fileno(self) -> int:
        """The epoll fd (what the event loop watches for readability)."""
        return self._epoll().fileno()

    @property
    def closed(self) -> bool:
        """``True`` once :meth:`close` has been called."""
        return self._ep is None

    def register(self, fd: int, events: int = EPOLLPRI) -> None:
        """Watch ``fd`` for ``events`` (EPOLLERR and EPOLLHUP always).

        Raises ``PermissionError`` for fds that cannot be polled (regular
        files on disk file systems), ``FileExistsError`` if already watched.
        """
        self._epoll().register(fd, events)

    def poll(self) -> list[tuple[int, int]]:
        """Return the pending ``(fd, events)`` pairs without blocking."""
        return self._epoll().poll(0)

    async def wait(self) -> None:
        """Wait until a registered fd has a pending event.

        Raises ``anyio.ClosedResourceError`` if the waiter is closed while
        waiting (after :meth:`notify_closing`), ``anyio.BusyResourceError``
        if another task is already waiting on it.
        """
        await anyio.wait_readable(self.fileno())

    def notify_closing(self) -> None:
        """Wake a task blocked in :meth:`wait` with ClosedResourceError.

        Must be called from the event loop thread, before :meth:`close`.
        """
        if self._ep is not None:
            anyio.notify_closing(self._ep.fileno())

    def close(self) -> None:
        """Close the epoll fd; the registered fds stay open (caller owns them)."""
        ep, self._ep = self._ep, None
        if ep is not None:
            ep.close()


class SourceGone(OSError):
    """What a :class:`CoalescingFdSource` watched has disappeared.

    ``_collect`` raises it; the source hands out what was still pending, then
    every further ``__anext__`` raises a fresh ``gone_error`` (a subclass
    chosen by the source) with the same errno and message.
    """


def count_pri_wake(ep: EpollWaiter, woken: bool, what: str) -> int:
    """Count the firings of POLLPRI fds whose poll consumes the event (PSI
    triggers), after a wake (``woken``) or without one.

    An empty poll after a real wake still counts as one firing: the event
    loop's readiness check took the POLLPRI (module notes, fact 1).  Raises
    :class:`SourceGone` on POLLERR/POLLHUP, which is sticky: the trigger was
    destroyed.  Cost: one non-blocking ``epoll_wait``.
    """
    fired = 0
    for _fd, events in ep.poll():
        if events & (EPOLLERR | EPOLLHUP):
            raise SourceGone(errno.ENODEV, f"{what} is gone (its cgroup was removed)")
        if events & EPOLLPRI:
            fired += 1
    return max(fired, 1) if woken else fired


def drain_stream(fd: int, what: str) -> int:
    """Read a non-blocking pipe, FIFO or socket until it would block and
    return the number of bytes read.

    Raises :class:`SourceGone` when the peer has closed (end of file with
    nothing read) or the read fails.
    """
    total = 0
    while True:
        try:
            chunk = os.read(fd, 4096)
        except (BlockingIOError, InterruptedError):
            return total
        except OSError as exc:
            raise SourceGone(exc.errno or errno.EIO, f"{what}: {exc.strerror}") from exc
        if not chunk:
            if total:
                return total
            raise SourceGone(errno.EPIPE, f"{what}: the peer closed it")
        total += len(chunk)


E = TypeVar("E")


class CoalescingFdSource(Generic[E]):
    """An async context manager and async iterator driven by one fd that the
    event loop waits on for readability.

    This is the backend-neutral half of every pressure source; subclasses
    say what the kernel's files mean.  They implement:

    * ``_setup() -> int``: open everything (registering each fd with
      ``_own_fd`` / ``_own_epoll`` so it is closed on exit or on a failed
      setup) and return the fd to wait on;
    * ``_collect(woken) -> (level, count)``: drain what the kernel has
      accumulated, without blocking; ``woken`` says whether the wait just
      returned.  ``(0, 0)`` means nothing (a spurious wake).  Raise
      :class:`SourceGone` when the watched object has gone;
    * ``_event(level, count) -> E``: build the delivered event.

    Coalescing: at most one notification is pending; each wake adds to its
    count and raises its level to the highest seen.  ``min_interval``
    seconds must pass between deliveries; what arrives meanwhile is merged.
    Every delivery follows at least one wait on the event loop, so a storm
    cannot starve other tasks.  One consumer at a time (a second raises
    ``anyio.BusyResourceError``).  Leaving the ``async with`` block, also
    from another task, ends a running iteration with ``StopAsyncIteration``.
    """

    name: str
    gone_error: type[SourceGone] = SourceGone
    """The exception type iteration ends with when the source is gone."""

    def __init__(self, name: str, *, min_interval: float = 0.0) -> None:
        if isinstance(min_interval, bool) or not isinstance(min_interval, int | float):
            raise TypeError("min_interval must be a number of seconds")
        if not math.isfinite(min_interval) or min_interval < 0:
            raise ValueError("min_interval must be a finite, non-negative number of seconds")
        self.name = name
        self.min_interval = float(min_interval)
        self._owned: list[tuple[int, Callable[[], None]]] = []
        self._watch_fd = -1
        self._state: Literal["new", "open", "closed"] = "new"
        self._level = 0
        self._count = 0
        self._last_delivery: float | None = None
        self._gone: SourceGone | None = None

    # -- for subclasses ----------------------------------------------------

    def _setup(self) -> int:
        raise NotImplementedError

    def _collect(self, woken: bool) -> tuple[int, int]:
        raise NotImplementedError

    def _event(self, level: int, count: int) -> E:
        raise NotImplementedError

    def _own_fd(self, fd: int, close: Callable[[], None] | None = None) -> int:
        """Record ``fd`` as owned; ``close`` (default ``os.close``) ends it."""
        self._owned.append((fd, close if close is not None else partial(os.close, fd)))
        return fd

    def _own_epoll(self) -> EpollWaiter:
        """Create an owned :class:`EpollWaiter`."""
        ep = EpollWaiter()
        self._owned.append((ep.fileno(), ep.close))
        return ep

    # -- life cycle ----------------------------------------------------------

    @property
    def is_open(self) -> bool:
        """``True`` between ``__aenter__`` and ``__aexit__``."""
        return self._state == "open"

    def _open_all(self) -> None:
        self._level, self._count = 0, 0
        self._last_delivery, self._gone = None, None
        try:
            self._watch_fd = self._setup()
        except BaseException:
            self._close_all(notify=False)
            raise
        self._state = "open"

    def _close_all(self, *, notify: bool) -> None:
        self._state = "closed"
        self._watch_fd = -1
        owned, self._owned = self._owned, []
        # Every fd is announced before any is closed, so no waiter stays
        # parked on a number the kernel may hand out again at once.
        if notify:
            for fd, _ in owned:
                anyio.notify_closing(fd)
        for _, close in reversed(owned):
            with contextlib.suppress(OSError):
                close()

    def probe(self) -> None:
        """Set the source up and tear it down again at once (synchronous).

        Proves that ``async with`` would work: files exist, writes are
        accepted.  Raises the ``OSError`` that ``__aenter__`` would.
        """
        if self._state == "open":
            raise RuntimeError(f"{self.name} is open; probe it before entering it")
        state = self._state
        self._open_all()
        self._close_all(notify=False)
        self._state = state

    async def __aenter__(self) -> Self:
        if self._state == "open":
            raise RuntimeError(f"{self.name} is already open")
        self._open_all()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._close_all(notify=True)

    # -- iteration -----------------------------------------------------------

    def __aiter__(self) -> AsyncIterator[E]:
        return self

    def _take(self, woken: bool) -> None:
        try:
            level, count = self._collect(woken)
        except SourceGone as exc:
            self._gone = exc
            return
        if count > 0 and level > 0:
            self._count += count
            self._level = max(self._level, level)

    async def __anext__(self) -> E:
        if self._state == "new":
            raise RuntimeError(f"enter {self.name} with 'async with' before iterating")
        while True:
            if self._count == 0:
                if self._gone is not None:
                    raise self.gone_error(*self._gone.args)
                if self._state != "open":
                    raise StopAsyncIteration
                try:
                    await anyio.wait_readable(self._watch_fd)
                except anyio.ClosedResourceError:
                    # __aexit__ ran in another task while we waited.
                    raise StopAsyncIteration from None
                if self._state != "open":
                    raise StopAsyncIteration
                self._take(woken=True)
                continue
            if self.min_interval > 0 and self._last_delivery is not None:
                delay = self._last_delivery + self.min_interval - anyio.current_time()
                if delay > 0:
                    # A cancellation here keeps the pending notification for
                    # the next call; the kernel goes on accumulating.
                    await anyio.sleep(delay)
                    if self._state != "open":
                        raise StopAsyncIteration
                    self._take(woken=False)
            event = self._event(self._level, self._count)
            self._level, self._count = 0, 0
            self._last_delivery = anyio.current_time()
            return event
