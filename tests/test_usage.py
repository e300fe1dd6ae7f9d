"""MemoryKind, MemoryStats and MemoryAccounting (``aiopgalloc.usage``)."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from typing import Any

import anyio
import anyio.to_thread
import pytest

from aiopgalloc import (
    PAGE_SIZE,
    CommitMode,
    MemoryAccounting,
    MemoryKind,
    MemoryStats,
    open_memory_file,
)
from aiopgalloc._books import LIVE, RELEASING, UsageInfo, usage_mergeable

KINDS = list(MemoryKind)
FIELDS = ["system", "anonymous", "page_cache", "tmpfs", "ramdiskfs", "mapped"]


# ---------------------------------------------------------------- MemoryKind


def test_kinds_are_the_references_in_order() -> None:
    assert [k.name for k in MemoryKind] == [
        "SYSTEM",
        "ANONYMOUS",
        "PAGE_CACHE",
        "TMPFS",
        "RAMDISKFS",
        "MAPPED",
    ]
    assert [int(k) for k in MemoryKind] == list(range(6))


# --------------------------------------------------------------- MemoryStats


def test_stats_fields_are_lower_case_kind_names() -> None:
    assert [f.name for f in dataclasses.fields(MemoryStats)] == FIELDS
    assert [k.name.lower() for k in MemoryKind] == FIELDS


def test_stats_defaults_to_zero() -> None:
    s = MemoryStats()
    assert s.total == 0
    assert all(s[k] == 0 for k in MemoryKind)


def test_stats_total_getitem_and_as_dict() -> None:
    s = MemoryStats(system=1, anonymous=2, page_cache=4, tmpfs=8, ramdiskfs=16, mapped=32)
    assert s.total == 63
    assert s[MemoryKind.SYSTEM] == 1
    assert s[MemoryKind.ANONYMOUS] == 2
    assert s[MemoryKind.PAGE_CACHE] == 4
    assert s[MemoryKind.TMPFS] == 8
    assert s[MemoryKind.RAMDISKFS] == 16
    assert s[MemoryKind.MAPPED] == 32
    assert s.as_dict() == {
        "system": 1,
        "anonymous": 2,
        "page_cache": 4,
        "tmpfs": 8,
        "ramdiskfs": 16,
        "mapped": 32,
        "total": 63,
    }


def test_stats_are_frozen_and_compare_by_value() -> None:
    s = MemoryStats(anonymous=5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.anonymous = 6  # type: ignore[misc]
    assert s == MemoryStats(anonymous=5)
    assert s != MemoryStats(anonymous=6)
    assert hash(s) == hash(MemoryStats(anonymous=5))
    assert not hasattr(s, "__dict__")  # slots


# --------------------------------------------------------- MemoryAccounting


def test_new_accounting_is_zero() -> None:
    acc = MemoryAccounting()
    assert acc.total() == 0
    assert acc.snapshot() == MemoryStats()
    for k in MemoryKind:
        assert acc.get(k) == 0


@pytest.mark.parametrize("kind", KINDS, ids=[k.name for k in KINDS])
def test_inc_dec_one_kind(kind: MemoryKind) -> None:
    acc = MemoryAccounting()
    acc.inc(3 * 4096, kind)
    acc.inc(4096, kind)
    assert acc.get(kind) == 4 * 4096
    assert acc.total() == 4 * 4096
    snap = acc.snapshot()
    assert snap[kind] == 4 * 4096
    assert snap.total == 4 * 4096
    for other in MemoryKind:
        if other != kind:
            assert acc.get(other) == 0
    acc.dec(4096, kind)
    assert acc.get(kind) == 3 * 4096
    acc.dec(3 * 4096, kind)
    assert acc.get(kind) == 0
    assert acc.total() == 0


def test_zero_amounts_are_allowed() -> None:
    acc = MemoryAccounting()
    acc.inc(0, MemoryKind.ANONYMOUS)
    acc.dec(0, MemoryKind.ANONYMOUS)
    acc.move(0, MemoryKind.SYSTEM, MemoryKind.ANONYMOUS)
    assert acc.snapshot() == MemoryStats()


def test_kind_may_be_a_plain_int() -> None:
    acc = MemoryAccounting()
    acc.inc(7, 2)  # type: ignore[arg-type]
    assert acc.get(MemoryKind.PAGE_CACHE) == 7


def test_unknown_kind_raises_and_changes_nothing() -> None:
    acc = MemoryAccounting()
    acc.inc(10, MemoryKind.ANONYMOUS)
    with pytest.raises(ValueError):
        acc.inc(1, 99)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        acc.move(1, 99, MemoryKind.ANONYMOUS)  # type: ignore[arg-type]
    assert acc.snapshot() == MemoryStats(anonymous=10)


def test_move_uses_the_references_argument_order() -> None:
    acc = MemoryAccounting()
    acc.inc(10, MemoryKind.ANONYMOUS)
    acc.move(4, MemoryKind.SYSTEM, MemoryKind.ANONYMOUS)  # (amount, to, from)
    assert acc.snapshot() == MemoryStats(system=4, anonymous=6)
    assert acc.total() == 10
    acc.move(6, MemoryKind.SYSTEM, MemoryKind.ANONYMOUS)
    assert acc.snapshot() == MemoryStats(system=10)


def test_move_to_the_same_kind_is_a_no_op_but_still_checks() -> None:
    acc = MemoryAccounting()
    acc.inc(5, MemoryKind.TMPFS)
    acc.move(5, MemoryKind.TMPFS, MemoryKind.TMPFS)
    assert acc.snapshot() == MemoryStats(tmpfs=5)
    with pytest.raises(ValueError):
        acc.move(6, MemoryKind.TMPFS, MemoryKind.TMPFS)
    assert acc.snapshot() == MemoryStats(tmpfs=5)


def test_dec_below_zero_raises_and_changes_nothing() -> None:
    acc = MemoryAccounting()
    acc.inc(100, MemoryKind.ANONYMOUS)
    acc.inc(7, MemoryKind.SYSTEM)
    before = acc.snapshot()
    with pytest.raises(ValueError, match="ANONYMOUS"):
        acc.dec(101, MemoryKind.ANONYMOUS)
    with pytest.raises(ValueError):
        acc.dec(1, MemoryKind.MAPPED)  # nothing counted there at all
    assert acc.snapshot() == before
    acc.dec(100, MemoryKind.ANONYMOUS)  # exactly down to zero is fine
    assert acc.get(MemoryKind.ANONYMOUS) == 0


def test_move_below_zero_raises_and_changes_nothing() -> None:
    acc = MemoryAccounting()
    acc.inc(100, MemoryKind.ANONYMOUS)
    before = acc.snapshot()
    with pytest.raises(ValueError, match="ANONYMOUS"):
        acc.move(101, MemoryKind.SYSTEM, MemoryKind.ANONYMOUS)
    with pytest.raises(ValueError):
        acc.move(1, MemoryKind.ANONYMOUS, MemoryKind.SYSTEM)
    assert acc.snapshot() == before
    assert acc.get(MemoryKind.SYSTEM) == 0


@pytest.mark.parametrize("amount", [-1, -4096])
def test_negative_amounts_raise_value_error(amount: int) -> None:
    acc = MemoryAccounting()
    acc.inc(10, MemoryKind.ANONYMOUS)
    calls: list[Callable[[], None]] = [
        lambda: acc.inc(amount, MemoryKind.ANONYMOUS),
        lambda: acc.dec(amount, MemoryKind.ANONYMOUS),
        lambda: acc.move(amount, MemoryKind.SYSTEM, MemoryKind.ANONYMOUS),
    ]
    for call in calls:
        with pytest.raises(ValueError):
            call()
    assert acc.snapshot() == MemoryStats(anonymous=10)


@pytest.mark.parametrize(
    "amount",
    [1.0, 4096.0, "4096", None, True, False, b"1", 2**0.5],
    ids=["float1", "float4096", "str", "None", "True", "False", "bytes", "irrational"],
)
def test_non_int_amounts_raise_type_error(amount: Any) -> None:
    acc = MemoryAccounting()
    acc.inc(10, MemoryKind.ANONYMOUS)
    with pytest.raises(TypeError):
        acc.inc(amount, MemoryKind.ANONYMOUS)
    with pytest.raises(TypeError):
        acc.dec(amount, MemoryKind.ANONYMOUS)
    with pytest.raises(TypeError):
        acc.move(amount, MemoryKind.SYSTEM, MemoryKind.ANONYMOUS)
    assert acc.snapshot() == MemoryStats(anonymous=10)


def test_int_subclasses_other_than_bool_are_accepted() -> None:
    class Bytes(int):
        pass

    acc = MemoryAccounting()
    acc.inc(Bytes(4096), MemoryKind.MAPPED)
    acc.inc(MemoryKind.MAPPED, MemoryKind.MAPPED)  # an IntEnum is an int (5)
    assert acc.get(MemoryKind.MAPPED) == 4101


def test_snapshot_is_independent_of_later_changes() -> None:
    acc = MemoryAccounting()
    acc.inc(1, MemoryKind.SYSTEM)
    snap = acc.snapshot()
    acc.inc(1, MemoryKind.SYSTEM)
    assert snap.system == 1
    assert acc.snapshot().system == 2


@pytest.mark.anyio
async def test_file_accounting_is_a_read_only_view() -> None:
    # The allocator's own figures belong to its books: mf.accounting reads
    # them and offers nothing that would change them.
    async with open_memory_file() as mf:
        acc = mf.accounting
        for name in ("inc", "dec", "move", "_inc_unchecked", "_move_unchecked"):
            assert not hasattr(acc, name), name
        fr = mf.allocate(4 * PAGE_SIZE, MemoryKind.TMPFS, commit=CommitMode.POPULATE)
        assert acc.get(MemoryKind.TMPFS) == 4 * PAGE_SIZE
        assert acc.total() == 4 * PAGE_SIZE
        assert acc.snapshot() == MemoryStats(tmpfs=4 * PAGE_SIZE)
        assert "tmpfs=16384" in repr(acc)
        mf.dec_ref(fr)
        assert acc.snapshot() == MemoryStats(system=4 * PAGE_SIZE)


def test_repr_shows_the_figures() -> None:
    acc = MemoryAccounting()
    acc.inc(4096, MemoryKind.TMPFS)
    r = repr(acc)
    assert r.startswith("MemoryAccounting(")
    assert "tmpfs=4096" in r


# ----------------------------------------------------------- thread safety

N_THREADS = 4
N_OPS = 100_000


def _hammer(acc: MemoryAccounting, idx: int, n: int, barrier: threading.Barrier) -> None:
    """Each thread adds to its own kind and to a shared one, moves between
    two shared kinds, and takes everything back out again except a known
    remainder."""
    own = KINDS[2 + idx]  # PAGE_CACHE, TMPFS, RAMDISKFS, MAPPED
    barrier.wait()
    for _ in range(n):
        acc.inc(3, MemoryKind.ANONYMOUS)
        acc.inc(1, own)
        acc.move(1, MemoryKind.SYSTEM, MemoryKind.ANONYMOUS)
        acc.dec(2, MemoryKind.ANONYMOUS)
    # Leave: n in SYSTEM and n in own, per thread; ANONYMOUS back at 0.


def test_thread_safety_totals_are_exact() -> None:
    acc = MemoryAccounting()
    barrier = threading.Barrier(N_THREADS)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            _hammer(acc, i, N_OPS, barrier)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(N_THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    snap = acc.snapshot()
    assert snap.anonymous == 0
    assert snap.system == N_THREADS * N_OPS
    for i in range(N_THREADS):
        assert snap[KINDS[2 + i]] == N_OPS
    assert snap.total == 2 * N_THREADS * N_OPS
    assert acc.total() == snap.total


def test_thread_safety_plain_inc_dec_pairs() -> None:
    # 4 threads x 100k inc then dec of the same kind: the count returns to
    # exactly what it was, and no dec ever saw a counter below its amount.
    acc = MemoryAccounting()
    acc.inc(1, MemoryKind.ANONYMOUS)
    barrier = threading.Barrier(N_THREADS)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            barrier.wait()
            for _ in range(N_OPS):
                acc.inc(4096, MemoryKind.ANONYMOUS)
                acc.dec(4096, MemoryKind.ANONYMOUS)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(N_THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert acc.snapshot() == MemoryStats(anonymous=1)


def test_concurrent_over_dec_never_goes_negative() -> None:
    # 4 threads race to take 1 byte each from a counter of 1000; exactly 1000
    # succeed, the rest raise ValueError, and the counter ends at 0.
    acc = MemoryAccounting()
    acc.inc(1000, MemoryKind.SYSTEM)
    barrier = threading.Barrier(N_THREADS)
    ok = [0] * N_THREADS
    refused = [0] * N_THREADS

    def run(i: int) -> None:
        barrier.wait()
        for _ in range(500):
            try:
                acc.dec(1, MemoryKind.SYSTEM)
                ok[i] += 1
            except ValueError:
                refused[i] += 1

    threads = [threading.Thread(target=run, args=(i,)) for i in range(N_THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(ok) == 1000
    assert sum(refused) == N_THREADS * 500 - 1000
    assert acc.get(MemoryKind.SYSTEM) == 0


@pytest.mark.anyio
async def test_accounting_from_worker_threads_while_the_loop_runs() -> None:
    # The allocator's hot calls are made from anyio worker threads too; the
    # event loop keeps reading snapshots meanwhile.  Every worker step is
    # "inc 2 into my kind, then move 1 of it to SYSTEM", so any consistent
    # snapshot has an even total that never shrinks; a torn move would show
    # an odd one.
    acc = MemoryAccounting()
    n = 10_000
    barrier = threading.Barrier(N_THREADS)
    seen: list[MemoryStats] = []

    async def reader(done: anyio.Event) -> None:
        while not done.is_set():
            seen.append(acc.snapshot())
            await anyio.sleep(0)

    done = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(reader, done)
        async with anyio.create_task_group() as workers:
            for i in range(N_THREADS):
                workers.start_soon(anyio.to_thread.run_sync, _inc_and_move, acc, i, n, barrier)
        done.set()
    snap = acc.snapshot()
    assert snap.system == N_THREADS * n
    assert snap.total == 2 * N_THREADS * n
    for i in range(N_THREADS):
        assert snap[KINDS[2 + i]] == n
    assert seen, "the loop never ran while the workers did"
    for s in seen:
        assert s.total % 2 == 0, s
        assert s.anonymous == 0
    totals = [s.total for s in seen]
    assert totals == sorted(totals)


def _inc_and_move(acc: MemoryAccounting, idx: int, n: int, barrier: threading.Barrier) -> None:
    own = KINDS[2 + idx]
    barrier.wait()
    for _ in range(n):
        acc.inc(2, own)
        acc.move(1, MemoryKind.SYSTEM, own)


class _CountingLock:
    """A lock that counts how often it is taken."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.taken = 0

    def __enter__(self) -> _CountingLock:
        self._lock.acquire()
        self.taken += 1
        return self

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


def test_every_method_takes_the_lock() -> None:
    # On CPython 3.11 the GIL alone happens to make each counter update
    # atomic, so the thread tests above cannot catch a missing lock; this
    # checks that every public method really serialises on it.
    acc = MemoryAccounting()
    lock = _CountingLock()
    acc._lock = lock  # type: ignore[assignment]
    calls = [
        lambda: acc.inc(10, MemoryKind.ANONYMOUS),
        lambda: acc.dec(1, MemoryKind.ANONYMOUS),
        lambda: acc.move(1, MemoryKind.SYSTEM, MemoryKind.ANONYMOUS),
        lambda: acc.get(MemoryKind.SYSTEM),
        acc.total,
        acc.snapshot,
    ]
    for call in calls:
        before = lock.taken
        call()
        assert lock.taken == before + 1


def test_a_held_lock_blocks_updates_from_other_threads() -> None:
    acc = MemoryAccounting()
    done = threading.Event()

    def worker() -> None:
        acc.inc(1, MemoryKind.SYSTEM)
        done.set()

    with acc._lock:
        t = threading.Thread(target=worker)
        t.start()
        assert not done.wait(0.1)
        # Reading the raw counters under the lock: nothing has landed yet.
        assert acc._counts[MemoryKind.SYSTEM] == 0
    t.join()
    assert done.is_set()
    assert acc.get(MemoryKind.SYSTEM) == 1


# ------------------------------------------------- UsageInfo and its policy


def test_usage_info_fields_and_repr() -> None:
    u = UsageInfo(MemoryKind.ANONYMOUS, True, 2)
    assert (u.kind, u.known_committed, u.refs) == (MemoryKind.ANONYMOUS, True, 2)
    assert repr(u) == "ANONYMOUS committed refs=2"
    assert repr(UsageInfo(MemoryKind.TMPFS, False, 1)) == "TMPFS uncommitted refs=1"
    assert repr(RELEASING) == "releasing uncommitted"
    assert repr(UsageInfo(MemoryKind.SYSTEM, True, 0)) == "releasing committed"


def test_live_table_holds_one_reference_per_kind_and_state() -> None:
    assert len(LIVE) == len(MemoryKind)
    for k in MemoryKind:
        uncommitted, committed = LIVE[k]
        assert uncommitted == UsageInfo(k, False, 1)
        assert committed == UsageInfo(k, True, 1)
    assert UsageInfo(MemoryKind.SYSTEM, False, 0) == RELEASING


def test_usage_mergeable_equal_live_values_merge() -> None:
    a = LIVE[MemoryKind.ANONYMOUS][True]
    assert usage_mergeable(a, a)  # the shared object
    assert usage_mergeable(a, UsageInfo(MemoryKind.ANONYMOUS, True, 1))  # an equal copy
    assert usage_mergeable(
        UsageInfo(MemoryKind.MAPPED, False, 3), UsageInfo(MemoryKind.MAPPED, False, 3)
    )


@pytest.mark.parametrize(
    "other",
    [
        UsageInfo(MemoryKind.PAGE_CACHE, True, 1),  # another kind
        UsageInfo(MemoryKind.ANONYMOUS, False, 1),  # not known committed
        UsageInfo(MemoryKind.ANONYMOUS, True, 2),  # other refs
    ],
    ids=["kind", "committed", "refs"],
)
def test_usage_mergeable_different_values_do_not(other: UsageInfo) -> None:
    a = LIVE[MemoryKind.ANONYMOUS][True]
    assert not usage_mergeable(a, other)
    assert not usage_mergeable(other, a)


def test_usage_mergeable_releasing_values_never_merge() -> None:
    # Each releasing segment belongs to one release batch.
    assert not usage_mergeable(RELEASING, RELEASING)
    assert not usage_mergeable(RELEASING, UsageInfo(MemoryKind.SYSTEM, False, 0))
    committed = UsageInfo(MemoryKind.SYSTEM, True, 0)
    assert not usage_mergeable(committed, committed)
