"""The exception types aiopgalloc raises (beyond the builtin ones).

The library reports misuse with builtin exceptions where one fits:
``ValueError`` for bad lengths and ranges, ``TypeError`` for non-integers,
``PermissionError`` for execute access, ``OSError(ENOMEM)`` when the file
cannot grow.  The types below name the two conditions that need their own.
"""

from __future__ import annotations

__all__ = ["ClosedError", "RefCountError"]


class RefCountError(ValueError):
    """A reference count operation named pages that are not allocated, or that
    have no references left (a double free, or ``inc_ref`` on freed pages).

    It is a ``ValueError``: the range itself is the bad argument.  The allocator
    is unchanged when it is raised.
    """


class ClosedError(RuntimeError):
    """The memory file was used after its ``async with`` block ended."""
