"""``MemoryFile.stats()``: one frozen snapshot of the allocator's figures."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from .eviction_api import EvictionStats
from .host import syscalls
from .usage import MemoryStats

if TYPE_CHECKING:
    from .memory_file import MemoryFile

__all__ = ["FileStats", "take_stats"]


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


def take_stats(mf: MemoryFile) -> FileStats:
    """The body of ``MemoryFile.stats()``: one fstat, then one pass over the
    books under the lock (O(segments), at C speed for the gap search)."""
    with mf._io():
        committed = syscalls.fstat_blocks_bytes(mf._fd)
    assert mf._evictions is not None
    evictions = mf._evictions.stats()
    with mf._mu:
        mf._check_open()
        usage = mf._usage
        live = usage.total_length - mf._releasing
        largest = 0
        cur = 0
        size = mf._file_size
        waste = mf._waste
        # A free run is a gap of the usage set (clean and freed pages alike).
        for s, e, _ in usage:
            if s - cur > largest:
                largest = s - cur
            cur = e
        if size - cur > largest:
            largest = size - cur
        pressure = dict(mf._pressure_counts)
        source, note = mf._pressure_choice
        return FileStats(
            usage=mf.accounting.snapshot(),
            file_size=size,
            committed_bytes=committed,
            known_committed_bytes=mf._known_committed,
            live_bytes=live,
            freed_bytes=waste.total_length,
            releasing_bytes=mf._releasing,
            release_backlog=waste.total_length + mf._releasing,
            segments=len(usage),
            largest_free_gap=largest,
            releases=mf.releases,
            bytes_released=mf.bytes_released,
            recycled_bytes=mf.recycled_bytes,
            allocations=mf.allocations,
            evictions=evictions,
            pressure_low=pressure.get(1, 0),
            pressure_medium=pressure.get(2, 0),
            pressure_critical=pressure.get(3, 0),
            pressure_source=source,
            pressure_note=note,
        )
