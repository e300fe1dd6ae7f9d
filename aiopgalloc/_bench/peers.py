"""Peers that a user would write for themselves, and the helpers the bare
baselines need.

``FirstFitArena`` is the hand-written allocator of workload 1: what people
write when they want one big buffer carved up, honestly and reasonably
efficiently done: a sorted list of free runs, first fit by a linear scan,
coalescing on free with ``bisect``.  It neither zeroes reused memory nor
ever gives memory back to the kernel (that is what people write; aiopgalloc
does both).
"""

from __future__ import annotations

import mmap
from bisect import bisect_left

__all__ = ["FirstFitArena"]


class FirstFitArena:
    """A first-fit free list over one anonymous mapping of ``capacity`` bytes.

    Free runs are two parallel sorted lists (``starts`` and ``lengths``);
    ``alloc`` scans ``lengths`` from the lowest address for the first run big
    enough (O(free runs)); ``free`` finds the run's place with ``bisect`` and
    merges it with its neighbours (O(log runs) plus a list insert or delete).
    ``view`` is a writable memoryview of the whole arena.
    """

    def __init__(self, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError("capacity must be > 0")
        self.capacity = capacity
        self._map = mmap.mmap(-1, capacity)
        self.view = memoryview(self._map)
        self.starts: list[int] = [0]
        self.lengths: list[int] = [capacity]

    def alloc(self, n: int) -> int:
        """Return the offset of ``n`` free bytes, the lowest that fits.
        Raises ``MemoryError`` when no free run is big enough."""
        lengths = self.lengths
        for i, ln in enumerate(lengths):  # noqa: B007 (i is the answer, used below)
            if ln >= n:
                break
        else:
            raise MemoryError(f"arena of {self.capacity} bytes has no run of {n} free")
        starts = self.starts
        s = starts[i]
        if ln == n:
            del starts[i]
            del lengths[i]
        else:
            starts[i] = s + n
            lengths[i] = ln - n
        return s

    def free(self, start: int, n: int) -> None:
        """Give back ``[start, start + n)``, merging it with free neighbours.
        The range must be one that ``alloc`` returned (not checked)."""
        starts, lengths = self.starts, self.lengths
        i = bisect_left(starts, start)
        end = start + n
        joins_prev = i > 0 and starts[i - 1] + lengths[i - 1] == start
        joins_next = i < len(starts) and starts[i] == end
        if joins_prev and joins_next:
            lengths[i - 1] += n + lengths[i]
            del starts[i]
            del lengths[i]
        elif joins_prev:
            lengths[i - 1] += n
        elif joins_next:
            starts[i] = start
            lengths[i] += n
        else:
            starts.insert(i, start)
            lengths.insert(i, n)

    @property
    def free_runs(self) -> int:
        """How many separate free runs there are (the scan's length)."""
        return len(self.starts)

    @property
    def free_bytes(self) -> int:
        """Bytes not allocated."""
        return sum(self.lengths)

    def close(self) -> None:
        """Unmap the arena (every view of it must be gone)."""
        self.view.release()
        self._map.close()
