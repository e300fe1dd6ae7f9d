"""``MemoryFile.stats()``: one frozen snapshot of the allocator's figures."""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

from ._books import BooksFigures
from .eviction_api import EvictionStats
from .usage import MemoryKind, MemoryStats

__all__ = ["FileStats", "PageRun", "PressureStatus"]


@dataclass(frozen=True, slots=True)
class FileStats:
    """The allocator's figures at one instant (bytes unless said otherwise).

    - ``usage``: known-committed bytes per kind (what ``accounting`` holds).
    - ``file_size``: the file's size; ``committed_bytes``: what the kernel
      holds for it (fstat blocks); ``known_committed_bytes``: the part the
      allocator has observed.
    - ``live_bytes``: allocated pages with references; ``freed_bytes``: freed
      pages waiting for the releaser (recyclable); ``releasing_bytes``: pages
      being punched right now; ``release_backlog``: the two together.
    - ``segments``: segments in the usage set; ``largest_free_gap``: the
      largest run of pages inside the file that an allocation could take
      without growing it (clean or freed).
    - ``releases`` / ``bytes_released``: release batches and their bytes;
      ``recycled_bytes``: freed bytes handed out again (zeroed by hand);
      ``allocations``: successful ``allocate`` calls.
    - ``evictions``: the eviction figures; ``pressure_low`` /
      ``pressure_medium`` / ``pressure_critical``: pressure notifications
      received, by level.
    - ``pressure_source``: the name of the pressure source the file listens
      to (``""`` when none); ``pressure_note``: when there is none, why
      (``use_host_memcg_pressure`` is off, the eviction mode ignores it, or
      the service manager switched pressure handling off, as in
      ``"MEMORY_PRESSURE_WATCH=/dev/null: turned off by systemd"``).  Both
      are fixed when the file opens.
    """

    usage: MemoryStats
    file_size: int
    committed_bytes: int
    known_committed_bytes: int
    live_bytes: int
    freed_bytes: int
    releasing_bytes: int
    release_backlog: int
    segments: int
    largest_free_gap: int
    releases: int
    bytes_released: int
    recycled_bytes: int
    allocations: int
    evictions: EvictionStats
    pressure_low: int
    pressure_medium: int
    pressure_critical: int
    pressure_source: str = ""
    pressure_note: str = ""

    def as_dict(self) -> dict[str, Any]:
        """The figures as nested plain dicts (for JSON or logging)."""
        d = asdict(self)
        d["usage"] = self.usage.as_dict()
        return d

    @classmethod
    def make(
        cls,
        books: BooksFigures,
        committed_bytes: int,
        evictions: EvictionStats,
        pressure: PressureStatus,
    ) -> FileStats:
        """Assemble the figures of the file's parts (``MemoryFile.stats``)."""
        low, medium, critical = pressure.counts()
        return cls(
            usage=books.usage,
            file_size=books.file_size,
            committed_bytes=committed_bytes,
            known_committed_bytes=books.known_committed_bytes,
            live_bytes=books.live_bytes,
            freed_bytes=books.freed_bytes,
            releasing_bytes=books.releasing_bytes,
            release_backlog=books.freed_bytes + books.releasing_bytes,
            segments=books.segments,
            largest_free_gap=books.largest_free_gap,
            releases=books.releases,
            bytes_released=books.bytes_released,
            recycled_bytes=books.recycled_bytes,
            allocations=books.allocations,
            evictions=evictions,
            pressure_low=low,
            pressure_medium=medium,
            pressure_critical=critical,
            pressure_source=pressure.source,
            pressure_note=pressure.note,
        )


class PageRun(NamedTuple):
    """One run of pages of the same state in ``MemoryFile.page_map()``.

    ``state`` is ``"live"`` (allocated, ``refs`` >= 1), ``"freed"`` (waiting
    to be returned to the kernel; recyclable) or ``"releasing"`` (being
    punched out right now); ``kind`` is the live pages' ``MemoryKind``
    (``SYSTEM`` otherwise); ``committed`` says the allocator knows the pages
    hold memory."""

    start: int
    end: int
    state: str
    kind: MemoryKind
    refs: int
    committed: bool


class PressureStatus:
    """Which pressure source a file listens to (or why none), and how many
    notifications of each level it received.  Set once at open; counted by
    the pressure watcher; read by ``stats()`` from any thread."""

    __slots__ = ("_counts", "_lock", "note", "source")

    def __init__(self, source: str = "", note: str = "") -> None:
        self.source = source
        """The source's name, ``""`` when there is none."""
        self.note = note
        """Why there is none (``""`` when there is one)."""
        self._lock = threading.Lock()
        self._counts = [0, 0, 0]  # low, medium, critical

    def count(self, level: int) -> None:
        """One more notification of ``level`` (1 low, 2 medium, 3 critical)."""
        if 1 <= level <= 3:
            with self._lock:
                self._counts[level - 1] += 1

    def counts(self) -> tuple[int, int, int]:
        """Notifications received: (low, medium, critical)."""
        with self._lock:
            low, medium, critical = self._counts
        return low, medium, critical
