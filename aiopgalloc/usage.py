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
from collections.abc import Callable
from dataclasses import dataclass, fields

__all__ = ["AccountingView", "MemoryAccounting", "MemoryKind", "MemoryStats"]


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

    def __repr__(self) -> str:
        return f"MemoryAccounting({self.snapshot()})"


class AccountingView:
    """A read-only view of a memory file's per-kind accounting
    (``mf.accounting``): the figures belong to the allocator's books, which
    only the allocator changes.  Every method takes the file's lock briefly
    and is O(1)."""

    __slots__ = ("_source",)

    def __init__(self, source: Callable[[], MemoryStats]) -> None:
        self._source = source

    def snapshot(self) -> MemoryStats:
        """All counters at one instant, as a frozen ``MemoryStats``."""
        return self._source()

    def get(self, kind: MemoryKind) -> int:
        """The bytes counted for one kind."""
        return self._source()[MemoryKind(kind)]

    def total(self) -> int:
        """The bytes counted over every kind."""
        return self._source().total

    def __repr__(self) -> str:
        return f"AccountingView({self.snapshot()})"
