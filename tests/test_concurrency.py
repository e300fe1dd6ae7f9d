"""Threads and tasks hammering one memory file at once.

Real memfd, real mappings, real punches; the releaser runs for real (on the
loop and in worker threads).  Every allocation is checked against a shared
set of live pages (no two live allocations ever overlap), every new
allocation must read as zero, and every page keeps the stamp its owner wrote
until the owner frees it.
"""

from __future__ import annotations

import os
import random
import sys
import threading
from dataclasses import dataclass, field

import anyio
import anyio.to_thread
import pytest
from helpers import FUZZ_LONG, fill_byte, is_zero, stamp_bytes

from aiopgalloc import (
    HUGE_PAGE_SIZE,
    PAGE_SIZE,
    AccessType,
    FileRange,
    MemoryFile,
    MemoryFileOpts,
    MemoryKind,
    open_memory_file,
)
from aiopgalloc.host.faults import faults

pytestmark = pytest.mark.anyio

P = PAGE_SIZE
H = HUGE_PAGE_SIZE
SMALL = MemoryFileOpts(chunk_size=H)


@pytest.fixture(autouse=True)
def _no_faults() -> None:
    faults.reset()


# ------------------------------------------------ invariants mid-release


def check(mf: MemoryFile) -> None:
    """``check_invariants()``; also valid while a release batch is in flight
    (see ``test_check_invariants_during_a_threaded_release``)."""
    mf.check_invariants()


async def test_check_invariants_during_a_threaded_release() -> None:
    async with open_memory_file(opts=SMALL) as mf:
        fr = mf.allocate(128 * H)  # 256 MiB: the punch takes milliseconds, in a thread
        fill_byte(mf, fr, 1)
        await mf.update_usage()
        assert mf.accounting.snapshot().anonymous == fr.length
        mf.check_invariants()
        mf.dec_ref(fr)
        mf.check_invariants()
        with anyio.fail_after(10):
            while mf.reclaim_pending():
                await anyio.sleep(0)
                mf.check_invariants()
        mf.check_invariants()


# --------------------------------------------------------- threads + tasks


@dataclass
class Shared:
    """Book-keeping shared by every worker, guarded by ``lock``."""

    mf: MemoryFile
    lock: threading.Lock = field(default_factory=threading.Lock)
    live: set[int] = field(default_factory=set)  # page numbers of live allocations
    next_stamp: int = 1
    allocations: int = 0
    overlaps: list[str] = field(default_factory=list)

    def claim(self, fr: FileRange) -> int:
        pages = range(fr.start // P, fr.end // P)
        with self.lock:
            clash = self.live.intersection(pages)
            if clash:
                self.overlaps.append(f"{fr} overlaps live pages {sorted(clash)[:4]}")
            assert not clash, f"{fr} overlaps live pages {sorted(clash)[:4]}"
            self.live.update(pages)
            self.allocations += 1
            stamp = self.next_stamp
            self.next_stamp += 1
        return stamp

    def unclaim(self, fr: FileRange) -> None:
        pages = range(fr.start // P, fr.end // P)
        with self.lock:
            assert self.live.issuperset(pages)
            self.live.difference_update(pages)


def _write(mf: MemoryFile, fr: FileRange, data: bytes) -> None:
    pos = 0
    for v in mf.map_internal(fr, AccessType.WRITE):
        v[:] = data[pos : pos + len(v)]
        pos += len(v)
        v.release()


def _intact(mf: MemoryFile, fr: FileRange, data: bytes) -> bool:
    pos = 0
    ok = True
    for v in mf.map_internal(fr, AccessType.READ):
        ok = ok and v == data[pos : pos + len(v)]
        pos += len(v)
        v.release()
    return ok


class Worker:
    """One worker's random operations (the same code in threads and tasks)."""

    def __init__(self, sh: Shared, seed: int, big: bool) -> None:
        self.sh = sh
        self.mf = sh.mf
        self.rng = random.Random(seed)
        self.held: list[tuple[FileRange, bytes]] = []
        self.big = big
        self.ops = 0

    def allocate(self) -> None:
        rng = self.rng
        n = rng.randint(1, 16)
        if self.big and rng.random() < 0.02:
            n = rng.randint(64, 160)  # a release batch too big to punch inline
        kind = MemoryKind.ANONYMOUS if rng.random() < 0.8 else MemoryKind.PAGE_CACHE
        fr = self.mf.allocate(n * P, kind)
        stamp = self.sh.claim(fr)
        assert is_zero(self.mf, fr), f"new allocation {fr} does not read as zero"
        data = stamp_bytes(stamp, fr.length)
        _write(self.mf, fr, data)
        self.held.append((fr, data))

    def free_one(self) -> None:
        rng, mf = self.rng, self.mf
        fr, data = self.held.pop(rng.randrange(len(self.held)))
        assert _intact(mf, fr, data), f"stamp of {fr} was overwritten"
        r = rng.random()
        if r < 0.2:
            mf.inc_ref(fr)
            mf.dec_ref(fr)
            assert _intact(mf, fr, data)
        elif r < 0.35 and fr.length > P:
            # Free the head only; keep the tail (any page-aligned sub-range).
            cut = fr.start + P * rng.randint(1, fr.length // P - 1)
            head, tail = FileRange(fr.start, cut), FileRange(cut, fr.end)
            self.sh.unclaim(head)
            mf.dec_ref(head)
            self.held.append((tail, data[cut - fr.start :]))
            return
        self.sh.unclaim(fr)
        mf.dec_ref(fr)

    def step(self) -> None:
        self.ops += 1
        if self.held and (self.rng.random() < 0.45 or len(self.held) >= 8):
            self.free_one()
        else:
            self.allocate()

    def finish(self) -> None:
        while self.held:
            self.free_one()


@pytest.mark.parametrize(
    "opts",
    [
        pytest.param(SMALL, id="inline-release"),
        pytest.param(
            MemoryFileOpts(
                chunk_size=H, release_inline_max_bytes=8 * P, release_inline_max_ranges=2
            ),
            id="threaded-release",
        ),
    ],
)
async def test_threads_and_tasks_together(opts: MemoryFileOpts) -> None:
    seed = int(os.environ.get("AIOPGALLOC_TEST_SEED", "0"))
    n_threads, n_tasks, n_ops = 4, 20, (4000 if FUZZ_LONG else 1000)
    async with open_memory_file(opts=opts) as mf:
        sh = Shared(mf)
        workers: list[Worker] = []

        def thread_worker(seed: int) -> None:
            w = Worker(sh, seed, big=True)
            workers.append(w)
            try:
                for i in range(n_ops):
                    w.step()
                    if i % 500 == 0:
                        check(mf)
            finally:
                w.finish()

        async def task_worker(seed: int) -> None:
            w = Worker(sh, seed, big=seed % 5 == 0)
            workers.append(w)
            try:
                for i in range(n_ops):
                    w.step()
                    r = w.rng.random()
                    if r < 0.1:
                        await anyio.sleep(0)  # lets the releaser run
                    elif r < 0.11 and w.held:
                        # Decommit a live range: it then reads zero; restamp it.
                        j = w.rng.randrange(len(w.held))
                        fr, data = w.held[j]
                        await mf.decommit(fr)
                        assert is_zero(mf, fr)
                        _write(mf, fr, data)
                    elif r < 0.115:
                        await mf.update_usage()
                    if i % 500 == 0:
                        check(mf)
            finally:
                w.finish()

        old_interval = sys.getswitchinterval()
        sys.setswitchinterval(1e-5)  # switch threads often: more interleavings
        try:
            with anyio.fail_after(120):
                async with anyio.create_task_group() as tg:
                    for t in range(n_threads):
                        tg.start_soon(anyio.to_thread.run_sync, thread_worker, seed + 1000 + t)
                    for t in range(n_tasks):
                        tg.start_soon(task_worker, seed + t)
        finally:
            sys.setswitchinterval(old_interval)

        assert not sh.overlaps
        assert sum(w.ops for w in workers) == (n_threads + n_tasks) * n_ops
        assert not sh.live
        check(mf)
        with anyio.fail_after(30):
            await mf.wait_for_reclaim()
        assert mf.reclaim_pending() == 0
        assert mf.total_usage() == 0
        assert mf.page_map() == []
        assert mf.accounting.snapshot().total == 0
        mf.check_invariants()


# --------------------------------------------------------- no-await loops


@pytest.mark.parametrize(
    "opts",
    [
        pytest.param(SMALL, id="both-recycle"),
        # 64 KiB is over recycle_max_bytes here: the "prefer clean pages" path.
        pytest.param(MemoryFileOpts(chunk_size=H, recycle_max_bytes=8 * P), id="large-path"),
    ],
)
async def test_tight_loop_without_await_stays_bounded(opts: MemoryFileOpts) -> None:
    sizes = (P, 64 * 1024)
    data = {n: bytes([0xA5]) * n for n in sizes}
    async with open_memory_file(opts=opts) as mf:

        def cycles(k: int) -> None:
            for _ in range(k):
                for n in sizes:
                    fr = mf.allocate(n)
                    _write(mf, fr, data[n])
                    mf.dec_ref(fr)

        cycles(2_000)
        size_a, usage_a = mf.total_size(), mf.total_usage()
        mf.check_invariants()
        cycles(18_000)
        size_b, usage_b = mf.total_size(), mf.total_usage()
        mf.check_invariants()
        assert size_b == size_a == H, (size_a, size_b)
        assert usage_b <= max(usage_a, 256 * 1024), (usage_a, usage_b)
        assert usage_b <= H  # never more than the one chunk the file has
        with anyio.fail_after(10):
            await mf.wait_for_reclaim()
        assert mf.total_usage() == 0
        mf.check_invariants()


async def test_tight_loop_in_a_thread_stays_bounded() -> None:
    """The same loop in a worker thread while the loop is free to release."""
    data = bytes([0x3C]) * (64 * 1024)
    async with open_memory_file(opts=SMALL) as mf:

        def cycles(k: int) -> int:
            peak = 0
            for i in range(k):
                fr = mf.allocate(len(data))
                _write(mf, fr, data)
                mf.dec_ref(fr)
                if i % 1000 == 0:
                    peak = max(peak, mf.total_usage())
            return peak

        peak = await anyio.to_thread.run_sync(cycles, 10_000)
        assert mf.total_size() == H
        assert peak <= 1 << 20
        with anyio.fail_after(10):
            await mf.wait_for_reclaim()
        assert mf.total_usage() == 0


@pytest.mark.parametrize("seed", [1, 2])
async def test_new_allocations_read_zero(seed: int) -> None:
    opts = MemoryFileOpts(chunk_size=H, recycle_max_bytes=16 * P)
    rng = random.Random(seed)
    big = 0
    async with open_memory_file(opts=opts) as mf:
        pool: list[FileRange] = []
        for i in range(2_000):
            r = rng.random()
            if r < 0.45:
                n = rng.randint(1, 16) * P  # may recycle
            elif r < 0.9:
                n = rng.randint(17, 96) * P  # over recycle_max_bytes
            elif r < 0.97:
                n = rng.choice([H, H + 3 * P])  # huge-page aligned
            else:
                n = 2 * H
            if n > opts.recycle_max_bytes:
                big += 1
            fr = mf.allocate(n)
            assert is_zero(mf, fr), f"cycle {i}: {fr} not zero\n{mf}"
            fill_byte(mf, fr, 0xFF)
            pool.append(fr)
            while len(pool) > 6 or (pool and rng.random() < 0.5):
                victim = pool.pop(rng.randrange(len(pool)))
                if victim.length > P and rng.random() < 0.2:
                    # Free a tail only; the head stays live (and dirty).
                    cut = victim.start + P * rng.randint(1, victim.length // P - 1)
                    mf.dec_ref(FileRange(cut, victim.end))
                    pool.append(FileRange(victim.start, cut))
                else:
                    mf.dec_ref(victim)
            r2 = rng.random()
            if r2 < 0.1:
                await mf.wait_for_reclaim()
            elif r2 < 0.3:
                await anyio.sleep(0)
            if i % 100 == 0:
                mf.check_invariants()
        assert big > 500
        assert mf.stats().recycled_bytes > 0  # recycling really happened
        for fr in pool:
            mf.dec_ref(fr)
        await mf.wait_for_reclaim()
        assert mf.total_usage() == 0
        mf.check_invariants()


# ------------------------------------------------------- waking from threads


async def test_dec_ref_in_a_thread_wakes_the_releaser() -> None:
    async with open_memory_file(opts=SMALL) as mf:
        small = mf.allocate(P)
        big = mf.allocate(2 * H)  # big enough to be punched in a worker thread
        fill_byte(mf, small, 1)
        fill_byte(mf, big, 2)
        await anyio.sleep(0.05)  # the releaser is idle, waiting on its eventfd
        assert mf.reclaim_pending() == 0

        # A plain thread, not anyio's: it has no way to reach the event loop.
        def free() -> None:
            mf.dec_ref(small)
            mf.dec_ref(big)

        t = threading.Thread(target=free)
        t.start()
        t.join()
        assert mf.reclaim_pending() == small.length + big.length
        # Only sleep here: nothing on the loop asks the releaser to run.
        with anyio.fail_after(5):
            while mf.reclaim_pending():
                await anyio.sleep(0.01)
        assert mf.total_usage() == 0
        with anyio.fail_after(5):
            await mf.wait_for_reclaim()
        assert mf.total_usage() == 0
        mf.check_invariants()


async def test_frees_from_many_threads_while_the_loop_sleeps() -> None:
    async with open_memory_file(opts=SMALL) as mf:
        frs = [mf.allocate(4 * P) for _ in range(64)]
        for fr in frs:
            fill_byte(mf, fr, 9)
        await anyio.sleep(0.02)
        chunks = [frs[i::4] for i in range(4)]
        threads = [
            threading.Thread(target=lambda c=c: [mf.dec_ref(fr) for fr in c]) for c in chunks
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        with anyio.fail_after(5):
            while mf.reclaim_pending():
                await anyio.sleep(0.01)
        assert mf.total_usage() == 0
        mf.check_invariants()
