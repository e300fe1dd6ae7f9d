"""Pressure coalescing and the pressure -> watcher -> eviction plumbing,
on every machine (no root, no cgroup: the sources are fed by code).

Coalescing (``aiopgalloc.host.epoll.CoalescingFdSource``): between two
deliveries at most one notification is pending, with the *highest* level
seen.  With ``min_interval`` a wake that comes too soon is held back, and
whatever arrives before the interval is over is merged in after the sleep.
So critical followed by low within the interval delivers critical, not the
latest level.  The tests make "low arrives right after critical was taken"
happen at the one place it matters, from inside the source's ``_collect``
(the hook a subclass implements, per ``CoalescingFdSource``'s docstring),
instead of racing a timer.  They record every ``_collect`` call to check
that the delayed path really ran; the only way it cannot is a stall of the
whole process longer than ``min_interval``, which they retry.

What tests/test_pressure_wiring.py and tests/test_host_pressure.py already
cover with ``ManualPressure``: delivery from threads, storms, highest level
among notifications pending together in the source, fractions low=0.25 /
medium=0.5 / critical with one notification of each level, the modes that
listen.  Gaps filled here: the per-level counters of ``stats()`` with a
different count per level (one of each cannot tell the levels apart),
graded shares that are not whole pages (rounded up, cut at a page), the
evicted bytes in ``stats().evictions``, notifications with nothing left to
evict, a notification made before the file opened, and ``min_interval``
coalescing through ``MemoryFileOpts(pressure_source=...)``.
"""

from __future__ import annotations

from collections.abc import Callable

import anyio
import pytest

from aiopgalloc import (
    PAGE_SIZE,
    DelayedEviction,
    EvictableRange,
    FileRange,
    MemoryFile,
    MemoryFileOpts,
    MemoryKind,
    open_memory_file,
)
from aiopgalloc.host.epoll import CoalescingFdSource, drain_eventfd, new_eventfd, signal_eventfd
from aiopgalloc.host.pressure_sources import ManualPressure, PressureEvent, PressureLevel

pytestmark = pytest.mark.anyio

P = PAGE_SIZE
LOW, MEDIUM, CRITICAL = PressureLevel.LOW, PressureLevel.MEDIUM, PressureLevel.CRITICAL
ATTEMPTS = 3  # runs of a min_interval scenario, in case the process stalls


# ------------------------------------------------------------------ sources


class Scripted(CoalescingFdSource[tuple[int, int]]):
    """A source whose ``_collect`` answers come from a script: each call
    takes the next ``(level, count)`` (``(0, 0)`` when the script is empty).
    ``wake()`` makes the fd readable.  Every call is recorded."""

    def __init__(self, min_interval: float) -> None:
        super().__init__("scripted", min_interval=min_interval)
        self.script: list[tuple[int, int]] = []
        self.collects: list[tuple[bool, tuple[int, int]]] = []
        self._efd = -1

    def _setup(self) -> int:
        self._efd = self._own_fd(new_eventfd())
        return self._efd

    def _collect(self, woken: bool) -> tuple[int, int]:
        drain_eventfd(self._efd)
        answer = self.script.pop(0) if self.script else (0, 0)
        self.collects.append((woken, answer))
        return answer

    def _event(self, level: int, count: int) -> tuple[int, int]:
        return level, count

    def wake(self, *answers: tuple[int, int]) -> None:
        self.script.extend(answers)
        signal_eventfd(self._efd)


class LowRightAfterCritical(ManualPressure):
    """A ManualPressure where, each time a collect takes CRITICAL, a LOW
    notification arrives right after (from inside the collect: before the
    source can deliver or sleep).  Every collect is recorded."""

    def __init__(self, min_interval: float) -> None:
        super().__init__("late-low", min_interval=min_interval)
        self.collects: list[tuple[bool, tuple[int, int]]] = []

    def _collect(self, woken: bool) -> tuple[int, int]:
        answer = super()._collect(woken)
        self.collects.append((woken, answer))
        if answer[0] == CRITICAL:
            self.notify(LOW)
        return answer


def delayed_collect_ran(collects: list[tuple[bool, tuple[int, int]]]) -> bool:
    """Whether a collect ran after a min_interval sleep (woken False) and
    found something."""
    return any(not woken and answer[1] > 0 for woken, answer in collects)


async def next_event(src: object, timeout: float = 10.0) -> object:
    with anyio.fail_after(timeout):
        return await src.__anext__()  # type: ignore[attr-defined]


# ---------------------------------------------------------------- coalescing


async def test_coalescing_keeps_the_highest_level_not_the_latest() -> None:
    async with Scripted(min_interval=0.5) as src:
        for _ in range(ATTEMPTS):
            src.wake((LOW, 1))
            assert await next_event(src) == (LOW, 1)
            src.collects.clear()
            # The next wake comes within min_interval: its CRITICAL is taken,
            # the source sleeps out the interval, then takes a LOW.
            src.wake((CRITICAL, 1), (LOW, 1))
            event = await next_event(src)
            if delayed_collect_ran(src.collects):
                assert src.collects == [(True, (CRITICAL, 1)), (False, (LOW, 1))]
                assert event == (CRITICAL, 2), "coalescing kept the latest level"
                return
            # Stalled past min_interval: no sleep happened, try again.
            src.script.clear()
    pytest.fail("the process stalled past min_interval in every attempt")


async def test_manual_pressure_critical_then_low_within_the_interval() -> None:
    async with LowRightAfterCritical(min_interval=0.5) as src:
        for _ in range(ATTEMPTS):
            src.notify(MEDIUM)
            assert await next_event(src) == PressureEvent(MEDIUM, "late-low", 1)
            src.collects.clear()
            src.notify(CRITICAL)
            event = await next_event(src)
            if delayed_collect_ran(src.collects):
                assert event == PressureEvent(CRITICAL, "late-low", 2)
                return
            assert event == PressureEvent(CRITICAL, "late-low", 1)
            assert await next_event(src) == PressureEvent(LOW, "late-low", 1)
    pytest.fail("the process stalled past min_interval in every attempt")


# ---------------------------------------------------------------- plumbing


class Cache:
    """An evictable user holding one page per slot; slot ``i`` is at user
    offsets ``[i * P, (i + 1) * P)``.  ``evict`` frees the slots."""

    def __init__(self, mf: MemoryFile, slots: int) -> None:
        self.mf = mf
        self.entries: dict[int, FileRange] = {}
        self.calls: list[EvictableRange] = []
        for slot in range(slots):
            fr = mf.allocate(P, MemoryKind.PAGE_CACHE)
            v = mf.map_internal(fr)[0]
            v[:8] = slot.to_bytes(8, "little")
            v.release()
            self.entries[slot] = fr
        mf.mark_evictable(self, EvictableRange(0, slots * P))

    async def evict(self, er: EvictableRange) -> None:
        self.calls.append(er)
        for slot in range(er.start // P, er.end // P):
            fr = self.entries.pop(slot, None)
            if fr is not None:
                self.mf.dec_ref(fr)


def opts_with(source: object, *, low: float = 1.0, medium: float = 1.0) -> MemoryFileOpts:
    return MemoryFileOpts(
        delayed_eviction=DelayedEviction.ENABLED,
        use_host_memcg_pressure=True,
        pressure_source=source,
        evict_fraction_low=low,
        evict_fraction_medium=medium,
    )


async def wait_until(cond: Callable[[], object], timeout: float = 10.0) -> None:
    with anyio.fail_after(timeout):
        while not cond():
            await anyio.sleep(0.002)


def levels(mf: MemoryFile) -> tuple[int, int, int]:
    st = mf.stats()
    return st.pressure_low, st.pressure_medium, st.pressure_critical


async def test_counters_per_level_and_graded_shares_rounded_up() -> None:
    source = ManualPressure()
    async with open_memory_file(opts=opts_with(source, low=0.5, medium=0.25)) as mf:
        cache = Cache(mf, 16)

        async def deliver(level: PressureLevel, counts: tuple[int, int, int]) -> None:
            n = sum(counts)
            source.notify(level)
            await wait_until(lambda: mf.stats().evictions.pressure_events == n)
            assert levels(mf) == counts
            with anyio.fail_after(10):
                await mf.wait_for_evictions()

        # LOW: half of 16 pages, from the end.
        await deliver(LOW, (1, 0, 0))
        assert sorted(cache.entries) == list(range(8))
        # MEDIUM: a quarter of 8 pages.
        await deliver(MEDIUM, (1, 1, 0))
        assert sorted(cache.entries) == list(range(6))
        # MEDIUM: a quarter of 6 pages is 1.5 pages: rounded up, cut at a
        # page boundary, so 2 pages go.
        await deliver(MEDIUM, (1, 2, 0))
        assert sorted(cache.entries) == list(range(4))
        assert cache.calls[-1] == EvictableRange(4 * P, 6 * P)
        # CRITICAL: everything left, whatever the fractions.
        await deliver(CRITICAL, (1, 2, 1))
        assert cache.entries == {}
        # Nothing left to evict: still counted, no new eviction.
        calls = len(cache.calls)
        await deliver(CRITICAL, (1, 2, 2))
        await deliver(CRITICAL, (1, 2, 3))
        assert len(cache.calls) == calls
        ev = mf.stats().evictions
        assert (ev.pressure_events, ev.max_pressure_level) == (6, CRITICAL)
        assert ev.evicted_bytes == 16 * P
        assert ev.evictable_bytes == 0
        await mf.wait_for_reclaim()
        assert mf.total_usage() == 0
        mf.check_invariants()


async def test_a_notification_made_before_the_file_opened_is_delivered() -> None:
    source = ManualPressure()
    source.notify(MEDIUM)
    async with open_memory_file(opts=opts_with(source)) as mf:
        await wait_until(lambda: levels(mf) == (0, 1, 0))
        ev = mf.stats().evictions
        assert (ev.pressure_events, ev.max_pressure_level) == (1, MEDIUM)


async def test_critical_then_low_within_min_interval_evicts_as_critical() -> None:
    """Through the whole stack: LOW (a quarter), then CRITICAL with a LOW
    right behind it inside ``min_interval``.  The watcher must get one
    CRITICAL notification (everything evicted), not a LOW one (a quarter)."""
    source = LowRightAfterCritical(min_interval=1.0)
    async with open_memory_file(opts=opts_with(source, low=0.25, medium=0.25)) as mf:
        cache = Cache(mf, 16)
        source.notify(LOW)
        await wait_until(lambda: levels(mf) == (1, 0, 0))
        source.collects.clear()
        source.notify(CRITICAL)  # within min_interval of the LOW delivery
        await wait_until(lambda: levels(mf) != (1, 0, 0))
        with anyio.fail_after(10):
            await mf.wait_for_evictions()
        if not delayed_collect_ran(source.collects):
            pytest.fail("the process stalled for more than min_interval (1 s)")
        assert levels(mf) == (1, 0, 1), "the LOW behind the CRITICAL replaced it"
        assert cache.entries == {}
        ev = mf.stats().evictions
        assert (ev.pressure_events, ev.max_pressure_level) == (2, CRITICAL)
        assert ev.evicted_bytes == 16 * P
        mf.check_invariants()


async def test_a_graded_share_is_at_least_the_share() -> None:
    """A share a hair over two pages (8192.5 bytes of 6 pages) evicts three
    pages: "at least the share", rounded up before the cut, never down."""
    fraction = 8192.5 / (6 * P)
    source = ManualPressure()
    async with open_memory_file(opts=opts_with(source, medium=fraction)) as mf:
        cache = Cache(mf, 6)
        source.notify(MEDIUM)
        await wait_until(lambda: mf.stats().evictions.pressure_events == 1)
        with anyio.fail_after(10):
            await mf.wait_for_evictions()
        assert cache.calls == [EvictableRange(3 * P, 6 * P)]
        assert sorted(cache.entries) == [0, 1, 2]
        assert mf.stats().evictions.evictable_bytes == 3 * P
