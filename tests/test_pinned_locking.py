"""Every mutating call takes the allocator's lock.

The synchronous calls (``allocate``, ``inc_ref``, ``dec_ref``, ``mark_*``)
are thread-safe because they decide and change the books under one lock;
``decommit`` plans under it too.  Each test holds that lock, starts the
call in another thread (or, for ``decommit``, on the event loop while
another thread holds the lock), and checks, while the lock is held, that
the call has not completed, that it waits at a lock, and that nothing a
lock-free reader can see (``total_size()``, ``repr``, the accounting,
``total_usage()``, the fault seam) has changed; then it lets the lock go
and checks that the call completes with the expected effect.

Deterministic both ways: a call that takes the lock can never complete
while the test holds it; a call that skips it either completes (or reaches
the punch, for ``decommit``) or never waits at a lock, and the test sees
which one happened instead of waiting for a timer to expire.

Private names: this file's ``_allocator_locks`` helper is the one place
that reaches them (``MemoryFile._mu``, and ``MemoryFile._evictions._lock``,
the lock of the ``mark_*`` calls).  ``_LOCK_ATTRS`` names the same two
attributes so that a thread waiting at ``with ...._mu:`` can be recognised
from its frame.
"""

from __future__ import annotations

import linecache
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from helpers import evictions_of

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
from aiopgalloc.host.faults import faults

pytestmark = pytest.mark.anyio

P = PAGE_SIZE
H = HUGE_PAGE_SIZE
OPTS = MemoryFileOpts(chunk_size=H, delayed_eviction=DelayedEviction.MANUAL)
_LOCK_ATTRS = ("._mu", "._lock")


def _allocator_locks(mf: MemoryFile) -> tuple[Any, Any]:
    """The private locks: the books' lock, and the evictable sets' lock."""
    ev = evictions_of(mf)
    assert ev is not None
    return mf._mu, ev._lock


@pytest.fixture(autouse=True)
def _no_leftover_faults() -> Iterator[None]:
    faults.reset()
    yield
    faults.reset()


def _waits_at_a_lock(ident: int, within: str | None = None) -> bool:
    """Whether thread ``ident`` sits at a ``with <lock>:`` line of aiopgalloc
    (and, with ``within``, has a frame of that function on its stack)."""
    frame = sys._current_frames().get(ident)
    if frame is None or "aiopgalloc" not in frame.f_code.co_filename:
        return False
    line = linecache.getline(frame.f_code.co_filename, frame.f_lineno).strip()
    if not (line.startswith("with ") and any(a in line for a in _LOCK_ATTRS)):
        return False
    if within is None:
        return True
    f: Any = frame
    while f is not None:
        if f.f_code.co_name == within:
            return True
        f = f.f_back
    return False


def _wait_for_lock_wait(
    ident: int, stop: Callable[[], bool], within: str | None = None, timeout: float = 10.0
) -> bool:
    """Poll until thread ``ident`` is seen waiting at a lock three times in a
    row (True), or ``stop()`` says the call went on without it (False)."""
    deadline = time.monotonic() + timeout
    seen = 0
    while time.monotonic() < deadline:
        if stop():
            return False
        seen = seen + 1 if _waits_at_a_lock(ident, within) else 0
        if seen >= 3:
            return True
        time.sleep(0.001)
    raise AssertionError("the call neither completed nor waited at a lock")


def lock_free_view(mf: MemoryFile) -> tuple[object, ...]:
    """What can be read without the allocator's lock."""
    return mf.total_size(), repr(mf), mf.accounting.snapshot(), mf.total_usage()


def call_while_held(mf: MemoryFile, lock: Any, fn: Callable[[], object]) -> object:
    """Hold ``lock``, run ``fn`` in a thread: it must wait at the lock with
    nothing changed; once the lock is let go it must complete."""
    before = lock_free_view(mf)
    done = threading.Event()
    box: dict[str, object] = {}

    def target() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:
            box["error"] = exc
        finally:
            done.set()

    t = threading.Thread(target=target, name="pinned-locking-call", daemon=True)
    with lock:
        t.start()
        assert t.ident is not None
        waited = _wait_for_lock_wait(t.ident, done.is_set)
        assert not done.is_set(), "the call completed while the lock was held"
        assert waited
        assert lock_free_view(mf) == before, "the state changed while the lock was held"
    assert done.wait(10.0), "the call did not complete once the lock was free"
    t.join(10.0)
    if "error" in box:
        raise AssertionError(f"the call raised {box['error']!r}")
    return box.get("result")


def write(mf: MemoryFile, fr: FileRange, byte: int) -> None:
    for v in mf.map_internal(fr):
        v[:] = bytes([byte]) * len(v)
        v.release()


class User:
    async def evict(self, er: EvictableRange) -> None:
        pass


async def test_allocate_waits_for_the_lock() -> None:
    async with open_memory_file(opts=OPTS) as mf:
        mu, _ = _allocator_locks(mf)
        mf.allocate(H - P)
        # An allocation that grows the file: total_size() would show it.
        fr = call_while_held(mf, mu, lambda: mf.allocate(2 * P))
        assert fr == FileRange(H - P, H + P)
        assert mf.total_size() == 2 * H
        mf.check_invariants()


async def test_allocate_recycling_committed_pages_waits_for_the_lock() -> None:
    async with open_memory_file(opts=OPTS) as mf:
        mu, _ = _allocator_locks(mf)
        fr = mf.allocate(4 * P)
        keep = mf.allocate(P)
        write(mf, FileRange(fr.start, keep.end), 0x42)
        await mf.update_usage()
        mf.dec_ref(fr)  # known-committed waste: SYSTEM until recycled
        assert mf.accounting.snapshot().system == fr.length
        # Recycling moves the bytes from SYSTEM to the new kind.
        again = call_while_held(mf, mu, lambda: mf.allocate(4 * P, MemoryKind.TMPFS))
        assert again == fr
        acct = mf.accounting.snapshot()
        assert (acct.system, acct.tmpfs) == (0, fr.length)
        mf.check_invariants()


async def test_inc_ref_waits_for_the_lock() -> None:
    async with open_memory_file(opts=OPTS) as mf:
        mu, _ = _allocator_locks(mf)
        fr = mf.allocate(4 * P)
        before = str(mf)
        call_while_held(mf, mu, lambda: mf.inc_ref(FileRange(fr.start, fr.start + P)))
        assert str(mf) != before and "refs=2" in str(mf)
        mf.dec_ref(FileRange(fr.start, fr.start + P))
        assert str(mf) == before
        mf.check_invariants()


@pytest.mark.parametrize("path", ["one-segment", "several-segments"])
async def test_dec_ref_waits_for_the_lock(path: str) -> None:
    async with open_memory_file(opts=OPTS) as mf:
        mu, _ = _allocator_locks(mf)
        fr = mf.allocate(4 * P)
        write(mf, fr, 0x42)
        await mf.update_usage()
        if path == "several-segments":
            mf.inc_ref(FileRange(fr.start, fr.start + P))
        # Freeing known-committed pages moves their bytes to SYSTEM.
        call_while_held(mf, mu, lambda: mf.dec_ref(fr))
        freed = fr.length - (P if path == "several-segments" else 0)
        assert mf.accounting.snapshot().system == freed
        assert mf.stats().freed_bytes == freed
        mf.check_invariants()


@pytest.mark.parametrize("call", ["mark_evictable", "mark_unevictable", "mark_all_unevictable"])
async def test_mark_calls_wait_for_the_lock(call: str) -> None:
    async with open_memory_file(opts=OPTS) as mf:
        _, ev_lock = _allocator_locks(mf)
        user = User()
        er = EvictableRange(0, 8 * P)
        if call != "mark_evictable":
            mf.mark_evictable(user, er)
        calls: dict[str, Callable[[], None]] = {
            "mark_evictable": lambda: mf.mark_evictable(user, er),
            "mark_unevictable": lambda: mf.mark_unevictable(user, EvictableRange(0, 2 * P)),
            "mark_all_unevictable": lambda: mf.mark_all_unevictable(user),
        }
        call_while_held(mf, ev_lock, calls[call])
        expected = {"mark_evictable": 8 * P, "mark_unevictable": 6 * P, "mark_all_unevictable": 0}
        assert mf.stats().evictions.evictable_bytes == expected[call]
        mf.check_invariants()


async def test_decommit_plans_under_the_lock() -> None:
    """``decommit`` runs on the event loop: here another thread holds the
    lock, and the loop must wait at it before any punch (the punch is held
    at the fault seam's gate, so a plan made without the lock shows up as a
    punch reached while the lock is held)."""
    async with open_memory_file(opts=OPTS) as mf:
        mu, _ = _allocator_locks(mf)
        fr = mf.allocate(4 * P)
        write(mf, fr, 0x42)
        await mf.update_usage()
        before = lock_free_view(mf)
        loop_thread = threading.get_ident()
        held = threading.Event()
        report: dict[str, object] = {}

        with faults.gated("fallocate") as gate:

            def holder() -> None:
                try:
                    with mu:
                        held.set()
                        report["waited"] = _wait_for_lock_wait(
                            loop_thread, lambda: gate.reached, within="decommit"
                        )
                        report["punched"] = gate.reached
                        report["view"] = lock_free_view(mf)
                finally:
                    gate.open()  # the punch may go on once the lock is free

            t = threading.Thread(target=holder, name="pinned-locking-holder", daemon=True)
            t.start()
            assert held.wait(10.0)
            await mf.decommit(fr)  # waits at the lock on this very thread
            t.join(10.0)
        assert report["punched"] is False, "decommit punched while the lock was held"
        assert report["waited"] is True
        assert report["view"] == before
        # Done: the pages are uncommitted and no longer counted.
        assert mf.total_usage() == 0
        assert mf.accounting.snapshot().total == 0
        mf.check_invariants()
