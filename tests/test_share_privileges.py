"""What a read-only share enforces, and against whom, proven with real
processes.

``mf.share(readonly=True)`` opens the memfd again ``O_RDONLY``; the memfd is
mode 0444 and sealed against shrinking and against new seals.  A forked child
is given such an fd, takes on one set of privileges, and tries every route
to write into the live pages or grow the file:

- through the fd itself: ``write``, ``pwrite``, ``ftruncate``, ``fallocate``
  (grow, punch), ``mmap(PROT_WRITE, MAP_SHARED)``, ``mprotect`` of a
  read-only mapping, ``F_ADD_SEALS``;
- around it: reopening ``/proc/self/fd/N`` read-write (and growing the
  file through the new fd), reopening the allocator's own read-write fd as
  ``/proc/<pid>/fd/N``, ``fchmod`` then reopening, writing this process's
  memory through ``/proc/<pid>/mem``, and taking its read-write fd with
  ``pidfd_getfd``.

The result, per child (the test pins each set exactly):

- an unprivileged process of another uid (nobody, 65534, no capabilities):
  every route is refused, and the file is unchanged;
- root: it reopens the share read-write, writes into live pages and grows
  the file, and takes the allocator's own fd; so does a process with just
  one capability: CAP_DAC_OVERRIDE (reopen), CAP_FOWNER (chmod, then
  reopen), CAP_SYS_PTRACE over this process (``pidfd_getfd``);
- a process running as the file's owner uid (no capabilities): chmod, then
  reopen.

That is what the README and the ``share()`` docstring say.  Why the library
does not use the one mechanism that would stop even root,
``F_SEAL_FUTURE_WRITE``: on this kernel it also refuses the allocator's own
hole punching (``fallocate(PUNCH_HOLE)``), ``madvise(MADV_REMOVE)`` and any
new writable shared mapping (every chunk the file grows by needs one), which
the last test shows.

``tests/test_security.py`` runs the fd routes from a separate interpreter as
nobody; this module adds the privilege matrix, the cross-process routes and
the seal.  The children are forked (no new interpreter): each does only
syscalls through modules already imported, and leaves with ``os._exit``.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import mmap
import os
import warnings
from collections.abc import Callable
from typing import Any

import anyio
import anyio.to_thread
import pytest
from helpers import read_all

from aiopgalloc import HUGE_PAGE_SIZE, PAGE_SIZE, AccessType, MemoryFileOpts, open_memory_file
from aiopgalloc.host import memfd, syscalls

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(
        os.geteuid() != 0, reason="needs root: the children take on chosen uids and capabilities"
    ),
]

P = PAGE_SIZE
H = HUGE_PAGE_SIZE
OPTS = MemoryFileOpts(chunk_size=H)
NOBODY = 65534
CAP_DAC_OVERRIDE, CAP_FOWNER, CAP_SYS_PTRACE = 1, 3, 19
PR_SET_DUMPABLE, PR_SET_KEEPCAPS = 4, 8
SYS_PIDFD_OPEN, SYS_PIDFD_GETFD = 434, 438  # x86-64 and the generic table alike
F_SEAL_FUTURE_WRITE = getattr(fcntl, "F_SEAL_FUTURE_WRITE", 0x10)
EVIL = b"EVIL"

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int64,
]
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.syscall.restype = ctypes.c_long
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def _check(rc: int | None) -> int:
    if rc is None or rc == -1:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return rc


# ----------------------------------------------------- in the forked child


def _become(caps: tuple[int, ...]) -> None:
    """Drop to nobody, keeping exactly ``caps`` (none: an ordinary
    unprivileged process).  Dumpable again afterwards, so /proc/self/fd
    stays reachable and a refusal is the file's, not /proc's."""
    os.setgroups([])
    if caps:
        _check(_libc.prctl(PR_SET_KEEPCAPS, 1, 0, 0))
    os.setgid(NOBODY)
    os.setuid(NOBODY)
    _check(_libc.prctl(PR_SET_DUMPABLE, 1, 0, 0))
    if caps:
        mask = 0
        for cap in caps:
            mask |= 1 << cap
        data = (_CapData * 2)()
        data[0].effective = data[0].permitted = mask
        _check(_libc.capset(ctypes.byref(_CapHeader(0x20080522, 0)), data))  # v3


def _routes(
    share: int, owner_fd: int, owner_pid: int, addr: int, off: int, size: int
) -> dict[str, Callable[[], object]]:
    """Every route to write into the live page at ``off`` (mapped at
    ``addr`` in the owner) or to grow the file, from a read-only share."""

    def write_via(fd: int) -> None:
        os.pwrite(fd, EVIL, off)

    def reopen(path: str, then: Callable[[int], object]) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            then(fd)
        finally:
            os.close(fd)

    def mprotect_write() -> None:
        a = _libc.mmap(None, P, mmap.PROT_READ, mmap.MAP_SHARED, share, off)
        if a is None or a == ctypes.c_void_p(-1).value:
            _check(-1)
        _check(_libc.mprotect(a, P, mmap.PROT_READ | mmap.PROT_WRITE))

    def fchmod_then_reopen() -> None:
        os.fchmod(share, 0o666)
        reopen(f"/proc/self/fd/{share}", write_via)

    def proc_mem_write() -> None:
        fd = os.open(f"/proc/{owner_pid}/mem", os.O_RDWR | os.O_CLOEXEC)
        try:
            os.pwrite(fd, EVIL, addr)
        finally:
            os.close(fd)

    def pidfd_getfd() -> None:
        pidfd = _check(_libc.syscall(SYS_PIDFD_OPEN, owner_pid, 0))
        try:
            fd = _check(_libc.syscall(SYS_PIDFD_GETFD, pidfd, owner_fd, 0))
            try:
                write_via(fd)
            finally:
                os.close(fd)
        finally:
            os.close(pidfd)

    return {
        "write": lambda: os.write(share, EVIL),
        "pwrite": lambda: write_via(share),
        "ftruncate_grow": lambda: os.ftruncate(share, size + H),
        "fallocate_grow": lambda: _check(_libc.fallocate(share, 0, size, P)),
        "fallocate_punch": lambda: _check(_libc.fallocate(share, 3, off, P)),
        "mmap_shared_write": lambda: mmap.mmap(
            share, P, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=off
        ).close(),
        "mprotect_write": mprotect_write,
        "add_seals": lambda: fcntl.fcntl(share, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW),
        "reopen_rw": lambda: reopen(f"/proc/self/fd/{share}", write_via),
        "reopen_rw_grow": lambda: reopen(
            f"/proc/self/fd/{share}", lambda fd: os.ftruncate(fd, size + H)
        ),
        "reopen_owner_fd_rw": lambda: reopen(f"/proc/{owner_pid}/fd/{owner_fd}", write_via),
        "fchmod_then_reopen": fchmod_then_reopen,
        "proc_mem_write": proc_mem_write,
        "pidfd_getfd": pidfd_getfd,
    }


# What must work for every child, so that a refusal above means something.
CONTROLS = ("read", "reopen_ro")


def _child(share: int, caps: tuple[int, ...] | None, routes: dict[str, Any], w: int) -> None:
    res: dict[str, str] = {}
    try:
        if caps is not None:
            _become(caps)
        res["uid"] = str(os.getuid())
        checks = {
            "read": lambda: os.pread(share, P, 0),
            "reopen_ro": lambda: os.close(os.open(f"/proc/self/fd/{share}", os.O_RDONLY)),
            **routes,
        }
        for name, attempt in checks.items():
            try:
                attempt()
                res[name] = "ok"
            except OSError as exc:
                res[name] = errno.errorcode.get(exc.errno or 0, str(exc.errno))
    except BaseException as exc:
        res["setup"] = repr(exc)
    os.write(w, json.dumps(res).encode())


def _fork(share: int, caps: tuple[int, ...] | None, routes: dict[str, Any]) -> tuple[int, int]:
    r, w = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads (3.12+)
        pid = os.fork()
    if pid == 0:  # the child: syscalls only, then out
        try:
            os.close(r)
            _child(share, caps, routes, w)
        finally:
            os._exit(0)
    os.close(w)
    return pid, r


def _collect(pid: int, r: int) -> dict[str, str]:
    """Read the child's answer and reap it (in a worker thread)."""
    data = b""
    try:
        while chunk := os.read(r, 65536):
            data += chunk
    finally:
        os.close(r)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    out: dict[str, str] = json.loads(data)
    return out


# ------------------------------------------------------------------ the matrix

WRITE_ROUTES = {
    "write",
    "pwrite",
    "ftruncate_grow",
    "fallocate_grow",
    "fallocate_punch",
    "mmap_shared_write",
    "mprotect_write",
    "add_seals",
    "reopen_rw",
    "reopen_rw_grow",
    "reopen_owner_fd_rw",
    "fchmod_then_reopen",
    "proc_mem_write",
    "pidfd_getfd",
}
GROW_ROUTES = {"ftruncate_grow", "fallocate_grow", "reopen_rw_grow"}

# who -> (capabilities kept after dropping to nobody, None for root; whether
# the file is chowned to nobody first; the routes that succeed)
MATRIX: dict[str, tuple[tuple[int, ...] | None, bool, set[str]]] = {
    "unprivileged": ((), False, set()),
    "root": (
        None,
        False,
        {
            "reopen_rw",
            "reopen_rw_grow",
            "reopen_owner_fd_rw",
            "fchmod_then_reopen",
            "proc_mem_write",
            "pidfd_getfd",
        },
    ),
    "cap_dac_override": ((CAP_DAC_OVERRIDE,), False, {"reopen_rw", "reopen_rw_grow"}),
    "cap_fowner": ((CAP_FOWNER,), False, {"fchmod_then_reopen"}),
    "cap_sys_ptrace": ((CAP_SYS_PTRACE,), False, {"pidfd_getfd"}),
    "file_owner_uid": ((), True, {"fchmod_then_reopen"}),
}


@pytest.mark.parametrize("who", list(MATRIX))
async def test_readonly_share_against_each_privilege(who: str) -> None:
    caps, chown, expected = MATRIX[who]
    async with open_memory_file(opts=OPTS) as mf:
        mf.allocate(P)
        fr = mf.allocate(4 * P)
        data = os.urandom(fr.length)
        (view,) = mf.map_internal(fr, AccessType.READ_WRITE)
        view[:] = data
        cbuf = ctypes.c_char.from_buffer(view)
        addr = ctypes.addressof(cbuf)
        size = mf.total_size()
        share = mf.share(readonly=True)
        try:
            if chown:
                # As if this process ran as nobody: the memfd is owned by
                # the uid that made it.
                os.fchown(mf.fd, NOBODY, NOBODY)
            routes = _routes(share, mf.fd, os.getpid(), addr, fr.start, size)
            assert set(routes) == WRITE_ROUTES
            res = await anyio.to_thread.run_sync(_collect, *_fork(share, caps, routes))
        finally:
            os.close(share)
            del cbuf
            view.release()
        assert "setup" not in res, res
        assert res["uid"] == ("0" if caps is None else str(NOBODY)), res
        assert all(res[c] == "ok" for c in CONTROLS), res
        succeeded = {name for name in WRITE_ROUTES if res[name] == "ok"}
        assert succeeded == expected, res
        now = read_all(mf, fr)
        if expected:
            assert EVIL in now, "a route said ok but the page is unchanged"
        else:
            assert now == data, "an unprivileged holder changed the live pages"
        grew = os.fstat(mf.fd).st_size > size
        assert grew == bool(expected & GROW_ROUTES), (os.fstat(mf.fd).st_size, size)
        if not expected:
            assert mf.total_size() == size
            mf.check_invariants()


async def test_every_route_works_where_nothing_stops_it() -> None:
    """The matrix is only as good as its routes: tried by root through a
    read-write share, each one really writes or grows (so a refusal above
    is the share's doing, not a broken attempt)."""
    async with open_memory_file(opts=OPTS) as mf:
        fr = mf.allocate(P)
        (view,) = mf.map_internal(fr, AccessType.READ_WRITE)
        cbuf = ctypes.c_char.from_buffer(view)
        rw = mf.share(readonly=False)
        try:
            size = mf.total_size()
            routes = _routes(rw, mf.fd, os.getpid(), ctypes.addressof(cbuf), fr.start, size)
            res = await anyio.to_thread.run_sync(_collect, *_fork(rw, None, routes))
        finally:
            os.close(rw)
            del cbuf
            view.release()
        # Every route works, except new seals: F_SEAL_SEAL refuses them to
        # every holder, root and read-write fds included.
        assert all(res[c] == "ok" for c in CONTROLS), res
        refused = {name for name in WRITE_ROUTES if res[name] != "ok"}
        assert refused == {"add_seals"}, res
        assert os.fstat(mf.fd).st_size > size


# ------------------------------------------------------- F_SEAL_FUTURE_WRITE


def test_future_write_seal_would_stop_root_but_also_the_allocator() -> None:
    """``F_SEAL_FUTURE_WRITE`` is the one Linux mechanism that a privileged
    holder cannot get around (seals bind root too).  It is not used because,
    on this kernel, it also refuses what the allocator must do to the file:
    punch freed pages out (``fallocate(PUNCH_HOLE)``, ``madvise(MADV_REMOVE)``)
    and map a grown chunk writable."""
    fd = memfd.create_memfd("future-write-probe")

    def root_reopen_write() -> None:
        w = os.open(f"/proc/self/fd/{fd}", os.O_RDWR | os.O_CLOEXEC)  # root: allowed
        try:
            os.pwrite(w, EVIL, 0)
        finally:
            os.close(w)

    try:
        memfd.truncate(fd, 2 * H)
        live = mmap.mmap(fd, H, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        live[: 4 * P] = b"x" * (4 * P)
        cbuf = ctypes.c_char.from_buffer(live)
        addr = ctypes.addressof(cbuf)
        syscalls.punch_hole(fd, 0, P)  # allowed before the seal
        assert live[:4] == bytes(4)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, F_SEAL_FUTURE_WRITE)
        refused = {}
        for name, attempt in {
            "punch_hole": lambda: syscalls.punch_hole(fd, P, P),
            "madvise_remove": lambda: syscalls.madvise(addr + 2 * P, P, syscalls.MADV_REMOVE),
            "map_next_chunk_writable": lambda: mmap.mmap(
                fd, H, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=H
            ),
            "pwrite": lambda: os.pwrite(fd, EVIL, 0),
            "root_reopen_write": root_reopen_write,
        }.items():
            with pytest.raises(PermissionError) as info:
                attempt()
            refused[name] = info.value.errno
        assert set(refused.values()) == {errno.EPERM}, refused
        # Nothing was punched: the pages still hold their bytes.
        assert live[P : P + 4] == b"xxxx" and live[2 * P : 2 * P + 4] == b"xxxx"
        # Growing still works, and a mapping made before the seal still
        # writes: the seal closes new write paths only.
        memfd.truncate(fd, 3 * H)
        live[3 * P] = ord("y")
        assert os.pread(fd, 1, 3 * P) == b"y"
        del cbuf
        live.close()
    finally:
        os.close(fd)
