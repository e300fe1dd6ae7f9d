"""Workload 6: Python heap bytes per live segment.

100,000 one-page allocations (10,000 for the smoke test) made through
``mf.allocate`` with alternating kinds (ANONYMOUS, PAGE_CACHE), so no two
neighbours merge and the usage set holds one segment per allocation
(checked), traced with ``tracemalloc`` from just before the first
``allocate`` call.

What is counted: the allocator's internal structures only.  The benchmark
keeps the returned ``FileRange`` objects in a list made before tracing
started; once every allocation is made, those handles are dropped
(``None`` in their slots) and garbage is collected, and the bytes still
traced are what the allocator holds for the 100,000 segments: the segment
set's blocks (start, end, value and gap slots, the bounds' int objects,
list over-allocation), its gap index, anything else it keeps per
allocation.  The figure with the handles still alive (one ``FileRange``
tuple per allocation, whose ints the segment set shares) is reported too,
for information.

tracemalloc counts what Python's allocators hand out, headers included,
and none of its own bookkeeping.  The figure is deterministic, so it is
measured once.  Target: <= 250 B per segment.
"""

from __future__ import annotations

import tracemalloc
from typing import Any

from ..lifecycle import open_memory_file
from ..ranges import PAGE_SIZE, FileRange
from ..usage import MemoryKind
from .common import Config, Progress, Row, Target, WorkloadResult, collect, run_on

__all__ = ["run", "total_steps"]

NAME = "memory"
TITLE = "Python heap bytes per live segment (tracemalloc)"
TARGET_BYTES = 250
TARGET = Target("<=", TARGET_BYTES, " B")


def total_steps(cfg: Config) -> int:
    """Progress steps: one measurement."""
    return 1


async def _measure(n: int) -> dict[str, Any]:
    kinds = (MemoryKind.ANONYMOUS, MemoryKind.PAGE_CACHE)
    async with open_memory_file() as mf:
        alloc = mf.allocate
        handles: list[FileRange | None] = [None] * n
        collect()
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            for i in range(n):
                handles[i] = alloc(PAGE_SIZE, kinds[i & 1])
            collect()
            with_handles = tracemalloc.get_traced_memory()[0] - base
            for i in range(n):
                handles[i] = None
            collect()
            internal = tracemalloc.get_traced_memory()[0] - base
            snapshot = tracemalloc.take_snapshot()
        finally:
            tracemalloc.stop()
        segments = mf.stats().segments
        if segments != n:
            raise RuntimeError(f"{n} allocations made {segments} segments (some merged)")
    top = []
    stats = [
        st
        for st in snapshot.statistics("lineno")
        if "aiopgalloc" in st.traceback[0].filename and "_bench" not in st.traceback[0].filename
    ]
    for st in stats[:8]:
        frame = st.traceback[0]
        top.append(
            {
                "where": f"{frame.filename.rsplit('aiopgalloc/', 1)[-1]}:{frame.lineno}",
                "bytes": st.size,
                "bytes_per_segment": st.size / n,
                "blocks": st.count,
            }
        )
    return {
        "segments": segments,
        "internal_bytes": internal,
        "with_handles_bytes": with_handles,
        "top_lines": top,
    }


def run(cfg: Config, progress: Progress) -> WorkloadResult:
    """Run workload 6 on the primary backend."""
    n = cfg.pick(100_000, 100_000, 10_000)
    out = run_on(cfg.primary, _measure, n)
    progress.step(f"{n:,} segments traced")
    per = out["internal_bytes"] / n
    per_handles = out["with_handles_bytes"] / n
    result = WorkloadResult(
        key=6,
        name=NAME,
        title=TITLE,
        backends=[cfg.primary],
        params={
            "segments": n,
            "allocation": "allocate(PAGE_SIZE) with kinds alternating ANONYMOUS, PAGE_CACHE",
            "counted": "allocator internals only (the benchmark's FileRange handles dropped)",
        },
    )
    result.rows.append(
        Row(
            measurement=f"heap bytes per segment, {n:,} unmerged",
            value=f"{per:.0f} B",
            ratio=per,
            ratio_note="bytes per segment (lower is better); the target is in bytes",
            target=TARGET,
        )
    )
    result.rows.append(
        Row(
            measurement="  (with the FileRange handles alive)",
            value=f"{per_handles:.0f} B",
            ratio_note="informational",
        )
    )
    result.notes.append(
        "largest allocation sites (bytes per segment): "
        + ", ".join(f"{t['where']} {t['bytes_per_segment']:.0f}" for t in out["top_lines"][:4])
    )
    result.data = {**out, "bytes_per_segment": per, "bytes_per_segment_with_handles": per_handles}
    return result
