"""FileRange, EvictableRange and the rounding helpers of ``aiopgalloc.ranges``."""

from __future__ import annotations

import mmap

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aiopgalloc import HUGE_PAGE_SIZE, PAGE_SIZE, EvictableRange, FileRange
from aiopgalloc.ranges import (
    is_page_aligned,
    page_round_down,
    page_round_up,
    round_down,
    round_up,
)

P = PAGE_SIZE
RANGE_TYPES = [FileRange, EvictableRange]

offsets = st.integers(min_value=0, max_value=1 << 48)
alignments = st.integers(min_value=0, max_value=30).map(lambda k: 1 << k)


# ---------------------------------------------------------------- page sizes


def test_page_size_is_the_kernels() -> None:
    assert PAGE_SIZE == mmap.PAGESIZE
    assert PAGE_SIZE & (PAGE_SIZE - 1) == 0


def test_huge_page_size_is_a_power_of_two_multiple_of_page_size() -> None:
    assert HUGE_PAGE_SIZE > PAGE_SIZE
    assert HUGE_PAGE_SIZE % PAGE_SIZE == 0
    assert HUGE_PAGE_SIZE & (HUGE_PAGE_SIZE - 1) == 0


# ---------------------------------------------------------- rounding helpers


@pytest.mark.parametrize(
    ("x", "alignment", "down", "up"),
    [
        (0, 1, 0, 0),
        (0, 4096, 0, 0),
        (1, 4096, 0, 4096),
        (4095, 4096, 0, 4096),
        (4096, 4096, 4096, 4096),
        (4097, 4096, 4096, 8192),
        (7, 8, 0, 8),
        (8, 8, 8, 8),
        (9, 8, 8, 16),
        (5, 1, 5, 5),
        ((1 << 64) - 1, 1 << 21, (1 << 64) - (1 << 21), 1 << 64),
    ],
)
def test_round_table(x: int, alignment: int, down: int, up: int) -> None:
    assert round_down(x, alignment) == down
    assert round_up(x, alignment) == up


@given(x=offsets, alignment=alignments)
def test_round_properties(x: int, alignment: int) -> None:
    d = round_down(x, alignment)
    u = round_up(x, alignment)
    assert d % alignment == 0 and u % alignment == 0
    assert d <= x <= u
    assert x - d < alignment and u - x < alignment
    assert (d == u) == (x % alignment == 0)
    # Idempotent.
    assert round_down(d, alignment) == d
    assert round_up(u, alignment) == u


@given(x=offsets)
def test_page_rounding_matches_generic(x: int) -> None:
    assert page_round_down(x) == round_down(x, PAGE_SIZE) == (x // P) * P
    assert page_round_up(x) == round_up(x, PAGE_SIZE) == -(-x // P) * P
    assert is_page_aligned(x) == (x % P == 0)


@pytest.mark.parametrize(
    ("x", "aligned"), [(0, True), (1, False), (P - 1, False), (P, True), (3 * P, True)]
)
def test_is_page_aligned_table(x: int, aligned: bool) -> None:
    assert is_page_aligned(x) is aligned


# ------------------------------------------------------------- range types


@pytest.mark.parametrize("cls", RANGE_TYPES)
def test_fields_length_and_unpacking(cls: type[FileRange]) -> None:
    r = cls(P, 3 * P)
    assert r.start == P
    assert r.end == 3 * P
    assert r.length == 2 * P
    start, end = r
    assert (start, end) == (P, 3 * P)
    assert r == (P, 3 * P)
    assert len(r) == 2


@pytest.mark.parametrize("cls", RANGE_TYPES)
def test_keyword_construction(cls: type[FileRange]) -> None:
    assert cls(start=1, end=5) == cls(1, 5)


@pytest.mark.parametrize("cls", RANGE_TYPES)
def test_immutable(cls: type[FileRange]) -> None:
    r = cls(0, P)
    with pytest.raises(AttributeError):
        r.start = 5  # type: ignore[misc]
    with pytest.raises(AttributeError):
        r.end = 5  # type: ignore[misc]
    with pytest.raises(AttributeError):
        r.other = 1  # type: ignore[attr-defined]
    with pytest.raises(TypeError):
        r[0] = 3  # type: ignore[index]
    assert r == cls(0, P)


@pytest.mark.parametrize("cls", RANGE_TYPES)
def test_no_instance_dict(cls: type[FileRange]) -> None:
    # __slots__ = (): a range costs one tuple, nothing more.
    assert not hasattr(cls(0, 1), "__dict__")


@pytest.mark.parametrize("cls", RANGE_TYPES)
def test_hashable_and_usable_as_keys(cls: type[FileRange]) -> None:
    d = {cls(0, P): "a", cls(P, 2 * P): "b"}
    assert d[cls(0, P)] == "a"
    assert d[cls(P, 2 * P)] == "b"
    assert len({cls(0, P), cls(0, P)}) == 1


def test_file_and_evictable_ranges_compare_equal_as_tuples() -> None:
    # Documented: both are tuples, so the same bounds compare equal.
    assert FileRange(0, P) == EvictableRange(0, P)  # type: ignore[comparison-overlap]
    assert hash(FileRange(0, P)) == hash(EvictableRange(0, P))


def test_repr_is_hex_and_names_the_type() -> None:
    assert repr(FileRange(0x1000, 0x3000)) == "FileRange(0x1000, 0x3000)"
    assert repr(EvictableRange(0, 0x10)) == "EvictableRange(0x0, 0x10)"


@pytest.mark.parametrize("cls", RANGE_TYPES)
def test_repr_does_not_fail_for_ill_typed_bounds(cls: type[FileRange]) -> None:
    # A range with bad bounds shows up in the error message that rejects it.
    r = cls("a", None)  # type: ignore[arg-type]
    assert repr(r) == f"{cls.__name__}('a', None)"
    assert repr(cls(True, 1.5)) == f"{cls.__name__}(True, 1.5)"  # type: ignore[arg-type]
    assert repr(cls(-1, 16)) == f"{cls.__name__}(-0x1, 0x10)"


@pytest.mark.parametrize("cls", RANGE_TYPES)
def test_well_formed(cls: type[FileRange]) -> None:
    assert cls(0, 0).well_formed()
    assert cls(0, 1).well_formed()
    assert not cls(2, 1).well_formed()
    # Ill-formed ranges may be built (as in the reference); length is negative.
    assert cls(3 * P, P).length == -2 * P


@pytest.mark.parametrize("cls", RANGE_TYPES)
def test_contains(cls: type[FileRange]) -> None:
    r = cls(P, 2 * P)
    assert not r.contains(P - 1)
    assert r.contains(P)
    assert r.contains(2 * P - 1)
    assert not r.contains(2 * P)
    assert not cls(P, P).contains(P)


@pytest.mark.parametrize("cls", RANGE_TYPES)
def test_overlaps_table(cls: type[FileRange]) -> None:
    r = cls(10, 20)
    assert r.overlaps((0, 11))
    assert r.overlaps((19, 30))
    assert r.overlaps((12, 13))
    assert r.overlaps((0, 100))
    assert not r.overlaps((0, 10))  # touching is not overlapping
    assert not r.overlaps((20, 30))
    assert not r.overlaps((30, 40))


@pytest.mark.parametrize("cls", RANGE_TYPES)
def test_overlaps_empty_range_shares_no_offset(cls: type[FileRange]) -> None:
    # Documented: "Whether this range and other share at least one offset".
    # An empty range has no offset, so it can share none.
    assert not cls(10, 20).overlaps((15, 15))
    assert not cls(15, 15).overlaps((10, 20))
    assert not cls(15, 15).overlaps((15, 15))


@pytest.mark.parametrize("cls", RANGE_TYPES)
def test_is_superset_of_table(cls: type[FileRange]) -> None:
    r = cls(10, 20)
    assert r.is_superset_of((10, 20))
    assert r.is_superset_of((12, 15))
    assert r.is_superset_of((10, 10))
    assert not r.is_superset_of((9, 15))
    assert not r.is_superset_of((15, 21))
    assert not r.is_superset_of((0, 100))


@pytest.mark.parametrize("cls", RANGE_TYPES)
def test_is_page_aligned_method(cls: type[FileRange]) -> None:
    assert cls(0, P).is_page_aligned()
    assert cls(P, 5 * P).is_page_aligned()
    assert not cls(1, P).is_page_aligned()
    assert not cls(0, P + 1).is_page_aligned()
    assert cls(0, 0).is_page_aligned()


@pytest.mark.parametrize("cls", RANGE_TYPES)
def test_intersect_keeps_the_type(cls: type[FileRange]) -> None:
    r = cls(10, 20)
    i = r.intersect((15, 30))
    assert type(i) is cls
    assert i == (15, 20)
    assert r.intersect((0, 100)) == (10, 20)
    assert r.intersect((12, 14)) == (12, 14)
    # Disjoint: the result is empty, start == end.
    empty = r.intersect((30, 40))
    assert type(empty) is cls
    assert empty.length == 0
    assert empty.start == empty.end
    empty2 = r.intersect((0, 5))
    assert empty2.length == 0


ranges = st.tuples(st.integers(0, 200), st.integers(0, 200)).map(sorted)


@given(a=ranges, b=ranges)
def test_range_predicates_match_sets(a: list[int], b: list[int]) -> None:
    ra = FileRange(a[0], a[1])
    sa, sb = set(range(*a)), set(range(*b))
    if sa and sb:  # empty ranges: see test_overlaps_empty_range_shares_no_offset
        assert ra.overlaps((b[0], b[1])) == bool(sa & sb)
    assert ra.is_superset_of((b[0], b[1])) == (sb <= sa and (bool(sb) or a[0] <= b[0] <= a[1]))
    inter = ra.intersect((b[0], b[1]))
    assert set(range(inter.start, inter.end)) == sa & sb
    assert inter.well_formed()
    for x in range(0, 201, 7):
        assert ra.contains(x) == (x in sa)


def test_ranges_are_plain_tuples() -> None:
    # Documented: a NamedTuple of two ints, cheap to build and unpack.
    assert isinstance(FileRange(0, 1), tuple)
    assert isinstance(EvictableRange(0, 1), tuple)
    assert tuple(FileRange(3, 4)) == (3, 4)
