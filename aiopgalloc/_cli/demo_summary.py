"""The demo's closing words: what happened, in plain sentences, from the
figures of one run (:class:`RunFacts`).  Pure: tested on made-up facts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .. import FileStats
from .demo_view import fmt_bytes

__all__ = ["RunFacts", "summarize"]


@dataclass(frozen=True)
class RunFacts:
    """The figures of one run that the summary speaks of."""

    backend: str
    seconds: float
    real: bool
    manual_reason: str | None
    cgroup: str | None
    cgroup_version: int | None
    limit: int | None
    source: str
    reader_bytes: int
    reader_passes: int
    reader_seconds: float
    reader_room: int | None
    clients: int
    requests: int
    hits: int
    verified: int
    mismatches: int
    peak_bytes: int
    peak_entries: int
    peak_committed: int
    peak_file: int
    lru_dropped: int
    lru_dropped_bytes: int
    stats: FileStats
    evicted_entries: int
    evicted_bytes: int
    first_wave: tuple[int, float, float] | None  # bytes, duration s, delay s
    session_table: int
    recovery_peak: int
    cgroup_figures: dict[str, Any] = field(default_factory=dict)
    fraction_low: float = 0.25
    fraction_medium: float = 0.5

    @property
    def notifications(self) -> int:
        """Pressure notifications the allocator received."""
        s = self.stats
        return s.pressure_low + s.pressure_medium + s.pressure_critical

    @property
    def all_released(self) -> bool:
        """Nothing committed and nothing waiting for release at the end."""
        return self.stats.committed_bytes == 0 and self.stats.release_backlog == 0

    @property
    def ok(self) -> bool:
        """Every check passed: reads verified, every page back to the kernel."""
        return self.mismatches == 0 and self.all_released


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 10 else f"{seconds:.1f} s"


def _times(n: int) -> str:
    return "once" if n == 1 else "twice" if n == 2 else f"{n:,} times"


def summarize(f: RunFacts) -> list[str]:
    """Paragraphs that explain the run to someone who has not read the code."""
    s = f.stats
    out: list[str] = []
    hit = 100 * f.hits / f.requests if f.requests else 0.0
    checked = (
        f"Every one of the {f.verified:,} hits read back exactly the bytes that were written "
        "(CRC-checked)"
        if f.mismatches == 0
        else f"{f.mismatches:,} of {f.verified + f.mismatches:,} hits read back WRONG bytes"
    )
    out.append(
        f"{f.clients} clients made {f.requests:,} requests to the cache on {f.backend} in "
        f"{f.seconds:.1f} s ({hit:.0f}% hits). Each value lives in its own page-aligned "
        f"allocation of one memory file; at its peak the cache held "
        f"{fmt_bytes(f.peak_bytes)} in {f.peak_entries:,} values, and the memory file had "
        f"{fmt_bytes(f.peak_committed)} committed (its size, which costs nothing until "
        f"written, reached {fmt_bytes(f.peak_file)}). {checked}."
    )
    released = s.bytes_released
    out.append(
        f"The cache's own LRU replaced {f.lru_dropped:,} values "
        f"({fmt_bytes(f.lru_dropped_bytes)}). Freed pages were reused by new values "
        f"({fmt_bytes(s.recycled_bytes)} recycled, zeroed first) or returned to the kernel by "
        f"the background releaser, off the event loop ({fmt_bytes(released)} in "
        f"{s.releases:,} batches, the final clear-out included)."
    )
    levels = f"low {s.pressure_low}, medium {s.pressure_medium}, critical {s.pressure_critical}"
    if f.real:
        hits = f.cgroup_figures.get("limit_hits")
        hit_text = f" The cgroup hit its limit {_times(hits)}." if hits else ""
        out.append(
            f"Then real memory pressure: this process ran inside memory cgroup {f.cgroup} "
            f"(cgroup v{f.cgroup_version}, limit {fmt_bytes(f.limit or 0)}) and a reader in the "
            f"same cgroup streamed {fmt_bytes(f.reader_bytes)} (a sparse file, so no disk I/O) "
            f"through the page cache, {_times(f.reader_passes)}, "
            f"{f.reader_seconds:.2f} s in all.{hit_text} "
            + (
                f"The kernel signalled memory pressure: the allocator received "
                f"{f.notifications} notifications ({levels}) from {f.source}."
                if f.notifications
                else f"The kernel sent no pressure notification through {f.source} "
                "during the reads, so nothing was evicted."
            )
        )
    else:
        out.append(
            f"Then memory pressure, simulated: {f.manual_reason}, so the demo called "
            f"ManualPressure.notify() at rising levels in place of the kernel; the allocator "
            f"received {f.notifications} notifications ({levels}). With real pressure the "
            "same path runs, fed by the kernel (run as root where a memory cgroup can be made)."
        )
    if f.notifications:
        wave = ""
        if f.first_wave is not None:
            nbytes, took, delay = f.first_wave
            began = "the pressure began"
            if f.real:
                began = "the reader started"
                if f.reader_room is not None:
                    began += (
                        f" (it first had to fill the {fmt_bytes(f.reader_room)} still free in "
                        "the cgroup)"
                    )
            wave = (
                f" The first evict call came {_ms(delay)} after {began}; within {_ms(took)} "
                f"of it the cache had given back {fmt_bytes(nbytes)}."
            )
        out.append(
            f"Each notification made the allocator ask the cache's shards to shrink "
            f"(await shard.evict(range)): {f.fraction_low:.0%} of their evictable bytes at "
            f"low, {f.fraction_medium:.0%} at medium, all of it at critical.{wave} In all the "
            f"cache gave back {fmt_bytes(f.evicted_bytes)} ({f.evicted_entries:,} values) in "
            f"{s.evictions.evict_calls:,} evict calls"
            + (f", {s.evictions.failed} of which failed" if s.evictions.failed else "")
            + (
                ", more than its size: the clients kept refilling it while the pressure lasted"
                if f.evicted_bytes > f.peak_bytes
                else ""
            )
            + f". The {fmt_bytes(f.session_table)} session table was left alone: it was never "
            "marked evictable."
        )
    if f.recovery_peak:
        out.append(
            f"Once the pressure was over the clients went on and the cache grew back to "
            f"{fmt_bytes(f.recovery_peak)}: a cache is rebuilt on misses."
        )
    if f.all_released:
        oom = f.cgroup_figures.get("oom_kills")
        oom_text = " No process was OOM-killed." if f.real and not oom else ""
        out.append(
            f"At the end the clients stopped and the cache was cleared: every freed page went "
            f"back to the kernel. The file holds 0 bytes now ({fmt_bytes(f.peak_committed)} at "
            f"its peak) and nothing waits for release.{oom_text}"
        )
    else:
        out.append(
            f"At the end {fmt_bytes(s.committed_bytes)} were still committed and "
            f"{fmt_bytes(s.release_backlog)} waited for release: that should not happen "
            "(exit status 1)."
        )
    return out
