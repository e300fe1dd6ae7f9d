"""Workload 4: ``update_usage()`` against the bare mincore walk.

Setup (fresh for every sample): a memory file of 4 GiB (``--quick``: 1 GiB)
allocated as 2 MiB allocations (one kind: they merge into one live segment
the allocator knows nothing about yet), every other allocation written in
full (``MADV_POPULATE_WRITE`` over its pages): half the file committed, in
2 MiB runs.

Timed, both on the same setup, their order alternating between samples:

- ``aiopgalloc``: ``await mf.update_usage()``: one fstat, the plan under
  the lock, a worker-thread hop, the mincore scan, turning it into runs,
  and marking the runs known committed (checked against the bytes written).
- ``bare mincore``: one ``mincore`` over the same range through the file's
  mapping (``FileMapping.mincore``, a single syscall), on the calling
  thread: the kernel's part alone.

Then the *nothing-changed* path: ``update_usage()`` again with nothing
touched since (fstat's block count equals the known-committed bytes, so no
scan), 200 calls (50 with ``--quick``) timed one by one, next to a bare
fstat.  aiopgalloc runs on every chosen backend (the thread hop is the
backend's).  Target: scan time over the bare walk <= 1.5.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

from ..host import syscalls
from ..host.mapping import FileMapping
from ..lifecycle import open_memory_file
from ..ranges import HUGE_PAGE_SIZE, PAGE_SIZE
from .common import (
    Config,
    Progress,
    Row,
    Target,
    WorkloadResult,
    collect,
    fmt_bytes,
    fmt_time,
    median,
    perf_counter,
    rotate,
    run_on,
    spread_pct,
)

__all__ = ["run", "total_steps"]

NAME = "usage_scan"
TITLE = "update_usage() vs the bare mincore walk"
P = PAGE_SIZE
PIECE = HUGE_PAGE_SIZE
TARGET = Target("<=", 1.5)


def total_steps(cfg: Config) -> int:
    """Progress steps: one sample per backend per repetition."""
    return cfg.reps * len(cfg.backends)


async def _sample(size: int, rep: int, quiet_calls: int) -> dict[str, Any]:
    async with open_memory_file() as mf, contextlib.AsyncExitStack() as stack:
        pieces = [mf.allocate(PIECE) for _ in range(size // PIECE)]
        for fr in pieces[::2]:
            # One zero byte written to each page commits it.
            mf.view(fr)[::P] = bytes(fr.length // P)
        touched = sum(fr.length for fr in pieces[::2])
        chunk = mf.opts.chunk_size
        if mf.total_size() != size or size % chunk:
            raise RuntimeError(f"usage scan setup: file is {mf.total_size()} bytes, not {size}")
        vec = bytearray()
        # The floor: one mincore over a mapping of our own (of a dup of the
        # memfd), the call a scan cannot do without.
        own_fd = os.dup(mf.fd)
        mappings = FileMapping(own_fd, chunk)
        mappings.set_file_size(size)
        stack.callback(os.close, own_fd)
        stack.callback(mappings.close)

        def bare() -> float:
            nonlocal vec
            collect()
            t0 = perf_counter()
            vec = mappings.mincore(0, size)
            return perf_counter() - t0

        async def scan() -> float:
            collect()
            t0 = perf_counter()
            await mf.update_usage()
            return perf_counter() - t0

        if rep % 2 == 0:
            t_bare = bare()
            t_scan = await scan()
        else:
            t_scan = await scan()
            t_bare = bare()
        resident = len(vec) - vec.count(0)
        known = mf.accounting.snapshot().total
        if known != touched:
            raise RuntimeError(f"update_usage found {known} bytes committed, {touched} written")
        quiet: list[float] = []
        fstat: list[float] = []
        fd = mf.fd
        for _ in range(quiet_calls):
            t0 = perf_counter()
            await mf.update_usage()
            t1 = perf_counter()
            syscalls.fstat_blocks_bytes(fd)
            t2 = perf_counter()
            quiet.append(t1 - t0)
            fstat.append(t2 - t1)
        del pieces
    return {
        "scan_s": t_scan,
        "bare_s": t_bare,
        "touched_bytes": touched,
        "resident_pages_seen_by_bare": resident,
        "nothing_changed_us": median(quiet) * 1e6,
        "fstat_us": median(fstat) * 1e6,
    }


def run(cfg: Config, progress: Progress) -> WorkloadResult:
    """Run workload 4 on every chosen backend."""
    size = cfg.pick(4 << 30, 1 << 30, 128 << 20)
    quiet_calls = cfg.pick(200, 50, 20)
    samples: dict[str, list[dict[str, Any]]] = {b: [] for b in cfg.backends}
    for rep in range(cfg.reps):
        for b in rotate(cfg.backends, rep):
            samples[b].append(run_on(b, _sample, size, rep, quiet_calls))
            progress.step(f"{b}, repetition {rep + 1}/{cfg.reps}")
    result = WorkloadResult(
        key=4,
        name=NAME,
        title=TITLE,
        backends=list(cfg.backends),
        params={
            "file_bytes": size,
            "touched_bytes": size // 2,
            "layout": "2 MiB allocations, every other one written in full",
            "nothing_changed_calls": quiet_calls,
        },
    )
    med: dict[str, dict[str, float]] = {}
    for b, ss in samples.items():
        m = {
            k: median([s[k] for s in ss])
            for k in ("scan_s", "bare_s", "nothing_changed_us", "fstat_us")
        }
        med[b] = m
        result.rows.append(
            Row(
                measurement=f"update_usage {fmt_bytes(size)}, half touched, vs mincore ({b})",
                value=fmt_time(m["scan_s"]),
                peer=fmt_time(m["bare_s"]),
                ratio=m["scan_s"] / m["bare_s"] if m["bare_s"] else None,
                ratio_note="aiopgalloc time / bare time (lower is better)",
                target=TARGET,
            )
        )
    for b in cfg.backends:
        m = med[b]
        result.rows.append(
            Row(
                measurement=f"update_usage unchanged vs one fstat ({b})",
                value=f"{m['nothing_changed_us']:.1f} us",
                peer=f"{m['fstat_us']:.1f} us",
                ratio=m["nothing_changed_us"] / m["fstat_us"] if m["fstat_us"] else None,
                ratio_note="informational",
            )
        )
    result.data = {
        "samples": samples,
        "medians": med,
        "spread_pct": {
            b: {k: spread_pct([s[k] for s in ss]) for k in ("scan_s", "bare_s")}
            for b, ss in samples.items()
        },
    }
    return result
