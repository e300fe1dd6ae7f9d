"""Argument checks of the public ``MemoryFile`` calls.

Every public call checks its arguments first, before it takes a lock or
changes anything, so that bad input raises a clear ``TypeError`` or
``ValueError`` and leaves the state exactly as it was.  The checks live
here, apart from the state machine, so they can be read (and tested) as the
contract of what each call accepts: ints, not bools or floats; page-aligned,
non-empty ranges; offsets below 2**63 (the file's offsets are signed 64-bit).

A file range must be a ``FileRange`` (or a subclass).  ``FileRange`` and
``EvictableRange`` are both tuples of two ints and compare equal with the
same bounds, so a check on the shape alone would take a user's own offsets
(an ``EvictableRange``), or any pair, as pages of the file, and free or map
pages that have nothing to do with it.
"""

from __future__ import annotations

from .ranges import PAGE_SIZE, EvictableRange, FileRange
from .usage import MemoryKind

__all__ = ["MAX_OFFSET", "PAGE_MASK", "check_kind", "check_length", "check_range", "range_bounds"]

PAGE_MASK = PAGE_SIZE - 1
MAX_OFFSET = (1 << 63) - 1  # file offsets are signed 64-bit


def range_bounds(fr: object, what: str) -> tuple[int, int]:
    """Check a non-empty, well-formed ``FileRange`` of int bounds; return
    them.  Raises ``TypeError`` for anything but a ``FileRange`` (a plain
    tuple and an ``EvictableRange`` included) or for bounds that are not
    ints, ``ValueError`` for an empty, negative or ill-formed range."""
    if not isinstance(fr, FileRange):
        hint = (
            " (an EvictableRange is in a user's own offsets, not the file's)"
            if isinstance(fr, EvictableRange)
            else ""
        )
        raise TypeError(f"{what}: expected a FileRange, got {type(fr).__name__}{hint}")
    # The bounds as given, typed object: compiled with mypyc, an int-typed
    # local would unbox a bool to 0 or 1 before the check below sees it.
    bounds: tuple[object, object] = fr
    first, last = bounds
    if (type(first) is not int or type(last) is not int) and (
        not (isinstance(first, int) and isinstance(last, int))
        or isinstance(first, bool)
        or isinstance(last, bool)
    ):
        raise TypeError(f"{what}: range bounds must be ints, got {fr!r}")
    start, end = int(first), int(last)
    if start < 0 or end <= start:
        raise ValueError(f"{what}: empty, negative or ill-formed range {fr!r}")
    return start, end


def check_range(fr: object, what: str) -> tuple[int, int]:
    """Check a page-aligned, non-empty, well-formed ``FileRange``; return its
    bounds.  Raises as :func:`range_bounds` does, and ``ValueError`` for a
    range that is not page-aligned or ends past the largest file offset."""
    start, end = range_bounds(fr, what)
    if (start | end) & PAGE_MASK:
        raise ValueError(f"{what}: range {fr!r} is not page-aligned")
    if end > MAX_OFFSET:
        raise ValueError(f"{what}: range {fr!r} is past the largest file offset")
    return start, end


def check_length(length: object) -> int:
    """Check an allocation length: a positive multiple of PAGE_SIZE."""
    if type(length) is not int:
        if isinstance(length, bool) or not isinstance(length, int):
            raise TypeError(f"length must be an int, got {type(length).__name__}")
        length = int(length)
    if length <= 0:
        raise ValueError(f"length must be > 0, got {length}")
    if length & PAGE_MASK:
        raise ValueError(f"length {length} is not a multiple of PAGE_SIZE ({PAGE_SIZE})")
    return length


def check_kind(kind: object) -> MemoryKind:
    """Check a memory kind: a MemoryKind, or an int naming one."""
    if isinstance(kind, MemoryKind):
        return kind
    if isinstance(kind, bool) or not isinstance(kind, int):
        raise TypeError(f"kind must be a MemoryKind, got {type(kind).__name__}")
    try:
        return MemoryKind(kind)
    except ValueError:
        raise ValueError(f"{kind} is not a MemoryKind") from None
