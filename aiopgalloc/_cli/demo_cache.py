"""The demo's workload: a sharded cache whose shards are evictable users of a
memory file, and the clients that work it.

The cache stores each value in its own allocation (``MemoryKind.PAGE_CACHE``)
and marks it evictable.  A shard's own offsets (the ``EvictableRange`` space
of the eviction protocol) are simply the file offsets of its values, so the
eviction figures of ``mf.stats()`` are real bytes and ``evict(er)`` finds the
values to drop with one bisection.  Each shard also keeps an LRU budget of
its own: a full shard replaces its least recently used values, which is how
freed pages (recycled or released by the allocator) appear without any
pressure at all.

Every value is a slice of a random pool chosen by (key, version); its CRC is
kept with the entry and checked on every hit, so the demo proves that what it
reads back is what it wrote.
"""

from __future__ import annotations

import random
import time
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import NamedTuple

import anyio
import anyio.lowlevel
from sortedcontainers import SortedList

from .. import PAGE_SIZE, AccessType, EvictableRange, FileRange, MemoryFile, MemoryKind

__all__ = ["CacheFigures", "DemoCache", "EvictRecord", "LoadGenerator", "ValuePool"]

_MAX_VALUE_PAGES = 16


class ValuePool:
    """Deterministic value bytes: the value of ``(key, version)`` is a slice of
    one random pool, so producing it costs a memcpy and no randomness."""

    def __init__(self, size: int = 2 << 20, seed: int = 7) -> None:
        self._pool = memoryview(random.Random(seed).randbytes(size))

    @staticmethod
    def size_of(key: int) -> int:
        """The length of every version of ``key``'s value: 1 to 16 pages, less
        a few bytes, so values are rarely a whole number of pages."""
        pages = (key * 2654435761 >> 7) % _MAX_VALUE_PAGES + 1
        return pages * PAGE_SIZE - key % 509

    def value(self, key: int, version: int) -> memoryview:
        """The bytes of ``(key, version)`` (a view into the pool; not copied)."""
        n = self.size_of(key)
        start = (key * 7919 + version * 104729) % (len(self._pool) - n)
        return self._pool[start : start + n]


class _Entry(NamedTuple):
    fr: FileRange
    length: int
    crc: int


class EvictRecord(NamedTuple):
    """One call of ``evict`` on a shard: when it began and ended (monotonic
    seconds), the values it dropped and their bytes (whole pages)."""

    began: float
    ended: float
    entries: int
    nbytes: int


@dataclass
class CacheFigures:
    """Counters the demo shows and summarises (plain ints; one instance
    shared by every shard)."""

    gets: int = 0
    hits: int = 0
    puts: int = 0
    verified: int = 0
    mismatches: int = 0
    lru_dropped: int = 0
    lru_dropped_bytes: int = 0
    evicted_entries: int = 0
    evicted_bytes: int = 0
    peak_bytes: int = 0
    peak_entries: int = 0
    evict_log: list[EvictRecord] = field(default_factory=list)


class _Shard:
    """One shard: an evictable user of the memory file with an LRU budget."""

    def __init__(self, mf: MemoryFile, budget: int, figures: CacheFigures) -> None:
        self.mf = mf
        self.budget = budget
        self.figures = figures
        self.entries: OrderedDict[int, _Entry] = OrderedDict()  # LRU order, oldest first
        self.starts: SortedList[int] = SortedList()  # file offsets of the values
        self.owner: dict[int, int] = {}  # file offset -> key
        self.nbytes = 0

    def get(self, key: int) -> bytes | None:
        """Read and verify ``key``'s value; ``None`` on a miss."""
        entry = self.entries.get(key)
        if entry is None:
            return None
        self.entries.move_to_end(key)
        with self.mf.view(entry.fr, AccessType.READ) as view:
            data = bytes(view[: entry.length])
        if zlib.crc32(data) == entry.crc:
            self.figures.verified += 1
        else:
            self.figures.mismatches += 1
        return data

    def put(self, key: int, value: memoryview) -> None:
        """Store ``value`` for ``key`` in fresh pages, replacing any old value
        and making room under the budget (least recently used first)."""
        if key in self.entries:
            self._drop(key)
        length = len(value)
        fr = self.mf.allocate(-(-length // PAGE_SIZE) * PAGE_SIZE, MemoryKind.PAGE_CACHE)
        with self.mf.view(fr) as view:
            view[:length] = value
        self.entries[key] = _Entry(fr, length, zlib.crc32(value))
        self.starts.add(fr.start)
        self.owner[fr.start] = key
        self.nbytes += fr.length
        self.mf.mark_evictable(self, EvictableRange(fr.start, fr.end))
        while self.nbytes > self.budget and len(self.entries) > 1:
            oldest = next(iter(self.entries))
            self.figures.lru_dropped += 1
            self.figures.lru_dropped_bytes += self.entries[oldest].fr.length
            self._drop(oldest)

    def _drop(self, key: int, *, unmark: bool = True) -> int:
        entry = self.entries.pop(key)
        fr = entry.fr
        self.starts.remove(fr.start)
        del self.owner[fr.start]
        self.nbytes -= fr.length
        if unmark:
            self.mf.mark_unevictable(self, EvictableRange(fr.start, fr.end))
        self.mf.dec_ref(fr)
        return fr.length

    def clear(self) -> None:
        """Drop every value (the service shutting its cache down)."""
        self.mf.mark_all_unevictable(self)
        for key in list(self.entries):
            self._drop(key, unmark=False)

    async def evict(self, er: EvictableRange) -> None:
        """The eviction callback: drop every value that overlaps ``er``.

        A graded eviction may cut ``er`` inside a value; the value is dropped
        whole and the part of it outside ``er`` withdrawn from eviction."""
        began = time.monotonic()
        i = self.starts.bisect_right(er.start) - 1
        if i < 0 or self.entries[self.owner[self.starts[i]]].fr.end <= er.start:
            i += 1
        doomed = []
        while i < len(self.starts) and self.starts[i] < er.end:
            doomed.append(self.owner[self.starts[i]])
            i += 1
        freed = 0
        for key in doomed:
            fr = self.entries[key].fr
            if fr.start < er.start:
                self.mf.mark_unevictable(self, EvictableRange(fr.start, er.start))
            if fr.end > er.end:
                self.mf.mark_unevictable(self, EvictableRange(er.end, fr.end))
            freed += self._drop(key, unmark=False)
        self.figures.evicted_entries += len(doomed)
        self.figures.evicted_bytes += freed
        self.figures.evict_log.append(EvictRecord(began, time.monotonic(), len(doomed), freed))


class DemoCache:
    """A cache of ``shards`` evictable shards sharing ``budget`` bytes."""

    def __init__(self, mf: MemoryFile, budget: int, shards: int = 4) -> None:
        self.figures = CacheFigures()
        self.budget = budget
        self.shards = [_Shard(mf, budget // shards, self.figures) for _ in range(shards)]

    @property
    def nbytes(self) -> int:
        """Bytes (whole pages) the cache holds now."""
        return sum(s.nbytes for s in self.shards)

    @property
    def entries(self) -> int:
        """Values the cache holds now."""
        return sum(len(s.entries) for s in self.shards)

    def get(self, key: int) -> bytes | None:
        """The value of ``key``, verified against its CRC, or ``None``."""
        self.figures.gets += 1
        value = self.shards[key % len(self.shards)].get(key)
        if value is not None:
            self.figures.hits += 1
        return value

    def put(self, key: int, value: memoryview) -> None:
        """Store ``value`` under ``key``."""
        self.figures.puts += 1
        self.shards[key % len(self.shards)].put(key, value)
        nbytes = self.nbytes
        if nbytes > self.figures.peak_bytes:
            self.figures.peak_bytes = nbytes
            self.figures.peak_entries = self.entries

    def clear(self) -> None:
        """Drop every value of every shard."""
        for shard in self.shards:
            shard.clear()


class LoadGenerator:
    """``clients`` tasks reading the cache (cache-aside: a miss stores the
    value) and now and then writing a new version of a key.

    Keys follow a skewed distribution over ``keys`` keys, so a few are hot
    and the working set is larger than the cache's budget."""

    def __init__(
        self, cache: DemoCache, pool: ValuePool, *, keys: int, clients: int = 4, seed: int = 1
    ) -> None:
        self.cache = cache
        self.pool = pool
        self.keys = keys
        self.clients = clients
        self.seed = seed
        self.ops = 0
        self.running = True
        self._versions: dict[int, int] = {}

    async def run(self) -> None:
        """Run the clients until ``running`` is set to False."""
        async with anyio.create_task_group() as tg:
            for i in range(self.clients):
                tg.start_soon(self._client, random.Random(self.seed * 1000 + i))

    async def _client(self, rng: random.Random) -> None:
        cache, pool, keys, versions = self.cache, self.pool, self.keys, self._versions
        while self.running:
            for _ in range(16):
                key = int(keys * rng.random() ** 4)
                if rng.random() < 0.05:
                    version = versions[key] = versions.get(key, 0) + 1
                    cache.put(key, pool.value(key, version))
                elif cache.get(key) is None:
                    cache.put(key, pool.value(key, versions.get(key, 0)))
            self.ops += 16
            await anyio.lowlevel.checkpoint()
