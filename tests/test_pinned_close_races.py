"""Defects found while pinning: calls in flight when the file closes.

The contract (DESIGN.md): after the ``async with`` block ends every method
raises ``ClosedError``, and no syscall ever runs on an fd number the
library has closed: work still in flight holds its own reference to the
file or stops with ``ClosedError``.  Each test below starts a call in a
task or thread that outlives the block, holds it at the fault seam's gate
just before its syscall, leaves the block (the file closes), opens files
until one gets the closed fd number back, and lets the call go on.

The library's answer (``MemoryFile``'s I/O leases): a call that uses the
fds outside the lock holds a lease, and the fds are closed only when the
last lease is returned, so the closed file's number is not handed out
while the held call still needs it.  A call doing more than one syscall
raises ``ClosedError`` once it notices the close; a one-syscall call that
began before the close (``total_usage``) may finish with the closed file's
own answer, never another file's.  Public API plus the fault seam only.
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


def take_fd_number(number: int, opened: list[int]) -> int | None:
    """Open memfds until one gets ``number`` (the lowest free numbers are
    handed out first); return it, or None when ``number`` is still in use
    (the library kept it open for the call in flight)."""
    for _ in range(64):
        fd = os.memfd_create("victim", os.MFD_CLOEXEC)
        opened.append(fd)
        if fd == number:
            return fd
        if fd > number and _is_allocator_memfd(number):
            return None
    raise AssertionError(f"fd number {number} was neither handed out again nor kept open")


def _is_allocator_memfd(fd: int) -> bool:
    try:
        return "memfd:aiopgalloc" in os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return False


def _victim(fds: list[int], number: int) -> int:
    """A file holding 1 MiB of 0x99, on ``number`` if it is free."""
    victim = take_fd_number(number, fds)
    if victim is None:
        victim = fds[-1]
    os.ftruncate(victim, 2 * MiB)
    os.pwrite(victim, b"\x99" * MiB, 0)
    return victim


def write(mf: MemoryFile, length: int) -> None:
    fr = mf.allocate(length)
    for v in mf.map_internal(fr):
        v[:] = b"\x01" * len(v)
        v.release()


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
            victim = _victim(fds, number)
            assert _is_allocator_memfd(number), "the fd was closed under the call"
            gate.open()
    assert os.pread(victim, MiB, 0) == b"\x99" * MiB, "another file's data was punched out"
    assert len(outcome) == 1 and isinstance(outcome[0], ClosedError)


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
            _victim(fds, number)  # 1 MiB of blocks
            assert _is_allocator_memfd(number), "the fd was closed under the call"
            gate.open()
    assert len(outcome) == 1
    # The closed file's own usage (nothing committed), never the victim's.
    assert outcome[0] == 0 or isinstance(outcome[0], ClosedError), outcome[0]
    assert not _is_allocator_memfd(number), "the fd stayed open after the call"


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
