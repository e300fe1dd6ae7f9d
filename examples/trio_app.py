"""The same API on trio: nursery, allocate, map, evictable user, pressure.

    python examples/trio_app.py      (needs trio: pip install 'aiopgalloc[trio]')

aiopgalloc is written against anyio, so a trio program uses it unchanged:
``open_memory_file`` starts its background tasks (the releaser, the
evictions, the pressure watcher) in a task group that runs on trio's own
scheduler.  This program:

1. opens a memory file that sheds evictable memory under pressure, with a
   ``ManualPressure`` source standing in for the kernel;
2. runs four producer tasks in a trio nursery, each storing 64 thumbnails
   (16 to 64 KiB) in a ``ThumbnailCache``, an evictable user;
3. allocates a 2 MiB pinned buffer that is never evictable;
4. signals medium pressure (half of the evictable bytes go), then critical
   (all of them), and waits for the evictions;
5. frees the pinned buffer, waits for the releaser and checks that the file
   holds no memory any more.
"""

from __future__ import annotations

import random

import trio

from aiopgalloc import (
    DelayedEviction,
    EvictableRange,
    FileRange,
    ManualPressure,
    MemoryFile,
    MemoryFileOpts,
    MemoryKind,
    PressureLevel,
    open_memory_file,
    page_round_up,
)

KiB = 1024
MiB = 1 << 20


class ThumbnailCache:
    """An evictable user: each thumbnail in its own allocation, marked
    evictable in the user's own offsets (here: the file offsets)."""

    def __init__(self, mf: MemoryFile) -> None:
        self.mf = mf
        self.items: dict[str, FileRange] = {}
        self.evict_calls = 0

    def put(self, name: str, data: bytes) -> None:
        fr = self.mf.allocate(page_round_up(len(data)), MemoryKind.PAGE_CACHE)
        with self.mf.view(fr) as view:  # one buffer over the pages
            view[: len(data)] = data
        self.items[name] = fr
        self.mf.mark_evictable(self, EvictableRange(fr.start, fr.end))

    @property
    def nbytes(self) -> int:
        return sum(fr.length for fr in self.items.values())

    async def evict(self, er: EvictableRange) -> None:
        """Drop the thumbnails whose pages overlap ``er`` (from the end of the
        file first: that is the order the allocator asks in)."""
        self.evict_calls += 1
        for name, fr in list(self.items.items()):
            if fr.start < er.end and er.start < fr.end:
                del self.items[name]
                if fr.start < er.start:
                    self.mf.mark_unevictable(self, EvictableRange(fr.start, er.start))
                if fr.end > er.end:
                    self.mf.mark_unevictable(self, EvictableRange(er.end, fr.end))
                self.mf.dec_ref(fr)
        await trio.lowlevel.checkpoint()


async def producer(cache: ThumbnailCache, n: int, seed: int) -> None:
    rng = random.Random(seed)
    for i in range(n):
        cache.put(f"thumb-{seed}-{i}", rng.randbytes(rng.randint(16, 64) * KiB))
        await trio.lowlevel.checkpoint()  # let the other producers run


async def pressure(mf: MemoryFile, source: ManualPressure, level: PressureLevel) -> None:
    """Notify ``level`` and wait until the allocator has acted on it."""
    before = mf.stats().evictions.pressure_events
    source.notify(level)
    with trio.fail_after(5):  # a cancel scope bounds both waits
        # No event says "the watcher took it": the figure is polled.
        while mf.stats().evictions.pressure_events == before:  # noqa: ASYNC110
            await trio.sleep(0.001)
        await mf.wait_for_evictions()


async def main() -> None:
    source = ManualPressure()
    opts = MemoryFileOpts(
        delayed_eviction=DelayedEviction.ENABLED,
        use_host_memcg_pressure=True,
        pressure_source=source,
        evict_fraction_medium=0.5,
    )
    async with open_memory_file(opts=opts) as mf:
        cache = ThumbnailCache(mf)
        async with trio.open_nursery() as nursery:
            for seed in range(4):
                nursery.start_soon(producer, cache, 64, seed)
        pinned = mf.allocate(2 * MiB, MemoryKind.ANONYMOUS)
        with mf.view(pinned) as view:
            view[:] = b"\x01" * len(view)
        await mf.update_usage()
        usage = mf.accounting.snapshot()
        print(
            f"trio {trio.__version__}: {len(cache.items)} thumbnails, "
            f"{cache.nbytes / MiB:.1f} MiB (page cache {usage.page_cache / MiB:.1f} MiB, "
            f"anonymous {usage.anonymous / MiB:.1f} MiB committed)"
        )
        await pressure(mf, source, PressureLevel.MEDIUM)
        print(
            f"medium pressure: {len(cache.items)} thumbnails left, {cache.nbytes / MiB:.1f} MiB "
            f"(evict calls so far: {cache.evict_calls})"
        )
        await pressure(mf, source, PressureLevel.CRITICAL)
        print(f"critical pressure: {len(cache.items)} thumbnails left")
        await mf.wait_for_reclaim()
        print(f"committed now {mf.total_usage() / MiB:.1f} MiB: the 2 MiB pinned buffer")
        mf.dec_ref(pinned)
        await mf.wait_for_reclaim()
        stats = mf.stats()
        print(
            f"pinned buffer freed: {stats.committed_bytes} bytes committed; "
            f"{stats.bytes_released / MiB:.1f} MiB went back to the kernel in "
            f"{stats.releases} batches"
        )
        assert not cache.items and stats.committed_bytes == 0


if __name__ == "__main__":
    trio.run(main)
