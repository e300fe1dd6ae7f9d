"""The file's exact size after growth, and zero-filling of recycled pages.

Growth: the file grows by whole chunks, to the smallest whole number of
chunks that covers the allocation; never more.  ``total_size()``,
``stats().file_size`` and the kernel's ``st_size`` all say so.

Recycling: an allocation that lands on freed pages the releaser has not
returned yet zeroes them by hand.  Pages known to be committed (a usage
scan saw them) are memset; the others are probed first.  Either way the
new allocation reads as zeros, and ``stats().recycled_bytes`` counts them.
The free and the allocation happen with no ``await`` in between, so the
releaser cannot return the pages first: the allocation really recycles.

Public API only.
"""

from __future__ import annotations

import os

import pytest

from aiopgalloc import (
    HUGE_PAGE_SIZE,
    PAGE_SIZE,
    DelayedEviction,
    FileRange,
    MemoryFile,
    MemoryFileOpts,
    MemoryKind,
    open_memory_file,
)
from aiopgalloc.options import DEFAULT_CHUNK_SIZE

pytestmark = pytest.mark.anyio

P = PAGE_SIZE
H = HUGE_PAGE_SIZE


def sizes(mf: MemoryFile) -> tuple[int, int, int]:
    return mf.total_size(), mf.stats().file_size, os.fstat(mf.fd).st_size


def pread(mf: MemoryFile, fr: FileRange) -> bytes:
    return os.pread(mf.fd, fr.length, fr.start)


async def test_growth_is_exactly_whole_chunks() -> None:
    c = H  # the smallest chunk size allowed
    async with open_memory_file(opts=MemoryFileOpts(chunk_size=c)) as mf:
        assert sizes(mf) == (c, c, c)  # one chunk from the start
        a = mf.allocate(c - P)
        assert a == FileRange(0, c - P) and sizes(mf) == (c, c, c)
        b = mf.allocate(P)  # ends exactly at the chunk's end: no growth
        assert b == FileRange(c - P, c) and sizes(mf) == (c, c, c)
        d = mf.allocate(c)  # a whole chunk, ending exactly at 2 chunks
        assert d == FileRange(c, 2 * c) and sizes(mf) == (2 * c,) * 3
        e = mf.allocate(P)  # one page past a chunk boundary: one more chunk
        assert e == FileRange(2 * c, 2 * c + P) and sizes(mf) == (3 * c,) * 3
        # A huge allocation (aligned to HUGE_PAGE_SIZE) of 5 chunks and a
        # page: from 3 chunks to exactly 9 (the next whole chunk past its end).
        f = mf.allocate(5 * c + P)
        assert f == FileRange(3 * c, 8 * c + P) and sizes(mf) == (9 * c,) * 3
        # Room inside the file: no growth at all.
        g = mf.allocate(c - 2 * P)
        assert g == FileRange(2 * c + P, 3 * c - P) and sizes(mf) == (9 * c,) * 3
        mf.check_invariants()


async def test_growth_with_the_default_chunk_size() -> None:
    c = DEFAULT_CHUNK_SIZE
    async with open_memory_file() as mf:
        assert sizes(mf) == (c, c, c)
        mf.allocate(P)
        assert sizes(mf) == (c, c, c)
        big = mf.allocate(c)  # aligned to HUGE_PAGE_SIZE, right after the page
        assert big == FileRange(H, H + c)
        assert sizes(mf) == (2 * c,) * 3
        mf.check_invariants()


@pytest.mark.parametrize("kind", [MemoryKind.ANONYMOUS, MemoryKind.PAGE_CACHE], ids=["anon", "pc"])
async def test_recycled_known_committed_pages_read_as_zero(kind: MemoryKind) -> None:
    opts = MemoryFileOpts(chunk_size=H, delayed_eviction=DelayedEviction.MANUAL)
    async with open_memory_file(opts=opts) as mf:
        keep = mf.allocate(P)
        fr = mf.allocate(8 * P)
        for v in mf.map_internal(FileRange(keep.start, fr.end)):
            v[:] = bytes(range(256)) * (len(v) // 256)
            v.release()
        await mf.update_usage()  # the pages are now known committed
        assert mf.accounting.snapshot().anonymous == fr.length + P
        recycled_before = mf.stats().recycled_bytes
        mf.dec_ref(fr)  # freed, not released: no await before the next line
        again = mf.allocate(fr.length, kind)
        assert again == fr, "first fit should land on the freed pages"
        st = mf.stats()
        assert st.recycled_bytes - recycled_before == fr.length
        assert pread(mf, again) == bytes(fr.length), "recycled pages were not zeroed"
        # Still committed (zeroed in place), now counted as the new kind.
        assert st.usage[kind] == fr.length + (P if kind is MemoryKind.ANONYMOUS else 0)
        assert st.usage.system == 0
        assert st.known_committed_bytes == fr.length + P
        assert mf.total_usage() == fr.length + P
        mf.check_invariants()
        mf.dec_ref(again)
        mf.dec_ref(keep)
        await mf.wait_for_reclaim()
        assert mf.total_usage() == 0


@pytest.mark.parametrize("written", ["all", "last-page"])
async def test_recycled_pages_not_known_committed_read_as_zero(written: str) -> None:
    opts = MemoryFileOpts(chunk_size=H, delayed_eviction=DelayedEviction.MANUAL)
    async with open_memory_file(opts=opts) as mf:
        keep = mf.allocate(P)
        fr = mf.allocate(8 * P)
        dirty = fr if written == "all" else FileRange(fr.end - P, fr.end)
        for v in mf.map_internal(dirty):
            v[:] = b"\xee" * len(v)
            v.release()
        recycled_before = mf.stats().recycled_bytes
        mf.dec_ref(fr)
        again = mf.allocate(fr.length)
        assert again == fr
        assert mf.stats().recycled_bytes - recycled_before == fr.length
        assert pread(mf, again) == bytes(fr.length)
        assert mf.accounting.snapshot().total == 0  # nothing was known committed
        mf.check_invariants()
        mf.dec_ref(again)
        mf.dec_ref(keep)
        await mf.wait_for_reclaim()
        assert mf.total_usage() == 0
