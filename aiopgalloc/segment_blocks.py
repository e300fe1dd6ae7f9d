"""The storage under ``SegmentSet``: sorted blocks of segments, their gaps,
and the index of each block's largest gap.

``BlockedSegments`` keeps the layout and the invariants below with a small
set of position-based primitives (insert or delete at a position, split a
segment, merge a segment into the next).  ``SegmentSet``
(``aiopgalloc.segments``) builds the public operations on them: lookups,
first fit, add/carve/remove and the merge operations.  Every primitive here
leaves the invariants true; ``check()`` verifies them.

Layout
------
Segments are kept sorted by start in *blocks*: each block is four parallel
Python lists (starts, ends, values, and the gap before each segment), holding
between ``_LOAD // 2`` and ``2 * _LOAD`` segments (the last block may hold
fewer).  This is sortedcontainers' layout (a list of short lists, located by
bisecting a list of each block's first key), without its positional index,
which pgalloc never needs.  Measured on these machines, plain short lists
beat a balanced tree written in Python by several times: ``list.insert`` on
a few hundred items is one ``memmove``.

The gap index
-------------
``gaps[b][i]`` is the size of the gap just before segment ``i`` of block
``b`` (for the very first segment, the gap from ``min_key``).  Each block
records the largest gap before any of its segments (``_bmax``),
and a max-segment-tree over the blocks (``_tree``) records the largest value
under every node.  First fit walks: the gap holding ``key``; then the rest of that
block; then the tree finds the first later block whose largest gap is big
enough (O(log blocks)); then that block is scanned for the first gap big
enough.  The gap after the last segment (up to ``max_key``) is never stored:
it is derived.

Beside each block's gaps sits a *byte map* (``_caps[b]``, a bytearray): the
gap in whole granules (``granularity``, a power of two: the allocator uses
the page size), capped at 255.  First fit looks for its candidates in it
with a compiled regular expression (a character class ``[k-\\xff]``), which
walks the bytes in C, instead of comparing Python ints one by one (each a
pointer to chase); the exact gap then decides.  Measured on a churned usage
map: 1.74 us a first fit against 2.50 us for the loop over the ints.

When a block is split or dropped the tree is marked stale and rebuilt on the
next first-fit call, in O(blocks); a block changes only once per ``_LOAD``
insertions or deletions, so this is amortised O(1) per operation.

Invariants (``check()`` verifies every one)
-----------------------------------------
1. Every segment is well formed and non-empty; ``min_key <= start`` and
   ``end <= max_key``.
2. Segments are sorted and disjoint: each start is >= the previous end.
3. ``gaps`` holds exactly ``start - previous end`` (``start - min_key`` for
   the first segment).
4. No block is empty; every block but the last holds at least one segment;
   ``_firsts[b]`` is the first start of block ``b``; no block exceeds
   ``2 * _LOAD`` segments.
5. ``_bmax[b] == max(gaps[b])``, exactly: raised at once when a gap grows;
   when the block's largest gap shrinks or leaves the block, recomputed with
   one C-level ``max`` over the block (about 3 us for 256 gaps here; only
   when the gap that changed was the largest).  An upper bound would do for
   correctness, and an earlier version kept one, tightened lazily by first
   fit; but in allocation churn the gap an allocation lands in is often its
   block's largest, so most blocks went stale and first fit walked about
   145 gaps a call in Python instead of 67 (benchmark workload 1).  The
   tree (when not stale) holds the maximum of its children at every node.
6. ``len(self)`` and ``total_length`` match a recount.
7. ``_caps[b][i] == min(gaps[b][i] >> log2(granularity), 255)``.

Thread safety: none.  The owner serialises access.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["BlockedSegments", "Segment"]

V = TypeVar("V")

Segment = tuple[int, int, V]  # (start, end, value)

_LOAD = 128
"""Target block size.  Blocks split at 2 * _LOAD and are joined with a
neighbour when they fall under _LOAD // 2 (measured: the first-fit scan and
list.insert both stay cheap at this size; see benchmarks/bench_segments.py)."""


class BlockedSegments(Generic[V]):
    """Segments sorted in blocks, with the gap before each and the largest
    gap of each block indexed by a max tree (see the module notes).

    Not used directly: ``SegmentSet`` is the public structure.
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

    def _prev_end(self, b: int, i: int) -> int:
        """The end of the segment before position (b, i), or min_key."""
        if i > 0:
            return self._ends[b][i - 1]
        if b > 0:
            return self._ends[b - 1][-1]
        return self.min_key

    def _seg(self, b: int, i: int) -> Segment[V]:
        return self._starts[b][i], self._ends[b][i], self._vals[b][i]

    # ------------------------------------------------------------- gap index

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
            nblocks = len(starts)
            if b == nblocks:  # append after the last block
                b -= 1
                i = len(starts[b])
            sb = starts[b]
            eb = self._ends[b]
            gb = self._gaps[b]
            cb = self._caps[b]
            # _prev_end, inlined here and in _delete_at: the call alone made
            # the release benchmark 5-8% slower.
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
            n = len(sb)
            if i + 1 < n:
                old = gb[i + 1]
                gb[i + 1] = g = sb[i + 1] - e
                cb[i + 1] = self._cap(g)
                self._gap_shrank(b, old)
            elif b + 1 < nblocks:
                gn = self._gaps[b + 1]
                old = gn[0]
                gn[0] = g = starts[b + 1][0] - e
                self._caps[b + 1][0] = self._cap(g)
                self._gap_shrank(b + 1, old)
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
