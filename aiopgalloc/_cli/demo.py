"""``python -m aiopgalloc demo``: the main use case, end to end.

An evictable cache keeps values in a memory file while a load generator
works it; then memory pressure arrives (through the manual pressure source,
so it runs anywhere) and the cache sheds.  Prints what the allocator holds
at each stage.
"""

from __future__ import annotations

import argparse
import os
import random

import anyio

from .. import (
    PAGE_SIZE,
    DelayedEviction,
    EvictableRange,
    FileRange,
    MemoryFile,
    MemoryFileOpts,
    MemoryKind,
    open_memory_file,
)
from ..host import pressure


def _mib(n: int) -> str:
    return f"{n / (1 << 20):8.1f} MiB"


class _DemoCache:
    """A toy cache: each value lives in its own allocation; every entry is
    evictable, and ``evict`` drops the entries in the range it is given."""

    def __init__(self, mf: MemoryFile) -> None:
        self.mf = mf
        self.entries: dict[int, FileRange] = {}  # slot -> pages
        self.evicted = 0

    def put(self, slot: int, value: bytes) -> None:
        old = self.entries.pop(slot, None)
        if old is not None:
            self.mf.dec_ref(old)
        pages = -(-len(value) // PAGE_SIZE) * PAGE_SIZE
        fr = self.mf.allocate(pages, MemoryKind.PAGE_CACHE)
        pos = 0
        for view in self.mf.map_internal(fr):  # one view per chunk crossed
            n = min(len(view), len(value) - pos)
            view[:n] = value[pos : pos + n]
            pos += n
        self.entries[slot] = fr
        # Slots are the cache's own offsets: one "page" of slot space each.
        self.mf.mark_evictable(self, EvictableRange(slot, slot + 1))

    def get(self, slot: int) -> bytes | None:
        fr = self.entries.get(slot)
        if fr is None:
            return None
        return b"".join(bytes(v) for v in self.mf.map_internal(fr))

    async def evict(self, er: EvictableRange) -> None:
        for slot in range(er.start, er.end):
            fr = self.entries.pop(slot, None)
            if fr is not None:
                self.mf.dec_ref(fr)
                self.evicted += 1


def _report(mf: MemoryFile, stage: str) -> None:
    stats = mf.accounting.snapshot()
    print(
        f"{stage:<28} committed {_mib(mf.total_usage())}  file {_mib(mf.total_size())}  "
        f"page cache {_mib(stats.page_cache)}  waiting release {_mib(mf.reclaim_pending())}"
    )


async def demo(entries: int, seconds: float) -> int:
    """Run the demo; returns the exit code."""
    source = pressure.ManualPressure()
    opts = MemoryFileOpts(
        delayed_eviction=DelayedEviction.ENABLED,
        use_host_memcg_pressure=True,
        pressure_source=source,
    )
    print(f"aiopgalloc demo: {entries} cache entries, pressure through the manual source\n")
    async with open_memory_file(opts=opts) as mf:
        cache = _DemoCache(mf)
        rng = random.Random(7)
        _report(mf, "opened")
        for slot in range(entries):
            cache.put(slot, os.urandom(rng.randint(1, 16) * PAGE_SIZE - rng.randint(0, 100)))
        await mf.update_usage()
        _report(mf, "cache filled")
        # Load: overwrite and read random entries for a while.
        ops = 0
        with anyio.move_on_after(seconds):
            while True:
                for _ in range(200):
                    slot = rng.randrange(entries)
                    if rng.random() < 0.3:
                        cache.put(slot, os.urandom(rng.randint(1, 16) * PAGE_SIZE))
                    else:
                        cache.get(slot)
                    ops += 1
                await anyio.sleep(0)
        await mf.update_usage()
        _report(mf, f"after {ops} operations")
        print("\nmemory pressure arrives (critical) ...")
        source.notify(pressure.PressureLevel.CRITICAL)
        with anyio.fail_after(10):
            while cache.entries:
                await anyio.sleep(0.01)
            await mf.wait_for_evictions()
            await mf.wait_for_reclaim()
        await mf.update_usage()
        _report(mf, "after eviction and release")
        print(
            f"\n{cache.evicted} entries evicted; every freed page went back to the kernel: "
            f"{'yes' if mf.total_usage() == 0 else 'no'}"
        )
        return 0 if mf.total_usage() == 0 else 1


def main(argv: list[str] | None = None) -> int:
    """``python -m aiopgalloc demo``."""
    parser = argparse.ArgumentParser(prog="python -m aiopgalloc demo")
    parser.add_argument("--entries", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    args = parser.parse_args(argv)
    code: int = anyio.run(demo, args.entries, args.seconds, backend=args.backend)
    return code
