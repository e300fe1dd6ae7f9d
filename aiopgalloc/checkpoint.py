"""Checkpoints: saving a memory file's state and pages, and loading them back.

What is saved
-------------
The allocator's books (the file size and every live segment with its kind
and reference count) and the bytes of the live pages that hold memory and
are not all zero.  Clean pages, freed pages waiting for the releaser and
pages being released are free: they are gaps in the saved books and none of
their bytes are saved.  Live pages never touched, or committed and all zero,
read as zero after loading without being stored.  This is what later gVisor
does (metadata plus the non-zero committed pages).  Evictable marks are not
saved (they name Python objects): like gVisor's ``SaveTo``, ``save`` refuses
while any user has evictable ranges or a running eviction.

The format, version 1, byte by byte
-----------------------------------
Integers are little-endian; offsets count from the checkpoint's first byte.

The header, 32 bytes::

     0   8  magic b"AIOPGCKP"
     8   2  format version (1); a reader refuses a version above its own
    10   2  flags; none defined yet, a reader refuses any set bit
    12   4  page size of the writer (4096); must be the reader's
    16   8  chunk size of the writer (for information)
    24   4  zero
    28   4  CRC-32 of bytes 0-27

Bytes 0-11 will mean the same in every later version, so any reader can
tell a newer checkpoint from a damaged one.  Sections follow, each::

     0   4  tag, ASCII: "META", "PAGE" or "END "
     4   4  zero (reserved)
     8   8  payload length L
    16   L  payload
  16+L   4  CRC-32 of the 16-byte head and the payload

in this order: one META, any number of PAGE, one END.

- META: the file size (8 bytes), the segment count n (8), then n records of
  32 bytes: start (8), end (8), refs (8), kind (1, a ``MemoryKind``), 7 zero
  bytes.  Segments are page-aligned, sorted, disjoint, inside the file, with
  refs >= 1; only live pages appear.
- PAGE: the file offset of a run of pages (8), then its bytes, a whole
  number of pages (at most 8 MiB), none of them all zero.  Runs are sorted,
  disjoint and lie inside the META segments.
- END: the number of PAGE sections (8) and the page bytes in them (8).  A
  checkpoint without it was cut short, or its save failed.

A loader checks every CRC, every length against what is left of the input,
and every range against the books, before trusting it; a checkpoint holds
exactly these bytes, so it can be embedded in a larger stream.

Threads and consistency
-----------------------
Finding the committed pages (mincore), reading them and writing the output
run in worker threads, a batch of up to 64 MiB of committed data per thread
hop; between hops the event loop runs and ``progress`` is called.  The
books are copied under the file's lock at the start.  The caller must not
write into live pages during ``save`` (as gVisor requires its mutators to
be stopped): a page written meanwhile is saved as either its old or its new
bytes.  Allocating or freeing during ``save`` is detected at the end (the
books are compared with the copy) and the save fails with ``RuntimeError``.
"""

from __future__ import annotations

import contextlib
import io
import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any, Protocol

import anyio
import anyio.to_thread

from .checkpoint_format import (
    CRC,
    PAGE_OFFSET,
    TAG_END,
    TAG_PAGE,
    CheckpointError,
    CheckpointReader,
    Metadata,
    encode_end,
    encode_header,
    encode_meta,
    encode_page_head,
    merge_spans,
)
from .errors import ClosedError
from .host import syscalls
from .host.handle import FileHandle
from .host.mapping import FileMapping
from .ranges import PAGE_SIZE
from .usage import MemoryKind

__all__ = [
    "CheckpointError",
    "PageCursor",
    "PathType",
    "Progress",
    "Readable",
    "SavedBooks",
    "Writable",
    "check_save_args",
    "check_source",
    "open_source",
    "read_books",
    "read_pages",
    "save_pages",
]


class Writable(Protocol):
    """A blocking binary stream ``save`` can write to (a file, ``BytesIO``)."""

    def write(self, data: Any, /) -> Any: ...


class Readable(Protocol):
    """A blocking binary stream ``load_memory_file`` can read from."""

    def read(self, n: int, /) -> bytes: ...


PathType = str | bytes | os.PathLike[str] | os.PathLike[bytes]
Progress = Callable[[int, int], object]

_BATCH = 64 << 20  # committed bytes per thread hop
_BUF = 8 << 20  # read buffer, and the largest PAGE section
_ZERO_PAGE = bytes(PAGE_SIZE)
_MAX_OFFSET = (1 << 63) - 1


def _is_path(obj: object) -> bool:
    return isinstance(obj, str | bytes | os.PathLike)


def _swap_enabled() -> bool:
    """Whether the host has swap on.  mincore does not report shmem pages
    that are swapped out, so with swap the pages are found with
    SEEK_DATA/SEEK_HOLE instead (which sees them)."""
    try:
        with open("/proc/swaps", "rb") as f:
            return len(f.read().splitlines()) > 1
    except OSError:
        return True  # cannot tell: take the path that is always right


# ------------------------------------------------------------------- saving


@dataclass(frozen=True, slots=True)
class SavedBooks:
    """What a checkpoint records of the books: the file size, the writer's
    chunk size, and the live segments as ``(start, end, kind, refs)``."""

    file_size: int
    chunk_size: int
    segments: list[tuple[int, int, MemoryKind, int]]


def check_save_args(target: object, progress: object) -> None:
    """Refuse a target that is neither a path nor a binary stream, and a
    progress that is not callable (``TypeError``)."""
    if not _is_path(target) and not callable(getattr(target, "write", None)):
        raise TypeError(f"save: target must be a path or a binary stream, not {type(target)}")
    if progress is not None and not callable(progress):
        raise TypeError("save: progress must be a callable or None")


def _intersect(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The intersection of two sorted lists of disjoint ranges."""
    out: list[tuple[int, int]] = []
    i = j = 0
    while i < len(a) and j < len(b):
        s, e = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if s < e:
            out.append((s, e))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def _committed_runs(handle: FileHandle, saved: SavedBooks) -> list[tuple[int, int]]:
    """The committed runs inside the live pages (worker thread)."""
    spans = merge_spans((s, e) for s, e, _k, _r in saved.segments)
    if not spans:
        return []
    if _swap_enabled():
        return _intersect(spans, syscalls.data_ranges(handle.scan_fd, 0, saved.file_size))
    return handle.mapping.resident_runs(spans)


def _batches(runs: list[tuple[int, int]]) -> list[list[tuple[int, int]]]:
    """Cut runs into batches of at most _BATCH bytes."""
    out: list[list[tuple[int, int]]] = [[]]
    room = _BATCH
    for s, e in runs:
        while s < e:
            if room == 0:
                out.append([])
                room = _BATCH
            n = min(e - s, room)
            out[-1].append((s, s + n))
            room -= n
            s += n
    return out if out[0] else []


class _Output:
    """The writing side of a save (used from worker threads only)."""

    def __init__(self, target: Any, fsync: bool) -> None:
        self._fsync = fsync
        self.tmp: str | None = None
        self.path: str | None = None
        if _is_path(target):
            self.path = os.fsdecode(os.fspath(target))
            # Written beside the target and renamed over it at the end, so a
            # failed save never leaves a half-written file under that name.
            self.tmp = f"{self.path}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
            self._stream: Any = open(self.tmp, "xb", buffering=1 << 20)  # noqa: SIM115
        else:
            self._stream = target
        self._buf = bytearray(_BUF)
        self._zeros = bytes(_BUF)
        self.pos = 0
        self.runs = 0
        self.page_bytes = 0

    def write(self, data: Any) -> None:
        """Write all of ``data``; raw streams may take it in pieces."""
        view = memoryview(data).cast("B")
        n = len(view)
        done = 0
        while done < n:
            piece = view[done:] if done else view
            k = self._stream.write(piece)
            if k is None:
                # A raw non-blocking stream says "would block" with None;
                # other file-likes may return None having written it all.
                if isinstance(self._stream, io.RawIOBase):
                    raise BlockingIOError("the target stream is non-blocking and full")
                k = len(piece)
            done += k
        self.pos += n

    def write_pages(self, fd: int, batch: list[tuple[int, int]]) -> None:
        """Read each committed run and write its non-zero pages as PAGE sections."""
        buf = self._buf
        mv = memoryview(buf)
        zeros = memoryview(self._zeros)
        for s, e in batch:
            pos = s
            while pos < e:
                n = min(_BUF, e - pos)
                got = 0
                while got < n:
                    k = os.preadv(fd, [mv[got:n]], pos + got)
                    if k <= 0:
                        raise OSError(f"memory file ended at {pos + got:#x} during save")
                    got += k
                if not buf.startswith(zeros[:n]):
                    self._split_nonzero(pos, mv, n)
                pos += n

    def _split_nonzero(self, base: int, mv: memoryview, n: int) -> None:
        buf = self._buf
        i = 0
        while i < n:
            if buf.startswith(_ZERO_PAGE, i):
                i += PAGE_SIZE
                continue
            j = i + PAGE_SIZE
            while j < n and not buf.startswith(_ZERO_PAGE, j):
                j += PAGE_SIZE
            data = mv[i:j]
            head = encode_page_head(base + i, j - i)
            crc = zlib.crc32(data, zlib.crc32(head))
            self.write(head)
            self.write(data)
            self.write(CRC.pack(crc))
            self.runs += 1
            self.page_bytes += j - i
            i = j

    def finish(self) -> None:
        """Write END, flush, and for a path: fsync, rename, fsync the directory."""
        self.write(encode_end(self.runs, self.page_bytes))
        flush = getattr(self._stream, "flush", None)
        if callable(flush):
            flush()
        if self.tmp is None or self.path is None:
            return
        if self._fsync:
            os.fsync(self._stream.fileno())
        self._stream.close()
        os.replace(self.tmp, self.path)
        self.tmp = None
        if self._fsync:
            d = os.open(os.path.dirname(os.path.abspath(self.path)), os.O_RDONLY)
            try:
                os.fsync(d)
            finally:
                os.close(d)

    def abort(self) -> None:
        """Drop a half-written temporary file (a stream is left as it is)."""
        if self.tmp is None:
            return
        with contextlib.suppress(OSError):
            self._stream.close()
        with contextlib.suppress(OSError):
            os.unlink(self.tmp)
        self.tmp = None


async def save_pages(
    saved: SavedBooks,
    handle: FileHandle,
    target: PathType | Writable,
    progress: Progress | None,
    *,
    fsync: bool,
    unchanged: Callable[[], None],
    closed: Callable[[], bool],
) -> int:
    """Write a checkpoint of ``saved`` and the file's pages to ``target``;
    return its size in bytes (the body of ``MemoryFile.save``, which holds
    a lease on ``handle`` meanwhile).

    ``target`` is a path (written to a temporary file beside it, then
    renamed over it, so it is replaced whole or not at all; with ``fsync``
    the data and the rename are flushed to disk first) or a blocking binary
    stream with ``write()`` (called from worker threads, one call at a time;
    it is flushed, not closed; a failed save leaves a checkpoint without its
    END section there, which ``load_memory_file`` refuses).
    ``progress(done, total)`` is called on the event loop after each batch,
    in committed bytes examined: ``done`` grows and ends equal to ``total``
    (once with ``(0, 0)`` when nothing is committed); an exception from it
    aborts the save.  ``unchanged()`` raises when the books changed since
    ``saved`` was taken (checked before the END section is written);
    ``closed()`` says the file closed (checked between batches: the save
    then raises ``ClosedError``).

    Cost: one mincore scan of the live pages, then reading and writing the
    committed bytes (all-zero pages are read but not written), in worker
    threads, one hop per 64 MiB.
    """
    out: _Output | None = None
    try:
        runs = await anyio.to_thread.run_sync(_committed_runs, handle, saved)
        total = sum(e - s for s, e in runs)
        out = await anyio.to_thread.run_sync(_Output, target, fsync)
        meta = encode_header(saved.chunk_size) + encode_meta(saved.file_size, saved.segments)
        await anyio.to_thread.run_sync(out.write, meta)
        done = 0
        for batch in _batches(runs):
            if closed():
                raise ClosedError("memory file closed during save")
            await anyio.to_thread.run_sync(out.write_pages, handle.scan_fd, batch)
            done += sum(e - s for s, e in batch)
            if progress is not None:
                progress(done, total)
        if total == 0 and progress is not None:
            progress(0, 0)
        unchanged()
        await anyio.to_thread.run_sync(out.finish)
        return out.pos
    except BaseException:
        if out is not None:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(out.abort)
        raise


# ------------------------------------------------------------------ loading


_NEED_BINARY = (
    "load_memory_file: source must be a path or a binary stream (open the file with "
    "mode 'rb'), got a text stream {}"
)


def open_source(source: Any) -> tuple[CheckpointReader, IO[bytes] | None]:
    """A reader over ``source`` and the file to close afterwards (if ours).

    A stream that is not an ``io.TextIOBase`` but still reads ``str`` is
    caught here by reading 0 bytes (which consumes nothing), before the
    memory file is made.  Raises ``TypeError`` for it."""
    if _is_path(source):
        f = open(os.fspath(source), "rb", buffering=1 << 20)  # noqa: SIM115
        try:
            file_size = os.fstat(f.fileno()).st_size
        except BaseException:
            f.close()
            raise
        return CheckpointReader(f, file_size), f
    if isinstance(source.read(0), str):
        raise TypeError(_NEED_BINARY.format(type(source).__name__))
    # A seekable stream tells how much is left, so lengths can be checked
    # against it before reading.
    left: int | None = None
    try:
        if source.seekable():
            here = source.tell()
            left = source.seek(0, os.SEEK_END) - here
            source.seek(here)
    except (AttributeError, OSError, ValueError):
        left = None
    return CheckpointReader(source, left), None


@dataclass(slots=True)
class PageCursor:
    prev_end: int = 0
    runs: int = 0
    nbytes: int = 0


def read_pages(
    mapping: FileMapping, inp: CheckpointReader, meta: Metadata, cur: PageCursor
) -> tuple[list[tuple[int, int]], bool]:
    """Read PAGE sections straight into the mappings until about _BATCH
    bytes are in or END is reached (worker thread).  Returns the runs
    written and whether END was read (and checked)."""
    written: list[tuple[int, int]] = []
    budget = _BATCH
    while budget > 0:
        tag, length, head, at = inp.read_section_head()
        if tag == TAG_END:
            runs, nbytes = inp.read_end(length, head, at)
            if (runs, nbytes) != (cur.runs, cur.nbytes):
                raise CheckpointError(
                    f"section END at offset {at} counts {runs} page runs of {nbytes} bytes, "
                    f"but {cur.runs} runs of {cur.nbytes} bytes were read"
                )
            return written, True
        if tag != TAG_PAGE:
            raise CheckpointError(f"unexpected second META section at offset {at}")
        n = length - PAGE_OFFSET.size
        if n <= 0 or n % PAGE_SIZE:
            raise CheckpointError(f"page run at offset {at}: bad length {length}")
        raw = inp.read_exact(PAGE_OFFSET.size, f"the page run at offset {at}")
        (off,) = PAGE_OFFSET.unpack(raw)
        if off % PAGE_SIZE or off < cur.prev_end or meta.span_end(off) < off + n:
            raise CheckpointError(
                f"page run at offset {at}: file range [{off:#x}, {off + n:#x}) is "
                "misaligned, out of order or outside the live pages"
            )
        crc = zlib.crc32(raw, zlib.crc32(head))
        views = mapping.views(off, n, True)
        try:
            for v in views:
                inp.readinto_exact(v, f"page run at offset {at}")
                crc = zlib.crc32(v, crc)
        finally:
            for v in views:
                v.release()
        inp.check_crc(crc, f"page run [{off:#x}, {off + n:#x}) (section PAGE)", at)
        written.append((off, off + n))
        cur.prev_end = off + n
        cur.runs += 1
        cur.nbytes += n
        budget -= n
    return written, False


def check_source(source: object) -> None:
    """Refuse a source that is neither a path nor a binary stream
    (``TypeError``), before anything is opened."""
    if not _is_path(source) and not callable(getattr(source, "read", None)):
        raise TypeError(f"source must be a path or a binary stream, not {type(source)}")
    if isinstance(source, io.TextIOBase):
        raise TypeError(_NEED_BINARY.format(type(source).__name__))


def read_books(inp: CheckpointReader, max_end: int) -> Metadata:
    """Read and check the header and the META section (worker thread)."""
    inp.read_header()
    return inp.read_meta(max_end)
