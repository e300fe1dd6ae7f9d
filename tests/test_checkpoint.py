"""Checkpoints: ``save`` and ``load_memory_file`` round trips, damage, refusals.

Every async test runs on asyncio, asyncio + uvloop and trio.  Round trips
compare the restored file with the original while both are open: every
byte of every live page, every segment's kind and refs, the file size, the
accounting, and where first fit puts new allocations.
"""

from __future__ import annotations

import io
import os
import random
import struct
import threading
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from helpers import fill_byte, open_fds

from aiopgalloc import (
    HUGE_PAGE_SIZE,
    PAGE_SIZE,
    AccessType,
    CheckpointError,
    ClosedError,
    DelayedEviction,
    EvictableRange,
    FileRange,
    MemoryFile,
    MemoryFileOpts,
    MemoryKind,
    MemoryStats,
    load_memory_file,
    open_memory_file,
)
from aiopgalloc import checkpoint as ckpt
from aiopgalloc.host import syscalls

pytestmark = pytest.mark.anyio

P = PAGE_SIZE
H = HUGE_PAGE_SIZE
MiB = 1 << 20
GiB = 1 << 30


# ------------------------------------------------------------------ helpers


def live_segments(mf: MemoryFile) -> list[tuple[int, int, MemoryKind, int]]:
    """The usage set without known_committed and without releasing pages,
    touching segments of equal kind and refs joined."""
    out: list[tuple[int, int, MemoryKind, int]] = []
    for r in mf.page_map():
        if r.state != "live":
            continue
        if out and out[-1][1] == r.start and out[-1][2:] == (r.kind, r.refs):
            out[-1] = (out[-1][0], r.end, r.kind, r.refs)
        else:
            out.append((r.start, r.end, r.kind, r.refs))
    return out


def read_bytes(mf: MemoryFile, fr: FileRange) -> bytes:
    """The bytes of ``fr`` read with pread, which (unlike a read fault on
    the mapping) does not commit holes."""
    parts = []
    pos = fr.start
    while pos < fr.end:
        piece = os.pread(mf.fd, min(fr.end - pos, 64 * MiB), pos)
        assert piece
        parts.append(piece)
        pos += len(piece)
    return b"".join(parts)


def write_page(mf: MemoryFile, offset: int, data: bytes) -> None:
    v = mf.map_internal(FileRange(offset, offset + len(data)), AccessType.WRITE)[0]
    v[:] = data
    v.release()


def build_random(mf: MemoryFile, rng: random.Random) -> None:
    """Random allocations, kinds, contents (random, zeros, untouched), extra
    refs on sub-ranges, frees (some partial), and recycled pages."""
    kinds = list(MemoryKind)
    allocs: list[FileRange] = []

    def fill(fr: FileRange) -> None:
        pages = range(fr.start, fr.end, P)
        chosen = rng.sample(pages, min(len(pages), 40)) if len(pages) > 64 else pages
        for p in chosen:
            c = rng.random()
            if c < 0.35:
                continue  # never touched
            write_page(mf, p, bytes(P) if c < 0.5 else rng.randbytes(P))

    for _ in range(50):
        r = rng.random()
        if r < 0.1:
            n = rng.choice([H, 2 * H])
        elif r < 0.15:
            n = H + P * rng.randint(1, 16)  # huge-page aligned, odd length
        else:
            n = P * rng.randint(1, 40)
        fr = mf.allocate(n, rng.choice(kinds))
        fill(fr)
        allocs.append(fr)
    for _ in range(25):
        fr = rng.choice(allocs)
        a = rng.randrange(fr.start, fr.end, P)
        b = rng.randrange(a + P, fr.end + P, P)
        mf.inc_ref(FileRange(a, b))
    for fr in rng.sample(allocs, 12):
        mf.dec_ref(fr)  # pages with extra refs stay live
    for _ in range(8):
        fill(mf.allocate(P * rng.randint(1, 8), rng.choice(kinds)))  # may recycle


def expected_accounting(mf: MemoryFile) -> MemoryStats:
    """What a load must account: the known-committed live pages that are
    not all zero, per kind (freed and zero pages are not saved)."""
    per = [0] * len(MemoryKind)
    zero = bytes(P)
    for s, e, state, kind, _refs, committed in mf.page_map():
        if state == "live" and committed:
            data = read_bytes(mf, FileRange(s, e))
            per[kind] += sum(P for i in range(0, e - s, P) if data[i : i + P] != zero)
    return MemoryStats(*per)


async def assert_same(src: MemoryFile, dst: MemoryFile) -> None:
    """Same books, same bytes, nothing outside the live pages."""
    dst.check_invariants()
    assert dst.total_size() == src.total_size()
    assert live_segments(dst) == live_segments(src)
    runs = dst.page_map()
    assert all(r.state == "live" for r in runs) and dst.reclaim_pending() == 0
    # Exactly the pages written back are committed, and known to be.
    st = dst.stats()
    assert dst.total_usage() == dst.accounting.snapshot().total == st.known_committed_bytes
    cur = 0
    for r in [*runs, None]:
        end = dst.total_size() if r is None else r.start
        if cur < end:
            assert syscalls.data_ranges(dst.fd, cur, end) == [], f"data in the gap {cur:#x}"
        if r is not None:
            cur = r.end
    for s, e, _k, _r in live_segments(src):
        assert read_bytes(dst, FileRange(s, e)) == read_bytes(src, FileRange(s, e)), hex(s)


def sections(data: bytes) -> list[tuple[bytes, int, int]]:
    """(tag, offset, payload length) of each section of a checkpoint."""
    out = []
    pos = 32
    while pos < len(data):
        tag, _r, length = struct.unpack_from("<4sIQ", data, pos)
        out.append((tag, pos, length))
        pos += 16 + length + 4
    return out


def recrc(data: bytearray, at: int) -> None:
    """Recompute the CRC of the section at ``at`` (after a deliberate edit)."""
    (length,) = struct.unpack_from("<Q", data, at + 8)
    end = at + 16 + length
    struct.pack_into("<I", data, end, zlib.crc32(data[at:end]))


def task_count() -> int:
    return len(anyio.get_running_tasks())


# --------------------------------------------------------------- round trips


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("to", ["path", "bytesio"])
async def test_round_trip_random(seed: int, to: str, tmp_path: Path) -> None:
    rng = random.Random(seed)
    async with open_memory_file() as src:
        build_random(src, rng)
        await src.update_usage()
        src.check_invariants()
        before = src.accounting.snapshot()
        expected = expected_accounting(src)
        books = live_segments(src)
        target: Any = tmp_path / "ck" if to == "path" else io.BytesIO()
        size = await src.save(target)
        assert live_segments(src) == books, "save changed the allocator"
        if isinstance(target, io.BytesIO):
            assert size == len(target.getvalue())
            target.seek(0)
        else:
            assert size == target.stat().st_size
            assert os.listdir(tmp_path) == ["ck"], "temporary file left behind"
        async with load_memory_file(target) as dst:
            await assert_same(src, dst)
            after = dst.accounting.snapshot()
            assert after == expected
            # The difference from the original's accounting is exactly the
            # freed pages and the all-zero committed pages, not saved.
            waste = sum(
                r.end - r.start for r in src.page_map() if r.state == "freed" and r.committed
            )
            assert before.total - after.total >= waste
            # update_usage finds nothing new: the books are already exact.
            await dst.update_usage()
            assert dst.accounting.snapshot() == after
            # First fit respects the restored segments: the same requests land
            # in the same places in both files.
            await src.wait_for_reclaim()
            for n in [P, 3 * P, H, 17 * P, 2 * H, P]:
                assert dst.allocate(n) == src.allocate(n)
            dst.check_invariants()
        src.check_invariants()


async def test_accounting_equals_original_after_update_usage() -> None:
    async with open_memory_file() as src:
        kinds = [MemoryKind.ANONYMOUS, MemoryKind.PAGE_CACHE, MemoryKind.TMPFS, MemoryKind.SYSTEM]
        for i, kind in enumerate(kinds):
            fr = src.allocate((i + 1) * 5 * P, kind)
            fill_byte(src, FileRange(fr.start, fr.start + (i + 1) * 2 * P), 0x41 + i)
        src.allocate(H, MemoryKind.MAPPED)  # never touched
        await src.update_usage()
        before = src.accounting.snapshot()
        assert before.total == 20 * P
        buf = io.BytesIO()
        await src.save(buf)
        buf.seek(0)
        async with load_memory_file(buf) as dst:
            assert dst.accounting.snapshot() == before
            await assert_same(src, dst)


async def test_freed_pages_are_not_saved() -> None:
    async with open_memory_file() as src:
        keep = src.allocate(4 * P)
        gone = src.allocate(4 * P)
        fill_byte(src, keep, 1)
        fill_byte(src, gone, 2)
        await src.update_usage()
        src.dec_ref(gone)  # freed, possibly not yet released: still holds 2s
        buf = io.BytesIO()
        await src.save(buf)
        buf.seek(0)
        async with load_memory_file(buf) as dst:
            assert live_segments(dst) == [(0, 4 * P, MemoryKind.ANONYMOUS, 1)]
            assert dst.accounting.snapshot() == MemoryStats(anonymous=4 * P)
            assert syscalls.data_ranges(dst.fd, gone.start, gone.end) == []
            assert dst.allocate(4 * P) == gone


async def test_find_pages_with_seek_data_when_swap_is_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ckpt, "_swap_enabled", lambda: True)
    async with open_memory_file() as src:
        build_random(src, random.Random(7))
        await src.update_usage()
        buf = io.BytesIO()
        await src.save(buf)
        buf.seek(0)
        async with load_memory_file(buf) as dst:
            await assert_same(src, dst)
            assert dst.accounting.snapshot() == expected_accounting(src)


async def test_one_gib_tenth_written_takes_a_tenth_on_disk(tmp_path: Path) -> None:
    rng = random.Random(5)
    async with open_memory_file() as src:
        pieces = [src.allocate(2 * MiB) for _ in range(512)]
        assert src.total_size() == GiB
        written = rng.sample(pieces, 51)  # 102 MiB, 10% of the file
        for i, fr in enumerate(written):
            fill_byte(src, fr, 1 + i)
        path = tmp_path / "ck"
        size = await src.save(path)
        data_bytes = 51 * 2 * MiB
        meta = 32 + 16 + 16 + 32 + 4 + 16 + 16 + 4  # header, META of one segment, END
        assert size == path.stat().st_size
        assert data_bytes < size < 0.12 * GiB + meta
        assert path.stat().st_blocks * 512 < 0.12 * GiB + 64 * 1024
        async with load_memory_file(path) as dst:
            assert dst.total_size() == GiB
            assert dst.total_usage() == data_bytes
            for fr in rng.sample(written, 5):
                assert read_bytes(dst, fr) == read_bytes(src, fr)


async def test_stream_without_readinto_or_seek_and_embedded_checkpoints() -> None:
    class ReadOnly:
        def __init__(self, data: bytes) -> None:
            self._f = io.BytesIO(data)

        def read(self, n: int) -> bytes:
            return self._f.read(min(n, 1000))  # short reads too

    async with open_memory_file() as a, open_memory_file() as b:
        fill_byte(a, a.allocate(3 * P, MemoryKind.TMPFS), 9)
        fill_byte(b, FileRange(b.allocate(H).start, H // 2), 8)
        buf = io.BytesIO()
        await a.save(buf)
        await b.save(buf)
        buf.write(b"trailing bytes that are not ours")
        stream = ReadOnly(buf.getvalue())
        async with load_memory_file(stream) as a2:
            await assert_same(a, a2)
        async with load_memory_file(stream) as b2:
            await assert_same(b, b2)
        assert stream.read(100) == b"trailing bytes that are not ours"


async def test_empty_file_round_trip_and_progress_zero() -> None:
    calls: list[tuple[int, int]] = []
    async with open_memory_file() as src:
        buf = io.BytesIO()
        await src.save(buf, lambda d, t: calls.append((d, t)))
        assert calls == [(0, 0)]
        buf.seek(0)
        async with load_memory_file(buf) as dst:
            assert dst.page_map() == []
            assert dst.allocate(P) == FileRange(0, P)


async def test_progress_grows_to_total_on_the_loop_thread() -> None:
    calls: list[tuple[int, int, int]] = []
    async with open_memory_file() as src:
        fr = src.allocate(130 * MiB)
        fill_byte(src, fr, 3)
        zero = src.allocate(4 * MiB)
        fill_byte(src, zero, 0)  # committed, all zero: examined, not written
        loop_thread = threading.get_ident()
        buf = io.BytesIO()
        await src.save(buf, lambda d, t: calls.append((d, t, threading.get_ident())))
        assert len(calls) >= 3
        assert all(th == loop_thread for _d, _t, th in calls)
        dones = [d for d, _t, _th in calls]
        assert dones == sorted(set(dones)), "done must grow"
        assert {t for _d, t, _th in calls} == {134 * MiB}
        assert dones[-1] == 134 * MiB
        assert len(buf.getvalue()) < 131 * MiB


async def test_save_refused_while_evictions_are_pending() -> None:
    class SlowUser:
        def __init__(self, mf: MemoryFile, fr: FileRange) -> None:
            self.mf, self.fr = mf, fr
            self.started = anyio.Event()
            self.go = anyio.Event()

        async def evict(self, er: EvictableRange) -> None:
            self.started.set()
            await self.go.wait()
            self.mf.dec_ref(self.fr)

    opts = MemoryFileOpts(delayed_eviction=DelayedEviction.MANUAL)
    async with open_memory_file(opts=opts) as mf:
        fr = mf.allocate(4 * P)
        fill_byte(mf, fr, 7)
        user = SlowUser(mf, fr)
        mf.mark_evictable(user, EvictableRange(0, 4 * P))
        buf = io.BytesIO()
        with pytest.raises(RuntimeError, match="evictions are pending"):
            await mf.save(buf)  # marked, not yet evicted
        mf.start_evictions()
        await user.started.wait()
        with pytest.raises(RuntimeError, match=r"evictions are pending.*1 eviction\(s\) running"):
            await mf.save(buf)
        assert buf.getvalue() == b""
        user.go.set()
        with anyio.fail_after(5):
            await mf.wait_for_evictions()
        await mf.save(buf)
        buf.seek(0)
        async with load_memory_file(buf) as dst:
            assert dst.page_map() == []


@pytest.mark.parametrize("to", ["path", "bytesio"])
async def test_allocating_during_save_fails_and_leaves_nothing_usable(
    to: str, tmp_path: Path
) -> None:
    async with open_memory_file() as src:
        fill_byte(src, src.allocate(4 * P), 1)
        target: Any = tmp_path / "ck" if to == "path" else io.BytesIO()
        with pytest.raises(RuntimeError, match="allocated or freed during save"):
            await src.save(target, lambda d, t: src.allocate(P))
        if isinstance(target, io.BytesIO):
            target.seek(0)
            with pytest.raises(CheckpointError, match="truncated"):
                async with load_memory_file(target):
                    pytest.fail("loaded a checkpoint without END")
        else:
            assert os.listdir(tmp_path) == []


async def test_failed_save_keeps_the_old_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "ck"
    async with open_memory_file() as src:
        fill_byte(src, src.allocate(4 * P), 1)
        await src.save(path)
        old = path.read_bytes()
        fill_byte(src, src.allocate(4 * P), 2)

        def boom(done: int, total: int) -> None:
            raise OSError("progress says no")

        with pytest.raises(OSError, match="progress says no"):
            await src.save(path, boom)
        assert path.read_bytes() == old
        assert os.listdir(tmp_path) == ["ck"]


async def test_body_exception_comes_out_as_itself() -> None:
    async with open_memory_file() as src:
        buf = io.BytesIO()
        await src.save(buf)
    buf.seek(0)
    before = open_fds()
    with pytest.raises(KeyError) as info:
        async with load_memory_file(buf):
            raise KeyError("mine")
    assert type(info.value) is KeyError
    assert open_fds() == before


async def test_bad_arguments() -> None:
    async with open_memory_file() as mf:
        with pytest.raises(TypeError):
            await mf.save(42)  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            await mf.save(io.BytesIO(), progress=3)  # type: ignore[arg-type]
    with pytest.raises(ClosedError):
        await mf.save(io.BytesIO())
    with pytest.raises(TypeError):
        load_memory_file(42)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        load_memory_file(io.BytesIO(), opts={})  # type: ignore[arg-type]


# ------------------------------------------------------------------ damage


async def _make_checkpoint() -> bytes:
    async with open_memory_file() as mf:
        a = mf.allocate(8 * P, MemoryKind.PAGE_CACHE)
        fill_byte(mf, FileRange(a.start, a.start + 2 * P), 0x11)
        fill_byte(mf, FileRange(a.start + 4 * P, a.end), 0x22)
        b = mf.allocate(H)
        fill_byte(mf, FileRange(b.start + P, b.start + 3 * P), 0x33)
        buf = io.BytesIO()
        await mf.save(buf)
        return buf.getvalue()


@pytest.fixture(scope="module")
def good() -> bytes:
    data = anyio.run(_make_checkpoint)
    tags = [t for t, _o, _n in sections(data)]
    assert tags == [b"META", b"PAGE", b"PAGE", b"PAGE", b"END "]
    return data


def _flip(at: Callable[[bytes], int]) -> Callable[[bytes], bytes]:
    def mutate(data: bytes) -> bytes:
        out = bytearray(data)
        out[at(data)] ^= 0x40
        return bytes(out)

    return mutate


def _edit_page_offset(data: bytes) -> bytes:
    out = bytearray(data)
    _t, at, _n = sections(data)[2]
    struct.pack_into("<Q", out, at + 16, 0x100000)  # a gap in the books
    recrc(out, at)
    return bytes(out)


def _edit_header(fmt: str, offset: int, value: int) -> Callable[[bytes], bytes]:
    def mutate(data: bytes) -> bytes:
        out = bytearray(data)
        struct.pack_into(fmt, out, offset, value)
        struct.pack_into("<I", out, 28, zlib.crc32(out[:28]))
        return bytes(out)

    return mutate


def _long_section(data: bytes) -> bytes:
    out = bytearray(data)
    _t, at, _n = sections(data)[1]
    struct.pack_into("<Q", out, at + 8, 8 + (1 << 40))
    return bytes(out)


def _page(i: int) -> Callable[[bytes], int]:
    return lambda d: sections(d)[1 + i][1]


DAMAGE: dict[str, tuple[Callable[[bytes], bytes], str]] = {
    "page-byte": (
        _flip(lambda d: _page(1)(d) + 16 + 8 + 100),
        r"bad checksum in page run \[0x4000, 0x8000\)",
    ),
    "page-offset": (_flip(lambda d: _page(0)(d) + 17), r"page run|checksum"),
    "meta-byte": (_flip(lambda d: 32 + 16 + 20), "bad checksum in section META at offset 32"),
    "meta-tag": (_flip(lambda d: 32), "unknown section"),
    "end-byte": (_flip(lambda d: len(d) - 10), "bad checksum in section END"),
    "header-byte": (_flip(lambda d: 20), r"bad checksum in the header \(offset 0\)"),
    "magic": (_flip(lambda d: 2), "not an aiopgalloc checkpoint: bad magic"),
    "not-a-checkpoint": (lambda d: b"hello world" * 10, "bad magic"),
    "empty": (lambda d: b"", "the input is empty"),
    "newer-version": (
        _edit_header("<H", 8, 2),
        "written by format version 2, this aiopgalloc reads up to 1$",
    ),
    "page-size": (_edit_header("<I", 12, 65536), "65536-byte pages"),
    "flags": (_edit_header("<H", 10, 1), "unknown header flags"),
    "run-outside-books": (_edit_page_offset, "outside the live pages"),
    "length-past-end": (_long_section, "past the end of the input|outside the live pages"),
    "dropped-run": (
        lambda d: d[: _page(1)(d)] + d[_page(2)(d) :],
        "counts 3 page runs .* but 2 runs",
    ),
}


def _cuts(data: bytes) -> list[int]:
    """Places to cut: in the header, in and after META, in a PAGE's head,
    data and CRC, before END and in it."""
    (_t, meta, meta_n), (_t, page, page_n) = sections(data)[:2]
    end = sections(data)[-1][1]
    inner = [meta + 16 + meta_n // 2, meta + 18 + meta_n, page + 20, page + 16 + page_n // 2]
    return [4, 8, 31, 32, 40, *inner, page, page + 17 + page_n, end, len(data) - 1]


class _Pipe:
    """A stream with read() only: no size known, no readinto."""

    def __init__(self, data: bytes) -> None:
        self._f = io.BytesIO(data)

    def read(self, n: int) -> bytes:
        return self._f.read(n)


def _source(kind: str, data: bytes, tmp_path: Path) -> Any:
    if kind == "path":
        path = tmp_path / "ck"
        path.write_bytes(data)
        return path
    return io.BytesIO(data) if kind == "bytesio" else _Pipe(data)


async def _assert_refused(source: Any, match: str) -> None:
    fds, tasks = open_fds(), task_count()
    with pytest.raises(CheckpointError, match=match) as info:
        async with load_memory_file(source):
            pytest.fail("a damaged checkpoint was loaded")
    assert isinstance(info.value, ValueError)
    assert open_fds() == fds, "an fd was leaked"
    assert task_count() == tasks, "a task was left running"


SOURCES = ["path", "bytesio", "pipe"]


@pytest.mark.parametrize("source", SOURCES)
async def test_good_checkpoint_loads(good: bytes, source: str, tmp_path: Path) -> None:
    async with load_memory_file(_source(source, good, tmp_path)) as mf:
        mf.check_invariants()
        assert read_bytes(mf, FileRange(0, 2 * P)) == b"\x11" * 2 * P
        assert mf.accounting.snapshot() == MemoryStats(page_cache=6 * P, anonymous=2 * P)


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("damage", list(DAMAGE))
async def test_damage_is_refused(good: bytes, damage: str, source: str, tmp_path: Path) -> None:
    mutate, match = DAMAGE[damage]
    await _assert_refused(_source(source, mutate(good), tmp_path), match)


@pytest.mark.parametrize("source", SOURCES)
async def test_truncation_is_refused(good: bytes, source: str, tmp_path: Path) -> None:
    for cut in _cuts(good):
        await _assert_refused(
            _source(source, good[:cut], tmp_path), "truncated|past the end of the input"
        )


# ------------------------------------------------------------- cancellation


async def test_cancelled_save_leaves_no_file(tmp_path: Path) -> None:
    async with open_memory_file() as src:
        fill_byte(src, src.allocate(80 * MiB), 5)
        fds = open_fds()
        with anyio.CancelScope() as scope:
            await src.save(tmp_path / "ck", lambda d, t: scope.cancel())
        assert scope.cancelled_caught
        assert os.listdir(tmp_path) == []
        assert open_fds() == fds
        await src.save(tmp_path / "ck")  # and the file still saves


async def test_cancelled_load_leaves_nothing() -> None:
    async with open_memory_file() as src:
        fill_byte(src, src.allocate(80 * MiB), 5)
        buf = io.BytesIO()
        await src.save(buf)

    class CancelMidway:
        """Cancels the loading task from the worker thread once page data
        is being read."""

        def __init__(self, data: bytes, scope: anyio.CancelScope) -> None:
            self._f = io.BytesIO(data)
            self._scope = scope

        def read(self, n: int) -> bytes:
            if self._f.tell() > 20 * MiB:
                anyio.from_thread.run_sync(self._scope.cancel)
            return self._f.read(n)

    fds, tasks = open_fds(), task_count()
    with anyio.CancelScope() as scope:
        async with load_memory_file(CancelMidway(buf.getvalue(), scope)):
            pytest.fail("the load was not cancelled")
    assert scope.cancelled_caught
    assert open_fds() == fds
    assert task_count() == tasks
