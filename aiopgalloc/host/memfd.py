"""Creating, sizing, sealing and re-opening the memfd behind a memory file.

A memfd is an anonymous shmem file: it lives only as long as some fd or
mapping refers to it, it can grow with ``ftruncate`` at almost no cost (1-2 us
for 16 MiB; pages are allocated on first touch), holes punched in it return
memory to the kernel, and it can be handed to another process as an fd.

Sealing matters for safety, not only for sharing: once ``F_SEAL_SHRINK`` is
set nobody (not even a process we shared the fd with) can make the file
shorter, and a file that cannot shrink can never turn one of our live
mappings into a SIGBUS trap.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os

from aiopgalloc.host.faults import faults

__all__ = [
    "create_memfd",
    "file_size",
    "get_seals",
    "ima_workaround",
    "reopen",
    "seal_shrink",
    "truncate",
]

_libc = ctypes.CDLL(None, use_errno=True)
_mmap = _libc.mmap
_mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int64,
]
_mmap.restype = ctypes.c_void_p
_munmap = _libc.munmap
_munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_munmap.restype = ctypes.c_int
_MAP_FAILED = ctypes.c_void_p(-1).value


def create_memfd(name: str = "aiopgalloc") -> int:
    """Create an empty memfd and return its fd; the caller owns and closes it.

    Flags ``MFD_CLOEXEC | MFD_ALLOW_SEALING``: the fd is not inherited by
    child processes (share it explicitly) and it can be sealed.  ``name`` shows
    up in ``/proc/<pid>/fd`` as ``/memfd:<name>`` and is for humans only.  Cost:
    a few microseconds.  Raises ``OSError`` (``EMFILE``/``ENFILE``: out of fds,
    ``EINVAL``: name longer than 249 bytes).
    """
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        # A memfd is born with mode 0777, and opening /proc/<pid>/fd/N checks
        # the inode's mode, not the fd's: anyone holding a read-only share
        # could reopen it read-write.  Read-only for everyone (root aside);
        # fds already open keep their access.
        os.fchmod(fd, 0o444)
    except BaseException:
        os.close(fd)
        raise
    return fd


def truncate(fd: int, size: int) -> None:
    """Set the file size to ``size`` bytes (fault op ``ftruncate``).

    Growing only extends the sparse file (1-2 us, no memory committed);
    shrinking frees the pages past ``size``, and any mapping that still covers
    them raises SIGBUS on access, so the allocator only ever grows.  Raises
    ``OSError`` (``EPERM`` when a seal forbids the change, ``EINVAL`` for a
    negative size or an fd not open for writing, ``EFBIG``).
    """
    faults.check("ftruncate")
    os.ftruncate(fd, size)


def seal_shrink(fd: int) -> bool:
    """Add ``F_SEAL_SHRINK`` to the file: from now on it can only grow.

    Returns True when the seal is in place (also when it already was), False
    without raising when the fd cannot be sealed (``EINVAL``: not a memfd or
    shmem file; ``EPERM``: a memfd made without ``MFD_ALLOW_SEALING`` or
    already sealed against new seals).  Cost: one fcntl, about a microsecond.
    Raises ``OSError`` for other errors (``EBADF``).
    """
    try:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.EPERM):
            return False
        raise
    return True


def get_seals(fd: int) -> int:
    """Return the file's seals as a bit set of ``fcntl.F_SEAL_*`` values.

    Cost: one fcntl.  Raises ``OSError`` (``EINVAL`` when the file does not
    support sealing, ``EBADF``).
    """
    return fcntl.fcntl(fd, fcntl.F_GET_SEALS)


def reopen(fd: int, readonly: bool) -> int:
    """A new fd of the same file, for sharing; the caller owns it.

    Read-only: the file is opened again through ``/proc/self/fd/<fd>``, a new
    open file description (its own offset), ``O_RDONLY | O_CLOEXEC``.
    Read-write: a close-on-exec duplicate of ``fd`` (``F_DUPFD_CLOEXEC``; it
    shares the offset), since a memfd made by :func:`create_memfd` is mode
    0444 and cannot be opened for writing again.  A read-only one cannot write, cannot be mapped
    ``PROT_WRITE`` with ``MAP_SHARED`` and cannot ``ftruncate`` the file,
    which is what makes it safe to hand to another process.  Cost: one path
    lookup and open, a few microseconds.  Raises ``OSError``
    (``FileNotFoundError`` when ``fd`` is not open, ``EMFILE``, ``EACCES``).
    """
    if fd < 0:
        raise ValueError(f"bad fd {fd}")
    if not readonly:
        return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 0)
    return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)


def seal_seals(fd: int) -> bool:
    """Add ``F_SEAL_SEAL``: nobody (a holder of a read-write share included)
    can add seals any more, such as ``F_SEAL_GROW`` or ``F_SEAL_FUTURE_WRITE``,
    which would stop the allocator from growing or mapping the file.  Returns
    False when the fd cannot be sealed."""
    try:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SEAL)
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.EPERM):
            return False
        raise
    return True


def ima_workaround(fd: int, page_size: int) -> OSError | None:
    """Map the first page of the file ``PROT_EXEC``/``MAP_SHARED`` and unmap it.

    Linux's Integrity Measurement Architecture, when enabled, hashes a file
    the first time it is mapped executable, reading every page of it; on a
    huge sparse memory file that would commit all of it.  Doing one
    executable mapping while the file is still small gets the hash over with
    cheaply, and IMA does not hash the file again.  Call it right after
    creating (and optionally first sizing) the file.

    Never raises for the mapping itself: returns the ``OSError`` (fault op
    ``mmap``; for instance ``EPERM`` where exec mappings of memfds are
    forbidden) so the caller can log it, or None on success.  Cost: one
    mmap and munmap, about 10 us.
    """
    try:
        faults.check("mmap")
    except OSError as exc:
        return exc
    try:
        m = mmap.mmap(fd, page_size, flags=mmap.MAP_SHARED, prot=mmap.PROT_EXEC)
    except OSError as exc:
        return exc
    except ValueError:
        # Python's mmap refuses a length past the end of a regular file (and
        # a memfd is one), so a file shorter than a page takes the raw path.
        # No buffer ever escapes here, so the raw mapping cannot be misused.
        return _raw_exec_map(fd, page_size)
    m.close()
    return None


def _raw_exec_map(fd: int, page_size: int) -> OSError | None:
    addr = _mmap(None, page_size, mmap.PROT_EXEC, mmap.MAP_SHARED, fd, 0)
    if addr is None or addr == _MAP_FAILED:
        err = ctypes.get_errno()
        return OSError(err, os.strerror(err))
    if _munmap(addr, page_size) != 0:
        err = ctypes.get_errno()
        return OSError(err, os.strerror(err))
    return None


def file_size(fd: int) -> int:
    """Return the file size in bytes (``st_size``; fault op ``fstat``).

    Cost: one fstat, a few microseconds.  Raises ``OSError`` (``EBADF``).
    """
    faults.check("fstat")
    return os.fstat(fd).st_size
