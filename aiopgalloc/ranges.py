"""Half-open ranges of offsets, page sizes and alignment helpers.

``FileRange`` names bytes of the memory file; ``EvictableRange`` names offsets
in an evictable user's own space (not the file's).  Both are immutable
``NamedTuple`` subclasses of two ints: cheap to build (one tuple) and to
unpack (``start, end = fr``).  Because they are tuples, a ``FileRange`` and an
``EvictableRange`` with the same bounds compare equal; the allocator never
mixes the two.

A range is *well formed* when ``start <= end``; constructing an ill-formed one
is allowed (as in the reference), and every allocator call checks the ranges
it is given and raises ``ValueError`` for ill-formed, empty or unaligned ones.
"""

from __future__ import annotations

from typing import NamedTuple, Self

from .host.hugepage import HUGE_PAGE_SIZE, PAGE_SIZE

__all__ = [
    "HUGE_PAGE_SIZE",
    "PAGE_SIZE",
    "EvictableRange",
    "FileRange",
    "is_page_aligned",
    "page_round_down",
    "page_round_up",
    "round_down",
    "round_up",
]

PAGE_MASK = PAGE_SIZE - 1


def round_down(x: int, alignment: int) -> int:
    """Round ``x`` down to a multiple of ``alignment`` (a power of two)."""
    return x & ~(alignment - 1)


def round_up(x: int, alignment: int) -> int:
    """Round ``x`` up to a multiple of ``alignment`` (a power of two)."""
    return (x + alignment - 1) & ~(alignment - 1)


def page_round_down(x: int) -> int:
    """Round ``x`` down to a multiple of ``PAGE_SIZE`` (``page_round_down(5000)
    == 4096`` with 4 KiB pages).  One bitwise operation; raises ``TypeError``
    for a non-integer."""
    return x & ~PAGE_MASK


def page_round_up(x: int) -> int:
    """Round ``x`` up to a multiple of ``PAGE_SIZE``: the length to
    ``allocate`` for ``x`` bytes (``page_round_up(5000) == 8192`` with 4 KiB
    pages; ``page_round_up(0) == 0``).  Two integer operations; raises
    ``TypeError`` for a non-integer."""
    return (x + PAGE_MASK) & ~PAGE_MASK


def is_page_aligned(x: int) -> bool:
    """Whether ``x`` is a multiple of ``PAGE_SIZE``."""
    return x & PAGE_MASK == 0


def _hex(x: object) -> str:
    # repr must not fail for an ill-typed range (it shows up in error messages).
    return f"{x:#x}" if isinstance(x, int) and not isinstance(x, bool) else repr(x)


class _Range(NamedTuple):
    """A half-open range ``[start, end)``; the base of both range types."""

    start: int
    end: int

    @property
    def length(self) -> int:
        """``end - start`` (negative for an ill-formed range)."""
        return self.end - self.start

    def well_formed(self) -> bool:
        """Whether ``start <= end``."""
        return self.start <= self.end

    def contains(self, x: int) -> bool:
        """Whether offset ``x`` lies in the range."""
        return self.start <= x < self.end

    def overlaps(self, other: tuple[int, int]) -> bool:
        """Whether this range and ``other`` share at least one offset."""
        return max(self.start, other[0]) < min(self.end, other[1])

    def is_superset_of(self, other: tuple[int, int]) -> bool:
        """Whether every offset of ``other`` lies in this range."""
        return self.start <= other[0] and other[1] <= self.end

    def is_page_aligned(self) -> bool:
        """Whether both bounds are multiples of ``PAGE_SIZE``."""
        return (self.start | self.end) & PAGE_MASK == 0

    def intersect(self, other: tuple[int, int]) -> Self:
        """The common part of both ranges, of the same type as ``self``.

        When they do not overlap the result is empty (``start == end``).
        """
        s = max(self.start, other[0])
        e = min(self.end, other[1])
        if e < s:
            e = s
        return type(self)(s, e)


class FileRange(_Range):
    """A half-open range ``[start, end)`` of byte offsets in the memory file."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"FileRange({_hex(self.start)}, {_hex(self.end)})"


class EvictableRange(_Range):
    """A half-open range ``[start, end)`` in an evictable user's offset space."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"EvictableRange({_hex(self.start)}, {_hex(self.end)})"
