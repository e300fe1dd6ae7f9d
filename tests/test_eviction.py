"""Eviction: evictable users, the DelayedEviction modes, the per-user tasks.

Every async test runs on asyncio, asyncio + uvloop and trio, against the
real allocator.  Two kinds of users appear: ``PageCache`` really holds
allocations in the file (one page per entry, marked evictable in its own
offset space) and gives them back in ``evict``; ``Recorder`` only records
the calls (optionally blocking on a gate, or failing on chosen ranges).
"""

from __future__ import annotations

import errno
import logging
import math
import threading
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from contextvars import ContextVar
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread
import pytest
from helpers import evictions_of
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aiopgalloc import (
    PAGE_SIZE,
    DelayedEviction,
    EvictableMemoryUser,
    EvictableRange,
    FileRange,
    MemoryFile,
    MemoryFileOpts,
    open_memory_file,
)
from aiopgalloc.eviction import Evictions
from aiopgalloc.host.pressure import ManualPressure, PressureLevel

pytestmark = pytest.mark.anyio

P = PAGE_SIZE
DISABLED = DelayedEviction.DISABLED
ENABLED = DelayedEviction.ENABLED
MANUAL = DelayedEviction.MANUAL
IDLE = DelayedEviction.IDLE


def er(a: int, b: int) -> EvictableRange:
    """Pages [a, b) of a user's offset space."""
    return EvictableRange(a * P, b * P)


def opts(mode: DelayedEviction, pressure: bool = False) -> MemoryFileOpts:
    return MemoryFileOpts(delayed_eviction=mode, use_host_memcg_pressure=pressure)


def ev_of(mf: MemoryFile) -> Evictions:
    ev: Evictions = evictions_of(mf)
    return ev


@asynccontextmanager
async def memfile(mode: DelayedEviction, pressure: bool = False) -> AsyncIterator[MemoryFile]:
    """A memory file whose invariants are checked on the way out."""
    async with open_memory_file(opts=opts(mode, pressure)) as mf:
        mf.check_invariants()
        yield mf
        mf.check_invariants()


_IN_TASK: ContextVar[bool] = ContextVar("_IN_TASK", default=False)
"""Set by the first evict call of a task: each task has its own copy of
the context, so the unset ones count the eviction tasks (task ids can be
reused once a task is gone)."""


class Recorder:
    """Records each evict call; tracks how many run at once and in how many
    tasks.

    ``gate``: every call waits for it; ``fail``: ranges whose evict raises;
    ``on_evict``: called (synchronously) at the start of each evict.
    """

    def __init__(self, name: str = "rec") -> None:
        self.name = name
        self.calls: list[EvictableRange] = []
        self.active = 0
        self.max_active = 0
        self.task_count = 0
        self.threads: set[int] = set()
        self.gate: anyio.Event | None = None
        self.entered = anyio.Event()
        self.fail: set[EvictableRange] = set()
        self.on_evict: Callable[[EvictableRange], None] | None = None

    def __repr__(self) -> str:
        return f"<Recorder {self.name}>"

    async def evict(self, er: EvictableRange) -> None:
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        if not _IN_TASK.get():
            _IN_TASK.set(True)
            self.task_count += 1
        self.threads.add(threading.get_ident())
        try:
            self.calls.append(er)
            self.entered.set()
            if self.on_evict is not None:
                self.on_evict(er)
            if self.gate is not None:
                await self.gate.wait()
            else:
                await anyio.lowlevel.checkpoint()
            if er in self.fail:
                raise RuntimeError(f"cannot evict {er!r}")
        finally:
            self.active -= 1


class PageCache:
    """A tiny cache that really holds memory: entry i is one page of the
    file, at offsets [i * P, (i + 1) * P) of the cache's own space."""

    def __init__(self, mf: MemoryFile) -> None:
        self.mf = mf
        self.entries: dict[int, FileRange] = {}
        self.evicted: list[EvictableRange] = []

    def put(self, i: int, byte: int = 0xAB) -> None:
        fr = self.mf.allocate(P)
        (view,) = self.mf.map_internal(fr)
        view[:] = bytes([byte]) * P
        del view
        self.entries[i] = fr
        self.mf.mark_evictable(self, er(i, i + 1))

    def get(self, i: int) -> FileRange | None:
        """Use entry i again: no longer evictable."""
        fr = self.entries.get(i)
        if fr is not None:
            self.mf.mark_unevictable(self, er(i, i + 1))
        return fr

    async def evict(self, r: EvictableRange) -> None:
        self.evicted.append(r)
        for i in range(r.start // P, r.end // P):
            fr = self.entries.pop(i, None)
            if fr is not None:
                self.mf.dec_ref(fr)
        # Evict runs with no lock held: the allocator is usable from here.
        self.mf.check_invariants()


class Unhashable:
    """A user that cannot be hashed, and equals every other one."""

    __hash__ = None  # type: ignore[assignment]

    def __init__(self) -> None:
        self.calls: list[EvictableRange] = []

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Unhashable)

    async def evict(self, er: EvictableRange) -> None:
        self.calls.append(er)
        await anyio.lowlevel.checkpoint()


async def wait_until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    with anyio.fail_after(timeout):
        while not cond():
            await anyio.sleep(0.002)


def pages(calls: list[EvictableRange]) -> list[int]:
    return sorted(p for r in calls for p in range(r.start // P, r.end // P))


def runs_descending(page_set: set[int]) -> list[EvictableRange]:
    """The maximal runs of ``page_set``, last first: what an eviction of
    that evictable set must call."""
    out: list[EvictableRange] = []
    for p in sorted(page_set, reverse=True):
        if out and out[-1].start == (p + 1) * P:
            out[-1] = EvictableRange(p * P, out[-1].end)
        else:
            out.append(er(p, p + 1))
    return out


# ------------------------------------------------------------------- modes


def test_evictable_memory_user_protocol() -> None:
    rec = Recorder()
    assert isinstance(rec, EvictableMemoryUser)
    assert isinstance(Unhashable(), EvictableMemoryUser)
    assert not isinstance(object(), EvictableMemoryUser)


async def test_disabled_evicts_right_after_marking() -> None:
    async with memfile(DISABLED) as mf:
        cache = PageCache(mf)
        for i in range(4):
            cache.put(i)
        # Marks made in one go merge into one range before the task runs.
        with anyio.fail_after(5):
            await mf.wait_for_evictions()
        assert cache.evicted == [er(0, 4)]
        assert cache.entries == {}
        mf.check_invariants()
        # A mark after the first task finished starts another one.
        cache.put(7)
        with anyio.fail_after(5):
            await mf.wait_for_evictions()
        assert cache.evicted == [er(0, 4), er(7, 8)]
        stats = ev_of(mf).stats()
        assert (stats.started, stats.finished, stats.users, stats.failed) == (2, 2, 0, 0)
        await mf.wait_for_reclaim()
        assert mf.total_usage() == 0
        assert not mf.should_cache_evictable()


async def test_manual_never_evicts_without_start_evictions() -> None:
    async with memfile(MANUAL) as mf:
        cache = PageCache(mf)
        for i in range(3):
            cache.put(i)
        # Keep the releaser busy and idle a few times: in MANUAL mode that
        # must not start anything.
        for _ in range(5):
            mf.dec_ref(mf.allocate(P))
            await mf.wait_for_reclaim()
            await anyio.sleep(0.02)
        assert cache.evicted == []
        assert ev_of(mf).started == 0
        assert ev_of(mf).outstanding == 0
        with anyio.fail_after(5):
            await mf.wait_for_evictions()  # at once: nothing is outstanding
        assert ev_of(mf).on_pressure(3) is False
        assert mf.should_cache_evictable()
        mf.check_invariants()
        mf.start_evictions()
        with anyio.fail_after(5):
            await mf.wait_for_evictions()
        assert cache.evicted == [er(0, 3)]
        await mf.wait_for_reclaim()
        assert mf.total_usage() == 0


async def test_idle_mode_evicts_once_releaser_idle() -> None:
    """The reference's ENABLED without host pressure, kept as IDLE."""
    async with memfile(IDLE) as mf:
        assert ev_of(mf).mode is IDLE
        assert not mf.should_cache_evictable()
        assert mf.stats().pressure_source == ""
        cache = PageCache(mf)
        for i in range(5):
            cache.put(i)
        # Nobody calls start_evictions: the releaser, woken by the mark,
        # finds nothing to release and starts them.
        await wait_until(lambda: not cache.entries)
        with anyio.fail_after(5):
            await mf.wait_for_evictions()
        assert pages(cache.evicted) == list(range(5))
        assert ev_of(mf).on_pressure(2) is False
        await mf.wait_for_reclaim()
        assert mf.total_usage() == 0


@pytest.mark.parametrize("mode", [DelayedEviction.DEFAULT, ENABLED])
@pytest.mark.parametrize("pressure", [None, False])
async def test_enabled_keeps_evictable_memory_without_pressure(
    mode: DelayedEviction, pressure: bool | None
) -> None:
    """The default keeps a cache: with no pressure, nothing is evicted
    however idle the releaser is, until something asks."""
    async with open_memory_file(
        opts=MemoryFileOpts(delayed_eviction=mode, use_host_memcg_pressure=pressure)
    ) as mf:
        assert ev_of(mf).mode is ENABLED
        assert mf.should_cache_evictable()
        cache = PageCache(mf)
        for i in range(5):
            cache.put(i)
        for _ in range(5):
            # Work for the releaser, then idle time: what used to evict.
            mf.dec_ref(mf.allocate(P))
            await mf.wait_for_reclaim()
            await anyio.sleep(0.05)
        assert cache.evicted == [] and len(cache.entries) == 5
        assert ev_of(mf).started == 0
        mf.start_evictions()
        with anyio.fail_after(5):
            await mf.wait_for_evictions()
        assert pages(cache.evicted) == list(range(5))


async def test_default_listens_to_host_pressure_where_the_host_offers_it() -> None:
    """``MemoryFileOpts()`` takes the host's pressure when a source works
    here (this machine has one) and says which; ``False`` says why not."""
    from aiopgalloc.host import pressure

    try:
        expected, _ = pressure.choose_pressure_source()
    except pressure.NoPressureSourceError as exc:
        async with open_memory_file() as mf:
            assert mf.stats().pressure_source == ""
            assert "no memory-pressure source works" in mf.stats().pressure_note or (
                isinstance(exc, pressure.PressureHandlingOff)
            )
        return
    async with open_memory_file() as mf:
        assert mf.stats().pressure_source == getattr(expected, "name", "")
        assert mf.stats().pressure_note == ""
    async with open_memory_file(opts=MemoryFileOpts(use_host_memcg_pressure=False)) as mf:
        assert mf.stats().pressure_source == ""
        assert mf.stats().pressure_note == "use_host_memcg_pressure is False"


async def test_default_falls_back_quietly_where_no_source_works(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Where no source can be set up (every probe fails, through the host
    seam), the default opens without one and says why in stats(), with no
    warning; ``True`` refuses to open."""
    from aiopgalloc.host.faults import faults
    from aiopgalloc.host.pressure import NoPressureSourceError

    caplog.set_level(logging.DEBUG, logger="aiopgalloc")
    with faults.injected("pressure", errno.EACCES):
        async with open_memory_file() as mf:
            st = mf.stats()
            assert st.pressure_source == ""
            assert st.pressure_note.startswith("no memory-pressure source works")
            assert "Permission denied" in st.pressure_note
            assert mf.should_cache_evictable()
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
        with pytest.raises(NoPressureSourceError):
            async with open_memory_file(opts=MemoryFileOpts(use_host_memcg_pressure=True)):
                pass
    assert faults.calls("pressure") >= 2


async def test_enabled_with_pressure_waits_for_pressure() -> None:
    async with memfile(ENABLED, pressure=True) as mf:
        ev = ev_of(mf)
        assert mf.should_cache_evictable()
        cache = PageCache(mf)
        for i in range(4):
            cache.put(i)
        for _ in range(3):
            mf.dec_ref(mf.allocate(P))
            await mf.wait_for_reclaim()
            await anyio.sleep(0.02)
        assert cache.evicted == []
        assert ev.on_pressure(1) is True
        with anyio.fail_after(5):
            await mf.wait_for_evictions()
        assert cache.evicted == [er(0, 4)]
        assert ev.pressure_events == 1 and ev.max_pressure_level == 1


@pytest.mark.parametrize(
    ("mode", "pressure", "expected"),
    [
        (DelayedEviction.DEFAULT, False, True),
        (DelayedEviction.DEFAULT, True, True),
        (DISABLED, False, False),
        (DISABLED, True, False),  # pressure is ignored outside ENABLED
        (IDLE, False, False),
        (IDLE, True, False),
        (ENABLED, False, True),
        (ENABLED, True, True),
        (MANUAL, False, True),
        (MANUAL, True, True),
    ],
)
async def test_should_cache_evictable(
    mode: DelayedEviction, pressure: bool, expected: bool
) -> None:
    async with memfile(mode, pressure) as mf:
        assert mf.should_cache_evictable() is expected
        # on_pressure only acts where pressure drives evictions.
        rec = Recorder()
        mf.mark_evictable(rec, er(0, 1))
        if mode is not DISABLED:
            assert ev_of(mf).on_pressure(1) is (mode not in (MANUAL, IDLE) and pressure)


# ------------------------------------------------------------------- order


async def test_evicts_last_range_first() -> None:
    async with memfile(MANUAL) as mf:
        rec = Recorder()
        marked = [er(4, 6), er(0, 1), er(20, 21), er(10, 11), er(2, 3)]
        for r in marked:
            mf.mark_evictable(rec, r)
        mf.check_invariants()
        mf.start_evictions()
        with anyio.fail_after(5):
            await mf.wait_for_evictions()
        assert rec.calls == sorted(marked, reverse=True)
        assert ev_of(mf).stats().evicted_bytes == sum(r.length for r in marked)


async def test_ranges_marked_during_an_eviction_are_evicted_by_the_same_task() -> None:
    async with memfile(MANUAL) as mf:
        rec = Recorder()
        rec.gate = anyio.Event()
        mf.mark_evictable(rec, er(10, 11))
        mf.start_evictions()
        await rec.entered.wait()
        # While evict(10) is blocked: more ranges, one below and one above.
        mf.mark_evictable(rec, er(0, 2))
        mf.mark_evictable(rec, er(30, 31))
        mf.start_evictions()  # the user already has a task: nothing new
        mf.check_invariants()
        rec.gate.set()
        with anyio.fail_after(5):
            await mf.wait_for_evictions()
        assert rec.calls == [er(10, 11), er(30, 31), er(0, 2)]
        assert ev_of(mf).started == 1
        assert rec.max_active == 1


# ----------------------------------------------------- marking semantics


async def test_marks_merge_redundant_marks_change_nothing_and_unmarks_split() -> None:
    async with memfile(MANUAL) as mf:
        rec = Recorder()
        mf.mark_evictable(rec, er(0, 2))
        mf.mark_evictable(rec, er(2, 4))  # adjacent: merges
        mf.mark_evictable(rec, er(1, 3))  # redundant: nothing changes
        mf.mark_evictable(rec, er(0, 4))
        mf.mark_evictable(rec, er(6, 8))
        mf.mark_evictable(rec, er(7, 10))  # overlapping: merges into [6, 10)
        mf.check_invariants()
        assert ev_of(mf).stats().evictable_bytes == 8 * P
        mf.mark_unevictable(rec, er(1, 2))  # splits [0, 4)
        mf.mark_unevictable(rec, er(12, 20))  # never marked: no-op
        mf.mark_unevictable(rec, er(9, 30))  # trims [6, 10)
        mf.mark_unevictable(Recorder(), er(0, 1))  # unknown user: no-op
        mf.check_invariants()
        mf.start_evictions()
        with anyio.fail_after(5):
            await mf.wait_for_evictions()
        assert rec.calls == [er(6, 9), er(2, 4), er(0, 1)]
        # After an eviction the ranges are unevictable until marked again.
        mf.start_evictions()
        with anyio.fail_after(5):
            await mf.wait_for_evictions()
        assert len(rec.calls) == 3
        assert ev_of(mf).stats().users == 0


async def test_mark_all_unevictable() -> None:
    async with memfile(MANUAL) as mf:
        a, b = Recorder("a"), Recorder("b")
        for r in (er(0, 1), er(2, 3), er(5, 9)):
            mf.mark_evictable(a, r)
            mf.mark_evictable(b, r)
        mf.mark_all_unevictable(a)
        mf.mark_all_unevictable(a)  # again: no-op
        mf.check_invariants()
        assert ev_of(mf).stats().users == 1
        mf.start_evictions()
        with anyio.fail_after(5):
            await mf.wait_for_evictions()
        assert a.calls == []
        assert b.calls == [er(5, 9), er(2, 3), er(0, 1)]


async def test_unmarking_during_an_eviction() -> None:
    async with memfile(MANUAL) as mf:
        rec = Recorder()
        rec.gate = anyio.Event()
        for r in (er(0, 1), er(2, 3), er(4, 5), er(6, 7)):
            mf.mark_evictable(rec, r)
        mf.start_evictions()
        await rec.entered.wait()
        assert rec.calls == [er(6, 7)]
        # The range in flight may still be evicted (documented); the ones
        # not yet taken are not.
        mf.mark_unevictable(rec, er(6, 7))
        mf.mark_unevictable(rec, er(2, 3))
        mf.check_invariants()
        rec.gate.set()
        with anyio.fail_after(5):
            await mf.wait_for_evictions()
        assert rec.calls == [er(6, 7), er(4, 5), er(0, 1)]
        # Everything withdrawn while a task runs: it ends, the user is gone.
        rec.gate = anyio.Event()
        rec.entered = anyio.Event()
        for r in (er(0, 1), er(2, 3), er(4, 5)):
            mf.mark_evictable(rec, r)
        mf.start_evictions()
        await rec.entered.wait()
        mf.mark_all_unevictable(rec)
        mf.check_invariants()
        assert ev_of(mf).stats().users == 1  # kept while its task runs
        rec.gate.set()
        with anyio.fail_after(5):
            await mf.wait_for_evictions()
        assert rec.calls[3:] == [er(4, 5)]
        assert ev_of(mf).stats().users == 0
        mf.check_invariants()


_OP = st.tuples(
    st.sampled_from(["mark", "unmark", "unmark_all"]),
    st.integers(0, 15),
    st.integers(1, 6),
)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(ops=st.lists(_OP, max_size=25))
async def test_marks_match_a_model(ops: list[tuple[str, int, int]]) -> None:
    """Any sequence of marks and unmarks evicts exactly the model's pages,
    as maximal runs, last first."""
    model: set[int] = set()
    async with memfile(MANUAL) as mf:
        rec = Recorder()
        for op, start, length in ops:
            if op == "mark":
                mf.mark_evictable(rec, er(start, start + length))
                model |= set(range(start, start + length))
            elif op == "unmark":
                mf.mark_unevictable(rec, er(start, start + length))
                model -= set(range(start, start + length))
            else:
                mf.mark_all_unevictable(rec)
                model.clear()
            mf.check_invariants()
        assert ev_of(mf).stats().evictable_bytes == len(model) * P
        mf.start_evictions()
        with anyio.fail_after(5):
            await mf.wait_for_evictions()
        assert rec.calls == runs_descending(model)


async def test_users_are_told_apart_by_identity() -> None:
    async with memfile(MANUAL) as mf:
        a, b = Unhashable(), Unhashable()
        assert a == b
        with pytest.raises(TypeError):
            hash(a)
        mf.mark_evictable(a, er(0, 2))
        mf.mark_evictable(b, er(0, 2))
        mf.mark_evictable(b, er(4, 5))
        mf.mark_unevictable(a, er(0, 1))
        mf.check_invariants()
        assert ev_of(mf).stats().users == 2
        mf.start_evictions()
        with anyio.fail_after(5):
            await mf.wait_for_evictions()
        assert a.calls == [er(1, 2)]
        assert b.calls == [er(4, 5), er(0, 2)]


# ------------------------------------------------------- one task per user


async def test_one_task_per_user_under_a_burst_of_start_evictions() -> None:
    async with memfile(MANUAL) as mf:
        ev = ev_of(mf)
        users = [Recorder(f"u{i}") for i in range(4)]
        marked: dict[int, set[int]] = defaultdict(set)
        next_page = 0

        def mark_more(n: int) -> None:
            nonlocal next_page
            for _ in range(n):
                for k, u in enumerate(users):
                    # Disjoint single pages, so every mark is one range.
                    mf.mark_evictable(u, er(next_page, next_page + 1))
                    marked[k].add(next_page)
                next_page += 2

        mark_more(100)
        for i in range(10_000):
            mf.start_evictions()
            if i % 50 == 0:
                await anyio.lowlevel.checkpoint()
            if i % 1000 == 999:
                mark_more(20)
        with anyio.fail_after(10):
            await mf.wait_for_evictions()
        mf.check_invariants()
        for k, u in enumerate(users):
            assert u.max_active == 1, u
            assert pages(u.calls) == sorted(marked[k])  # each page exactly once
        # Every task evicted something; a task is only started for a user
        # without one, so there are at most (rounds of marks) per user.
        assert ev.started == ev.finished == sum(u.task_count for u in users)
        assert len(users) <= ev.started <= len(users) * 11
        assert ev.outstanding == 0


async def test_one_task_per_user_with_marks_and_starts_from_threads() -> None:
    async with memfile(DISABLED) as mf:
        ev = ev_of(mf)
        users = [Recorder(f"u{i}") for i in range(3)]

        def worker(t: int) -> None:
            for i in range(300):
                for u in users:
                    p = t * 1000 + i
                    mf.mark_evictable(u, er(p, p + 1))
                mf.start_evictions()

        async with anyio.create_task_group() as tg:
            for t in range(4):
                tg.start_soon(anyio.to_thread.run_sync, worker, t)
        with anyio.fail_after(10):
            await mf.wait_for_evictions()
        mf.check_invariants()
        loop_thread = threading.get_ident()
        for u in users:
            assert u.max_active == 1
            assert u.threads == {loop_thread}
            assert pages(u.calls) == sorted(t * 1000 + i for t in range(4) for i in range(300))
        assert ev.started == ev.finished


# -------------------------------------------------------------- failures


async def test_failing_evict_is_logged_counted_and_the_rest_still_evicted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="aiopgalloc.eviction")
    async with memfile(MANUAL) as mf:
        ev = ev_of(mf)
        bad, good = Recorder("bad"), Recorder("good")
        bad.fail = {er(4, 5)}
        for r in (er(0, 1), er(2, 3), er(4, 5), er(6, 7)):
            mf.mark_evictable(bad, r)
            mf.mark_evictable(good, r)
        mf.start_evictions()
        with anyio.fail_after(5):
            await mf.wait_for_evictions()
        mf.check_invariants()
        assert bad.calls == [er(6, 7), er(4, 5), er(2, 3), er(0, 1)]
        assert good.calls == bad.calls
        assert ev.failed == 1
        assert ev.stats().evicted_bytes == 7 * P  # 8 calls, one failed
        records = [r for r in caplog.records if r.name == "aiopgalloc.eviction"]
        assert len(records) == 1
        msg = records[0].getMessage()
        assert repr(er(4, 5)) in msg and "<Recorder bad>" in msg
        assert records[0].exc_info is not None
        assert isinstance(records[0].exc_info[1], RuntimeError)
        # The failed range is not retried; the allocator and its tasks go on.
        fr = mf.allocate(P)
        mf.mark_evictable(bad, er(4, 5))
        mf.start_evictions()
        with anyio.fail_after(5):
            await mf.wait_for_evictions()
        assert bad.calls[-1] == er(4, 5) and ev.failed == 2
        mf.dec_ref(fr)
        mf.check_invariants()


async def test_evicts_that_are_cancelled_inside_or_time_out(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="aiopgalloc.eviction")

    class Scoped:
        def __init__(self) -> None:
            self.calls: list[EvictableRange] = []

        async def evict(self, r: EvictableRange) -> None:
            self.calls.append(r)
            if r.start == 0:
                # Cancelled by its own scope: returns normally.
                with anyio.move_on_after(0.001):
                    await anyio.sleep_forever()
            else:
                with anyio.fail_after(0.001):  # TimeoutError: a failure
                    await anyio.sleep_forever()

    async with memfile(MANUAL) as mf:
        user, other = Scoped(), Recorder()
        mf.mark_evictable(user, er(0, 1))
        mf.mark_evictable(user, er(2, 3))
        mf.mark_evictable(other, er(0, 3))
        mf.start_evictions()
        with anyio.fail_after(5):
            await mf.wait_for_evictions()
        mf.check_invariants()
        assert user.calls == [er(2, 3), er(0, 1)]
        assert other.calls == [er(0, 3)]
        assert ev_of(mf).failed == 1
        assert any(isinstance(r.exc_info[1], TimeoutError) for r in caplog.records if r.exc_info)


async def test_evict_raising_a_stray_cancellation(
    anyio_backend: tuple[str, dict[str, Any]], caplog: pytest.LogCaptureFixture
) -> None:
    """An evict that raises a cancellation exception although the file did
    not cancel it: a failure, not the end of the other evictions (anyio would
    otherwise cancel the whole eviction task group)."""
    if anyio_backend[0] == "trio":
        pytest.skip("trio.Cancelled cannot be raised by user code")
    import asyncio

    caplog.set_level(logging.ERROR, logger="aiopgalloc.eviction")

    class Stray:
        async def evict(self, r: EvictableRange) -> None:
            await anyio.lowlevel.checkpoint()
            raise asyncio.CancelledError()

    async with memfile(MANUAL) as mf:
        stray, rec = Stray(), Recorder()
        mf.mark_evictable(stray, er(0, 1))
        mf.mark_evictable(stray, er(2, 3))
        for i in range(5):
            mf.mark_evictable(rec, er(2 * i, 2 * i + 1))
        mf.start_evictions()
        with anyio.fail_after(5):
            await mf.wait_for_evictions()
        assert ev_of(mf).failed == 2
        assert pages(rec.calls) == [0, 2, 4, 6, 8]
        mf.check_invariants()
        # The dispatcher still runs: a start from a thread is served.
        mf.mark_evictable(rec, er(20, 21))
        await anyio.to_thread.run_sync(mf.start_evictions)
        with anyio.fail_after(5):
            await mf.wait_for_evictions()
        assert rec.calls[-1] == er(20, 21)


async def test_hanging_evict_is_cancelled_when_the_file_closes() -> None:
    cancelled = []

    class Hanger:
        def __init__(self) -> None:
            self.entered = anyio.Event()

        async def evict(self, r: EvictableRange) -> None:
            self.entered.set()
            try:
                await anyio.sleep_forever()
            except BaseException:
                cancelled.append(r)
                raise

    hanger, rec = Hanger(), Recorder()
    with anyio.fail_after(5):
        async with memfile(MANUAL) as mf:
            mf.mark_evictable(hanger, er(0, 1))
            mf.mark_evictable(hanger, er(4, 5))
            mf.mark_evictable(rec, er(0, 1))
            mf.start_evictions()
            await hanger.entered.wait()
            with anyio.move_on_after(0.05) as waited:
                await mf.wait_for_evictions()
            assert waited.cancelled_caught
            assert rec.calls == [er(0, 1)]  # the others are not held up
            mf.check_invariants()
    ev = ev_of(mf)
    assert mf.closed
    assert cancelled == [er(4, 5)]
    assert ev.outstanding == 0 and ev.started == ev.finished
    ev.check()


async def test_evict_swallowing_the_files_cancellation_is_called_no_more() -> None:
    """A badly behaved evict that swallows the cancellation when the file
    closes: the task stops between two ranges instead of handing every
    remaining range to evict during shutdown."""

    class Swallower:
        def __init__(self) -> None:
            self.calls: list[EvictableRange] = []
            self.entered = anyio.Event()

        async def evict(self, r: EvictableRange) -> None:
            self.calls.append(r)
            self.entered.set()
            try:
                await anyio.sleep_forever()
            except anyio.get_cancelled_exc_class():
                return  # wrong, but it happens

    user = Swallower()
    with anyio.fail_after(5):
        async with memfile(MANUAL) as mf:
            for i in range(5):
                mf.mark_evictable(user, er(2 * i, 2 * i + 1))
            mf.start_evictions()
            await user.entered.wait()
    assert user.calls == [er(8, 9)]
    ev = ev_of(mf)
    assert ev.outstanding == 0 and ev.started == ev.finished == 1


async def test_hanging_evict_and_an_error_in_the_body() -> None:
    class Hanger:
        async def evict(self, r: EvictableRange) -> None:
            await anyio.sleep_forever()

    with anyio.fail_after(5):
        with pytest.raises(KeyError, match="boom"):
            async with memfile(MANUAL) as mf:
                mf.mark_evictable(Hanger(), er(0, 1))
                mf.start_evictions()
                await anyio.sleep(0.01)
                raise KeyError("boom")
    assert mf.closed


async def test_closing_with_evictions_queued_from_a_thread() -> None:
    """Tasks booked from a thread just before the file closes never run;
    their books are settled anyway."""
    with anyio.fail_after(5):
        async with memfile(MANUAL) as mf:
            rec = Recorder()
            mf.mark_evictable(rec, er(0, 1))
            t = threading.Thread(target=mf.start_evictions)
            t.start()
            t.join()
            assert ev_of(mf).outstanding == 1
    ev = ev_of(mf)
    assert ev.outstanding == 0 and ev.started == ev.finished == 1
    assert rec.calls == []
    ev.check()


# ------------------------------------------------------ wait_for_evictions


async def test_wait_for_evictions_waits_for_tasks_not_yet_running() -> None:
    async with memfile(MANUAL) as mf:
        users = [Recorder(f"u{i}") for i in range(3)]
        for u in users:
            for i in range(20):
                mf.mark_evictable(u, er(2 * i, 2 * i + 1))
        # Started from a plain thread: the tasks are only booked when the
        # thread ends; the loop has not run any of them yet.
        t = threading.Thread(target=mf.start_evictions)
        t.start()
        t.join()
        assert all(u.calls == [] for u in users)
        await mf.wait_for_evictions()
        for u in users:
            assert len(u.calls) == 20 and u.active == 0
        # The same through anyio's worker threads, with slow evicts.
        for u in users:
            u.gate = anyio.Event()
            mf.mark_evictable(u, er(100, 101))
        await anyio.to_thread.run_sync(mf.start_evictions)

        async def open_gates() -> None:
            await anyio.sleep(0.05)
            for u in users:
                assert u.gate is not None
                u.gate.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(open_gates)
            with anyio.fail_after(5):
                await mf.wait_for_evictions()
            for u in users:
                assert u.calls[-1] == er(100, 101) and u.active == 0
        mf.check_invariants()


async def test_wait_for_evictions_timeout_and_cancellation() -> None:
    async with memfile(MANUAL) as mf:
        assert await mf.wait_for_evictions() is None  # nothing started
        with pytest.warns(DeprecationWarning, match="cancel scope"):
            assert await mf.wait_for_evictions(timeout=0) is True
        rec = Recorder()
        rec.gate = anyio.Event()
        mf.mark_evictable(rec, er(0, 1))
        mf.mark_evictable(rec, er(2, 3))
        mf.start_evictions()
        with pytest.warns(DeprecationWarning, match="cancel scope"):
            assert await mf.wait_for_evictions(timeout=0) is False
        with pytest.warns(DeprecationWarning, match="cancel scope"):
            assert await mf.wait_for_evictions(timeout=-1) is False
        t0 = anyio.current_time()
        with pytest.warns(DeprecationWarning, match="cancel scope"):
            assert await mf.wait_for_evictions(timeout=0.05) is False
        assert anyio.current_time() - t0 >= 0.04
        # Cancelled by the caller's own scope, mid-eviction.
        with anyio.move_on_after(0.02) as scope:
            await mf.wait_for_evictions()
        assert scope.cancelled_caught
        mf.check_invariants()
        assert ev_of(mf).outstanding == 1
        rec.gate.set()
        with pytest.warns(DeprecationWarning, match="cancel scope"):
            assert await mf.wait_for_evictions(timeout=5) is True
        assert rec.calls == [er(2, 3), er(0, 1)]
        mf.check_invariants()


async def test_cancelling_a_waiter_while_evictions_finish() -> None:
    async with memfile(MANUAL) as mf:
        rec = Recorder()
        rec.gate = anyio.Event()
        mf.mark_evictable(rec, er(0, 1))
        mf.start_evictions()
        results: list[bool] = []

        async def waiter() -> None:
            await mf.wait_for_evictions()
            results.append(True)

        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter)
            tg.start_soon(waiter)
            await anyio.sleep(0.01)
            tg.cancel_scope.cancel()  # both waiters go away
        mf.check_invariants()
        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter)
            await anyio.sleep(0.01)
            rec.gate.set()
        assert results == [True]
        mf.check_invariants()


# ----------------------------------------------------------------- threads


async def test_marks_from_worker_threads_start_evictions_on_the_loop() -> None:
    async with memfile(DISABLED) as mf:
        cache = PageCache(mf)
        loop_thread = threading.get_ident()
        seen: list[int] = []
        original = cache.evict

        async def evict(r: EvictableRange) -> None:
            seen.append(threading.get_ident())
            await original(r)

        cache.evict = evict  # type: ignore[method-assign]
        # anyio's worker threads...
        await anyio.to_thread.run_sync(cache.put, 0)
        await wait_until(lambda: 0 not in cache.entries)
        # ...and a plain thread.
        t = threading.Thread(target=cache.put, args=(1,))
        t.start()
        t.join()
        with anyio.fail_after(5):
            await mf.wait_for_evictions()
        assert 1 not in cache.entries
        assert seen and set(seen) == {loop_thread}
        mf.check_invariants()


async def test_start_evictions_and_on_pressure_from_threads() -> None:
    async with memfile(MANUAL) as mf:
        rec = Recorder()
        mf.mark_evictable(rec, er(0, 1))
        await anyio.to_thread.run_sync(mf.start_evictions)
        await wait_until(lambda: len(rec.calls) == 1)
    async with memfile(ENABLED, pressure=True) as mf:
        rec = Recorder()
        mf.mark_evictable(rec, er(0, 4))
        ev = ev_of(mf)
        assert await anyio.to_thread.run_sync(ev.on_pressure, 2, 0.5) is True
        await wait_until(lambda: len(rec.calls) == 1)
        with anyio.fail_after(5):
            await mf.wait_for_evictions()
        assert rec.calls == [er(2, 4)]


# ------------------------------------------------------ graded eviction


async def test_graded_eviction_takes_a_share_from_the_end() -> None:
    async with memfile(ENABLED, pressure=True) as mf:
        ev = ev_of(mf)
        cache = PageCache(mf)
        for i in range(10):
            cache.put(i)  # one merged range [0, 10)
        assert ev.on_pressure(1, 0.3) is True
        with anyio.fail_after(5):
            await mf.wait_for_evictions()
        assert cache.evicted == [er(7, 10)]
        assert sorted(cache.entries) == list(range(7))
        mf.check_invariants()
        # 0.5 of 7 pages is 3.5: cut at a page boundary, 4 pages go.
        assert ev.on_pressure(2, 0.5) is True
        with anyio.fail_after(5):
            await mf.wait_for_evictions()
        assert cache.evicted[-1] == er(3, 7)
        # Full pressure takes the rest.
        assert ev.on_pressure(3) is True
        with anyio.fail_after(5):
            await mf.wait_for_evictions()
        assert cache.evicted[-1] == er(0, 3) and cache.entries == {}
        assert (ev.pressure_events, ev.max_pressure_level) == (3, 3)
        assert ev.on_pressure(1, 0.5) is False  # nothing left
        await mf.wait_for_reclaim()
        assert mf.total_usage() == 0
        mf.check_invariants()


async def test_graded_eviction_across_disjoint_ranges_and_users() -> None:
    async with memfile(ENABLED, pressure=True) as mf:
        ev = ev_of(mf)
        a, b = Recorder("a"), Recorder("b")
        for r in (er(0, 1), er(2, 3), er(4, 5), er(6, 7)):
            mf.mark_evictable(a, r)
        mf.mark_evictable(b, er(0, 1))
        assert ev.on_pressure(1, 0.5) is True
        with anyio.fail_after(5):
            await mf.wait_for_evictions()
        assert a.calls == [er(6, 7), er(4, 5)]  # half of a's 4 pages
        assert b.calls == [er(0, 1)]  # rounded up: a page at least
        assert ev.stats().evictable_bytes == 2 * P
        mf.check_invariants()


async def test_graded_allowance_grows_and_start_evictions_lifts_it() -> None:
    async with memfile(ENABLED, pressure=True) as mf:
        ev = ev_of(mf)
        rec = Recorder()
        rec.gate = anyio.Event()
        for i in range(10):
            mf.mark_evictable(rec, er(2 * i, 2 * i + 1))  # 10 one-page ranges
        ev.on_pressure(1, 0.2)  # 2 pages
        await rec.entered.wait()
        ev.on_pressure(1, 0.2)  # 1.8 more pages (of the 9 left) for the same task
        assert ev.started == 1
        mf.check_invariants()
        rec.gate.set()
        with anyio.fail_after(5):
            await mf.wait_for_evictions()
        assert pages(rec.calls) == [12, 14, 16, 18]
        # A graded task in flight turns into a full one on start_evictions.
        rec.gate = anyio.Event()
        rec.entered = anyio.Event()
        ev.on_pressure(1, 0.1)
        await rec.entered.wait()
        mf.start_evictions()
        rec.gate.set()
        with anyio.fail_after(5):
            await mf.wait_for_evictions()
        assert pages(rec.calls) == [0, 2, 4, 6, 8, 10, 12, 14, 16, 18]
        assert ev.started == 2
        mf.check_invariants()


# --------------------------------------------------------------- bad input


class NoEvict:
    pass


class SyncEvict:
    def evict(self, er: EvictableRange) -> None:
        pass


class EvictAttr:
    evict = 3


BAD_RANGES: list[tuple[object, type[Exception]]] = [
    (FileRange(0, P), TypeError),
    ((0, P), TypeError),
    ([0, P], TypeError),
    (None, TypeError),
    (EvictableRange(0.0, float(P)), TypeError),  # type: ignore[arg-type]
    (EvictableRange(True, P), TypeError),
    (EvictableRange("0", "1"), TypeError),  # type: ignore[arg-type]
    (EvictableRange(0, 0), ValueError),
    (EvictableRange(P, P), ValueError),
    (EvictableRange(2 * P, P), ValueError),
    (EvictableRange(-P, P), ValueError),
    (EvictableRange(-2 * P, -P), ValueError),
    (EvictableRange(0, (1 << 64) + 1), ValueError),
]

BAD_USERS: list[object] = [None, 3, NoEvict(), SyncEvict(), EvictAttr(), SyncEvict]


@pytest.mark.parametrize("mode", [DISABLED, MANUAL])
async def test_bad_input_raises_and_changes_nothing(mode: DelayedEviction) -> None:
    async with memfile(mode) as mf:
        ev = ev_of(mf)
        rec = Recorder()
        mf.mark_evictable(rec, er(0, 2))
        mf.mark_evictable(rec, er(4, 5))
        with anyio.fail_after(5):
            await mf.wait_for_evictions()
        before = ev.stats()
        calls_before = list(rec.calls)
        fresh = Recorder("fresh")
        for bad, exc in BAD_RANGES:
            for user in (rec, fresh):
                with pytest.raises(exc):
                    mf.mark_evictable(user, bad)  # type: ignore[arg-type]
                with pytest.raises(exc):
                    mf.mark_unevictable(user, bad)  # type: ignore[arg-type]
        for bad_user in BAD_USERS:
            with pytest.raises(TypeError):
                mf.mark_evictable(bad_user, er(0, 1))  # type: ignore[arg-type]
            with pytest.raises(TypeError):
                mf.mark_unevictable(bad_user, er(0, 1))  # type: ignore[arg-type]
            with pytest.raises(TypeError):
                mf.mark_all_unevictable(bad_user)  # type: ignore[arg-type]
        for level, fraction, exc in [
            ("1", 1.0, TypeError),
            (1.0, 1.0, TypeError),
            (True, 1.0, TypeError),
            (0, 1.0, ValueError),
            (-1, 1.0, ValueError),
            (1, "0.5", TypeError),
            (1, None, TypeError),
            (1, False, TypeError),
            (1, 0.0, ValueError),
            (1, -0.5, ValueError),
            (1, 1.5, ValueError),
            (1, math.nan, ValueError),
        ]:
            with pytest.raises(exc):
                ev.on_pressure(level, fraction)  # type: ignore[arg-type]
        for timeout, exc in [("1", TypeError), (True, TypeError), (math.nan, ValueError)]:
            with pytest.raises(exc), pytest.warns(DeprecationWarning):
                await mf.wait_for_evictions(timeout)  # type: ignore[arg-type]
        mf.check_invariants()
        assert ev.stats() == before
        assert ev.outstanding == 0
        await anyio.sleep(0.02)
        assert rec.calls == calls_before and fresh.calls == []


async def test_other_callable_forms_of_evict_are_accepted() -> None:
    from functools import partial
    from unittest.mock import AsyncMock

    class CallableEvict:
        async def __call__(self, r: EvictableRange) -> None:
            self.called = r

    async def evict_fn(tag: str, r: EvictableRange) -> None:
        seen.append((tag, r))

    seen: list[tuple[str, EvictableRange]] = []

    class WithPartial:
        def __init__(self) -> None:
            self.evict = partial(evict_fn, "partial")

    class WithCallable:
        def __init__(self) -> None:
            self.evict = CallableEvict()

    class WithMock:
        def __init__(self) -> None:
            self.evict = AsyncMock()

    async with memfile(MANUAL) as mf:
        users = [WithPartial(), WithCallable(), WithMock()]
        for u in users:
            mf.mark_evictable(u, er(0, 1))  # type: ignore[arg-type]
        mf.start_evictions()
        with anyio.fail_after(5):
            await mf.wait_for_evictions()
        assert seen == [("partial", er(0, 1))]
        assert users[1].evict.called == er(0, 1)  # type: ignore[attr-defined]
        users[2].evict.assert_awaited_once_with(er(0, 1))  # type: ignore[attr-defined]
        assert ev_of(mf).failed == 0


# ------------------------------------------------------------ closed file


async def test_eviction_calls_after_close_raise() -> None:
    from aiopgalloc import ClosedError

    async with memfile(MANUAL) as mf:
        rec = Recorder()
        mf.mark_evictable(rec, er(0, 1))
    with pytest.raises(ClosedError):
        mf.mark_evictable(rec, er(0, 1))
    with pytest.raises(ClosedError):
        mf.mark_unevictable(rec, er(0, 1))
    with pytest.raises(ClosedError):
        mf.mark_all_unevictable(rec)
    with pytest.raises(ClosedError):
        mf.start_evictions()
    with pytest.raises(ClosedError):
        await mf.wait_for_evictions()
    ev = ev_of(mf)
    ev.check()
    # The closed Evictions holds no users and starts nothing any more.
    assert ev.stats().users == 0
    assert ev.start_evictions() is False
    assert rec.calls == []


async def test_wait_for_evictions_from_an_evict_is_refused() -> None:
    errors: list[BaseException] = []

    class Impatient:
        def __init__(self, mf: MemoryFile) -> None:
            self.mf = mf

        async def evict(self, r: EvictableRange) -> None:
            try:
                await self.mf.wait_for_evictions()
            except RuntimeError as exc:
                errors.append(exc)
            # Other calls into the file are fine from here.
            if r.start == 0:
                self.mf.mark_evictable(self, er(50, 51))
            self.mf.start_evictions()

    with anyio.fail_after(5):
        async with memfile(MANUAL) as mf:
            user = Impatient(mf)
            mf.mark_evictable(user, er(0, 1))
            mf.start_evictions()
            with anyio.fail_after(5):
                await mf.wait_for_evictions()
            assert len(errors) == 2  # [0, 1), then [50, 51) marked from evict
            assert ev_of(mf).started == 1
            mf.check_invariants()


async def test_check_detects_broken_books() -> None:
    async with memfile(MANUAL) as mf:
        ev = ev_of(mf)
        rec = Recorder()
        mf.mark_evictable(rec, er(0, 1))
        mf.mark_evictable(rec, er(3, 4))
        ev.check()
        state = ev._users[id(rec)]
        breakages: list[tuple[Callable[[], object], Callable[[], object], str]] = [
            (
                lambda: setattr(ev, "_outstanding", 1),
                lambda: setattr(ev, "_outstanding", 0),
                "tasks outstanding",
            ),
            (
                lambda: setattr(state, "evicting", True),
                lambda: setattr(state, "evicting", False),
                "tasks outstanding",
            ),
            (
                lambda: setattr(state, "budget", 5),
                lambda: setattr(state, "budget", None),
                "idle user with a budget",
            ),
            (
                lambda: state.ranges.insert_without_merging(1 * P, 3 * P, None),
                lambda: state.ranges.remove_range(1 * P, 3 * P),
                "not merged",
            ),
            (
                lambda: setattr(ev, "started", ev.started + 1),
                lambda: setattr(ev, "started", ev.started - 1),
                "task counts",
            ),
        ]
        for corrupt, repair, what in breakages:
            corrupt()
            with pytest.raises(AssertionError, match=what):
                mf.check_invariants()
            repair()
            mf.check_invariants()
        state.ranges.clear()
        with pytest.raises(AssertionError, match="idle user with no ranges"):
            ev.check()
        del ev._users[id(rec)]
        ev.check()


@pytest.mark.parametrize(
    ("mode", "use_pressure"),
    [
        (DelayedEviction.DEFAULT, False),
        (ENABLED, False),
        (DISABLED, None),
        (MANUAL, None),
        (IDLE, None),
        (IDLE, True),
    ],
)
def test_a_pressure_source_the_file_would_not_listen_to_is_refused(
    mode: DelayedEviction, use_pressure: bool | None
) -> None:
    with pytest.raises(ValueError, match="pressure_source is given but"):
        MemoryFileOpts(
            delayed_eviction=mode,
            use_host_memcg_pressure=use_pressure,
            pressure_source=ManualPressure(),
        )


async def test_manual_pressure_alone_drives_the_default_file() -> None:
    """``pressure_source=ManualPressure()`` with nothing else: the file
    listens to it (no need to turn host pressure on as well)."""
    src = ManualPressure()
    async with open_memory_file(opts=MemoryFileOpts(pressure_source=src)) as mf:
        assert mf.stats().pressure_source == src.name
        cache = PageCache(mf)
        for i in range(3):
            cache.put(i)
        src.notify(PressureLevel.CRITICAL)
        await wait_until(lambda: not cache.entries)
        assert pages(cache.evicted) == [0, 1, 2]
