"""Shared helpers for the lifecycle, bad-input and concurrency tests.

Nothing here mocks anything: the helpers read ``/proc``, fill and check real
mappings of real memfds, and snapshot the allocator through its public calls.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import os
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import anyio.from_thread
from anyio.from_thread import BlockingPortal

from aiopgalloc import PAGE_SIZE, AccessType, FileRange, MemoryFile, MemoryStats

P = PAGE_SIZE
_ZEROS = memoryview(bytes(4 << 20))


def open_fds() -> set[int]:
    """The fds of this process right now (the listing's own fd excluded).

    Collects garbage first: an mmap left behind by an earlier test (a view
    kept past its file's close) holds a private dup of the fd, which would
    otherwise close at a random moment in the middle of a before/after
    comparison."""
    gc.collect()
    fds = set()
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            os.fstat(fd)
        except OSError:
            continue  # the directory fd os.listdir used, already closed
        fds.add(fd)
    return fds


def fd_is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


@dataclass(frozen=True)
class State:
    """What a failed call must leave exactly as it was."""

    page_map: list[Any]
    stats: MemoryStats
    size: int | None
    pending: int | None
    file_size: int | None

    @classmethod
    def of(cls, mf: MemoryFile) -> State:
        if mf.closed:
            size = file_size = pending = None
        else:
            size = mf.total_size()
            file_size = os.fstat(mf.fd).st_size
            pending = mf.reclaim_pending()
        return cls(mf.page_map(), mf.accounting.snapshot(), size, pending, file_size)


def stamp_bytes(counter: int, length: int) -> bytes:
    """An 8-byte counter repeated over ``length`` bytes."""
    word = struct.pack("<Q", counter)
    return word * (length // 8)


def write_all(mf: MemoryFile, fr: FileRange, data: bytes) -> None:
    """Write ``data`` (exactly ``fr.length`` bytes) into ``fr``."""
    pos = 0
    for v in mf.map_internal(fr, AccessType.READ_WRITE):
        n = len(v)
        v[:] = data[pos : pos + n]
        pos += n
        v.release()
    assert pos == len(data)


def fill_byte(mf: MemoryFile, fr: FileRange, byte: int) -> None:
    for v in mf.map_internal(fr, AccessType.WRITE):
        v[:] = bytes([byte]) * len(v)
        v.release()


def read_all(mf: MemoryFile, fr: FileRange) -> bytes:
    out = []
    for v in mf.map_internal(fr, AccessType.READ):
        out.append(v.tobytes())
        v.release()
    return b"".join(out)


def is_zero(mf: MemoryFile, fr: FileRange) -> bool:
    for v in mf.map_internal(fr, AccessType.READ):
        try:
            n = len(v)
            pos = 0
            while pos < n:
                step = min(len(_ZEROS), n - pos)
                if v[pos : pos + step] != _ZEROS[:step]:
                    return False
                pos += step
        finally:
            v.release()
    return True


def run_child(code: str, *, pass_fds: tuple[int, ...] = (), close_fds: bool = True) -> Any:
    """Run ``python -c code`` in a child process; return the CompletedProcess."""
    return subprocess.run(
        [sys.executable, "-c", code],
        pass_fds=pass_fds,
        close_fds=close_fds,
        capture_output=True,
        text=True,
        timeout=60,
    )


# ------------------------------------------------ reliability-suite helpers

FUZZ_LONG = os.environ.get("AIOPGALLOC_FUZZ", "").lower() == "long"
"""``AIOPGALLOC_FUZZ=long`` selects the long profile of the model, stress
and security tests (many times the steps and operations of a CI run)."""

# Idle worker threads the event loops keep around for a while (anyio's on
# asyncio, trio's thread cache): not leaks.
_WORKER_THREAD_PREFIXES = ("AnyIO worker thread", "Trio thread")


def backend_id(anyio_backend: tuple[str, dict[str, Any]]) -> str:
    """``asyncio``, ``asyncio+uvloop`` or ``trio``: the ids conftest uses."""
    name, options = anyio_backend
    return name + ("+uvloop" if options.get("use_uvloop") else "")


@contextlib.contextmanager
def blocking_portal(anyio_backend: tuple[str, dict[str, Any]]) -> Iterator[BlockingPortal]:
    """An event loop of the given backend running in a background thread.

    Synchronous test code (a hypothesis state machine) calls the memory
    file's sync methods directly and its async ones with ``portal.call``."""
    name, options = anyio_backend
    with anyio.from_thread.start_blocking_portal(backend=name, backend_options=options) as portal:
        yield portal


def non_worker_threads() -> set[threading.Thread]:
    """Every live thread except the event loops' idle worker threads."""
    return {t for t in threading.enumerate() if not t.name.startswith(_WORKER_THREAD_PREFIXES)}


def memfd_mappings(name: str = "memfd:aiopgalloc") -> list[str]:
    """The lines of /proc/self/maps that map a memfd called ``name``
    (garbage is collected first: a dropped view unmaps when collected)."""
    gc.collect()
    with open("/proc/self/maps") as f:
        return [line.rstrip("\n") for line in f if name in line]


def memfd_fds(name: str = "memfd:aiopgalloc") -> list[int]:
    """This process's fds that refer to a memfd called ``name``."""
    out = []
    for fd in open_fds():
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if name in target:
            out.append(fd)
    return out


def page_stamps(mf: MemoryFile, start: int, end: int) -> bytes:
    """The first byte of every page of ``[start, end)``, read through
    ``map_internal`` (one strided copy per view).  Touches those pages: call
    it only on pages known to be allocated."""
    out = []
    for v in mf.map_internal(FileRange(start, end), AccessType.READ):
        out.append(v[::P].tobytes())
        v.release()
    return b"".join(out)


def write_page_stamps(mf: MemoryFile, fr: FileRange, stamps: bytes) -> None:
    """Write ``stamps[i]`` as the first byte of page ``i`` of ``fr``."""
    pos = 0
    for v in mf.map_internal(fr, AccessType.WRITE):
        n = len(v) // P
        v[::P] = stamps[pos : pos + n]
        pos += n
        v.release()
    assert pos == len(stamps)


def data_runs(fd: int, start: int, end: int) -> list[tuple[int, int]]:
    """The runs of ``[start, end)`` that hold data (SEEK_DATA/SEEK_HOLE on
    ``fd``; use a private description: the walk moves its offset).  Pages
    outside them are holes and read as zero."""
    runs = []
    pos = start
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                break
            raise
        if data >= end:
            break
        hole = os.lseek(fd, data, os.SEEK_HOLE)
        runs.append((data, min(hole, end)))
        pos = hole
    return runs


# ------------------------------------------------ a window on the internals
# The few tests that must see a part of a MemoryFile beyond its public API
# (the eviction engine's counters, the mapping's regions, the lock) go
# through these, so the private names live in one place.


def evictions_of(mf: MemoryFile) -> Any:
    """The file's ``aiopgalloc.eviction.Evictions``."""
    return mf._evictions


def mapping_of(mf: MemoryFile) -> Any:
    """The file's ``aiopgalloc.host.mapping.FileMapping``."""
    return mf._handle.mapping


def books_of(mf: MemoryFile) -> Any:
    """The file's ``aiopgalloc._books.PageBooks`` (readable after close)."""
    return mf._books


def lock_of(mf: MemoryFile) -> Any:
    """The lock that guards the file's books."""
    return mf._mu


def usage_segments(mf: MemoryFile) -> list[tuple[int, int, Any, int]]:
    """Live and releasing segments as ``(start, end, kind, refs)``."""
    return [(r.start, r.end, r.kind, r.refs) for r in mf.page_map() if r.state != "freed"]
