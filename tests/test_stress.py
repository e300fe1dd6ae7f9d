"""Stress: 4 threads and 100 tasks hammering one memory file, on every backend.

Every allocation gets a unique 8-byte stamp (a global counter) written at
the start of each of its pages; a new allocation must read zero there, and
the stamp of every page is checked before each free, so two allocations that
overlapped, a page recycled while still live or a punch in the wrong place
would show.  A shared set of live pages catches overlaps directly.  Cache
users with evictable pages are evicted concurrently (``ENABLED``: whenever
the releaser runs out of work), while their entries are used and re-marked.

Afterwards: nothing committed once the releaser has caught up, an empty
usage set, and nothing leaked: fds (``/proc/self/fd``), threads (the loops'
idle worker threads aside), tasks, chunk mappings, and memfd mappings in
``/proc/self/maps``.

One CI run performs ``OPS_TOTAL`` allocator calls (allocate, inc_ref,
dec_ref, decommit, update_usage, mark_*) in total, a third on each backend;
``AIOPGALLOC_FUZZ=long`` performs a million on each backend.  The figures are
printed by the last test of the module.
"""

from __future__ import annotations

import array
import itertools
import os
import random
import sys
import threading
import time
from dataclasses import dataclass, field

import anyio
import anyio.lowlevel
import anyio.to_thread
import pytest
from helpers import FUZZ_LONG, backend_id, mapping_of, memfd_mappings, non_worker_threads, open_fds

from aiopgalloc import (
    PAGE_SIZE,
    AccessType,
    DelayedEviction,
    EvictableRange,
    FileRange,
    MemoryFile,
    MemoryFileOpts,
    MemoryKind,
    open_memory_file,
)
from aiopgalloc.host.faults import faults

pytestmark = pytest.mark.anyio

P = PAGE_SIZE
W = P // 8  # 8-byte words per page
N_THREADS = 4
N_TASKS = 100
N_CACHES = 4
OPS_TOTAL = 1_000_000 if FUZZ_LONG else 300_000
OPS_PER_BACKEND = OPS_TOTAL if FUZZ_LONG else -(-OPS_TOTAL // 3)
MAX_HELD = 8  # allocations a worker holds at most

OPTS = MemoryFileOpts(
    chunk_size=8 << 20,
    delayed_eviction=DelayedEviction.ENABLED,
    recycle_max_bytes=8 * P,  # half the sizes below recycle, half prefer clean pages
)

# Figures per backend id, printed by the last test.
FIGURES: dict[str, dict[str, float]] = {}

_STAMPS = itertools.count(1)  # next() is atomic under the GIL: unique stamps
_ZERO_WORDS = {n: bytes(8 * n) for n in range(1, 17)}


@pytest.fixture(autouse=True)
def _no_faults() -> None:
    faults.reset()


def stamp_words(stamp: int, npages: int) -> array.array[int]:
    return array.array("Q", [stamp]) * npages


class Books:
    """The live pages of every allocation (guarded by one lock): a new
    allocation must not touch any of them."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.live: set[int] = set()
        self.problems: list[str] = []

    def claim(self, fr: FileRange) -> None:
        pages = range(fr.start // P, fr.end // P)
        with self.lock:
            clash = self.live.intersection(pages)
            if clash:
                self.problems.append(f"{fr} overlaps live pages {sorted(clash)[:4]}")
            self.live.update(pages)
        assert not clash, f"{fr} overlaps live pages"

    def unclaim(self, fr: FileRange) -> None:
        pages = range(fr.start // P, fr.end // P)
        with self.lock:
            missing = not self.live.issuperset(pages)
            if missing:
                self.problems.append(f"{fr} freed but not live in the books")
            self.live.difference_update(pages)
        assert not missing


def write_stamp(mf: MemoryFile, fr: FileRange, stamp: int, *, fresh: bool) -> None:
    """Put ``stamp`` in the first 8 bytes of every page of ``fr`` (after
    checking they read zero when ``fresh``)."""
    for v in mf.map_internal(fr, AccessType.READ_WRITE):
        n = len(v) // P
        words = v.cast("Q")[::W]
        if fresh:
            assert words.tobytes() == _ZERO_WORDS.get(n, bytes(8 * n)), (
                f"new allocation {fr} does not read zero"
            )
        words[:] = stamp_words(stamp, n)
        words.release()
        v.release()


def stamp_intact(mf: MemoryFile, fr: FileRange, stamp: int) -> bool:
    ok = True
    for v in mf.map_internal(fr, AccessType.READ):
        n = len(v) // P
        words = v.cast("Q")[::W]
        ok = ok and words.tobytes() == stamp_words(stamp, n).tobytes()
        words.release()
        v.release()
    return ok


class Cache:
    """An evictable user: entry i is one page at offsets [i*P, (i+1)*P) of
    its own space.  Entries in use are skipped by ``evict`` (an eviction in
    flight may still arrive after ``mark_unevictable``)."""

    SLOTS = 64

    def __init__(self, mf: MemoryFile, books: Books) -> None:
        self.mf = mf
        self.books = books
        self.lock = threading.Lock()
        self.entries: dict[int, tuple[FileRange, int]] = {}
        self.in_use: set[int] = set()
        self.evicted = 0
        self.errors: list[str] = []

    async def evict(self, er: EvictableRange) -> None:
        for i in range(er.start // P, er.end // P):
            with self.lock:
                if i in self.in_use:
                    continue
                entry = self.entries.pop(i, None)
            if entry is None:
                continue
            fr, stamp = entry
            if not stamp_intact(self.mf, fr, stamp):
                self.errors.append(f"cache entry {fr} lost its stamp")
            self.books.unclaim(fr)
            self.mf.dec_ref(fr)
            self.evicted += 1


@dataclass
class Worker:
    mf: MemoryFile
    books: Books
    caches: list[Cache]
    seed: int
    quota: int
    rng: random.Random = field(init=False)
    held: list[tuple[FileRange, int]] = field(default_factory=list)
    ops: int = 0
    allocations: int = 0

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    @property
    def done(self) -> bool:
        return self.ops >= self.quota

    def allocate(self) -> None:
        rng, mf = self.rng, self.mf
        n = rng.randint(1, 16)
        kind = MemoryKind.ANONYMOUS if rng.random() < 0.8 else MemoryKind.PAGE_CACHE
        fr = mf.allocate(n * P, kind)
        self.ops += 1
        self.allocations += 1
        self.books.claim(fr)
        stamp = next(_STAMPS)
        write_stamp(mf, fr, stamp, fresh=True)
        self.held.append((fr, stamp))

    def free_one(self) -> None:
        rng, mf = self.rng, self.mf
        fr, stamp = self.held.pop(rng.randrange(len(self.held)))
        assert stamp_intact(mf, fr, stamp), f"stamp {stamp} of {fr} was overwritten"
        r = rng.random()
        if r < 0.15:
            # Share it for a moment: the extra reference keeps it live.
            mf.inc_ref(fr)
            mf.dec_ref(fr)
            self.ops += 2
        elif r < 0.3 and fr.length > P:
            # Free a page-aligned head; keep the tail.
            cut = fr.start + P * rng.randint(1, fr.length // P - 1)
            head = FileRange(fr.start, cut)
            self.books.unclaim(head)
            mf.dec_ref(head)
            self.ops += 1
            self.held.append((FileRange(cut, fr.end), stamp))
            return
        self.books.unclaim(fr)
        mf.dec_ref(fr)
        self.ops += 1

    def cache_op(self) -> None:
        """Put, use or re-mark an entry of a cache (evictions race with it)."""
        rng, mf = self.rng, self.mf
        cache = self.caches[rng.randrange(len(self.caches))]
        i = rng.randrange(Cache.SLOTS)
        er = EvictableRange(i * P, (i + 1) * P)
        with cache.lock:
            if i in cache.in_use:
                return
            cache.in_use.add(i)
            entry = cache.entries.get(i)
        try:
            if entry is None:
                fr = mf.allocate(P, MemoryKind.PAGE_CACHE)
                self.books.claim(fr)
                stamp = next(_STAMPS)
                write_stamp(mf, fr, stamp, fresh=True)
                with cache.lock:
                    cache.entries[i] = (fr, stamp)
                self.ops += 1
            else:
                mf.mark_unevictable(cache, er)  # in use: no longer evictable
                fr, stamp = entry
                assert stamp_intact(mf, fr, stamp), f"cache entry {fr} lost its stamp"
                self.ops += 1
        finally:
            with cache.lock:
                cache.in_use.discard(i)
        mf.mark_evictable(cache, er)
        self.ops += 1

    def step(self) -> None:
        r = self.rng.random()
        if r < 0.08:
            self.cache_op()
        elif self.held and (r < 0.5 or len(self.held) >= MAX_HELD):
            self.free_one()
        else:
            self.allocate()

    def finish(self) -> None:
        while self.held:
            fr, stamp = self.held.pop()
            assert stamp_intact(self.mf, fr, stamp), f"stamp {stamp} of {fr} was overwritten"
            self.books.unclaim(fr)
            self.mf.dec_ref(fr)
            self.ops += 1


async def _stress(bid: str) -> dict[str, float]:
    per_worker = -(-OPS_PER_BACKEND // (N_THREADS + N_TASKS))
    seed = int(os.environ.get("AIOPGALLOC_TEST_SEED", "0"))
    workers: list[Worker] = []
    async with open_memory_file(opts=OPTS) as mf:
        books = Books()
        caches = [Cache(mf, books) for _ in range(N_CACHES)]

        def thread_worker(w: Worker) -> None:
            try:
                while not w.done:
                    w.step()
            finally:
                w.finish()

        async def task_worker(w: Worker) -> None:
            try:
                while not w.done:
                    w.step()
                    r = w.rng.random()
                    if r < 0.25:
                        await anyio.lowlevel.checkpoint()  # interleave the tasks
                    elif r < 0.252 and w.held:
                        # Decommit a live allocation: it reads zero, restamp it.
                        j = w.rng.randrange(len(w.held))
                        fr, _ = w.held[j]
                        await mf.decommit(fr)
                        stamp = next(_STAMPS)
                        write_stamp(mf, fr, stamp, fresh=True)
                        w.held[j] = (fr, stamp)
                        w.ops += 1
                    elif r < 0.253:
                        await mf.update_usage()
                        w.ops += 1
                    elif r < 0.254:
                        mf.start_evictions()
                        w.ops += 1
                    elif r < 0.2545:
                        await mf.wait_for_reclaim()
            finally:
                w.finish()

        old_interval = sys.getswitchinterval()
        sys.setswitchinterval(1e-4)  # switch threads often: more interleavings
        t0 = time.perf_counter()
        try:
            with anyio.fail_after(600):
                limiter = anyio.CapacityLimiter(N_THREADS)
                async with anyio.create_task_group() as tg:
                    for t in range(N_THREADS):
                        w = Worker(mf, books, caches, seed + 1000 + t, per_worker)
                        workers.append(w)
                        tg.start_soon(
                            lambda w=w: anyio.to_thread.run_sync(thread_worker, w, limiter=limiter)
                        )
                    for t in range(N_TASKS):
                        w = Worker(mf, books, caches, seed + t, per_worker)
                        workers.append(w)
                        tg.start_soon(task_worker, w)
        finally:
            sys.setswitchinterval(old_interval)
        seconds = time.perf_counter() - t0

        # Drop what the caches still hold.
        for cache in caches:
            mf.mark_all_unevictable(cache)
        with anyio.fail_after(30):
            with anyio.fail_after(30):
                await mf.wait_for_evictions()
        for cache in caches:
            assert not cache.errors, cache.errors[:3]
            for fr, stamp in cache.entries.values():
                assert stamp_intact(mf, fr, stamp)
                books.unclaim(fr)
                mf.dec_ref(fr)
            cache.entries.clear()
        assert not books.problems, books.problems[:5]
        assert not books.live, f"{len(books.live)} pages still live in the books"
        mf.check_invariants()
        with anyio.fail_after(60):
            await mf.wait_for_reclaim()
        assert mf.reclaim_pending() == 0
        committed = mf.total_usage()
        assert committed == 0, f"{committed} bytes still committed after everything was freed"
        assert mf.page_map() == []
        assert mf.accounting.snapshot().total == 0
        mf.check_invariants()
        evicted = sum(c.evicted for c in caches)
        recycled, released = mf.stats().recycled_bytes, mf.stats().bytes_released
    assert mapping_of(mf).regions == 0
    ops = sum(w.ops for w in workers)
    assert ops >= OPS_PER_BACKEND
    return {
        "ops": ops,
        "seconds": seconds,
        "allocations": sum(w.allocations for w in workers),
        "evicted": evicted,
        "recycled": recycled,
        "released": released,
    }


async def test_threads_and_tasks_stress(
    anyio_backend: object, capsys: pytest.CaptureFixture[str]
) -> None:
    bid = backend_id(anyio_backend)  # type: ignore[arg-type]
    fds_before = open_fds()
    threads_before = non_worker_threads()
    tasks_before = {t.id for t in anyio.get_running_tasks()}
    maps_before = memfd_mappings()

    fig = await _stress(bid)

    leaks = []
    fds_after = open_fds()
    if fds_after != fds_before:
        leaks.append(f"fds {sorted(fds_after ^ fds_before)}")
    threads_after = non_worker_threads()
    if threads_after != threads_before:
        leaks.append(f"threads {threads_after ^ threads_before}")
    tasks_after = {t.id for t in anyio.get_running_tasks()}
    if tasks_after != tasks_before:
        leaks.append(f"tasks {tasks_after ^ tasks_before}")
    maps_after = memfd_mappings()
    if maps_after != maps_before or maps_after:
        leaks.append(f"memfd mappings {maps_after}")
    fig["leaks"] = len(leaks)
    FIGURES[bid] = fig
    with capsys.disabled():
        print(
            f"\n[stress, {bid}] {N_THREADS} threads + {N_TASKS} tasks: {fig['ops']:.0f} ops "
            f"({fig['allocations']:.0f} allocations, {fig['evicted']:.0f} cache entries "
            f"evicted, {fig['recycled'] / 2**20:.0f} MiB recycled, "
            f"{fig['released'] / 2**20:.0f} MiB released) in {fig['seconds']:.1f} s, "
            f"{fig['ops'] / fig['seconds']:.0f} ops/s, leaks found: {len(leaks)}"
        )
    assert not leaks, leaks


def test_stress_figures(capsys: pytest.CaptureFixture[str]) -> None:
    """Runs after the stress test on every backend: the totals, and the
    figures of the whole reliability suite gathered from the modules that
    ran before this one (model, faults, security, bad input)."""
    if not FIGURES:
        pytest.skip("the stress test did not run")
    ops = sum(f["ops"] for f in FIGURES.values())
    seconds = sum(f["seconds"] for f in FIGURES.values())
    leaks = sum(f["leaks"] for f in FIGURES.values())
    if len(FIGURES) == 3:
        assert ops >= (3 * OPS_PER_BACKEND if FUZZ_LONG else OPS_TOTAL)
    lines = [
        f"[stress] {ops:.0f} operations on {len(FIGURES)} backend(s) in {seconds:.1f} s "
        f"({ops / seconds:.0f} ops/s), leaks found: {leaks:.0f}; "
        f"profile {'long' if FUZZ_LONG else 'ci'}"
    ]
    lines += reliability_summary()
    with capsys.disabled():
        print("\n" + "\n".join(lines))
    assert leaks == 0


def reliability_summary() -> list[str]:
    """One line per figure of the reliability suite, from the test modules
    pytest has loaded in this run (a module that did not run is left out)."""
    out = ["reliability figures of this run:"]
    model = sys.modules.get("test_model_memory_file")
    if model is not None and model.STEPS:
        out.append(
            f"  model-based steps: {sum(model.STEPS.values())} "
            f"({sum(model.EXAMPLES.values())} examples, {len(model.STEPS)} backend(s))"
        )
    out.append(
        f"  stress operations: {sum(f['ops'] for f in FIGURES.values()):.0f} "
        f"({N_THREADS} threads + {N_TASKS} tasks)"
    )
    faults_mod = sys.modules.get("test_faults")
    if faults_mod is not None and faults_mod.FIGURES:
        figs = faults_mod.FIGURES.values()
        out.append(
            f"  faults armed: {sum(f['armed'] for f in figs)}, fired: "
            f"{sum(f['fired'] for f in figs)}, clear errors with the state unchanged: "
            f"{sum(f['raised'] for f in figs)}"
        )
    bad = sys.modules.get("test_bad_input")
    if bad is not None:
        calls = sum(model.BAD_CALLS.values()) if model is not None else 0
        out.append(
            f"  bad inputs: {len(bad.CASES)} catalogue cases ({len(bad.RAN)} run), "
            f"{calls} bad reference calls in the model"
        )
    sec = sys.modules.get("test_security")
    if sec is not None and sec.FIGURES:
        figs = sec.FIGURES.values()
        out.append(
            f"  no-leak cycles: {sum(f['cycles'] for f in figs)} "
            f"({sum(f['recycled'] for f in figs)} recycled, "
            f"{sum(f['released'] for f in figs)} released); old contents seen: 0"
        )
    out.append(f"  leaks found: {sum(f['leaks'] for f in FIGURES.values()):.0f}")
    return out
