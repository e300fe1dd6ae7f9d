"""Evictable memory users, and the tasks that ask them to shrink.

A cache that keeps data in the memory file can mark the ranges it could
rebuild as *evictable*.  When memory gets tight (or whenever the options say
so) the file calls ``await user.evict(er)`` for those ranges, and the user
gives the memory back (``dec_ref``).

Rules, as in the reference (gVisor's pgalloc), with tasks for goroutines:

- At most one eviction task per user at a time.  It takes the user's
  evictable ranges from the *last* one backwards (a user that starts using
  its ranges again is thought likelier to start from the beginning) and
  calls ``evict`` with no lock held.  A range leaves the evictable set just
  before its ``evict`` runs, so after the call it counts as unevictable
  until it is marked again; ranges marked while the task runs are evicted
  by the same task.
- Because ``evict`` runs without the lock, a range the user marks
  unevictable while its ``evict`` is in flight may still be evicted once.
  Users must make ``evict`` do nothing for ranges they use again.
- A failing ``evict`` (an exception, or a cancellation that did not come
  from the file) is logged with the user and the range and counted in
  ``failed``; that range is not retried, and the task goes on with the
  user's other ranges.  When the file closes, the tasks are cancelled
  between two ranges or inside ``evict``; every flag and counter is settled
  in a ``finally``, so nothing is left half-updated.

When evictions start (``DelayedEviction``, resolved by the options):

- ``DISABLED``: as soon as a range is marked;
- ``ENABLED``: on ``on_pressure`` (fed by the pressure watcher, when the
  file listens to a source), possibly only for a share of each user's
  bytes ("graded"); without pressure, never on its own;
- ``IDLE`` (the reference's ``ENABLED`` without host pressure): when the
  releaser runs out of work (``on_releaser_idle``), which
  ``mark_evictable`` prompts by waking it;
- ``MANUAL``: only on ``start_evictions()``.
``start_evictions()`` works in every mode.

Threads: the ``mark_*`` methods, ``start_evictions`` and ``on_pressure``
may be called from any thread.  They record the work under ``_lock`` and
queue the user; on the event loop's own thread the queued tasks are spawned
right away (after the lock is dropped: starting a task runs no user code
today, but an eager task factory would, and the task takes the lock), from
any other thread an eventfd wakes the dispatcher task (``run``), which
spawns them.  The eviction tasks live in a task group of their own inside
the file's task group: nothing outlives the ``async with`` block.

Lock order: ``MemoryFile._mu`` is never held while calling in here, and
``Evictions._lock`` is never held while calling out (``evict``, the wake
callback, spawning a task), so the two are never nested.

This module is the engine; the user-facing types and argument checks are in
``aiopgalloc.eviction_api`` (re-exported here for existing imports).
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field

import anyio
import anyio.abc
import anyio.lowlevel

from .eviction_api import (
    MAX_USER_OFFSET,
    EvictableMemoryUser,
    EvictionStats,
    check_evictable_range,
    check_user,
)
from .host.epoll import drain_eventfd, new_eventfd, signal_eventfd
from .options import DelayedEviction, MemoryFileOpts
from .ranges import EvictableRange, page_round_down
from .segments import SegmentSet

__all__ = ["EvictableMemoryUser", "EvictionStats", "Evictions"]

log = logging.getLogger(__name__)

_YIELD_EVERY = 64
"""An eviction task yields to the event loop at least once per this many
ranges, so a user whose ``evict`` never awaits cannot hog the loop."""


_EVICTING_TASK: ContextVar[int | None] = ContextVar("aiopgalloc_evicting_task", default=None)
"""The id of the eviction task running in this context, so that
``wait_for_evictions`` can refuse to wait for the very task calling it."""


def _always(_a: None, _b: None) -> bool:
    return True


@dataclass(eq=False, slots=True)
class _UserState:
    user: EvictableMemoryUser
    ranges: SegmentSet[None] = field(
        default_factory=lambda: SegmentSet(_always, max_key=MAX_USER_OFFSET)
    )
    # True from the moment a task is queued for this user until that task
    # has settled: at most one task per user.
    evicting: bool = False
    # Bytes the running task may still hand to evict; None: all of them.
    budget: int | None = None


def _current_task_id() -> int | None:
    try:
        return anyio.get_current_task().id
    except RuntimeError:  # not in a task
        return None


def _cancelled_from_outside() -> bool:
    """Whether the current task's own scopes are cancelled (the file is
    closing), as opposed to a cancellation exception raised by user code."""
    return anyio.current_effective_deadline() <= anyio.current_time()


class Evictions:
    """The evictable sets of every user and the tasks that evict them.

    Made and run by the memory file's lifecycle code (``run`` in the file's
    task group, ``close`` after it); users reach it through the
    ``MemoryFile`` methods of the same names.  Thread-safe, except
    ``wait_for_evictions``, ``run`` and ``close``, which belong to the
    file's event loop.

    The counters (``started``, ``finished``, ``evict_calls``,
    ``evicted_bytes``, ``failed``, ``pressure_events``) only grow; read them
    directly or as one consistent ``stats()`` snapshot.
    """

    def __init__(self, opts: MemoryFileOpts, wake_releaser: Callable[[], None]) -> None:
        """Internal: ``opts`` already resolved (``MemoryFileOpts.resolved``);
        ``wake_releaser`` is called (without the lock) to prompt the
        releaser, which calls ``on_releaser_idle`` when it has no work.
        Raises ``OSError`` if no eventfd can be created."""
        mode = opts.delayed_eviction
        if mode is DelayedEviction.DEFAULT:
            mode = DelayedEviction.ENABLED
        self._mode = mode
        # None (listen when the host offers a source) counts as listening:
        # pressure can only arrive from a source the file opened.
        self._use_pressure = (
            mode is DelayedEviction.ENABLED and opts.use_host_memcg_pressure is not False
        )
        self._wake_releaser = wake_releaser
        self._lock = threading.Lock()
        # ---- guarded by _lock
        self._users: dict[int, _UserState] = {}  # id(user) -> state
        self._queued: list[_UserState] = []  # tasks to spawn on the loop
        self._outstanding = 0  # tasks queued or running, not yet settled
        self._idle: anyio.Event | None = None  # set when _outstanding hits 0
        self._tg: anyio.abc.TaskGroup | None = None
        self._loop_thread: int | None = None
        self._closed = False
        self._wake_fd = new_eventfd()
        self.started = 0
        self.finished = 0
        self.evict_calls = 0
        self.evicted_bytes = 0
        self.failed = 0
        self.pressure_events = 0
        self.max_pressure_level = 0
        # ----

    @property
    def mode(self) -> DelayedEviction:
        """The eviction mode in force (never ``DEFAULT``)."""
        return self._mode

    # ------------------------------------------------------------- marking

    def mark_evictable(self, user: EvictableMemoryUser, er: EvictableRange) -> None:
        """Mark ``er`` of ``user`` evictable.  Offsets already evictable are
        left alone (a redundant mark changes nothing); touching ranges merge.
        In ``DISABLED`` mode this starts an eviction task for ``user`` (if
        none runs); in ``ENABLED`` mode without host pressure it wakes the
        releaser, which starts evictions once it is idle.

        Cost: O(log n + k) for n ranges of the user and k gaps filled.
        Thread-safe.  Raises ``TypeError`` for a non-``EvictableRange``, non-int
        bounds or a user without an async ``evict``; ``ValueError`` for an
        empty, negative or ill-formed range.  Nothing changes when it raises.
        """
        start, end = check_evictable_range(er, "mark_evictable")
        key = id(user)
        # Check a new user before taking the lock: looking up its evict may
        # run its code.  (A state in the table keeps its user alive, so the
        # id of a live user finds that user's own state.)
        if key not in self._users:
            check_user(user, "mark_evictable")
        wake = spawn = False
        with self._lock:
            state = self._users.get(key)
            if state is None:
                state = self._users[key] = _UserState(user)
            state.ranges.fill(start, end, None)
            if not state.evicting:
                if self._mode is DelayedEviction.DISABLED:
                    self._begin_locked(state, None)
                    spawn = self._kick_locked()
                elif self._mode is DelayedEviction.IDLE:
                    wake = True
        if spawn:
            self._spawn_queued()
        if wake:
            self._wake_releaser()

    def mark_unevictable(self, user: EvictableMemoryUser, er: EvictableRange) -> None:
        """Withdraw ``er`` from ``user``'s evictable set; a range that
        straddles a bound of ``er`` is split.  Offsets not evictable are left
        alone.  An ``evict`` already in flight for these offsets may still
        run once.

        Cost: O(log n + k).  Thread-safe.  Raises as ``mark_evictable``.
        """
        start, end = check_evictable_range(er, "mark_unevictable")
        key = id(user)
        if key not in self._users:
            check_user(user, "mark_unevictable")
        with self._lock:
            state = self._users.get(key)
            if state is None:
                return
            state.ranges.remove_range(start, end)
            # A running task removes the state itself when it settles.
            if not state.evicting and not state.ranges:
                del self._users[key]

    def mark_all_unevictable(self, user: EvictableMemoryUser) -> None:
        """Withdraw every range of ``user`` (same caveat as
        ``mark_unevictable``).  Cost: O(1).  Thread-safe.  Raises
        ``TypeError`` for a user without an async ``evict``."""
        key = id(user)
        if key not in self._users:
            check_user(user, "mark_all_unevictable")
        with self._lock:
            state = self._users.get(key)
            if state is None:
                return
            state.ranges.clear()
            if not state.evicting:
                del self._users[key]

    def should_cache_evictable(self) -> bool:
        """Whether evictions are really delayed (``ENABLED`` or ``MANUAL``:
        evictable memory is kept until pressure or an explicit call), so
        caching in evictable memory may pay off.  O(1)."""
        return self._mode in (DelayedEviction.ENABLED, DelayedEviction.MANUAL)

    # ------------------------------------------------------------ starting

    def start_evictions(self) -> bool:
        """Ask every user to give back all its evictable ranges: start an
        eviction task for each user that has ranges and no task, and lift
        the limit of a graded eviction already running.  Does not wait (see
        ``wait_for_evictions``).  Returns whether a task was started.

        Cost: O(users).  Thread-safe; from another thread the tasks start
        once the event loop gets to them.
        """
        with self._lock:
            started = self._start_all_locked(None)
            spawn = self._kick_locked()
        if spawn:
            self._spawn_queued()
        return started

    def on_releaser_idle(self) -> None:
        """The releaser ran out of work: in ``IDLE`` mode that is the moment
        to evict (the reference's ``ENABLED`` without host pressure).  Cost:
        O(users) in that mode, O(1) otherwise."""
        if self._mode is DelayedEviction.IDLE and self._users:
            self.start_evictions()

    def on_pressure(self, level: int, fraction: float = 1.0) -> bool:
        """The host reports memory pressure of ``level`` (1 = low, 2 =
        medium, 3 = critical; see ``host.pressure.PressureLevel``).

        Only in ``ENABLED`` mode with ``use_host_memcg_pressure`` not False
        (otherwise it returns False and does nothing).  With ``fraction == 1.0`` it is
        ``start_evictions()``.  With a smaller ``fraction``, each user is
        asked for that share of its evictable bytes (rounded up), from the
        end: whole ranges first, and the last one cut at a page boundary so
        that at least the share is evicted.  Further notifications while a
        user's graded eviction runs add to its allowance.  Returns whether a
        task was started.

        Cost: O(users).  Thread-safe.  Raises ``TypeError`` for a non-int
        level or a non-number fraction, ``ValueError`` for a level below 1
        or a fraction outside (0, 1].
        """
        if isinstance(level, bool) or not isinstance(level, int):
            raise TypeError(f"on_pressure: level must be an int, got {type(level).__name__}")
        if isinstance(fraction, bool) or not isinstance(fraction, int | float):
            raise TypeError(
                f"on_pressure: fraction must be a number, got {type(fraction).__name__}"
            )
        if level < 1:
            raise ValueError(f"on_pressure: level must be >= 1, got {level}")
        if not 0.0 < fraction <= 1.0:  # NaN fails this too
            raise ValueError(f"on_pressure: fraction must be in (0, 1], got {fraction}")
        if not self._use_pressure:
            return False
        with self._lock:
            self.pressure_events += 1
            self.max_pressure_level = max(self.max_pressure_level, int(level))
            started = self._start_all_locked(None if fraction >= 1.0 else float(fraction))
            spawn = self._kick_locked()
        if spawn:
            self._spawn_queued()
        return started

    def _start_all_locked(self, fraction: float | None) -> bool:
        """Start or extend the eviction of every user with ranges: all of
        them (``fraction`` None) or that share of each user's bytes."""
        started = False
        for state in self._users.values():
            if not state.ranges:
                continue
            share = None if fraction is None else math.ceil(state.ranges.total_length * fraction)
            if not state.evicting:
                started |= self._begin_locked(state, share)
            elif state.budget is not None:
                state.budget = None if share is None else state.budget + share
        return started

    def _begin_locked(self, state: _UserState, budget: int | None) -> bool:
        """Book a new eviction task for ``state`` (which has none) and queue
        it; the caller then calls ``_kick_locked``.  False once closed."""
        if self._closed:
            return False
        state.evicting = True
        state.budget = budget
        self._outstanding += 1
        self.started += 1
        self._queued.append(state)
        return True

    def _kick_locked(self) -> bool:
        """Get the queued tasks started: True if the caller (on the loop's
        thread) must call ``_spawn_queued`` once the lock is dropped;
        otherwise the dispatcher is woken through the eventfd.  The eventfd
        is only touched under the lock, so ``close`` cannot pull it away."""
        if not self._queued:
            return False
        if self._tg is not None and threading.get_ident() == self._loop_thread:
            return True
        if self._wake_fd >= 0:
            signal_eventfd(self._wake_fd)
        return False

    def _spawn_queued(self) -> None:
        """Spawn the queued eviction tasks (on the loop's thread, no lock
        held).  A task group that no longer accepts tasks (the file is
        closing) gets the states settled instead."""
        with self._lock:
            queued, self._queued = self._queued, []
            tg = self._tg
            if tg is None:
                # Not running (yet, or any more): run or its finally deals
                # with them.
                self._queued[:0] = queued
                return
        for i, state in enumerate(queued):
            try:
                tg.start_soon(self._evict_user, state, name="aiopgalloc eviction")
            except RuntimeError:
                self._abandon(queued[i:])
                return

    def _abandon(self, states: list[_UserState]) -> None:
        """Settle the books of tasks that will never run."""
        idle: anyio.Event | None = None
        with self._lock:
            for state in states:
                idle = self._settle_locked(state) or idle
        if idle is not None:
            idle.set()

    # ---------------------------------------------------------------- tasks

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """The dispatcher: runs in the file's task group until cancelled,
        spawning the queued eviction tasks in a task group of its own.  When
        it ends, the eviction tasks have ended and queued ones are settled."""
        try:
            async with anyio.create_task_group() as tg:
                with self._lock:
                    self._tg = tg
                    self._loop_thread = threading.get_ident()
                task_status.started()
                while True:
                    self._spawn_queued()
                    await anyio.wait_readable(self._wake_fd)
                    drain_eventfd(self._wake_fd)
        finally:
            with self._lock:
                self._tg = None
                self._closed = True
                queued, self._queued = self._queued, []
            self._abandon(queued)

    def _next_range_locked(self, state: _UserState) -> EvictableRange | None:
        """Take the next range to evict off the end of the user's set, within
        its budget; None when there is nothing (more) to do."""
        budget = state.budget
        if budget is not None and budget <= 0:
            return None
        last = state.ranges.last()
        if last is None:
            return None
        start, end, _ = last
        if budget is not None and end - start > budget:
            # Evict only the tail, cut at a page boundary (evicting at least
            # the budget); the head stays evictable.
            cut = page_round_down(end - budget)
            if cut > start:
                start = cut
            state.ranges.remove_range(start, end)
        else:
            state.ranges.remove(start)
        if budget is not None:
            state.budget = max(0, budget - (end - start))
        self.evict_calls += 1
        return EvictableRange(start, end)

    async def _evict_user(self, state: _UserState) -> None:
        idle: anyio.Event | None = None
        settled = False
        cancelled_exc = anyio.get_cancelled_exc_class()
        _EVICTING_TASK.set(anyio.get_current_task().id)
        done_bytes = 0  # of the last call that returned normally
        calls = 0
        try:
            while True:
                # Stop between two ranges when the file closes; and let other
                # tasks run now and then if evict never awaits.
                calls += 1
                if calls % _YIELD_EVERY == 0:
                    await anyio.lowlevel.checkpoint()
                else:
                    await anyio.lowlevel.checkpoint_if_cancelled()
                with self._lock:
                    self.evicted_bytes += done_bytes
                    done_bytes = 0
                    er = self._next_range_locked(state)
                    if er is None:
                        # Settle in the same critical section that saw the set
                        # empty, so a concurrent mark either lands before (and
                        # is evicted here) or finds evicting == False.
                        idle = self._settle_locked(state)
                        settled = True
                        return
                try:
                    await state.user.evict(er)
                except Exception:
                    self._count_failure(state, er, "failed")
                except cancelled_exc:
                    if _cancelled_from_outside():
                        raise
                    # The user's evict raised a cancellation of its own (not
                    # ours: our scopes are not cancelled): a failure like any
                    # other, and it must not tear down the other evictions.
                    self._count_failure(state, er, "was cancelled")
                else:
                    done_bytes = er.length
        finally:
            if not settled:
                with self._lock:
                    self.evicted_bytes += done_bytes
                    idle = self._settle_locked(state)
            if idle is not None:
                idle.set()

    def _count_failure(self, state: _UserState, er: EvictableRange, how: str) -> None:
        with self._lock:
            self.failed += 1
        log.exception(
            "evict(%r) of user %r %s; going on with its other ranges", er, state.user, how
        )

    def _settle_locked(self, state: _UserState) -> anyio.Event | None:
        """An eviction task ends (or will never run): clear its flags, drop a
        user left with no ranges, and return the idle event to set (outside
        the lock) if it was the last outstanding one."""
        state.evicting = False
        state.budget = None
        key = id(state.user)
        if not state.ranges and self._users.get(key) is state:
            del self._users[key]
        self._outstanding -= 1
        self.finished += 1
        if self._outstanding == 0 and self._idle is not None:
            idle, self._idle = self._idle, None
            return idle
        return None

    async def wait_for_evictions(self, timeout: float | None = None) -> bool:
        """Wait until every eviction task started so far has finished,
        queued ones included (tasks started meanwhile are waited for too, as
        the reference's WaitGroup does).  Returns True then, or False if
        ``timeout`` seconds passed first (a negative timeout counts as 0).
        Always yields to the event loop once.

        Call it on the file's event loop.  Cancelling it changes nothing.
        Raises ``TypeError`` for a timeout that is not a number or None,
        ``ValueError`` for NaN, ``RuntimeError`` when called from an
        ``evict`` (in the eviction task itself), which would wait for itself
        forever.
        """
        if timeout is not None:
            if isinstance(timeout, bool) or not isinstance(timeout, int | float):
                raise TypeError(
                    f"wait_for_evictions: timeout must be a number or None, "
                    f"got {type(timeout).__name__}"
                )
            if math.isnan(timeout):
                raise ValueError("wait_for_evictions: timeout must not be NaN")
        evicting_task = _EVICTING_TASK.get()
        if evicting_task is not None and evicting_task == _current_task_id():
            raise RuntimeError("wait_for_evictions called from an evict: it would wait for itself")
        with anyio.move_on_after(timeout):
            await anyio.lowlevel.checkpoint()
            while True:
                with self._lock:
                    if self._outstanding == 0:
                        return True
                    if self._idle is None:
                        self._idle = anyio.Event()
                    idle = self._idle
                await idle.wait()
        with self._lock:
            return self._outstanding == 0

    @property
    def outstanding(self) -> int:
        """Eviction tasks started or queued and not finished.  O(1)."""
        return self._outstanding

    def stats(self) -> EvictionStats:
        """One consistent snapshot of the figures.  O(users)."""
        with self._lock:
            return EvictionStats(
                users=len(self._users),
                evictable_bytes=sum(s.ranges.total_length for s in self._users.values()),
                outstanding=self._outstanding,
                started=self.started,
                finished=self.finished,
                evict_calls=self.evict_calls,
                evicted_bytes=self.evicted_bytes,
                failed=self.failed,
                pressure_events=self.pressure_events,
                max_pressure_level=self.max_pressure_level,
            )

    def close(self) -> None:
        """Release the eventfd and the references to users (after ``run``
        has ended, or if it never started; on the loop's thread).  Tasks
        still queued are settled.  Idempotent."""
        with self._lock:
            self._closed = True
            queued, self._queued = self._queued, []
        self._abandon(queued)
        with self._lock:
            fd, self._wake_fd = self._wake_fd, -1
            self._users.clear()
            if fd >= 0:
                os.close(fd)

    def check(self) -> None:
        """Verify the eviction invariants; raise AssertionError naming the
        first one broken.  O(ranges).

        Each user's set is a valid, maximally merged segment set inside the
        user's offset space (so its ranges are disjoint); a user without a
        task has ranges and no budget; the outstanding count equals the
        users with a task, and ``started == finished + outstanding``; queued
        users all have a task booked.
        """
        with self._lock:
            evicting = 0
            for key, state in self._users.items():
                assert key == id(state.user), "user table keyed wrongly"
                state.ranges.check()
                assert state.ranges.is_maximally_merged(), "evictable set not merged"
                first = state.ranges.first()
                assert first is None or first[0] >= 0, "negative evictable offset"
                if state.evicting:
                    evicting += 1
                    assert state.budget is None or state.budget >= 0, "negative budget"
                else:
                    assert state.ranges, "idle user with no ranges kept"
                    assert state.budget is None, "idle user with a budget"
            assert self._outstanding >= 0, "negative outstanding evictions"
            assert evicting == self._outstanding, (
                f"{evicting} users evicting but {self._outstanding} tasks outstanding"
            )
            assert self.started == self.finished + self._outstanding, "task counts disagree"
            for state in self._queued:
                assert state.evicting, "queued user without a task booked"
                assert self._users.get(id(state.user)) is state, "queued user not in the table"
