"""Defects found while pinning: calls in flight when the file closes.

The contract (DESIGN.md): after the ``async with`` block ends every method
raises ``ClosedError``, and no syscall ever runs on an fd number the
library has closed: work still in flight holds its own reference to the
file or stops with ``ClosedError``.  Each test below starts a call in a
task or thread that outlives the block, holds it at the fault seam's gate
just before its syscall, leaves the block (the file closes), opens files
until one gets the closed fd number back, and lets the call go on.

Today the held syscall runs on the reused number.  These are reproducers
of real defects, marked ``xfail(strict=True)``: they fail now and will
pass (and must then be unmarked) once the calls hold their own reference
to the fd (a dup, or a count that ``_close`` waits for) or re-check
``closed`` under the lock after their syscall.  Public API plus the fault
seam only.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import anyio
import pytest

from aiopgalloc import (
    HUGE_PAGE_SIZE,
    PAGE_SIZE,
    ClosedError,
    DelayedEviction,
    FileRange,
    MemoryFile,
    MemoryFileOpts,
    open_memory_file,
)
from aiopgalloc.host.faults import faults

pytestmark = pytest.mark.anyio

P = PAGE_SIZE
MiB = 1 << 20
OPTS = MemoryFileOpts(chunk_size=HUGE_PAGE_SIZE, delayed_eviction=DelayedEviction.MANUAL)


@pytest.fixture(autouse=True)
def _no_leftover_faults() -> Iterator[None]:
    faults.reset()
    yield
    faults.reset()


@pytest.fixture
def fds() -> Iterator[list[int]]:
    """fds the test opens; closed at the end."""
    opened: list[int] = []
    yield opened
    for fd in opened:
        os.close(fd)


def take_fd_number(number: int, opened: list[int]) -> int:
    """Open memfds until one gets ``number`` (the lowest free numbers are
    handed out first, and the closed file's are among them)."""
    for _ in range(64):
        fd = os.memfd_create("victim", os.MFD_CLOEXEC)
        opened.append(fd)
        if fd == number:
            return fd
    raise AssertionError(f"fd number {number} was not handed out again")


def write(mf: MemoryFile, length: int) -> None:
    fr = mf.allocate(length)
    for v in mf.map_internal(fr):
        v[:] = b"\x01" * len(v)
        v.release()


@pytest.mark.xfail(
    strict=True,
    reason="DEFECT: a decommit whose punch runs in a worker thread (ranges over "
    "release_inline_max_bytes) does not hold the fd: if the file closes meanwhile, "
    "fallocate(PUNCH_HOLE) runs on the closed fd number, and punches a hole in "
    "whatever file got that number (its data is lost); decommit then returns normally",
)
async def test_decommit_in_flight_across_close_does_not_punch_another_file(
    fds: list[int],
) -> None:
    outcome: list[BaseException | None] = []

    async def decommit(mf: MemoryFile) -> None:
        try:
            await mf.decommit(FileRange(0, MiB))
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    async with anyio.create_task_group() as tg:
        with faults.gated("fallocate") as gate:
            async with open_memory_file(opts=OPTS) as mf:
                write(mf, MiB)  # [0, 1 MiB): punched in a worker thread
                number = mf.fd
                tg.start_soon(decommit, mf)
                assert await anyio.to_thread.run_sync(gate.wait_reached, 10.0)
            # Closed, with the punch held just before its syscall.
            victim = take_fd_number(number, fds)
            os.ftruncate(victim, 2 * MiB)
            os.pwrite(victim, b"\x99" * MiB, 0)
            gate.open()
    assert os.pread(victim, MiB, 0) == b"\x99" * MiB, "another file's data was punched out"
    assert len(outcome) == 1 and isinstance(outcome[0], ClosedError)


@pytest.mark.xfail(
    strict=True,
    reason="DEFECT: total_usage() checks closed, then calls fstat on the fd without a "
    "reference: a close in between makes it fstat the closed fd number (another file "
    "once reused) and return that file's size instead of raising ClosedError",
)
async def test_total_usage_in_flight_across_close_raises_closed(fds: list[int]) -> None:
    outcome: list[object] = []
    async with anyio.create_task_group() as tg:
        with faults.gated("fstat") as gate:
            async with open_memory_file(opts=OPTS) as mf:
                number = mf.fd

                def call() -> None:
                    try:
                        outcome.append(mf.total_usage())
                    except BaseException as exc:
                        outcome.append(exc)

                tg.start_soon(anyio.to_thread.run_sync, call)
                assert await anyio.to_thread.run_sync(gate.wait_reached, 10.0)
            victim = take_fd_number(number, fds)
            os.ftruncate(victim, MiB)
            os.pwrite(victim, b"\x99" * MiB, 0)  # 1 MiB of blocks
            gate.open()
    assert len(outcome) == 1
    assert isinstance(outcome[0], ClosedError), f"total_usage() returned {outcome[0]!r}"


@pytest.mark.xfail(
    strict=True,
    reason="DEFECT: allocate() zeroes recycled pages outside the lock, probing them with "
    "lseek(SEEK_DATA) on the private scan fd without a reference: a close in between makes "
    "it lseek the closed fd number (EBADF, or moving the offset of whatever file got the "
    "number) and raise OSError(EBADF) instead of ClosedError",
)
async def test_allocate_recycling_in_flight_across_close_raises_closed() -> None:
    outcome: list[object] = []
    async with anyio.create_task_group() as tg:
        with faults.gated("lseek") as gate:
            async with open_memory_file(opts=OPTS) as mf:
                fr = mf.allocate(4 * P)
                for v in mf.map_internal(fr):
                    v[:] = b"\x01" * len(v)
                    v.release()

                def call() -> None:
                    try:
                        mf.dec_ref(fr)  # freed, not known committed
                        outcome.append(mf.allocate(4 * P))  # recycles: SEEK_DATA probe
                    except BaseException as exc:
                        outcome.append(exc)

                tg.start_soon(anyio.to_thread.run_sync, call)
                assert await anyio.to_thread.run_sync(gate.wait_reached, 10.0)
            gate.open()
    assert len(outcome) == 1
    assert isinstance(outcome[0], ClosedError), f"allocate() gave {outcome[0]!r}"
