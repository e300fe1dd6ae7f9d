"""The bad-input catalogue: every public call, fed what it must refuse.

Each case runs against the same populated memory file (live pages with one
and two references, freed pages not yet released, released pages, never
allocated pages) and checks that the call raises the documented exception
(DESIGN.md's error list) and leaves the allocator exactly as it was:
the page map, the accounting snapshot, ``total_size()``, ``reclaim_pending()``
and the file's real size unchanged, and ``check_invariants()`` passing.
"""

from __future__ import annotations

import errno
import io
import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import anyio
import pytest
from helpers import State, fill_byte

from aiopgalloc import (
    HUGE_PAGE_SIZE,
    PAGE_SIZE,
    AccessType,
    ClosedError,
    DelayedEviction,
    EvictableRange,
    FileRange,
    MemoryFile,
    MemoryFileOpts,
    MemoryKind,
    RefCountError,
    open_memory_file,
)
from aiopgalloc.host.faults import faults

pytestmark = pytest.mark.anyio

P = PAGE_SIZE
H = HUGE_PAGE_SIZE
OPTS = MemoryFileOpts(chunk_size=H, delayed_eviction=DelayedEviction.MANUAL)


class User:
    """A well-behaved evictable user (MANUAL mode: never asked to evict here)."""

    async def evict(self, er: EvictableRange) -> None:
        pass


class NoEvict:
    pass


class EvictNotCallable:
    evict = 5


@dataclass
class Layout:
    """The populated file every case runs against (first fit, bottom-up)::

    A [0, 4P)     live, 1 ref, committed
    B [4P, 5P)    freed, not released yet (waste, committed)
    C [5P, 7P)    live, 2 refs, committed
    D [7P, 8P)    freed, not released yet (waste, committed)
    R [8P, 9P)    freed and released (clean again)
    E [9P, 11P)   live, 1 ref, committed
    [11P, size)   never allocated
    """

    mf: MemoryFile
    A: FileRange
    B: FileRange
    C: FileRange
    D: FileRange
    R: FileRange
    E: FileRange
    user: User = field(default_factory=User)

    @property
    def size(self) -> int:
        return self.mf.total_size()


async def populate(mf: MemoryFile) -> Layout:
    a = mf.allocate(4 * P)
    b = mf.allocate(P)
    c = mf.allocate(2 * P)
    d = mf.allocate(P)
    r = mf.allocate(P)
    e = mf.allocate(2 * P)
    for fr in (a, b, c, d, e):
        fill_byte(mf, fr, 0x5A)
    mf.inc_ref(c)
    mf.dec_ref(r)
    await mf.wait_for_reclaim()
    await mf.update_usage()
    mf.dec_ref(b)
    mf.dec_ref(d)
    lay = Layout(mf, a, b, c, d, r, e)
    assert (a, b, c, d, r, e) == (
        FileRange(0, 4 * P),
        FileRange(4 * P, 5 * P),
        FileRange(5 * P, 7 * P),
        FileRange(7 * P, 8 * P),
        FileRange(8 * P, 9 * P),
        FileRange(9 * P, 11 * P),
    ), str(mf)
    assert mf.reclaim_pending() == 2 * P
    mf.mark_evictable(lay.user, EvictableRange(0, 8 * P))
    mf.check_invariants()
    return lay


# ------------------------------------------------------------------ cases


Call = Callable[[Layout], Any]


@dataclass
class Case:
    id: str
    call: Call
    exc: type[BaseException] | tuple[type[BaseException], ...]
    closed: bool = False
    errno: int | None = None
    fault: Callable[[], AbstractContextManager[None]] | None = None
    bug: str | None = None


CASES: list[Case] = []


def case(id: str, call: Call, exc: Any, **kw: Any) -> None:
    CASES.append(Case(id, call, exc, **kw))


# ---- allocate
for name, length, exc in [
    ("str", "4096", TypeError),
    ("float", 4096.0, TypeError),
    ("None", None, TypeError),
    ("True", True, TypeError),
    ("False", False, TypeError),
    ("bytes", b"4096", TypeError),
    ("zero", 0, ValueError),
    ("negative", -4096, ValueError),
    ("100", 100, ValueError),
    ("4097", 4097, ValueError),
    ("page+1", P + 1, ValueError),
    ("page-1", P - 1, ValueError),
]:
    case(f"allocate-length-{name}", lambda s, n=length: s.mf.allocate(n), exc)

for name, kind, exc in [
    ("str", "ANONYMOUS", TypeError),
    ("99", 99, ValueError),
    ("-1", -1, ValueError),
    ("None", None, TypeError),
    ("True", True, TypeError),
    ("float", 1.0, TypeError),
]:
    case(f"allocate-kind-{name}", lambda s, k=kind: s.mf.allocate(P, k), exc)

case("allocate-past-max-offset", lambda s: s.mf.allocate(1 << 63), OSError, errno=errno.ENOMEM)
case(
    "allocate-cannot-grow",
    lambda s: s.mf.allocate(4 * H),
    OSError,
    errno=errno.ENOSPC,
    fault=lambda: faults.injected("ftruncate", errno.ENOSPC),
)
case(
    "allocate-recycled-zeroing-fails",
    lambda s: s.mf.allocate(P),  # lands on B (recycled, memset)
    OSError,
    errno=errno.EIO,
    fault=lambda: faults.injected("memset", errno.EIO),
)
case(
    "allocate-recycled-and-clean-zeroing-fails",
    lambda s: s.mf.allocate(2 * P),  # lands on D (recycled) + R (clean)
    OSError,
    errno=errno.EIO,
    fault=lambda: faults.injected("memset", errno.EIO),
)
case(
    "allocate-beyond-address-space",
    lambda s: s.mf.allocate(1 << 62),
    OSError,
    errno=errno.ENOMEM,
)


# ---- inc_ref / dec_ref / decommit: shared range cases
def _ranges(op: str) -> list[tuple[str, Callable[[Layout], Any], Any]]:
    """(id, range maker, expected exception) for a reference-style call."""
    out: list[tuple[str, Callable[[Layout], Any], Any]] = [
        ("None", lambda s: None, TypeError),
        ("int", lambda s: 5, TypeError),
        ("3-tuple", lambda s: (1, 2, 3), TypeError),
        ("1-tuple", lambda s: (P,), TypeError),
        ("strs", lambda s: FileRange("a", "b"), TypeError),
        ("floats", lambda s: FileRange(0.0, float(P)), TypeError),
        ("bools", lambda s: FileRange(False, True), TypeError),
        ("list", lambda s: [0, P], TypeError),
        ("empty", lambda s: FileRange(0, 0), ValueError),
        ("empty-inside", lambda s: FileRange(s.A.start + P, s.A.start + P), ValueError),
        ("end-before-start", lambda s: FileRange(2 * P, P), ValueError),
        ("negative-start", lambda s: FileRange(-P, P), ValueError),
        ("negative-both", lambda s: FileRange(-2 * P, -P), ValueError),
        ("unaligned-start", lambda s: FileRange(s.A.start + 1, s.A.end), ValueError),
        ("unaligned-end", lambda s: FileRange(s.A.start, s.A.end - 1), ValueError),
        ("unaligned-both", lambda s: FileRange(100, 4097), ValueError),
        ("past-max-offset", lambda s: FileRange(0, 1 << 63), ValueError),
        ("beyond-file", lambda s: FileRange(s.size, s.size + P), RefCountError),
        ("straddles-file-end", lambda s: FileRange(s.size - P, s.size + P), RefCountError),
        ("live-plus-never-allocated", lambda s: FileRange(s.E.start, s.E.end + P), RefCountError),
        (
            "never-allocated-plus-live",
            lambda s: FileRange(s.E.start - 2 * P, s.E.end),
            RefCountError,
        ),
        ("fully-never-allocated", lambda s: FileRange(s.E.end, s.E.end + 2 * P), RefCountError),
        ("released", lambda s: s.R, RefCountError),
        ("multi-live-plus-released", lambda s: FileRange(s.C.start, s.R.end), RefCountError),
    ]
    if op != "decommit":
        # Freed pages not yet released: decommit accepts them (it releases
        # them on the way), the reference-count calls must not.
        out += [
            ("freed", lambda s: s.B, RefCountError),
            ("live-plus-freed", lambda s: FileRange(s.A.start, s.B.end), RefCountError),
            ("freed-plus-live", lambda s: FileRange(s.B.start, s.C.end), RefCountError),
            ("live-refs2-plus-freed", lambda s: FileRange(s.C.start, s.D.end), RefCountError),
        ]
    return out


for op in ("inc_ref", "dec_ref", "decommit"):
    for name, make, exc in _ranges(op):
        case(
            f"{op}-{name}",
            lambda s, op=op, make=make: getattr(s.mf, op)(make(s)),
            exc,
        )

# Named misuse the contract spells out.
case("dec_ref-double-free", lambda s: s.mf.dec_ref(s.B), RefCountError)
case("dec_ref-double-free-after-release", lambda s: s.mf.dec_ref(s.R), RefCountError)
case("inc_ref-on-freed", lambda s: s.mf.inc_ref(s.D), RefCountError)
case("inc_ref-on-released", lambda s: s.mf.inc_ref(s.R), RefCountError)
case(
    "dec_ref-subrange-then-freed",
    lambda s: s.mf.dec_ref(FileRange(s.C.end - P, s.D.end)),
    RefCountError,
)

# ---- map_internal
RW = AccessType.READ_WRITE
for name, make, at, exc in [
    ("empty", lambda s: FileRange(0, 0), RW, ValueError),
    ("end-before-start", lambda s: FileRange(2 * P, P), RW, ValueError),
    ("negative", lambda s: FileRange(-P, P), RW, ValueError),
    ("past-end", lambda s: FileRange(s.size, s.size + P), RW, ValueError),
    ("straddles-end", lambda s: FileRange(s.size - P, s.size + P), RW, ValueError),
    ("huge", lambda s: FileRange(0, 1 << 70), RW, ValueError),
    ("execute", lambda s: s.A, AccessType.EXECUTE, PermissionError),
    ("read-execute", lambda s: s.A, AccessType.READ | AccessType.EXECUTE, PermissionError),
    ("rwx", lambda s: s.A, RW | AccessType.EXECUTE, PermissionError),
    ("at-str", lambda s: s.A, "rw", TypeError),
    ("at-None", lambda s: s.A, None, TypeError),
    ("at-int", lambda s: s.A, 3, TypeError),
    ("fr-None", lambda s: None, RW, TypeError),
    ("fr-int", lambda s: 7, RW, TypeError),
    ("fr-3-tuple", lambda s: (0, P, 2 * P), RW, TypeError),
    ("fr-floats", lambda s: (0.0, float(P)), RW, TypeError),
    ("fr-strs", lambda s: ("0", "4096"), RW, TypeError),
]:
    case(f"map_internal-{name}", lambda s, m=make, at=at: s.mf.map_internal(m(s), at), exc)
case(
    "map_internal-fr-bools",
    lambda s: s.mf.map_internal((False, True)),
    TypeError,
)

# ---- evictable users
ER = EvictableRange(0, P)
for op in ("mark_evictable", "mark_unevictable"):
    for name, user, er, exc in [
        ("user-without-evict", NoEvict(), ER, TypeError),
        ("user-evict-not-callable", EvictNotCallable(), ER, TypeError),
        ("user-None", None, ER, TypeError),
        ("er-None", "U", None, TypeError),
        ("er-int", "U", 5, TypeError),
        ("er-3-tuple", "U", (0, 1, 2), TypeError),
        ("er-strs", "U", ("a", "b"), TypeError),
        ("er-floats", "U", (1.0, 2.0), TypeError),
        ("er-bools", "U", (False, True), TypeError),
        ("er-empty", "U", EvictableRange(P, P), ValueError),
        ("er-end-before-start", "U", EvictableRange(5, 3), ValueError),
        ("er-negative", "U", EvictableRange(-1, 5), ValueError),
        ("er-too-big", "U", EvictableRange(0, (1 << 64) + 1), ValueError),
    ]:
        case(
            f"{op}-{name}",
            lambda s, op=op, u=user, er=er: getattr(s.mf, op)(s.user if u == "U" else u, er),
            exc,
        )
for name, user in [("without-evict", NoEvict()), ("None", None)]:
    case(
        f"mark_all_unevictable-user-{name}",
        lambda s, u=user: s.mf.mark_all_unevictable(u),
        TypeError,
    )

# ---- allocate_and_fill
for name, reader in [("object", object()), ("bytes", b"data"), ("None", None), ("int", 3)]:
    case(
        f"allocate_and_fill-reader-{name}",
        lambda s, r=reader: s.mf.allocate_and_fill(P, MemoryKind.ANONYMOUS, r),
        TypeError,
    )
case(
    "allocate_and_fill-bad-length",
    lambda s: s.mf.allocate_and_fill(P + 1, MemoryKind.ANONYMOUS, io.BytesIO(bytes(2 * P))),
    ValueError,
)
case(
    "allocate_and_fill-bad-kind",
    lambda s: s.mf.allocate_and_fill(P, "ANONYMOUS", io.BytesIO(bytes(P))),
    TypeError,
)

# ---- every call after close
_closed_calls: list[tuple[str, Call]] = [
    ("allocate", lambda s: s.mf.allocate(P)),
    ("inc_ref", lambda s: s.mf.inc_ref(s.A)),
    ("dec_ref", lambda s: s.mf.dec_ref(s.A)),
    ("map_internal", lambda s: s.mf.map_internal(s.A)),
    ("map_internal-read", lambda s: s.mf.map_internal(s.A, AccessType.READ)),
    ("decommit", lambda s: s.mf.decommit(s.A)),
    ("decommit-freed", lambda s: s.mf.decommit(s.B)),
    ("update_usage", lambda s: s.mf.update_usage()),
    ("wait_for_reclaim", lambda s: s.mf.wait_for_reclaim()),
    ("total_usage", lambda s: s.mf.total_usage()),
    ("total_size", lambda s: s.mf.total_size()),
    ("fd", lambda s: s.mf.fd),
    ("share", lambda s: s.mf.share()),
    ("share-rw", lambda s: s.mf.share(readonly=False)),
    ("mark_evictable", lambda s: s.mf.mark_evictable(s.user, ER)),
    ("mark_unevictable", lambda s: s.mf.mark_unevictable(s.user, ER)),
    ("mark_all_unevictable", lambda s: s.mf.mark_all_unevictable(s.user)),
    ("should_cache_evictable", lambda s: s.mf.should_cache_evictable()),
    ("start_evictions", lambda s: s.mf.start_evictions()),
    ("wait_for_evictions", lambda s: s.mf.wait_for_evictions()),
    (
        "allocate_and_fill",
        lambda s: s.mf.allocate_and_fill(P, MemoryKind.ANONYMOUS, io.BytesIO(bytes(P))),
    ),
]
for name, call in _closed_calls:
    case(f"closed-{name}", call, ClosedError, closed=True)


# ------------------------------------------------------------------- runner

RAN: set[str] = set()


def _params() -> Iterator[Any]:
    for c in CASES:
        marks = [pytest.mark.xfail(strict=True, reason=f"BUG: {c.bug}")] if c.bug else []
        yield pytest.param(c, id=c.id, marks=marks)


def _check_exception(exc: BaseException, c: Case) -> None:
    expected = c.exc
    if expected is ValueError:
        # A malformed range is not a reference-count error.
        assert type(exc) is ValueError, f"{c.id}: expected plain ValueError, got {exc!r}"
    else:
        assert isinstance(exc, expected), f"{c.id}: expected {expected}, got {exc!r}"
    if c.errno is not None:
        assert isinstance(exc, OSError) and exc.errno == c.errno, repr(exc)
    assert not isinstance(exc, BaseExceptionGroup)


async def _run(lay: Layout, c: Case) -> None:
    mf = lay.mf
    mf.check_invariants()
    before = State.of(mf)
    ctx = c.fault() if c.fault is not None else nullcontext()
    with ctx, pytest.raises(BaseException) as info:
        result = c.call(lay)
        if hasattr(result, "__await__"):
            with anyio.fail_after(5):
                await result
    faults.reset()
    _check_exception(info.value, c)
    after = State.of(mf)
    assert after == before, f"{c.id}: state changed\nbefore: {before}\nafter:  {after}"
    mf.check_invariants()


@pytest.fixture(autouse=True)
def _no_leftover_faults() -> Iterator[None]:
    faults.reset()
    yield
    faults.reset()


@pytest.mark.parametrize("c", list(_params()))
async def test_bad_input(c: Case) -> None:
    async with open_memory_file(opts=OPTS) as mf:
        lay = await populate(mf)
        if not c.closed:
            await _run(lay, c)
            # Still fully usable afterwards.
            fr = mf.allocate(P)
            fill_byte(mf, fr, 1)
            mf.dec_ref(fr)
            mf.check_invariants()
            assert os.fstat(mf.fd).st_size == mf.total_size()
    if c.closed:
        await _run(lay, c)
    RAN.add(c.id)


def test_catalogue_size(capsys: pytest.CaptureFixture[str]) -> None:
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)), "duplicate case ids"
    assert len(CASES) >= 40
    with capsys.disabled():
        print(
            f"\nbad-input catalogue: {len(CASES)} cases "
            f"({sum(1 for c in CASES if c.bug)} known bugs), "
            f"{len(RAN)} passed on at least one backend in this run"
        )


async def test_huge_allocate_leaves_the_file_growable() -> None:
    async with open_memory_file(opts=OPTS) as mf:
        with pytest.raises((OSError, MemoryError)):
            mf.allocate(1 << 62)
        fr = mf.allocate(2 * H)  # needs the file to grow past its first chunk
        fill_byte(mf, fr, 3)
        assert os.fstat(mf.fd).st_size == mf.total_size()
        mf.check_invariants()
