"""Unit tests for ``aiopgalloc.segments.SegmentSet``.

Many tests run twice: with the real block size and with ``_LOAD`` patched
down to a handful of segments, so that block splits, joins and rebuilds of
the gap tree happen with few segments.  ``check()`` (every invariant of the
module notes) is called after every mutation.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest

from aiopgalloc import segments as segmod
from aiopgalloc.ranges import HUGE_PAGE_SIZE, PAGE_SIZE
from aiopgalloc.segments import SegmentSet

P = PAGE_SIZE
H = HUGE_PAGE_SIZE

Seg = tuple[int, int, object]


@pytest.fixture(params=[None, 2, 4], ids=["load-default", "load-2", "load-4"])
def load(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    """The block size in effect: the default, or patched small."""
    if request.param is not None:
        monkeypatch.setattr(segmod, "_LOAD", request.param)
    return int(segmod._LOAD)


@pytest.fixture
def small_load(monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(segmod, "_LOAD", 2)
    return 2


def build(
    segs: Sequence[tuple[int, int, Any]],
    mergeable: Callable[[Any, Any], bool] | None = None,
    **kw: int,
) -> SegmentSet[Any]:
    """A set holding exactly ``segs`` (inserted without merging)."""
    s: SegmentSet[Any] = SegmentSet(mergeable, **kw)
    for a, b, v in segs:
        assert s.insert_without_merging(a, b, v)
    s.check()
    assert list(s) == segs
    return s


def fragmented(n: int, unit: int = 1) -> SegmentSet[Any]:
    """Segment k = [2k*unit, (2k+1)*unit) -> k: n segments, every gap one unit."""
    return build([(2 * k * unit, (2 * k + 1) * unit, k) for k in range(n)])


def nblocks(s: SegmentSet[Any]) -> int:
    return len(s._starts)


def merge_all(s: SegmentSet[Any]) -> None:
    """Merge every touching, mergeable pair in the set."""
    s.merge_range(s.min_key, s.max_key)


# ------------------------------------------------------------------ basics


def test_empty_set() -> None:
    s: SegmentSet[int] = SegmentSet()
    assert len(s) == 0
    assert not s
    assert s.total_length == 0
    assert list(s) == []
    assert s.first() is None
    assert s.last() is None
    assert s.find(0) is None
    assert s.lower_bound(0) is None
    assert s.next_segment(0) is None
    assert s.prev_segment(10) is None
    assert list(s.gaps()) == [(0, 1 << 64)]
    assert list(s.gaps(0, 10)) == [(0, 10)]
    assert list(s.gaps(5, 5)) == []
    assert repr(s) == "<SegmentSet 0 segments, 0x0 bytes>"
    assert s.is_maximally_merged()
    assert s.largest_gap() == 0
    s.check()


def test_default_and_custom_key_bounds() -> None:
    s: SegmentSet[int] = SegmentSet()
    assert (s.min_key, s.max_key) == (0, 1 << 64)
    t: SegmentSet[int] = SegmentSet(min_key=10, max_key=100)
    assert (t.min_key, t.max_key) == (10, 100)
    u: SegmentSet[int] = SegmentSet(min_key=5, max_key=5)  # empty key space is allowed
    assert u.first_fit(1) is None
    with pytest.raises(ValueError, match="min_key must not exceed max_key"):
        SegmentSet(min_key=11, max_key=10)


def test_len_bool_total_iter_repr() -> None:
    s = build([(0x1000, 0x2000, "a"), (0x3000, 0x5000, "b")])
    assert len(s) == 2
    assert s
    assert s.total_length == 0x3000
    assert list(s) == [(0x1000, 0x2000, "a"), (0x3000, 0x5000, "b")]
    assert repr(s) == "<SegmentSet 2 segments, 0x3000 bytes>"


# ------------------------------------------------------------------ lookups

ABC = [(10, 20, "a"), (20, 30, "b"), (40, 50, "c")]


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        (0, None),
        (9, None),
        (10, (10, 20, "a")),
        (19, (10, 20, "a")),
        (20, (20, 30, "b")),
        (29, (20, 30, "b")),
        (30, None),
        (39, None),
        (40, (40, 50, "c")),
        (49, (40, 50, "c")),
        (50, None),
        (1000, None),
    ],
)
def test_find(key: int, expected: Seg | None) -> None:
    assert build(ABC).find(key) == expected


@pytest.mark.parametrize(
    ("key", "lower", "nxt", "prev"),
    [
        # lower_bound: first end > key; next_segment: first start > key;
        # prev_segment: last end <= key.
        (0, (10, 20, "a"), (10, 20, "a"), None),
        (10, (10, 20, "a"), (20, 30, "b"), None),
        (15, (10, 20, "a"), (20, 30, "b"), None),
        (20, (20, 30, "b"), (40, 50, "c"), (10, 20, "a")),
        (25, (20, 30, "b"), (40, 50, "c"), (10, 20, "a")),
        (30, (40, 50, "c"), (40, 50, "c"), (20, 30, "b")),
        (35, (40, 50, "c"), (40, 50, "c"), (20, 30, "b")),
        (40, (40, 50, "c"), None, (20, 30, "b")),
        (45, (40, 50, "c"), None, (20, 30, "b")),
        (50, None, None, (40, 50, "c")),
        (99, None, None, (40, 50, "c")),
    ],
)
def test_bounds_and_neighbours(
    key: int, lower: Seg | None, nxt: Seg | None, prev: Seg | None
) -> None:
    s = build(ABC)
    assert s.lower_bound(key) == lower
    assert s.next_segment(key) == nxt
    assert s.prev_segment(key) == prev


def test_first_and_last() -> None:
    s = build(ABC)
    assert s.first() == (10, 20, "a")
    assert s.last() == (40, 50, "c")
    one = build([(5, 6, 1)])
    assert one.first() == one.last() == (5, 6, 1)


def test_lookups_across_many_blocks(load: int) -> None:
    n = 300
    s = fragmented(n, unit=10)
    if load < 128:
        assert nblocks(s) > 10
    for k in range(n):
        lo, hi = 20 * k, 20 * k + 10
        seg = (lo, hi, k)
        assert s.find(lo) == seg
        assert s.find(hi - 1) == seg
        assert s.find(hi) is None
        assert s.lower_bound(hi) == (s.find(hi + 10) if k + 1 < n else None)
        assert s.prev_segment(hi) == seg
        assert s.prev_segment(lo) == ((lo - 20, lo - 10, k - 1) if k else None)
        assert s.next_segment(lo) == ((lo + 20, hi + 20, k + 1) if k + 1 < n else None)
        assert next(s.gaps(hi)) == (hi, hi + 10 if k + 1 < n else 1 << 64)
        assert list(s.gaps(lo, hi)) == []


def test_gaps_start_at_min_key() -> None:
    s = build([(20, 30, 1)], min_key=5, max_key=100)
    assert list(s.gaps()) == [(5, 20), (30, 100)]


def test_gaps() -> None:
    s = build(ABC, max_key=100)
    assert list(s.gaps()) == [(0, 10), (30, 40), (50, 100)]
    assert list(s.gaps(0, 100)) == [(0, 10), (30, 40), (50, 100)]
    # Clipped to the bounds given.
    assert list(s.gaps(5, 45)) == [(5, 10), (30, 40)]
    assert list(s.gaps(15, 35)) == [(30, 35)]
    assert list(s.gaps(10, 30)) == []
    assert list(s.gaps(33, 37)) == [(33, 37)]
    assert list(s.gaps(45, 60)) == [(50, 60)]
    assert list(s.gaps(20, 20)) == []
    assert list(s.gaps(start=35)) == [(35, 40), (50, 100)]
    assert list(s.gaps(end=12)) == [(0, 10)]


def test_segments_overlapping() -> None:
    s = build(ABC)
    assert list(s.segments(0, 100)) == ABC
    assert list(s.segments(15, 21)) == ABC[:2]  # unclipped
    assert list(s.segments(30, 40)) == []
    assert list(s.segments(29, 41)) == ABC[1:]
    assert list(s.segments(49, 50)) == ABC[2:]
    assert list(s.segments(50, 60)) == []
    assert list(s.segments(20, 20)) == []
    assert list(s.segments(25, 25)) == []  # empty, inside a segment
    assert list(s.segments(25, 15)) == []
    assert list(s.segments(25, 22)) == []  # ill-formed, ending inside it


def test_gaps_of_covered_and_uncovered_ranges() -> None:
    s = build(ABC)
    assert list(s.gaps(10, 30)) == []  # touching segments cover it
    assert list(s.gaps(12, 28)) == []
    assert list(s.gaps(10, 31)) == [(30, 31)]
    assert list(s.gaps(40, 50)) == []
    assert list(s.gaps(39, 50)) == [(39, 40)]
    assert list(s.gaps(25, 45)) == [(30, 40)]


def test_gap_queries_across_many_blocks(load: int) -> None:
    s = fragmented(200, unit=3)
    expected = [(6 * k + 3, 6 * k + 6) for k in range(199)] + [(6 * 199 + 3, 1 << 64)]
    assert list(s.gaps(3)) == expected
    assert list(s.gaps(1, 20)) == [(3, 6), (9, 12), (15, 18)]
    assert next(s.gaps(600, 700)) == (603, 606)
    assert list(s.gaps(0, 4)) == [(3, 4)]
    assert list(s.gaps(600, 603)) == []
    for k in range(0, 199, 7):
        assert next(s.gaps(6 * k)) == (6 * k + 3, 6 * k + 6)


def test_largest_gap(load: int) -> None:
    s = fragmented(300, unit=2)  # segment k = [4k, 4k + 2): every gap 2
    assert s.largest_gap() == 2
    assert s.remove(600) == 150  # the gap [598, 604)
    assert s.largest_gap() == 6
    assert s.add(600, 602, "back")
    assert s.largest_gap() == 2
    # The gap from min_key counts; the one after the last segment does not.
    assert build([(10, 20, 1)], max_key=1000).largest_gap() == 10


# ---------------------------------------------------------------- first fit


@pytest.mark.parametrize(
    ("used", "length", "alignment", "expected", "single_page"),
    [
        # The reference's findUnallocatedRange table: the answer
        # for (length, alignment), then for one page.
        ([], P, P, 0, 0),
        ([(P, 2 * P, 1)], P, P, 0, 0),
        ([(0, P, 1), (P, 2 * P, 1)], P, P, 2 * P, 2 * P),
        # refs 1, refs 0, refs 1: freed-but-unreleased pages are just another
        # segment here, so they are not allocatable either.
        ([(0, P, 1), (P, 2 * P, 0), (2 * P, 3 * P, 1)], P, P, 3 * P, 3 * P),
        ([(0, P, 1), (2 * P, 3 * P, 1)], P, P, P, P),
        ([(0, P, 1), (2 * P, 3 * P, 1)], 2 * P, P, 3 * P, P),
        ([(0, P, 1), (H + P, H + 2 * P, 1)], H, H, 2 * H, P),
    ],
    ids=["empty", "hole-at-0", "two-used", "freed-unreleased", "hole", "hole-too-small", "huge"],
)
def test_first_fit_reference_table(
    used: list[tuple[int, int, object]],
    length: int,
    alignment: int,
    expected: int,
    single_page: int,
) -> None:
    s = build(used)
    assert s.first_fit(length, 0, alignment) == expected
    assert s.first_fit(P, 0, P) == single_page
    # The same with the default key and, for page alignment, the default
    # alignment (every boundary is page-aligned already).
    assert s.first_fit(length, alignment=alignment) == expected
    if alignment == P:
        assert s.first_fit(length) == expected
    # The answer really is a free range.
    assert list(s.segments(expected, expected + length)) == []


def test_first_fit_basic() -> None:
    s = build([(0, 10, 1), (12, 20, 2), (25, 30, 3)], max_key=40)
    assert s.first_fit(1) == 10
    assert s.first_fit(2) == 10
    assert s.first_fit(3) == 20
    assert s.first_fit(5) == 20
    assert s.first_fit(6) == 30
    assert s.first_fit(10) == 30
    assert s.first_fit(11) is None  # would pass max_key
    assert s.first_fit(1, key=11) == 11
    assert s.first_fit(1, key=12) == 20
    assert s.first_fit(3, key=21) == 21
    assert s.first_fit(4, key=21) == 21
    assert s.first_fit(5, key=21) == 30
    assert s.first_fit(1, key=39) == 39
    assert s.first_fit(1, key=40) is None
    assert s.first_fit(1, key=10**9) is None


def test_first_fit_alignment() -> None:
    s = build([(0, 3, 1), (9, 17, 2), (21, 40, 3)], max_key=64)
    assert s.first_fit(4) == 3
    assert s.first_fit(4, alignment=4) == 4
    assert s.first_fit(5, alignment=4) == 4  # [4, 9) ends exactly at the next segment
    assert s.first_fit(6, alignment=4) == 40  # [4, 10) overlaps; 20 + 6 > 21
    assert s.first_fit(2, alignment=8) == 40
    assert s.first_fit(3, alignment=2) == 4
    assert s.first_fit(4, alignment=16) == 48
    assert s.first_fit(1, alignment=16) == 48
    assert s.first_fit(16, alignment=16) == 48
    assert s.first_fit(17, alignment=16) is None
    assert s.first_fit(1, key=5, alignment=4) == 8
    assert s.first_fit(2, key=5, alignment=4) == 40


def test_first_fit_key_below_min_key_is_clamped() -> None:
    s: SegmentSet[int] = SegmentSet(min_key=5, max_key=100)
    assert s.first_fit(1) == 5
    assert s.first_fit(1, key=0) == 5
    assert s.first_fit(1, key=0, alignment=8) == 8
    assert s.add(5, 10, 1)
    assert s.first_fit(1, key=0) == 10
    assert s.first_fit(90) == 10
    assert s.first_fit(91) is None


def test_first_fit_respects_max_key_in_every_path() -> None:
    s = build([(0, 10, 1), (20, 30, 2)], max_key=35)
    assert s.first_fit(5, key=31) is None  # gap after the last segment is too short
    assert s.first_fit(5, key=30) == 30
    assert s.first_fit(6, key=30) is None
    assert s.first_fit(10, key=0) == 10
    assert s.first_fit(11, key=0) is None
    e: SegmentSet[int] = SegmentSet(max_key=16)
    assert e.first_fit(16) == 0
    assert e.first_fit(17) is None
    assert e.first_fit(8, alignment=16) == 0
    assert e.first_fit(8, key=1, alignment=16) is None


@pytest.mark.parametrize("length", [0, -1])
def test_first_fit_rejects_bad_lengths(length: int) -> None:
    with pytest.raises(ValueError, match=f"length must be > 0, got {length}"):
        build(ABC).first_fit(length)


@pytest.mark.parametrize("alignment", [0, -4, 3, 6, 12])
def test_first_fit_rejects_bad_alignments(alignment: int) -> None:
    with pytest.raises(ValueError):
        build(ABC).first_fit(1, alignment=alignment)


def brute_first_fit(s: SegmentSet[Any], length: int, key: int, alignment: int) -> int | None:
    a = max(key, s.min_key)
    a = (a + alignment - 1) // alignment * alignment
    while a + length <= s.max_key:
        if not list(s.segments(a, a + length)):
            return a
        a += alignment
    return None


def test_first_fit_many_blocks_finds_the_one_big_gap(load: int) -> None:
    # Every gap is one unit except one, deep in the map: the tree must find
    # the block holding it.
    n = 400
    segs = [(2 * k, 2 * k + 1, k) for k in range(n)]
    s = build(segs)
    assert s.remove(500) == 250  # the gap [499, 502) is now 3 long
    s.check()
    last_end = 2 * n - 1
    assert s.first_fit(2) == 499
    assert s.first_fit(3) == 499
    assert s.first_fit(4) == last_end
    assert s.first_fit(2, alignment=2) == 500
    assert s.first_fit(3, alignment=2) == last_end + 1
    assert s.first_fit(2, key=500) == 500
    assert s.first_fit(2, key=501) == last_end
    assert s.first_fit(1, key=700) == 701
    for length in (1, 2, 3, 4, 5):
        for alignment in (1, 2, 4, 8):
            for key in (0, 1, 250, 499, 500, 501, 503, 700, 799, 800, 1000):
                assert s.first_fit(length, key, alignment) == brute_first_fit(
                    s, length, key, alignment
                ), (length, key, alignment)


def test_first_fit_from_every_key_at_every_block_count(small_load: int) -> None:
    # The tree over the blocks is a full binary tree only when the block
    # count is a power of two; first fit must walk it right either way.
    s: SegmentSet[Any] = SegmentSet()
    seen = set()
    for k in range(48):
        assert s.insert_without_merging(2 * k, 2 * k + 1, k)
        seen.add(nblocks(s))
        for key in range(0, 2 * k + 4, 3):
            assert s.first_fit(2, key) == (2 * k + 1 if key <= 2 * k + 1 else key)
            assert s.first_fit(1, key) == brute_first_fit(s, 1, key, 1)
    assert {1, 2, 4, 8}.issubset(seen)


def test_first_fit_tracks_gap_changes(load: int) -> None:
    # Open and close gaps in various blocks and check first fit (and the tree
    # that serves it) follows every change.
    n = 200
    s = fragmented(n, unit=4)  # segment k = [8k, 8k+4), gaps of 4
    assert s.first_fit(8) == 8 * n - 4
    opened: list[int] = []
    for k in (150, 30, 199, 0, 77):
        s.remove(8 * k)
        s.check()
        opened.append(k)
        low = min(opened)
        # The gap around removed segment k is [8k-4, 8k+8) (or [0, 8) for k=0).
        assert s.first_fit(8) == max(8 * low - 4, 0)
        for length in (1, 4, 5, 8, 9, 12, 13):
            for alignment in (1, 4, 8, 16):
                assert s.first_fit(length, 0, alignment) == brute_first_fit(
                    s, length, 0, alignment
                ), (length, alignment)
    for k in sorted(opened):
        assert s.add(8 * k, 8 * k + 4, ("back", k))
        s.check()
    assert s.first_fit(8) == 8 * n - 4
    assert s.first_fit(5) == 8 * n - 4
    assert s.first_fit(4) == 4


def test_first_fit_after_split_and_merge_of_blocks(small_load: int) -> None:
    s = fragmented(64, unit=2)
    blocks = nblocks(s)
    # Remove every other segment: blocks shrink and join; gaps grow to 6.
    for k in range(1, 64, 2):
        s.remove(4 * k)
        s.check()
    assert nblocks(s) <= blocks
    assert s.first_fit(6) == 2
    assert s.first_fit(7) == 4 * 62 + 2
    # Fill them back in with a different value: blocks split again.
    for k in range(1, 64, 2):
        assert s.add(4 * k, 4 * k + 2, "x")
        s.check()
    assert s.first_fit(3) == 4 * 63 + 2
    assert s.first_fit(2) == 2


def test_first_fit_block_bounds_stay_exact(small_load: int) -> None:
    # Each block's largest gap is kept exact: open a big gap, build the tree,
    # close the gap again: the bound drops at once, with no first fit between.
    s = fragmented(60, unit=2)  # segment k = [4k, 4k+2)
    assert s.first_fit(3) == 4 * 59 + 2  # builds the tree
    assert s.remove(4 * 20) == 20
    s.check()
    assert s.first_fit(6) == 4 * 20 - 2
    assert s.add(4 * 20, 4 * 20 + 2, "back")
    assert s._bmax == [max(g) for g in s._gaps]
    s.check()
    for _ in range(2):
        assert s.first_fit(6) == 4 * 59 + 2
        assert s.first_fit(3) == 4 * 59 + 2
        assert s.first_fit(2) == 2
        s.check()


@pytest.mark.parametrize("granularity", [0, -4, 3, 6])
def test_granularity_must_be_a_power_of_two(granularity: int) -> None:
    with pytest.raises(ValueError, match="granularity"):
        SegmentSet(granularity=granularity)


@pytest.mark.parametrize("granularity", [1, 4, 4096])
def test_first_fit_byte_map_matches_brute_force(small_load: int, granularity: int) -> None:
    # Gaps of every size around the byte map's cap (255 granules) and around
    # granule boundaries (gaps not a whole number of granules): the byte map
    # only proposes candidates, the exact gap decides.
    rng = random.Random(granularity)
    u = granularity
    s: SegmentSet[Any] = SegmentSet(granularity=u)
    cur = 0
    for k in range(120):
        gap = rng.choice([0, 1, u - 1, u, u + 1, 254 * u, 255 * u - 1, 255 * u, 256 * u + 3])
        length = rng.choice([1, u, 3 * u])
        cur += max(gap, 0)
        assert s.insert_without_merging(cur, cur + length, k)
        cur += length
    s.check()
    lengths = [1, u - 1 or 1, u, u + 1, 2 * u, 254 * u, 255 * u, 255 * u + 1, 256 * u, 300 * u]
    for length in lengths:
        for key in (0, cur // 3, cur // 2):
            for alignment in (1, u):
                want = brute_first_fit_gaps(s, length, key, alignment)
                assert s.first_fit(length, key, alignment) == want, (length, key, alignment)


def brute_first_fit_gaps(s: SegmentSet[Any], length: int, key: int, alignment: int) -> int | None:
    """First fit by walking the gaps (fast enough for big keys)."""
    for gs, ge in s.gaps(key, s.max_key):
        a = (gs + alignment - 1) // alignment * alignment
        if a + length <= ge:
            return a
    return None


# --------------------------------------------------------------------- add


def test_add_into_empty_and_between() -> None:
    s: SegmentSet[str] = SegmentSet()
    assert s.add(10, 20, "a")
    assert s.add(30, 40, "b")
    assert s.add(0, 5, "c")
    assert s.add(22, 25, "d")
    s.check()
    assert list(s) == [(0, 5, "c"), (10, 20, "a"), (22, 25, "d"), (30, 40, "b")]
    assert s.total_length == 5 + 10 + 3 + 10


def test_add_merges_with_previous() -> None:
    s = build([(0, 10, "a")])
    assert s.add(10, 20, "a")
    s.check()
    assert list(s) == [(0, 20, "a")]
    assert s.total_length == 20


def test_add_merges_with_next() -> None:
    s = build([(10, 20, "a")])
    assert s.add(5, 10, "a")
    s.check()
    assert list(s) == [(5, 20, "a")]


def test_add_merges_with_both() -> None:
    s = build([(0, 10, "a"), (20, 30, "a"), (40, 50, "a")])
    assert s.add(10, 20, "a")
    s.check()
    assert list(s) == [(0, 30, "a"), (40, 50, "a")]
    assert len(s) == 2
    assert s.total_length == 40


def test_add_does_not_merge_different_values() -> None:
    s = build([(0, 10, "a"), (20, 30, "b")])
    assert s.add(10, 20, "c")
    s.check()
    assert list(s) == [(0, 10, "a"), (10, 20, "c"), (20, 30, "b")]
    # Merges with the one neighbour that matches only.
    assert s.add(30, 35, "b")
    assert s.add(40, 45, "b")  # does not touch: a new segment
    s.check()
    assert list(s) == [(0, 10, "a"), (10, 20, "c"), (20, 35, "b"), (40, 45, "b")]


def test_add_does_not_merge_across_a_gap() -> None:
    s = build([(0, 10, "a")])
    assert s.add(11, 20, "a")
    assert list(s) == [(0, 10, "a"), (11, 20, "a")]


@pytest.mark.parametrize(
    ("start", "end"),
    [
        (10, 20),  # exact
        (5, 11),  # overlaps the start
        (19, 25),  # overlaps the end
        (12, 15),  # inside
        (0, 100),  # covers
        (25, 45),  # spans a gap into the next
        (29, 41),
    ],
)
def test_add_refuses_overlap_and_changes_nothing(start: int, end: int) -> None:
    s = build([(10, 20, "a"), (40, 50, "b")])
    before = list(s)
    assert not s.add(start, end, "a")
    assert not s.insert_without_merging(start, end, "a")
    s.check()
    assert list(s) == before
    assert s.total_length == 20


@pytest.mark.parametrize(
    ("start", "end"),
    [(10, 10), (10, 9), (-1, 5), (95, 101), (100, 101), (-5, -1)],
)
def test_add_rejects_empty_or_out_of_bounds_ranges(start: int, end: int) -> None:
    s = build([(10, 20, "a")], max_key=100)
    for op in (s.add, s.insert_without_merging, s.fill):
        with pytest.raises(ValueError):
            op(start, end, "a")
    s.check()
    assert list(s) == [(10, 20, "a")]


def test_range_errors_say_what_is_wrong() -> None:
    s: SegmentSet[int] = SegmentSet(min_key=0x10, max_key=0x100)
    with pytest.raises(ValueError, match=r"empty or ill-formed range \[0x20, 0x20\)"):
        s.add(0x20, 0x20, 1)
    with pytest.raises(ValueError, match=r"range \[0xf0, 0x110\) outside \[0x10, 0x100\]"):
        s.insert_without_merging(0xF0, 0x110, 1)


def test_add_at_the_key_bounds() -> None:
    s: SegmentSet[int] = SegmentSet(min_key=10, max_key=20)
    assert s.add(10, 12, 1)
    assert s.add(18, 20, 1)
    assert s.add(12, 18, 1)
    s.check()
    assert list(s) == [(10, 20, 1)]
    assert s.first_fit(1) is None
    assert list(s.gaps()) == []


def test_many_adds_merge_into_one(load: int) -> None:
    # Insert every even unit, then every odd: each odd add merges three
    # segments into one; blocks join as they empty.
    s: SegmentSet[str] = SegmentSet()
    for k in range(0, 200, 2):
        assert s.add(k, k + 1, "v")
    s.check()
    assert len(s) == 100
    for k in range(1, 200, 2):
        assert s.add(k, k + 1, "v")
        s.check()
        # Each add joins both neighbours, except the last (no right neighbour).
        assert len(s) == 100 - min((k + 1) // 2, 99)
    assert list(s) == [(0, 200, "v")]
    assert nblocks(s) == 1


def test_many_adds_in_reverse_and_random_order(load: int) -> None:
    rng = random.Random(1234)
    keys = list(range(300))
    rng.shuffle(keys)
    s: SegmentSet[int] = SegmentSet()
    for k in keys:
        assert s.add(3 * k, 3 * k + 2, k % 3)
    s.check()
    assert list(s) == [(3 * k, 3 * k + 2, k % 3) for k in range(300)]
    for k in keys[:150]:
        assert s.add(3 * k + 2, 3 * k + 3, -1)
        s.check()
    assert s.total_length == 300 * 2 + 150


# ----------------------------------------------------- insert_without_merging


def test_insert_without_merging_keeps_segments_apart() -> None:
    s = build([(0, 10, "a"), (20, 30, "a")])
    assert s.insert_without_merging(10, 20, "a")
    s.check()
    assert list(s) == [(0, 10, "a"), (10, 20, "a"), (20, 30, "a")]
    assert not s.is_maximally_merged()
    assert s.total_length == 30


# -------------------------------------------------------------------- fill


def test_fill_maps_only_the_gaps() -> None:
    s = build([(10, 20, "a"), (30, 40, "b")])
    assert s.fill(0, 50, "z") == 30
    s.check()
    assert list(s) == [(0, 10, "z"), (10, 20, "a"), (20, 30, "z"), (30, 40, "b"), (40, 50, "z")]
    assert s.fill(0, 50, "y") == 0
    assert s.total_length == 50


def test_fill_merges_with_equal_neighbours() -> None:
    s = build([(10, 20, "a"), (30, 40, "b")])
    assert s.fill(5, 35, "a") == 15
    s.check()
    assert list(s) == [(5, 30, "a"), (30, 40, "b")]


def test_fill_partial_range() -> None:
    s = build([(10, 20, "a")])
    assert s.fill(15, 25, "a") == 5
    assert list(s) == [(10, 25, "a")]
    assert s.fill(12, 18, "q") == 0
    assert list(s) == [(10, 25, "a")]


def test_fill_many_gaps(load: int) -> None:
    s = fragmented(100)
    assert s.fill(0, 200, "f") == 100
    s.check()
    assert list(s.gaps(0, 200)) == []
    assert len(s) == 200


# ------------------------------------------------------------------ remove


def test_remove_returns_the_value() -> None:
    s = build(ABC)
    assert s.remove(20) == "b"
    s.check()
    assert list(s) == [(10, 20, "a"), (40, 50, "c")]
    assert s.total_length == 20
    assert s.remove(40) == "c"
    assert s.remove(10) == "a"
    s.check()
    assert len(s) == 0
    assert s.total_length == 0


@pytest.mark.parametrize("key", [0, 11, 19, 30, 35, 45, 50, 100])
def test_remove_needs_an_exact_start(key: int) -> None:
    s = build(ABC)
    with pytest.raises(KeyError):
        s.remove(key)
    assert list(s) == ABC


def test_remove_everything_in_many_orders(load: int) -> None:
    n = 150
    for order in ("forward", "backward", "inside-out"):
        s = fragmented(n)
        keys = list(range(n))
        if order == "backward":
            keys.reverse()
        elif order == "inside-out":
            keys = sorted(keys, key=lambda k: abs(k - n // 2))
        for j, k in enumerate(keys):
            assert s.remove(2 * k) == k
            s.check()
            assert len(s) == n - j - 1
        assert list(s) == []
        assert nblocks(s) == 0
        assert s.first_fit(10) == 0


# -------------------------------------------------------------------- carve


def test_carve_a_whole_segment() -> None:
    s = build(ABC)
    assert s.carve(20, 30) == "b"
    s.check()
    assert list(s) == [(10, 20, "a"), (40, 50, "c")]
    assert s.total_length == 20


def test_carve_the_front_the_back_and_the_middle(load: int) -> None:
    s = build([(0, 100, "a"), (200, 300, "b")])
    assert s.carve(0, 10) == "a"  # front: the gap before grows
    s.check()
    assert list(s) == [(10, 100, "a"), (200, 300, "b")]
    assert s.first_fit(10) == 0
    assert s.carve(90, 100) == "a"  # back: the gap after grows
    s.check()
    assert list(s) == [(10, 90, "a"), (200, 300, "b")]
    assert s.first_fit(110) == 90
    assert s.carve(40, 60) == "a"  # middle: split in two
    s.check()
    assert list(s) == [(10, 40, "a"), (60, 90, "a"), (200, 300, "b")]
    assert s.total_length == 30 + 30 + 100
    assert s.first_fit(20) == 40
    assert s.carve(210, 220) == "b"
    s.check()
    assert list(s.gaps(0, 300)) == [(0, 10), (40, 60), (90, 200), (210, 220)]


@pytest.mark.parametrize(
    ("start", "end"),
    [
        (25, 45),  # spans a gap
        (5, 15),  # starts in a gap
        (15, 25),  # spans two touching segments
        (30, 40),  # a gap
        (45, 51),  # runs past the segment
    ],
)
def test_carve_refuses_ranges_no_single_segment_holds(start: int, end: int) -> None:
    s = build(ABC)
    with pytest.raises(KeyError):
        s.carve(start, end)
    s.check()
    assert list(s) == ABC


def test_carve_rejects_bad_ranges() -> None:
    s = build(ABC, max_key=100)
    for a, b in ((15, 15), (16, 14), (-1, 5), (95, 101)):
        with pytest.raises(ValueError):
            s.carve(a, b)
    assert list(s) == ABC


def test_carve_if_carves_only_what_the_predicate_accepts(load: int) -> None:
    s = build(ABC)
    for start, end in ((25, 45), (5, 15), (15, 25), (30, 40), (45, 51), (-5, 5)):
        assert s.carve_if(start, end, lambda v: True) is None  # no single segment
    assert s.carve_if(20, 30, lambda v: v == "x") is None  # refused by the predicate
    assert list(s) == ABC
    s.check()
    assert s.carve_if(22, 25, lambda v: v == "b") == "b"  # a middle cut
    assert s.find(22) is None and s.find(21) is not None and s.find(25) is not None
    s.check()
    with pytest.raises(ValueError):
        s.carve_if(15, 15, lambda v: True)


def test_carve_and_carve_if_up_to_max_key() -> None:
    s = build([(80, 90, "a"), (90, 100, "b")], max_key=100)
    assert s.carve_if(95, 100, lambda v: True) == "b"
    assert s.carve(85, 90) == "a"
    s.check()
    assert list(s) == [(80, 85, "a"), (90, 95, "b")]


def test_carve_at_block_boundaries(small_load: int) -> None:
    # Segments k = [10k, 10k+8): carve the front, back or middle of every
    # one, so the cuts land at index 0, the last index and inside blocks.
    n = 40
    s = build([(10 * k, 10 * k + 8, k) for k in range(n)])
    for k in range(n):
        a = 10 * k
        kind = k % 3
        cut = (a, a + 2) if kind == 0 else (a + 6, a + 8) if kind == 1 else (a + 3, a + 5)
        assert s.carve(*cut) == k
        s.check()
        assert s.find(cut[0]) is None
        assert s.find(cut[1] - 1) is None
    assert s.total_length == n * 6
    assert len(s) == n + sum(1 for k in range(n) if k % 3 == 2)  # middle cuts add one
    for length in (1, 2, 3, 4):
        assert s.first_fit(length) == brute_first_fit(s, length, 0, 1)


# ------------------------------------------------------------ remove_range


def test_remove_range_splits_straddlers_and_returns_clipped_pieces() -> None:
    s = build([(0, 10, "a"), (10, 20, "b"), (30, 40, "c")])
    removed = s.remove_range(5, 35)
    s.check()
    assert removed == [(5, 10, "a"), (10, 20, "b"), (30, 35, "c")]
    assert list(s) == [(0, 5, "a"), (35, 40, "c")]
    assert s.total_length == 10


def test_remove_range_exact_segment_fast_path() -> None:
    s = build(ABC)
    assert s.remove_range(20, 30) == [(20, 30, "b")]
    s.check()
    assert list(s) == [(10, 20, "a"), (40, 50, "c")]
    assert s.remove_range(12, 18) == [(12, 18, "a")]
    s.check()
    assert list(s) == [(10, 12, "a"), (18, 20, "a"), (40, 50, "c")]


def test_remove_range_inside_one_segment() -> None:
    s = build([(0, 100, "a")])
    assert s.remove_range(40, 60) == [(40, 60, "a")]
    s.check()
    assert list(s) == [(0, 40, "a"), (60, 100, "a")]


def test_remove_range_of_a_gap_is_a_no_op() -> None:
    s = build(ABC)
    assert s.remove_range(30, 40) == []
    assert s.remove_range(0, 10) == []
    assert list(s) == ABC


def test_remove_range_rejects_bad_ranges() -> None:
    s = build(ABC, max_key=100)
    for a, b in ((10, 10), (20, 10), (-1, 5), (50, 101)):
        with pytest.raises(ValueError):
            s.remove_range(a, b)
    assert list(s) == ABC


def test_remove_range_across_many_blocks(load: int) -> None:
    s = build([(k, k + 1, k) for k in range(300)])  # touching, all different
    removed = s.remove_range(50, 250)
    s.check()
    assert removed == [(k, k + 1, k) for k in range(50, 250)]
    assert list(s) == [(k, k + 1, k) for k in (*range(50), *range(250, 300))]
    assert s.first_fit(200) == 50
    assert s.first_fit(201) == 300


# -------------------------------------------------------------------- clear


def test_clear(load: int) -> None:
    s = fragmented(100)
    s.first_fit(5)  # builds the tree
    s.clear()
    s.check()
    assert len(s) == 0
    assert s.total_length == 0
    assert list(s) == []
    assert s.first_fit(5) == 0
    assert s.add(0, 5, "again")
    s.check()
    assert list(s) == [(0, 5, "again")]


# ------------------------------------------------------ split_at / isolate


def test_split_at() -> None:
    s = build([(10, 20, "a"), (20, 30, "b")])
    assert s.split_at(15)
    s.check()
    assert list(s) == [(10, 15, "a"), (15, 20, "a"), (20, 30, "b")]
    assert s.total_length == 20
    assert not s.split_at(15)  # at a start
    assert not s.split_at(10)
    assert not s.split_at(20)
    assert not s.split_at(30)  # at an end (in a gap)
    assert not s.split_at(5)  # in a gap
    assert not s.split_at(100)
    s.check()
    assert len(s) == 3


def test_split_at_every_key_then_merge_back(load: int) -> None:
    s = build([(0, 100, "a")])
    for k in range(1, 100):
        assert s.split_at(k)
        s.check()
    assert len(s) == 100
    assert list(s) == [(k, k + 1, "a") for k in range(100)]
    assert not s.is_maximally_merged()
    merge_all(s)
    s.check()
    assert list(s) == [(0, 100, "a")]


def test_isolate() -> None:
    s = build([(0, 100, "a"), (100, 200, "b")])
    s.isolate(50, 150)
    s.check()
    assert list(s) == [(0, 50, "a"), (50, 100, "a"), (100, 150, "b"), (150, 200, "b")]
    s.isolate(50, 150)  # again: nothing to split
    assert len(s) == 4
    s.isolate(60, 70)  # both bounds in one segment
    assert list(s.segments(50, 100)) == [(50, 60, "a"), (60, 70, "a"), (70, 100, "a")]
    s.isolate(300, 400)  # in a gap
    s.check()
    assert len(s) == 6


# --------------------------------------------------------------- set_value


def test_set_value() -> None:
    s = build(ABC)
    s.set_value(20, "B")
    s.check()
    assert list(s) == [(10, 20, "a"), (20, 30, "B"), (40, 50, "c")]
    s.set_value(20, "a")  # no merging, even when now equal
    assert len(s) == 3
    with pytest.raises(KeyError):
        s.set_value(25, "x")
    with pytest.raises(KeyError):
        s.set_value(30, "x")
    assert list(s) == [(10, 20, "a"), (20, 30, "a"), (40, 50, "c")]


# -------------------------------------------------------- apply_contiguous


def test_apply_contiguous_over_a_covered_range() -> None:
    s = build([(0, 10, 1), (10, 20, 2), (20, 30, 3)])
    calls: list[tuple[int, int, int]] = []

    def fn(a: int, b: int, v: int) -> int:
        calls.append((a, b, v))
        return v * 10

    assert s.apply_contiguous(5, 25, fn) is None
    s.check()
    assert calls == [(5, 10, 1), (10, 20, 2), (20, 25, 3)]
    assert list(s) == [(0, 5, 1), (5, 10, 10), (10, 20, 20), (20, 25, 30), (25, 30, 3)]


def test_apply_contiguous_returns_the_first_gap() -> None:
    s = build([(0, 10, 1), (10, 20, 2), (30, 40, 3)])
    seen: list[int] = []

    def fn(a: int, b: int, v: int) -> int:
        seen.append(a)
        return v + 100

    # Segments before the gap are changed (as in the reference).
    assert s.apply_contiguous(5, 35, fn) == (20, 30)
    s.check()
    assert seen == [5, 10]
    assert list(s) == [(0, 5, 1), (5, 10, 101), (10, 20, 102), (30, 35, 3), (35, 40, 3)]


def test_apply_contiguous_gap_is_clipped_to_the_range() -> None:
    s = build([(0, 10, 1)])
    assert s.apply_contiguous(5, 15, lambda a, b, v: v) == (10, 15)
    assert s.apply_contiguous(20, 30, lambda a, b, v: v) == (20, 30)
    s2 = build([(10, 20, 1), (22, 30, 1)])
    assert s2.apply_contiguous(0, 12, lambda a, b, v: v) == (0, 10)
    assert s2.apply_contiguous(15, 25, lambda a, b, v: v + 1) == (20, 22)
    s2.check()
    # Both calls isolated their bounds (12, then 15 and 25); only [15, 20)
    # precedes the gap and was changed.
    assert list(s2) == [(10, 12, 1), (12, 15, 1), (15, 20, 2), (22, 25, 1), (25, 30, 1)]


def test_apply_contiguous_rejects_bad_ranges() -> None:
    s = build(ABC)
    with pytest.raises(ValueError):
        s.apply_contiguous(20, 20, lambda a, b, v: v)
    with pytest.raises(ValueError):
        s.apply_contiguous(20, 10, lambda a, b, v: v)


def test_apply_contiguous_does_not_merge(load: int) -> None:
    s = build([(k, k + 1, k) for k in range(100)])
    assert s.apply_contiguous(10, 90, lambda a, b, v: "same") is None
    s.check()
    assert len(s) == 100
    assert not s.is_maximally_merged()
    s.merge_range(10, 90)
    s.check()
    assert list(s.segments(0, 100))[10] == (10, 90, "same")
    assert len(s) == 21


# ---------------------------------------------------------- merge_adjacent


def test_merge_adjacent_after_isolate_and_update() -> None:
    # The allocator's pattern: isolate, change the values in the range, then
    # merge the range's ends with their neighbours.
    s = build([(0, 100, 1)])
    s.isolate(40, 60)
    s.set_value(40, 2)
    s.merge_adjacent(40, 60)  # values differ: nothing merges
    s.check()
    assert list(s) == [(0, 40, 1), (40, 60, 2), (60, 100, 1)]
    s.set_value(40, 1)
    s.merge_adjacent(40, 60)
    s.check()
    assert list(s) == [(0, 100, 1)]


def test_merge_adjacent_only_touches_the_ends() -> None:
    s = build([(k * 10, k * 10 + 10, "v") for k in range(6)])  # six touching equal segments
    s.merge_adjacent(20, 40)
    s.check()
    # [10,20)+[20,30) merge at the start; [30,40)+[40,50) merge at the end;
    # the pair inside the range ([20,30)/[30,40)) is not the call's business.
    assert list(s) == [(0, 10, "v"), (10, 30, "v"), (30, 50, "v"), (50, 60, "v")]


def test_merge_adjacent_in_a_gap_and_at_the_edges() -> None:
    s = build([(0, 10, "a"), (10, 20, "a")])
    s.merge_adjacent(30, 40)  # nothing there
    assert len(s) == 2
    s.merge_adjacent(0, 10)  # first segment: no predecessor; merges with its successor
    s.check()
    assert list(s) == [(0, 20, "a")]


def test_merge_adjacent_merges_the_segment_holding_start_with_its_predecessor() -> None:
    # Documented: "Merge the segment holding ``start`` with its predecessor"
    # (as the reference's MergeAdjacent: FindSegment(r.Start) and its
    # PrevSegment).  Here the segment holding start begins before start.
    s = build([(0, 10, "a"), (10, 30, "a"), (30, 40, "b")])
    s.merge_adjacent(20, 30)
    s.check()
    assert list(s) == [(0, 30, "a"), (30, 40, "b")]


def test_merge_adjacent_of_an_empty_range_merges_start_only() -> None:
    s = build([(0, 10, "a"), (10, 20, "a"), (20, 30, "a")])
    s.merge_adjacent(20, 20)  # no end - 1 to look at: [20, 30) joins its predecessor
    s.check()
    assert list(s) == [(0, 10, "a"), (10, 30, "a")]


# ------------------------------------------------------------ merge_range


def test_merge_range() -> None:
    s = build([(k, k + 1, "v") for k in range(10)] + [(20, 21, "v")])
    s.merge_range(2, 5)
    s.check()
    # As in the reference's MergeRange: from the segment holding 2, merge
    # with the next segment while the (growing) segment starts before 5, so
    # the run goes on past 5 to the end of the touching run; [1, 2) does not
    # overlap [2, 5) and is left alone; [20, 21) does not touch.
    assert list(s) == [(0, 1, "v"), (1, 2, "v"), (2, 10, "v"), (20, 21, "v")]
    assert s.total_length == 11


def test_merge_range_stops_at_value_changes() -> None:
    s = build([(0, 10, "a"), (10, 20, "a"), (20, 30, "b"), (30, 40, "b"), (40, 50, "a")])
    s.merge_range(0, 50)
    s.check()
    assert list(s) == [(0, 20, "a"), (20, 40, "b"), (40, 50, "a")]
    assert s.is_maximally_merged()


def test_merge_range_outside_does_nothing() -> None:
    s = build([(0, 10, "a"), (10, 20, "a"), (30, 40, "a"), (40, 50, "a")])
    s.merge_range(21, 29)
    assert len(s) == 4
    s.merge_range(30, 31)
    s.check()
    assert list(s) == [(0, 10, "a"), (10, 20, "a"), (30, 50, "a")]


def test_merge_all_and_is_maximally_merged(load: int) -> None:
    segs: list[tuple[int, int, object]] = []
    for k in range(300):
        segs.append((k, k + 1, k // 10))  # runs of ten equal values
    s = build(segs)
    assert not s.is_maximally_merged()
    merge_all(s)
    s.check()
    assert list(s) == [(10 * j, 10 * j + 10, j) for j in range(30)]
    assert s.is_maximally_merged()
    assert s.total_length == 300


def test_is_maximally_merged_ignores_non_touching_and_different() -> None:
    assert build([(0, 10, "a"), (11, 20, "a")]).is_maximally_merged()
    assert build([(0, 10, "a"), (10, 20, "b")]).is_maximally_merged()
    assert not build([(0, 10, "a"), (10, 20, "a")]).is_maximally_merged()


# ------------------------------------------------------ custom merge policy


def same_parity(a: object, b: object) -> bool:
    assert isinstance(a, int) and isinstance(b, int)
    return a % 2 == b % 2


def test_custom_policy_merges_and_keeps_the_left_value() -> None:
    s = build([(0, 10, 2), (20, 30, 4)], mergeable=same_parity)
    assert s.add(10, 20, 6)
    s.check()
    assert list(s) == [(0, 30, 2)]
    assert s.add(30, 40, 3)  # odd: no merge
    assert s.add(45, 50, 5)
    assert s.add(40, 45, 7)  # odd: joins [30, 40) and [45, 50), keeping 3
    s.check()
    assert list(s) == [(0, 30, 2), (30, 50, 3)]


def test_custom_policy_extends_the_next_segment_with_the_new_left_value() -> None:
    s = build([(10, 20, 4)], mergeable=same_parity)
    assert s.add(5, 10, 2)
    s.check()
    assert list(s) == [(5, 20, 2)]  # the merged segment keeps the left value


def test_custom_policy_drives_merge_all_and_is_maximally_merged() -> None:
    s = build([(0, 1, 1), (1, 2, 3), (2, 3, 2), (3, 4, 4), (4, 5, 5)], mergeable=same_parity)
    assert not s.is_maximally_merged()
    merge_all(s)
    s.check()
    assert list(s) == [(0, 2, 1), (2, 4, 2), (4, 5, 5)]
    assert s.is_maximally_merged()


def test_never_merge_policy() -> None:
    s: SegmentSet[int] = SegmentSet(lambda a, b: False)
    assert s.add(0, 1, 1)
    assert s.add(1, 2, 1)
    merge_all(s)
    assert len(s) == 2
    assert s.is_maximally_merged()


def test_policy_sees_left_then_right() -> None:
    calls: list[tuple[object, object]] = []

    def policy(a: object, b: object) -> bool:
        calls.append((a, b))
        return True

    s = build([(0, 10, "L"), (10, 20, "R")], mergeable=policy)
    merge_all(s)
    assert calls == [("L", "R")]
    assert list(s) == [(0, 20, "L")]


# ----------------------------------------------------------- min/max keys


def test_min_max_key_bound_every_query_and_mutation() -> None:
    s: SegmentSet[str] = SegmentSet(min_key=100, max_key=200)
    assert list(s.gaps()) == [(100, 200)]
    assert s.first_fit(100) == 100
    assert s.first_fit(101) is None
    assert s.first_fit(64, alignment=64) == 128
    assert s.first_fit(1, alignment=256) is None
    with pytest.raises(ValueError):
        s.add(99, 101, "x")
    with pytest.raises(ValueError):
        s.add(199, 201, "x")
    assert s.add(100, 110, "x")
    assert s.add(190, 200, "y")
    s.check()
    assert list(s.gaps()) == [(110, 190)]
    assert s.first_fit(80) == 110
    assert s.first_fit(81) is None
    assert list(s.gaps(195)) == []


# ------------------------------------------------- structure under small load


def test_blocks_split_and_join_under_small_load(small_load: int) -> None:
    s: SegmentSet[int] = SegmentSet()
    for k in range(100):
        assert s.add(2 * k, 2 * k + 1, k)
        s.check()
        assert all(len(b) <= 2 * small_load for b in s._starts)
    assert nblocks(s) >= 100 // (2 * small_load)
    assert s.first_fit(2) == 199  # builds the tree
    s.check()
    for k in range(0, 100, 3):
        s.remove(2 * k)
        s.check()
        assert s.first_fit(2) == 0  # segment 0 went first: [0, 3) is free
        for key in (1, 50, 150):
            assert s.first_fit(3, key) == brute_first_fit(s, 3, key, 1)
    for k in range(100):
        if k % 3:
            assert s.remove(2 * k) == k
            s.check()
    assert len(s) == 0


def test_split_heavy_workload_under_small_load(load: int) -> None:
    s = build([(0, 64, "a")])
    for k in range(1, 64):
        s.split_at(k)
        s.check()
    for k in range(0, 64, 2):
        s.set_value(k, "b")
    merge_all(s)
    s.check()
    assert len(s) == 64  # alternating values: nothing merges
    for k in range(0, 64, 2):
        s.remove(k)
        s.check()
    assert s.first_fit(1) == 0
    assert s.first_fit(2) == 64
    assert list(s.gaps(0, 8)) == [(0, 1), (2, 3), (4, 5), (6, 7)]


# ------------------------------------------------------------ check() bites


def _corruptions() -> Iterator[tuple[str, Callable[[SegmentSet[object]], None]]]:
    def gap(s: SegmentSet[object]) -> None:
        s._gaps[0][1] += 1

    def overlap(s: SegmentSet[object]) -> None:
        s._ends[0][0] = s._starts[0][1] + 1

    def empty(s: SegmentSet[object]) -> None:
        s._ends[0][0] = s._starts[0][0]

    def firsts(s: SegmentSet[object]) -> None:
        s._firsts[1] -= 1

    def bmax(s: SegmentSet[object]) -> None:
        # A bound may be stale-high, never too low (first fit would skip it).
        s._bmax[1] = max(s._gaps[1]) - 1

    def length(s: SegmentSet[object]) -> None:
        s._len += 1

    def total(s: SegmentSet[object]) -> None:
        s._total += 1

    def tree(s: SegmentSet[object]) -> None:
        s.first_fit(5)  # no gap of 5: goes through (and builds) the tree
        assert s._tree is not None
        s._tree[1] += 1

    def tree_leaf(s: SegmentSet[object]) -> None:
        s.first_fit(5)
        assert s._tree is not None
        s._bmax[0] += 1  # a valid bound, but the tree no longer mirrors it

    def past_max(s: SegmentSet[object]) -> None:
        s.max_key = 5

    def byte_map(s: SegmentSet[object]) -> None:
        s._caps[1][0] += 1

    def values(s: SegmentSet[object]) -> None:
        s._vals[0].append(None)

    def empty_block(s: SegmentSet[object]) -> None:
        for ints in (s._starts, s._ends, s._gaps):
            ints.append([])
        s._vals.append([])
        s._caps.append(bytearray())
        s._firsts.append(s._firsts[-1])
        s._bmax.append(0)

    def big_block(s: SegmentSet[object]) -> None:
        last = s.last()
        assert last is not None and len(s._starts[-1]) == 4
        s.remove(last[0])  # the largest block now holds 3
        segmod._LOAD = 1  # built for 2: now over 2 * _LOAD

    def small_block(s: SegmentSet[object]) -> None:
        segmod._LOAD = 6  # built for 2: blocks of 2, under _LOAD // 2

    def tree_shape(s: SegmentSet[object]) -> None:
        s.first_fit(5)
        assert s._tree is not None
        s._tree.append(0)

    yield from [
        ("gap", gap),
        ("overlap", overlap),
        ("empty", empty),
        ("firsts", firsts),
        ("bmax", bmax),
        ("len", length),
        ("total", total),
        ("tree", tree),
        ("tree-leaf", tree_leaf),
        ("past-max", past_max),
        ("byte-map", byte_map),
        ("values", values),
        ("empty-block", empty_block),
        ("big-block", big_block),
        ("small-block", small_block),
        ("tree-shape", tree_shape),
    ]


@pytest.mark.parametrize("corrupt", [pytest.param(f, id=n) for n, f in _corruptions()])
def test_check_detects_corruption(
    small_load: int, corrupt: Callable[[SegmentSet[object]], None]
) -> None:
    s = fragmented(20, unit=4)
    assert nblocks(s) >= 2
    s.check()
    corrupt(s)
    with pytest.raises(AssertionError):
        s.check()
