"""Evictable memory users, and the tasks that ask them to shrink.

A cache that keeps data in the memory file can mark the ranges it could
rebuild as *evictable*.  When memory gets tight (or whenever the options say
so) the file calls ``await user.evict(er)`` for those ranges, and the user
gives the memory back (``dec_ref``).

Rules, as in the reference (gVisor's pgalloc), with tasks for goroutines:

- At most one eviction task per user at a time.  It takes the user's
  evictable ranges from the *last* one backwards (a user that starts using
  its ranges again is thought likelier to start from the beginning) and
  calls ``evict`` with no lock held.  A range is removed from the evictable
  set just before its ``evict`` runs; ranges marked while the task runs are
  evicted by the same task.
- Because ``evict`` runs without the lock, a range the user marks
  unevictable while its ``evict`` is in flight may still be evicted once.
  Users must make ``evict`` do nothing for ranges they use again.
- A failing ``evict`` is logged (with the user and the range) and counted;
  the task goes on with the user's other ranges.  Cancellation (the file
  closing) ends a task between two ranges or inside ``evict``; the counters
  and flags are settled in a ``finally`` so nothing is left half-updated.

Threads: the ``mark_*`` methods and ``start_evictions`` may be called from
any thread.  On the event loop's own thread a task is started at once; from
another thread the user is queued and an eventfd wakes the dispatcher task,
which starts it.  The eviction tasks live in a task group of their own
inside the file's task group (structured concurrency: nothing outlives the
``async with`` block).

Lock order: ``MemoryFile._mu`` is never held while calling in here, and
``Evictions._lock`` is never held while calling out (``evict``, the wake
callback), so the two are never nested.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import anyio
import anyio.abc

from .host.epoll import drain_eventfd, new_eventfd, signal_eventfd
from .options import DelayedEviction, MemoryFileOpts
from .ranges import EvictableRange
from .segments import SegmentSet

__all__ = ["EvictableMemoryUser", "Evictions"]

log = logging.getLogger("aiopgalloc.eviction")


@runtime_checkable
class EvictableMemoryUser(Protocol):
    """A user of the memory file that can give memory back on request.

    Users are told apart by identity (they need not be hashable).
    """

    async def evict(self, er: EvictableRange) -> None:
        """Give back the memory behind ``er`` (in the user's own offsets),
        which was marked evictable.  It may have been marked unevictable in
        the meantime: then do nothing.  After the call the file treats ``er``
        as unevictable until it is marked again."""
        ...


def _always(_a: None, _b: None) -> bool:
    return True


@dataclass(eq=False, slots=True)
class _UserState:
    user: EvictableMemoryUser
    ranges: SegmentSet[None] = field(default_factory=lambda: SegmentSet(_always))
    evicting: bool = False


def _validate_er(er: object, what: str) -> tuple[int, int]:
    if not isinstance(er, tuple) or len(er) != 2:
        raise TypeError(f"{what}: expected an EvictableRange, got {type(er).__name__}")
    start, end = er
    for x in (start, end):
        if isinstance(x, bool) or not isinstance(x, int):
            raise TypeError(f"{what}: range bounds must be ints, got {er!r}")
    if start < 0 or end <= start or end > 1 << 64:
        raise ValueError(f"{what}: empty, negative or ill-formed range {er!r}")
    return int(start), int(end)


def _validate_user(user: object, what: str) -> None:
    evict = getattr(user, "evict", None)
    if evict is None or not callable(evict):
        raise TypeError(f"{what}: the user must have an async evict(er) method")


class Evictions:
    """The evictable sets of every user and the tasks that evict them.

    Made and run by the memory file's lifecycle code; users reach it through
    the ``MemoryFile`` methods of the same names.
    """

    def __init__(self, opts: MemoryFileOpts, wake_releaser: Callable[[], None]) -> None:
        self._mode = opts.delayed_eviction
        self._use_pressure = opts.use_host_memcg_pressure
        self._wake_releaser = wake_releaser
        self._lock = threading.Lock()
        # ---- guarded by _lock
        self._users: dict[int, _UserState] = {}
        self._queued: list[_UserState] = []  # started from another thread
        self._outstanding = 0  # tasks started (or queued) and not finished
        self._idle: anyio.Event | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._loop_thread: int | None = None
        self._closed = False
        self.started = 0
        self.finished = 0
        self.failed = 0
        self.evict_calls = 0
        # ----
        self._wake_fd = new_eventfd()

    # ------------------------------------------------------------- marking

    def mark_evictable(self, user: EvictableMemoryUser, er: EvictableRange) -> None:
        """Mark ``er`` of ``user`` evictable.  O(log n + k).  Thread-safe."""
        _validate_user(user, "mark_evictable")
        start, end = _validate_er(er, "mark_evictable")
        with self._lock:
            state = self._users.get(id(user))
            if state is None:
                state = self._users[id(user)] = _UserState(user)
            state.ranges.fill(start, end, None)
            wake = False
            if not state.evicting:
                if self._mode is DelayedEviction.DISABLED:
                    self._start_locked(state)
                elif self._mode is DelayedEviction.ENABLED and not self._use_pressure:
                    wake = True
        if wake:
            # The releaser starts evictions once it runs out of work.
            self._wake_releaser()

    def mark_unevictable(self, user: EvictableMemoryUser, er: EvictableRange) -> None:
        """Withdraw ``er`` from ``user``'s evictable set.  Thread-safe."""
        start, end = _validate_er(er, "mark_unevictable")
        with self._lock:
            state = self._users.get(id(user))
            if state is None:
                return
            state.ranges.remove_range(start, end)
            if not state.evicting and not state.ranges:
                del self._users[id(user)]

    def mark_all_unevictable(self, user: EvictableMemoryUser) -> None:
        """Withdraw all of ``user``'s ranges.  Thread-safe."""
        with self._lock:
            state = self._users.get(id(user))
            if state is None:
                return
            state.ranges.clear()
            if not state.evicting:
                del self._users[id(user)]

    def should_cache_evictable(self) -> bool:
        """The reference's rule: worth caching when eviction waits for manual
        requests or for host memory pressure."""
        return self._mode is DelayedEviction.MANUAL or self._use_pressure

    # ------------------------------------------------------------ starting

    def start_evictions(self) -> bool:
        """Start an eviction task for every user that has none running.
        Returns whether any was started.  Thread-safe, O(users)."""
        with self._lock:
            return self._start_all_locked()

    def on_releaser_idle(self) -> None:
        """The releaser ran out of work: in ``ENABLED`` mode without host
        pressure, that is the moment to evict (as in the reference)."""
        if self._mode is DelayedEviction.ENABLED and not self._use_pressure:
            self.start_evictions()

    def _start_all_locked(self) -> bool:
        started = False
        for state in list(self._users.values()):
            if not state.evicting and state.ranges:
                self._start_locked(state)
                started = True
        return started

    def _start_locked(self, state: _UserState) -> None:
        if self._closed:
            return
        state.evicting = True
        self._outstanding += 1
        self.started += 1
        tg = self._tg
        if tg is not None and threading.get_ident() == self._loop_thread:
            tg.start_soon(self._evict_user, state)
        else:
            self._queued.append(state)
            signal_eventfd(self._wake_fd)

    # ---------------------------------------------------------------- tasks

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """The dispatcher: runs in the file's task group until cancelled,
        starting queued eviction tasks in a task group of its own."""
        try:
            async with anyio.create_task_group() as tg:
                with self._lock:
                    self._tg = tg
                    self._loop_thread = threading.get_ident()
                task_status.started()
                while True:
                    with self._lock:
                        queued, self._queued = self._queued, []
                    for state in queued:
                        tg.start_soon(self._evict_user, state)
                    await anyio.wait_readable(self._wake_fd)
                    drain_eventfd(self._wake_fd)
        finally:
            with self._lock:
                self._tg = None
                self._closed = True
                # Queued users whose task never started are settled here.
                for state in self._queued:
                    state.evicting = False
                    self._outstanding -= 1
                self._queued = []

    async def _evict_user(self, state: _UserState) -> None:
        settled = False
        idle: anyio.Event | None = None
        try:
            while True:
                with self._lock:
                    last = state.ranges.last()
                    if last is None:
                        # Settle in the same critical section that saw the set
                        # empty, so a concurrent mark either lands before (and
                        # is evicted here) or sees evicting == False.
                        idle = self._settle_locked(state)
                        settled = True
                        return
                    state.ranges.remove(last[0])
                    self.evict_calls += 1
                er = EvictableRange(last[0], last[1])
                try:
                    await state.user.evict(er)
                except Exception:
                    with self._lock:
                        self.failed += 1
                    log.exception("evict(%r) of %r failed", er, state.user)
        finally:
            if not settled:
                with self._lock:
                    idle = self._settle_locked(state)
            if idle is not None:
                idle.set()

    def _settle_locked(self, state: _UserState) -> anyio.Event | None:
        """An eviction task ends: clear its flags; return the idle event to
        set (outside the lock) if it was the last one."""
        state.evicting = False
        if not state.ranges and self._users.get(id(state.user)) is state:
            del self._users[id(state.user)]
        self._outstanding -= 1
        self.finished += 1
        if self._outstanding == 0 and self._idle is not None:
            idle, self._idle = self._idle, None
            return idle
        return None

    async def wait_for_evictions(self, timeout: float | None = None) -> bool:
        """Wait until every eviction started so far (queued ones included)
        has finished.  Returns False on timeout."""
        with anyio.move_on_after(timeout) as scope:
            while True:
                with self._lock:
                    if self._outstanding == 0:
                        return True
                    if self._idle is None:
                        self._idle = anyio.Event()
                    idle = self._idle
                await idle.wait()
        return not scope.cancelled_caught

    @property
    def outstanding(self) -> int:
        """Eviction tasks started or queued and not finished."""
        return self._outstanding

    def close(self) -> None:
        """Release the eventfd (after ``run`` has ended)."""
        fd, self._wake_fd = self._wake_fd, -1
        if fd >= 0:
            with contextlib.suppress(RuntimeError):
                anyio.notify_closing(fd)
            os.close(fd)

    def check(self) -> None:
        """Verify the eviction invariants; raise AssertionError.  O(ranges)."""
        with self._lock:
            evicting = 0
            for key, state in self._users.items():
                assert key == id(state.user), "user table keyed wrongly"
                state.ranges.check()
                assert state.ranges.is_maximally_merged(), "evictable set not merged"
                if state.evicting:
                    evicting += 1
                else:
                    assert state.ranges, "idle user with no ranges kept"
            assert self._outstanding >= 0, "negative outstanding evictions"
