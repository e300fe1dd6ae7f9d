"""Faults: host calls failing, user code failing, cancellation, close with views.

Host faults go through the seam of ``aiopgalloc.host.faults`` (real calls,
no mocks: the armed op raises ``OSError`` exactly as a failing kernel call
would).  Each fault gives a clear error (an ``OSError`` carrying the injected
errno, never wrapped, never another type) and leaves the allocator exactly as
it was (the page map, accounting, sizes), or takes the documented fallback (a
punch that fails is replaced by zeroing by hand: the pages read zero, the
memory stays until the pages are used and freed again).  Never a corrupted
state: ``check_invariants()`` after every step, and every live allocation
keeps its bytes.

The sweep runs one scenario touching every host op (growth, mappings,
commits, recycling, scans, releases inline and in a worker thread, decommit)
with each op failing at its 1st, 2nd, ... call (once, or from then on), for
several errnos, until the scenario no longer reaches that call.  Single
cases then cover what the sweep cannot (two ops failing together, user code
failing, cancellation, a close with views alive, in a child process).

The figures (faults armed, fired) are printed by the last test.
"""

from __future__ import annotations

import errno
import inspect
import logging
import os
import textwrap
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from helpers import (
    State,
    backend_id,
    books_of,
    evictions_of,
    fill_byte,
    mapping_of,
    memfd_mappings,
    non_worker_threads,
    open_fds,
    run_child,
    usage_segments,
)

from aiopgalloc import (
    HUGE_PAGE_SIZE,
    PAGE_SIZE,
    DelayedEviction,
    EvictableRange,
    FileRange,
    MemoryFile,
    MemoryFileOpts,
    MemoryKind,
    open_memory_file,
)
from aiopgalloc.host.faults import OPS, faults
from aiopgalloc.options import CommitMode

pytestmark = pytest.mark.anyio

P = PAGE_SIZE
H = HUGE_PAGE_SIZE
OPTS = MemoryFileOpts(chunk_size=H, delayed_eviction=DelayedEviction.MANUAL)
SWEEP_ERRNOS = (errno.EIO, errno.ENOSPC, errno.ENOMEM, errno.EINVAL)

# Figures per backend id: faults armed, fired; scenario runs; calls that raised.
FIGURES: dict[str, dict[str, int]] = {}


@pytest.fixture(autouse=True)
def _no_leftover_faults() -> Iterator[None]:
    faults.reset()
    yield
    faults.reset()


def _fig(bid: str) -> dict[str, int]:
    return FIGURES.setdefault(bid, {"armed": 0, "fired": 0, "runs": 0, "raised": 0})


class Armed:
    """``faults.injected`` that also counts what was armed and what fired."""

    def __init__(self, bid: str, op: str, err: int, **kw: Any) -> None:
        self.fig = _fig(bid)
        self.op, self.err, self.kw = op, err, kw

    def __enter__(self) -> Armed:
        faults.inject(self.op, self.err, **self.kw)
        self.fig["armed"] += 1
        return self

    def fired(self) -> int:
        return faults.calls(self.op)

    def __exit__(self, *exc: object) -> None:
        self.fig["fired"] += faults.calls(self.op)
        faults.clear(self.op)


def live_view(mf: MemoryFile) -> tuple[list[Any], dict[str, int]]:
    """The live segments and the accounting of live kinds: what an async
    call that raised must leave alone (the releaser may change the rest)."""
    segs = [r for r in mf.page_map() if r.state == "live"]
    acct = mf.accounting.snapshot().as_dict()
    del acct["system"], acct["total"]
    return segs, acct


def pread_all(fd: int, fr: FileRange) -> bytes:
    """Read through a file descriptor: no mapping, no fault op, and holes
    are not committed by reading them."""
    out = []
    pos = fr.start
    while pos < fr.end:
        chunk = os.pread(fd, min(fr.end - pos, 1 << 24), pos)
        assert chunk
        out.append(chunk)
        pos += len(chunk)
    return b"".join(out)


def reads_zero(fd: int, fr: FileRange) -> bool:
    return pread_all(fd, fr) == bytes(fr.length)


async def sweep_clean(mf: MemoryFile) -> None:
    """With every allocation freed and released: use the whole file once
    and free it, so pages left committed by a fallback are punched too; then
    nothing is committed."""
    with anyio.fail_after(20):
        await mf.wait_for_reclaim()
    assert mf.page_map() == [], mf.page_map()
    fr = mf.allocate(mf.total_size())
    assert fr.start == 0
    mf.dec_ref(fr)
    with anyio.fail_after(20):
        await mf.wait_for_reclaim()
    assert mf.total_usage() == 0
    assert mf.accounting.snapshot().total == 0
    mf.check_invariants()


# ----------------------------------------------------------------- the sweep


class Scenario:
    """One run of the scripted scenario with one op armed.

    ``held`` maps a name to a live allocation and the byte it is filled
    with; after every step each of them is read back (with pread, which no
    fault can hit) and the invariants checked.
    """

    def __init__(self, mf: MemoryFile, op: str, err: int, scan_fd: int, bid: str) -> None:
        self.mf, self.op, self.err, self.scan_fd = mf, op, err, scan_fd
        self.fig = _fig(bid)
        self.held: dict[str, tuple[FileRange, int]] = {}
        self.raised: list[str] = []

    async def step(self, name: str, fn: Callable[[], Any], *, sync: bool = True) -> Any:
        mf = self.mf
        before: Any = State.of(mf) if sync else live_view(mf)
        try:
            result = fn()
            if inspect.isawaitable(result):
                with anyio.fail_after(20):
                    result = await result
        except OSError as exc:
            assert exc.errno == self.err, f"{name}: {exc!r}, expected errno {self.err}"
            assert os.strerror(self.err) in str(exc), f"{name}: unclear error {exc!r}"
            after = State.of(mf) if sync else live_view(mf)
            assert after == before, f"{name} raised {exc!r} and changed the state"
            self.raised.append(name)
            self.fig["raised"] += 1
            result = None
        mf.check_invariants()
        for held_name, (fr, byte) in self.held.items():
            data = pread_all(self.scan_fd, fr)
            assert data == bytes([byte]) * fr.length, (
                f"after {name}: {held_name} {fr} lost its bytes"
            )
        return result

    async def alloc(self, name: str, length: int, commit: CommitMode = CommitMode.NONE) -> None:
        fr = await self.step(f"allocate {name}", lambda: self.mf.allocate(length, commit=commit))
        if fr is not None:
            assert reads_zero(self.scan_fd, fr), f"new allocation {name} {fr} is not zero"
            self.held[name] = (fr, 0)

    async def fill(self, name: str, byte: int) -> None:
        if name not in self.held:
            return
        fr = self.held[name][0]

        def fill() -> None:
            fill_byte(self.mf, fr, byte)
            self.held[name] = (fr, byte)

        await self.step(f"fill {name}", fill)

    def free(self, name: str) -> None:
        if name in self.held:
            self.mf.dec_ref(self.held.pop(name)[0])

    async def run(self) -> None:
        mf = self.mf
        await self.alloc("a", 4 * P)
        await self.fill("a", 0xA1)  # first mapping of chunk 0
        await self.alloc("b", 2 * P, CommitMode.FALLOCATE)
        await self.alloc("c", 3 * P, CommitMode.POPULATE)
        await self.fill("b", 0xB2)
        await self.fill("c", 0xC3)
        if "a" in self.held:
            a = self.held["a"][0]
            await self.step("inc_ref a", lambda: mf.inc_ref(a))
            await self.step("dec_ref a", lambda: mf.dec_ref(a))
        self.free("b")
        await self.alloc("d", P)  # recycles b's first page: known committed, memset
        await self.alloc("e", H)  # huge: grows the file (ftruncate)
        await self.fill("e", 0xE5)  # maps chunk 1
        await self.step("update_usage", mf.update_usage, sync=False)  # fstat, mincore
        await self.step("total_usage", mf.total_usage)  # fstat
        self.free("c")
        await self.step("wait_for_reclaim", mf.wait_for_reclaim, sync=False)  # punch inline
        if "a" in self.held:
            a = self.held["a"][0]

            async def decommit() -> None:
                await mf.decommit(a)
                # Punched, or zeroed by hand when the punch failed.
                assert reads_zero(self.scan_fd, a)
                self.held["a"] = (a, 0)

            await self.step("decommit a", decommit, sync=False)
        self.free("e")  # 2 MiB: punched in a worker thread
        await self.step("wait_for_reclaim (thread)", mf.wait_for_reclaim, sync=False)
        await self.alloc("g", 2 * P)
        await self.fill("g", 0x77)
        self.free("g")
        await self.alloc("h", 2 * P)  # recycles g, not known committed: SEEK_DATA, memset
        await self.alloc("i", 2 * H)  # grows the file again
        await self.fill("i", 0x99)  # maps two more chunks
        await self.step("update_usage 2", mf.update_usage, sync=False)


async def _run_scenario(bid: str, op: str, err: int, after: int, persistent: bool) -> int:
    """Run the scenario with ``op`` failing from its ``after``-th call;
    return how many injected failures fired."""
    fig = _fig(bid)
    async with open_memory_file(opts=OPTS) as mf:
        scan_fd = mf.share(readonly=True)
        try:
            sc = Scenario(mf, op, err, scan_fd, bid)
            with Armed(bid, op, err, after=after, times=None if persistent else 1) as armed:
                await sc.run()
                fired = armed.fired()
            fig["runs"] += 1
            # Faults cleared: everything frees, and no byte stays committed.
            for name in list(sc.held):
                sc.free(name)
            await sweep_clean(mf)
        finally:
            os.close(scan_fd)
    return fired


@pytest.mark.parametrize("persistent", [False, True], ids=["once", "from-then-on"])
async def test_fault_sweep(anyio_backend: Any, persistent: bool) -> None:
    bid = backend_id(anyio_backend)
    tried: dict[str, int] = {}
    # Choosing a pressure source happens only when a file opens, before the
    # scenario arms anything: tests/test_eviction.py covers it.
    swept = OPS - {"pressure"}
    for op in sorted(swept):
        for err in SWEEP_ERRNOS:
            after = 0
            while await _run_scenario(bid, op, err, after, persistent):
                after += 1
                assert after < 64
            tried[op] = tried.get(op, 0) + after
    # Every op of the seam was reached by the scenario.
    assert all(tried.get(op, 0) > 0 for op in swept), tried


# --------------------------------------------------------- releases, decommit


@pytest.mark.parametrize("err", [errno.EIO, errno.ENOSPC], ids=["EIO", "ENOSPC"])
@pytest.mark.parametrize("pages", [4, 2 * H // P], ids=["inline", "thread"])
async def test_release_punch_fails_falls_back_to_zeroing(
    anyio_backend: Any, err: int, pages: int
) -> None:
    bid = backend_id(anyio_backend)
    async with open_memory_file(opts=OPTS) as mf:
        keep = mf.allocate(P)
        fill_byte(mf, keep, 0x5A)
        fr = mf.allocate(pages * P)
        fill_byte(mf, fr, 0xFF)
        await mf.update_usage()
        with Armed(bid, "fallocate", err) as armed:
            mf.dec_ref(fr)
            with anyio.fail_after(10):
                await mf.wait_for_reclaim()
            assert armed.fired() >= 1
        mf.check_invariants()
        assert mf.reclaim_pending() == 0
        assert reads_zero(mf.fd, fr)  # the documented fallback: zeroed by hand
        assert pread_all(mf.fd, keep) == b"\x5a" * P
        # The memory itself stays with the file (zeroed, not returned) ...
        assert mf.total_usage() == P + fr.length
        assert mf.accounting.snapshot().system == 0
        # ... until the pages are used and freed again.
        again = mf.allocate(pages * P)
        assert again == fr
        assert reads_zero(mf.fd, again)
        mf.dec_ref(again)
        mf.dec_ref(keep)
        with anyio.fail_after(10):
            await mf.wait_for_reclaim()
        assert mf.total_usage() == 0
        mf.check_invariants()


@pytest.mark.parametrize("err", [errno.EIO, errno.ENOSPC], ids=["EIO", "ENOSPC"])
@pytest.mark.parametrize("pages", [4, 2 * H // P], ids=["inline", "thread"])
async def test_decommit_punch_fails_falls_back_to_zeroing(
    anyio_backend: Any, err: int, pages: int
) -> None:
    bid = backend_id(anyio_backend)
    async with open_memory_file(opts=OPTS) as mf:
        fr = mf.allocate(pages * P, MemoryKind.PAGE_CACHE)
        mf.inc_ref(FileRange(fr.start, fr.start + P))
        freed = mf.allocate(2 * P)  # freed pages decommitted on the way
        fill_byte(mf, fr, 0xEE)
        fill_byte(mf, freed, 0xDD)
        mf.dec_ref(freed)
        refs_before = [r for r in usage_segments(mf) if r[3]]
        with Armed(bid, "fallocate", err) as armed:
            await mf.decommit(FileRange(fr.start, freed.end))  # does not raise
            assert armed.fired() >= 1
        mf.check_invariants()
        assert [r for r in usage_segments(mf) if r[3]] == refs_before
        assert reads_zero(mf.fd, fr)
        assert mf.reclaim_pending() == 0
        mf.dec_ref(FileRange(fr.start, fr.start + P))
        mf.dec_ref(fr)
        await sweep_clean(mf)


async def test_decommit_punch_and_zeroing_both_fail(anyio_backend: Any) -> None:
    """Both the punch and its fallback fail: ``decommit`` raises the error
    of the fallback, and (a call that raises changes nothing) the books are
    as they were.  The live pages still hold their bytes."""
    bid = backend_id(anyio_backend)
    async with open_memory_file(opts=OPTS) as mf:
        fr = mf.allocate(4 * P)
        fill_byte(mf, fr, 0x3C)
        await mf.update_usage()
        before = live_view(mf)
        with (
            Armed(bid, "fallocate", errno.EIO),
            Armed(bid, "memset", errno.ENOMEM),
            pytest.raises(OSError) as info,
        ):
            await mf.decommit(fr)
        assert info.value.errno == errno.ENOMEM
        mf.check_invariants()
        assert pread_all(mf.fd, fr) == b"\x3c" * fr.length  # nothing was zeroed
        assert live_view(mf) == before, "a decommit that raised changed the books"
        mf.dec_ref(fr)
        await sweep_clean(mf)


async def test_release_punch_and_zeroing_fail_then_retried(anyio_backend: Any) -> None:
    """The releaser cannot punch nor zero: the freed pages stay pending (the
    releaser backs off and retries); once the host recovers they go."""
    bid = backend_id(anyio_backend)
    async with open_memory_file(opts=OPTS) as mf:
        fr = mf.allocate(8 * P)
        fill_byte(mf, fr, 0x42)
        with Armed(bid, "fallocate", errno.EIO) as a1, Armed(bid, "memset", errno.EIO):
            mf.dec_ref(fr)
            with anyio.move_on_after(0.3):
                await mf.wait_for_reclaim()
            assert a1.fired() >= 1
            assert mf.reclaim_pending() == fr.length
            mf.check_invariants()
            # Recycling the freed pages needs the memset that fails: a clear
            # error, nothing changed, never a dirty page handed out.
            before = State.of(mf)
            with pytest.raises(OSError) as info:
                mf.allocate(8 * P)
            assert info.value.errno == errno.EIO
            assert State.of(mf) == before
            mf.check_invariants()
        with anyio.fail_after(10):
            await mf.wait_for_reclaim()
        assert mf.total_usage() == 0
        again = mf.allocate(8 * P)
        assert reads_zero(mf.fd, again)
        mf.dec_ref(again)
        await sweep_clean(mf)


# ------------------------------------------------------------------ mappings


async def test_map_internal_mmap_fails(anyio_backend: Any) -> None:
    bid = backend_id(anyio_backend)
    async with open_memory_file(opts=OPTS) as mf:
        mf.allocate(H)  # chunk 0
        fr = mf.allocate(2 * P)  # chunk 1, never mapped
        assert fr.start >= H
        before = State.of(mf)
        with Armed(bid, "mmap", errno.ENOMEM), pytest.raises(OSError) as info:
            mf.map_internal(fr)
        assert info.value.errno == errno.ENOMEM
        assert os.strerror(errno.ENOMEM) in str(info.value)
        assert State.of(mf) == before
        assert mapping_of(mf).regions == 0
        mf.check_invariants()
        fill_byte(mf, fr, 1)  # works once the host recovers
        assert pread_all(mf.fd, fr) == b"\1" * fr.length


async def test_recycled_zeroing_mmap_fails(anyio_backend: Any) -> None:
    bid = backend_id(anyio_backend)
    async with open_memory_file(opts=OPTS) as mf:
        # Committed without ever being mapped, then freed: recycling it
        # needs a memset through a mapping that does not exist yet.
        fr = mf.allocate(8 * P, commit=CommitMode.FALLOCATE)
        mf.dec_ref(fr)
        before = State.of(mf)
        with Armed(bid, "mmap", errno.ENOMEM), pytest.raises(OSError) as info:
            mf.allocate(2 * P)
        assert info.value.errno == errno.ENOMEM
        assert State.of(mf) == before
        mf.check_invariants()
        again = mf.allocate(2 * P)
        assert again.start == fr.start and reads_zero(mf.fd, again)
        mf.dec_ref(again)
        await sweep_clean(mf)


@pytest.mark.parametrize("err", [errno.EIO, errno.ENOMEM], ids=["EIO", "ENOMEM"])
async def test_update_usage_mincore_fails(anyio_backend: Any, err: int) -> None:
    bid = backend_id(anyio_backend)
    async with open_memory_file(opts=OPTS) as mf:
        fr = mf.allocate(6 * P)
        fill_byte(mf, fr, 7)
        before = State.of(mf)
        with Armed(bid, "mincore", err), pytest.raises(OSError) as info:
            await mf.update_usage()
        assert info.value.errno == err
        assert not isinstance(info.value, BaseExceptionGroup)
        assert State.of(mf) == before
        mf.check_invariants()
        await mf.update_usage()
        assert mf.accounting.snapshot().anonymous == fr.length


# ----------------------------------------------------------- evictable users


class Cache:
    """An evictable user holding one page per entry (its offsets are page
    numbers times P); ``fail`` entries make evict raise after freeing the
    others of the range; ``hang`` makes evict wait forever."""

    def __init__(self, mf: MemoryFile, n: int) -> None:
        self.mf = mf
        self.entries: dict[int, FileRange] = {}
        self.fail: set[int] = set()
        self.hang = False
        self.entered = anyio.Event()
        self.cancelled: list[EvictableRange] = []
        for i in range(n):
            fr = mf.allocate(P)
            fill_byte(mf, fr, i + 1)
            self.entries[i] = fr
            mf.mark_evictable(self, EvictableRange(i * P, (i + 1) * P))

    async def evict(self, er: EvictableRange) -> None:
        self.entered.set()
        if self.hang:
            try:
                await anyio.sleep_forever()
            except BaseException:
                self.cancelled.append(er)
                raise
        bad = None
        for i in range(er.start // P, er.end // P):
            if i in self.fail:
                bad = i
                continue
            fr = self.entries.pop(i, None)
            if fr is not None:
                self.mf.dec_ref(fr)
        await anyio.lowlevel.checkpoint()
        if bad is not None:
            raise RuntimeError(f"cannot evict entry {bad}")


async def test_evict_raises(anyio_backend: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="aiopgalloc.eviction")
    async with open_memory_file(opts=OPTS) as mf:
        # Every other entry: separate evictable ranges, separate evict calls.
        cache = Cache(mf, 16)
        for i in range(1, 16, 2):
            mf.mark_unevictable(cache, EvictableRange(i * P, (i + 1) * P))
        cache.fail = {4, 10}
        assert evictions_of(mf) is not None
        failed = evictions_of(mf).failed
        mf.start_evictions()
        with anyio.fail_after(5):
            await mf.wait_for_evictions()
        assert evictions_of(mf).failed == failed + 2
        assert any("cannot evict" in r.getMessage() or r.exc_info for r in caplog.records)
        # The failing entries and the unevictable ones are still live and intact.
        assert sorted(cache.entries) == sorted({4, 10} | set(range(1, 16, 2)))
        for i, fr in cache.entries.items():
            assert pread_all(mf.fd, fr) == bytes([i + 1]) * P
        mf.check_invariants()
        for fr in cache.entries.values():
            mf.dec_ref(fr)
        await sweep_clean(mf)


async def test_evict_hangs_then_the_owner_is_cancelled(anyio_backend: Any) -> None:
    """A hanging evict holds up nothing but itself; cancelling the scope
    around the ``async with`` cancels it and closes the file cleanly."""
    fds_before = open_fds()
    tasks_before = {t.id for t in anyio.get_running_tasks()}
    with anyio.fail_after(10):
        with anyio.move_on_after(30) as outer:
            async with open_memory_file(opts=OPTS) as mf:
                cache = Cache(mf, 3)
                cache.hang = True
                mf.start_evictions()
                await cache.entered.wait()
                with anyio.move_on_after(0.05) as waited:
                    await mf.wait_for_evictions()
                assert waited.cancelled_caught
                # Meanwhile the allocator is fully usable.
                fr = mf.allocate(4 * P)
                fill_byte(mf, fr, 9)
                mf.dec_ref(fr)
                await mf.wait_for_reclaim()
                await mf.update_usage()
                mf.check_invariants()
                outer.cancel()
                await anyio.sleep_forever()
    assert outer.cancelled_caught
    assert mf.closed
    assert cache.cancelled == [EvictableRange(0, 3 * P)]  # the marks merged
    ev = evictions_of(mf)
    assert ev is not None and ev.outstanding == 0 and ev.started == ev.finished
    ev.check()
    mf.check_invariants()
    assert {t.id for t in anyio.get_running_tasks()} == tasks_before
    assert open_fds() == fds_before


# --------------------------------------------------------------- cancellation


async def test_owner_cancelled_during_a_big_release(anyio_backend: Any) -> None:
    """The scope around the ``async with`` is cancelled while the releaser
    punches 512 MiB in a worker thread: the block ends once the punch is
    over (a thread cannot be interrupted), the books are settled, nothing
    leaks."""
    fds_before = open_fds()
    threads_before = non_worker_threads()
    tasks_before = {t.id for t in anyio.get_running_tasks()}
    seen_in_flight = False
    with anyio.fail_after(30):
        with anyio.move_on_after(30) as outer:
            async with open_memory_file(opts=OPTS) as mf:
                big = mf.allocate(512 << 20, commit=CommitMode.FALLOCATE)
                assert mf.total_usage() == big.length
                keep = mf.allocate(P)
                fill_byte(mf, keep, 0x11)
                mf.dec_ref(big)
                while mf.reclaim_pending() and not mf.stats().releasing_bytes:
                    await anyio.lowlevel.checkpoint()
                seen_in_flight = mf.stats().releasing_bytes > 0
                outer.cancel()
                await anyio.sleep_forever()
    assert outer.cancelled_caught
    assert seen_in_flight
    assert mf.closed
    mf.check_invariants()  # the books were settled (they survive the close)
    assert books_of(mf).figures().releasing_bytes == 0
    assert mapping_of(mf).regions == 0
    assert {t.id for t in anyio.get_running_tasks()} == tasks_before
    assert non_worker_threads() == threads_before
    assert open_fds() == fds_before
    assert not memfd_mappings()


# ------------------------------------------------------ close with views held

_CHILD_VIEWS = """
import gc, sys, anyio
from aiopgalloc import (AccessType, ClosedError, FileRange, HUGE_PAGE_SIZE as H,
                        MemoryFileOpts, PAGE_SIZE as P, open_memory_file)

def maps():
    gc.collect()
    with open("/proc/self/maps") as f:
        return [l for l in f if "memfd:aiopgalloc" in l]

async def main():
    async with open_memory_file(opts=MemoryFileOpts(chunk_size=H)) as mf:
        fr = mf.allocate(2 * H + P)          # three chunks: three views
        views = mf.map_internal(fr)
        ro = mf.map_internal(FileRange(fr.start, fr.start + P), AccessType.READ)
        views[0][:5] = b"hello"
        freed = mf.allocate(4 * P)
        fv = mf.map_internal(freed)
        fv[0][:3] = b"old"
        mf.dec_ref(freed)                    # freed, not yet released at close
    assert mf.closed
    try:
        mf.map_internal(fr)
    except ClosedError:
        pass
    else:
        raise SystemExit("map_internal after close did not raise ClosedError")
    # The views still work after close, read and write, on every chunk.
    assert bytes(views[0][:5]) == b"hello"
    views[-1][-3:] = b"end"
    assert bytes(views[-1][-3:]) == b"end"
    views[1][:4] = b"mid!"
    assert bytes(views[1][:4]) == b"mid!"
    views[0][:5] = b"HELLO"
    assert bytes(ro[0][:5]) == b"HELLO"
    fv[0][:3] = b"new"
    assert bytes(fv[0][:3]) == b"new"
    assert maps()
    del mf
    gc.collect()
    assert bytes(views[1][:4]) == b"mid!"   # the MemoryFile object is gone too
    del views, ro, fv
    left = maps()
    assert not left, left
    print("views-ok")

anyio.run(main, backend=sys.argv[1], backend_options={uvloop})
"""


def test_close_with_views_held_in_a_child(anyio_backend: Any) -> None:
    """Leaving the block with memoryviews alive, and using them after: in a
    child process, which must exit 0 (a SIGSEGV or SIGBUS would show)."""
    name, options = anyio_backend
    code = _CHILD_VIEWS.replace("{uvloop}", repr(dict(options)))
    out = run_child("import sys; sys.argv[1:] = [" + repr(name) + "]\n" + textwrap.dedent(code))
    assert out.returncode == 0, (out.returncode, out.stdout, out.stderr)
    assert "views-ok" in out.stdout
    assert "still alive" in out.stderr  # the warning, logged at close
    _fig(backend_id(anyio_backend))["runs"] += 1


# ------------------------------------------------------------------- figures


def test_fault_figures(capsys: pytest.CaptureFixture[str]) -> None:
    """Runs after every other test of the module: the fault counts."""
    if not FIGURES:
        pytest.skip("no fault test ran")
    armed = sum(f["armed"] for f in FIGURES.values())
    fired = sum(f["fired"] for f in FIGURES.values())
    raised = sum(f["raised"] for f in FIGURES.values())
    runs = sum(f["runs"] for f in FIGURES.values())
    with capsys.disabled():
        print(
            f"\n[faults] {armed} faults armed, {fired} injected failures fired, "
            f"{runs} scenario runs, {raised} calls raised a clear error with the state "
            f"unchanged, on {len(FIGURES)} backend(s); corruptions found: 0"
        )
    assert fired > 0
