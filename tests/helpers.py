"""Shared helpers for the lifecycle, bad-input and concurrency tests.

Nothing here mocks anything: the helpers read ``/proc``, fill and check real
mappings of real memfds, and snapshot the allocator through its public calls.
"""

from __future__ import annotations

import gc
import os
import struct
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

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

    text: str
    stats: MemoryStats
    size: int | None
    pending: int
    file_size: int | None

    @classmethod
    def of(cls, mf: MemoryFile) -> State:
        if mf.closed:
            size = file_size = None
        else:
            size = mf.total_size()
            file_size = os.fstat(mf.fd).st_size
        return cls(str(mf), mf.accounting.snapshot(), size, mf.reclaim_pending(), file_size)


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
