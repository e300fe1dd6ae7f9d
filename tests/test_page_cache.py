"""PageCache: the API, bad input, pressure shedding coldest-first, and the
races of issue 17, on every backend (asyncio, asyncio+uvloop, trio).

Each bad-input test snapshots the allocator (``State.of``) and the cache's
figures first and checks that the failed call changed neither.
"""

from __future__ import annotations

import array
import gc
import pickle
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
from helpers import State

from aiopgalloc import (
    PAGE_SIZE,
    AccessType,
    ClosedError,
    DelayedEviction,
    ManualPressure,
    MemoryFile,
    MemoryFileOpts,
    MemoryKind,
    PageCache,
    PageCacheStats,
    PinnedValue,
    PressureLevel,
    open_memory_file,
)
from aiopgalloc.page_cache import COPY_UNDER_LOCK_MAX

pytestmark = pytest.mark.anyio

P = PAGE_SIZE


@asynccontextmanager
async def cache_file(
    low: float = 1.0, medium: float = 1.0
) -> AsyncIterator[tuple[MemoryFile, ManualPressure]]:
    """A file that evicts only on ManualPressure (no host source)."""
    src = ManualPressure()
    opts = MemoryFileOpts(pressure_source=src, evict_fraction_low=low, evict_fraction_medium=medium)
    async with open_memory_file(opts=opts) as mf:
        yield mf, src


def value(key: int, length: int = 100, version: int = 0) -> bytes:
    """Bytes that say which key and version they belong to."""
    stamp = f"{key}:{version};".encode()
    return (stamp * (length // len(stamp) + 1))[:length]


def is_of(key: int, data: bytes) -> bool:
    """Whether ``data`` is a value of ``key`` (any version): exactly what
    ``value(key, len(data), version)`` gives for some version, including a
    short value cut inside its first stamp (``b"134:179"`` of version
    17962)."""
    head = f"{key}:".encode()
    if len(data) <= len(head):
        return head.startswith(data)
    if not data.startswith(head):
        return False
    version, sep, _ = data[len(head) :].partition(b";")
    if not version.isdigit():
        return False
    if not sep:
        return True  # cut before the first ';'
    stamp = head + version + b";"
    return data == (stamp * (len(data) // len(stamp) + 1))[: len(data)]


def snapshot(mf: MemoryFile, cache: PageCache) -> tuple[State, PageCacheStats]:
    return State.of(mf), cache.stats()


def assert_ledger(mf: MemoryFile, cache: PageCache) -> None:
    """With no eviction running, the cache's evictable bytes are its nbytes."""
    cache.check_invariants()
    mf.check_invariants()
    assert mf.stats().evictions.evictable_bytes == cache.nbytes


async def settle(mf: MemoryFile) -> None:
    with anyio.fail_after(10):
        await anyio.sleep(0.01)  # let the dispatcher pick the event up
        await mf.wait_for_evictions()


# ----------------------------------------------------------------- the API


async def test_put_get_delete_round_trip() -> None:
    async with cache_file() as (mf, _):
        cache = PageCache(mf, max_bytes=64 * P)
        assert len(cache) == 0 and cache.nbytes == 0 and cache.max_bytes == 64 * P
        assert cache.get("a") is None and cache.get_bytes("a") is None
        cache.put("a", value(1, 100))
        cache.put(("b", 2), value(2, 5000))
        assert len(cache) == 2 and "a" in cache and ("b", 2) in cache and "c" not in cache
        assert cache.nbytes == 3 * P  # 100 bytes: one page; 5000 bytes: two
        assert mf.accounting.snapshot()[MemoryKind.PAGE_CACHE] >= 0
        pinned = cache.get("a")
        assert isinstance(pinned, PinnedValue) and pinned.nbytes == 100
        with pinned as view:
            assert view.readonly and bytes(view) == value(1, 100)
            # The file's own pages, no copy: a write through the file shows.
            fr = cache._table["a"].fr
            assert fr is not None
            w = mf.view(fr, AccessType.WRITE)
            w[0] = ord("Z")
            assert view[0] == ord("Z")
            w[0] = ord("1")
            w.release()
            with pytest.raises(TypeError):
                view[0] = 0  # type: ignore[index]
        assert pinned.nbytes == 0
        assert cache.get_bytes(("b", 2)) == value(2, 5000)
        st = cache.stats()
        assert (st.hits, st.misses, st.entries, st.bytes_held, st.value_bytes, st.pinned) == (
            2,
            2,
            2,
            3 * P,
            5100,
            0,
        )
        assert 0 < st.hit_ratio < 1 and st.as_dict()["bytes_held"] == 3 * P
        assert cache.delete("a") is True and cache.delete("a") is False
        assert "a" not in cache and cache.nbytes == 2 * P
        assert_ledger(mf, cache)
        cache.clear()
        assert len(cache) == 0 and cache.nbytes == 0
        assert_ledger(mf, cache)
        assert mf.stats().live_bytes == 0


async def test_bytes_like_values_and_the_empty_value() -> None:
    async with cache_file() as (mf, _):
        cache = PageCache(mf, max_bytes=16 * P)
        cache.put(1, bytearray(b"xyz"))
        cache.put(2, memoryview(b"0123456789")[2:5])
        ints = array.array("i", range(10))
        cache.put(3, ints)
        cache.put(4, b"")
        assert cache.get_bytes(1) == b"xyz"
        assert cache.get_bytes(2) == b"234"
        assert cache.get_bytes(3) == ints.tobytes()
        assert cache.get_bytes(4) == b""
        pinned = cache.get(4)
        assert pinned is not None
        with pinned as view:
            assert view.nbytes == 0
        assert cache.nbytes == 3 * P and len(cache) == 4
        assert_ledger(mf, cache)


async def test_a_large_value_is_copied_out_pinned() -> None:
    async with cache_file() as (mf, _):
        cache = PageCache(mf, max_bytes=1 << 20)
        big = value(7, COPY_UNDER_LOCK_MAX + 1)
        cache.put("big", big)
        assert cache.get_bytes("big") == big
        assert cache.stats().pinned == 0
        assert mf.stats().live_bytes == cache.nbytes


async def test_replacing_a_key_frees_its_old_pages() -> None:
    async with cache_file() as (mf, _):
        cache = PageCache(mf, max_bytes=16 * P)
        cache.put("k", value(1, 3 * P))
        cache.put("k", value(1, 10, version=1))
        assert len(cache) == 1 and cache.nbytes == P
        assert cache.get_bytes("k") == value(1, 10, version=1)
        assert mf.stats().live_bytes == P
        assert_ledger(mf, cache)


async def test_capacity_eviction_is_sieve() -> None:
    """Values hit since the hand last passed survive; the oldest unvisited
    value goes first."""
    async with cache_file() as (mf, _):
        cache = PageCache(mf, max_bytes=4 * P)
        for k in range(4):
            cache.put(k, value(k))
        assert cache.get_bytes(0) is not None and cache.get_bytes(2) is not None
        cache.put(4, value(4))  # evicts 1 (0 was visited: spared, bit cleared)
        assert sorted(k for k in range(5) if k in cache) == [0, 2, 3, 4]
        cache.put(5, value(5))  # the hand goes on from 1's place: 2 visited, 3 goes
        assert sorted(k for k in range(6) if k in cache) == [0, 2, 4, 5]
        st = cache.stats()
        assert st.evicted_by_capacity == 2 and st.bytes_held == 4 * P
        # A value needing several pages pushes out as many as it needs.
        cache.put(6, value(6, 3 * P))
        assert cache.nbytes <= 4 * P and 6 in cache
        assert mf.stats().live_bytes == cache.nbytes
        assert_ledger(mf, cache)


async def test_ttl_expires_lazily() -> None:
    now = [100.0]
    async with cache_file() as (mf, _):
        cache = PageCache(mf, max_bytes=8 * P, clock=lambda: now[0])
        cache.put("short", value(1), ttl=5)
        cache.put("long", value(2), ttl=50.5)
        cache.put("forever", value(3))
        now[0] = 104.9
        assert "short" in cache and cache.get_bytes("short") == value(1)
        now[0] = 105.0
        assert "short" not in cache
        assert len(cache) == 3  # not freed until a call meets it
        assert cache.get("short") is None
        assert len(cache) == 2 and cache.nbytes == 2 * P
        st = cache.stats()
        assert st.expired == 1 and st.misses == 1
        now[0] = 1000.0
        assert cache.delete("long") is False  # expired: held, but no value
        assert cache.get_bytes("forever") == value(3)
        assert cache.stats().expired == 2
        assert_ledger(mf, cache)


# ------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "bad",
    ["text", 42, None, 3.5, object(), [1, 2]],
    ids=["str", "int", "None", "float", "object", "list"],
)
async def test_non_bytes_values_raise_type_error(bad: object) -> None:
    async with cache_file() as (mf, _):
        cache = PageCache(mf, max_bytes=8 * P)
        cache.put("k", b"old")
        before = snapshot(mf, cache)
        with pytest.raises(TypeError, match="bytes-like"):
            cache.put("k", bad)
        assert snapshot(mf, cache) == before
        assert cache.get_bytes("k") == b"old"


async def test_a_non_contiguous_buffer_raises_value_error() -> None:
    async with cache_file() as (mf, _):
        cache = PageCache(mf, max_bytes=8 * P)
        before = snapshot(mf, cache)
        strided = memoryview(bytes(range(10)))[::2]
        with pytest.raises(ValueError, match="contiguous"):
            cache.put("k", strided)
        assert snapshot(mf, cache) == before


async def test_a_value_larger_than_max_bytes_raises_value_error() -> None:
    async with cache_file() as (mf, _):
        cache = PageCache(mf, max_bytes=4 * P + 100)  # rounded down to 4 pages
        assert cache.max_bytes == 4 * P
        cache.put("small", b"x")
        before = snapshot(mf, cache)
        with pytest.raises(ValueError, match="more than max_bytes"):
            cache.put("big", bytes(4 * P + 1))
        assert snapshot(mf, cache) == before
        cache.put("exact", bytes(4 * P))  # fits: pushes "small" out
        assert "small" not in cache and cache.nbytes == 4 * P


async def test_unhashable_keys_raise_type_error() -> None:
    async with cache_file() as (mf, _):
        cache = PageCache(mf, max_bytes=8 * P)
        cache.put("k", b"v")
        before = snapshot(mf, cache)
        for call in (
            lambda: cache.put(["k"], b"v"),
            lambda: cache.get({"k": 1}),
            lambda: cache.get_bytes({1}),
            lambda: cache.delete(["k"]),
            lambda: ["k"] in cache,
        ):
            with pytest.raises(TypeError, match="unhashable"):
                call()
        assert snapshot(mf, cache) == before


@pytest.mark.parametrize(
    ("ttl", "exc"),
    [
        ("5", TypeError),
        (True, TypeError),
        (0, ValueError),
        (-1, ValueError),
        (float("nan"), ValueError),
        (float("inf"), ValueError),
    ],
)
async def test_bad_ttls_are_refused(ttl: Any, exc: type[Exception]) -> None:
    async with cache_file() as (mf, _):
        cache = PageCache(mf, max_bytes=8 * P)
        before = snapshot(mf, cache)
        with pytest.raises(exc, match="ttl"):
            cache.put("k", b"v", ttl=ttl)
        assert snapshot(mf, cache) == before


async def test_bad_constructor_arguments() -> None:
    async with cache_file() as (mf, _):
        with pytest.raises(TypeError, match="MemoryFile"):
            PageCache(object(), max_bytes=P)  # type: ignore[arg-type]
        for bad, exc in [
            (P - 1, ValueError),
            (0, ValueError),
            ((1 << 47) + P, ValueError),
            (True, TypeError),
            (float(P), TypeError),
        ]:
            with pytest.raises(exc, match="max_bytes"):
                PageCache(mf, max_bytes=bad)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="kind"):
            PageCache(mf, max_bytes=P, kind=2)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="evictable"):
            PageCache(mf, max_bytes=P, evictable=1)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="clock"):
            PageCache(mf, max_bytes=P, clock=5)  # type: ignore[arg-type]
    with pytest.raises(ClosedError):
        PageCache(mf, max_bytes=P)


async def test_a_pinned_value_is_used_once() -> None:
    async with cache_file() as (mf, _):
        cache = PageCache(mf, max_bytes=8 * P)
        cache.put("k", b"v")
        pinned = cache.get("k")
        assert pinned is not None
        with pinned, pytest.raises(RuntimeError, match="entered once"):
            pinned.__enter__()
        pinned.release()  # idempotent
        with pytest.raises(RuntimeError):
            pinned.__enter__()
        assert cache.stats().pinned == 0 and mf.stats().live_bytes == P


# --------------------------------------------------------- pins and races


async def test_a_deleted_key_stays_readable_until_exit() -> None:
    """Delete, replace and churn the cache while a reader holds a view: the
    bytes do not change (the pages are never recycled under it), and they
    are freed at the exit."""
    async with cache_file() as (mf, _):
        cache = PageCache(mf, max_bytes=8 * P)
        cache.put("k", value(1, 2 * P))
        pinned = cache.get("k")
        assert pinned is not None
        with pinned as view:
            assert cache.delete("k")
            for i in range(100):  # recycles every freed page it can
                cache.put(i % 5, value(i, 1 + i % P))
            cache.put("k", value(2, 2 * P))
            assert bytes(view) == value(1, 2 * P)
            assert mf.stats().live_bytes == cache.nbytes + 2 * P
            assert cache.stats().pinned == 1
        assert mf.stats().live_bytes == cache.nbytes
        assert cache.stats().pinned == 0
        with anyio.fail_after(10):
            await mf.wait_for_reclaim()
        assert_ledger(mf, cache)


async def test_eviction_never_frees_a_pinned_value() -> None:
    async with cache_file() as (mf, src):
        cache = PageCache(mf, max_bytes=8 * P)
        for k in range(8):
            cache.put(k, value(k, P))
        pinned = cache.get(0)
        assert pinned is not None
        with pinned as view:
            src.notify(PressureLevel.CRITICAL)
            await settle(mf)
            assert len(cache) == 0
            for k in range(8, 16):  # reuse everything freed
                cache.put(k, value(k, P))
            assert bytes(view) == value(0, P)
        assert mf.stats().live_bytes == cache.nbytes


async def test_a_handle_dropped_without_exit_gives_its_pin_back() -> None:
    async with cache_file() as (mf, _):
        cache = PageCache(mf, max_bytes=8 * P)
        cache.put("k", b"v")
        pinned = cache.get("k")
        assert pinned is not None
        cache.delete("k")
        assert mf.stats().live_bytes == P
        del pinned
        gc.collect()
        cache.put("other", b"w")  # the next call drops the orphaned pin
        assert mf.stats().live_bytes == P and cache.stats().pinned == 0


async def test_a_still_exported_view_keeps_its_pin_until_released() -> None:
    """A view whose buffer is still exported cannot be released: the pin is
    kept (the pages are not freed under the export) and retried later."""
    async with cache_file() as (mf, _):
        cache = PageCache(mf, max_bytes=8 * P)
        cache.put("k", value(1))
        pinned = cache.get("k")
        assert pinned is not None
        with pinned as view:
            export = pickle.PickleBuffer(view)
        cache.delete("k")
        cache.put("x", value(2))
        assert mf.stats().live_bytes == 2 * P  # still pinned
        assert bytes(export.raw()) == value(1)
        del export
        cache.put("y", value(3))  # retried and dropped
        assert mf.stats().live_bytes == 2 * P == cache.nbytes
        assert cache.stats().pinned == 0


async def test_closing_the_file_while_views_are_held() -> None:
    """Views stay valid after the close; every data call raises
    ClosedError; exiting a handle does not raise; figures still answer."""
    async with cache_file() as (mf, _):
        cache = PageCache(mf, max_bytes=8 * P)
        cache.put("k", value(1, 3 * P))
        cache.put("j", value(2))
        pinned = cache.get("k")
        assert pinned is not None
        view = pinned.__enter__()
        unentered = cache.get("j")
    assert mf.closed
    assert bytes(view) == value(1, 3 * P)
    for call in (
        lambda: cache.put("n", b"x"),
        lambda: cache.get("k"),
        lambda: cache.get_bytes("k"),
        lambda: cache.delete("k"),
        lambda: "k" in cache,
        cache.clear,
    ):
        with pytest.raises(ClosedError):
            call()
    pinned.__exit__(None, None, None)
    assert unentered is not None
    unentered.release()
    st = cache.stats()
    assert st.entries == 2 and st.pinned == 0 and len(cache) == 2 and cache.nbytes == 4 * P
    cache.check_invariants()


async def test_puts_racing_pressure_evictions_from_another_thread() -> None:
    """A thread puts and reads while the event loop sheds under pressure:
    every read sees its own key's bytes, and the books agree at the end."""
    async with cache_file(low=0.5) as (mf, src):
        cache = PageCache(mf, max_bytes=64 * P)
        errors: list[BaseException] = []
        stop = threading.Event()

        def writer() -> None:
            try:
                i = 0
                while not stop.is_set():
                    k = i % 200
                    cache.put(k, value(k, 1 + (i * 37) % (3 * P), version=i))
                    got = cache.get_bytes((i * 7) % 200)
                    assert got is None or is_of((i * 7) % 200, got)
                    i += 1
            except BaseException as exc:
                errors.append(exc)

        t = threading.Thread(target=writer)
        t.start()
        try:
            for n in range(40):
                src.notify(PressureLevel.LOW if n % 5 else PressureLevel.CRITICAL)
                await anyio.sleep(0.005)
                for k in range(0, 200, 17):
                    pinned = cache.get(k)
                    if pinned is not None:
                        with pinned as view:
                            assert is_of(k, bytes(view))
        finally:
            stop.set()
            await anyio.to_thread.run_sync(t.join)
        assert not errors, errors
        await settle(mf)
        assert cache.stats().evicted_by_pressure > 0
        assert mf.stats().live_bytes == cache.nbytes <= cache.max_bytes
        assert_ledger(mf, cache)


# ------------------------------------------------------------- pressure


async def fill_with_hot_tail(mf: MemoryFile, n: int) -> tuple[PageCache, list[int], list[int]]:
    """n one-page values; the last quarter (the highest file offsets, which
    address-order eviction would shed first) are hot."""
    cache = PageCache(mf, max_bytes=2 * n * P)
    for k in range(n):
        cache.put(k, value(k, P))
    hot = list(range(3 * n // 4, n))
    for k in hot:
        assert cache.get_bytes(k) is not None
    cold = list(range(3 * n // 4))
    return cache, hot, cold


@pytest.mark.parametrize(
    ("level", "fraction"), [(PressureLevel.LOW, 0.25), (PressureLevel.MEDIUM, 0.5)]
)
async def test_pressure_sheds_the_coldest_share(level: PressureLevel, fraction: float) -> None:
    async with cache_file(low=0.25, medium=0.5) as (mf, src):
        n = 64
        cache, hot, cold = await fill_with_hot_tail(mf, n)
        src.notify(level)
        await settle(mf)
        gone = [k for k in range(n) if k not in cache]
        assert len(gone) == int(n * fraction)
        assert gone == cold[: len(gone)]  # the oldest cold values, none of the hot
        assert all(k in cache for k in hot)
        st = cache.stats()
        assert st.evicted_by_pressure == len(gone) and st.evicted_by_capacity == 0
        assert cache.nbytes == (n - len(gone)) * P
        assert_ledger(mf, cache)
        # The shed pages go back to the kernel through the releaser.
        with anyio.fail_after(10):
            await mf.wait_for_reclaim()
        assert mf.stats().live_bytes == cache.nbytes
        assert mf.stats().freed_bytes == 0


async def test_critical_pressure_sheds_everything() -> None:
    async with cache_file(low=0.25, medium=0.5) as (mf, src):
        cache, _, _ = await fill_with_hot_tail(mf, 32)
        src.notify(PressureLevel.CRITICAL)
        await settle(mf)
        assert len(cache) == 0 and cache.nbytes == 0
        assert cache.stats().evicted_by_pressure == 32
        assert_ledger(mf, cache)


async def test_two_caches_on_one_file_each_shed_their_share() -> None:
    async with cache_file(low=0.5) as (mf, src):
        a = PageCache(mf, max_bytes=64 * P)
        b = PageCache(mf, max_bytes=64 * P)
        for k in range(20):
            a.put(k, value(k, P))
        for k in range(8):
            b.put(k, value(k, 2 * P))
        src.notify(PressureLevel.LOW)
        await settle(mf)
        assert (len(a), len(b)) == (10, 4)
        assert mf.stats().live_bytes == a.nbytes + b.nbytes
        assert mf.stats().evictions.evictable_bytes == a.nbytes + b.nbytes


async def test_start_evictions_on_a_manual_file() -> None:
    opts = MemoryFileOpts(delayed_eviction=DelayedEviction.MANUAL)
    async with open_memory_file(opts=opts) as mf:
        cache = PageCache(mf, max_bytes=16 * P)
        for k in range(8):
            cache.put(k, value(k))
        await anyio.sleep(0.01)
        assert len(cache) == 8  # MANUAL: kept until asked
        mf.start_evictions()
        await settle(mf)
        assert len(cache) == 0 and mf.stats().live_bytes == 0


async def test_a_cache_that_is_not_evictable_is_never_shed() -> None:
    async with cache_file() as (mf, src):
        cache = PageCache(mf, max_bytes=16 * P, evictable=False)
        for k in range(8):
            cache.put(k, value(k))
        assert mf.stats().evictions.evictable_bytes == 0
        src.notify(PressureLevel.CRITICAL)
        await settle(mf)
        assert len(cache) == 8
        cache.check_invariants()
