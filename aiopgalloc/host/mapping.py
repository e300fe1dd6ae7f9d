"""Lazily made shared mappings of a memory file, one per fixed-size chunk.

The file is cut into chunks of ``chunk_size`` bytes.  A chunk is mapped
(``MAP_SHARED``, read-write) the first time someone needs its bytes and stays
mapped, at the same address, until :meth:`ChunkMappings.close`.  That mirrors
the reference's per-chunk mapping table: mapping a chunk costs one mmap (a few
microseconds, no memory), and a stable address per chunk lets mincore,
memset and madvise work on raw addresses.

Why the ``mmap`` module and not a raw ctypes mmap: a Python ``mmap`` object
refuses to close while memoryviews of it exist (``BufferError``), and when it
is finally freed it unmaps then.  So a memoryview handed to a user can never
point at unmapped memory, however long it outlives the file: the worst case
is a mapping that lives on until the last view is dropped.  Raw addresses
are used only inside calls that pin the mapping (they hold a buffer export
for their duration), so even a concurrent :meth:`ChunkMappings.close` cannot
pull the memory from under them.

Two kernel facts shape the rest.  Touching a shared mapping past the end of
its file raises SIGBUS and kills the process, so a chunk is only mapped once
the caller says the file covers it (and Python's mmap double-checks the file
size).  And Python 3.11's mmap keeps a private dup of the fd per mapping, so
each mapped chunk holds one fd open: with 1 GiB chunks that is a handful.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import threading

from aiopgalloc.host import syscalls
from aiopgalloc.host.faults import faults
from aiopgalloc.host.hugepage import PAGE_SIZE

__all__ = ["ChunkMappings"]


class ChunkMappings:
    """Shared read-write mappings of a file, one per chunk, made on first use.

    Mappings are ``MAP_SHARED`` with ``PROT_READ | PROT_WRITE`` and are never
    remapped while open.  Thread-safe: a private ``threading.Lock`` guards
    making a mapping and growing the table; looking up a chunk already mapped
    takes no lock.  The fd is borrowed: the caller keeps owning and closing it.
    """

    def __init__(self, fd: int, chunk_size: int) -> None:
        """Manage mappings of ``fd`` in chunks of ``chunk_size`` bytes.

        Nothing is mapped yet and the known file size is 0 (see
        :meth:`set_file_size`).  Raises ``ValueError`` unless ``chunk_size``
        is a power of two and a multiple of ``PAGE_SIZE``.
        """
        if chunk_size < PAGE_SIZE or chunk_size & (chunk_size - 1):
            raise ValueError(
                f"chunk_size must be a power of two multiple of {PAGE_SIZE}, got {chunk_size}"
            )
        self._fd = fd
        self.chunk_size: int = chunk_size
        """The bytes covered by one mapping."""
        self._shift = chunk_size.bit_length() - 1
        self._lock = threading.Lock()
        # One slot per chunk of the file: None, or the mapping and its base
        # address.  The list is replaced, never resized, when the file grows,
        # and a slot is filled in one store, so a lock-free reader sees either
        # nothing or a complete entry.
        self._table: list[tuple[mmap.mmap, int] | None] = []
        self._mapped = 0
        self._closed = False

    @property
    def mapped_chunks(self) -> int:
        """How many chunks are mapped right now (0 after :meth:`close`)."""
        return self._mapped

    @property
    def file_size(self) -> int:
        """The file size last given to :meth:`set_file_size` (a whole number of chunks)."""
        return len(self._table) << self._shift

    def set_file_size(self, size: int) -> None:
        """Record that the caller grew the file to ``size`` bytes.

        Chunks below ``size // chunk_size`` may be mapped from now on.  A size
        not above the known one is ignored (the table never shrinks).  Cost:
        copying the table, once per growth.  Raises ``ValueError`` when
        ``size`` is negative or not a multiple of ``chunk_size``, or after
        :meth:`close`.
        """
        if size < 0 or size & (self.chunk_size - 1):
            raise ValueError(
                f"file size {size} is not a whole number of {self.chunk_size}-byte chunks"
            )
        with self._lock:
            if self._closed:
                raise ValueError("ChunkMappings is closed")
            grow = (size >> self._shift) - len(self._table)
            if grow > 0:
                self._table = [*self._table, *([None] * grow)]

    def chunk(self, index: int) -> mmap.mmap:
        """Return the mapping of chunk ``index``, mapping it on first use.

        Cost: a list lookup when already mapped; otherwise one mmap of
        ``chunk_size`` bytes (fault op ``mmap``; about 5-8 us for 16 MiB, no
        memory committed) plus an fstat done by Python's mmap.  Raises
        ``IndexError`` for a chunk outside the known file size,
        ``ValueError`` after :meth:`close` (or if the file is really shorter
        than :meth:`set_file_size` claimed), ``OSError`` when mmap fails
        (``ENOMEM``: address space or map count exhausted).
        """
        return self._entry(index)[0]

    def address(self, index: int) -> int:
        """Return the base address of chunk ``index``'s mapping, mapping it if needed.

        The address stays valid while the ChunkMappings is open; using it
        after :meth:`close` is the caller's bug.  Raises what :meth:`chunk`
        raises.
        """
        return self._entry(index)[1]

    def _entry(self, index: int) -> tuple[mmap.mmap, int]:
        if self._closed:
            raise ValueError("ChunkMappings is closed")
        table = self._table
        if 0 <= index < len(table):
            entry = table[index]
            if entry is not None:
                return entry
        return self._map_chunk(index)

    def _map_chunk(self, index: int) -> tuple[mmap.mmap, int]:
        with self._lock:
            if self._closed:
                raise ValueError("ChunkMappings is closed")
            if not 0 <= index < len(self._table):
                raise IndexError(
                    f"chunk {index} is outside the file ({len(self._table)} chunks of "
                    f"{self.chunk_size} bytes)"
                )
            entry = self._table[index]
            if entry is not None:
                # Another thread mapped it while we waited for the lock.
                return entry
            faults.check("mmap")
            m = mmap.mmap(
                self._fd,
                self.chunk_size,
                flags=mmap.MAP_SHARED,
                prot=mmap.PROT_READ | mmap.PROT_WRITE,
                offset=index << self._shift,
            )
            # The ctypes object exports the buffer; it must go before anyone
            # may close the mmap.
            probe = ctypes.c_char.from_buffer(m)
            addr = ctypes.addressof(probe)
            del probe
            entry = (m, addr)
            self._table[index] = entry
            self._mapped += 1
            return entry

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0:
            raise ValueError(f"bad range: offset {offset}, length {length}")
        if self._closed:
            raise ValueError("ChunkMappings is closed")
        if offset + length > self.file_size:
            raise IndexError(
                f"range [{offset}, {offset + length}) is past the file size {self.file_size}"
            )

    def _pieces(self, offset: int, length: int) -> list[tuple[int, int, int]]:
        """Split a range into (chunk index, offset in chunk, length) pieces."""
        pieces: list[tuple[int, int, int]] = []
        end = offset + length
        pos = offset
        mask = self.chunk_size - 1
        while pos < end:
            index = pos >> self._shift
            start_in = pos & mask
            n = min(self.chunk_size - start_in, end - pos)
            pieces.append((index, start_in, n))
            pos += n
        return pieces

    def views(self, offset: int, length: int, writable: bool) -> list[memoryview]:
        """Return memoryviews covering exactly ``[offset, offset+length)``, in order.

        One view per chunk the range crosses (none for an empty range),
        mapping chunks as needed.  Views are read-only
        (``memoryview.toreadonly``) unless ``writable``.  Each view keeps its
        chunk's mapping alive, even past :meth:`close`.  Cost: about a
        microsecond per view plus first-use mapping.  Raises ``ValueError``
        for a negative offset or length or after :meth:`close`,
        ``IndexError`` past the known file size, ``OSError`` when mmap fails.
        """
        self._check_range(offset, length)
        start_in = offset & (self.chunk_size - 1)
        if 0 < length <= self.chunk_size - start_in:
            # One chunk (the common case): no piece list.
            view = memoryview(self._entry(offset >> self._shift)[0])[start_in : start_in + length]
            return [view if writable else view.toreadonly()]
        out: list[memoryview] = []
        for index, start_in, n in self._pieces(offset, length):
            view = memoryview(self.chunk(index))[start_in : start_in + n]
            out.append(view if writable else view.toreadonly())
        return out

    def zero(self, offset: int, length: int) -> None:
        """Write zeros over ``[offset, offset+length)`` with memset on the mappings.

        No Python buffers are made: one ``memset_zero`` (fault op ``memset``)
        per chunk crossed, each pinning its mapping for the call.  Cost about
        15-20 us per resident MiB, about 1 ms per MiB not yet resident (the
        pages are faulted in and committed).  Raises like :meth:`views`.
        """
        self._check_range(offset, length)
        start_in = offset & (self.chunk_size - 1)
        if length <= self.chunk_size - start_in:
            pieces = [(offset >> self._shift, start_in, length)]
        else:
            pieces = self._pieces(offset, length)
        for index, start_in, n in pieces:
            m, addr = self._entry(index)
            # The export pins the mapping: close() cannot unmap it under us.
            with memoryview(m):
                syscalls.memset_zero(addr + start_in, n)

    def populate(self, offset: int, length: int) -> None:
        """Fault in (commit) ``[offset, offset+length)`` for writing, so the
        user's first writes take no page faults.

        ``madvise(MADV_POPULATE_WRITE)`` per chunk crossed (Linux 5.14+;
        about 3-6 us per 4 KiB page: the page faults are paid here, in one
        syscall).  Where the kernel refuses it (``EINVAL``), one zero byte is
        written per page instead, which commits the same pages; the caller
        guarantees the range reads as zero, so the bytes do not change.
        Raises like :meth:`views`, and ``OSError`` from madvise (``ENOMEM``,
        ``EFAULT``) when memory runs out.
        """
        self._check_range(offset, length)
        for index, start_in, n in self._pieces(offset, length):
            m, addr = self._entry(index)
            with memoryview(m) as pin:
                try:
                    syscalls.madvise(addr + start_in, n, syscalls.MADV_POPULATE_WRITE)
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise
                    for off in range(start_in, start_in + n, PAGE_SIZE):
                        pin[off] = 0

    def mincore(self, offset: int, length: int) -> bytearray:
        """Return the residency of ``[offset, offset+length)``: one byte per page.

        Bit 0 of each byte is set when that page of the file is in memory
        (whoever touched it; pages committed by fallocate and never written
        show as not resident).  ``length`` is rounded up to whole pages.  Fault
        op ``mincore``; cost about 10-12 ms per GiB, so call it off the event
        loop for large ranges.  Raises ``ValueError`` when ``offset`` is not
        page-aligned, else like :meth:`views`.
        """
        if offset % PAGE_SIZE:
            raise ValueError(f"offset {offset} is not page-aligned")
        length = -(-length // PAGE_SIZE) * PAGE_SIZE if length > 0 else length
        self._check_range(offset, length)
        vec = bytearray(length // PAGE_SIZE)
        page = 0
        for index, start_in, n in self._pieces(offset, length):
            m, addr = self._entry(index)
            with memoryview(m):
                syscalls.mincore(addr + start_in, n, vec, vec_offset=page)
            page += n // PAGE_SIZE
        return vec

    def close(self) -> int:
        """Unmap every chunk; return how many could not be unmapped yet.

        A chunk whose mmap still has exported buffers (memoryviews from
        :meth:`views`, alive elsewhere) cannot be closed: the reference to it
        is dropped instead, and the kernel mapping goes away when the last
        such view is garbage-collected; such chunks are counted in the result.
        Idempotent (a second call returns 0).  Never raises.  After it,
        :meth:`chunk`, :meth:`views` and friends raise ``ValueError``.
        """
        with self._lock:
            if self._closed:
                return 0
            self._closed = True
            table = self._table
            self._table = []
            self._mapped = 0
        busy = 0
        for entry in table:
            if entry is None:
                continue
            try:
                entry[0].close()
            except (BufferError, OSError):
                busy += 1
        return busy
