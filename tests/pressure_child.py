"""A service under real memory pressure, run by tests/test_pressure_e2e.py.

    python tests/pressure_child.py --cgroup DIR [--backend asyncio|asyncio+uvloop|trio]
        [--hold-mib 16] [--timeout 10]

What it does, in order:

1. imports everything it will need (so the interpreter's own memory stays
   charged to the cgroup it started in), then moves itself into the memory
   cgroup ``DIR`` (``cgroup.procs``);
2. opens a memory file with ``use_host_memcg_pressure=True`` and no source
   of its own, so the library picks the host's best source for the cgroup
   the process now sits in (cgroup v1 ``memory.pressure_level`` on machines
   like this project's);
3. fills four evictable caches, ``--hold-mib`` MiB in all, every page
   written, so the memory is committed and charged to ``DIR``;
4. prints one JSON line ``{"ready": true, ...}`` and waits, at most
   ``--timeout`` seconds, until the caches have been evicted; whoever runs
   it makes the pressure meanwhile (a reader inside ``DIR`` streaming a file
   bigger than the cgroup's limit through the page cache);
5. prints one JSON line with what it saw (``"done": true``; evictions,
   pressure deliveries, which source was chosen, timings on the system-wide
   monotonic clock) and exits 0.  Any error: a JSON line with ``"error"``
   and exit status 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import anyio

from aiopgalloc import (
    PAGE_SIZE,
    DelayedEviction,
    EvictableRange,
    FileRange,
    MemoryFile,
    MemoryFileOpts,
    MemoryKind,
    open_memory_file,
)
from aiopgalloc.host.cgroup import current_memory_cgroup, move_pid

SLOT_PAGES = 64  # 256 KiB per cache entry
CACHES = 4


def emit(doc: dict[str, Any]) -> None:
    """One JSON document per line on stdout, flushed at once."""
    sys.stdout.write(json.dumps(doc) + "\n")
    sys.stdout.flush()


class ReportLines(logging.Handler):
    """Keeps the messages of the ``aiopgalloc`` logger (the chooser's report
    and any warning) to send back with the result."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)  # the chooser's report is DEBUG
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


class Cache:
    """An evictable user holding ``slots`` entries of SLOT_PAGES written
    pages each; entry ``i`` is at user offsets ``[i, i + 1) * SLOT_PAGES``
    pages.  ``evict`` frees the entries of the range."""

    def __init__(self, mf: MemoryFile, slots: int) -> None:
        self.mf = mf
        self.entries: dict[int, FileRange] = {}
        self.calls = 0
        self.first_call: float | None = None
        span = SLOT_PAGES * PAGE_SIZE
        page = b"\xa5" * PAGE_SIZE
        for slot in range(slots):
            fr = mf.allocate(span, MemoryKind.PAGE_CACHE)
            for view in mf.map_internal(fr):
                for off in range(0, len(view), PAGE_SIZE):
                    view[off : off + PAGE_SIZE] = page
                view.release()
            self.entries[slot] = fr
            mf.mark_evictable(self, EvictableRange(slot * span, (slot + 1) * span))

    async def evict(self, er: EvictableRange) -> None:
        if self.first_call is None:
            self.first_call = time.monotonic()
        self.calls += 1
        span = SLOT_PAGES * PAGE_SIZE
        for slot in range(er.start // span, -(-er.end // span)):
            fr = self.entries.pop(slot, None)
            if fr is not None:
                self.mf.dec_ref(fr)


async def serve(hold_mib: int, timeout: float, log_lines: ReportLines) -> dict[str, Any]:
    """Steps 2 to 5 above; returns the result document."""
    opts = MemoryFileOpts(delayed_eviction=DelayedEviction.ENABLED, use_host_memcg_pressure=True)
    slots = max(1, (hold_mib << 20) // (SLOT_PAGES * PAGE_SIZE) // CACHES)
    async with open_memory_file(opts=opts) as mf:
        caches = [Cache(mf, slots) for _ in range(CACHES)]
        await mf.update_usage()
        held = mf.total_usage()
        ready_at = time.monotonic()
        emit({"ready": True, "pid": os.getpid(), "held_bytes": held, "t": ready_at})
        with anyio.move_on_after(timeout):
            while any(c.entries for c in caches):
                await anyio.sleep(0.002)
        all_evicted_at = time.monotonic() if not any(c.entries for c in caches) else None
        with anyio.move_on_after(5):
            await mf.wait_for_evictions()
        await mf.wait_for_reclaim()
        await mf.update_usage()
        fs = mf.stats()
        stats = fs.evictions
        firsts = [c.first_call for c in caches if c.first_call is not None]
        cg = current_memory_cgroup()
        return {
            "done": True,
            "pid": os.getpid(),
            "cgroup": str(cg.path) if cg else None,
            "held_bytes": held,
            "committed_after": mf.total_usage(),
            "entries_left": sum(len(c.entries) for c in caches),
            "evict_calls": stats.evict_calls,
            "evicted_bytes": stats.evicted_bytes,
            "pressure_events": stats.pressure_events,
            "max_pressure_level": stats.max_pressure_level,
            "deliveries_by_level": [fs.pressure_low, fs.pressure_medium, fs.pressure_critical],
            "ready_at": ready_at,
            "first_evict_at": min(firsts) if firsts else None,
            "all_evicted_at": all_evicted_at,
            "log": list(log_lines.lines),
        }


def main() -> int:
    """Parse the arguments, join the cgroup, run, report."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cgroup", type=Path, required=True, help="memory cgroup to join first")
    ap.add_argument("--backend", choices=["asyncio", "asyncio+uvloop", "trio"], default="asyncio")
    ap.add_argument("--hold-mib", type=int, default=16)
    ap.add_argument("--timeout", type=float, default=10.0)
    args = ap.parse_args()
    backend, options = args.backend, {}
    if backend == "asyncio+uvloop":
        import uvloop  # noqa: F401  (imported before joining the cgroup)

        backend, options = "asyncio", {"use_uvloop": True}
    elif backend == "trio":
        import trio  # noqa: F401

    log_lines = ReportLines()
    logger = logging.getLogger("aiopgalloc")
    logger.addHandler(log_lines)
    logger.setLevel(logging.DEBUG)
    try:
        move_pid(args.cgroup, os.getpid())
        result = anyio.run(
            serve, args.hold_mib, args.timeout, log_lines, backend=backend, backend_options=options
        )
    except BaseException as exc:
        emit({"error": repr(exc), "traceback": traceback.format_exc(), "log": log_lines.lines})
        return 1
    emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
