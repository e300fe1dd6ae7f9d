"""Replacement policies of ``PageCache``: SIEVE (shipped) and LRU (the
reference it was measured against, kept for the hit-ratio benchmark).

Both keep the cache's entries in one circular doubly-linked list with a
sentinel, newest next to the sentinel's ``older`` side and oldest next to
its ``newer`` side.  The entries carry the links themselves (``newer``,
``older``) and SIEVE's ``visited`` bit, so no policy allocates anything per
operation.  Every method is O(1), except ``victim``, which is amortised O(1)
(SIEVE's hand clears at most one visited bit per hit it passes over).

Not thread-safe: the cache calls them under its own lock.  ``victim`` only
chooses (and, for SIEVE, moves the hand and clears bits on the way); the
caller then calls ``remove`` on the entry it evicts.

SIEVE (Zhang et al., NSDI 2024): a FIFO queue and a hand.  A hit sets the
entry's ``visited`` bit and moves nothing.  To choose a victim the hand walks
from where it stopped towards newer entries (from the oldest again when it
passes the newest), clearing ``visited`` bits, and stops at the first entry
whose bit is clear.  New entries go in at the newest end.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["POLICIES", "Linked", "LruPolicy", "Policy", "SievePolicy"]


class Linked:
    """What a policy links: an entry with ``newer``/``older`` links and a
    ``visited`` bit.  ``PageCache``'s entries subclass it."""

    __slots__ = ("newer", "older", "visited")

    def __init__(self) -> None:
        self.newer: Linked = self
        self.older: Linked = self
        self.visited = False


class Policy(Protocol):
    """The interface the cache uses (all O(1), ``victim`` amortised)."""

    def insert(self, e: Linked) -> None: ...
    def hit(self, e: Linked) -> None: ...
    def remove(self, e: Linked) -> None: ...
    def victim(self) -> Linked | None: ...


class _Ring:
    __slots__ = ("_s",)

    def __init__(self) -> None:
        # The sentinel: _s.newer is the oldest entry, _s.older the newest.
        self._s = Linked()

    def insert(self, e: Linked) -> None:
        s = self._s
        newest = s.older
        e.older = newest
        e.newer = s
        newest.newer = e
        s.older = e
        e.visited = False

    def _unlink(self, e: Linked) -> None:
        e.older.newer = e.newer
        e.newer.older = e.older
        e.newer = e.older = e

    def oldest_first(self) -> list[Linked]:
        """Every entry, oldest first (O(n): for tests)."""
        out = []
        e = self._s.newer
        while e is not self._s:
            out.append(e)
            e = e.newer
        return out


class LruPolicy(_Ring):
    """Least recently used: a hit moves the entry to the newest end; the
    victim is the oldest."""

    __slots__ = ()

    def hit(self, e: Linked) -> None:
        s = self._s
        if s.older is e:
            return
        self._unlink(e)
        self.insert(e)

    def remove(self, e: Linked) -> None:
        self._unlink(e)

    def victim(self) -> Linked | None:
        e = self._s.newer
        return None if e is self._s else e


class SievePolicy(_Ring):
    """SIEVE: see the module docstring."""

    __slots__ = ("_hand",)

    def __init__(self) -> None:
        super().__init__()
        self._hand: Linked = self._s  # the sentinel: start from the oldest

    def hit(self, e: Linked) -> None:
        e.visited = True

    def remove(self, e: Linked) -> None:
        if self._hand is e:
            self._hand = e.newer
        self._unlink(e)

    def victim(self) -> Linked | None:
        s = self._s
        if s.newer is s:
            return None
        e = self._hand
        if e is s:
            e = s.newer
        while e.visited:
            e.visited = False
            e = e.newer
            if e is s:
                e = s.newer
        self._hand = e
        return e


POLICIES: dict[str, type[LruPolicy] | type[SievePolicy]] = {
    "lru": LruPolicy,
    "sieve": SievePolicy,
}
"""The policies by name (``PageCache`` ships ``sieve``; ``lru`` is the
reference the hit-ratio benchmark compares it with)."""
