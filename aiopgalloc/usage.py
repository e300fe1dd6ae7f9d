"""Memory kinds and per-kind accounting of committed bytes.

``MemoryAccounting`` counts the bytes the allocator *knows* to be committed,
per ``MemoryKind``.  Pages are counted when a usage scan (``update_usage``)
finds them resident, moved to ``SYSTEM`` when their last reference goes (they
still occupy memory until the releaser punches them out), and uncounted when
they are released.  The counts are exact with respect to what the allocator
has observed; between scans, pages a user has touched but no scan has seen yet
are not counted (``total_usage()`` asks the kernel directly).
"""

from __future__ import annotations

import enum
import threading
from dataclasses import dataclass, fields
from typing import NamedTuple

__all__ = [
    "LIVE",
    "RELEASING",
    "MemoryAccounting",
    "MemoryKind",
    "MemoryStats",
    "UsageInfo",
    "usage_mergeable",
]


class MemoryKind(enum.IntEnum):
    """What a range of memory is used for (the reference's usage kinds, in
    its order).  Freed pages waiting for release are accounted as SYSTEM."""

    SYSTEM = 0
    ANONYMOUS = 1
    PAGE_CACHE = 2
    TMPFS = 3
    RAMDISKFS = 4
    MAPPED = 5


_KINDS = tuple(MemoryKind)


@dataclass(frozen=True, slots=True)
class MemoryStats:
    """A frozen snapshot of committed bytes per kind; ``total`` sums them."""

    system: int = 0
    anonymous: int = 0
    page_cache: int = 0
    tmpfs: int = 0
    ramdiskfs: int = 0
    mapped: int = 0

    @property
    def total(self) -> int:
        """The sum over every kind, in bytes."""
        return (
            self.system
            + self.anonymous
            + self.page_cache
            + self.tmpfs
            + self.ramdiskfs
            + self.mapped
        )

    def __getitem__(self, kind: MemoryKind) -> int:
        """The bytes of one kind: ``stats[MemoryKind.ANONYMOUS]``."""
        return int(getattr(self, kind.name.lower()))

    def as_dict(self) -> dict[str, int]:
        """The figures as a plain dict (kinds lower-case, plus ``total``)."""
        d = {f.name: int(getattr(self, f.name)) for f in fields(self)}
        d["total"] = self.total
        return d


class MemoryAccounting:
    """Thread-safe byte counters, one per ``MemoryKind``.

    Every method takes one ``threading.Lock`` briefly and is O(1).  Amounts
    must be non-negative ints; ``dec`` and ``move`` refuse (``ValueError``) to
    take a counter below zero, and then change nothing.
    """

    __slots__ = ("_counts", "_lock")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = [0] * len(_KINDS)

    @staticmethod
    def _check_amount(amount: int) -> None:
        if type(amount) is not int and (isinstance(amount, bool) or not isinstance(amount, int)):
            raise TypeError(f"amount must be an int, not {type(amount).__name__}")
        if amount < 0:
            raise ValueError(f"amount must be >= 0, got {amount}")

    def inc(self, amount: int, kind: MemoryKind) -> None:
        """Count ``amount`` more bytes of ``kind``."""
        self._check_amount(amount)
        k = MemoryKind(kind)
        with self._lock:
            self._counts[k] += amount

    def dec(self, amount: int, kind: MemoryKind) -> None:
        """Count ``amount`` fewer bytes of ``kind``.

        Raises ``ValueError`` if that would make the counter negative.
        """
        self._check_amount(amount)
        k = MemoryKind(kind)
        with self._lock:
            if self._counts[k] < amount:
                raise ValueError(
                    f"cannot take {amount} bytes from {k.name}: only {self._counts[k]} counted"
                )
            self._counts[k] -= amount

    def move(self, amount: int, to: MemoryKind, frm: MemoryKind) -> None:
        """Move ``amount`` bytes from kind ``frm`` to kind ``to`` (the
        reference's argument order).

        Raises ``ValueError`` if ``frm`` holds fewer than ``amount`` bytes.
        """
        self._check_amount(amount)
        t, f = MemoryKind(to), MemoryKind(frm)
        with self._lock:
            if self._counts[f] < amount:
                raise ValueError(
                    f"cannot move {amount} bytes from {f.name}: only {self._counts[f]} counted"
                )
            self._counts[f] -= amount
            self._counts[t] += amount

    def get(self, kind: MemoryKind) -> int:
        """The bytes counted for one kind."""
        with self._lock:
            return self._counts[MemoryKind(kind)]

    def total(self) -> int:
        """The bytes counted over every kind."""
        with self._lock:
            return sum(self._counts)

    def snapshot(self) -> MemoryStats:
        """All counters at one instant, as a frozen ``MemoryStats``."""
        with self._lock:
            c = list(self._counts)
        return MemoryStats(*c)

    def _move_unchecked(self, amount: int, to: int, frm: int) -> None:
        """``move`` without validation, for the allocator's hot path: it has
        checked that ``frm`` holds at least ``amount`` (its books say so)."""
        with self._lock:
            counts = self._counts
            counts[frm] -= amount
            counts[to] += amount

    def _inc_unchecked(self, amount: int, kind: int) -> None:
        """``inc`` without validation, for the allocator's hot path."""
        with self._lock:
            self._counts[kind] += amount

    def __repr__(self) -> str:
        return f"MemoryAccounting({self.snapshot()})"


class UsageInfo(NamedTuple):
    """The value of a segment of a memory file's usage set: the pages' kind,
    whether they are known to be committed, and their reference count (0 only
    while they are being released)."""

    kind: MemoryKind
    known_committed: bool
    refs: int

    def __repr__(self) -> str:
        state = "committed" if self.known_committed else "uncommitted"
        if self.refs == 0:
            return f"releasing {state}"
        return f"{self.kind.name} {state} refs={self.refs}"


RELEASING = UsageInfo(MemoryKind.SYSTEM, False, 0)

# Shared values for the common "one reference" case, so the hot paths do not
# build a tuple per call: LIVE[kind][known_committed].
LIVE: tuple[tuple[UsageInfo, UsageInfo], ...] = tuple(
    (UsageInfo(k, False, 1), UsageInfo(k, True, 1)) for k in MemoryKind
)


def usage_mergeable(left: UsageInfo, right: UsageInfo) -> bool:
    """The usage set's merge policy: equal values merge, except releasing
    ones (each belongs to one release batch, which removes exactly what it
    inserted)."""
    if left is right:  # the shared LIVE values: the common case
        return left.refs != 0
    return left == right and left.refs != 0
