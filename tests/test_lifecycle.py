"""Opening and closing a memory file: ownership of the fd, what leaving the
``async with`` block does, exceptions, sharing, ``str(mf)``.

Real memfds, files, pipes and child processes; faults only through
``aiopgalloc.host.faults``.
"""

from __future__ import annotations

import errno
import fcntl
import gc
import json
import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from helpers import fd_is_open, fill_byte, open_fds, read_all, run_child, write_all

from aiopgalloc import (
    HUGE_PAGE_SIZE,
    PAGE_SIZE,
    AccessType,
    ClosedError,
    EvictableRange,
    FileRange,
    MemoryFileOpts,
    open_memory_file,
)
from aiopgalloc.host.faults import faults

pytestmark = pytest.mark.anyio

P = PAGE_SIZE
H = HUGE_PAGE_SIZE
SMALL = MemoryFileOpts(chunk_size=H)


@pytest.fixture(autouse=True)
def _no_leftover_faults() -> Iterator[None]:
    faults.reset()
    yield
    faults.reset()


class _User:
    async def evict(self, er: EvictableRange) -> None:
        pass


# ------------------------------------------------------------------ opening


async def test_new_memfd_is_cloexec_and_sealed_against_shrinking() -> None:
    async with open_memory_file(opts=SMALL) as mf:
        fd = mf.fd
        assert not os.get_inheritable(fd)
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        assert os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:")
        ino = os.fstat(fd).st_ino
        # close_fds=False: only close-on-exec keeps the fd from the child.
        probe = (
            "import os\n"
            "try:\n"
            f"    print(os.fstat({fd}).st_ino)\n"
            "except OSError as e:\n"
            "    print('errno', e.errno)\n"
        )
        out = run_child(probe, close_fds=False)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() != str(ino)
        # Sealed against shrinking: nobody can truncate it under our mappings.
        assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 0)
        # Growing is still allowed (the allocator grows the file).
        fr = mf.allocate(2 * H)
        assert mf.total_size() >= fr.end
        mf.check_invariants()


async def test_int_fd_is_truncated_and_owned(tmp_path: Path) -> None:
    fd = os.memfd_create("caller-memfd", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.write(fd, b"old data that must go" * 1000)
    os.fsync(fd)
    assert os.fstat(fd).st_blocks > 0
    async with open_memory_file(fd, SMALL) as mf:
        assert mf.fd == fd
        st = os.fstat(fd)
        assert st.st_size == H  # truncated to zero, then grown to one chunk
        assert st.st_blocks == 0  # the old bytes are gone, not just hidden
        assert os.pread(fd, 64, 0) == bytes(64)
        fr = mf.allocate(P)
        assert read_all(mf, fr) == bytes(P)
        write_all(mf, fr, b"n" * P)
        assert os.pread(fd, 4, 0) == b"nnnn"
        mf.check_invariants()
    # Ownership passed: the block closed the caller's fd.
    assert not fd_is_open(fd)


async def test_regular_file_fd_is_owned(tmp_path: Path) -> None:
    path = tmp_path / "backing"
    path.write_bytes(b"x" * 10000)
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    async with open_memory_file(fd, SMALL) as mf:
        assert os.fstat(fd).st_size == H
        fr = mf.allocate(3 * H)  # grows the file past one chunk
        assert read_all(mf, fr)[:10000] == bytes(10000)
        write_all(mf, FileRange(fr.start, fr.start + P), b"q" * P)
        mf.dec_ref(fr)
        await mf.wait_for_reclaim()
        mf.check_invariants()
    assert not fd_is_open(fd)
    assert path.stat().st_size >= 3 * H


async def test_file_object_ownership_passes_buffered(tmp_path: Path) -> None:
    # The natural way to hand over a file: the caller's with-block closes its
    # object afterwards, which must be harmless.
    with open(tmp_path / "obj", "w+b") as f:
        ino = os.fstat(f.fileno()).st_ino
        async with open_memory_file(f, SMALL) as mf:
            gc.collect()
            assert os.fstat(mf.fd).st_ino == ino  # still our file
            fr = mf.allocate(2 * H)  # grows the file: needs a working fd
            write_all(mf, fr, b"z" * fr.length)
            assert os.pread(mf.fd, 3, fr.start) == b"zzz"
            mf.check_invariants()
            fd = mf.fd
        assert not fd_is_open(fd)


async def test_file_object_ownership_passes_raw(tmp_path: Path) -> None:
    foreign = -1
    try:
        with open(tmp_path / "raw", "w+b", buffering=0) as f:
            async with open_memory_file(f, SMALL) as mf:
                fd = mf.fd
                fr = mf.allocate(2 * H)
                write_all(mf, fr, b"r" * fr.length)
            assert not fd_is_open(fd)
            # The number is free again: the next open (here forced) reuses it.
            null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            if null == fd:
                foreign = null
            else:
                foreign = os.dup2(null, fd, inheritable=False)
                os.close(null)
            assert os.path.samestat(os.fstat(foreign), os.stat(os.devnull))
        # The caller's object closed at the end of its with-block; it must not
        # have owned the fd any more.
        assert fd_is_open(foreign)
    finally:
        if foreign >= 0 and fd_is_open(foreign):
            os.close(foreign)


async def test_file_object_closed_after_block(tmp_path: Path) -> None:
    """The fd of a file object is closed once the block ends (whatever
    happened to it inside)."""
    f = open(tmp_path / "obj2", "w+b")  # noqa: SIM115
    fd = f.fileno()
    async with open_memory_file(f, SMALL):
        pass
    assert not fd_is_open(fd)


@pytest.mark.parametrize(
    "bad", ["/tmp/x", b"x", 3.0, True, False, object(), [3]], ids=lambda b: type(b).__name__
)
async def test_bad_file_type(bad: object) -> None:
    before = open_fds()
    with pytest.raises(TypeError):
        async with open_memory_file(bad):  # type: ignore[arg-type]
            pytest.fail("opened")
    assert open_fds() == before


async def test_pipe_is_refused_and_stays_open() -> None:
    r, w = os.pipe()
    try:
        before = open_fds()
        with pytest.raises(ValueError):
            async with open_memory_file(r):
                pytest.fail("opened")
        assert fd_is_open(r) and fd_is_open(w)
        assert open_fds() == before
        os.write(w, b"ok")
        assert os.read(r, 2) == b"ok"
    finally:
        os.close(r)
        os.close(w)


async def test_directory_fd_is_refused_and_stays_open(tmp_path: Path) -> None:
    d = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(ValueError):
            async with open_memory_file(d):
                pytest.fail("opened")
        assert stat.S_ISDIR(os.fstat(d).st_mode)
    finally:
        os.close(d)


async def test_closed_fd_is_refused() -> None:
    fd = os.memfd_create("gone")
    os.close(fd)
    with pytest.raises(OSError) as info:
        async with open_memory_file(fd):
            pytest.fail("opened")
    assert info.value.errno == errno.EBADF


@pytest.mark.parametrize("opts", ["x", {}, 1, MemoryFileOpts], ids=repr)
async def test_bad_opts(opts: object) -> None:
    before = open_fds()
    with pytest.raises(TypeError):
        async with open_memory_file(None, opts):  # type: ignore[arg-type]
            pytest.fail("opened")
    assert open_fds() == before


async def test_open_failure_comes_out_as_itself_and_leaks_nothing() -> None:
    before = open_fds()
    with faults.injected("ftruncate", errno.EIO), pytest.raises(OSError) as info:
        async with open_memory_file(opts=SMALL):
            pytest.fail("opened")
    assert type(info.value) is OSError and info.value.errno == errno.EIO
    assert open_fds() == before


async def test_open_failure_leaves_callers_fd_open() -> None:
    fd = os.memfd_create("mine")
    try:
        with faults.injected("ftruncate", errno.EIO), pytest.raises(OSError):
            async with open_memory_file(fd, SMALL):
                pytest.fail("opened")
        assert fd_is_open(fd)
    finally:
        os.close(fd)


async def test_ima_workaround_failure_is_logged_not_fatal(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="aiopgalloc")
    with faults.injected("mmap", errno.EACCES, times=1):
        async with open_memory_file(opts=SMALL) as mf:
            assert faults.calls("mmap") == 1
            fr = mf.allocate(4 * P)
            write_all(mf, fr, b"i" * fr.length)
            assert read_all(mf, fr) == b"i" * fr.length
            mf.dec_ref(fr)
            await mf.wait_for_reclaim()
            assert mf.total_usage() == 0
            mf.check_invariants()
    msgs = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("IMA" in m or "PROT_EXEC" in m for m in msgs), msgs


class _SourceFailsToOpen:
    """A pressure source whose setup fails (as a cgroup file may refuse)."""

    name = "fails-to-open"

    async def __aenter__(self) -> _SourceFailsToOpen:
        raise PermissionError(errno.EACCES, "no pressure notifications here")

    async def __aexit__(self, *exc: object) -> None:
        return None

    def __aiter__(self) -> _SourceFailsToOpen:
        return self

    async def __anext__(self) -> object:
        raise StopAsyncIteration


class _SourceFailsLater(_SourceFailsToOpen):
    """A pressure source that opens, then fails while being read."""

    name = "fails-later"

    async def __aenter__(self) -> _SourceFailsLater:
        return self

    async def __anext__(self) -> object:
        await anyio.sleep(0.01)
        raise OSError(errno.EIO, "reading the pressure file failed")


def _pressure_opts(source: object) -> MemoryFileOpts:
    return MemoryFileOpts(chunk_size=H, use_host_memcg_pressure=True, pressure_source=source)


async def test_open_failure_in_pressure_source_comes_out_as_itself() -> None:
    before = open_fds()
    with pytest.raises(BaseException) as info:
        async with open_memory_file(opts=_pressure_opts(_SourceFailsToOpen())):
            pytest.fail("opened")
    assert type(info.value) is PermissionError, repr(info.value)
    assert open_fds() == before


async def test_open_failure_in_pressure_source_leaves_callers_fd_open() -> None:
    fd = os.memfd_create("mine")
    try:
        with pytest.raises((OSError, BaseExceptionGroup)):
            async with open_memory_file(fd, _pressure_opts(_SourceFailsToOpen())):
                pytest.fail("opened")
        assert fd_is_open(fd)
    finally:
        if fd_is_open(fd):
            os.close(fd)


async def test_pressure_source_failing_later_does_not_kill_the_block(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="aiopgalloc")
    done = False
    async with open_memory_file(opts=_pressure_opts(_SourceFailsLater())) as mf:
        await anyio.sleep(0.2)
        fr = mf.allocate(P)
        mf.dec_ref(fr)
        done = True
    assert done
    assert any("fails-later" in r.getMessage() for r in caplog.records), caplog.records


# ------------------------------------------------------------------ closing


async def test_leaving_the_block_stops_tasks_and_closes_fds() -> None:
    fds_before = open_fds()
    tasks_before = {t.id for t in anyio.get_running_tasks()}
    with anyio.fail_after(5):
        async with open_memory_file(opts=SMALL) as mf:
            assert {t.id for t in anyio.get_running_tasks()} - tasks_before  # it runs tasks
            a = mf.allocate(3 * H)  # several chunks mapped (each mmap holds a dup fd)
            fill_byte(mf, a, 0xAB)
            b = mf.allocate(P)
            mf.dec_ref(a)
            await mf.wait_for_reclaim()
            assert mf.total_usage() == 0
            views = mf.map_internal(b)
            views[0][:4] = b"abcd"
            for v in views:
                v.release()
            del views
            shared = mf.share()
            os.close(shared)
            await mf.update_usage()
            mf.check_invariants()
    assert {t.id for t in anyio.get_running_tasks()} == tasks_before
    assert open_fds() == fds_before
    assert mf.closed


async def test_leaving_with_a_big_release_in_flight() -> None:
    fds_before = open_fds()
    with anyio.fail_after(10):
        async with open_memory_file(opts=SMALL) as mf:
            fr = mf.allocate(16 * H)
            fill_byte(mf, fr, 1)
            mf.dec_ref(fr)  # a release batch big enough for a worker thread
            await anyio.sleep(0)
            await anyio.sleep(0)
    assert open_fds() == fds_before


def _closed_calls(mf, fr: FileRange) -> list[tuple[str, object]]:  # type: ignore[no-untyped-def]
    user = _User()
    er = EvictableRange(0, P)
    return [
        ("allocate", lambda: mf.allocate(P)),
        ("inc_ref", lambda: mf.inc_ref(fr)),
        ("dec_ref", lambda: mf.dec_ref(fr)),
        ("map_internal", lambda: mf.map_internal(fr)),
        ("map_internal READ", lambda: mf.map_internal(fr, AccessType.READ)),
        ("decommit", lambda: mf.decommit(fr)),
        ("update_usage", lambda: mf.update_usage()),
        ("wait_for_reclaim", lambda: mf.wait_for_reclaim()),
        ("total_usage", lambda: mf.total_usage()),
        ("total_size", lambda: mf.total_size()),
        ("fd", lambda: mf.fd),
        ("share", lambda: mf.share()),
        ("share rw", lambda: mf.share(readonly=False)),
        ("mark_evictable", lambda: mf.mark_evictable(user, er)),
        ("mark_unevictable", lambda: mf.mark_unevictable(user, er)),
        ("mark_all_unevictable", lambda: mf.mark_all_unevictable(user)),
        ("start_evictions", lambda: mf.start_evictions()),
        ("should_cache_evictable", lambda: mf.should_cache_evictable()),
        ("wait_for_evictions", lambda: mf.wait_for_evictions()),
    ]


async def test_every_call_after_close_raises_closed_error() -> None:
    async with open_memory_file(opts=SMALL) as mf:
        fr = mf.allocate(P)
        text = str(mf)
    for name, call in _closed_calls(mf, fr):
        with pytest.raises(ClosedError):
            result = call()  # type: ignore[operator]
            if hasattr(result, "__await__"):
                await result
            pytest.fail(f"{name} did not raise")
    # str(mf) still works after close, and shows the state at close.
    assert str(mf) == text
    assert "closed" in repr(mf)
    mf.check_invariants()


async def test_views_alive_at_close(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="aiopgalloc")
    fds_before = open_fds()
    async with open_memory_file(opts=SMALL) as mf:
        fr = mf.allocate(2 * H + P)  # crosses chunks: several views
        views = mf.map_internal(fr)
        assert len(views) >= 2
        ro = mf.map_internal(FileRange(fr.start, fr.start + P), AccessType.READ)
        views[0][:5] = b"hello"
    msgs = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("alive" in m for m in msgs), msgs
    # The views still work after close: read and write.
    assert bytes(views[0][:5]) == b"hello"
    assert bytes(ro[0][:5]) == b"hello"
    views[-1][-3:] = b"end"
    assert bytes(views[-1][-3:]) == b"end"
    views[0][:5] = b"HELLO"
    assert bytes(ro[0][:5]) == b"HELLO"  # still one shared mapping of one file
    # Dropping them later is fine, and their mappings (and dup fds) go too.
    del views, ro
    gc.collect()
    assert open_fds() == fds_before


# --------------------------------------------------------------- exceptions


class MyError(Exception):
    pass


class MySubError(MyError, KeyError):
    pass


class MyBaseError(BaseException):
    """Not an Exception: task groups treat these specially."""


@pytest.mark.parametrize("after_await", [False, True], ids=["sync", "after-await"])
@pytest.mark.parametrize(
    "exc_type", [KeyError, MyError, MySubError, ValueError, RuntimeError, MyBaseError]
)
async def test_exception_comes_out_as_itself(
    exc_type: type[BaseException], after_await: bool
) -> None:
    fds_before = open_fds()
    err = exc_type("x")
    with pytest.raises(BaseException) as info:
        async with open_memory_file(opts=SMALL) as mf:
            mf.allocate(P)
            if after_await:
                await anyio.sleep(0)
                await anyio.sleep(0.01)
            raise err
    assert info.value is err
    assert type(info.value) is exc_type
    assert not isinstance(info.value, BaseExceptionGroup)
    assert mf.closed
    assert open_fds() == fds_before


async def test_exception_with_pending_frees_comes_out_as_itself() -> None:
    err = KeyError("with frees")
    with pytest.raises(KeyError) as info:
        async with open_memory_file(opts=SMALL) as mf:
            fr = mf.allocate(8 * H)
            fill_byte(mf, fr, 7)
            mf.dec_ref(fr)
            await anyio.sleep(0)
            raise err
    assert info.value is err


async def test_exception_group_from_body_comes_out_as_itself() -> None:
    err = ExceptionGroup("mine", [KeyError("a"), ValueError("b")])
    with pytest.raises(BaseException) as info:
        async with open_memory_file(opts=SMALL):
            raise err
    assert info.value is err


async def test_outer_cancellation_exits_cleanly() -> None:
    fds_before = open_fds()
    with anyio.fail_after(5):
        with anyio.move_on_after(0.05) as scope:
            async with open_memory_file(opts=SMALL) as mf:
                fr = mf.allocate(P)
                mf.dec_ref(fr)
                await anyio.sleep(10)
    assert scope.cancelled_caught
    assert mf.closed
    assert open_fds() == fds_before


async def test_cancel_from_inside_the_block() -> None:
    with anyio.CancelScope() as scope:
        async with open_memory_file(opts=SMALL) as mf:
            scope.cancel()
            await anyio.sleep(10)
    assert scope.cancelled_caught
    assert mf.closed


async def test_wait_for_reclaim_in_flight_at_close_raises_closed_error() -> None:
    outcome: list[BaseException | None] = []

    async def waiter(mf) -> None:  # type: ignore[no-untyped-def]
        try:
            await mf.wait_for_reclaim()
            outcome.append(None)
        except ClosedError as exc:
            outcome.append(exc)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            # Punches and the hand-zeroing fallback both fail: the releaser
            # retries after a back-off, so freed pages stay pending.
            with faults.injected("fallocate", errno.EIO), faults.injected("memset", errno.EIO):
                async with open_memory_file(opts=SMALL) as mf:
                    fr = mf.allocate(P)
                    mf.dec_ref(fr)
                    tg.start_soon(waiter, mf)
                    await anyio.sleep(0.1)
                    assert mf.reclaim_pending() == P
    assert len(outcome) == 1 and isinstance(outcome[0], ClosedError)


# ------------------------------------------------------------------ sharing

_CHILD_RO = """
import errno, json, mmap, os
fd, off, n, size = {fd}, {off}, {n}, {size}
res = {{}}
m = mmap.mmap(fd, n, mmap.MAP_SHARED, mmap.PROT_READ, offset=off)
res["read"] = m[:n].hex()
m.close()
def attempt(name, f):
    try:
        f()
        res[name] = "ok"
    except OSError as e:
        res[name] = e.errno
attempt("pwrite", lambda: os.pwrite(fd, b"X", off))
attempt("mmap_write", lambda: mmap.mmap(fd, n, mmap.MAP_SHARED,
        mmap.PROT_READ | mmap.PROT_WRITE, offset=off))
attempt("grow", lambda: os.ftruncate(fd, size * 2))
attempt("shrink", lambda: os.ftruncate(fd, 0))
res["size"] = os.fstat(fd).st_size
print(json.dumps(res))
"""

_CHILD_RW = """
import json, mmap, os
fd, off, n = {fd}, {off}, {n}
res = {{}}
os.pwrite(fd, b"child-pwrite", off)
m = mmap.mmap(fd, n, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=off)
m[100:111] = b"child-mmap!"
m.close()
try:
    os.ftruncate(fd, 0)
    res["shrink"] = "ok"
except OSError as e:
    res["shrink"] = e.errno
print(json.dumps(res))
"""


async def test_share_readonly() -> None:
    async with open_memory_file(opts=SMALL) as mf:
        mf.allocate(P)
        fr = mf.allocate(2 * P)
        data = os.urandom(fr.length)
        write_all(mf, fr, data)
        size = mf.total_size()
        fd = mf.share(readonly=True)
        try:
            assert fd != mf.fd
            assert not os.get_inheritable(fd)
            code = _CHILD_RO.format(fd=fd, off=fr.start, n=fr.length, size=size)
            out = run_child(code, pass_fds=(fd,))
            assert out.returncode == 0, out.stderr
            res = json.loads(out.stdout)
            assert bytes.fromhex(res["read"]) == data
            assert res["pwrite"] == errno.EBADF
            assert res["mmap_write"] == errno.EACCES
            assert res["grow"] != "ok"
            assert res["shrink"] != "ok"
            assert res["size"] == size
            # Nothing changed on our side.
            assert read_all(mf, fr) == data
            assert os.fstat(mf.fd).st_size == size == mf.total_size()
            mf.check_invariants()
        finally:
            os.close(fd)  # the caller owns the shared fd


async def test_share_readwrite() -> None:
    async with open_memory_file(opts=SMALL) as mf:
        fr = mf.allocate(P)
        fd = mf.share(readonly=False)
        try:
            out = run_child(_CHILD_RW.format(fd=fd, off=fr.start, n=fr.length), pass_fds=(fd,))
            assert out.returncode == 0, out.stderr
            res = json.loads(out.stdout)
            got = read_all(mf, fr)
            assert got[:12] == b"child-pwrite"
            assert got[100:111] == b"child-mmap!"
            # Even a writable share cannot shrink a file this library created.
            assert res["shrink"] == errno.EPERM
            assert os.fstat(mf.fd).st_size == mf.total_size()
        finally:
            os.close(fd)


async def test_shared_fd_outlives_the_block() -> None:
    async with open_memory_file(opts=SMALL) as mf:
        fr = mf.allocate(P)
        write_all(mf, fr, b"s" * P)
        fd = mf.share()
    try:
        # The caller owns it: the block did not close it, and it still reads.
        assert os.pread(fd, 4, fr.start) == b"ssss"
    finally:
        os.close(fd)


# ---------------------------------------------------------------- str(mf)


async def test_str_is_a_pure_function_of_state() -> None:
    async with open_memory_file(opts=SMALL) as a, open_memory_file(opts=SMALL) as b:
        assert str(a) == str(a) == str(b)
        e0 = str(a)
        fa = a.allocate(3 * P)
        fb = b.allocate(3 * P)
        assert str(a) != e0
        assert str(a) == str(a) == str(b)
        s1 = str(a)
        write_all(a, fa, b"w" * fa.length)  # touching bytes is not allocator state
        a.total_usage()
        a.total_size()
        a.reclaim_pending()
        a.check_invariants()
        assert str(a) == s1
        a.inc_ref(FileRange(fa.start, fa.start + P))
        assert str(a) != s1
        a.dec_ref(FileRange(fa.start, fa.start + P))
        assert str(a) == s1 == str(b)
        a.dec_ref(fa)
        b.dec_ref(fb)
        assert str(a) == str(b)
        await a.wait_for_reclaim()
        await b.wait_for_reclaim()
        assert str(a) == str(b) == e0
