"""Host memory pressure wired into the allocator: options -> source -> watcher
-> ``Evictions.on_pressure`` -> ``await user.evict(er)``.

Every async test runs on asyncio, asyncio+uvloop and trio (conftest.py).  The
caches below really hold allocations in the memory file and give them back
with ``dec_ref`` when evicted, so "evicted" is checked against committed
memory as well as against the calls.  Pressure comes from a
``ManualPressure`` here (real kernel pressure is in test_pressure_e2e.py),
except where a test is about the real sources the host offers.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import pytest
from helpers import open_fds

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
from aiopgalloc.eviction_api import EvictionStats
from aiopgalloc.host import cgroup, pressure
from aiopgalloc.host.cgroup import create_child_memcg, current_memory_cgroup, remove_child
from aiopgalloc.host.pressure import (
    CgroupV1Pressure,
    ManualPressure,
    NoPressureSourceError,
    PressureLevel,
    PressureSourceBase,
    PsiTrigger,
    SystemdPressureWatch,
)

pytestmark = pytest.mark.anyio

P = PAGE_SIZE
MEMCG = current_memory_cgroup()
IS_ROOT = os.geteuid() == 0
HOST_PSI = Path("/proc/pressure/memory")

needs_root_v1 = pytest.mark.skipif(
    MEMCG is None or MEMCG.version != 1 or not IS_ROOT,
    reason="needs root and the cgroup v1 memory controller",
)

LABELS = [
    "systemd MEMORY_PRESSURE_WATCH",
    "cgroup v1 memory.pressure_level",
    "cgroup v2 memory.pressure (PSI)",
    "cgroup v2 memory.events",
    "host-wide /proc/pressure/memory (PSI)",
]


class Cache:
    """An evictable memory user that really holds memory.

    Slot ``i`` is one allocation of one page, written with a stamp, and sits
    at user offsets ``[i * P, (i + 1) * P)``; ``evict`` frees (``dec_ref``)
    the slots of the range it is given and records the call.
    """

    def __init__(self, mf: MemoryFile, name: str) -> None:
        self.mf = mf
        self.name = name
        self.entries: dict[int, FileRange] = {}
        self.calls: list[EvictableRange] = []

    def __repr__(self) -> str:
        return f"Cache({self.name!r})"

    def fill(self, slots: range | list[int], *, evictable: bool = True) -> None:
        for slot in slots:
            fr = self.mf.allocate(P, MemoryKind.PAGE_CACHE)
            for view in self.mf.map_internal(fr):
                view[:8] = slot.to_bytes(8, "little")
                view.release()
            self.entries[slot] = fr
            if evictable:
                self.mf.mark_evictable(self, EvictableRange(slot * P, (slot + 1) * P))

    async def evict(self, er: EvictableRange) -> None:
        self.calls.append(er)
        for slot in range(er.start // P, er.end // P):
            fr = self.entries.pop(slot, None)
            if fr is not None:
                self.mf.dec_ref(fr)

    @property
    def evicted_slots(self) -> set[int]:
        return {s for er in self.calls for s in range(er.start // P, er.end // P)}


def ev_stats(mf: MemoryFile) -> EvictionStats:
    return mf.stats().evictions


def opts_with(
    source: object,
    *,
    mode: DelayedEviction = DelayedEviction.ENABLED,
    low: float = 1.0,
    medium: float = 1.0,
) -> MemoryFileOpts:
    """Options that ask for host pressure, from ``source`` (None: the host's)."""
    return MemoryFileOpts(
        delayed_eviction=mode,
        use_host_memcg_pressure=True,
        pressure_source=source,
        evict_fraction_low=low,
        evict_fraction_medium=medium,
    )


async def wait_until(cond: Callable[[], object], timeout: float = 5.0) -> None:
    with anyio.fail_after(timeout):
        while not cond():
            await anyio.sleep(0.002)


async def committed(mf: MemoryFile) -> int:
    await mf.wait_for_reclaim()
    await mf.update_usage()
    return mf.total_usage()


@pytest.fixture
def no_source_anywhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Make every pressure source the chooser knows fail on this host."""
    monkeypatch.delenv("MEMORY_PRESSURE_WATCH", raising=False)
    monkeypatch.delenv("MEMORY_PRESSURE_WRITE", raising=False)
    monkeypatch.setattr(cgroup, "current_memory_cgroup", lambda pid="self": None)
    monkeypatch.setattr(cgroup, "unified_cgroup_dir", lambda pid="self": None)
    monkeypatch.setattr(pressure, "HOST_PSI_MEMORY", tmp_path / "no-psi-here")
    return tmp_path


# -- the happy path ---------------------------------------------------------------


async def test_nothing_is_evicted_before_a_notification() -> None:
    source = ManualPressure()
    async with open_memory_file(opts=opts_with(source)) as mf:
        caches = [Cache(mf, f"c{i}") for i in range(3)]
        for c in caches:
            c.fill(range(16))
        assert source.is_open  # the watcher entered it
        assert mf.should_cache_evictable()
        # The releaser running out of work is what evicts in ENABLED mode
        # without host pressure; with it, only a notification may.
        await mf.wait_for_reclaim()
        await anyio.sleep(0.2)
        assert [c.calls for c in caches] == [[], [], []]
        assert all(len(c.entries) == 16 for c in caches)
        assert ev_stats(mf).pressure_events == 0
        assert await committed(mf) == 48 * P
        mf.check_invariants()
    assert not source.is_open


async def test_a_low_notification_evicts_everything_by_default() -> None:
    source = ManualPressure()
    async with open_memory_file(opts=opts_with(source)) as mf:
        caches = [Cache(mf, f"c{i}") for i in range(3)]
        for c in caches:
            c.fill(range(16))
        assert await committed(mf) == 48 * P
        source.notify(PressureLevel.LOW)
        await wait_until(lambda: all(not c.entries for c in caches))
        with anyio.fail_after(5):
            await mf.wait_for_evictions()
        for c in caches:
            # Touching ranges merged: one call for the whole cache.
            assert c.calls == [EvictableRange(0, 16 * P)]
        stats = ev_stats(mf)
        assert (stats.pressure_events, stats.max_pressure_level) == (1, PressureLevel.LOW)
        assert stats.evictable_bytes == 0
        assert await committed(mf) == 0
        mf.check_invariants()


async def test_graded_fractions_evict_shares_from_the_end() -> None:
    source = ManualPressure()
    opts = opts_with(source, low=0.25, medium=0.5)
    async with open_memory_file(opts=opts) as mf:
        solid = Cache(mf, "solid")  # 16 touching slots: one range of 16 pages
        solid.fill(range(16))
        sparse = Cache(mf, "sparse")  # 16 one-page ranges with pages in use between
        sparse.fill(range(0, 32, 2))
        sparse.fill(range(1, 32, 2), evictable=False)
        # LOW: a quarter of each user's evictable bytes, the last ones.
        source.notify(PressureLevel.LOW)
        await wait_until(lambda: solid.calls and len(sparse.calls) == 4)
        with anyio.fail_after(5):
            await mf.wait_for_evictions()
        assert solid.evicted_slots == set(range(12, 16))
        assert solid.calls == [EvictableRange(12 * P, 16 * P)]
        assert sparse.evicted_slots == {24, 26, 28, 30}
        assert ev_stats(mf).evictable_bytes == 24 * P
        # MEDIUM: half of what is left (6 of 12 pages each), again from the end.
        source.notify(PressureLevel.MEDIUM)
        await wait_until(lambda: len(solid.evicted_slots) == 10 and len(sparse.calls) == 10)
        with anyio.fail_after(5):
            await mf.wait_for_evictions()
        assert solid.evicted_slots == set(range(6, 16))
        assert sparse.evicted_slots == set(range(12, 32, 2))
        # CRITICAL: everything that is still evictable.
        source.notify(PressureLevel.CRITICAL)
        await wait_until(lambda: not solid.entries and len(sparse.calls) == 16)
        with anyio.fail_after(5):
            await mf.wait_for_evictions()
        assert sparse.evicted_slots == set(range(0, 32, 2))
        assert sorted(sparse.entries) == list(range(1, 32, 2))  # in use: kept
        stats = ev_stats(mf)
        assert (stats.pressure_events, stats.max_pressure_level) == (3, PressureLevel.CRITICAL)
        fs = mf.stats()
        assert (fs.pressure_low, fs.pressure_medium, fs.pressure_critical) == (1, 1, 1)
        assert stats.evictable_bytes == 0
        assert await committed(mf) == 16 * P
        mf.check_invariants()


async def test_notify_from_a_worker_thread() -> None:
    source = ManualPressure()
    async with open_memory_file(opts=opts_with(source)) as mf:
        cache = Cache(mf, "c")
        cache.fill(range(8))
        thread = threading.Thread(target=source.notify, args=(PressureLevel.MEDIUM,))
        thread.start()
        thread.join()
        await wait_until(lambda: not cache.entries)
        # And from anyio's own worker threads.
        cache.fill(range(8, 12))
        await anyio.to_thread.run_sync(source.notify)
        await wait_until(lambda: not cache.entries)
        with anyio.fail_after(5):
            await mf.wait_for_evictions()
        assert cache.evicted_slots == set(range(12))
        assert ev_stats(mf).pressure_events == 2
        assert await committed(mf) == 0


async def test_a_storm_of_notifications_coalesces() -> None:
    n = 10_000
    source = ManualPressure()
    async with open_memory_file(opts=opts_with(source)) as mf:
        caches = [Cache(mf, f"c{i}") for i in range(4)]
        for c in caches:
            c.fill(range(32))
        # On the loop's thread with no await in between: one delivery.
        for _ in range(n):
            source.notify(PressureLevel.LOW)
        await wait_until(lambda: all(not c.entries for c in caches))
        with anyio.fail_after(5):
            await mf.wait_for_evictions()
        assert ev_stats(mf).pressure_events == 1
        assert [len(c.calls) for c in caches] == [1, 1, 1, 1]

        # From a thread, while the loop runs: a few deliveries, and each
        # user is evicted by one task per refill, not one per notification.
        for c in caches:
            c.fill(range(32))

        def storm() -> None:
            for i in range(n):
                source.notify(PressureLevel.CRITICAL if i == n // 2 else PressureLevel.LOW)

        t0 = time.perf_counter()
        await anyio.to_thread.run_sync(storm)
        took = time.perf_counter() - t0
        await wait_until(lambda: all(not c.entries for c in caches))
        with anyio.fail_after(5):
            await mf.wait_for_evictions()
        await anyio.sleep(0.05)  # let the last wake be delivered
        stats = ev_stats(mf)
        rounds = stats.pressure_events - 1
        print(f"\n{n} notifies from a thread in {took * 1000:.0f} ms -> {rounds} eviction rounds")
        assert 1 <= rounds <= n // 50, rounds
        assert stats.max_pressure_level == PressureLevel.CRITICAL
        # The first round evicted everything; later rounds found nothing to
        # do: one task and one call per user in each phase.
        assert stats.started == 8
        assert [len(c.calls) for c in caches] == [2, 2, 2, 2]
        assert await committed(mf) == 0
        mf.check_invariants()


# -- which modes listen at all -----------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "pressure_opt", "give_source", "caches", "listening"),
    [
        (DelayedEviction.ENABLED, True, True, True, True),
        (DelayedEviction.DEFAULT, True, True, True, True),
        (DelayedEviction.DEFAULT, None, True, True, True),
        (DelayedEviction.ENABLED, False, False, True, False),
        (DelayedEviction.MANUAL, True, False, True, False),
        (DelayedEviction.MANUAL, False, False, True, False),
        (DelayedEviction.IDLE, None, False, False, False),
        (DelayedEviction.DISABLED, True, False, False, False),
    ],
)
async def test_should_cache_evictable_per_mode(
    mode: DelayedEviction,
    pressure_opt: bool | None,
    give_source: bool,
    caches: bool,
    listening: bool,
) -> None:
    source = ManualPressure()
    opts = MemoryFileOpts(
        delayed_eviction=mode,
        use_host_memcg_pressure=pressure_opt,
        pressure_source=source if give_source else None,
    )
    async with open_memory_file(opts=opts) as mf:
        assert mf.should_cache_evictable() is caches
        assert source.is_open is (give_source and listening)
        if not listening:
            assert mf.stats().pressure_source == ""


@pytest.mark.parametrize(
    "mode", [DelayedEviction.MANUAL, DelayedEviction.DISABLED, DelayedEviction.IDLE]
)
async def test_pressure_option_is_ignored_outside_enabled(
    mode: DelayedEviction, no_source_anywhere: Path
) -> None:
    # No source could be set up here, yet the file opens: in these modes the
    # option is ignored (as in the reference) and nothing is even tried.
    before = open_fds()
    async with open_memory_file(opts=opts_with(None, mode=mode)) as mf:
        assert mf.should_cache_evictable() is (mode is DelayedEviction.MANUAL)
        assert mf.stats().pressure_source == ""
        cache = Cache(mf, "c")
        cache.fill(range(4))
        await anyio.sleep(0.1)
        if mode is DelayedEviction.MANUAL:
            assert cache.calls == []  # only start_evictions() evicts
            mf.start_evictions()
        await wait_until(lambda: not cache.entries)  # DISABLED, IDLE: on their own
        with anyio.fail_after(5):
            await mf.wait_for_evictions()
        assert ev_stats(mf).pressure_events == 0
    # A source given to a mode that would not listen is refused, not ignored.
    with pytest.raises(ValueError, match="listens to no pressure"):
        opts_with(ManualPressure(), mode=mode)
    assert open_fds() == before


# -- choosing the host's source, and failing to ---------------------------------------


@needs_root_v1
async def test_without_a_source_the_hosts_best_is_used(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MEMORY_PRESSURE_WATCH", raising=False)
    caplog.set_level(logging.DEBUG, logger="aiopgalloc")  # the chooser's report
    before = open_fds()
    async with open_memory_file(opts=opts_with(None)) as mf:
        during = open_fds()
        assert mf.should_cache_evictable()
        kinds = sorted(os.readlink(f"/proc/self/fd/{fd}") for fd in during - before)
        # The memfd, the wake-ups, and the v1 source: an eventfd per level
        # (low, medium, critical) in a private epoll fd.
        assert kinds.count("anon_inode:[eventfd]") >= 3 + 1, kinds
        assert "anon_inode:[eventpoll]" in kinds
    lines = [r.getMessage() for r in caplog.records if "pressure source" in r.getMessage()]
    assert len(lines) == 5, lines
    assert f"pressure source: {LABELS[1]}: chosen (cgroup-v1:" in lines[1]
    assert open_fds() == before


async def test_no_source_at_all_fails_to_open(no_source_anywhere: Path) -> None:
    before = open_fds()
    with pytest.raises(NoPressureSourceError) as info:
        async with open_memory_file(opts=opts_with(None)):
            pytest.fail("opened without a pressure source")
    err = info.value
    assert type(err) is NoPressureSourceError  # itself, not in an ExceptionGroup
    assert [line.split(":")[0] for line in err.report] == LABELS
    assert "MEMORY_PRESSURE_WATCH is not set" in err.report[0]
    assert "no memory cgroup found" in err.report[1]
    assert "no cgroup2 file system is mounted" in err.report[2]
    assert str(no_source_anywhere / "no-psi-here") in err.report[4]
    for label in LABELS:
        assert label in str(err)
    assert open_fds() == before  # the memfd and the task fds are closed again


async def test_a_source_that_fails_to_open_fails_the_open(tmp_path: Path) -> None:
    before = open_fds()
    with pytest.raises(FileNotFoundError, match="cannot open PSI file"):
        async with open_memory_file(opts=opts_with(PsiTrigger(tmp_path / "memory.pressure"))):
            pytest.fail("opened with a broken pressure source")
    assert open_fds() == before


# -- closing, and sources that go away -------------------------------------------------


def _v1_source() -> CgroupV1Pressure:
    if MEMCG is None or MEMCG.version != 1 or not IS_ROOT:
        pytest.skip("needs root and the cgroup v1 memory controller")
    return CgroupV1Pressure(MEMCG.path)


def _psi_source() -> PsiTrigger:
    if not HOST_PSI.exists():
        pytest.skip("kernel without PSI")
    return PsiTrigger(HOST_PSI)


@pytest.mark.parametrize("kind", ["manual", "cgroup-v1", "psi-host"])
async def test_leaving_the_block_closes_every_source_fd(kind: str) -> None:
    makers: dict[str, Callable[[], PressureSourceBase]] = {
        "manual": ManualPressure,
        "cgroup-v1": _v1_source,
        "psi-host": _psi_source,
    }
    make = makers[kind]
    source = make()
    before = open_fds()
    async with open_memory_file(opts=opts_with(source)) as mf:
        assert source.is_open
        cache = Cache(mf, "c")
        cache.fill(range(4))
        inside = open_fds()
        assert len(inside - before) >= 2  # the memfd and the source, at least
    assert not source.is_open
    assert open_fds() == before
    # Leaving while an eviction is in flight closes everything too.
    source = make()
    gate = anyio.Event()

    class Slow(Cache):
        async def evict(self, er: EvictableRange) -> None:
            gate.set()
            await anyio.sleep(10)

    async with open_memory_file(opts=opts_with(source)) as mf:
        Slow(mf, "slow").fill(range(2))
        mf.start_evictions()
        with anyio.fail_after(5):
            await gate.wait()
    assert open_fds() == before


async def test_a_source_that_goes_away_is_logged_and_the_file_keeps_working(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # systemd's protocol over a real Unix socket: the peer closing ends the
    # source with PressureSourceGone.
    caplog.set_level(logging.WARNING, logger="aiopgalloc")
    path = tmp_path / "pressure.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    source = SystemdPressureWatch(path)
    try:
        async with open_memory_file(opts=opts_with(source)) as mf:
            conn, _ = server.accept()
            cache = Cache(mf, "c")
            cache.fill(range(8))
            conn.sendall(b"x")  # one real event first
            await wait_until(lambda: not cache.entries)
            conn.close()
            await wait_until(lambda: not source.is_open and caplog.records)
            (record,) = caplog.records
            assert "is gone" in record.getMessage() and source.name in record.getMessage()
            # The file works on: allocation, eviction by hand, release.
            cache.fill(range(8, 16))
            assert mf.should_cache_evictable()
            mf.start_evictions()
            await wait_until(lambda: not cache.entries)
            with anyio.fail_after(5):
                await mf.wait_for_evictions()
            assert cache.evicted_slots == set(range(16))
            assert await committed(mf) == 0
            mf.check_invariants()
    finally:
        server.close()


@pytest.fixture
def v1_child() -> Iterator[Path]:
    if MEMCG is None or MEMCG.version != 1 or not IS_ROOT:
        pytest.skip("needs root and the cgroup v1 memory controller")
    path = create_child_memcg(MEMCG, f"aiopgalloc_w{os.getpid()}_{time.monotonic_ns()}", 32 << 20)
    yield path
    if path.exists():
        remove_child(path)


@needs_root_v1
async def test_a_removed_cgroup_ends_the_watcher_not_the_file(
    v1_child: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="aiopgalloc")
    source = CgroupV1Pressure(v1_child)
    before = open_fds()
    async with open_memory_file(opts=opts_with(source)) as mf:
        cache = Cache(mf, "c")
        cache.fill(range(8))
        # Stand in for the kernel once: the eventfd of level low.
        os.eventfd_write(source.eventfds[PressureLevel.LOW], 1)
        await wait_until(lambda: not cache.entries)
        remove_child(v1_child)  # signals every registered eventfd: "gone"
        await wait_until(lambda: not source.is_open)
        assert any("is gone" in r.getMessage() for r in caplog.records)
        cache.fill(range(8))
        mf.start_evictions()
        await wait_until(lambda: not cache.entries)
        assert ev_stats(mf).pressure_events == 1
    assert open_fds() == before
