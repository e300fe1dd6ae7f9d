"""A usage scan that races with a release of the pages it is scanning.

``update_usage`` plans under the lock (which live pages to ask about, and the
commit sequence number), asks ``mincore`` in a worker thread without the
lock, and applies the answer under the lock, leaving out the pages punched
since the plan (see ``aiopgalloc.usage_scan``).  These tests hold the scan's
``mincore`` at the fault seam's gate while the test frees the pages, lets the
releaser punch them and allocates the same pages again without touching
them; then they let the scan go on.  The punched pages must not come back
as committed: the accounting and ``total_usage()`` both read 0.

Public API plus the fault seam only.
"""

from __future__ import annotations

from collections.abc import Iterator

import anyio
import pytest

from aiopgalloc import (
    HUGE_PAGE_SIZE,
    PAGE_SIZE,
    FileRange,
    MemoryFile,
    MemoryFileOpts,
    open_memory_file,
)
from aiopgalloc.host.faults import Gate, faults

pytestmark = pytest.mark.anyio

P = PAGE_SIZE
OPTS = MemoryFileOpts(chunk_size=HUGE_PAGE_SIZE)


@pytest.fixture(autouse=True)
def _no_leftover_faults() -> Iterator[None]:
    faults.reset()
    yield
    faults.reset()


def write(mf: MemoryFile, fr: FileRange, byte: int) -> None:
    for v in mf.map_internal(fr):
        v[:] = bytes([byte]) * len(v)
        v.release()


async def reached(gate: Gate) -> None:
    """Wait (off the loop) until a call is held at ``gate``."""
    assert await anyio.to_thread.run_sync(gate.wait_reached, 10.0), f"{gate.op} never reached"


async def _layout(mf: MemoryFile) -> tuple[FileRange, FileRange]:
    """Two live ranges not known committed, with a clean page between them,
    so that the scan asks about them in two ``mincore`` calls, ``a`` first.
    ``a`` is written (resident), ``b`` never touched."""
    a = mf.allocate(16 * P)
    sep = mf.allocate(P)
    b = mf.allocate(16 * P)
    assert (a.end, sep.end) == (sep.start, b.start)
    mf.dec_ref(sep)
    await mf.wait_for_reclaim()
    write(mf, a, 0xA5)
    assert mf.total_usage() == a.length
    assert mf.accounting.snapshot().total == 0
    return a, b


async def _free_punch_and_take_again(mf: MemoryFile, a: FileRange) -> None:
    """Free ``a``, have it punched, allocate the same pages again untouched."""
    mf.dec_ref(a)
    await mf.wait_for_reclaim()
    assert mf.total_usage() == 0
    again = mf.allocate(a.length)
    assert again == a  # first fit: the very same pages, clean now


async def test_scan_holding_stale_residency_across_a_release_counts_nothing() -> None:
    """The scan has read ``a``'s residency (resident) and is held before its
    second ``mincore``; meanwhile ``a`` is freed, punched and allocated again
    untouched.  Applying the stale answer must leave ``a`` out."""
    async with open_memory_file(opts=OPTS) as mf:
        a, b = await _layout(mf)
        async with anyio.create_task_group() as tg:
            with faults.gated("mincore") as first:
                tg.start_soon(mf.update_usage)
                await reached(first)  # held before a's mincore
                # The held call has left the table: a second gate catches
                # the scan's next mincore, the one for b.
                with faults.gated("mincore") as second:
                    first.open()
                    await reached(second)  # a's residency is read: resident
                    await _free_punch_and_take_again(mf, a)
                    stale = mf.stats()
                    assert stale.known_committed_bytes == 0
                    assert mf.accounting.snapshot().total == 0
        # The scan has applied its answer.
        assert mf.accounting.snapshot().total == 0, "punched pages counted as committed"
        assert mf.stats().known_committed_bytes == 0
        assert mf.total_usage() == 0
        mf.check_invariants()
        # A later scan has nothing to find; once a is really written it does.
        await mf.update_usage()
        assert mf.accounting.snapshot().total == 0
        write(mf, a, 0x5A)
        await mf.update_usage()
        assert mf.accounting.snapshot().anonymous == a.length == mf.total_usage()
        mf.check_invariants()
        mf.dec_ref(a)
        mf.dec_ref(b)
        await mf.wait_for_reclaim()
        assert mf.total_usage() == 0 and mf.accounting.snapshot().total == 0


async def test_scan_held_before_any_mincore_across_a_release_counts_nothing() -> None:
    """The brief's own order: the scan is planned, held before its first
    ``mincore``; ``a`` is freed, punched and allocated again untouched; the
    scan goes on.  Nothing is committed and nothing may be counted."""
    async with open_memory_file(opts=OPTS) as mf:
        a, b = await _layout(mf)
        async with anyio.create_task_group() as tg:
            with faults.gated("mincore") as gate:
                tg.start_soon(mf.update_usage)
                await reached(gate)
                await _free_punch_and_take_again(mf, a)
        assert mf.accounting.snapshot().total == 0
        assert mf.total_usage() == 0
        assert mf.stats().known_committed_bytes == 0
        mf.check_invariants()
        mf.dec_ref(a)
        mf.dec_ref(b)
        await mf.wait_for_reclaim()
        assert mf.total_usage() == 0
