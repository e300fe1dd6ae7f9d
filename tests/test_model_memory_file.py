"""A model-based (stateful) test of ``MemoryFile`` on every backend.

Hypothesis drives a real memory file (a real memfd, real mappings, the real
releaser) and a plain reference model side by side.  The model keeps, per
page of the file: the reference count (0: not live) and the kind; a 1-byte
stamp (the expected first byte of every live page; each write through
``map_internal`` puts one byte per page); whether the page may be committed
(written, or committed by ``allocate``, since its last decommit or
release); whether the model's evictable user holds a reference on it and
whether it is marked evictable.

The file runs in a background event loop (``anyio.from_thread``'s blocking
portal, one per backend): the machine calls the synchronous methods directly
from the test thread (they are thread-safe) and the async ones through the
portal.  Either the loop runs freely, and the releaser punches freed pages
concurrently, from its own thread, within microseconds; or the machine keeps
the loop's thread blocked between async calls (chosen per example, and
toggled by a rule), and freed pages stay freed until the next await, so
allocations recycle them, as in a loop with no ``await``.

After every step: ``check_invariants()``; the usage set equals the model
(refs and kind of every live page, through ``mf.page_map()``); the first byte of
every live page equals its stamp (pages the kernel reports as holes must be
expected zero; the others are read through ``map_internal``); the user's
evictable set equals the model's; the file's real size equals
``total_size()``.  ``update_usage`` may only count live pages that may be
committed (not merely live-and-written: recycling zeroes pages by hand, which
commits them, and ``allocate`` can commit up front), and must count every
page written since its last decommit once the releaser has caught up.  At
the end of every example everything is freed, and once the releaser has
caught up no byte is committed and the usage set is empty.

What the model cannot know it does not predict: where an allocation lands
(first fit over a usage set whose releasing ranges come and go with the
releaser's timing) is only checked to be free in the model, aligned and
inside the file, and to read zero.

One CI run executes at least ``MIN_STEPS_TOTAL`` rule steps across the three
backends (a third on each; measured, asserted and printed by the last test
of this module).  ``AIOPGALLOC_FUZZ=long`` runs ten times as many.
"""

from __future__ import annotations

import operator
import os
import threading
import time
from concurrent.futures import Future
from typing import Any, ClassVar

import anyio
import pytest
from anyio.from_thread import BlockingPortal
from helpers import (
    FUZZ_LONG,
    backend_id,
    blocking_portal,
    data_runs,
    evictions_of,
    mapping_of,
    page_stamps,
    write_page_stamps,
)
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
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
    RefCountError,
    open_memory_file,
)
from aiopgalloc.options import CommitMode

P = PAGE_SIZE
H = HUGE_PAGE_SIZE
HP = H // P  # pages per huge page

MIN_STEPS_TOTAL = 300_000 if FUZZ_LONG else 30_000
MIN_STEPS_PER_BACKEND = -(-MIN_STEPS_TOTAL // 3)
STEP_COUNT = 50
LIVE_LIMIT = 2048  # pages: allocations wait while the model holds more

SETTINGS = settings(
    stateful_step_count=STEP_COUNT,
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# Figures, per backend id; read by the last test of the module.
STEPS: dict[str, int] = {}
EXAMPLES: dict[str, int] = {}
SECONDS: dict[str, float] = {}
BAD_CALLS: dict[str, int] = {}

KINDS = list(MemoryKind)
COMMITS = [CommitMode.NONE] * 4 + [CommitMode.FALLOCATE, CommitMode.POPULATE]
IDX = st.integers(0, 1 << 16)
LEN = st.integers(0, 24)  # 0: the whole run


def runs_of(flags: bytearray) -> list[tuple[int, int]]:
    """The maximal runs of pages whose flag is 1, as page numbers [a, b)."""
    out = []
    pos = 0
    find = flags.find
    while True:
        i = find(1, pos)
        if i < 0:
            return out
        j = find(0, i)
        if j < 0:
            j = len(flags)
        out.append((i, j))
        pos = j


def pages_fr(a: int, b: int) -> FileRange:
    return FileRange(a * P, b * P)


class ModelUser:
    """The model's evictable user: it holds one reference on each page it
    marked evictable (its offsets are the file's), and its ``evict`` drops
    that reference.  Runs on the loop's thread: failures are recorded (the
    file would only log them)."""

    def __init__(self) -> None:
        self.mf: MemoryFile | None = None
        self.calls: list[EvictableRange] = []
        self.errors: list[BaseException] = []

    async def evict(self, er: EvictableRange) -> None:
        self.calls.append(er)
        try:
            assert self.mf is not None
            self.mf.dec_ref(FileRange(er.start, er.end))
        except BaseException as exc:
            self.errors.append(exc)
            raise


class MemoryFileMachine(RuleBasedStateMachine):
    portal: ClassVar[BlockingPortal]
    backend: ClassVar[str]

    def __init__(self) -> None:
        super().__init__()
        self.mf: MemoryFile | None = None
        self.cm: Any = None
        self.scan_fd = -1
        self.ok = False
        self.npages = 0
        self.refs: list[int] = []
        self.kinds = bytearray()
        self.stamps = bytearray()
        self.held = bytearray()  # the user holds one reference
        self.evictable = bytearray()
        # Derived per page, kept in step by _update():
        self.live = bytearray()  # refs > 0
        self.droppable = bytearray()  # refs > held: the test's own references
        self.takeable = bytearray()  # live, not held
        self.unmarked = bytearray()  # held, not evictable
        self.ever = bytearray()  # allocated at least once
        # Pages that may be committed: written or committed by allocate since
        # their last decommit or release (a freed page keeps its flag, since
        # it may be recycled, still committed, until a wait_for_reclaim).
        self.maybe = bytearray()
        self.pending = bytearray()  # freed since the last wait_for_reclaim
        self.live_pages = 0
        self.user = ModelUser()
        self._pause: tuple[threading.Event, Future[None]] | None = None
        # Keep the loop blocked between async calls: the releaser then only
        # runs inside them (the "no await" regime: freed pages are recycled).
        self.stay_paused = False
        self._grow(4 * HP)

    # ------------------------------------------------------------ helpers

    def _grow(self, npages: int) -> None:
        if npages <= self.npages:
            return
        n = max(npages, 2 * self.npages) - self.npages
        self.refs += [0] * n
        for arr in (
            self.kinds,
            self.stamps,
            self.held,
            self.evictable,
            self.live,
            self.droppable,
            self.takeable,
            self.unmarked,
            self.ever,
            self.pending,
            self.maybe,
        ):
            arr += bytes(n)
        self.npages += n

    def _update(self, p: int) -> None:
        refs = self.refs[p]
        held = self.held[p]
        live = refs > 0
        if self.live[p] and not live:
            self.live_pages -= 1
            self.pending[p] = 1
            self.stamps[p] = 0  # unknown from now on; a new allocation zeroes it
            assert not held
        elif live and not self.live[p]:
            self.live_pages += 1
        self.live[p] = live
        self.droppable[p] = refs > held
        self.takeable[p] = live and not held
        self.unmarked[p] = held and not self.evictable[p]

    def _add_refs(self, a: int, b: int, delta: int) -> None:
        refs = self.refs
        for p in range(a, b):
            refs[p] += delta
            assert refs[p] >= 0
            self._update(p)

    def _choose(self, flags: bytearray, pick: int, off: int, ln: int) -> tuple[int, int] | None:
        """A page range inside one run of ``flags``: the whole run when
        ``ln`` is 0, else up to ``ln`` pages from an offset into it."""
        runs = runs_of(flags)
        if not runs:
            return None
        s, e = runs[pick % len(runs)]
        if ln == 0:
            return s, e
        a = s + off % (e - s)
        return a, min(e, a + ln)

    def acall(self, fn: Any, *args: Any) -> Any:
        """Run an async call of the file on its loop, with a time limit
        (resuming the loop first if it is paused)."""
        self._resume()

        async def call() -> Any:
            with anyio.fail_after(20):
                return await fn(*args)

        try:
            return self.portal.call(call)
        finally:
            if self.stay_paused:
                self._block_loop()

    def _resume(self) -> None:
        if self._pause is not None:
            gate, done = self._pause
            self._pause = None
            gate.set()
            done.result(timeout=30)

    def _count(self) -> None:
        STEPS[self.backend] = STEPS.get(self.backend, 0) + 1
        self.ok = False

    def _check_zero(self, a: int, b: int) -> None:
        """Pages [a, b) read zero (their first bytes; holes are zero)."""
        mf = self.mf
        assert mf is not None
        for ds, de in data_runs(self.scan_fd, a * P, b * P):
            got = page_stamps(mf, ds, de)
            assert got == bytes(len(got)), (
                f"pages {FileRange(ds, de)} of a fresh or decommitted range are not zero"
            )

    def _reclaim(self) -> None:
        mf = self.mf
        assert mf is not None
        self.acall(mf.wait_for_reclaim)
        assert mf.reclaim_pending() == 0
        self.pending[:] = bytes(self.npages)
        self.maybe = bytearray(map(operator.and_, self.maybe, self.live))
        usage = mf.total_usage()
        written = self.npages - self.stamps.count(0)
        maybe = self.npages - self.maybe.count(0)
        # Every committed page is live and was written or committed since its
        # last decommit; every page written since then is committed.
        assert written * P <= usage <= maybe * P, (written, usage, maybe)

    # -------------------------------------------------------------- rules

    @initialize(
        recycle=st.sampled_from([0, 8 * P, 2 << 20]),
        inline=st.booleans(),
        paused=st.booleans(),
    )
    def open_file(self, recycle: int, inline: bool, paused: bool) -> None:
        opts = MemoryFileOpts(
            chunk_size=H,
            delayed_eviction=DelayedEviction.MANUAL,
            recycle_max_bytes=recycle,
            release_inline_max_bytes=256 * 1024 if inline else 4 * P,
            release_inline_max_ranges=16 if inline else 1,
        )
        self.cm = self.portal.wrap_async_context_manager(open_memory_file(opts=opts))
        self.mf = self.cm.__enter__()
        self.user.mf = self.mf
        self.scan_fd = self.mf.share(readonly=True)
        if paused:
            self.stay_paused = True
            self._block_loop()
        EXAMPLES[self.backend] = EXAMPLES.get(self.backend, 0) + 1

    @rule(pause=st.booleans())
    def pause_loop(self, pause: bool) -> None:
        """Block (or unblock) the event loop's thread: while it is blocked the
        releaser cannot run, so freed pages stay freed and the next
        allocations recycle them (as in a loop with no await); otherwise the
        releaser, in its own thread, punches them within microseconds."""
        self._count()
        self.stay_paused = pause
        if pause:
            self._block_loop()
        else:
            self._resume()

    def _block_loop(self) -> None:
        if self._pause is not None:
            return
        gate, blocking = threading.Event(), threading.Event()

        async def block() -> None:
            blocking.set()
            gate.wait(60)  # blocks the whole loop on purpose

        done = self.portal.start_task_soon(block)
        self._pause = (gate, done)
        assert blocking.wait(30)

    @precondition(lambda self: self.live_pages < LIVE_LIMIT)
    @rule(
        n=st.integers(1, 17),
        huge=st.sampled_from([HP, HP + 3, 2 * HP]),
        kind=st.sampled_from(KINDS),
        commit=st.sampled_from(COMMITS),
    )
    def allocate(self, n: int, huge: int, kind: MemoryKind, commit: CommitMode) -> None:
        self._count()
        mf = self.mf
        assert mf is not None
        if n == 17:
            n = huge  # >= HUGE_PAGE_SIZE: huge-page aligned, grows the 2 MiB-chunk file
        fr = mf.allocate(n * P, kind, commit=commit)
        a, b = fr.start // P, fr.end // P
        assert fr.length == n * P
        assert fr.start % (H if fr.length >= H else P) == 0, fr
        assert fr.end <= mf.total_size()
        self._grow(b)
        assert self.live.find(1, a, b) < 0, f"{fr} overlaps live pages"
        self._check_zero(a, b)
        self.kinds[a:b] = bytes([kind]) * n
        self.ever[a:b] = b"\1" * n
        self.pending[a:b] = bytes(n)
        if commit is not CommitMode.NONE:
            self.maybe[a:b] = b"\1" * n
        else:
            # Recycled pages are zeroed from the first one holding data (one
            # SEEK_DATA) to the end of their freed range, holes included.
            first = self.maybe.find(1, a, b)
            if first >= 0:
                self.maybe[first:b] = b"\1" * (b - first)
        self._add_refs(a, b, 1)

    @precondition(lambda self: self.live_pages < LIVE_LIMIT)
    @rule(kind=st.sampled_from(KINDS), ln=LEN)
    def allocate_into_gap(self, kind: MemoryKind, ln: int) -> None:
        """Allocate exactly the lowest gap between live pages (first fit puts
        it there): freed pages not yet released are recycled."""
        a = self.live.find(0)
        b = self.live.find(1, a)
        if b < 0:
            b = a + max(ln, 1)  # no gap below the highest live page
        self.allocate(min(b - a, 16), HP, kind, CommitMode.NONE)
        STEPS[self.backend] -= 1  # counted by allocate

    @rule(pick=IDX, off=IDX, ln=LEN, stamp=st.integers(1, 255), kind=st.sampled_from(KINDS))
    def churn(self, pick: int, off: int, ln: int, stamp: int, kind: MemoryKind) -> None:
        """Write pages, drop a reference on them (freeing those left with
        none) and at once allocate the lowest gap: with the loop blocked the
        freed, dirty pages are recycled and must read zero."""
        self._count()
        r = self._choose(self.droppable, pick, off, ln)
        if r is None:
            return
        a, b = r
        mf = self.mf
        assert mf is not None
        self._write_stamps(a, b, stamp)
        mf.dec_ref(pages_fr(a, b))
        self._add_refs(a, b, -1)
        if self.live_pages < LIVE_LIMIT:
            self.allocate_into_gap(kind, ln)
            STEPS[self.backend] -= 1  # one step, counted above

    @rule(pick=IDX, off=IDX, ln=LEN, stamp=st.integers(1, 255))
    def write(self, pick: int, off: int, ln: int, stamp: int) -> None:
        self._count()
        r = self._choose(self.live, pick, off, ln)
        if r is not None:
            self._write_stamps(*r, stamp)

    def _write_stamps(self, a: int, b: int, stamp: int) -> None:
        stamps = bytes((stamp + i) % 255 + 1 for i in range(b - a))
        assert self.mf is not None
        write_page_stamps(self.mf, pages_fr(a, b), stamps)
        self.stamps[a:b] = stamps
        self.maybe[a:b] = b"\1" * (b - a)

    @rule(pick=IDX, off=IDX, ln=LEN)
    def inc_ref(self, pick: int, off: int, ln: int) -> None:
        self._count()
        r = self._choose(self.live, pick, off, ln)
        if r is None:
            return
        assert self.mf is not None
        self.mf.inc_ref(pages_fr(*r))
        self._add_refs(*r, 1)

    @rule(pick=IDX, off=IDX, ln=LEN)
    def dec_ref(self, pick: int, off: int, ln: int) -> None:
        self._count()
        r = self._choose(self.droppable, pick, off, ln)
        if r is None:
            return
        assert self.mf is not None
        self.mf.dec_ref(pages_fr(*r))
        self._add_refs(*r, -1)

    @rule(pick=IDX, off=IDX, ln=LEN)
    def decommit(self, pick: int, off: int, ln: int) -> None:
        self._count()
        r = self._choose(self.live, pick, off, ln)
        if r is None:
            return
        a, b = r
        assert self.mf is not None
        self.acall(self.mf.decommit, pages_fr(a, b))
        self.stamps[a:b] = bytes(b - a)
        self.maybe[a:b] = bytes(b - a)
        self._check_zero(a, b)

    @rule(pick=IDX, off=IDX, ln=LEN)
    def cache_take(self, pick: int, off: int, ln: int) -> None:
        """The user takes a reference on live pages and marks them evictable."""
        self._count()
        r = self._choose(self.takeable, pick, off, ln)
        if r is None:
            return
        a, b = r
        mf = self.mf
        assert mf is not None
        mf.inc_ref(pages_fr(a, b))
        mf.mark_evictable(self.user, EvictableRange(a * P, b * P))
        self.held[a:b] = b"\1" * (b - a)
        self.evictable[a:b] = b"\1" * (b - a)
        self._add_refs(a, b, 1)

    @rule(pick=IDX, off=IDX, ln=LEN, anywhere=st.booleans())
    def cache_unmark(self, pick: int, off: int, ln: int, anywhere: bool) -> None:
        """Withdraw part of the evictable set (or any range at all)."""
        self._count()
        if anywhere:
            a = off % (self.npages + 8)
            r: tuple[int, int] | None = (a, a + max(ln, 1))
        else:
            r = self._choose(self.evictable, pick, off, ln)
        if r is None:
            return
        a, b = r
        assert self.mf is not None
        self.mf.mark_unevictable(self.user, EvictableRange(a * P, b * P))
        self._grow(b)
        self.evictable[a:b] = bytes(b - a)
        for p in range(a, b):
            self._update(p)

    @rule(pick=IDX, off=IDX, ln=LEN)
    def cache_remark(self, pick: int, off: int, ln: int) -> None:
        """Mark held pages evictable again."""
        self._count()
        r = self._choose(self.unmarked, pick, off, ln)
        if r is None:
            return
        a, b = r
        assert self.mf is not None
        self.mf.mark_evictable(self.user, EvictableRange(a * P, b * P))
        self.evictable[a:b] = b"\1" * (b - a)
        for p in range(a, b):
            self._update(p)

    @rule(pick=IDX, off=IDX, ln=LEN)
    def cache_drop(self, pick: int, off: int, ln: int) -> None:
        """The user gives back held pages that are not evictable."""
        self._count()
        r = self._choose(self.unmarked, pick, off, ln)
        if r is None:
            return
        a, b = r
        assert self.mf is not None
        self.mf.dec_ref(pages_fr(a, b))
        self.held[a:b] = bytes(b - a)
        self._add_refs(a, b, -1)

    @rule()
    def mark_all_unevictable(self) -> None:
        self._count()
        assert self.mf is not None
        self.mf.mark_all_unevictable(self.user)
        for a, b in runs_of(self.evictable):
            self.evictable[a:b] = bytes(b - a)
            for p in range(a, b):
                self._update(p)

    @rule()
    def evict_all(self) -> None:
        self._count()
        mf = self.mf
        assert mf is not None and evictions_of(mf) is not None
        expected = runs_of(self.evictable)
        failed = evictions_of(mf).failed
        self.user.calls.clear()
        mf.start_evictions()  # from this thread: the loop's dispatcher spawns the task
        self.acall(mf.wait_for_evictions)  # acall bounds it (fail_after)
        assert not self.user.errors, self.user.errors
        assert evictions_of(mf).failed == failed
        # One call per maximal run, the last one first.
        calls = [(er.start // P, er.end // P) for er in self.user.calls]
        assert calls == expected[::-1], (calls, expected)
        for a, b in expected:
            self.evictable[a:b] = bytes(b - a)
            self.held[a:b] = bytes(b - a)
            self._add_refs(a, b, -1)

    @rule(settle=st.booleans())
    def update_usage(self, settle: bool) -> None:
        self._count()
        mf = self.mf
        assert mf is not None
        if settle:
            self._reclaim()
        self.acall(mf.update_usage)
        # Only the releaser runs meanwhile, and it only lowers these: read
        # the pending bytes first, then the accounting.
        pending = mf.reclaim_pending()
        snap = mf.accounting.snapshot()
        maybe = dict.fromkeys(KINDS, 0)
        written = dict.fromkeys(KINDS, 0)
        kinds, stamps, maybe_flags = self.kinds, self.stamps, self.maybe
        for a, b in runs_of(self.live):
            for p in range(a, b):
                k = MemoryKind(kinds[p])
                if maybe_flags[p]:
                    maybe[k] += P
                if stamps[p]:
                    written[k] += P
        for k in KINDS:
            # Counted committed: only live pages that may be committed (plus,
            # for SYSTEM, freed pages not released yet).
            bound = maybe[k] + (pending if k is MemoryKind.SYSTEM else 0)
            assert snap[k] <= bound, f"{k.name}: {snap[k]} counted, at most {bound} possible"
            if settle:
                # Written pages are resident: a scan must have found them.
                assert snap[k] >= written[k], f"{k.name}: {snap[k]} < {written[k]} written"
        usage = mf.total_usage()
        assert snap.total - snap.system <= usage
        if settle:
            assert snap.total <= usage <= sum(maybe.values())

    @rule()
    def reclaim(self) -> None:
        self._count()
        self._reclaim()

    @rule(
        op=st.sampled_from(["inc_ref", "dec_ref", "decommit"]),
        where=st.sampled_from(["freed", "span", "never", "beyond"]),
        pick=IDX,
        off=IDX,
        ln=LEN,
    )
    def bad_call(self, op: str, where: str, pick: int, off: int, ln: int) -> None:
        """A reference call on pages that are not all live: RefCountError,
        and nothing changes."""
        self._count()
        mf = self.mf
        assert mf is not None
        size = mf.total_size() // P
        ln = max(ln, 1)
        r: tuple[int, int] | None = None
        if where == "freed":
            freed = bytearray(self.ever[p] and not self.live[p] for p in range(size))
            r = self._choose(freed, pick, off, ln)
        elif where == "span":
            runs = runs_of(self.live)
            if runs:
                s, e = runs[pick % len(runs)]
                r = (e - 1, e + 1) if off % 2 else (s - 1, s + 1)
                if r[0] < 0:
                    r = None
        elif where == "never":
            never = bytearray(not self.ever[p] for p in range(size))
            r = self._choose(never, pick, off, ln)
        if r is None:
            a = size + off % 4
            r = (a, a + ln)
        a, b = r
        self._grow(b)
        if op == "decommit" and self.pending.find(1, a, b) >= 0:
            # Freed pages not yet released may be decommitted (or be in a
            # release right now): not a deterministic failure.
            return
        BAD_CALLS[self.backend] = BAD_CALLS.get(self.backend, 0) + 1
        quiet = mf.reclaim_pending() == 0  # then the releaser has nothing to change
        before = str(mf)
        fr = pages_fr(a, b)
        with pytest.raises(RefCountError):
            if op == "decommit":
                self.acall(mf.decommit, fr)
            else:
                getattr(mf, op)(fr)
        if quiet:
            assert str(mf) == before

    # ---------------------------------------------------------- invariants

    @invariant()
    def agrees_with_model(self) -> None:
        mf = self.mf
        if mf is None:
            return
        mf.check_invariants()
        segs = mf.page_map()
        size = mf.total_size()
        assert os.fstat(mf.fd).st_size == size
        refs, kinds = self.refs, self.kinds
        covered = 0
        for v in segs:
            if v.state != "live":
                continue  # freed or being released: free in the model
            s, e = v.start, v.end
            a, b = s // P, e // P
            n = b - a
            assert b <= self.npages, f"live segment {FileRange(s, e)} unknown to the model"
            assert refs[a:b] == [v.refs] * n, f"refs of {FileRange(s, e)} {v!r}: {refs[a:b]}"
            assert kinds[a:b] == bytes([v.kind]) * n, f"kind of {FileRange(s, e)} {v!r}"
            covered += n
        assert covered == self.live_pages, (covered, self.live_pages)
        # Bytes: holes must be expected zero, data pages are read.
        stamps = self.stamps
        for a, b in runs_of(self.live):
            pos = a * P
            for ds, de in data_runs(self.scan_fd, a * P, b * P):
                assert stamps[pos // P : ds // P] == bytes((ds - pos) // P), (
                    f"written pages in {FileRange(pos, ds)} are holes (lost)"
                )
                got = page_stamps(mf, ds, de)
                want = stamps[ds // P : de // P]
                assert got == want, f"bytes of {FileRange(ds, de)} differ from the model"
                pos = de
            assert stamps[pos // P : b] == bytes(b - pos // P), (
                f"written pages in {FileRange(pos, b * P)} are holes (lost)"
            )
        # The user's evictable set.
        ev = evictions_of(mf)
        assert ev is not None
        with ev._lock:
            state = ev._users.get(id(self.user))
            got_ev = [(s // P, e // P) for s, e, _ in state.ranges] if state else []
        assert got_ev == runs_of(self.evictable)
        self.ok = True

    def teardown(self) -> None:
        mf = self.mf
        if mf is None:
            return
        try:
            if self.ok:
                self._drain()
        finally:
            self.stay_paused = False
            self._resume()
            self.cm.__exit__(None, None, None)
            os.close(self.scan_fd)
        assert mf.closed
        assert mapping_of(mf).regions == 0

    def _drain(self) -> None:
        """Free everything; once released, nothing is committed."""
        mf = self.mf
        assert mf is not None
        mf.mark_all_unevictable(self.user)
        self.evictable[:] = bytes(self.npages)
        self.held[:] = bytes(self.npages)
        while True:
            runs = runs_of(self.live)
            if not runs:
                break
            for a, b in runs:
                mf.dec_ref(pages_fr(a, b))
                self._add_refs(a, b, -1)
        mf.check_invariants()
        self.acall(mf.wait_for_reclaim)
        assert mf.total_usage() == 0
        assert mf.page_map() == []
        assert mf.accounting.snapshot().total == 0
        mf.check_invariants()


def test_memory_file_matches_model(anyio_backend: Any, capsys: pytest.CaptureFixture[str]) -> None:
    bid = backend_id(anyio_backend)
    STEPS[bid] = EXAMPLES[bid] = BAD_CALLS[bid] = 0
    t0 = time.perf_counter()
    with blocking_portal(anyio_backend) as portal:
        MemoryFileMachine.portal = portal
        MemoryFileMachine.backend = bid
        rounds = 0
        # Hypothesis ends examples early now and then (its buffer limit, short
        # examples): run rounds, sized by the steps per example seen so far,
        # until the share of this backend is reached.
        per_example = 0.8 * STEP_COUNT
        while STEPS[bid] < MIN_STEPS_PER_BACKEND:
            missing = MIN_STEPS_PER_BACKEND - STEPS[bid]
            examples = max(20, int(missing / per_example * 1.05) + 1)
            run_state_machine_as_test(
                MemoryFileMachine, settings=settings(SETTINGS, max_examples=examples)
            )
            rounds += 1
            per_example = max(5.0, STEPS[bid] / max(1, EXAMPLES[bid]))
            assert rounds <= 20, STEPS
    SECONDS[bid] = time.perf_counter() - t0
    with capsys.disabled():
        print(
            f"\n[memory-file model, {bid}] {STEPS[bid]} rule steps in {EXAMPLES[bid]} examples "
            f"({BAD_CALLS[bid]} bad calls), {SECONDS[bid]:.1f} s"
        )


def test_model_figures(capsys: pytest.CaptureFixture[str]) -> None:
    """Runs after the model test on every backend: the step counts."""
    if not STEPS:
        pytest.skip("the model test did not run")
    for bid, n in STEPS.items():
        assert n >= MIN_STEPS_PER_BACKEND, (bid, n)
    total = sum(STEPS.values())
    if len(STEPS) == 3:
        assert total >= MIN_STEPS_TOTAL, STEPS
    from test_bad_input import CASES  # the bad-input catalogue

    with capsys.disabled():
        print(
            f"\n[memory-file model] {total} rule steps, {sum(EXAMPLES.values())} examples, "
            f"{sum(BAD_CALLS.values())} bad calls (besides the {len(CASES)}-case bad-input "
            f"catalogue), on {len(STEPS)} backend(s) "
            f"({', '.join(f'{b}: {n}' for b, n in STEPS.items())}), "
            f"{sum(SECONDS.values()):.1f} s; profile {'long' if FUZZ_LONG else 'ci'}"
        )
