"""The page books: every page's state, and every transition on it.

``PageBooks`` is a pure state machine.  It does no I/O, imports neither
anyio nor ``aiopgalloc.host``, takes no lock and knows nothing of the file
it describes: its owner (``MemoryFile``) serialises every call with its own
lock, performs the system calls the books ask for, and reports back.  Each
transition that needs I/O is split in two: a *plan* (a decision returned as
data: the pages to zero, to punch, to scan) and a *settlement* once the I/O
is done (or abandoned).  So the allocator's policy can be tested, and
model-checked, without a memfd or an event loop.

Page states
-----------
Every page of the file is in exactly one state:

- **clean**: neither allocated nor holding memory the books know of.  A gap
  of the usage set and of the waste set.  It reads as zero.
- **live**: allocated, with one or more references.  A segment of the usage
  set (``UsageInfo``: kind, known committed, refs >= 1).
- **waste**: freed (its last reference went) but not yet returned to the
  kernel: it may hold old bytes and memory.  A segment of the waste set
  (value: known committed) and a gap of the usage set, so first fit sees it
  as free and an allocation may *recycle* it: the owner zeroes it by hand
  instead of punching it and faulting fresh pages in later.
- **releasing**: waste taken by a release batch (or a decommit) whose
  punch is in flight.  A usage segment with ``refs == 0`` (``RELEASING``):
  neither recyclable nor allocatable until the batch settles.  Releasing
  segments never merge, so each batch removes exactly what it inserted.

Transitions: *place* (clean or waste -> live), *undo* a placement, *inc_ref*,
*dec_ref* (live -> waste at zero), *take a release batch* (waste ->
releasing), *finish* it (releasing -> clean, or back to waste when it never
ran), *decommit* (live pages stay live but become not known committed;
waste in range goes through releasing to clean), *apply a usage scan* (live
pages become known committed), *restore* from a checkpoint.

Accounting invariant
--------------------
``known_committed`` counts the bytes the books know to hold memory: live
pages a usage scan found resident (or that recycling or a commit filled),
waste known committed when freed, and releasing pages that were.  The same
bytes are counted per ``MemoryKind`` (waste and releasing as ``SYSTEM``):
``sum(per kind) == known_committed`` after every transition.  ``check()``
verifies it and every other invariant below; tests call it after each step.

1. The usage and waste sets are each sorted, disjoint, maximally merged
   (releasing segments aside), and their gap indexes are exact.
2. Usage and waste never overlap; every segment lies below ``file_size``.
3. ``refs >= 1`` for live segments; ``refs == 0`` only for ``RELEASING``.
4. ``releasing`` and ``releasing_committed`` are the byte counts of the
   releasing segments and of those that were known committed.
5. The accounting invariant above.
6. The punch log and the release notes stay within their bounds.

Racing usage scans
------------------
A usage scan is planned here, run by the owner without the lock, and applied
here.  Pages punched meanwhile may have been seen resident before the punch:
each punch bumps ``commit_seq`` and is remembered (the last ``PUNCH_LOG``
ranges), and applying a stale scan leaves those pages out.  Only when more
punches happened than are remembered is the scan refused (the owner rescans).

When the releaser punches
-------------------------
Lone short frees wait: an allocation may recycle them cheaply, and a later
neighbour may merge with them into one punch.  ``dec_ref`` notes the start
of each free that merged with other waste, or is ``RUN_BYTES`` long by
itself (``ready``; bounded, after which the releaser scans the waste set
once); a release batch in *runs-only* mode takes just the waste segments of
at least ``RUN_BYTES`` that hold a noted start.  Everything goes when the
owner asks for a flush (``request_flush``: ``wait_for_reclaim``, memory
pressure) or when the releaser decides the frees have paused.

Costs are per call, n = segments in the set touched, k = segments in range.
"""

from __future__ import annotations

import collections
import errno
from bisect import bisect_left
from dataclasses import dataclass, field
from typing import Final, NamedTuple

from .errors import RefCountError
from .ranges import PAGE_SIZE, FileRange
from .segments import SegmentSet
from .usage import MemoryKind, MemoryStats

__all__ = [
    "LIVE",
    "PUNCH_LOG",
    "RELEASING",
    "RUN_BYTES",
    "BooksFigures",
    "DecommitPlan",
    "PageBooks",
    "Piece",
    "Placement",
    "ReleaseBatch",
    "ScanPlan",
    "UsageInfo",
    "usage_mergeable",
]


class UsageInfo(NamedTuple):
    """The value of a usage segment: the pages' kind, whether they are known
    to be committed, and their reference count (0 only while releasing)."""

    kind: MemoryKind
    known_committed: bool
    refs: int

    def __repr__(self) -> str:
        state = "committed" if self.known_committed else "uncommitted"
        if self.refs == 0:
            return f"releasing {state}"
        return f"{self.kind.name} {state} refs={self.refs}"


RELEASING: Final = UsageInfo(MemoryKind.SYSTEM, False, 0)
"""The value of every releasing segment."""

LIVE: Final[tuple[tuple[UsageInfo, UsageInfo], ...]] = tuple(
    (UsageInfo(k, False, 1), UsageInfo(k, True, 1)) for k in MemoryKind
)
"""Shared values for one reference, ``LIVE[kind][known_committed]``: the hot
paths reuse them instead of building a tuple per call."""


def usage_mergeable(left: UsageInfo, right: UsageInfo) -> bool:
    """The usage set's merge policy: equal values merge, releasing ones
    never (each belongs to one batch, which removes exactly what it put in)."""
    if left is right:  # the shared LIVE values: the common case
        return left.refs != 0
    return left == right and left.refs != 0


def _is_last_ref(v: UsageInfo) -> bool:
    return v.refs == 1


Piece = tuple[int, int, bool]
"""A waste range ``(start, end, known committed)``."""

RUN_BYTES: Final = 1 << 20
"""A freed run at least this long is released as soon as the releaser
looks (the punch's fixed cost is then a small part of it)."""
PUNCH_LOG: Final = 8192
"""Punched ranges remembered for racing usage scans."""
_READY_MAX = 1 << 16  # noted frees kept; past it, one scan of the waste set
_PUNCH_STEP = 128 << 20  # largest single punch (fallocate serialises a file)
_SYSTEM = MemoryKind.SYSTEM
_NKINDS = len(MemoryKind)


class Placement(NamedTuple):
    """Where an allocation goes (a decision, not yet booked): ``start`` and
    the waste pieces inside ``[start, start + length)``.  A tuple: one is
    made on every allocation, and a frozen dataclass costs three
    ``object.__setattr__`` calls to build."""

    start: int
    end: int
    pieces: list[Piece]


@dataclass(slots=True)
class ReleaseBatch:
    """Waste taken to be punched out.

    ``pieces`` are the waste ranges taken (with their known-committed flag),
    ``ranges`` the same bytes cut into punches of at most 128 MiB, sorted;
    ``committed_bytes`` of the ``nbytes`` were known committed.  Whoever
    performs the batch sets ``performed`` (the punches ran, each one or its
    fallback) and lists in ``failed`` the ranges whose punch failed (zeroed
    by hand instead)."""

    pieces: list[Piece]
    ranges: list[tuple[int, int]]
    committed_bytes: int
    nbytes: int
    failed: list[tuple[int, int, OSError]] = field(default_factory=list)
    performed: bool = False


@dataclass(slots=True)
class DecommitPlan:
    """What a decommit punches: live ranges (they stay allocated, no longer
    known committed) and a release batch for the waste in range."""

    live: list[tuple[int, int]]
    waste: ReleaseBatch


@dataclass(frozen=True, slots=True)
class ScanPlan:
    """A usage scan to run: the live spans not known committed, and the
    commit sequence number they were taken at."""

    seq: int
    spans: list[tuple[int, int]]


@dataclass(frozen=True, slots=True)
class BooksFigures:
    """The books' figures at one instant, each O(1) to take."""

    usage: MemoryStats
    file_size: int
    known_committed_bytes: int
    live_bytes: int
    freed_bytes: int
    releasing_bytes: int
    segments: int
    largest_free_gap: int
    releases: int
    bytes_released: int
    recycled_bytes: int
    allocations: int


class PageBooks:
    """Every page of one memory file, and every transition on them (see the
    module notes).  Not thread-safe: the owner serialises every call.

    ``max_end`` bounds every offset (a whole number of chunks below 2**63);
    ``recycle_max_bytes``: placements longer than this prefer clean pages
    while the file has room for them.
    """

    __slots__ = (
        "_commit_seq",
        "_flush",
        "_frees",
        "_known_committed",
        "_per_kind",
        "_punched",
        "_punched_dropped",
        "_ready",
        "_ready_overflow",
        "_recycle_max",
        "_releasing",
        "_releasing_committed",
        "_usage",
        "_waste",
        "allocations",
        "bytes_released",
        "file_size",
        "max_end",
        "recycled_bytes",
        "releases",
    )

    def __init__(self, *, file_size: int, max_end: int, recycle_max_bytes: int) -> None:
        if not 0 <= file_size <= max_end:
            raise ValueError(f"file size {file_size:#x} outside [0, {max_end:#x}]")
        self.max_end = max_end
        self._recycle_max = recycle_max_bytes
        self.file_size = file_size
        """The file's size as booked (a whole number of chunks).  Read by
        the owner on every allocation, so a plain attribute; changed only
        by ``grow``."""
        self._usage: SegmentSet[UsageInfo] = SegmentSet(
            usage_mergeable, max_key=max_end, granularity=PAGE_SIZE
        )
        self._waste: SegmentSet[bool] = SegmentSet(max_key=max_end)
        self._releasing = 0
        self._releasing_committed = 0
        self._known_committed = 0
        self._per_kind: tuple[int, ...] = (0,) * _NKINDS
        self._commit_seq = 0
        self._punched: collections.deque[tuple[int, int, int]] = collections.deque()
        self._punched_dropped = 0  # the highest seq no longer in _punched
        self._ready: list[int] = []
        self._ready_overflow = False
        self._flush = False
        self._frees = 0
        self.releases = 0
        """Release batches finished."""
        self.bytes_released = 0
        """Bytes those batches punched out."""
        self.recycled_bytes = 0
        """Freed bytes handed out again (zeroed by the owner)."""
        self.allocations = 0
        """Placements booked (and not undone)."""

    # ------------------------------------------------------------- reading

    @property
    def known_committed(self) -> int:
        """Bytes the books know to hold memory.  O(1)."""
        return self._known_committed

    @property
    def reclaim_pending(self) -> int:
        """Bytes freed and not yet returned (waste and releasing).  O(1)."""
        return self._waste.total_length + self._releasing

    @property
    def has_waste(self) -> bool:
        """Whether any freed page waits for a release batch.  O(1)."""
        return bool(self._waste)

    @property
    def frees(self) -> int:
        """How many frees the books have seen (a clock for the releaser:
        it tells whether frees resumed since it last looked).  O(1)."""
        return self._frees

    @property
    def commit_seq(self) -> int:
        """Bumped by every punch: a usage scan is applied against the
        value it was planned at (see ``apply_scan``).  O(1)."""
        return self._commit_seq

    @property
    def flush_requested(self) -> bool:
        """Whether every freed page should go now (see ``request_flush``)."""
        return self._flush

    def accounting(self) -> MemoryStats:
        """Known-committed bytes per kind.  O(kinds).  The one reading that
        is safe from any thread without the owner's lock: it sees the
        figures as they stood after some whole transition."""
        return MemoryStats(*self._per_kind)

    def figures(self) -> BooksFigures:
        """The books' figures (see ``BooksFigures``).  O(1) in the number of
        segments (the largest gap comes from the gap index)."""
        usage, waste = self._usage, self._waste
        last = usage.last()
        tail = self.file_size - (last[1] if last is not None else 0)
        return BooksFigures(
            usage=self.accounting(),
            file_size=self.file_size,
            known_committed_bytes=self._known_committed,
            live_bytes=usage.total_length - self._releasing,
            freed_bytes=waste.total_length,
            releasing_bytes=self._releasing,
            segments=len(usage),
            largest_free_gap=max(usage.largest_gap(), tail),
            releases=self.releases,
            bytes_released=self.bytes_released,
            recycled_bytes=self.recycled_bytes,
            allocations=self.allocations,
        )

    def page_map(self) -> list[tuple[int, int, str, MemoryKind, int, bool]]:
        """Every segment, in address order, as ``(start, end, state, kind,
        refs, known committed)`` with state ``"live"``, ``"releasing"`` or
        ``"freed"`` (freed pages: kind SYSTEM, refs 0).  O(n)."""
        out: list[tuple[int, int, str, MemoryKind, int, bool]] = [
            (s, e, "live" if v.refs else "releasing", v.kind, v.refs, v.known_committed)
            for s, e, v in self._usage
        ]
        out += [(s, e, "freed", _SYSTEM, 0, c) for s, e, c in self._waste]
        out.sort()
        return out

    def describe(self, limit: int | None = None) -> list[str]:
        """The usage set, one line per segment, then the freed ranges; at
        most ``limit`` lines of each (None: all).  A pure function of the
        page states.  O(limit) (O(n) for all)."""
        lines: list[str] = []
        for i, (s, e, v) in enumerate(self._usage):
            if limit is not None and i >= limit:
                lines.append(f"... {len(self._usage) - limit} more segments")
                break
            lines.append(f"[{s:#x}, {e:#x}) {v!r}")
        for i, (s, e, c) in enumerate(self._waste):
            if limit is not None and i >= limit:
                lines.append(f"... {len(self._waste) - limit} more freed ranges")
                break
            lines.append(f"[{s:#x}, {e:#x}) freed {'committed' if c else 'uncommitted'}")
        return lines

    # ----------------------------------------------------------- counting

    # The per-kind figures are one tuple, replaced whole on every change, so
    # that ``accounting()`` reads one consistent instant from any thread
    # without the owner's lock (a reference read is atomic).

    def _count(self, kind: int, n: int) -> None:
        per_kind = list(self._per_kind)
        per_kind[kind] += n
        self._per_kind = tuple(per_kind)
        self._known_committed += n

    def _recount(self, n: int, to: int, frm: int) -> None:
        """Move ``n`` known-committed bytes from kind ``frm`` to ``to``."""
        per_kind = list(self._per_kind)
        per_kind[frm] -= n
        per_kind[to] += n
        self._per_kind = tuple(per_kind)

    # ------------------------------------------------------------- growth

    def grow(self, new_size: int, foreign_end: int = 0) -> bool:
        """Book the file as grown to ``new_size`` (by the owner's ftruncate).

        ``foreign_end`` > the old size says someone else grew the file and
        may have written up to there: those pages are booked as freed (not
        known committed), so that a placement there is zeroed and the
        releaser punches them.  Returns whether that happened (a placement
        planned before is then stale).  Raises ``ValueError`` for a size
        that shrinks or passes ``max_end``.  O(log n)."""
        old = self.file_size
        if not old <= new_size <= self.max_end or foreign_end > new_size:
            raise ValueError(f"cannot grow the books from {old:#x} to {new_size:#x}")
        self.file_size = new_size
        if foreign_end > old:
            end = (foreign_end + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
            self._free(old, end, False)
            return True
        return False

    # ---------------------------------------------------------- placement

    def plan_placement(self, length: int, align: int) -> Placement:
        """Where ``length`` bytes go: first fit, bottom-up, over clean and
        freed pages alike, at ``align``.  Requests longer than the recycle
        limit over freed pages look (a bounded number of tries) for clean
        room inside the file first: zeroing megabytes on the caller's thread
        costs more than a synchronous call should.  Pure.

        The placement may end past ``file_size``: the owner grows the file
        before booking it.  Raises ``OSError(ENOMEM)`` when no offset below
        ``max_end`` fits.  O(log n) (plus the tries)."""
        usage, waste = self._usage, self._waste
        a = usage.first_fit(length, 0, align)
        if a is None:
            raise OSError(errno.ENOMEM, "memory file offsets exhausted")
        end = a + length
        if not waste:
            return Placement(a, end, [])
        w = waste.lower_bound(a)
        if w is None or w[0] >= end:
            return Placement(a, end, [])
        if w[0] <= a and w[1] >= end and length <= self._recycle_max:
            return Placement(a, end, [w])  # the common case: one freed range holds it
        pieces = list(waste.segments(a, end))
        if length <= self._recycle_max:
            return Placement(a, end, pieces)
        key = pieces[-1][1]
        for _ in range(32):
            b = usage.first_fit(length, key, align)
            if b is None or b + length > self.file_size:
                break
            in_b = list(waste.segments(b, b + length))
            if not in_b:
                return Placement(b, b + length, [])
            key = in_b[-1][1]
        return Placement(a, end, pieces)

    def place(self, p: Placement, kind: MemoryKind) -> list[Piece]:
        """Book a placement as live with one reference; return the recycled
        pieces (clipped), which the owner must zero before handing them out.

        Precondition: ``p`` was planned with no transition since, and the
        file covers it.  O(log n + k)."""
        start, end = p.start, p.end
        if end > self.file_size:
            raise ValueError(f"placement {FileRange(start, end)} past the file's end")
        usage = self._usage
        live = LIVE[kind]
        self.allocations += 1
        if not p.pieces:
            usage.add(start, end, live[False])
            return []
        waste = self._waste
        recycled: list[Piece] = []
        cur = start
        for ws, we, committed in p.pieces:
            s, e = max(ws, start), min(we, end)
            if cur < s:
                usage.add(cur, s, live[False])
            waste.carve(s, e)
            if committed:
                self._recount(e - s, kind, _SYSTEM)  # still committed once zeroed
            usage.add(s, e, live[committed])
            recycled.append((s, e, committed))
            self.recycled_bytes += e - s
            cur = e
        if cur < end:
            usage.add(cur, end, live[False])
        return recycled

    def undo_placement(self, start: int, end: int, recycled: list[Piece], kind: MemoryKind) -> None:
        """Undo ``place`` after the owner failed to zero or commit the pages:
        recycled pieces go back to waste as they were, the rest is clean
        again, whatever a commit marked.  Precondition: the pages are as
        ``place`` left them, apart from ``mark_committed``.  O(log n + k)."""
        was_committed = [(s, e) for s, e, c in recycled if c]
        for s, e, v in self._usage.remove_range(start, end):
            if v.known_committed:
                # Bytes marked committed since (by a commit or a racing
                # scan) are counted no more: the owner punched the clean
                # pages back out, and recycled ones go back as they were.
                marked = (e - s) - _overlap(s, e, was_committed)
                if marked:
                    self._count(kind, -marked)
        for s, e, committed in recycled:
            if committed:
                self._recount(e - s, _SYSTEM, kind)
            self._waste.add(s, e, committed)
            self.recycled_bytes -= e - s
        self.allocations -= 1

    def mark_committed(self, start: int, end: int, kind: MemoryKind) -> None:
        """Book the clean pages of a fresh placement as known committed
        (the owner committed them).  O(log n + k)."""
        usage = self._usage
        for s, e, v in list(usage.segments(start, end)):
            # Compared by value: a merge may have kept an equal copy of the
            # shared LIVE value, and another thread may have added a
            # reference since the placement.
            if v.refs == 0 or v.known_committed or v.kind != kind:
                continue
            a, b = max(s, start), min(e, end)
            usage.carve(a, b)
            usage.add(a, b, LIVE[kind][True] if v.refs == 1 else v._replace(known_committed=True))
            self._count(kind, b - a)

    # --------------------------------------------------------- references

    def _check_live(self, start: int, end: int, what: str) -> None:
        """Raise RefCountError unless live segments cover [start, end)."""
        cur = start
        for s, e, v in self._usage.segments(start, end):
            if s > cur:
                break
            if v.refs == 0:
                raise RefCountError(
                    f"{what}: pages {FileRange(max(s, start), min(e, end))} were freed and "
                    "are being released"
                )
            cur = e
            if cur >= end:
                return
        nxt = self._usage.lower_bound(cur)
        gap_end = end if nxt is None else min(end, nxt[0])
        freed = self._waste.find(cur) is not None
        raise RefCountError(
            f"{what}: pages {FileRange(cur, max(gap_end, cur + PAGE_SIZE))} are "
            f"{'freed' if freed else 'not allocated'}"
        )

    def first_shared(self, start: int, end: int) -> tuple[int, int] | None:
        """The first run of pages in [start, end) with more than one
        reference (neighbouring shared segments joined), or None when every
        page has exactly one.  Live pages must cover the range: raises
        ``RefCountError`` otherwise (a query: nothing changes either way).
        O(log n + k)."""
        self._check_live(start, end, "first_shared_range")
        found: tuple[int, int] | None = None
        for s, e, v in self._usage.segments(start, end):
            a, b = max(s, start), min(e, end)
            if v.refs > 1:
                if found is None:
                    found = (a, b)
                elif found[1] == a:
                    found = (found[0], b)
                else:
                    break
            elif found is not None:
                break
        return found

    def inc_ref(self, start: int, end: int) -> None:
        """One more reference on every page of [start, end), which live
        pages must cover.  Raises ``RefCountError`` (nothing changed).
        O(log n + k)."""
        self._check_live(start, end, "inc_ref")
        usage = self._usage
        usage.apply_contiguous(start, end, lambda s, e, v: v._replace(refs=v.refs + 1))
        usage.merge_range(start, end)
        usage.merge_adjacent(start, end)

    def dec_ref(self, start: int, end: int) -> None:
        """One reference less on every page of [start, end), which live
        pages must cover; pages reaching zero become waste.  Raises
        ``RefCountError`` (nothing changed).  O(log n + k); the common case
        (one segment holding the range, its last reference) is one lookup
        and one insertion."""
        v = self._usage.carve_if(start, end, _is_last_ref)
        if v is not None:
            self._free(start, end, v.known_committed, v.kind)
            return
        self._check_live(start, end, "dec_ref")
        usage = self._usage
        usage.isolate(start, end)
        freed: list[tuple[int, int, UsageInfo]] = []
        for s, e, v in list(usage.segments(start, end)):
            if v.refs == 1:
                freed.append((s, e, v))
            else:
                usage.set_value(s, v._replace(refs=v.refs - 1))
        for s, e, v in freed:
            usage.remove(s)
            self._free(s, e, v.known_committed, v.kind)
        usage.merge_range(start, end)
        usage.merge_adjacent(start, end)

    def _free(self, start: int, end: int, committed: bool, kind: int = _SYSTEM) -> None:
        """Pages [start, end), already out of the usage set, become waste
        (counted as SYSTEM while known committed).  Noted for the releaser
        when they join other waste or are a run by themselves."""
        if committed and kind != _SYSTEM:
            self._recount(end - start, _SYSTEM, kind)
        waste = self._waste
        n = len(waste)
        waste.add(start, end, committed)
        self._frees += 1
        if len(waste) <= n or end - start >= RUN_BYTES:
            ready = self._ready
            if len(ready) < _READY_MAX:
                ready.append(start)
            else:
                # A long while without a release pass (a loop without an
                # await): stop noting; the next batch scans the waste set.
                self._ready_overflow = True

    # ---------------------------------------------------------- releasing

    def request_flush(self) -> bool:
        """Ask that every freed page go on the next batch, lone short ones
        included.  Returns whether there is any (the owner then wakes the
        releaser).  O(1)."""
        if self._waste:
            self._flush = True
            return True
        return False

    def take_release_batch(
        self, max_bytes: int, max_ranges: int, *, runs_only: bool
    ) -> ReleaseBatch | None:
        """Take waste for punching (it becomes releasing); None when there
        is nothing to take.

        All waste from the lowest address up, unless ``runs_only`` and no
        flush was requested: then only the noted runs of at least
        ``RUN_BYTES``.  At most ``max_bytes`` (give or take the last piece)
        and ``max_ranges`` pieces.  O(k log n)."""
        waste = self._waste
        if not waste:
            self._forget_notes()
            return None
        pieces: list[Piece] = []
        if runs_only and not self._flush:
            pieces = self._ready_runs(max_bytes, max_ranges)
            if not pieces:
                return None
        else:
            total = 0
            for seg in waste:
                pieces.append(seg)
                total += seg[1] - seg[0]
                if total >= max_bytes or len(pieces) >= max_ranges:
                    break
        batch = self._take_waste(pieces)
        if not waste:
            self._forget_notes()
        return batch

    def _forget_notes(self) -> None:
        self._ready.clear()
        self._ready_overflow = self._flush = False

    def _ready_runs(self, max_bytes: int, max_ranges: int) -> list[Piece]:
        """The waste segments of at least RUN_BYTES holding a noted start,
        lowest first: O(k log n) for k notes; after an overflow, one pass
        over the waste set."""
        waste = self._waste
        pieces: list[Piece] = []
        total = 0
        if self._ready_overflow:
            self._ready_overflow = False
            self._ready.clear()
            for seg in waste:
                if seg[1] - seg[0] >= RUN_BYTES:
                    pieces.append(seg)
                    total += seg[1] - seg[0]
                    if total >= max_bytes or len(pieces) >= max_ranges:
                        self._ready_overflow = True  # the rest on the next pass
                        break
            return pieces
        hints = self._ready
        if not hints:
            return pieces
        self._ready = []
        hints.sort()
        i, n = 0, len(hints)
        while i < n:
            found = waste.find(hints[i])
            if found is None:
                i += 1
                continue
            s, e, _ = found
            i = bisect_left(hints, e, i + 1)
            if e - s >= RUN_BYTES:
                pieces.append(found)
                total += e - s
                if total >= max_bytes or len(pieces) >= max_ranges:
                    self._ready.extend(hints[i:])
                    break
        return pieces

    def _take_waste(self, pieces: list[Piece]) -> ReleaseBatch:
        """Move waste pieces to releasing; the batch cut into punches."""
        ranges: list[tuple[int, int]] = []
        committed = total = 0
        waste, usage = self._waste, self._usage
        for s, e, c in pieces:
            waste.remove_range(s, e)
            usage.insert_without_merging(s, e, RELEASING)
            total += e - s
            if c:
                committed += e - s
            for p in range(s, e, _PUNCH_STEP):
                ranges.append((p, min(p + _PUNCH_STEP, e)))
        self._releasing += total
        self._releasing_committed += committed
        return ReleaseBatch(pieces, ranges, committed, total)

    def finish_release(self, batch: ReleaseBatch) -> None:
        """Settle a batch: performed, its pages are clean (and no longer
        counted); never performed (cancelled before it ran), they are waste
        again as they were.  O(k log n)."""
        usage = self._usage
        self._releasing -= batch.nbytes
        self._releasing_committed -= batch.committed_bytes
        if not batch.performed:
            for s, e, c in batch.pieces:
                usage.remove_range(s, e)
                self._waste.add(s, e, c)
            return
        for s, e in batch.ranges:
            usage.remove_range(s, e)
        if batch.committed_bytes:
            self._count(_SYSTEM, -batch.committed_bytes)
        self._note_punched(batch.ranges)
        self.releases += 1
        self.bytes_released += batch.nbytes

    def _note_punched(self, ranges: list[tuple[int, int]]) -> None:
        """Remember punched ranges for racing usage scans."""
        self._commit_seq += 1
        seq = self._commit_seq
        log = self._punched
        for s, e in ranges:
            if len(log) >= PUNCH_LOG:
                self._punched_dropped = log.popleft()[0]
            log.append((seq, s, e))

    # ---------------------------------------------------------- decommit

    def plan_decommit(self, start: int, end: int) -> DecommitPlan:
        """Take [start, end) for punching: live ranges as they are, waste
        into a release batch.  The pages must all be live or waste.  Raises
        ``RefCountError`` (nothing changed).  O(log n + k)."""
        live: list[tuple[int, int]] = []
        waste_pieces: list[Piece] = []
        usage, waste = self._usage, self._waste
        cur = start
        while cur < end:
            seg = usage.find(cur)
            if seg is not None:
                if seg[2].refs == 0:
                    raise RefCountError(f"decommit: pages at {cur:#x} are being released already")
                nxt = min(seg[1], end)
                if live and live[-1][1] == cur:
                    live[-1] = (live[-1][0], nxt)
                else:
                    live.append((cur, nxt))
            else:
                w = waste.find(cur)
                if w is None:
                    n = usage.lower_bound(cur)
                    gap_end = end if n is None else min(end, n[0])
                    raise RefCountError(
                        f"decommit: pages {FileRange(cur, gap_end)} are not allocated"
                    )
                nxt = min(w[1], end)
                waste_pieces.append((cur, nxt, w[2]))
            cur = nxt
        batch = self._take_waste(waste_pieces)
        # Noted now: a scan racing with the punches must not count them.
        self._note_punched(live + batch.ranges)
        return DecommitPlan(live, batch)

    def finish_decommit(self, plan: DecommitPlan) -> None:
        """Settle a performed decommit: the live pages are no longer known
        committed; the waste was released.  O(log n + k)."""
        self.finish_release(plan.waste)
        usage = self._usage
        for s, e in plan.live:
            for ss, se, v in list(usage.segments(s, e)):
                if v.refs == 0 or not v.known_committed:
                    continue
                a, b = max(ss, s), min(se, e)
                usage.carve(a, b)
                usage.add(a, b, v._replace(known_committed=False))
                self._count(v.kind, -(b - a))
        self._note_punched(plan.live)

    def abandon_decommit(self, plan: DecommitPlan) -> None:
        """Settle a decommit whose punches never ran: as if never planned."""
        plan.waste.performed = False
        self.finish_release(plan.waste)

    # -------------------------------------------------------- usage scans

    def plan_scan(self, committed_now: int) -> ScanPlan | None:
        """The live spans not known committed, merged; None when the file's
        committed bytes (fstat) equal the books' already.  O(n)."""
        if committed_now == self._known_committed:
            return None
        spans: list[tuple[int, int]] = []
        for s, e, v in self._usage:
            if v.refs == 0 or v.known_committed:
                continue
            if spans and spans[-1][1] == s:
                spans[-1] = (spans[-1][0], e)
            else:
                spans.append((s, e))
        return ScanPlan(self._commit_seq, spans)

    def apply_scan(self, seq: int, runs: list[tuple[int, int]]) -> bool:
        """Book resident ``runs`` (found by a scan planned at ``seq``) as known
        committed, leaving out pages punched since.  Returns False, changing
        nothing, when too many punches happened to know which (rescan).
        O(k log n)."""
        if seq != self._commit_seq:
            if self._punched_dropped > seq:
                return False
            runs = _subtract(runs, sorted((s, e) for q, s, e in self._punched if q > seq))
        usage = self._usage
        for rs, re_ in runs:
            for s, e, v in list(usage.segments(rs, re_)):
                if v.refs == 0 or v.known_committed:
                    continue
                a, b = max(s, rs), min(e, re_)
                # Carve the piece out and add it back marked: add merges it
                # with whichever neighbours now match (two lookups).
                usage.carve(a, b)
                marked = LIVE[v.kind][True] if v.refs == 1 else v._replace(known_committed=True)
                usage.add(a, b, marked)
                self._count(v.kind, b - a)
        return True

    # -------------------------------------------------------- checkpoints

    def export_live(self) -> list[tuple[int, int, MemoryKind, int]]:
        """Live segments as ``(start, end, kind, refs)``, neighbours with the
        same kind and refs joined (known committed is not part of it).  O(n)."""
        out: list[tuple[int, int, MemoryKind, int]] = []
        for s, e, v in self._usage:
            if v.refs == 0:
                continue
            if out and out[-1][1] == s and out[-1][2] == v.kind and out[-1][3] == v.refs:
                out[-1] = (out[-1][0], e, v.kind, v.refs)
            else:
                out.append((s, e, v.kind, v.refs))
        return out

    def restore(self, segments: list[tuple[int, int, MemoryKind, int]]) -> None:
        """Book saved live segments into empty books (nothing known
        committed).  Precondition: the segments are sorted, disjoint, inside
        the file, refs >= 1 (a checkpoint reader checked them).  O(n log n)."""
        if self._usage or self._waste:
            raise ValueError("restore needs empty books")
        usage = self._usage
        for s, e, kind, refs in segments:
            if e > self.file_size:
                raise ValueError(f"segment {FileRange(s, e)} past the file's end")
            usage.add(s, e, LIVE[kind][False] if refs == 1 else UsageInfo(kind, False, refs))

    # ----------------------------------------------------------- checking

    def check(self) -> None:
        """Verify every invariant in the module notes; raise AssertionError
        naming the first one broken.  O(n)."""
        usage, waste = self._usage, self._waste
        usage.check()
        waste.check()
        assert usage.is_maximally_merged(), "usage set not maximally merged"
        assert waste.is_maximally_merged(), "waste set not maximally merged"
        per_kind = [0] * _NKINDS
        releasing = 0
        for s, e, v in usage:
            assert v.refs >= 0, f"negative refs at {s:#x}"
            if v.refs == 0:
                assert v == RELEASING, f"freed pages at {s:#x} still in usage: {v!r}"
                releasing += e - s
            elif v.known_committed:
                per_kind[v.kind] += e - s
            for ws, _we, _ in waste.segments(s, e):
                raise AssertionError(f"waste at {ws:#x} overlaps usage [{s:#x}, {e:#x})")
        for s, e, c in waste:
            if c:
                per_kind[_SYSTEM] += e - s
        assert releasing == self._releasing, "releasing byte count stale"
        assert 0 <= self._releasing_committed <= self._releasing, "releasing committed stale"
        per_kind[_SYSTEM] += self._releasing_committed
        high = max((usage.last() or (0, 0))[1], (waste.last() or (0, 0))[1])
        assert high <= self.file_size, "a segment lies past the end of the file"
        assert list(self._per_kind) == per_kind, f"per-kind counts {self._per_kind} != {per_kind}"
        assert sum(per_kind) == self._known_committed, "known-committed total stale"
        assert len(self._punched) <= PUNCH_LOG, "punch log over its bound"
        assert len(self._ready) <= _READY_MAX, "release notes over their bound"


def _overlap(start: int, end: int, ranges: list[tuple[int, int]]) -> int:
    """Bytes of [start, end) inside ``ranges`` (disjoint)."""
    return sum(max(0, min(end, e) - max(start, s)) for s, e in ranges)


def _subtract(runs: list[tuple[int, int]], cut: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """``runs`` minus the ranges of ``cut`` (sorted; both half-open)."""
    out: list[tuple[int, int]] = []
    for rs, re_ in runs:
        pieces = [(rs, re_)]
        for cs, ce in cut:
            if ce <= rs:
                continue
            if cs >= re_:
                break
            nxt: list[tuple[int, int]] = []
            for ps, pe in pieces:
                if ce <= ps or cs >= pe:
                    nxt.append((ps, pe))
                    continue
                if ps < cs:
                    nxt.append((ps, cs))
                if ce < pe:
                    nxt.append((ce, pe))
            pieces = nxt
        out.extend(pieces)
    return out
