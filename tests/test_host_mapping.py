"""Tests of aiopgalloc.host.mapping.FileMapping on real memfds and mmaps."""

from __future__ import annotations

import errno
import fcntl
import gc
import os
import sys
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

import pytest

from aiopgalloc.host import syscalls
from aiopgalloc.host.faults import faults
from aiopgalloc.host.hugepage import HUGE_PAGE_SIZE, PAGE_SIZE
from aiopgalloc.host.mapping import RESERVATION_MIN, FileMapping
from aiopgalloc.host.memfd import create_memfd, truncate

P = PAGE_SIZE
CHUNK = 64 * 1024
CHUNKS = 4
SIZE = CHUNK * CHUNKS
NAME = f"test-mapping-{os.getpid()}"


@pytest.fixture(autouse=True)
def _no_leftover_faults() -> Iterator[None]:
    faults.reset()
    yield
    faults.reset()


@pytest.fixture
def fd() -> Iterator[int]:
    fd = create_memfd(NAME)
    truncate(fd, SIZE)
    yield fd
    os.close(fd)


@pytest.fixture
def fm(fd: int) -> Iterator[FileMapping]:
    fm = FileMapping(fd, CHUNK)
    fm.set_file_size(SIZE)
    yield fm
    fm.close()


def file_maps(fd: int) -> list[tuple[int, int]]:
    """The ``(start, end)`` address ranges that map the file of ``fd``
    (garbage is collected first: a region goes with its last view)."""
    gc.collect()
    inode = str(os.fstat(fd).st_ino)
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            if f"memfd:{NAME}" in line and fields[4] == inode:
                start, end = (int(x, 16) for x in fields[0].split("-"))
                out.append((start, end))
    return out


def mapped_bytes(fd: int) -> int:
    return sum(e - s for s, e in file_maps(fd))


class PauseAt:
    """Stops a worker thread when it calls the function ``name`` of
    ``aiopgalloc.host.syscalls``, until :meth:`resume`.

    Through a profile hook of that thread only: the call on the raw address
    then has every reference it took, exactly as in production."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.reached = threading.Event()
        self.go = threading.Event()

    def hook(self, frame: FrameType, event: str, arg: Any) -> None:
        if (
            event == "call"
            and frame.f_code.co_name == self.name
            and frame.f_globals.get("__name__") == syscalls.__name__
            and not self.reached.is_set()
        ):
            self.reached.set()
            assert self.go.wait(30)

    def run(self, fn: Callable[[], object], out: list[object]) -> threading.Thread:
        def body() -> None:
            sys.setprofile(self.hook)
            try:
                out.append(fn())
            except BaseException as exc:  # handed to the test to assert on
                out.append(exc)
            finally:
                sys.setprofile(None)

        t = threading.Thread(target=body)
        t.start()
        assert self.reached.wait(30), f"the worker never called {self.name}"
        return t

    def resume(self) -> None:
        self.go.set()


# ----------------------------------------------------------- construction


def test_chunk_size_must_be_power_of_two_pages(fd: int) -> None:
    for bad in (0, P // 2, 3 * P, CHUNK + P):
        with pytest.raises(ValueError):
            FileMapping(fd, bad)
    assert FileMapping(fd, P).chunk_size == P


def test_maps_lazily_once_in_one_aligned_reservation(fd: int) -> None:
    fm = FileMapping(fd, CHUNK)
    with pytest.raises(IndexError):
        fm.view(0, 1, writable=True)
    fm.set_file_size(2 * CHUNK)
    assert (fm.regions, fm.reserved_bytes, fm.mapped_bytes) == (0, 0, 0)
    assert file_maps(fd) == []
    v = fm.view(CHUNK, P, writable=True)
    assert len(v) == P
    assert (fm.regions, fm.reserved_bytes, fm.mapped_bytes) == (1, RESERVATION_MIN, 2 * CHUNK)
    # The whole declared size, in one VMA, on a huge-page boundary.
    ((start, end),) = file_maps(fd)
    assert end - start == 2 * CHUNK
    assert start % HUGE_PAGE_SIZE == 0
    fm.views(0, 2 * CHUNK, writable=False)
    fm.zero(0, P)
    assert file_maps(fd) == [(start, end)]
    with pytest.raises(IndexError):
        fm.view(2 * CHUNK, 1, writable=True)
    del v
    assert fm.close() == 0
    assert fm.regions == 0
    assert file_maps(fd) == []


def test_set_file_size_grows_only(fd: int) -> None:
    fm = FileMapping(fd, CHUNK)
    with pytest.raises(ValueError):
        fm.set_file_size(CHUNK + P)
    with pytest.raises(ValueError):
        fm.set_file_size(-CHUNK)
    fm.set_file_size(2 * CHUNK)
    fm.set_file_size(CHUNK)  # ignored
    assert fm.file_size == 2 * CHUNK
    fm.view(CHUNK, CHUNK, writable=True)
    fm.close()
    with pytest.raises(ValueError):
        fm.set_file_size(4 * CHUNK)
    assert fm.file_size == 2 * CHUNK


def test_never_maps_past_the_real_file_size(fd: int) -> None:
    fm = FileMapping(fd, CHUNK)
    fm.set_file_size(8 * CHUNK)  # the file only has CHUNKS chunks
    with pytest.raises(ValueError, match="SIGBUS"):
        fm.view(0, P, writable=True)
    assert (fm.regions, fm.mapped_bytes) == (0, 0)
    assert file_maps(fd) == []
    truncate(fd, 8 * CHUNK)
    fm.view(7 * CHUNK, CHUNK, writable=True)[-1] = 7
    assert os.pread(fd, 1, 8 * CHUNK - 1) == b"\7"
    fm.close()


# ------------------------------------------------------------------ views


def test_one_view_across_chunks(fd: int, fm: FileMapping) -> None:
    offset, length = CHUNK - 3 * P - 100, 2 * CHUNK + 5 * P + 7
    v = fm.view(offset, length, writable=True)
    assert len(v) == length and not v.readonly and v.format == "B" and v.contiguous
    pattern = bytes(i % 251 for i in range(length))
    v[:] = pattern
    assert os.pread(fd, length, offset) == pattern
    assert os.pread(fd, 1, offset - 1) == b"\0"
    assert os.pread(fd, 1, offset + length) == b"\0"
    # The same bytes through views(): one view per chunk piece crossed.
    views = fm.views(offset, length, writable=False)
    assert [len(x) for x in views] == [3 * P + 100, CHUNK, CHUNK, 2 * P - 93]
    assert b"".join(bytes(x) for x in views) == pattern
    # A second, independent mapping of the same file sees them too.
    other = FileMapping(fd, CHUNK)
    other.set_file_size(SIZE)
    assert bytes(other.view(offset, length, writable=False)) == pattern
    assert other.close() == 0
    # Writes through the file show through the views.
    os.pwrite(fd, b"ZZ", offset)
    assert bytes(v[:2]) == b"ZZ" and bytes(views[0][:2]) == b"ZZ"


def test_view_edge_cases(fm: FileMapping) -> None:
    assert len(fm.view(0, SIZE, writable=True)) == SIZE
    assert len(fm.view(SIZE, 0, writable=True)) == 0
    assert len(fm.view(SIZE - 1, 1, writable=False)) == 1
    assert fm.views(CHUNK, 0, writable=True) == []
    assert [len(v) for v in fm.views(0, SIZE, writable=False)] == [CHUNK] * CHUNKS
    assert [len(v) for v in fm.views(CHUNK, CHUNK, writable=True)] == [CHUNK]
    for call in (fm.view, fm.views):
        with pytest.raises(IndexError):
            call(SIZE - P, 2 * P, True)
        with pytest.raises(IndexError):
            call(SIZE + 1, 0, True)
        with pytest.raises(ValueError):
            call(-P, P, True)
        with pytest.raises(ValueError):
            call(0, -1, True)
    # A view cannot be widened past the range it was given, nor can the
    # array behind it reach the PROT_NONE part of the reservation.
    v = fm.view(P, P, writable=True)
    with pytest.raises(IndexError):
        v[P]
    assert len(memoryview(v.obj)) == SIZE  # type: ignore[arg-type]


def test_readonly_views_refuse_writes(fd: int, fm: FileMapping) -> None:
    os.pwrite(fd, b"keep", CHUNK - 2)
    v = fm.view(CHUNK - 2, 4, writable=False)
    views = fm.views(CHUNK - 2, 4, writable=False)
    assert v.readonly and [x.readonly for x in views] == [True, True]
    assert bytes(v) == b"keep" == b"".join(bytes(x) for x in views)
    with pytest.raises(TypeError):
        v[0] = 1
    with pytest.raises(TypeError):
        v.cast("B")[0] = 1
    with pytest.raises(TypeError):
        views[1][:] = b"xx"
    assert os.pread(fd, 4, CHUNK - 2) == b"keep"


# ----------------------------------------------------- raw-address calls


def test_zero_across_chunks(fd: int, fm: FileMapping) -> None:
    os.pwrite(fd, b"\xee" * (2 * CHUNK), CHUNK // 2)
    fm.zero(CHUNK - 10, CHUNK + 20)
    assert os.pread(fd, CHUNK // 2 - 10, CHUNK // 2) == b"\xee" * (CHUNK // 2 - 10)
    assert os.pread(fd, CHUNK + 20, CHUNK - 10) == bytes(CHUNK + 20)
    assert os.pread(fd, 10, 2 * CHUNK + 10) == b"\xee" * 10
    fm.zero(0, 0)
    fm.zero(SIZE, 0)
    with pytest.raises(IndexError):
        fm.zero(SIZE - 1, 2)
    with pytest.raises(ValueError):
        fm.zero(-1, 2)


def test_populate_commits_without_changing_bytes(fd: int, fm: FileMapping) -> None:
    os.pwrite(fd, b"x", 3 * P)
    fm.populate(2 * P, CHUNK + 4 * P)
    vec = fm.mincore(0, SIZE)
    resident = [i for i, b in enumerate(vec) if b & 1]
    assert resident == list(range(2, 2 + CHUNK // P + 4))
    assert os.pread(fd, 1, 3 * P) == b"x"
    fm.populate(0, 0)
    with pytest.raises(IndexError):
        fm.populate(SIZE - P, 2 * P)


def test_mincore_after_writing_some_pages(fd: int, fm: FileMapping) -> None:
    written = [0, 3, 17, 40, SIZE // P - 1]
    for p in written:
        os.pwrite(fd, b"x", p * P)
    vec = fm.mincore(0, SIZE)
    assert len(vec) == SIZE // P
    assert [i for i, b in enumerate(vec) if b & 1] == written
    # A sub-range straddling a chunk boundary, length rounded up to pages.
    sub = fm.mincore(2 * P, 16 * P + 1)
    assert [i for i, b in enumerate(sub) if b & 1] == [1, 15]
    syscalls.punch_hole(fd, 3 * P, P)
    assert not fm.mincore(3 * P, P)[0] & 1
    with pytest.raises(ValueError):
        fm.mincore(100, P)
    assert fm.mincore(P, 0) == bytearray()
    with pytest.raises(IndexError):
        fm.mincore(SIZE - P, P + 1)


# --------------------------------------------------------------- growth


def test_growth_maps_the_new_part_in_place(fd: int, fm: FileMapping) -> None:
    old = fm.view(0, SIZE, writable=True)
    old[-1] = 1
    ((start, _),) = file_maps(fd)
    truncate(fd, 3 * SIZE)
    fm.set_file_size(3 * SIZE)
    assert fm.mapped_bytes == SIZE  # not mapped until used
    new = fm.view(SIZE, 2 * SIZE, writable=True)
    new[0] = 2
    assert fm.mapped_bytes == 3 * SIZE and fm.regions == 1
    # Same reservation, merged into one VMA: the file is contiguous in memory.
    assert file_maps(fd) == [(start, start + 3 * SIZE)]
    assert bytes(fm.view(SIZE - 1, 2, writable=False)) == b"\1\2"
    assert old[-1] == 1


def test_outgrowing_the_reservation_moves_to_a_larger_one(fd: int) -> None:
    # Sparse: a file past RESERVATION_MIN costs address space, not memory.
    fm = FileMapping(fd, CHUNK)
    fm.set_file_size(SIZE)
    old = fm.view(SIZE - P, P, writable=True)
    old[:3] = b"old"
    big = RESERVATION_MIN + CHUNK
    truncate(fd, big)
    fm.set_file_size(big)
    tail = fm.view(big - P, P, writable=True)
    assert fm.regions == 2  # the old one is pinned by ``old``
    assert fm.reserved_bytes == 4 * RESERVATION_MIN  # a power of two >= twice the file
    assert fm.mapped_bytes == big
    # Both mappings are of the same file: coherent both ways.
    now = fm.view(SIZE - P, P, writable=True)
    assert bytes(now[:3]) == b"old"
    old[:3] = b"OLD"
    assert bytes(now[:3]) == b"OLD"
    now[3:6] = b"new"
    assert bytes(old[3:6]) == b"new"
    tail[-1] = 9
    assert os.pread(fd, 1, big - 1) == b"\t"
    assert sorted(e - s for s, e in file_maps(fd)) == [SIZE, big]
    del old
    gc.collect()
    assert fm.regions == 1
    assert [e - s for s, e in file_maps(fd)] == [big]
    del now, tail
    assert fm.close() == 0
    assert file_maps(fd) == []


def test_close_with_live_view_defers_unmap(fd: int) -> None:
    fm = FileMapping(fd, CHUNK)
    fm.set_file_size(SIZE)
    view = fm.view(CHUNK + P, P, writable=True)
    piece = fm.views(0, 2 * CHUNK, writable=True)[1][P : 2 * P]
    del view
    assert fm.close() == 1
    assert fm.close() == 0
    assert (fm.mapped_bytes, fm.reserved_bytes, fm.regions) == (0, 0, 1)
    assert mapped_bytes(fd) == SIZE
    # The surviving view still reads and writes the file.
    piece[:5] = b"alive"
    assert os.pread(fd, 5, CHUNK + P) == b"alive"
    os.pwrite(fd, b"both", CHUNK + P + 10)
    assert bytes(piece[10:14]) == b"both"
    for call in (
        lambda: fm.view(0, P, writable=True),
        lambda: fm.views(0, 0, writable=True),
        lambda: fm.zero(0, P),
        lambda: fm.populate(0, P),
        lambda: fm.mincore(0, P),
        lambda: fm.set_file_size(2 * SIZE),
    ):
        with pytest.raises(ValueError, match="closed"):
            call()
    del piece
    gc.collect()
    assert fm.regions == 0
    assert file_maps(fd) == []


# ---------------------------------------------------------------- threads


def test_concurrent_first_use_maps_once(fd: int, fm: FileMapping) -> None:
    barrier = threading.Barrier(8)
    got: list[memoryview] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        barrier.wait()
        v = fm.view((i % CHUNKS) * CHUNK, CHUNK, writable=True)
        with lock:
            got.append(v)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 8
    assert fm.regions == 1
    assert mapped_bytes(fd) == SIZE


@pytest.mark.parametrize("op", ["zero", "mincore", "populate"])
def test_close_while_a_call_is_on_the_raw_address(fd: int, op: str) -> None:
    """close() lands while another thread is inside memset / mincore /
    madvise on the mapping: the call finishes on mapped memory, and the
    region is unmapped once it returns."""
    os.pwrite(fd, b"\xaa" * SIZE, 0)
    fm = FileMapping(fd, CHUNK)
    fm.set_file_size(SIZE)
    fm.view(0, P, writable=False)  # mapped before the worker starts
    target = {"zero": "memset_zero", "mincore": "mincore", "populate": "madvise"}[op]
    pause = PauseAt(target)
    out: list[object] = []
    t = pause.run(lambda: getattr(fm, op)(0, SIZE), out)
    assert fm.close() == 1  # pinned by the call in progress
    assert fm.regions == 1 and mapped_bytes(fd) == SIZE
    pause.resume()
    t.join()
    (result,) = out
    assert not isinstance(result, BaseException), result
    if op == "zero":
        assert os.pread(fd, SIZE, 0) == bytes(SIZE)
    elif op == "mincore":
        assert isinstance(result, bytearray) and all(b & 1 for b in result)
    del result, out
    assert fm.regions == 0
    assert file_maps(fd) == []


def test_move_while_a_call_is_on_the_old_region(fd: int) -> None:
    os.pwrite(fd, b"\xbb" * SIZE, 0)
    fm = FileMapping(fd, CHUNK)
    fm.set_file_size(SIZE)
    fm.view(0, P, writable=False)
    pause = PauseAt("memset_zero")
    out: list[object] = []
    t = pause.run(lambda: fm.zero(CHUNK, CHUNK), out)
    big = RESERVATION_MIN + CHUNK
    truncate(fd, big)
    fm.set_file_size(big)
    # Still inside the mapped part: served by the old region, no move yet.
    fm.view(0, 2 * CHUNK, writable=False)
    assert (fm.regions, fm.reserved_bytes, fm.mapped_bytes) == (1, RESERVATION_MIN, SIZE)
    fm.view(big - P, P, writable=False)  # the move
    assert fm.regions == 2
    new = fm.view(0, 2 * CHUNK, writable=False)
    pause.resume()
    t.join()
    assert out == [None]
    assert bytes(new[CHUNK:]) == bytes(CHUNK)
    assert bytes(new[:CHUNK]) == b"\xbb" * CHUNK
    del out
    assert fm.regions == 1
    fm.close()


# ----------------------------------------------------------------- faults


def test_reservation_enomem_tries_smaller_ones(fd: int) -> None:
    fm = FileMapping(fd, CHUNK)
    fm.set_file_size(SIZE)
    with faults.injected("mmap", errno.ENOMEM, times=2):
        fm.view(0, P, writable=True)
        assert faults.calls("mmap") == 2
    assert fm.reserved_bytes == RESERVATION_MIN // 4
    assert fm.regions == 1
    # Every size refused, down to the file's own: the error, nothing mapped.
    other = FileMapping(fd, CHUNK)
    other.set_file_size(SIZE)
    with faults.injected("mmap", errno.ENOMEM), pytest.raises(OSError) as info:
        other.view(0, P, writable=True)
    assert info.value.errno == errno.ENOMEM
    assert (RESERVATION_MIN // HUGE_PAGE_SIZE).bit_length() == faults.calls("mmap")
    assert (other.regions, other.mapped_bytes) == (0, 0)
    other.view(0, P, writable=True)
    assert other.close() == 0
    assert fm.close() == 0


def test_injected_mmap_faults_leave_nothing_changed(fd: int, fm: FileMapping) -> None:
    # The reservation fails with something other than ENOMEM: no retry.
    with faults.injected("mmap", errno.EACCES, times=1), pytest.raises(PermissionError):
        fm.view(0, P, writable=True)
    assert faults.calls("mmap") == 1
    # The reservation succeeds, mapping the file into it fails.
    with faults.injected("mmap", errno.ENOMEM, times=1, after=1), pytest.raises(OSError):
        fm.view(0, P, writable=True)
    assert (fm.regions, fm.mapped_bytes) == (0, 0)
    assert file_maps(fd) == []
    v = fm.view(0, P, writable=True)
    # Growing in place fails: the mapped part is untouched and still works.
    truncate(fd, 2 * SIZE)
    fm.set_file_size(2 * SIZE)
    with faults.injected("mmap", errno.ENOMEM, times=1), pytest.raises(OSError):
        fm.views(SIZE - P, 2 * P, writable=True)
    assert fm.mapped_bytes == SIZE and fm.regions == 1
    v[0] = 5
    assert fm.view(0, 1, writable=False)[0] == 5
    fm.view(2 * SIZE - P, P, writable=True)
    assert fm.regions == 1 and fm.mapped_bytes == 2 * SIZE


def test_injected_memset_and_mincore_faults(fd: int, fm: FileMapping) -> None:
    os.pwrite(fd, b"\x01" * P, 0)
    with faults.injected("memset", errno.EFAULT), pytest.raises(OSError) as info:
        fm.zero(0, P)
    assert info.value.errno == errno.EFAULT
    assert os.pread(fd, P, 0) == b"\x01" * P
    with faults.injected("mincore", errno.EAGAIN), pytest.raises(BlockingIOError):
        fm.mincore(0, SIZE)
    with faults.injected("madvise", errno.ENOMEM), pytest.raises(OSError) as info:
        fm.populate(0, P)
    assert info.value.errno == errno.ENOMEM
    del info
    assert faults.calls("memset") == faults.calls("mincore") == faults.calls("madvise") == 1
    # Nothing was left pinned by the failed calls: close unmaps everything.
    assert fm.close() == 0
    assert file_maps(fd) == []


def test_kernel_refusing_the_file_mapping(fd: int) -> None:
    """A real mmap failure (a write-sealed memfd cannot be mapped shared
    and writable): the error comes out, nothing of the file is mapped, and
    the object stays usable to close."""
    sealed = os.memfd_create(NAME, os.MFD_ALLOW_SEALING | os.MFD_CLOEXEC)
    try:
        os.ftruncate(sealed, SIZE)
        fcntl.fcntl(sealed, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)
        fm = FileMapping(sealed, CHUNK)
        fm.set_file_size(SIZE)
        for _ in range(2):
            with pytest.raises(PermissionError) as info:
                fm.view(0, P, writable=False)
            assert info.value.errno == errno.EPERM
            del info
            assert (fm.regions, fm.mapped_bytes) == (0, 0)
        assert file_maps(sealed) == []
        assert fm.close() == 0
    finally:
        os.close(sealed)
