"""SegmentSet: a map of disjoint half-open ranges to values, with a gap index.

This is the Python counterpart of the segment sets gVisor generates for its
page allocator, shaped for what the allocator asks of it most: *first fit*
(the lowest-address gap that holds N bytes at a given alignment), inserting a
range into a gap, and splitting and re-merging segments as reference counts
change.

Values are treated as immutable: splitting a segment gives both halves the
same value object, and merging keeps the left value.  Whether two adjacent
segments may merge is the *merge policy*'s decision: equality by default.
None of the mutating operations merge unless their documentation says so.

Layout
------
Segments are kept sorted by start in *blocks*: each block is four parallel
Python lists (starts, ends, values, and the gap before each segment), holding
between ``_LOAD // 2`` and ``2 * _LOAD`` segments (a lone block may hold
fewer).  This is sortedcontainers' layout (a list of short lists, located by
bisecting a list of each block's first key, ``_firsts``), without its
positional index, which the allocator never needs.  Plain short lists beat a
balanced tree written in Python by several times: ``list.insert`` on a few
hundred items is one ``memmove``.  A block is split in two when it passes
``2 * _LOAD`` segments and joined with a neighbour when it falls under
``_LOAD // 2``.

The gap index
-------------
``gaps[b][i]`` is the size of the gap just before segment ``i`` of block
``b`` (for the very first segment, the gap from ``min_key``).  Each block
records its largest gap (``_bmax``), and a max-segment-tree over the blocks
(``_tree``) records the largest value under every node.  First fit walks:
the gap holding ``key``; then the rest of that block; then the tree finds
the first later block whose largest gap is big enough (O(log blocks)); then
that block is scanned for the first gap big enough.  The gap after the last
segment (up to ``max_key``) is never stored: it is derived.

``_bmax`` is exact, not an upper bound: raised at once when a gap grows, and
recomputed with one C-level ``max`` over the block when its largest gap
shrinks or leaves it.  A loose bound would be correct too, but in allocation
churn the gap an allocation lands in is often its block's largest, so most
bounds would go stale and first fit would scan about twice as many gaps.

Beside each block's gaps sits a *byte map* (``_caps[b]``, a bytearray): the
gap in whole granules (``granularity``, a power of two: the allocator uses
the page size), capped at 255.  First fit looks for its candidates in it
with a compiled regular expression (a character class ``[k-\\xff]``), which
walks the bytes in C instead of comparing Python ints one by one; the exact
gap then decides.  On a churned usage map this makes a first fit 1.74 us
instead of 2.50 us.

When a block is split or dropped the tree is marked stale and rebuilt on the
next call that needs it, in O(blocks); a block changes only once per
``_LOAD`` insertions or deletions, so this is amortised O(1) per operation.

Invariants (``check()`` verifies every one)
-------------------------------------------
1. Every segment is non-empty; ``min_key <= start`` and ``end <= max_key``.
2. Segments are sorted and disjoint: each start is >= the previous end.
3. ``gaps`` holds exactly ``start - previous end`` (``start - min_key`` for
   the first segment).
4. The per-block lists have one entry per block and, within a block, one
   entry per segment; no block is empty or holds more than ``2 * _LOAD``
   segments, and when there are several blocks each holds at least
   ``_LOAD // 2``; ``_firsts[b]`` is the first start of block ``b``.
5. ``_bmax[b] == max(gaps[b])``.  The tree, when not stale, mirrors
   ``_bmax`` in its leaves (0 past the last block) and holds the maximum of
   its children at every node.
6. ``len(self)`` and ``total_length`` match a recount.
7. ``_caps[b][i] == min(gaps[b][i] >> log2(granularity), 255)``.

Cost
----
n = segments, B = ``_LOAD``.  Locating a key is two bisections, O(log n);
inserting or removing a segment is O(B) memmove plus O(log n) tree work when
a block's largest gap changes (and O(B) for the ``max`` when that gap
shrinks); first fit is O(log n + B) for alignments no larger than the gaps'
granularity.  With a coarser alignment a gap can be long enough yet fail to
hold an aligned range; each such gap between ``key`` and the answer costs
one more step, so the worst case grows with the number of those gaps (the
allocator only asks for huge-page alignment for huge-page-sized requests,
where such misfits are rare).  Each method states its own cost.

Thread safety: none.  The owner (``MemoryFile``) serialises access with its
own lock.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

__all__ = ["Segment", "SegmentSet"]

V = TypeVar("V")

Segment = tuple[int, int, V]  # (start, end, value)

_LOAD = 128
"""Target block size (see the layout notes): at this size both the first-fit
scan of a block and ``list.insert`` stay cheap (benchmarks/bench_segments.py)."""

_Search = Callable[[bytearray, int], "re.Match[bytes] | None"]
_SEARCHERS: list[_Search | None] = [None] * 256


def _searcher(k: int) -> _Search:
    """``search(buf, pos)`` for the first byte >= k: a compiled character
    class, made the first time it is needed (256 at most)."""
    found = _SEARCHERS[k]
    if found is None:
        found = re.compile(b"[" + re.escape(bytes((k,))) + b"-\\xff]").search
        _SEARCHERS[k] = found
    return found


class SegmentSet(Generic[V]):
    """A sorted map from disjoint half-open ranges ``[start, end)`` to values.

    ``mergeable(left, right)`` decides whether two adjacent segments may be
    merged (default: ``left == right``); the merged segment keeps ``left``.
    Keys are ints in ``[min_key, max_key]``.
    """

    __slots__ = (
        "_bmax",
        "_caps",
        "_ends",
        "_firsts",
        "_gaps",
        "_len",
        "_mergeable",
        "_shift",
        "_starts",
        "_total",
        "_tree",
        "_tsize",
        "_vals",
        "max_key",
        "min_key",
    )

    def __init__(
        self,
        mergeable: Callable[[V, V], bool] | None = None,
        *,
        min_key: int = 0,
        max_key: int = 1 << 64,
        granularity: int = 1,
    ) -> None:
        if min_key > max_key:
            raise ValueError("min_key must not exceed max_key")
        if granularity <= 0 or granularity & (granularity - 1):
            raise ValueError(f"granularity must be a power of two, got {granularity}")
        self._mergeable = mergeable
        self._shift = granularity.bit_length() - 1
        self.min_key = min_key
        self.max_key = max_key
        self._starts: list[list[int]] = []
        self._ends: list[list[int]] = []
        self._vals: list[list[V]] = []
        self._gaps: list[list[int]] = []
        self._caps: list[bytearray] = []
        self._firsts: list[int] = []
        self._bmax: list[int] = []
        self._tree: list[int] | None = None
        self._tsize = 0
        self._len = 0
        self._total = 0

    # ------------------------------------------------------------------ basics

    def __len__(self) -> int:
        """The number of segments.  O(1)."""
        return self._len

    def __bool__(self) -> bool:
        return self._len != 0

    @property
    def total_length(self) -> int:
        """The summed length of every segment.  O(1)."""
        return self._total

    def __iter__(self) -> Iterator[Segment[V]]:
        """Every segment as ``(start, end, value)``, in order.  O(n).

        The set must not be modified while iterating.
        """
        for s, e, v in zip(self._starts, self._ends, self._vals, strict=True):
            yield from zip(s, e, v, strict=True)

    def segments(self, start: int, end: int) -> Iterator[Segment[V]]:
        """The segments that overlap ``[start, end)``, unclipped, in order.

        O(log n + k).  The set must not be modified while iterating.
        """
        if self._len == 0 or start >= end:
            return
        b, i = self._pos_of(start)
        if b < 0 or self._ends[b][i] <= start:
            b, i = self._next_pos(b, i)
        starts, ends, vals = self._starts, self._ends, self._vals
        nb = len(starts)
        while b < nb:
            sb, eb, vb = starts[b], ends[b], vals[b]
            n = len(sb)
            while i < n:
                s = sb[i]
                if s >= end:
                    return
                yield s, eb[i], vb[i]
                i += 1
            b += 1
            i = 0

    def __repr__(self) -> str:
        return f"<SegmentSet {self._len} segments, {self._total:#x} bytes>"

    # ------------------------------------------------------------------ lookups

    def find(self, key: int) -> Segment[V] | None:
        """The segment containing ``key``, or None.  O(log n)."""
        b, i = self._pos_of(key)
        if b < 0 or self._ends[b][i] <= key:
            return None
        return self._seg(b, i)

    def lower_bound(self, key: int) -> Segment[V] | None:
        """The first segment whose end is > ``key`` (the one containing
        ``key``, or else the next one), or None.  O(log n)."""
        b, i = self._pos_of(key)
        if b < 0 or self._ends[b][i] <= key:
            b, i = self._next_pos(b, i)
        if b >= len(self._starts):
            return None
        return self._seg(b, i)

    def first(self) -> Segment[V] | None:
        """The lowest segment, or None.  O(1)."""
        return self._seg(0, 0) if self._len else None

    def last(self) -> Segment[V] | None:
        """The highest segment, or None.  O(1)."""
        return self._seg(-1, -1) if self._len else None

    def next_segment(self, start: int) -> Segment[V] | None:
        """The segment after the one that starts at or before ``start``
        (i.e. the first segment whose start is > ``start``).  O(log n)."""
        b, i = self._next_pos(*self._pos_of(start))
        return self._seg(b, i) if b < len(self._starts) else None

    def prev_segment(self, start: int) -> Segment[V] | None:
        """The last segment whose end is <= ``start``.  O(log n)."""
        b, i = self._pos_of(start)
        if b < 0:
            return None
        if self._ends[b][i] <= start:
            return self._seg(b, i)
        if i > 0:
            return self._seg(b, i - 1)
        if b > 0:
            return self._seg(b - 1, len(self._starts[b - 1]) - 1)
        return None

    def gaps(self, start: int | None = None, end: int | None = None) -> Iterator[tuple[int, int]]:
        """The non-empty gaps within ``[start, end)`` (default: the whole key
        space), clipped, in order.

        O(log n + k).  The set must not be modified while iterating.
        """
        lo = self.min_key if start is None else start
        hi = self.max_key if end is None else end
        cur = lo
        for s, e, _ in self.segments(lo, hi):
            if s > cur:
                yield cur, s
            cur = max(cur, e)
        if cur < hi:
            yield cur, hi

    def largest_gap(self) -> int:
        """The largest gap before any segment (from ``min_key`` for the
        first); the gap after the last segment is not included.  O(1) from
        the gap index (O(blocks) right after a block split or join)."""
        if not self._len:
            return 0
        tree = self._tree if self._tree is not None else self._build_tree()
        return tree[1]

    # ---------------------------------------------------------------- first fit

    def first_fit(self, length: int, key: int | None = None, alignment: int = 1) -> int | None:
        """The lowest ``a >= key``, a multiple of ``alignment`` (a power of
        two), such that ``[a, a + length)`` lies in a gap and ends at or before
        ``max_key``; None when there is none.

        O(log n + B) (see the module notes for coarse alignments).
        """
        if length <= 0:
            raise ValueError(f"length must be > 0, got {length}")
        if alignment <= 0 or alignment & (alignment - 1):
            raise ValueError(f"alignment must be a power of two, got {alignment}")
        key = self.min_key if key is None else max(key, self.min_key)
        amask = alignment - 1
        max_key = self.max_key
        if self._len == 0:
            a = (key + amask) & ~amask
            return a if a + length <= max_key else None

        # 1. The gap holding key, or the one just after the segment holding it.
        b, i = self._pos_of(key)
        gs = key if b < 0 else max(self._ends[b][i], key)
        b, i = self._next_pos(b, i)
        starts = self._starts
        nb = len(starts)
        ge = starts[b][i] if b < nb else max_key
        a = (gs + amask) & ~amask
        if a + length <= ge:
            return a if a + length <= max_key else None
        if b >= nb:
            return None

        # 2. Later gaps: the gap before segment (b, i + 1) onwards.  Scan the
        #    rest of this block, then let the tree pick the next block with a
        #    big enough gap.
        gaps = self._gaps
        caps = self._caps
        bmax = self._bmax
        need = length >> self._shift
        search = _searcher(need if need < 255 else 255)
        i += 1
        while True:
            if i < len(starts[b]) and bmax[b] >= length:
                # The byte map finds the candidates at C speed; the exact
                # gap (and the alignment) decides.
                gb = gaps[b]
                sb = starts[b]
                cb = caps[b]
                m = search(cb, i)
                while m is not None:
                    j = m.start()
                    g = gb[j]
                    if g >= length:
                        s = sb[j]
                        a = (s - g + amask) & ~amask
                        if a + length <= s:
                            return a
                    m = search(cb, j + 1)
                # Nothing fitted: only an alignment misfit gets here, since
                # the block's largest gap is exact.
            b = self._find_block(b + 1, length)
            if b < 0:
                break
            i = 0

        # 3. The gap after the last segment.
        a = (max(self._ends[-1][-1], key) + amask) & ~amask
        return a if a + length <= max_key else None

    # ---------------------------------------------------------------- mutation

    def add(self, start: int, end: int, value: V) -> bool:
        """Insert ``[start, end) -> value`` if the range lies entirely in one
        gap, merging with the neighbours the policy allows.  Returns False
        (and changes nothing) if any key of the range is already mapped.

        Raises ``ValueError`` for an empty or ill-formed range, or one outside
        ``[min_key, max_key]``.  O(log n + B).
        """
        if start >= end or start < self.min_key or end > self.max_key:
            self._check_range(start, end)
        starts = self._starts
        b = bisect_right(self._firsts, start) - 1
        if b >= 0:
            sb = starts[b]
            i = bisect_right(sb, start) - 1
            if self._ends[b][i] > start:
                return False
            if i + 1 < len(sb):
                nb, ni = b, i + 1
            else:
                nb, ni = b + 1, 0
        else:
            i = -1
            nb, ni = 0, 0
        if nb < len(starts) and starts[nb][ni] < end:
            return False
        self._insert_merging(b, i, nb, ni, start, end, value)
        return True

    def _insert_merging(
        self, b: int, i: int, nb: int, ni: int, start: int, end: int, value: V
    ) -> None:
        # Merge into the previous segment when it touches and may merge.
        if b >= 0 and self._ends[b][i] == start and self._can_merge(self._vals[b][i], value):
            self._ends[b][i] = end
            self._total += end - start
            # The follower's gap shrinks; then it may merge.
            if nb < len(self._starts):
                self._set_gap(nb, ni, self._starts[nb][ni] - end)
            self._try_merge_next(b, i)
            return
        if (
            nb < len(self._starts)
            and self._starts[nb][ni] == end
            and self._can_merge(value, self._vals[nb][ni])
        ):
            # Extend the next segment downwards (keeping `value`, the left one).
            self._starts[nb][ni] = start
            self._vals[nb][ni] = value
            self._total += end - start
            if ni == 0:
                self._firsts[nb] = start
            self._set_gap(nb, ni, start - (self._ends[b][i] if b >= 0 else self.min_key))
            return
        self._insert_at(nb, ni, start, end, value)

    def insert_without_merging(self, start: int, end: int, value: V) -> bool:
        """Like ``add`` but never merges with the neighbours.  O(log n + B)."""
        self._check_range(start, end)
        b, i = self._pos_of(start)
        if b >= 0 and self._ends[b][i] > start:
            return False
        nb, ni = self._next_pos(b, i)
        if nb < len(self._starts) and self._starts[nb][ni] < end:
            return False
        self._insert_at(nb, ni, start, end, value)
        return True

    def fill(self, start: int, end: int, value: V) -> int:
        """Map every unmapped key of ``[start, end)`` to ``value``, leaving
        existing segments alone, merging as the policy allows.  Returns the
        number of keys added.  O(log n + k log n)."""
        self._check_range(start, end)
        added = 0
        for gs, ge in list(self.gaps(start, end)):
            self.add(gs, ge, value)
            added += ge - gs
        return added

    def remove(self, start: int) -> V:
        """Remove the segment that starts exactly at ``start`` and return its
        value.  Raises ``KeyError`` if no segment starts there.  O(log n + B)."""
        b, i = self._pos_of(start)
        if b < 0 or self._starts[b][i] != start:
            raise KeyError(start)
        v = self._vals[b][i]
        self._delete_at(b, i)
        return v

    def carve(self, start: int, end: int) -> V:
        """Unmap ``[start, end)``, which must lie inside a single segment
        (trimming it, or splitting it in two); return that segment's value.

        The fast path of ``remove_range`` for the allocator's common case.
        Raises ``KeyError`` (changing nothing) when no single segment holds
        the whole range.  O(log n + B).
        """
        if start >= end or start < self.min_key or end > self.max_key:
            self._check_range(start, end)
        b = bisect_right(self._firsts, start) - 1
        if b < 0:
            raise KeyError(start)
        i = bisect_right(self._starts[b], start) - 1
        if self._ends[b][i] < end:
            raise KeyError(start)
        return self._carve_at(b, i, start, end)

    def carve_if(self, start: int, end: int, pred: Callable[[V], bool]) -> V | None:
        """``carve(start, end)`` when a single segment holds the whole range
        and ``pred`` accepts its value: return that value.  Otherwise return
        None and change nothing.  One lookup where ``find`` then ``carve``
        take two (the allocator's ``dec_ref``: is this the last reference?).
        A range outside ``[min_key, max_key]`` is held by no segment: None.

        Raises ``ValueError`` for an empty or ill-formed range.  O(log n + B).
        """
        if start >= end:
            self._check_range(start, end)
        if start < self.min_key or end > self.max_key:
            return None
        b = bisect_right(self._firsts, start) - 1
        if b < 0:
            return None
        i = bisect_right(self._starts[b], start) - 1
        if self._ends[b][i] < end or not pred(self._vals[b][i]):
            return None
        return self._carve_at(b, i, start, end)

    def _carve_at(self, b: int, i: int, start: int, end: int) -> V:
        """Carve ``[start, end)`` out of the segment at (b, i), which holds it."""
        sb, eb = self._starts[b], self._ends[b]
        s, e = sb[i], eb[i]
        v = self._vals[b][i]
        if s == start:
            if e == end:
                self._delete_at(b, i)
                return v
            # Trim the front: the gap before the segment grows.
            sb[i] = end
            if i == 0:
                self._firsts[b] = end
            self._total -= end - start
            self._set_gap(b, i, self._gaps[b][i] + (end - start))
            return v
        # Trim the back; a middle cut re-inserts the tail.
        eb[i] = start
        self._total -= e - start
        if e == end:
            self._fix_gap_after(b, i)
        else:
            self._insert_at(*self._next_pos(b, i), end, e, v)
        return v

    def remove_range(self, start: int, end: int) -> list[Segment[V]]:
        """Unmap every key of ``[start, end)``: segments straddling a bound
        are split first.  Returns the removed pieces, clipped, in order.
        O(log n + k (B + log n))."""
        self._check_range(start, end)
        b, i = self._pos_of(start)
        if b >= 0 and self._ends[b][i] >= end:
            # Fast path: one segment holds the whole range.
            return [(start, end, self.carve(start, end))]
        self.isolate(start, end)
        removed = list(self.segments(start, end))
        for s, _, _ in removed:
            self.remove(s)
        return removed

    def clear(self) -> None:
        """Remove every segment.  O(1)."""
        for lists in (
            self._starts,
            self._ends,
            self._vals,
            self._gaps,
            self._caps,
            self._firsts,
            self._bmax,
        ):
            lists.clear()
        self._tree = None
        self._len = 0
        self._total = 0

    def split_at(self, key: int) -> bool:
        """Split the segment containing ``key`` into ``[start, key)`` and
        ``[key, end)`` (same value).  Returns False when no segment strictly
        straddles ``key``.  O(log n + B)."""
        b, i = self._pos_of(key)
        if b < 0 or self._starts[b][i] == key or self._ends[b][i] <= key:
            return False
        self._split_pos(b, i, key)
        return True

    def isolate(self, start: int, end: int) -> None:
        """Split segments at ``start`` and ``end`` so that no segment
        straddles either bound.  O(log n + B)."""
        self.split_at(start)
        self.split_at(end)

    def set_value(self, start: int, value: V) -> None:
        """Replace the value of the segment that starts at ``start`` (no
        merging).  Raises ``KeyError`` if none starts there.  O(log n)."""
        b, i = self._pos_of(start)
        if b < 0 or self._starts[b][i] != start:
            raise KeyError(start)
        self._vals[b][i] = value

    def apply_contiguous(
        self, start: int, end: int, fn: Callable[[int, int, V], V]
    ) -> tuple[int, int] | None:
        """Isolate ``[start, end)`` and replace each segment's value in it by
        ``fn(seg_start, seg_end, value)``, in order, stopping at the first gap.

        Returns that gap (clipped to the range) or None when the range was
        fully covered.  Segments before the gap have been changed (as in the
        reference); callers that must not half-apply check coverage first.
        No merging.  O(log n + k (B + log n)).
        """
        self._check_range(start, end)
        self.isolate(start, end)
        b, i = self._pos_of(start)
        cur = start
        if b < 0 or self._ends[b][i] <= start:
            b, i = self._next_pos(b, i)
        while cur < end:
            if b >= len(self._starts):
                return cur, end
            s = self._starts[b][i]
            if s > cur:
                return cur, min(s, end)
            e = self._ends[b][i]
            self._vals[b][i] = fn(s, e, self._vals[b][i])
            cur = e
            b, i = self._next_pos(b, i)
        return None

    def merge_adjacent(self, start: int, end: int) -> None:
        """Merge the segment holding ``start`` with its predecessor and the
        one holding ``end - 1`` with its successor, where the policy allows
        (the reference's MergeAdjacent, used after isolate + update).
        O(log n + B)."""
        if end > start:
            seg = self.find(end - 1)
            if seg is not None:
                b, i = self._pos_of(seg[0])
                self._try_merge_next(b, i)
        seg = self.find(start)
        if seg is not None:
            prev = self.prev_segment(seg[0])
            if prev is not None and prev[1] == seg[0]:
                pb, pi = self._pos_of(prev[0])
                self._try_merge_next(pb, pi)

    def merge_range(self, start: int, end: int) -> None:
        """Merge every pair of touching, mergeable segments that overlap
        ``[start, end)``.  O(log n + k (B + log n))."""
        seg = self.lower_bound(start)
        while seg is not None and seg[0] < end:
            b, i = self._pos_of(seg[0])
            merged = self._try_merge_next(b, i)
            # After a merge the same segment may merge again with its new
            # neighbour; otherwise move on.
            seg = self.find(seg[0]) if merged else self.next_segment(seg[0])

    def is_maximally_merged(self) -> bool:
        """Whether no two touching neighbours could be merged.  O(n)."""
        prev: Segment[V] | None = None
        for seg in self:
            if prev is not None and prev[1] == seg[0] and self._can_merge(prev[2], seg[2]):
                return False
            prev = seg
        return True

    # ---------------------------------------------------------------- positions
    # A position is (block, index).  (-1, -1) stands for "before the first
    # segment".  All of these helpers are O(log n) or O(1).

    def _pos_of(self, key: int) -> tuple[int, int]:
        """Position of the last segment whose start is <= key, or (-1, -1)."""
        b = bisect_right(self._firsts, key) - 1
        if b < 0:
            return -1, -1
        return b, bisect_right(self._starts[b], key) - 1

    def _next_pos(self, b: int, i: int) -> tuple[int, int]:
        """The position after (b, i); (len(blocks), 0) past the end."""
        if b < 0:
            return 0, 0
        if i + 1 < len(self._starts[b]):
            return b, i + 1
        return b + 1, 0

    def _seg(self, b: int, i: int) -> Segment[V]:
        return self._starts[b][i], self._ends[b][i], self._vals[b][i]

    # --------------------------------------------------------------- gap index

    def _build_tree(self) -> list[int]:
        nb = len(self._bmax)
        size = 1
        while size < nb:
            size <<= 1
        tree = [0] * (2 * size)
        tree[size : size + nb] = self._bmax
        # One level at a time, each with C-level map(max) over its children:
        # about 50 ns a node, so a rebuild after a block split stays cheap.
        lo = size
        while lo > 1:
            hi, lo = lo, lo >> 1
            tree[lo:hi] = map(max, tree[2 * lo : 2 * hi : 2], tree[2 * lo + 1 : 2 * hi : 2])
        self._tree = tree
        self._tsize = size
        return tree

    def _find_block(self, b0: int, need: int) -> int:
        """The first block index >= b0 whose largest gap is >= need, or -1.

        O(log blocks) (plus an amortised rebuild when stale)."""
        nb = len(self._bmax)
        if b0 >= nb:
            return -1
        tree = self._tree if self._tree is not None else self._build_tree()
        size = self._tsize
        j = b0 + size
        if tree[j] < need:
            # Climb until a right sibling holds a big enough gap.
            while True:
                if j & 1 == 0 and tree[j + 1] >= need:
                    j += 1
                    break
                j >>= 1
                if j <= 1:
                    return -1
            # Descend to the leftmost leaf that is big enough.
            while j < size:
                j <<= 1
                if tree[j] < need:
                    j += 1
        b = j - size
        return b if b < nb else -1

    def _tree_set(self, b: int, value: int) -> None:
        """Raise leaf b to ``value`` (a new largest gap), fixing ancestors."""
        tree = self._tree
        if tree is None:
            return
        j = b + self._tsize
        while j and tree[j] < value:
            tree[j] = value
            j >>= 1

    def _tree_lower(self, b: int, value: int) -> None:
        """Set leaf b to a smaller value, fixing its ancestors."""
        tree = self._tree
        if tree is None:
            return
        j = b + self._tsize
        tree[j] = value
        j >>= 1
        while j:
            left, right = tree[2 * j], tree[2 * j + 1]
            m = left if left >= right else right
            if tree[j] == m:
                break
            tree[j] = m
            j >>= 1

    # ------------------------------------------------------ low-level mutation
    # Each primitive leaves every invariant true.

    def _cap(self, g: int) -> int:
        """The byte-map entry for a gap of ``g``: whole granules, at most 255."""
        c = g >> self._shift
        return c if c < 255 else 255

    def _set_gap(self, b: int, i: int, g: int) -> None:
        gb = self._gaps[b]
        old = gb[i]
        gb[i] = g
        c = g >> self._shift
        self._caps[b][i] = c if c < 255 else 255
        if g > self._bmax[b]:
            self._bmax[b] = g
            self._tree_set(b, g)
        elif g < old:
            self._gap_shrank(b, old)

    def _gap_shrank(self, b: int, old: int) -> None:
        """A gap of block b that was ``old`` got smaller (or left the block):
        recompute the block's largest gap if ``old`` was it.  O(B) at C speed
        (``max`` over the list, about 10 ns an item) when it was, else O(1)."""
        if old >= self._bmax[b]:
            m = max(self._gaps[b])
            if m < old:
                self._bmax[b] = m
                self._tree_lower(b, m)

    def _fix_gap_after(self, b: int, i: int) -> None:
        """Recompute the gap before the segment after position (b, i)."""
        nb, ni = self._next_pos(b, i)
        if nb < len(self._starts):
            prev = self._ends[b][i] if b >= 0 else self.min_key
            self._set_gap(nb, ni, self._starts[nb][ni] - prev)

    def _insert_at(self, b: int, i: int, s: int, e: int, v: V) -> None:
        """Insert segment [s, e) at position (b, i); the caller has checked
        that it fits between its neighbours.  Fixes both gaps."""
        starts = self._starts
        if not starts:
            starts.append([s])
            self._ends.append([e])
            self._vals.append([v])
            g0 = s - self.min_key
            self._gaps.append([g0])
            self._caps.append(bytearray((self._cap(g0),)))
            self._firsts.append(s)
            self._bmax.append(g0)
            self._tree = None
        else:
            if b == len(starts):  # append after the last block
                b -= 1
                i = len(starts[b])
            sb = starts[b]
            eb = self._ends[b]
            gb = self._gaps[b]
            cb = self._caps[b]
            # The previous end, inline here and in _delete_at: a helper call
            # made the release benchmark 5-8% slower.
            if i:
                prev = eb[i - 1]
            elif b:
                prev = self._ends[b - 1][-1]
            else:
                prev = self.min_key
            g = s - prev
            sb.insert(i, s)
            eb.insert(i, e)
            self._vals[b].insert(i, v)
            gb.insert(i, g)
            cb.insert(i, self._cap(g))
            if i == 0:
                self._firsts[b] = s
            if g > self._bmax[b]:
                self._bmax[b] = g
                self._tree_set(b, g)
            # The follower's gap shrinks: it may have been its block's largest.
            # The follower is in this block, if any: the position past a
            # block's end is the next block's first, (b + 1, 0), so only an
            # append after the very last segment has no follower.
            n = len(sb)
            if i + 1 < n:
                old = gb[i + 1]
                gb[i + 1] = g = sb[i + 1] - e
                cb[i + 1] = self._cap(g)
                self._gap_shrank(b, old)
            if n > 2 * _LOAD:
                self._split_block(b)
        self._len += 1
        self._total += e - s

    def _split_block(self, b: int) -> None:
        half = len(self._starts[b]) >> 1
        for ints in (self._starts, self._ends, self._gaps):
            ints.insert(b + 1, ints[b][half:])
            del ints[b][half:]
        caps = self._caps
        caps.insert(b + 1, caps[b][half:])
        del caps[b][half:]
        self._vals.insert(b + 1, self._vals[b][half:])
        del self._vals[b][half:]
        self._firsts.insert(b + 1, self._starts[b + 1][0])
        self._bmax[b] = max(self._gaps[b])
        self._bmax.insert(b + 1, max(self._gaps[b + 1]))
        self._tree = None

    def _delete_at(self, b: int, i: int) -> None:
        """Remove the segment at (b, i) and fix the gap after it."""
        starts = self._starts
        sb = starts[b]
        eb = self._ends[b]
        s = sb[i]
        e = eb[i]
        if i:
            prev = eb[i - 1]
        elif b:
            prev = self._ends[b - 1][-1]
        else:
            prev = self.min_key
        del sb[i]
        del eb[i]
        del self._vals[b][i]
        gone = self._gaps[b].pop(i)
        del self._caps[b][i]
        self._len -= 1
        self._total -= e - s
        if not sb:
            for lists in (self._starts, self._ends, self._vals, self._gaps, self._caps):
                del lists[b]
            del self._firsts[b]
            del self._bmax[b]
            self._tree = None
            # The segment that followed now starts block b.
            if b < len(self._starts):
                self._set_gap(b, 0, self._starts[b][0] - prev)
            return
        if i == 0:
            self._firsts[b] = sb[0]
        # The follower (same block at index i, or the next block's first):
        # its gap grows, which may raise its block's bound.
        n = len(sb)
        if i < n:
            g = sb[i] - prev
            self._gaps[b][i] = g
            self._caps[b][i] = self._cap(g)
            if g > self._bmax[b]:
                self._bmax[b] = g
                self._tree_set(b, g)
        else:
            # The gap before the removed segment leaves this block: it joins
            # the next block's first gap, or the unstored gap at the end.
            self._gap_shrank(b, gone)
            if b + 1 < len(starts):
                self._set_gap(b + 1, 0, starts[b + 1][0] - prev)
        if n < _LOAD // 2 and len(starts) > 1:
            self._join_block(b)

    def _join_block(self, b: int) -> None:
        """Merge block b into a neighbour (then re-split if too big)."""
        if b == len(self._starts) - 1:
            b -= 1
        for ints in (self._starts, self._ends, self._gaps):
            ints[b].extend(ints[b + 1])
            del ints[b + 1]
        self._caps[b].extend(self._caps[b + 1])
        del self._caps[b + 1]
        self._vals[b].extend(self._vals[b + 1])
        del self._vals[b + 1]
        del self._firsts[b + 1]
        self._bmax[b] = max(self._bmax[b], self._bmax[b + 1])
        del self._bmax[b + 1]
        self._tree = None
        if len(self._starts[b]) > 2 * _LOAD:
            self._split_block(b)

    def _split_pos(self, b: int, i: int, key: int) -> None:
        """Split the segment at (b, i) at key (start < key < end)."""
        e = self._ends[b][i]
        self._ends[b][i] = key
        v = self._vals[b][i]
        # Insert the right half right after; its gap is 0.
        self._starts[b].insert(i + 1, key)
        self._ends[b].insert(i + 1, e)
        self._vals[b].insert(i + 1, v)
        self._gaps[b].insert(i + 1, 0)
        self._caps[b].insert(i + 1, 0)
        self._len += 1
        if len(self._starts[b]) > 2 * _LOAD:
            self._split_block(b)

    def _can_merge(self, left: V, right: V) -> bool:
        m = self._mergeable
        return left == right if m is None else m(left, right)

    def _try_merge_next(self, b: int, i: int) -> bool:
        """Merge the segment at (b, i) with the next one if they touch and the
        policy allows.  Returns whether it merged."""
        nb, ni = self._next_pos(b, i)
        if nb >= len(self._starts):
            return False
        e = self._ends[b][i]
        if self._starts[nb][ni] != e or not self._can_merge(self._vals[b][i], self._vals[nb][ni]):
            return False
        new_end = self._ends[nb][ni]
        # Extend first, so that deleting the right one recomputes its
        # follower's gap from new_end: that gap ends up unchanged, and no
        # block bound is raised on the way.
        self._ends[b][i] = new_end
        self._total += new_end - e
        self._delete_at(nb, ni)
        return True

    def _check_range(self, start: int, end: int) -> None:
        if start >= end:
            raise ValueError(f"empty or ill-formed range [{start:#x}, {end:#x})")
        if start < self.min_key or end > self.max_key:
            raise ValueError(
                f"range [{start:#x}, {end:#x}) outside [{self.min_key:#x}, {self.max_key:#x}]"
            )

    # --------------------------------------------------------------- checking

    def check(self) -> None:
        """Verify every invariant in the module notes; raise AssertionError
        naming the first one broken.  O(n)."""
        starts, ends, vals, gaps = self._starts, self._ends, self._vals, self._gaps
        nb = len(starts)
        assert len(ends) == len(vals) == len(gaps) == len(self._firsts) == len(self._bmax) == nb
        assert len(self._caps) == nb
        prev = self.min_key
        count = total = 0
        for b in range(nb):
            n = len(starts[b])
            assert n > 0, f"block {b} is empty"
            assert n <= 2 * _LOAD, f"block {b} has {n} segments"
            assert nb == 1 or n >= _LOAD // 2, f"block {b} has {n} segments, of {nb} blocks"
            assert len(ends[b]) == len(vals[b]) == len(gaps[b]) == n, f"block {b} lists differ"
            assert self._firsts[b] == starts[b][0], f"firsts[{b}] stale"
            for i in range(n):
                s, e = starts[b][i], ends[b][i]
                assert s < e, f"segment [{s:#x}, {e:#x}) empty or ill-formed"
                assert s >= prev, f"segment [{s:#x}, {e:#x}) overlaps or is out of order"
                assert e <= self.max_key, f"segment [{s:#x}, {e:#x}) past max_key"
                assert gaps[b][i] == s - prev, f"gap before [{s:#x}, {e:#x}) is stale"
                prev = e
                count += 1
                total += e - s
            assert self._bmax[b] == max(gaps[b]), f"largest gap of block {b} stale"
            want = bytearray(self._cap(g) for g in gaps[b])
            assert self._caps[b] == want, f"byte map of block {b} stale"
        assert count == self._len, f"len {self._len} != {count}"
        assert total == self._total, f"total_length {self._total} != {total}"
        tree = self._tree
        if tree is not None:
            size = self._tsize
            assert size >= nb and len(tree) == 2 * size
            for b in range(size):
                assert tree[size + b] == (self._bmax[b] if b < nb else 0), f"tree leaf {b} stale"
            for j in range(size - 1, 0, -1):
                assert tree[j] == max(tree[2 * j], tree[2 * j + 1]), f"tree node {j} stale"
