"""A map of a memory file for the demo: what each part of the file holds.

The allocator's ``mf.page_map()`` lists every run of live, freed and
releasing pages (``PageRun``s, in address order); clean pages are the gaps.
The demo reads the map from it, page by page, and remembers which pages were
ever used: a page that was used and is now in no run has been returned to
the kernel ("released").

Each page gets one state; the file is then cut into ``cells`` equal cells and
each cell shows the state that holds most of its pages.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from .. import PAGE_SIZE, MemoryKind
from ..stats import PageRun

__all__ = [
    "FREED",
    "LIVE_BASE",
    "NEVER_USED",
    "RELEASED",
    "CellMap",
    "FileMap",
    "segment_states",
]

NEVER_USED = 0
"""A page no allocation has touched yet (sparse: it costs nothing)."""
RELEASED = 1
"""A page that was used, then freed and returned to the kernel."""
FREED = 2
"""A freed page the releaser has not returned yet (it may be recycled)."""
LIVE_BASE = 3
"""Live pages have state ``LIVE_BASE + kind`` (one state per MemoryKind)."""


def segment_states(runs: Iterable[PageRun]) -> list[tuple[int, int, int]]:
    """Turn ``mf.page_map()`` into ``(start, end, state)`` triples: live
    runs by kind, freed and releasing runs as ``FREED``.  Pure."""
    out: list[tuple[int, int, int]] = []
    for run in runs:
        state = LIVE_BASE + int(MemoryKind(run.kind)) if run.state == "live" else FREED
        if 0 <= run.start < run.end:
            out.append((run.start, run.end, state))
    return out


@dataclass(frozen=True)
class CellMap:
    """The file cut into cells: ``states[i]`` is the dominant state of cell
    ``i``, which covers ``cell_size`` bytes."""

    states: bytes
    cell_size: int
    file_size: int


class FileMap:
    """Page states of one memory file, updated from ``mf.page_map()``."""

    def __init__(self) -> None:
        self._touched = bytearray()  # 1 for every page ever live or freed

    def update(self, runs: Iterable[PageRun], file_size: int, cells: int) -> CellMap:
        """Read the current map from ``runs`` (``mf.page_map()``) for a file
        of ``file_size`` bytes and cut it into ``cells`` cells.  Cost:
        O(pages) at C speed plus O(segments) in Python."""
        pages = max(1, file_size // PAGE_SIZE)
        if len(self._touched) < pages:
            self._touched.extend(bytes(pages - len(self._touched)))
        states = bytearray(self._touched[:pages])  # RELEASED where touched, else NEVER_USED
        touched = self._touched
        for start, end, state in segment_states(runs):
            a, b = start // PAGE_SIZE, min(pages, -(-end // PAGE_SIZE))
            if a >= b:
                continue
            states[a:b] = bytes((state,)) * (b - a)
            touched[a:b] = b"\x01" * (b - a)
        per_cell = max(1, -(-pages // max(1, cells)))
        out = bytearray()
        for c in range(0, pages, per_cell):
            chunk = bytes(states[c : c + per_cell])
            best, best_n = NEVER_USED, -1
            for state in sorted(set(chunk), reverse=True):  # ties go to live, then freed
                n = chunk.count(state)
                if n > best_n:
                    best, best_n = state, n
            out.append(best)
        return CellMap(bytes(out), per_cell * PAGE_SIZE, file_size)
