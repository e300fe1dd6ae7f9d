"""Work in flight when the ``async with`` block ends (issue 13, defects 1, 5,
7, 8 and allocate_and_fill).

Each race is replayed step by step: a gate of the fault-injection seam holds
the racing call at its first syscall (in its worker thread), the block ends,
the test opens unrelated files (they take the lowest free fd numbers), then
lets the call go on.  Closing frees an fd's number for the next ``open``
anywhere in the process, so a call that kept using the old number would
write into those files.  The contract: no syscall ever runs on an fd number
the library has closed; the call raises ``ClosedError``; the fds are closed
once it is over.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import anyio.abc
import pytest
from helpers import fill_byte, is_zero, read_all, write_all

from aiopgalloc import (
    HUGE_PAGE_SIZE,
    PAGE_SIZE,
    ClosedError,
    FileRange,
    MemoryFileOpts,
    MemoryKind,
    open_memory_file,
)
from aiopgalloc.host.faults import faults

pytestmark = pytest.mark.anyio

P = PAGE_SIZE
H = HUGE_PAGE_SIZE
SMALL = MemoryFileOpts(chunk_size=H)
BLOCKS = 32
MARK = b"V" * P


@pytest.fixture(autouse=True)
def _no_leftover_faults() -> Iterator[None]:
    faults.reset()
    yield
    faults.reset()


def _victim(tmp_path: Path) -> Path:
    """An ext4 (or whatever tmp is) file of 32 marked blocks."""
    path = tmp_path / "victim"
    path.write_bytes(MARK * BLOCKS)
    return path


def _take_numbers(path: Path, numbers: set[int]) -> list[int]:
    """Open ``path`` until every fd number in ``numbers`` that is free has
    been taken (bounded); return the fds opened."""
    fds: list[int] = []
    for _ in range(64):
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        fds.append(fd)
        if numbers.issubset(fds) or fd > max(numbers):
            break
    return fds


def _memfd_target(fd: int) -> bool:
    try:
        return "memfd:aiopgalloc" in os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return False


def _assert_victim_intact(path: Path) -> None:
    data = path.read_bytes()
    damaged = [i for i in range(BLOCKS) if data[i * P : (i + 1) * P] != MARK]
    assert not damaged, f"blocks {damaged} of an unrelated file were changed"


async def _wait_reached(gate: object) -> None:
    ok = await anyio.to_thread.run_sync(gate.wait_reached, 10.0)  # type: ignore[attr-defined]
    assert ok, "the call never reached the gate"


async def test_decommit_in_flight_at_close_leaves_other_files_alone(tmp_path: Path) -> None:
    victim = _victim(tmp_path)
    outcome: list[BaseException | None] = []
    taken: list[int] = []

    async def decommit(mf, fr: FileRange) -> None:  # type: ignore[no-untyped-def]
        try:
            await mf.decommit(fr)
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    async with anyio.create_task_group() as outer:
        with faults.gated("fallocate") as gate:
            async with open_memory_file(opts=SMALL) as mf:
                # Many committed segments, more than an inline batch: the
                # punches run in a worker thread.
                frs = [mf.allocate(16 * P, MemoryKind(1 + i % 2)) for i in range(64)]
                for fr in frs:
                    fill_byte(mf, fr, 0xAB)
                whole = FileRange(frs[0].start, frs[-1].end)
                numbers = {mf.fd}
                outer.start_soon(decommit, mf, whole)
                await _wait_reached(gate)
            # The block has ended; the decommit's thread waits at its first
            # punch.  Unrelated files take every fd number now free.
            taken = _take_numbers(victim, numbers)
            # The memfd's number was not freed under the running call.
            assert _memfd_target(next(iter(numbers)))
            gate.open()
    try:
        _assert_victim_intact(victim)
        assert len(outcome) == 1 and isinstance(outcome[0], ClosedError)
        # Once the call is over, the fds are closed.
        assert not _memfd_target(next(iter(numbers)))
    finally:
        for fd in taken:
            os.close(fd)


async def test_update_usage_in_flight_at_close_raises_closed_error(tmp_path: Path) -> None:
    victim = _victim(tmp_path)
    outcome: list[BaseException | None] = []

    async def update(mf) -> None:  # type: ignore[no-untyped-def]
        try:
            await mf.update_usage()
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    taken: list[int] = []
    async with anyio.create_task_group() as outer:
        with faults.gated("mincore") as gate:
            async with open_memory_file(opts=SMALL) as mf:
                fr = mf.allocate(4 * H)
                fill_byte(mf, fr, 1)
                numbers = {mf.fd}
                outer.start_soon(update, mf)
                await _wait_reached(gate)
            taken = _take_numbers(victim, numbers)
            gate.open()
    try:
        _assert_victim_intact(victim)
        assert len(outcome) == 1 and isinstance(outcome[0], ClosedError)
        assert not _memfd_target(next(iter(numbers)))
    finally:
        for fd in taken:
            os.close(fd)


async def test_allocate_in_a_thread_at_close_raises_closed_error() -> None:
    """A thread zeroing recycled pages when the block ends."""
    outcome: list[BaseException | object] = []
    async with open_memory_file(opts=SMALL) as mf:
        fr = mf.allocate(4 * P)
        fill_byte(mf, fr, 0xEE)
        await mf.update_usage()  # known committed: recycling memsets them
        mf.dec_ref(fr)

        def allocate() -> None:
            try:
                outcome.append(mf.allocate(4 * P))
            except BaseException as exc:
                outcome.append(exc)

        gate = faults.gate("memset")
        t = threading.Thread(target=allocate)
        t.start()
        try:
            await _wait_reached(gate)
        except BaseException:
            gate.open()
            raise
        assert mf.stats().recycled_bytes == 4 * P

        def open_once_closed() -> None:
            # The gate opens only once the block's end has marked the file
            # closed: however long the closing takes (the pressure watcher
            # is cancelled first), the thread is still inside allocate.
            deadline = time.monotonic() + 10
            while not mf.closed and time.monotonic() < deadline:
                time.sleep(0.001)
            gate.open()

        opener = threading.Thread(target=open_once_closed)
        opener.start()
        # The block ends here while the thread waits at its memset.
    held = gate
    await anyio.to_thread.run_sync(t.join, 10.0)
    await anyio.to_thread.run_sync(opener.join, 10.0)
    assert held.reached
    assert len(outcome) == 1 and isinstance(outcome[0], ClosedError), outcome
    mf.check_invariants()


async def test_allocate_in_a_thread_racing_close_is_clean_or_closed() -> None:
    """Many threads allocating (recycling) while the block ends, no gate:
    every call either returns a range or raises ClosedError; nothing else."""
    errors: list[BaseException] = []
    stop = threading.Event()

    def churn(mf) -> None:  # type: ignore[no-untyped-def]
        while not stop.is_set():
            try:
                fr = mf.allocate(2 * P)
                fill_byte(mf, fr, 7)
                mf.dec_ref(fr)
            except ClosedError:
                return
            except BaseException as exc:
                errors.append(exc)
                return

    for _ in range(5):
        threads: list[threading.Thread] = []
        async with open_memory_file(opts=SMALL) as mf:
            threads = [threading.Thread(target=churn, args=(mf,)) for _ in range(3)]
            for t in threads:
                t.start()
            await anyio.sleep(0.02)
        stop.set()
        for t in threads:
            await anyio.to_thread.run_sync(t.join, 10.0)
        stop.clear()
        mf.check_invariants()
    assert not errors, errors


class _SlowStream(anyio.abc.ByteReceiveStream):
    """Gives one page, then waits until told to give the rest."""

    def __init__(self, total: int) -> None:
        self.left = total
        self.first = True
        self.go = anyio.Event()
        self.waiting = anyio.Event()

    async def receive(self, max_bytes: int = 65536) -> bytes:
        if self.left == 0:
            raise anyio.EndOfStream
        if not self.first:
            self.waiting.set()
            await self.go.wait()
        self.first = False
        n = min(max_bytes, self.left, P)
        self.left -= n
        return b"z" * n

    async def aclose(self) -> None:
        pass


async def test_allocate_and_fill_in_flight_at_close_raises_closed_error() -> None:
    outcome: list[BaseException | object] = []
    stream = _SlowStream(4 * P)

    async def fill(mf) -> None:  # type: ignore[no-untyped-def]
        try:
            outcome.append(await mf.allocate_and_fill(4 * P, MemoryKind.ANONYMOUS, stream))
        except BaseException as exc:
            outcome.append(exc)

    async with anyio.create_task_group() as outer:
        async with open_memory_file(opts=SMALL) as mf:
            outer.start_soon(fill, mf)
            await stream.waiting.wait()
        stream.go.set()
    assert len(outcome) == 1 and isinstance(outcome[0], ClosedError), outcome


async def test_calls_after_close_raise_closed_error() -> None:
    async with open_memory_file(opts=SMALL) as mf:
        fr = mf.allocate(P)
    with pytest.raises(ClosedError):
        mf.stats()
    with pytest.raises(ClosedError):
        mf.reclaim_pending()
    with pytest.raises(ClosedError):
        await mf.save(os.devnull)
    with pytest.raises(ClosedError):
        await mf.allocate_and_fill(P, MemoryKind.ANONYMOUS, _SlowStream(P))
    with pytest.raises(ClosedError):
        mf.dec_ref(fr)


async def test_file_grown_by_a_share_holder_does_not_wedge_growth() -> None:
    """Someone holding a read-write share grows the file and writes past
    the allocator's end: later growing allocations adopt the real size, and
    the pages the other holder wrote read as zero when handed out."""
    async with open_memory_file(opts=SMALL) as mf:
        fr = mf.allocate(P)
        size = mf.total_size()
        rw = mf.share(readonly=False)
        try:
            os.ftruncate(rw, size + H + 5 * P)  # not a whole chunk
            os.pwrite(rw, b"\xff" * (2 * P), size + H)
        finally:
            os.close(rw)
        # Growing allocations work, again and again.
        big = [mf.allocate(H) for _ in range(4)]
        assert mf.total_size() % H == 0
        assert mf.total_size() >= size + 4 * H
        assert os.fstat(mf.fd).st_size == mf.total_size()
        for b in big:
            assert is_zero(mf, b)
        # Small allocations over the written pages get zeroed pages too.
        smalls = [mf.allocate(P) for _ in range(64)]
        for s in smalls:
            assert is_zero(mf, s)
        mf.check_invariants()
        for r in [fr, *big, *smalls]:
            mf.dec_ref(r)
        await mf.wait_for_reclaim()
        assert mf.total_usage() == 0
        mf.check_invariants()


async def test_file_grown_past_the_largest_size_refuses_cleanly() -> None:
    async with open_memory_file(opts=SMALL) as mf:
        rw = mf.share(readonly=False)
        try:
            os.ftruncate(rw, 1 << 48)
        finally:
            os.close(rw)
        inside = mf.allocate(P)  # fits the size the allocator knows
        with pytest.raises(OSError):
            mf.allocate(2 * H)  # would grow: refused, nothing changed
        text = str(mf)
        with pytest.raises(OSError):
            mf.allocate(2 * H)
        assert str(mf) == text
        write_all(mf, inside, b"k" * P)
        assert read_all(mf, inside) == b"k" * P
        mf.check_invariants()
