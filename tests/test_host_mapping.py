"""Tests of aiopgalloc.host.mapping.ChunkMappings on real memfds and mmaps."""

from __future__ import annotations

import errno
import gc
import mmap
import os
import threading
from collections.abc import Iterator

import pytest

from aiopgalloc.host import syscalls
from aiopgalloc.host.faults import faults
from aiopgalloc.host.hugepage import PAGE_SIZE
from aiopgalloc.host.mapping import ChunkMappings
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
def cm(fd: int) -> Iterator[ChunkMappings]:
    cm = ChunkMappings(fd, CHUNK)
    cm.set_file_size(SIZE)
    yield cm
    cm.close()


def kernel_mappings(fd: int) -> int:
    """How many chunks' worth of this process's address space maps the file of ``fd``.

    Counted in bytes, not lines: the kernel merges adjacent mappings of
    consecutive file offsets into one line of ``/proc/self/maps``.
    """
    inode = str(os.fstat(fd).st_ino)
    total = 0
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            if f"memfd:{NAME}" in line and fields[4] == inode:
                start, end = (int(x, 16) for x in fields[0].split("-"))
                total += end - start
    return total // CHUNK


def test_chunk_size_must_be_power_of_two_pages(fd: int) -> None:
    for bad in (0, P // 2, 3 * P, CHUNK + P):
        with pytest.raises(ValueError):
            ChunkMappings(fd, bad)
    assert ChunkMappings(fd, P).chunk_size == P


def test_chunks_map_lazily_and_stay_put(fd: int) -> None:
    cm = ChunkMappings(fd, CHUNK)
    with pytest.raises(IndexError):
        cm.chunk(0)
    cm.set_file_size(2 * CHUNK)
    assert cm.mapped_chunks == 0
    assert kernel_mappings(fd) == 0
    m1 = cm.chunk(1)
    assert len(m1) == CHUNK
    assert cm.mapped_chunks == 1
    assert cm.chunk(1) is m1
    addr = cm.address(1)
    assert addr % P == 0
    assert cm.address(1) == addr
    assert cm.mapped_chunks == 1
    cm.address(0)
    assert cm.mapped_chunks == 2
    assert kernel_mappings(fd) == 2
    with pytest.raises(IndexError):
        cm.chunk(2)
    with pytest.raises(IndexError):
        cm.chunk(-1)
    assert cm.close() == 0
    assert kernel_mappings(fd) == 0


def test_set_file_size_grows_only(fd: int) -> None:
    cm = ChunkMappings(fd, CHUNK)
    with pytest.raises(ValueError):
        cm.set_file_size(CHUNK + P)
    cm.set_file_size(2 * CHUNK)
    cm.set_file_size(CHUNK)  # ignored
    assert cm.file_size == 2 * CHUNK
    cm.chunk(1)
    cm.close()
    with pytest.raises(ValueError):
        cm.set_file_size(4 * CHUNK)


def test_never_maps_past_the_real_file_size(fd: int) -> None:
    cm = ChunkMappings(fd, CHUNK)
    cm.set_file_size(8 * CHUNK)  # the file only has CHUNKS chunks
    with pytest.raises(ValueError):
        cm.chunk(CHUNKS)
    assert cm.mapped_chunks == 0
    cm.close()


def test_views_across_chunk_boundary(fd: int, cm: ChunkMappings) -> None:
    offset, length = CHUNK - 3 * P - 100, 2 * CHUNK + 5 * P + 7
    views = cm.views(offset, length, writable=True)
    assert [len(v) for v in views] == [3 * P + 100, CHUNK, CHUNK, 2 * P - 93]
    assert sum(len(v) for v in views) == length
    pattern = bytes(i % 251 for i in range(length))
    pos = 0
    for v in views:
        assert not v.readonly
        v[:] = pattern[pos : pos + len(v)]
        pos += len(v)
    assert os.pread(fd, length, offset) == pattern
    assert os.pread(fd, 1, offset - 1) == b"\0"
    assert os.pread(fd, 1, offset + length) == b"\0"
    # A second, independent set of mappings of the same file sees the bytes.
    other = ChunkMappings(fd, CHUNK)
    other.set_file_size(SIZE)
    assert b"".join(bytes(v) for v in other.views(offset, length, writable=False)) == pattern
    assert other.close() == 0
    # Writes through the file show through the views.
    os.pwrite(fd, b"ZZ", offset)
    assert bytes(views[0][:2]) == b"ZZ"
    del views, v


def test_views_edge_cases(cm: ChunkMappings) -> None:
    assert cm.views(CHUNK, 0, writable=True) == []
    assert [len(v) for v in cm.views(0, SIZE, writable=False)] == [CHUNK] * CHUNKS
    assert [len(v) for v in cm.views(CHUNK, CHUNK, writable=True)] == [CHUNK]
    with pytest.raises(IndexError):
        cm.views(SIZE - P, 2 * P, writable=True)
    with pytest.raises(ValueError):
        cm.views(-P, P, writable=True)
    with pytest.raises(ValueError):
        cm.views(0, -1, writable=True)


def test_readonly_views_refuse_writes(fd: int, cm: ChunkMappings) -> None:
    os.pwrite(fd, b"keep", CHUNK - 2)
    views = cm.views(CHUNK - 2, 4, writable=False)
    assert [v.readonly for v in views] == [True, True]
    assert b"".join(bytes(v) for v in views) == b"keep"
    with pytest.raises(TypeError):
        views[0][0] = 1
    with pytest.raises(TypeError):
        views[1][:] = b"xx"
    assert os.pread(fd, 4, CHUNK - 2) == b"keep"


def test_zero_across_chunks(fd: int, cm: ChunkMappings) -> None:
    os.pwrite(fd, b"\xee" * (2 * CHUNK), CHUNK // 2)
    cm.zero(CHUNK - 10, CHUNK + 20)
    assert os.pread(fd, CHUNK // 2 - 10, CHUNK // 2) == b"\xee" * (CHUNK // 2 - 10)
    assert os.pread(fd, CHUNK + 20, CHUNK - 10) == bytes(CHUNK + 20)
    assert os.pread(fd, 10, 2 * CHUNK + 10) == b"\xee" * 10
    cm.zero(0, 0)
    with pytest.raises(IndexError):
        cm.zero(SIZE - 1, 2)


def test_mincore_after_writing_some_pages(fd: int, cm: ChunkMappings) -> None:
    written = [0, 3, 17, 40, SIZE // P - 1]
    for p in written:
        os.pwrite(fd, b"x", p * P)
    vec = cm.mincore(0, SIZE)
    assert len(vec) == SIZE // P
    assert [i for i, b in enumerate(vec) if b & 1] == written
    # A sub-range straddling a chunk boundary, length rounded up to pages.
    sub = cm.mincore(2 * P, 16 * P + 1)
    assert [i for i, b in enumerate(sub) if b & 1] == [1, 15]
    syscalls.punch_hole(fd, 3 * P, P)
    assert not cm.mincore(3 * P, P)[0] & 1
    with pytest.raises(ValueError):
        cm.mincore(100, P)
    assert cm.mincore(P, 0) == bytearray()


def test_close_with_live_view_defers_unmap(fd: int) -> None:
    cm = ChunkMappings(fd, CHUNK)
    cm.set_file_size(SIZE)
    (view,) = cm.views(CHUNK + P, P, writable=True)
    cm.views(0, 10, writable=False)  # dropped at once: its chunk can close
    assert cm.mapped_chunks == 2
    assert kernel_mappings(fd) == 2
    assert cm.close() == 1
    assert cm.mapped_chunks == 0
    assert cm.close() == 0
    assert kernel_mappings(fd) == 1
    # The surviving view still reads and writes the file.
    view[:5] = b"alive"
    assert os.pread(fd, 5, CHUNK + P) == b"alive"
    os.pwrite(fd, b"both", CHUNK + P + 10)
    assert bytes(view[10:14]) == b"both"
    for call in (
        lambda: cm.chunk(0),
        lambda: cm.views(0, P, writable=True),
        lambda: cm.address(0),
        lambda: cm.zero(0, P),
        lambda: cm.mincore(0, P),
    ):
        with pytest.raises(ValueError):
            call()
    del view
    gc.collect()
    assert kernel_mappings(fd) == 0


def test_concurrent_first_use_maps_once(fd: int, cm: ChunkMappings) -> None:
    barrier = threading.Barrier(8)
    got: list[mmap.mmap] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        barrier.wait()
        m = cm.chunk(i % 2)
        with lock:
            got.append(m)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert cm.mapped_chunks == 2
    assert len({id(m) for m in got}) == 2
    assert kernel_mappings(fd) == 2


def test_injected_mmap_fault(cm: ChunkMappings) -> None:
    with faults.injected("mmap", errno.ENOMEM, times=1):
        with pytest.raises(OSError) as info:
            cm.views(0, 2 * CHUNK, writable=True)
        assert info.value.errno == errno.ENOMEM
    assert faults.calls("mmap") == 1
    assert cm.mapped_chunks == 0
    assert len(cm.views(0, 2 * CHUNK, writable=True)) == 2


def test_injected_memset_and_mincore_faults(fd: int, cm: ChunkMappings) -> None:
    os.pwrite(fd, b"\x01" * P, 0)
    with faults.injected("memset", errno.EFAULT), pytest.raises(OSError) as info:
        cm.zero(0, P)
    assert info.value.errno == errno.EFAULT
    assert os.pread(fd, P, 0) == b"\x01" * P
    with faults.injected("mincore", errno.EAGAIN), pytest.raises(BlockingIOError):
        cm.mincore(0, SIZE)
    assert faults.calls("memset") == 1
    assert faults.calls("mincore") == 1
    # Nothing was left pinned: close unmaps everything.
    assert cm.close() == 0
