"""SegmentSet: a map of disjoint half-open ranges to values, with a gap index.

This is the Python counterpart of the segment sets gVisor generates for its
page allocator, shaped for what the allocator asks of it most: *first fit*
(the lowest-address gap that holds N bytes at a given alignment), inserting a
range into a gap, and splitting and re-merging segments as reference counts
change.

Cost (n = segments, B = the block size, ``segment_blocks._LOAD``): locating
a key is two bisections, O(log n); inserting or removing a segment is O(B)
memmove plus O(log n) tree work when a block's largest gap changes; first
fit is O(log n + B) for alignments no larger than the gaps' granularity.
With a coarser alignment a gap can be long enough yet fail to hold an
aligned range; each such gap between ``key`` and the answer costs one more
step, so the worst case grows with the number of those gaps (the allocator
only asks for huge-page alignment for huge-page-sized requests, where such
misfits are rare).

Values are treated as immutable: splitting a segment gives both halves the
same value object, and merging keeps the left value.  Whether two adjacent
segments may merge is the *merge policy*'s decision: equality by default.
None of the mutating operations merge unless their documentation says so.

Thread safety: none.  The owner (``MemoryFile``) serialises access with its
own lock.

The storage (blocks, the gap index, their invariants and ``check()``) is
``aiopgalloc.segment_blocks``; this module holds the operations.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from collections.abc import Callable, Iterator
from typing import TypeVar

from .segment_blocks import BlockedSegments, Segment

__all__ = ["SegmentSet"]

V = TypeVar("V")

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


class SegmentSet(BlockedSegments[V]):
    """A sorted map from disjoint half-open ranges ``[start, end)`` to values.

    ``mergeable(left, right)`` decides whether two adjacent segments may be
    merged (default: ``left == right``); the merged segment keeps ``left``.
    Keys are ints in ``[min_key, max_key]``.
    """

    __slots__ = ()

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

    def __str__(self) -> str:
        """One line per segment, ``[start, end) value``, in hex."""
        if self._len == 0:
            return "(empty)"
        return "\n".join(f"[{s:#x}, {e:#x}) {v!r}" for s, e, v in self)

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

    def upper_bound(self, key: int) -> Segment[V] | None:
        """The last segment whose start is <= ``key``, or None.  O(log n)."""
        b, i = self._pos_of(key)
        return None if b < 0 else self._seg(b, i)

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

    def find_gap(self, key: int) -> tuple[int, int] | None:
        """The gap ``(start, end)`` containing ``key``, or None if a segment
        holds it.  O(log n)."""
        b, i = self._pos_of(key)
        if b >= 0 and self._ends[b][i] > key:
            return None
        gs = self.min_key if b < 0 else self._ends[b][i]
        nb, ni = self._next_pos(b, i)
        ge = self._starts[nb][ni] if nb < len(self._starts) else self.max_key
        return gs, ge

    def next_gap(self, key: int) -> tuple[int, int] | None:
        """The gap containing ``key``, or else the first non-empty gap after
        it, unclipped; None when no gap is left before ``max_key``.
        O(log n + k), k = touching segments skipped."""
        g = next(self.gaps(key, self.max_key), None)
        return None if g is None else self.find_gap(g[0])

    def gaps(self, start: int | None = None, end: int | None = None) -> Iterator[tuple[int, int]]:
        """The non-empty gaps within ``[start, end)``, clipped, in order.

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

    def first_gap_in(self, start: int, end: int) -> tuple[int, int] | None:
        """The first gap within ``[start, end)`` (clipped), or None when
        segments cover the whole range.  O(log n + k), k = segments in range."""
        return next(self.gaps(start, end), None)

    def is_covered(self, start: int, end: int) -> bool:
        """Whether segments cover every key of ``[start, end)``.  O(log n + k)."""
        return self.first_gap_in(start, end) is None

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
        reference); callers that must not half-apply check ``is_covered``
        first.  No merging.  O(log n + k (B + log n)).
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

    def merge_all(self) -> None:
        """Merge every pair of touching, mergeable segments.  O(n (B + log n))."""
        self.merge_range(self.min_key, self.max_key)

    def is_maximally_merged(self) -> bool:
        """Whether no two touching neighbours could be merged.  O(n)."""
        prev: Segment[V] | None = None
        for seg in self:
            if prev is not None and prev[1] == seg[0] and self._can_merge(prev[2], seg[2]):
                return False
            prev = seg
        return True
