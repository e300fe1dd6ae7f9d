"""Tests of aiopgalloc.host.syscalls and the fault-injection seam, on real memfds."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import threading
from collections.abc import Callable, Iterator

import pytest

from aiopgalloc.host import syscalls
from aiopgalloc.host.faults import OPS, FaultInjector, faults
from aiopgalloc.host.hugepage import PAGE_SIZE
from aiopgalloc.host.memfd import create_memfd, truncate

P = PAGE_SIZE
FILE_SIZE = 64 * P


@pytest.fixture(autouse=True)
def _no_leftover_faults() -> Iterator[None]:
    faults.reset()
    yield
    faults.reset()


@pytest.fixture
def fd() -> Iterator[int]:
    fd = create_memfd("test-syscalls")
    truncate(fd, FILE_SIZE)
    yield fd
    os.close(fd)


@pytest.fixture
def mapped(fd: int) -> Iterator[tuple[mmap.mmap, int]]:
    m = mmap.mmap(fd, FILE_SIZE, flags=mmap.MAP_SHARED)
    probe = ctypes.c_char.from_buffer(m)
    addr = ctypes.addressof(probe)
    del probe
    yield m, addr
    m.close()


def write_pages(fd: int, pages: list[int], fill: bytes = b"\xa5") -> None:
    for p in pages:
        assert os.pwrite(fd, fill * P, p * P) == P


# --- punch / commit -------------------------------------------------------


def test_punch_hole_drops_blocks_and_reads_zero(fd: int) -> None:
    write_pages(fd, list(range(8)))
    assert syscalls.fstat_blocks_bytes(fd) == 8 * P
    syscalls.punch_hole(fd, 2 * P, 3 * P)
    assert syscalls.fstat_blocks_bytes(fd) == 5 * P
    assert os.pread(fd, 3 * P, 2 * P) == bytes(3 * P)
    assert os.pread(fd, P, P) == b"\xa5" * P
    assert os.pread(fd, P, 5 * P) == b"\xa5" * P
    assert os.fstat(fd).st_size == FILE_SIZE  # KEEP_SIZE


def test_punch_hole_bad_length_raises(fd: int) -> None:
    with pytest.raises(OSError) as info:
        syscalls.punch_hole(fd, 0, 0)
    assert info.value.errno == errno.EINVAL


def test_punch_holes_batch_with_one_failing_range(fd: int) -> None:
    pages = [0, 4, 8, 12, 16]
    write_pages(fd, pages)
    ranges = [(p * P, (p + 1) * P) for p in pages]
    faults.inject("fallocate", errno.EIO, times=1, after=2)
    failed = syscalls.punch_holes(fd, ranges)
    assert [(s, e) for s, e, _ in failed] == [ranges[2]]
    assert failed[0][2].errno == errno.EIO
    assert faults.calls("fallocate") == 1
    assert syscalls.fstat_blocks_bytes(fd) == P
    assert syscalls.data_ranges(fd, 0, FILE_SIZE) == [ranges[2]]
    assert not faults.armed()


def test_punch_holes_reports_kernel_errors_without_raising(fd: int) -> None:
    write_pages(fd, [0, 1])
    failed = syscalls.punch_holes(fd, [(0, P), (5 * P, 5 * P), (P, 2 * P)])
    assert len(failed) == 1
    start, end, exc = failed[0]
    assert (start, end, exc.errno) == (5 * P, 5 * P, errno.EINVAL)
    assert syscalls.fstat_blocks_bytes(fd) == 0
    assert syscalls.punch_holes(fd, []) == []


def test_commit_raises_blocks_and_keeps_size(fd: int) -> None:
    assert syscalls.fstat_blocks_bytes(fd) == 0
    syscalls.commit(fd, 4 * P, 16 * P)
    assert syscalls.fstat_blocks_bytes(fd) == 16 * P
    assert os.fstat(fd).st_size == FILE_SIZE
    assert os.pread(fd, 16 * P, 4 * P) == bytes(16 * P)
    syscalls.punch_hole(fd, 0, FILE_SIZE)
    assert syscalls.fstat_blocks_bytes(fd) == 0


# --- data_ranges ----------------------------------------------------------


def test_data_ranges_after_scattered_writes(fd: int) -> None:
    assert syscalls.data_ranges(fd, 0, FILE_SIZE) == []
    write_pages(fd, [0, 1, 5, 6, 7, 20, 63])
    assert syscalls.data_ranges(fd, 0, FILE_SIZE) == [
        (0, 2 * P),
        (5 * P, 8 * P),
        (20 * P, 21 * P),
        (63 * P, 64 * P),
    ]
    # Clipped to the query on both sides.
    assert syscalls.data_ranges(fd, 6 * P, 21 * P - 100) == [(6 * P, 8 * P), (20 * P, 21 * P - 100)]
    assert syscalls.data_ranges(fd, 8 * P, 20 * P) == []
    assert syscalls.data_ranges(fd, 3 * P, 3 * P) == []
    # Past the end of file: ENXIO ends the walk quietly.
    assert syscalls.data_ranges(fd, FILE_SIZE, 2 * FILE_SIZE) == []
    with pytest.raises(ValueError):
        syscalls.data_ranges(fd, 5, 4)


# --- mincore / madvise / memset on a real mapping -------------------------


def test_mincore_reports_written_pages(mapped: tuple[mmap.mmap, int]) -> None:
    m, addr = mapped
    for p in (0, 3, 40):
        m[p * P] = 1
    vec = syscalls.mincore(addr, FILE_SIZE)
    assert len(vec) == FILE_SIZE // P
    assert [i for i, b in enumerate(vec) if b & 1] == [0, 3, 40]
    # Into a caller's buffer at an offset; a partial page counts as one page.
    buf = bytearray(10)
    assert syscalls.mincore(addr + 3 * P, P + 1, buf, vec_offset=4) is buf
    assert list(buf) == [0, 0, 0, 0, 1, 0, 0, 0, 0, 0]
    with pytest.raises(ValueError):
        syscalls.mincore(addr + 1, P)
    with pytest.raises(ValueError):
        syscalls.mincore(addr, 3 * P, bytearray(2))


def test_madvise_remove_frees_pages(fd: int, mapped: tuple[mmap.mmap, int]) -> None:
    m, addr = mapped
    m[0 : 4 * P] = b"\x07" * (4 * P)
    assert syscalls.fstat_blocks_bytes(fd) == 4 * P
    syscalls.madvise(addr, 2 * P, syscalls.MADV_REMOVE)
    assert syscalls.fstat_blocks_bytes(fd) == 2 * P
    assert m[0 : 2 * P] == bytes(2 * P)
    # DONTNEED on a shared mapping drops only our page tables, not the data.
    syscalls.madvise(addr + 2 * P, 2 * P, syscalls.MADV_DONTNEED)
    assert m[2 * P : 4 * P] == b"\x07" * (2 * P)
    with pytest.raises(OSError) as info:
        syscalls.madvise(addr + 1, P, syscalls.MADV_DONTNEED)
    assert info.value.errno == errno.EINVAL


def test_madvise_populate_write_commits(fd: int, mapped: tuple[mmap.mmap, int]) -> None:
    _, addr = mapped
    try:
        syscalls.madvise(addr, 8 * P, syscalls.MADV_POPULATE_WRITE)
    except OSError as exc:  # kernels before 5.14
        assert exc.errno == errno.EINVAL
        pytest.skip("MADV_POPULATE_WRITE not supported")
    assert syscalls.fstat_blocks_bytes(fd) == 8 * P


def test_memset_zero(fd: int, mapped: tuple[mmap.mmap, int]) -> None:
    m, addr = mapped
    m[0 : 3 * P] = b"\xff" * (3 * P)
    syscalls.memset_zero(addr + P - 10, P + 20)
    assert m[0 : P - 10] == b"\xff" * (P - 10)
    assert m[P - 10 : 2 * P + 10] == bytes(P + 20)
    assert m[2 * P + 10 : 3 * P] == b"\xff" * (P - 10)
    assert os.pread(fd, 20, P - 10) == bytes(20)
    syscalls.memset_zero(addr, 0)
    with pytest.raises(ValueError):
        syscalls.memset_zero(0, P)
    with pytest.raises(ValueError):
        syscalls.memset_zero(addr, -1)


# --- injected faults through the seam -------------------------------------


def _op_calls(fd: int, addr: int) -> dict[str, Callable[[], object]]:
    return {
        "fallocate": lambda: syscalls.commit(fd, 0, P),
        "fstat": lambda: syscalls.fstat_blocks_bytes(fd),
        "mincore": lambda: syscalls.mincore(addr, P),
        "madvise": lambda: syscalls.madvise(addr, P, syscalls.MADV_DONTNEED),
        "memset": lambda: syscalls.memset_zero(addr, P),
        "lseek": lambda: syscalls.data_ranges(fd, 0, FILE_SIZE),
    }


@pytest.mark.parametrize("op", ["fallocate", "fstat", "mincore", "madvise", "memset", "lseek"])
def test_injected_fault_raises_errno_and_counts(
    op: str, fd: int, mapped: tuple[mmap.mmap, int]
) -> None:
    call = _op_calls(fd, mapped[1])[op]
    call()  # works before arming
    with faults.injected(op, errno.ENOMEM, times=2):
        for _ in range(2):
            with pytest.raises(OSError) as info:
                call()
            assert info.value.errno == errno.ENOMEM
            assert info.value.strerror == os.strerror(errno.ENOMEM)
        call()  # the two failures are spent
    assert faults.calls(op) == 2
    call()


def test_punch_hole_fault_leaves_data(fd: int) -> None:
    write_pages(fd, [0])
    with faults.injected("fallocate", errno.EINTR), pytest.raises(InterruptedError):
        syscalls.punch_hole(fd, 0, P)
    assert syscalls.fstat_blocks_bytes(fd) == P
    assert faults.calls("fallocate") == 1


# --- the FaultInjector itself ---------------------------------------------


def test_injector_after_and_times() -> None:
    inj = FaultInjector()
    inj.inject("mmap", errno.EAGAIN, times=2, after=3)
    outcomes: list[int | None] = []
    for _ in range(7):
        try:
            inj.check("mmap")
            outcomes.append(0)
        except OSError as exc:
            outcomes.append(exc.errno)
    eagain = errno.EAGAIN
    assert outcomes == [0, 0, 0, eagain, eagain, 0, 0]
    assert inj.calls("mmap") == 2
    assert inj.armed() == frozenset()


def test_injector_until_cleared_and_reset_counter() -> None:
    inj = FaultInjector()
    inj.inject("fstat", errno.EBADF)
    for _ in range(5):
        with pytest.raises(OSError):
            inj.check("fstat")
    inj.check("mmap")  # other ops are unaffected
    assert inj.calls("fstat") == 5
    inj.clear("fstat")
    inj.check("fstat")
    assert inj.calls("fstat") == 5  # kept after clear
    inj.inject("fstat", errno.EBADF, after=1)
    assert inj.calls("fstat") == 0  # re-arming restarts the count
    inj.clear()
    inj.check("fstat")


def test_injector_rejects_bad_arguments() -> None:
    inj = FaultInjector()
    with pytest.raises(ValueError):
        inj.inject("open", errno.EIO)
    with pytest.raises(ValueError):
        inj.clear("open")
    with pytest.raises(ValueError):
        inj.calls("open")
    with pytest.raises(ValueError):
        inj.inject("mmap", 0)
    with pytest.raises(ValueError):
        inj.inject("mmap", errno.EIO, times=0)
    with pytest.raises(ValueError):
        inj.inject("mmap", errno.EIO, after=-1)
    inj.inject("mmap", errno.EIO)
    with pytest.raises(ValueError):
        inj.check("open")  # names are checked whenever something is armed
    assert set(OPS) >= {"fallocate", "mmap", "ftruncate", "mincore", "madvise", "fstat", "memset"}


def test_injected_clears_on_error() -> None:
    inj = FaultInjector()
    with pytest.raises(KeyError), inj.injected("memset", errno.EFAULT):
        raise KeyError("boom")
    inj.check("memset")
    assert inj.armed() == frozenset()


def test_injector_is_thread_safe() -> None:
    inj = FaultInjector()
    inj.inject("madvise", errno.EIO, times=500, after=100)
    fired = [0] * 8
    barrier = threading.Barrier(8)

    def worker(i: int) -> None:
        barrier.wait()
        for _ in range(1000):
            try:
                inj.check("madvise")
            except OSError:
                fired[i] += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(fired) == 500 == inj.calls("madvise")
