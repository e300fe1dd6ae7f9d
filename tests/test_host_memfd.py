"""Tests of aiopgalloc.host.memfd on real memfds."""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator

import pytest

from aiopgalloc.host import memfd
from aiopgalloc.host.faults import faults
from aiopgalloc.host.hugepage import PAGE_SIZE

P = PAGE_SIZE


@pytest.fixture(autouse=True)
def _no_leftover_faults() -> Iterator[None]:
    faults.reset()
    yield
    faults.reset()


@pytest.fixture
def fd() -> Iterator[int]:
    fd = memfd.create_memfd("test-memfd")
    yield fd
    os.close(fd)


def test_create_memfd_is_close_on_exec() -> None:
    name = f"aiopgalloc-cloexec-{os.getpid()}"
    fd = memfd.create_memfd(name)
    try:
        assert not os.get_inheritable(fd)
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        assert os.readlink(f"/proc/self/fd/{fd}").startswith(f"/memfd:{name}")
        # close_fds=False: only close-on-exec can keep the fd from the child.
        probe = (
            "import os, sys\n"
            f"fd = {fd}\n"
            "try:\n"
            "    target = os.readlink(f'/proc/self/fd/{fd}')\n"
            "except OSError:\n"
            "    target = ''\n"
            "sys.stdout.write(target)\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", probe], close_fds=False, capture_output=True, check=True
        )
        assert name not in out.stdout.decode()
    finally:
        os.close(fd)


def test_memfd_is_sealable_and_empty(fd: int) -> None:
    assert memfd.file_size(fd) == 0
    assert memfd.get_seals(fd) == 0


def test_truncate_grows(fd: int) -> None:
    memfd.truncate(fd, 16 * P)
    assert memfd.file_size(fd) == 16 * P
    assert os.fstat(fd).st_blocks == 0  # growing commits nothing
    with pytest.raises(OSError) as info:
        memfd.truncate(fd, -1)
    assert info.value.errno == errno.EINVAL


def test_seal_shrink_forbids_shrinking(fd: int) -> None:
    memfd.truncate(fd, 8 * P)
    assert memfd.seal_shrink(fd) is True
    assert memfd.get_seals(fd) & fcntl.F_SEAL_SHRINK
    assert memfd.seal_shrink(fd) is True  # idempotent
    with pytest.raises(OSError) as info:
        memfd.truncate(fd, 4 * P)
    assert info.value.errno == errno.EPERM
    memfd.truncate(fd, 16 * P)  # growing is still allowed
    assert memfd.file_size(fd) == 16 * P


def test_seal_shrink_on_unsealable_files_returns_false() -> None:
    plain = os.memfd_create("no-sealing", os.MFD_CLOEXEC)
    try:
        assert memfd.seal_shrink(plain) is False
    finally:
        os.close(plain)
    with tempfile.TemporaryFile() as f:
        assert memfd.seal_shrink(f.fileno()) is False
        with pytest.raises(OSError):
            memfd.get_seals(f.fileno())
    r, w = os.pipe()
    try:
        assert memfd.seal_shrink(r) is False
    finally:
        os.close(r)
        os.close(w)


def test_reopen_readonly_cannot_write_or_truncate(fd: int) -> None:
    memfd.truncate(fd, 4 * P)
    os.pwrite(fd, b"hello", 0)
    assert memfd.seal_shrink(fd)
    ro = memfd.reopen(fd, readonly=True)
    try:
        assert ro != fd
        assert not os.get_inheritable(ro)
        assert os.pread(ro, 5, 0) == b"hello"
        with pytest.raises(OSError) as info:
            os.pwrite(ro, b"x", 0)
        assert info.value.errno == errno.EBADF
        with pytest.raises(OSError):
            os.ftruncate(ro, 8 * P)
        with pytest.raises(OSError):
            memfd.truncate(ro, 2 * P)
        with pytest.raises(PermissionError):
            mmap.mmap(ro, P, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        m = mmap.mmap(ro, P, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        assert m[:5] == b"hello"
        # Later writes through the owner's fd are visible to the reader.
        os.pwrite(fd, b"HELLO", 0)
        assert m[:5] == b"HELLO"
        m.close()
        assert memfd.file_size(fd) == 4 * P
    finally:
        os.close(ro)


def test_reopen_readwrite_is_a_cloexec_duplicate(fd: int) -> None:
    memfd.truncate(fd, P)
    rw = memfd.reopen(fd, readonly=False)
    try:
        os.pwrite(rw, b"abc", 10)
        assert os.pread(fd, 3, 10) == b"abc"
        assert not os.get_inheritable(rw)
        assert os.fstat(rw).st_ino == os.fstat(fd).st_ino
        # A memfd made here is mode 0444: it cannot be opened for writing
        # again by path (root aside), which is why this is a duplicate.
        assert os.fstat(fd).st_mode & 0o777 == 0o444
    finally:
        os.close(rw)


def test_reopen_bad_fd() -> None:
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    with pytest.raises(FileNotFoundError):
        memfd.reopen(r, readonly=True)
    with pytest.raises(ValueError):
        memfd.reopen(-1, readonly=True)


def test_ima_workaround_succeeds(fd: int) -> None:
    # On an empty file (the raw path) and on a sized one (the mmap module).
    assert memfd.ima_workaround(fd, P) is None
    memfd.truncate(fd, 4 * P)
    assert memfd.ima_workaround(fd, P) is None
    assert os.fstat(fd).st_blocks == 0


def test_ima_workaround_returns_errors(fd: int) -> None:
    memfd.truncate(fd, P)
    with faults.injected("mmap", errno.EPERM, times=1):
        err = memfd.ima_workaround(fd, P)
    assert isinstance(err, OSError)
    assert err.errno == errno.EPERM
    assert faults.calls("mmap") == 1
    # A real kernel error comes back the same way: an fd of a pipe cannot be mapped.
    r, w = os.pipe()
    try:
        err = memfd.ima_workaround(r, P)
        assert isinstance(err, OSError)
    finally:
        os.close(r)
        os.close(w)


def test_injected_ftruncate_and_fstat(fd: int) -> None:
    with faults.injected("ftruncate", errno.ENOSPC, times=1):
        with pytest.raises(OSError) as info:
            memfd.truncate(fd, 4 * P)
        assert info.value.errno == errno.ENOSPC
        memfd.truncate(fd, 4 * P)
    assert faults.calls("ftruncate") == 1
    assert memfd.file_size(fd) == 4 * P
    with faults.injected("fstat", errno.EIO), pytest.raises(OSError) as info:
        memfd.file_size(fd)
    assert info.value.errno == errno.EIO
    assert faults.calls("fstat") == 1
