"""The OS resources of one memory file, and when they may be closed.

A file descriptor's number is freed by ``close`` and handed to the very next
``open``, ``socket`` or ``pipe`` anywhere in the process.  A system call made
afterwards with the old number lands in whatever file got it: a hole punch
there destroys its data, an ``lseek`` moves its offset, an ``fstat`` reports
its size.  A mapping is no safer: memory unmapped under a ``memset`` kills
the process.  So the resources of a memory file (the memfd, a private
read-only description of it for ``SEEK_DATA`` probes, and the mapping of the
whole file) are closed only when nothing still uses them.

``FileHandle`` counts *leases*: a call that will use the fds or the mapping
outside its owner's lock takes a lease first (while the owner knows the file
to be open) and returns it when its system calls are over.  ``close`` marks
the handle closing; the resources are closed at once when no lease is out,
else by whoever returns the last one.  Memoryviews handed out keep their
own part of the mapping alive (see ``aiopgalloc.host.mapping``), so they
need no lease.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator

from aiopgalloc.host import memfd, syscalls
from aiopgalloc.host.mapping import FileMapping

__all__ = ["FileHandle"]

log = logging.getLogger(__name__)


class FileHandle:
    """The memfd, its scan fd and its mapping, closed after the last lease.

    Thread-safe (a private lock guards the lease count).  The handle owns
    ``fd`` (unless closed with ``close_fd=False``), and opens the other
    resources itself.
    """

    __slots__ = ("_closing", "_lock", "_users", "fd", "mapping", "scan_fd")

    def __init__(self, fd: int, chunk_size: int) -> None:
        """Take ``fd`` (a regular file or memfd already sized to at least
        one chunk).  Raises ``OSError`` from opening the scan fd, leaving
        ``fd`` open for the caller."""
        self.fd = fd
        """The file descriptor of the file (owned)."""
        # A private read-only description for SEEK_DATA probes, so that
        # probing never moves the offset of the fd users see.
        self.scan_fd = memfd.reopen(fd, True)
        """A private read-only description of the file, for probes."""
        self.mapping = FileMapping(fd, chunk_size)
        """The mapping of the whole file."""
        self._lock = threading.Lock()
        self._users = 0
        self._closing: bool | None = None  # None: open; else whether to close fd

    def acquire(self) -> None:
        """Take a lease.  The owner calls it while it knows the handle to be
        open (under its lock); raises ``RuntimeError`` otherwise."""
        with self._lock:
            if self._closing is not None:
                raise RuntimeError("file handle is closed")
            self._users += 1

    def try_acquire(self) -> bool:
        """Take a lease if the handle is still open; False (and no lease)
        once ``close`` was called.  Any thread, no owner lock needed."""
        with self._lock:
            if self._closing is not None:
                return False
            self._users += 1
            return True

    def release(self) -> None:
        """Return a lease, closing the resources if it was the last one
        after ``close``.  Any thread."""
        with self._lock:
            self._users -= 1
            last = self._closing is not None and self._users == 0
        if last:
            self._close_now()

    @contextlib.contextmanager
    def lease(self) -> Iterator[None]:
        """``acquire`` for the body of a ``with`` block."""
        self.acquire()
        try:
            yield
        finally:
            self.release()

    @property
    def leases(self) -> int:
        """Leases out right now."""
        return self._users

    def close(self, *, close_fd: bool = True) -> None:
        """Close the resources now, or once the last lease is returned.
        ``close_fd=False`` leaves ``fd`` open (it is the caller's after a
        failed open).  Idempotent; never raises."""
        with self._lock:
            if self._closing is not None:
                return
            self._closing = close_fd
            last = self._users == 0
        if last:
            self._close_now()

    def punch_out(self, ranges: list[tuple[int, int]]) -> list[tuple[int, int, OSError]]:
        """Punch ``ranges`` out of the file; zero by hand (through the
        mapping) any whose punch failed: the memory stays used, but the
        pages read as zero again (the reference's fallback).  Returns the
        ranges whose punch failed.  The caller holds a lease.  Raises what
        zeroing raises (the books then keep the pages as they were)."""
        failed = syscalls.punch_holes(self.fd, ranges)
        for s, e, err in failed:
            log.warning("punching [%#x, %#x) failed (%s); zeroing it by hand", s, e, err)
            self.mapping.zero(s, e - s)
        return failed

    def _close_now(self) -> None:
        busy = self.mapping.close()
        if busy:
            log.warning(
                "memory file closed while memoryviews of %d mapping(s) are still alive; "
                "those mappings are released when the views are dropped",
                busy,
            )
        fds = [self.scan_fd, self.fd] if self._closing else [self.scan_fd]
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
