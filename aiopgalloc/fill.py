"""Allocating and filling from a reader in one call."""

from __future__ import annotations

import io
from typing import Protocol

import anyio
import anyio.abc

from .errors import ClosedError
from .options import AccessType
from .ranges import PAGE_SIZE, FileRange
from .usage import MemoryKind

__all__ = ["allocate_and_fill"]


class _File(Protocol):
    """What filling needs of a memory file (its public calls)."""

    @property
    def closed(self) -> bool: ...

    def allocate(self, length: int, kind: MemoryKind = ...) -> FileRange: ...

    def map_internal(self, fr: FileRange, at: AccessType = ...) -> list[memoryview]: ...

    def dec_ref(self, fr: FileRange) -> None: ...


_STEP = 8 << 20  # bytes per readinto call (and per thread hop)


async def allocate_and_fill(mf: _File, length: int, kind: MemoryKind, reader: object) -> FileRange:
    """The body of ``MemoryFile.allocate_and_fill``."""
    if not (
        callable(getattr(reader, "readinto", None))
        or isinstance(reader, anyio.abc.ByteReceiveStream)
    ):
        raise TypeError("reader must have a readinto() method or be an anyio ByteReceiveStream")
    fr = mf.allocate(length, kind)
    try:
        n = await _fill(mf.map_internal(fr, AccessType.WRITE), reader)
    except BaseException:
        mf.dec_ref(fr)
        raise
    kept = n - n % PAGE_SIZE
    if kept == 0:
        mf.dec_ref(fr)
        raise EOFError(f"the reader gave {n} bytes, less than a page")
    if kept < fr.length:
        mf.dec_ref(FileRange(fr.start + kept, fr.end))
        fr = FileRange(fr.start, fr.start + kept)
    elif mf.closed:
        # The block ended while the reader was being read: the range
        # belongs to a file that is gone.
        raise ClosedError("memory file closed during allocate_and_fill")
    return fr


async def _fill(views: list[memoryview], reader: object) -> int:
    """Fill views from a reader; return the bytes written (stops at EOF)."""
    total = 0
    if isinstance(reader, anyio.abc.ByteReceiveStream):
        for view in views:
            pos = 0
            while pos < len(view):
                try:
                    data = await reader.receive(len(view) - pos)
                except anyio.EndOfStream:
                    return total
                view[pos : pos + len(data)] = data
                pos += len(data)
                total += len(data)
        return total
    readinto = reader.readinto  # type: ignore[attr-defined]
    inline = isinstance(reader, io.BytesIO)
    for view in views:
        pos = 0
        while pos < len(view):
            part = view[pos : pos + _STEP]
            if inline:
                n = readinto(part)
            else:
                n = await anyio.to_thread.run_sync(readinto, part)
            if n is None:
                raise BlockingIOError("the reader is non-blocking and had no data")
            if not n:
                return total
            pos += n
            total += n
    return total
