"""The release path: dec_ref's fast path and the releaser's policy (punch
long freed runs at once, leave lone short frees until the frees pause)."""

from __future__ import annotations

import anyio
import pytest
from helpers import mapping_of

from aiopgalloc import (
    PAGE_SIZE,
    ClosedError,
    DelayedEviction,
    EvictableRange,
    FileRange,
    MemoryFileOpts,
    RefCountError,
    _releaser,
    open_memory_file,
)
from aiopgalloc._books import RUN_BYTES
from aiopgalloc._releaser import QUIET
from aiopgalloc.host.pressure import ManualPressure, PressureLevel

pytestmark = pytest.mark.anyio

P = PAGE_SIZE
RUN_PAGES = RUN_BYTES // P


def write(mf: object, fr: FileRange, byte: int) -> None:
    for v in mf.map_internal(fr):  # type: ignore[attr-defined]
        v[:] = bytes([byte]) * len(v)


@pytest.mark.parametrize(
    ("fr", "exc"),
    [
        (FileRange(True, P), TypeError),
        (FileRange(0, float(P)), TypeError),  # type: ignore[arg-type]
        (FileRange(P, 0), ValueError),
        (FileRange(P, P), ValueError),
        (FileRange(1, P + 1), ValueError),
        (FileRange(-P, P), ValueError),
        (FileRange(0, 1 << 63), ValueError),
        ((0, P), TypeError),  # a plain tuple takes the full check: not a FileRange
        (EvictableRange(0, P), TypeError),  # a user's own offsets, not the file's
        (FileRange(0, P), None),
        ([0, P], TypeError),
    ],
)
async def test_dec_ref_checks_its_argument_as_before(fr: object, exc: type | None) -> None:
    async with open_memory_file() as mf:
        mf.allocate(2 * P)
        before = str(mf)
        if exc is None:
            mf.dec_ref(fr)  # type: ignore[arg-type]
        else:
            with pytest.raises(exc):
                mf.dec_ref(fr)  # type: ignore[arg-type]
            assert str(mf) == before
        mf.check_invariants()


async def test_dec_ref_fast_path_errors_change_nothing() -> None:
    async with open_memory_file() as mf:
        fr = mf.allocate(4 * P)
        mf.dec_ref(FileRange(0, P))
        before, pending = str(mf), mf.reclaim_pending()
        with pytest.raises(RefCountError):
            mf.dec_ref(FileRange(0, P))  # double free
        with pytest.raises(RefCountError):
            mf.dec_ref(FileRange(0, 2 * P))  # half freed already
        with pytest.raises(RefCountError):
            mf.dec_ref(FileRange(8 * P, 9 * P))  # never allocated
        assert str(mf) == before and mf.reclaim_pending() == pending
        mf.check_invariants()
        mf.dec_ref(FileRange(P, fr.end))
        await mf.wait_for_reclaim()
        assert mf.total_usage() == 0
    with pytest.raises(ClosedError):
        mf.dec_ref(fr)


async def test_lone_frees_go_once_the_frees_pause() -> None:
    async with open_memory_file() as mf:
        frs = [mf.allocate(P) for _ in range(64)]
        write(mf, FileRange(0, 64 * P), 1)
        for fr in frs[::2]:
            mf.dec_ref(fr)
        assert mf.total_usage() == 64 * P
        # No wait_for_reclaim: the releaser lets them go after QUIET.
        with anyio.fail_after(5):
            while mf.reclaim_pending():
                await anyio.sleep(QUIET / 4)
        assert mf.total_usage() == 32 * P
        mf.check_invariants()


async def test_a_long_free_is_released_without_waiting() -> None:
    # The releaser's policy itself is pinned by tests/test_books.py; here a
    # run of 2 MiB goes while the frees go on (no pause, no flush).
    async with open_memory_file() as mf:
        fr = mf.allocate(2 * RUN_BYTES)
        keep = [mf.allocate(P) for _ in range(64)]
        write(mf, fr, 1)
        mf.dec_ref(fr)
        with anyio.fail_after(10):
            while mf.total_usage():
                await anyio.sleep(0)  # well under QUIET between wake-ups
        for k in keep:
            mf.dec_ref(k)
        await mf.wait_for_reclaim()
        mf.check_invariants()


async def test_interleaved_frees_release_in_few_batches() -> None:
    async with open_memory_file() as mf:
        n = 8 * RUN_PAGES
        frs = [mf.allocate(P) for _ in range(n)]
        write(mf, FileRange(0, n * P), 1)
        releases = mf.stats().releases
        for i, fr in enumerate([*frs[::2], *frs[1::2]], 1):
            mf.dec_ref(fr)
            if i % 100 == 0:
                await anyio.sleep(0)
        with anyio.fail_after(10):
            await mf.wait_for_reclaim()
        assert mf.total_usage() == 0
        # Merged runs, not one punch per page.
        assert mf.stats().releases - releases < n // 100
        mf.check_invariants()


async def test_lone_frees_go_after_max_defer_however_busy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_releaser, "QUIET", 60.0)  # the frees never pause here
    monkeypatch.setattr(_releaser, "MAX_DEFER", 0.05)
    async with open_memory_file() as mf:
        frs = [mf.allocate(P) for _ in range(512)]
        write(mf, FileRange(0, 512 * P), 1)
        lone = iter(frs[::2])
        for _ in range(16):
            mf.dec_ref(next(lone))
        with anyio.fail_after(5):
            while mf.total_usage() > (512 - 16) * P:
                mf.dec_ref(next(lone))  # one more lone free every 5 ms
                await anyio.sleep(0.005)
        mf.check_invariants()


async def test_host_pressure_releases_lone_frees_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_releaser, "QUIET", 60.0)  # the frees never pause here
    monkeypatch.setattr(_releaser, "MAX_DEFER", 60.0)
    source = ManualPressure()
    opts = MemoryFileOpts(
        delayed_eviction=DelayedEviction.ENABLED,
        use_host_memcg_pressure=True,
        pressure_source=source,
    )
    async with open_memory_file(opts=opts) as mf:
        frs = [mf.allocate(P) for _ in range(64)]
        write(mf, FileRange(0, 64 * P), 1)
        for fr in frs[::2]:
            mf.dec_ref(fr)
        await anyio.sleep(0.1)
        assert mf.total_usage() == 64 * P  # the lone frees wait to merge
        source.notify(PressureLevel.LOW)
        with anyio.fail_after(5):
            while mf.total_usage() != 32 * P:
                await anyio.sleep(0.005)
        assert mf.stats().freed_bytes == 0
        mf.check_invariants()


def _puncher_threads() -> list[str]:
    import threading

    return [t.name for t in threading.enumerate() if t.name == "aiopgalloc-releaser"]


async def test_closing_during_a_threaded_release_waits_for_it() -> None:
    async with open_memory_file() as mf:
        fr = mf.allocate(512 << 20)
        mapping_of(mf).populate(fr.start, fr.length)  # the punch takes ~60 ms
        mf.dec_ref(fr)
        # Let the releaser start the punch in its thread, then leave at once.
        with anyio.fail_after(10):
            while not mf.stats().releasing_bytes and mf.reclaim_pending():
                await anyio.sleep(0)
        assert mf.stats().releasing_bytes
    assert mf.closed
    assert _puncher_threads() == []


async def test_the_puncher_thread_ends_with_the_file() -> None:
    async with open_memory_file() as mf:
        frs = [mf.allocate(4 * RUN_PAGES * P) for _ in range(4)]
        for fr in frs:
            write(mf, fr, 1)
            mf.dec_ref(fr)
        await mf.wait_for_reclaim()
        assert mf.total_usage() == 0
    assert _puncher_threads() == []
