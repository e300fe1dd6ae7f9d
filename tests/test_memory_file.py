"""MemoryFile: allocation, references, mappings, release and accounting."""

from __future__ import annotations

import errno
import io
import os

import anyio
import pytest

from aiopgalloc import (
    HUGE_PAGE_SIZE,
    PAGE_SIZE,
    AccessType,
    CommitMode,
    FileRange,
    MemoryFileOpts,
    MemoryKind,
    RefCountError,
    open_memory_file,
)
from aiopgalloc.host.faults import faults

pytestmark = pytest.mark.anyio

P = PAGE_SIZE
H = HUGE_PAGE_SIZE
SMALL_CHUNKS = MemoryFileOpts(chunk_size=H)


def write(mf, fr: FileRange, byte: int) -> None:  # type: ignore[no-untyped-def]
    for v in mf.map_internal(fr):
        v[:] = bytes([byte]) * len(v)


def read(mf, fr: FileRange) -> bytes:  # type: ignore[no-untyped-def]
    return b"".join(bytes(v) for v in mf.map_internal(fr, AccessType.READ))


def segments(mf):  # type: ignore[no-untyped-def]
    return [(r.start, r.end, r.refs) for r in mf.page_map() if r.state != "freed"]


# ------------------------------------------------------------ allocation


async def test_first_fit_bottom_up_and_hole_after_release() -> None:
    async with open_memory_file() as mf:
        a, b, c = mf.allocate(P), mf.allocate(2 * P), mf.allocate(P)
        assert (a, b, c) == (FileRange(0, P), FileRange(P, 3 * P), FileRange(3 * P, 4 * P))
        mf.dec_ref(b)
        await mf.wait_for_reclaim()
        mf.check_invariants()
        # The released hole is the lowest place a 2-page range fits.
        assert mf.allocate(2 * P) == FileRange(P, 3 * P)
        mf.check_invariants()


async def test_holes_too_small_are_skipped() -> None:
    async with open_memory_file() as mf:
        frs = [mf.allocate(P) for _ in range(6)]
        for fr in frs[1:5:2]:  # free pages 1 and 3: one-page holes
            mf.dec_ref(fr)
        await mf.wait_for_reclaim()
        big = mf.allocate(2 * P)
        assert big == FileRange(6 * P, 8 * P)
        # A one-page request still takes the lowest hole.
        assert mf.allocate(P) == FileRange(P, 2 * P)
        mf.check_invariants()


async def test_freed_pages_are_recycled_only_zeroed() -> None:
    async with open_memory_file() as mf:
        keep = mf.allocate(P)
        fr = mf.allocate(4 * P)
        write(mf, fr, 0xFF)
        mf.dec_ref(fr)
        # No await: the releaser has not run, the pages are still dirty.
        assert mf.reclaim_pending() == 4 * P
        again = mf.allocate(4 * P)
        assert again == fr  # recycled: the lowest place it fits
        assert read(mf, again) == bytes(4 * P)
        assert mf.reclaim_pending() == 0
        mf.check_invariants()
        mf.dec_ref(again)
        mf.dec_ref(keep)
        await mf.wait_for_reclaim()
        assert mf.total_usage() == 0


async def test_freed_pages_not_handed_out_while_releasing() -> None:
    # Every batch goes to the releaser's thread, where a gate holds its
    # punch: the pages are "releasing" and must not be handed out until the
    # batch settles.
    async with open_memory_file(opts=MemoryFileOpts(release_inline_max_bytes=0)) as mf:
        fr = mf.allocate(4 * P)
        with faults.gated("fallocate") as gate:
            mf.dec_ref(fr)
            mf.release_freed_soon()
            assert await anyio.to_thread.run_sync(gate.wait_reached, 10.0)
            assert [r.state for r in mf.page_map()] == ["releasing"]
            other = mf.allocate(4 * P)
            assert other == FileRange(4 * P, 8 * P)
            mf.check_invariants()
        await mf.wait_for_reclaim()
        mf.check_invariants()
        assert mf.allocate(4 * P) == fr


async def test_huge_page_alignment() -> None:
    async with open_memory_file() as mf:
        mf.allocate(P)
        h = mf.allocate(H)
        assert h.start % H == 0 and h == FileRange(H, 2 * H)
        h2 = mf.allocate(H + P)
        assert h2.start % H == 0 and h2.start == 2 * H
        small = mf.allocate(P)
        assert small == FileRange(P, 2 * P)  # below the huge ranges
        mf.check_invariants()


async def test_reference_table_huge_alignment_case() -> None:
    # used [0,P), [H+P, H+2P); length H aligned to H -> 2H
    async with open_memory_file() as mf:
        mf.allocate(P)
        filler = mf.allocate(H)  # [H, 2H)
        mf.dec_ref(filler)
        await mf.wait_for_reclaim()
        mid = mf.allocate(2 * P)  # lands at [P, 3P)
        assert mid == FileRange(P, 3 * P)
        h = mf.allocate(H)
        assert h == FileRange(H, 2 * H)  # [3P, H) is too short once aligned
        mf.check_invariants()


async def test_file_grows_by_whole_chunks() -> None:
    async with open_memory_file(opts=SMALL_CHUNKS) as mf:
        assert mf.total_size() == H
        fr = mf.allocate(3 * H)
        assert fr.end <= mf.total_size()
        assert mf.total_size() % H == 0
        assert os.fstat(mf.fd).st_size == mf.total_size()
        mf.check_invariants()


async def test_enomem_when_offsets_run_out() -> None:
    async with open_memory_file() as mf:
        before = str(mf)
        with pytest.raises(OSError) as info:
            mf.allocate(1 << 63)
        assert info.value.errno == errno.ENOMEM
        assert str(mf) == before
        mf.check_invariants()


async def test_growth_failure_changes_nothing() -> None:
    async with open_memory_file(opts=SMALL_CHUNKS) as mf:
        mf.allocate(P)
        before, size = str(mf), mf.total_size()
        with faults.injected("ftruncate", errno.ENOSPC), pytest.raises(OSError) as info:
            mf.allocate(4 * H)
        assert info.value.errno == errno.ENOSPC
        assert str(mf) == before and mf.total_size() == size
        mf.check_invariants()


async def test_new_allocations_read_zero_after_release() -> None:
    async with open_memory_file() as mf:
        for size in (P, 16 * P, H, 3 * H):
            fr = mf.allocate(size)
            assert read(mf, fr) == bytes(size)
            write(mf, fr, 0xAB)
            mf.dec_ref(fr)
            await mf.wait_for_reclaim()
            fr = mf.allocate(size)
            assert read(mf, fr) == bytes(size)
            mf.dec_ref(fr)
        mf.check_invariants()


# ------------------------------------------------------------ references


async def test_inc_ref_and_dec_ref_split_and_merge() -> None:
    async with open_memory_file() as mf:
        fr = mf.allocate(8 * P)
        mf.inc_ref(FileRange(2 * P, 4 * P))
        assert segments(mf) == [(0, 2 * P, 1), (2 * P, 4 * P, 2), (4 * P, 8 * P, 1)]
        mf.check_invariants()
        mf.dec_ref(FileRange(2 * P, 4 * P))
        assert segments(mf) == [(0, 8 * P, 1)]  # merged again
        mf.check_invariants()
        # Free the middle: it becomes waste, the rest stays live.
        mf.dec_ref(FileRange(3 * P, 5 * P))
        assert segments(mf) == [(0, 3 * P, 1), (5 * P, 8 * P, 1)]
        assert mf.reclaim_pending() == 2 * P
        with pytest.raises(RefCountError):
            mf.inc_ref(FileRange(2 * P, 4 * P))  # partly freed
        with pytest.raises(RefCountError):
            mf.dec_ref(FileRange(3 * P, 4 * P))  # double free
        mf.check_invariants()
        mf.dec_ref(FileRange(0, 3 * P))
        mf.dec_ref(FileRange(5 * P, 8 * P))
        await mf.wait_for_reclaim()
        assert segments(mf) == [] and mf.reclaim_pending() == 0
        assert fr.length == 8 * P


async def test_refs_span_several_allocations() -> None:
    async with open_memory_file() as mf:
        a = mf.allocate(P, MemoryKind.ANONYMOUS)
        b = mf.allocate(P, MemoryKind.PAGE_CACHE)
        span = FileRange(a.start, b.end)
        mf.inc_ref(span)
        assert [r for _, _, r in segments(mf)] == [2, 2]
        mf.dec_ref(span)
        mf.dec_ref(span)
        assert segments(mf) == []
        mf.check_invariants()


async def test_adjacent_allocations_of_one_kind_merge() -> None:
    async with open_memory_file() as mf:
        a = mf.allocate(P)
        b = mf.allocate(P)
        assert segments(mf) == [(0, 2 * P, 1)]
        mf.dec_ref(a)
        assert segments(mf) == [(P, 2 * P, 1)]
        mf.dec_ref(b)
        mf.check_invariants()


# --------------------------------------------------------------- mapping


async def test_mappings_across_chunk_boundaries() -> None:
    async with open_memory_file(opts=SMALL_CHUNKS) as mf:
        mf.allocate(H - 2 * P)
        fr = mf.allocate(4 * P)  # straddles the first chunk boundary
        assert fr.start < H < fr.end
        views = mf.map_internal(fr)
        assert len(views) == 2 and sum(len(v) for v in views) == fr.length
        pattern = bytes(range(256)) * (fr.length // 256)
        pos = 0
        for v in views:
            v[:] = pattern[pos : pos + len(v)]
            pos += len(v)
        assert os.pread(mf.fd, fr.length, fr.start) == pattern
        big = mf.allocate(3 * H)
        assert len(mf.map_internal(big)) == 3


async def test_map_internal_access_types() -> None:
    async with open_memory_file() as mf:
        fr = mf.allocate(P)
        ro = mf.map_internal(fr, AccessType.READ)
        assert ro[0].readonly
        with pytest.raises(TypeError):
            ro[0][0] = 1
        rw = mf.map_internal(fr, AccessType.WRITE)
        rw[0][0] = 7
        assert ro[0][0] == 7
        with pytest.raises(PermissionError):
            mf.map_internal(fr, AccessType.EXECUTE)
        with pytest.raises(PermissionError):
            mf.map_internal(fr, AccessType.READ | AccessType.EXECUTE)
        # Unallocated pages inside the file may be mapped (as in the reference).
        assert len(mf.map_internal(FileRange(P, 2 * P))[0]) == P
        with pytest.raises(ValueError):
            mf.map_internal(FileRange(0, mf.total_size() + P))
        del ro, rw


# --------------------------------------------------------------- release


async def test_release_returns_memory_and_total_usage_reaches_zero() -> None:
    async with open_memory_file() as mf:
        frs = [mf.allocate(n * P) for n in (1, 2, 3, 16, 512)]
        for fr in frs:
            write(mf, fr, 1)
        assert mf.total_usage() == sum(fr.length for fr in frs)
        for fr in frs:
            mf.dec_ref(fr)
        await mf.wait_for_reclaim()
        assert mf.total_usage() == 0
        assert mf.reclaim_pending() == 0
        st = mf.stats()
        assert st.releases >= 1 and st.bytes_released >= sum(fr.length for fr in frs)
        mf.check_invariants()


async def test_release_coalesces_adjacent_frees() -> None:
    async with open_memory_file() as mf:
        frs = [mf.allocate(P) for _ in range(64)]
        for fr in frs:
            write(mf, fr, 1)
        for fr in frs[::2]:
            mf.dec_ref(fr)
        for fr in frs[1::2]:
            mf.dec_ref(fr)
        # All 64 frees merged into one freed range before any await.
        assert [r.state for r in mf.page_map()] == ["freed"]
        releases = mf.stats().releases
        await mf.wait_for_reclaim()
        assert mf.stats().releases == releases + 1
        assert mf.total_usage() == 0


async def test_large_release_goes_to_a_thread_and_completes() -> None:
    async with open_memory_file() as mf:
        fr = mf.allocate(64 * H)
        write(mf, FileRange(fr.start, fr.start + 4 * H), 3)
        mf.dec_ref(fr)
        with anyio.fail_after(10):
            await mf.wait_for_reclaim()
        assert mf.total_usage() == 0


async def test_release_failure_falls_back_to_zeroing() -> None:
    async with open_memory_file() as mf:
        fr = mf.allocate(4 * P)
        write(mf, fr, 0xEE)
        with faults.injected("fallocate", errno.EIO):
            mf.dec_ref(fr)
            await mf.wait_for_reclaim()
            assert faults.calls("fallocate") >= 1
        # The memory is still held by the file, but the pages read as zero
        # and are available again.
        assert os.pread(mf.fd, fr.length, fr.start) == bytes(fr.length)
        assert mf.reclaim_pending() == 0
        mf.check_invariants()
        assert mf.allocate(4 * P) == fr


# -------------------------------------------------------------- decommit


async def test_decommit_live_pages() -> None:
    async with open_memory_file() as mf:
        fr = mf.allocate(8 * P)
        write(mf, fr, 0x11)
        await mf.update_usage()
        assert mf.accounting.snapshot().anonymous == 8 * P
        await mf.decommit(FileRange(2 * P, 4 * P))
        assert mf.total_usage() == 6 * P
        assert read(mf, FileRange(2 * P, 4 * P)) == bytes(2 * P)
        assert read(mf, FileRange(0, 2 * P)) == b"\x11" * (2 * P)
        assert mf.accounting.snapshot().anonymous == 6 * P
        mf.check_invariants()
        # Still allocated: references work as before.
        mf.inc_ref(FileRange(2 * P, 4 * P))
        mf.dec_ref(FileRange(2 * P, 4 * P))
        mf.dec_ref(fr)
        await mf.wait_for_reclaim()
        assert mf.total_usage() == 0


async def test_decommit_fallback_under_injected_failure() -> None:
    async with open_memory_file() as mf:
        fr = mf.allocate(4 * P)
        write(mf, fr, 0x22)
        await mf.update_usage()
        with faults.injected("fallocate", errno.EIO):
            await mf.decommit(fr)
        assert read(mf, fr) == bytes(4 * P)  # zeroed by hand
        assert mf.total_usage() == 4 * P  # the memory itself stays
        assert mf.accounting.snapshot().anonymous == 0  # as the reference pretends
        mf.check_invariants()


async def test_decommit_needs_allocated_pages() -> None:
    async with open_memory_file() as mf:
        fr = mf.allocate(2 * P)
        before = str(mf)
        with pytest.raises(RefCountError):
            await mf.decommit(FileRange(0, 4 * P))
        with pytest.raises(ValueError):
            await mf.decommit(FileRange(1, P))
        assert str(mf) == before
        # Freed pages not yet released count as allocated: decommit releases them.
        mf.dec_ref(fr)
        await mf.decommit(fr)
        assert mf.reclaim_pending() == 0
        mf.check_invariants()


# ------------------------------------------------------------ accounting


async def test_accounting_through_the_whole_life_cycle() -> None:
    async with open_memory_file() as mf:
        anon = mf.allocate(4 * P, MemoryKind.ANONYMOUS)
        cache = mf.allocate(2 * P, MemoryKind.PAGE_CACHE)
        assert mf.accounting.snapshot().total == 0  # nothing touched yet
        await mf.update_usage()
        assert mf.accounting.snapshot().total == 0
        write(mf, anon, 1)
        write(mf, FileRange(cache.start, cache.start + P), 1)
        await mf.update_usage()
        snap = mf.accounting.snapshot()
        assert (snap.anonymous, snap.page_cache, snap.system) == (4 * P, P, 0)
        mf.check_invariants()
        # The fast path: nothing changed, nothing scanned.
        await mf.update_usage()
        assert mf.accounting.snapshot() == snap
        mf.dec_ref(anon)
        snap = mf.accounting.snapshot()
        assert (snap.anonymous, snap.system) == (0, 4 * P)  # freed -> SYSTEM
        mf.check_invariants()
        await mf.wait_for_reclaim()
        snap = mf.accounting.snapshot()
        assert (snap.anonymous, snap.system, snap.page_cache) == (0, 0, P)
        mf.dec_ref(cache)
        await mf.wait_for_reclaim()
        assert mf.accounting.snapshot().total == 0
        assert mf.total_usage() == 0
        mf.check_invariants()


async def test_recycled_pages_are_accounted_to_the_new_kind() -> None:
    async with open_memory_file() as mf:
        fr = mf.allocate(2 * P, MemoryKind.ANONYMOUS)
        write(mf, fr, 9)
        await mf.update_usage()
        mf.dec_ref(fr)
        again = mf.allocate(2 * P, MemoryKind.TMPFS)
        assert again == fr
        snap = mf.accounting.snapshot()
        assert (snap.tmpfs, snap.system, snap.anonymous) == (2 * P, 0, 0)
        mf.check_invariants()


async def test_scan_racing_with_decommit_drops_only_the_punched_pages() -> None:
    async with open_memory_file() as mf:
        fr = mf.allocate(8 * P)
        write(mf, fr, 5)
        async with anyio.create_task_group() as tg:
            with faults.gated("mincore") as gate:
                tg.start_soon(mf.update_usage)
                assert await anyio.to_thread.run_sync(gate.wait_reached, 10.0)
                # Punch half while the scan is in flight: its residency of
                # those pages will be stale.
                await mf.decommit(FileRange(fr.start, fr.start + 4 * P))
        # Only the pages not punched meanwhile are counted.
        assert mf.accounting.snapshot().anonymous == 4 * P
        mf.check_invariants()
        await mf.update_usage()
        assert mf.accounting.snapshot().anonymous == 4 * P


# -------------------------------------------------------- allocate_and_fill


class _Stream:
    """A minimal anyio ByteReceiveStream over some chunks."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = list(chunks)


async def test_allocate_and_fill_from_file_objects(tmp_path) -> None:  # type: ignore[no-untyped-def]
    async with open_memory_file() as mf:
        data = os.urandom(3 * P)
        fr = await mf.allocate_and_fill(3 * P, MemoryKind.PAGE_CACHE, io.BytesIO(data))
        assert fr.length == 3 * P and read(mf, fr) == data
        path = tmp_path / "f"
        path.write_bytes(data + b"x" * 100)
        with open(path, "rb") as f:
            fr2 = await mf.allocate_and_fill(8 * P, MemoryKind.PAGE_CACHE, f)
        # Short input: the whole pages filled are kept, the rest freed.
        assert fr2.length == 3 * P and read(mf, fr2) == data
        assert mf.reclaim_pending() == 5 * P
        with pytest.raises(EOFError):
            await mf.allocate_and_fill(P, MemoryKind.PAGE_CACHE, io.BytesIO(b"abc"))
        mf.check_invariants()


async def test_allocate_and_fill_from_a_byte_stream() -> None:
    async with open_memory_file() as mf:
        send, receive = anyio.create_memory_object_stream[bytes](10)
        from anyio.streams.stapled import StapledObjectStream  # noqa: F401

        data = os.urandom(2 * P + 10)

        class Bytes(anyio.abc.ByteReceiveStream):
            def __init__(self) -> None:
                self.buf = data

            async def receive(self, max_bytes: int = 65536) -> bytes:
                if not self.buf:
                    raise anyio.EndOfStream
                out, self.buf = self.buf[:max_bytes], self.buf[max_bytes:]
                return out

            async def aclose(self) -> None:
                pass

        fr = await mf.allocate_and_fill(4 * P, MemoryKind.ANONYMOUS, Bytes())
        assert fr.length == 2 * P and read(mf, fr) == data[: 2 * P]
        send.close()
        receive.close()
        mf.check_invariants()


async def test_allocate_and_fill_reader_error_frees_everything() -> None:
    class Broken:
        def readinto(self, buf: memoryview) -> int:
            raise ConnectionResetError("gone")

    async with open_memory_file() as mf:
        before = segments(mf)
        with pytest.raises(ConnectionResetError):
            await mf.allocate_and_fill(4 * P, MemoryKind.ANONYMOUS, Broken())
        assert segments(mf) == before
        assert mf.reclaim_pending() == 4 * P  # freed, not yet released
        await mf.wait_for_reclaim()
        mf.check_invariants()


# ----------------------------------------------------------- commit modes


@pytest.mark.parametrize("mode", [CommitMode.FALLOCATE, CommitMode.POPULATE])
async def test_commit_modes_commit_and_account(mode: CommitMode) -> None:
    async with open_memory_file() as mf:
        fr = mf.allocate(64 * P, MemoryKind.TMPFS, commit=mode)
        assert mf.total_usage() == 64 * P
        assert mf.accounting.snapshot().tmpfs == 64 * P  # known at once
        assert read(mf, fr) == bytes(64 * P)
        mf.check_invariants()
        await mf.update_usage()
        assert mf.accounting.snapshot().tmpfs == 64 * P
        mf.dec_ref(fr)
        await mf.wait_for_reclaim()
        assert mf.total_usage() == 0 and mf.accounting.snapshot().total == 0
        mf.check_invariants()


async def test_commit_none_leaves_pages_uncommitted() -> None:
    async with open_memory_file() as mf:
        mf.allocate(64 * P, commit=CommitMode.NONE)
        assert mf.total_usage() == 0
        with pytest.raises(TypeError):
            mf.allocate(P, commit="populate")  # type: ignore[arg-type]


async def test_failed_commit_changes_nothing() -> None:
    async with open_memory_file() as mf:
        mf.allocate(P)
        before, pending = str(mf), mf.reclaim_pending()
        with faults.injected("fallocate", errno.ENOSPC), pytest.raises(OSError) as info:
            mf.allocate(16 * P, commit=CommitMode.FALLOCATE)
        assert info.value.errno == errno.ENOSPC
        assert str(mf) == before and mf.reclaim_pending() == pending
        assert mf.total_usage() == 0
        mf.check_invariants()
