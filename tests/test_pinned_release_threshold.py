"""The releaser's long-run threshold, at its exact boundary.

The releaser punches at once the freed runs of at least ``RUN_BYTES`` that
``dec_ref`` noted (a free that is that long by itself, or that merged with
other freed pages); lone short frees wait until the frees pause (``QUIET``)
and then go all together (see ``aiopgalloc.reclaim``).

How these tests see "at once" without racing a 20 ms timer: every batch is
sent to the releaser's thread (``release_inline_max_bytes=0``), and the
fault seam's gate holds the first punch of the first batch the releaser
takes after the frees.  While it is held the releaser cannot take another
batch, so ``stats().releasing_bytes`` is exactly that first batch and
``stats().freed_bytes`` what it left waiting.  A lone canary page freed
together with the run tells the two policies apart: a run taken at once
leaves the canary waiting; a pause flush takes the canary too.  The frees
happen with no ``await`` between them and the releaser idle before them, so
its first pass sees all of them, whatever the machine's load.

Public API plus the fault seam; ``RUN_BYTES`` is the module constant the
brief names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import anyio
import pytest

from aiopgalloc import (
    HUGE_PAGE_SIZE,
    PAGE_SIZE,
    DelayedEviction,
    FileRange,
    MemoryFile,
    MemoryFileOpts,
    open_memory_file,
)
from aiopgalloc._books import RUN_BYTES
from aiopgalloc.host.faults import faults

pytestmark = pytest.mark.anyio

P = PAGE_SIZE
RUN = RUN_BYTES
OPTS = MemoryFileOpts(
    chunk_size=HUGE_PAGE_SIZE,
    delayed_eviction=DelayedEviction.MANUAL,
    release_inline_max_bytes=0,  # every batch goes to the releaser's thread
)


@pytest.fixture(autouse=True)
def _no_leftover_faults() -> Iterator[None]:
    faults.reset()
    yield
    faults.reset()


def write(mf: MemoryFile, fr: FileRange, byte: int) -> None:
    for v in mf.map_internal(fr):
        v[:] = bytes([byte]) * len(v)
        v.release()


async def first_batch(mf: MemoryFile, free: Callable[[], None]) -> tuple[int, int]:
    """Call ``free`` (synchronous) with the releaser idle; hold the first
    punch of the releaser's next batch; return (bytes in that batch, bytes
    it left waiting)."""
    st = mf.stats()
    assert st.release_backlog == 0, "the releaser must start idle"
    with faults.gated("fallocate") as gate:
        free()
        assert await anyio.to_thread.run_sync(gate.wait_reached, 10.0), "nothing was released"
        st = mf.stats()
    return st.releasing_bytes, st.freed_bytes


@dataclass
class Layout:
    """``canary | sp1 | r1 | r2 | sp2`` from offset 0.  The spacers hold two
    references, so a ``dec_ref`` over a spacer and its neighbour frees the
    neighbour on the multi-segment ("slow") path of ``dec_ref``."""

    canary: FileRange
    sp1: FileRange
    r1: FileRange
    r2: FileRange | None
    sp2: FileRange

    @classmethod
    def make(cls, mf: MemoryFile, n1: int, n2: int = 0) -> Layout:
        canary = mf.allocate(P)
        sp1 = mf.allocate(P)
        r1 = mf.allocate(n1)
        r2 = mf.allocate(n2) if n2 else None
        sp2 = mf.allocate(P)
        assert canary.start == 0 and sp2.start == (r2 or r1).end
        mf.inc_ref(sp1)
        mf.inc_ref(sp2)
        write(mf, FileRange(0, sp2.end), 0x77)
        return cls(canary, sp1, r1, r2, sp2)

    def free_r1(self, mf: MemoryFile, path: str) -> None:
        mf.dec_ref(self.r1 if path == "fast" else FileRange(self.sp1.start, self.r1.end))

    def free_r2(self, mf: MemoryFile, path: str) -> None:
        assert self.r2 is not None
        mf.dec_ref(self.r2 if path == "fast" else FileRange(self.r2.start, self.sp2.end))


async def _finish(mf: MemoryFile, lay: Layout) -> None:
    """Everything freed goes; only the spacers stay committed."""
    with anyio.fail_after(10):
        await mf.wait_for_reclaim()
    assert mf.total_usage() == 2 * P
    mf.check_invariants()


PATHS = ["fast", "slow"]


@pytest.mark.parametrize("path", PATHS)
async def test_a_free_of_exactly_run_bytes_is_released_at_once(path: str) -> None:
    async with open_memory_file(opts=OPTS) as mf:
        lay = Layout.make(mf, RUN)

        def free() -> None:
            mf.dec_ref(lay.canary)
            lay.free_r1(mf, path)

        taken, waiting = await first_batch(mf, free)
        assert (taken, waiting) == (RUN, P), "a RUN_BYTES free waited for the pause"
        await _finish(mf, lay)


@pytest.mark.parametrize("path", PATHS)
async def test_a_free_one_page_short_waits_for_the_pause(path: str) -> None:
    async with open_memory_file(opts=OPTS) as mf:
        lay = Layout.make(mf, RUN - P)

        def free() -> None:
            mf.dec_ref(lay.canary)
            lay.free_r1(mf, path)

        taken, waiting = await first_batch(mf, free)
        # Taken only by the pause flush, together with the canary.
        assert (taken, waiting) == (RUN - P + P, 0), "a short free was released at once"
        await _finish(mf, lay)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("order", ["left-then-page", "page-then-left"])
async def test_a_free_merging_with_one_freed_neighbour_is_noted(order: str, path: str) -> None:
    """``r1`` (one page short of a run) and ``r2`` (one page) are freed one
    after the other: the second free merges with exactly one freed
    neighbour, and the merged run of ``RUN_BYTES`` goes at once."""
    async with open_memory_file(opts=OPTS) as mf:
        lay = Layout.make(mf, RUN - P, P)

        def free() -> None:
            mf.dec_ref(lay.canary)
            if order == "left-then-page":
                lay.free_r1(mf, "fast")
                lay.free_r2(mf, path)  # merges with r1, on its left
            else:
                lay.free_r2(mf, "fast")
                lay.free_r1(mf, path)  # merges with r2, on its right

        taken, waiting = await first_batch(mf, free)
        assert (taken, waiting) == (RUN, P), "a merged run of RUN_BYTES waited for the pause"
        await _finish(mf, lay)


@pytest.mark.parametrize("path", PATHS)
async def test_a_merged_run_one_page_short_waits_for_the_pause(path: str) -> None:
    async with open_memory_file(opts=OPTS) as mf:
        lay = Layout.make(mf, RUN - 2 * P, P)

        def free() -> None:
            mf.dec_ref(lay.canary)
            lay.free_r1(mf, "fast")
            lay.free_r2(mf, path)

        taken, waiting = await first_batch(mf, free)
        assert (taken, waiting) == (RUN - P + P, 0), "a short merged run was released at once"
        await _finish(mf, lay)


async def test_exactly_run_bytes_is_taken_after_the_notes_overflow() -> None:
    """More than 65,536 merging frees with no releaser pass overflow the
    releaser's notes; it then scans the freed set once for long runs.  That
    scan must take a run of exactly ``RUN_BYTES`` too (and leave the canary)."""
    notes_max = 1 << 16  # the bound on noted frees (the books' _READY_MAX)
    async with open_memory_file(opts=OPTS) as mf:
        lay = Layout.make(mf, RUN)
        # One allocation, freed a page at a time from its start: every page
        # after the first merges with the freed run before it (one note each).
        big = mf.allocate((notes_max + 2) * P)  # untouched: costs no memory
        assert big.start >= lay.sp2.end

        def free() -> None:
            for off in range(big.start, big.end, P):
                mf.dec_ref(FileRange(off, off + P))
            mf.dec_ref(lay.canary)
            lay.free_r1(mf, "fast")

        taken, waiting = await first_batch(mf, free)
        assert (taken, waiting) == (RUN + big.length, P), "the overflow scan missed a RUN_BYTES run"
        await _finish(mf, lay)
