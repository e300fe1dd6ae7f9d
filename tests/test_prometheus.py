"""The Prometheus collector: figures read back from a real registry.

Every async test runs on asyncio, asyncio + uvloop and trio.  Skipped (with
the reason shown by ``-ra``) when prometheus_client is not installed.
"""

from __future__ import annotations

import gc

import anyio
import pytest
from helpers import fill_byte

pytest.importorskip(
    "prometheus_client",
    reason="prometheus_client is not installed (pip install 'aiopgalloc[prometheus]')",
)

from prometheus_client import CollectorRegistry, generate_latest

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
from aiopgalloc.host.pressure import ManualPressure, PressureLevel
from aiopgalloc.prometheus import MemoryFileCollector, register_collector

pytestmark = pytest.mark.anyio

P = PAGE_SIZE


def value(reg: CollectorRegistry, name: str, **labels: str) -> float | None:
    return reg.get_sample_value(name, labels)


async def test_allocations_frees_and_usage() -> None:
    reg = CollectorRegistry()
    async with open_memory_file() as mf:
        register_collector(mf, reg)
        assert value(reg, "aiopgalloc_allocations_total") == 0
        a = mf.allocate(4 * P)
        b = mf.allocate(8 * P, MemoryKind.PAGE_CACHE)
        mf.allocate(2 * P, MemoryKind.TMPFS)
        fill_byte(mf, a, 1)
        fill_byte(mf, FileRange(b.start, b.start + 3 * P), 2)
        await mf.update_usage()
        assert value(reg, "aiopgalloc_allocations_total") == 3
        assert value(reg, "aiopgalloc_live_bytes") == 14 * P
        assert value(reg, "aiopgalloc_segments") == 4  # b: committed + uncommitted part
        assert value(reg, "aiopgalloc_file_size_bytes") == mf.total_size()
        assert value(reg, "aiopgalloc_usage_bytes", kind="anonymous") == 4 * P
        assert value(reg, "aiopgalloc_usage_bytes", kind="page_cache") == 3 * P
        assert value(reg, "aiopgalloc_usage_bytes", kind="tmpfs") == 0
        assert value(reg, "aiopgalloc_committed_bytes") == 7 * P
        assert value(reg, "aiopgalloc_known_committed_bytes") == 7 * P
        free_gap = value(reg, "aiopgalloc_largest_free_gap_bytes")
        assert free_gap == mf.total_size() - 14 * P

        mf.dec_ref(b)
        assert value(reg, "aiopgalloc_live_bytes") == 6 * P
        backlog = value(reg, "aiopgalloc_release_backlog_bytes")
        freed = value(reg, "aiopgalloc_freed_bytes")
        releasing = value(reg, "aiopgalloc_releasing_bytes")
        assert backlog == 8 * P and freed is not None and releasing is not None
        assert freed + releasing == backlog
        await mf.wait_for_reclaim()
        assert value(reg, "aiopgalloc_release_backlog_bytes") == 0
        assert (value(reg, "aiopgalloc_releases_total") or 0) >= 1
        assert value(reg, "aiopgalloc_released_bytes_total") == 8 * P
        assert value(reg, "aiopgalloc_committed_bytes") == 4 * P

        # Recycling: free written pages and take them again at once.
        mf.dec_ref(a)
        assert mf.allocate(4 * P) == a
        assert value(reg, "aiopgalloc_recycled_bytes_total") == 4 * P
        assert b"aiopgalloc_usage_bytes" in generate_latest(reg)


async def test_evictions_counted() -> None:
    class User:
        def __init__(self, mf: MemoryFile, fr: FileRange, fail: bool) -> None:
            self.mf, self.fr, self.fail = mf, fr, fail

        async def evict(self, er: EvictableRange) -> None:
            if self.fail:
                raise RuntimeError("cannot evict")
            self.mf.dec_ref(self.fr)

    reg = CollectorRegistry()
    opts = MemoryFileOpts(delayed_eviction=DelayedEviction.MANUAL)
    async with open_memory_file(opts=opts) as mf:
        register_collector(mf, reg)
        good = User(mf, mf.allocate(4 * P), fail=False)
        bad = User(mf, mf.allocate(2 * P), fail=True)
        mf.mark_evictable(good, EvictableRange(0, 4 * P))
        mf.mark_evictable(bad, EvictableRange(0, 2 * P))
        assert value(reg, "aiopgalloc_evictable_bytes") == 6 * P
        assert value(reg, "aiopgalloc_evictable_users") == 2
        assert value(reg, "aiopgalloc_evictions_started_total") == 0
        mf.start_evictions()
        with anyio.fail_after(5):
            await mf.wait_for_evictions()
        assert value(reg, "aiopgalloc_evictions_started_total") == 2
        assert value(reg, "aiopgalloc_evictions_finished_total") == 2
        assert value(reg, "aiopgalloc_evictions_failed_total") == 1
        assert value(reg, "aiopgalloc_evict_calls_total") == 2
        assert value(reg, "aiopgalloc_evicted_bytes_total") == 4 * P
        assert value(reg, "aiopgalloc_evictions_outstanding") == 0
        assert value(reg, "aiopgalloc_evictable_bytes") == 0
        assert value(reg, "aiopgalloc_live_bytes") == 2 * P


async def test_pressure_notifications_by_level() -> None:
    source = ManualPressure()
    opts = MemoryFileOpts(
        delayed_eviction=DelayedEviction.ENABLED,
        use_host_memcg_pressure=True,
        pressure_source=source,
    )
    reg = CollectorRegistry()
    async with open_memory_file(opts=opts) as mf:
        register_collector(mf, reg, prefix="pg")
        assert value(reg, "pg_pressure_notifications_total", level="low") == 0
        source.notify(PressureLevel.LOW)
        with anyio.fail_after(5):
            while value(reg, "pg_pressure_notifications_total", level="low") != 1:
                await anyio.sleep(0.01)
        source.notify(PressureLevel.CRITICAL)
        with anyio.fail_after(5):
            while value(reg, "pg_pressure_notifications_total", level="critical") != 1:
                await anyio.sleep(0.01)
        assert value(reg, "pg_pressure_notifications_total", level="medium") == 0


async def test_closed_file_yields_no_samples() -> None:
    reg = CollectorRegistry()
    async with open_memory_file() as mf:
        collector = register_collector(mf, reg)
        mf.allocate(P)
        assert value(reg, "aiopgalloc_live_bytes") == P
    assert value(reg, "aiopgalloc_live_bytes") is None
    assert list(collector.collect()) == []
    assert b"aiopgalloc_live_bytes" not in generate_latest(reg).replace(b"# ", b"#")
    del mf
    gc.collect()
    assert list(collector.collect()) == []  # the file is gone: weakly held


async def test_registration_rules() -> None:
    reg = CollectorRegistry()
    async with open_memory_file() as a, open_memory_file() as b:
        register_collector(a, reg)
        with pytest.raises(ValueError, match="Duplicated"):
            register_collector(b, reg)
        other = register_collector(b, reg, prefix="second")
        b.allocate(3 * P)
        assert value(reg, "second_live_bytes") == 3 * P
        assert value(reg, "aiopgalloc_live_bytes") == 0
        reg.unregister(other)
        assert value(reg, "second_live_bytes") is None
        with pytest.raises(ValueError, match="not a valid"):
            MemoryFileCollector(a, prefix="has space")
        with pytest.raises(TypeError):
            MemoryFileCollector(object())  # type: ignore[arg-type]
