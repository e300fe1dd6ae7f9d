"""``mf.view(fr)``: one memoryview for any range of the file.

Inside one chunk, across chunks, ending at the file's end, after the file
grew (the views taken before growth stay valid), read-only, and held past
the file's close.  Every view is checked against the file's own bytes read
with ``os.pread`` on a dup of its fd, so the view really is the file.
"""

from __future__ import annotations

import gc
import os

import pytest

from aiopgalloc import (
    HUGE_PAGE_SIZE,
    PAGE_SIZE,
    AccessType,
    ClosedError,
    FileRange,
    MemoryFileOpts,
    open_memory_file,
)

pytestmark = pytest.mark.anyio

P = PAGE_SIZE
H = HUGE_PAGE_SIZE
SMALL = MemoryFileOpts(chunk_size=H)  # chunks of 2 MiB: crossing them is cheap


def pattern(n: int, seed: int) -> bytes:
    return bytes((seed + i * 7) & 0xFF for i in range(n))


async def test_view_inside_one_chunk_is_the_file() -> None:
    async with open_memory_file(opts=SMALL) as mf:
        fr = mf.allocate(3 * P)
        v = mf.view(fr)
        assert isinstance(v, memoryview) and len(v) == 3 * P and not v.readonly
        data = pattern(3 * P, 1)
        v[:] = data
        assert os.pread(mf.fd, 3 * P, fr.start) == data
        # The same bytes as map_internal's single view.
        (only,) = mf.map_internal(fr)
        assert bytes(only) == data
        del v, only
        mf.dec_ref(fr)


async def test_view_across_chunks_is_one_buffer() -> None:
    async with open_memory_file(opts=SMALL) as mf:
        fr = mf.allocate(3 * H + 5 * P)  # huge-aligned, crosses 3-4 chunks
        assert len(mf.map_internal(fr)) >= 3
        v = mf.view(fr)
        assert len(v) == fr.length
        data = pattern(fr.length, 3)
        v[:] = data
        assert os.pread(mf.fd, fr.length, fr.start) == data
        # Slices that straddle a chunk boundary read and write as one.
        b = (fr.start // H + 1) * H - fr.start
        v[b - 4 : b + 4] = b"ABCDEFGH"
        assert os.pread(mf.fd, 8, fr.start + b - 4) == b"ABCDEFGH"
        del v
        mf.dec_ref(fr)


async def test_view_ending_at_the_file_end_and_past_it() -> None:
    async with open_memory_file(opts=SMALL) as mf:
        fr = mf.allocate(P)
        size = mf.total_size()
        last = FileRange(size - P, size)
        v = mf.view(last)  # unallocated pages may be viewed, as in the reference
        v[-1] = 0x5A
        assert os.pread(mf.fd, 1, size - 1) == b"\x5a"
        with pytest.raises(ValueError):
            mf.view(FileRange(size - P, size + P))  # touching it would SIGBUS
        del v
        mf.dec_ref(fr)


async def test_views_survive_growth() -> None:
    async with open_memory_file(opts=SMALL) as mf:
        first = mf.allocate(P)
        before = mf.view(first)
        before[:4] = b"keep"
        size0 = mf.total_size()
        big = mf.allocate(4 * H)  # grows the file
        assert mf.total_size() > size0
        after = mf.view(big)
        after[-4:] = b"tail"
        assert bytes(before[:4]) == b"keep"  # the old view is still the file
        before[:4] = b"KEEP"
        assert os.pread(mf.fd, 4, first.start) == b"KEEP"
        assert os.pread(mf.fd, 4, big.end - 4) == b"tail"
        del before, after
        mf.dec_ref(first)
        mf.dec_ref(big)


async def test_read_only_view_refuses_writes() -> None:
    async with open_memory_file(opts=SMALL) as mf:
        fr = mf.allocate(2 * H)
        mf.view(fr)[:3] = b"abc"
        ro = mf.view(fr, AccessType.READ)
        assert ro.readonly and bytes(ro[:3]) == b"abc"
        with pytest.raises(TypeError):
            ro[0] = 1
        with pytest.raises(PermissionError):
            mf.view(fr, AccessType.EXECUTE)
        with pytest.raises(TypeError):
            mf.view((fr.start, fr.end))  # type: ignore[arg-type]
        del ro
        mf.dec_ref(fr)


async def test_a_held_view_survives_close() -> None:
    async with open_memory_file(opts=SMALL) as mf:
        fr = mf.allocate(H + P)
        v = mf.view(fr)
        ro = mf.view(fr, AccessType.READ)
        v[:5] = b"hello"
    assert bytes(v[:5]) == b"hello"
    v[-3:] = b"end"
    assert bytes(ro[-3:]) == b"end"  # still one mapping of one file
    with pytest.raises(ClosedError):
        mf.view(fr)
    del v, ro
    gc.collect()
