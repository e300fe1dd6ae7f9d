"""Workload 7: ``allocate(..., commit=...)`` modes against first-touch faults.

Each sample opens a fresh memory file, calls ``allocate(64 MiB,
commit=mode)`` and at once writes one byte in every page of the range
through ``map_internal``; the time of both together is the figure (the
allocate call and the writes are kept apart in the JSON).

- ``NONE``: nothing committed; every first write takes a page fault (the
  baseline: first-touch faults).
- ``FALLOCATE``: ``fallocate`` commits the memory in the allocate call; the
  writes still take (minor) faults to map the pages.
- ``POPULATE``: ``MADV_POPULATE_WRITE`` faults every page in, writable, in
  the allocate call; the writes take no fault.

Next to them, for reference, an anonymous ``mmap.mmap(-1, 64 MiB)`` written
the same way.  Repetitions interleaved, modes rotated.  Reported: each
mode's total time over ``NONE``'s (lower is better).  Informational: no
target.
"""

from __future__ import annotations

import mmap
from collections.abc import Callable
from typing import Any

from ..lifecycle import open_memory_file
from ..options import CommitMode
from ..ranges import PAGE_SIZE
from .common import (
    Config,
    Progress,
    Row,
    WorkloadResult,
    collect,
    fmt_bytes,
    fmt_time,
    interleave,
    median,
    perf_counter,
    run_on,
)

__all__ = ["run", "total_steps"]

NAME = "commit"
TITLE = "allocate(commit=...) then write every page, vs first-touch faults"
P = PAGE_SIZE
CONTENDERS = ("NONE", "FALLOCATE", "POPULATE", "anonymous mmap")


def total_steps(cfg: Config) -> int:
    """Progress steps: every contender once per repetition."""
    return cfg.reps * len(CONTENDERS)


async def _aiopgalloc(size: int, mode: CommitMode) -> dict[str, Any]:
    async with open_memory_file() as mf:
        collect()
        t0 = perf_counter()
        fr = mf.allocate(size, commit=mode)
        t1 = perf_counter()
        for v in mf.map_internal(fr):
            for o in range(0, len(v), P):
                v[o] = 1
            v.release()
        t2 = perf_counter()
        usage = mf.total_usage()
        if usage < size:
            raise RuntimeError(f"commit {mode.name}: only {usage} bytes committed after writing")
    return {"seconds": t2 - t0, "allocate_s": t1 - t0, "write_s": t2 - t1}


def _mmap(size: int) -> dict[str, Any]:
    collect()
    t0 = perf_counter()
    m = mmap.mmap(-1, size)
    t1 = perf_counter()
    for o in range(0, size, P):
        m[o] = 1
    t2 = perf_counter()
    m.close()
    return {"seconds": t2 - t0, "allocate_s": t1 - t0, "write_s": t2 - t1}


def run(cfg: Config, progress: Progress) -> WorkloadResult:
    """Run workload 7 on the primary backend."""
    size = cfg.pick(64 << 20, 64 << 20, 8 << 20)

    def mode(m: CommitMode) -> Callable[[int], dict[str, Any]]:
        return lambda rep: run_on(cfg.primary, _aiopgalloc, size, m)

    contenders = [(m.name, mode(m)) for m in CommitMode]
    contenders.append(("anonymous mmap", lambda rep: _mmap(size)))
    samples = interleave(contenders, cfg.reps, progress)
    med = {
        k: {f: median([s[f] for s in v]) for f in ("seconds", "allocate_s", "write_s")}
        for k, v in samples.items()
    }
    base = med["NONE"]["seconds"]
    result = WorkloadResult(
        key=7,
        name=NAME,
        title=TITLE,
        backends=[cfg.primary],
        params={"bytes": size, "pages": size // P, "write": "one byte per page via map_internal"},
    )
    for name in CONTENDERS:
        m = med[name]
        result.rows.append(
            Row(
                measurement=f"allocate {fmt_bytes(size)} + write, {name} vs NONE",
                value=fmt_time(m["seconds"]),
                peer=fmt_time(base),
                ratio=m["seconds"] / base if base else None,
                ratio_note="mode time / NONE time (lower is better); informational",
            )
        )
    result.notes.append(
        "allocate / write parts: "
        + "; ".join(
            f"{k} {fmt_time(med[k]['allocate_s'])} / {fmt_time(med[k]['write_s'])}"
            for k in CONTENDERS
        )
    )
    result.data = {"samples": samples, "medians": med}
    return result
