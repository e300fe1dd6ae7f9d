"""A release batch whose punch and whose fallback both fail.

The releaser punches freed pages (``fallocate``) and, where a punch fails,
zeroes them by hand (``memset``).  When both fail the batch did nothing: the
pages must be booked exactly as before the batch (freed, known committed,
accounted as ``SYSTEM``), and the releaser retries; once the host recovers
the release completes and the accounting returns to 0.

The pages were found committed by a usage scan first, so that the books
have something to get wrong (the committed flag of the waste, the
``SYSTEM`` bytes, the known-committed total).  Public API plus the fault
seam only.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from typing import Any

import anyio
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
from aiopgalloc.host.faults import faults

pytestmark = pytest.mark.anyio

P = PAGE_SIZE
H = HUGE_PAGE_SIZE
OPTS = MemoryFileOpts(chunk_size=H, delayed_eviction=DelayedEviction.MANUAL)


@pytest.fixture(autouse=True)
def _no_leftover_faults() -> Iterator[None]:
    faults.reset()
    yield
    faults.reset()


def write(mf: MemoryFile, fr: FileRange, byte: int) -> None:
    for v in mf.map_internal(fr):
        v[:] = bytes([byte]) * len(v)
        v.release()


def pread_all(fd: int, fr: FileRange) -> bytes:
    """Read through the fd: no mapping, no fault op."""
    out = []
    pos = fr.start
    while pos < fr.end:
        chunk = os.pread(fd, fr.end - pos, pos)
        assert chunk
        out.append(chunk)
        pos += len(chunk)
    return b"".join(out)


def books(mf: MemoryFile) -> tuple[str, Any, dict[str, int]]:
    """Everything a batch that did nothing must leave as it was: the usage
    and freed sets, the accounting, and the figures of the books."""
    st = mf.stats()
    figures = {
        k: getattr(st, k)
        for k in (
            "known_committed_bytes",
            "live_bytes",
            "freed_bytes",
            "releasing_bytes",
            "release_backlog",
            "segments",
            "releases",
            "bytes_released",
            "recycled_bytes",
            "allocations",
            "file_size",
        )
    }
    return str(mf), mf.accounting.snapshot(), figures


# 4 pages: a small batch, punched on the event loop; 2 MiB: a long run,
# punched at once in the releaser's thread.
@pytest.mark.parametrize("pages", [4, H // P], ids=["inline", "thread"])
async def test_punch_and_fallback_fail_then_books_are_as_before(pages: int) -> None:
    async with open_memory_file(opts=OPTS) as mf:
        keep = mf.allocate(P, MemoryKind.PAGE_CACHE)
        fr = mf.allocate(pages * P)
        write(mf, keep, 0x11)
        write(mf, fr, 0xAB)
        await mf.update_usage()
        acct = mf.accounting.snapshot()
        assert (acct.anonymous, acct.page_cache, acct.system) == (fr.length, P, 0)

        faults.inject("fallocate", errno.EIO)
        faults.inject("memset", errno.ENOMEM)
        mf.dec_ref(fr)
        # Before any batch: freed, still known committed, counted as SYSTEM.
        before = books(mf)
        mf.check_invariants()
        assert before[1].system == fr.length and before[1].anonymous == 0
        assert f"[{fr.start:#x}, {fr.end:#x}) freed committed" in before[0]
        assert before[2]["freed_bytes"] == fr.length

        # Wait until a batch has tried both the punch and the fallback, and
        # has been settled (nothing is releasing).  The releaser takes its
        # next batch only on the event loop, after its back-off, so the
        # snapshot below (no await) sees a settled state.
        with anyio.fail_after(10):
            while not (faults.calls("memset") >= 1 and mf.stats().releasing_bytes == 0):
                await anyio.sleep(0.002)
        assert faults.calls("fallocate") >= 1
        after = books(mf)
        assert after == before, "a release batch that did nothing changed the books"
        mf.check_invariants()
        # And the memory is really still there, its bytes untouched.
        assert mf.total_usage() == P + fr.length
        assert pread_all(mf.fd, fr) == b"\xab" * fr.length

        # The host recovers: the retry releases the pages.
        faults.reset()
        with anyio.fail_after(10):
            await mf.wait_for_reclaim()
        acct = mf.accounting.snapshot()
        assert (acct.system, acct.anonymous, acct.page_cache) == (0, 0, P)
        assert mf.total_usage() == P
        st = mf.stats()
        assert st.known_committed_bytes == P
        assert st.bytes_released - before[2]["bytes_released"] == fr.length
        mf.check_invariants()
        mf.dec_ref(keep)
        with anyio.fail_after(10):
            await mf.wait_for_reclaim()
        assert mf.accounting.snapshot().total == 0
        assert mf.total_usage() == 0
        mf.check_invariants()
