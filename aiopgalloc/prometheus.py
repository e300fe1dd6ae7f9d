"""Prometheus metrics for a memory file (the optional ``prometheus`` extra).

``register_collector(mf)`` adds a collector to a ``prometheus_client``
registry.  Each scrape takes one ``mf.stats()`` snapshot (one fstat and one
pass over the usage set, under the file's lock) and turns it into metric
families, so the figures of one scrape are consistent with each other.
Scrapes may come from any thread (``prometheus_client``'s HTTP server runs
its own); ``stats()`` is thread-safe.

The collector holds the file weakly and yields nothing once the file is
closed (or gone): a scrape never fails because of it.  Metric names, with
the default prefix ``aiopgalloc``:

Gauges (bytes unless said otherwise):
``_usage_bytes{kind}`` (known-committed, per ``MemoryKind``),
``_file_size_bytes``, ``_committed_bytes`` (what the kernel holds),
``_known_committed_bytes``, ``_live_bytes``, ``_freed_bytes``,
``_releasing_bytes``, ``_release_backlog_bytes``, ``_segments`` (count),
``_largest_free_gap_bytes``, ``_evictable_bytes``, ``_evictable_users``
(count), ``_evictions_outstanding`` (count).

Counters: ``_releases_total``, ``_released_bytes_total``,
``_recycled_bytes_total``, ``_allocations_total``,
``_evictions_started_total``, ``_evictions_finished_total``,
``_evictions_failed_total`` (``evict`` calls that raised),
``_evict_calls_total``, ``_evicted_bytes_total``,
``_pressure_notifications_total{level}`` (low, medium, critical).
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Iterator

try:
    from prometheus_client import REGISTRY, CollectorRegistry
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
    from prometheus_client.metrics_core import Metric
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "aiopgalloc.prometheus needs prometheus_client: pip install 'aiopgalloc[prometheus]'"
    ) from exc

from .errors import ClosedError
from .memory_file import MemoryFile
from .stats import FileStats
from .usage import MemoryKind

__all__ = ["MemoryFileCollector", "register_collector"]

_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")

# (suffix, help, FileStats field) of the plain gauges.
_GAUGES = [
    ("file_size_bytes", "Size of the memory file.", "file_size"),
    ("committed_bytes", "Bytes the kernel holds for the file (fstat blocks).", "committed_bytes"),
    (
        "known_committed_bytes",
        "Committed bytes the allocator has observed.",
        "known_committed_bytes",
    ),
    ("live_bytes", "Allocated bytes with references.", "live_bytes"),
    ("freed_bytes", "Freed bytes waiting to be released (recyclable).", "freed_bytes"),
    ("releasing_bytes", "Bytes being returned to the kernel right now.", "releasing_bytes"),
    ("release_backlog_bytes", "Freed plus releasing bytes.", "release_backlog"),
    ("segments", "Segments in the usage set.", "segments"),
    (
        "largest_free_gap_bytes",
        "Largest run an allocation could take without growing the file.",
        "largest_free_gap",
    ),
]

_COUNTERS = [
    ("releases", "Release batches performed.", "releases"),
    ("released_bytes", "Bytes returned to the kernel.", "bytes_released"),
    ("recycled_bytes", "Freed bytes handed out again (zeroed by hand).", "recycled_bytes"),
    ("allocations", "Successful allocate calls.", "allocations"),
]

# (suffix, help, EvictionStats field, is a counter)
_EVICTION = [
    ("evictable_bytes", "Bytes marked evictable, not yet handed to evict.", "evictable_bytes", 0),
    ("evictable_users", "Users with evictable ranges or an eviction.", "users", 0),
    ("evictions_outstanding", "Eviction tasks started, not finished.", "outstanding", 0),
    ("evictions_started", "Eviction tasks started.", "started", 1),
    ("evictions_finished", "Eviction tasks finished.", "finished", 1),
    ("evictions_failed", "evict calls that raised.", "failed", 1),
    ("evict_calls", "Calls of evict.", "evict_calls", 1),
    ("evicted_bytes", "Bytes of evict calls that returned normally.", "evicted_bytes", 1),
]

_LEVELS = [
    ("low", "pressure_low"),
    ("medium", "pressure_medium"),
    ("critical", "pressure_critical"),
]


class MemoryFileCollector:
    """A ``prometheus_client`` collector for one ``MemoryFile``.

    Holds the file weakly.  ``collect()`` takes one ``mf.stats()`` snapshot
    (cost: one fstat and O(segments) under the file's lock) and yields the
    families listed in the module docstring; nothing for a closed file.
    ``describe()`` yields the same families without samples, so a registry
    learns the names without taking a snapshot.
    """

    def __init__(self, mf: MemoryFile, prefix: str = "aiopgalloc") -> None:
        """Raises ``TypeError`` if ``mf`` is not a ``MemoryFile``,
        ``ValueError`` for a prefix that is not a valid metric name."""
        if not isinstance(mf, MemoryFile):
            raise TypeError(f"expected a MemoryFile, got {type(mf).__name__}")
        if not isinstance(prefix, str) or not _NAME.match(prefix):
            raise ValueError(f"prefix {prefix!r} is not a valid Prometheus metric name")
        self._mf = weakref.ref(mf)
        self._prefix = prefix

    def _families(self, st: FileStats | None) -> Iterator[Metric]:
        p = self._prefix
        usage = GaugeMetricFamily(
            f"{p}_usage_bytes", "Known-committed bytes per memory kind.", labels=["kind"]
        )
        if st is not None:
            for kind in MemoryKind:
                usage.add_metric([kind.name.lower()], st.usage[kind])
        yield usage
        for suffix, doc, field in _GAUGES:
            value = None if st is None else getattr(st, field)
            yield GaugeMetricFamily(f"{p}_{suffix}", doc, value=value)
        for suffix, doc, field in _COUNTERS:
            value = None if st is None else getattr(st, field)
            yield CounterMetricFamily(f"{p}_{suffix}", doc, value=value)
        for suffix, doc, field, counter in _EVICTION:
            value = None if st is None else getattr(st.evictions, field)
            family = CounterMetricFamily if counter else GaugeMetricFamily
            yield family(f"{p}_{suffix}", doc, value=value)
        pressure = CounterMetricFamily(
            f"{p}_pressure_notifications",
            "Memory pressure notifications received, by level.",
            labels=["level"],
        )
        if st is not None:
            for level, field in _LEVELS:
                pressure.add_metric([level], getattr(st, field))
        yield pressure

    def describe(self) -> Iterator[Metric]:
        """The metric families without samples (for registration)."""
        return self._families(None)

    def collect(self) -> Iterator[Metric]:
        """The metric families of one ``stats()`` snapshot; none once the
        file is closed.  Never raises for a closed file."""
        mf = self._mf()
        if mf is None or mf.closed:
            return iter(())
        try:
            st = mf.stats()
        except (ClosedError, OSError):
            return iter(())  # closed between the check and the snapshot
        return self._families(st)


def register_collector(
    mf: MemoryFile, registry: CollectorRegistry | None = None, prefix: str = "aiopgalloc"
) -> MemoryFileCollector:
    """Export ``mf.stats()`` to Prometheus: make a ``MemoryFileCollector``,
    register it in ``registry`` (default: ``prometheus_client.REGISTRY``)
    and return it (``registry.unregister(collector)`` removes it).

    Each file needs its own prefix (or registry): the names would clash.
    Cost: nothing until scraped; each scrape costs one ``stats()``.

    Raises ``TypeError``/``ValueError`` as ``MemoryFileCollector``, and
    ``ValueError`` from the registry when the names are already registered.
    """
    collector = MemoryFileCollector(mf, prefix)
    (REGISTRY if registry is None else registry).register(collector)
    return collector
