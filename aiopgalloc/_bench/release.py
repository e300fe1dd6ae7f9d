"""Workload 3: how long until freed memory is really back with the kernel.

Setup: 1 GiB (``--quick``: 128 MiB) committed as 4 KiB allocations; they
are contiguous from offset 0, and every page is committed by one
``MADV_POPULATE_WRITE`` over the range (the same pages a write in each would
commit, without a Python loop).  Timed: free them
all in an interleaved order, the even pages first, then the odd ones, with
``await anyio.sleep(0)`` after every 1,000 ``dec_ref``; the clock stops when
``total_usage()`` (fstat) reads 0.  The free loop itself (the ``dec_ref``
calls) is inside the measurement, as for a service.

Against the bare ``aiopgalloc.host.syscalls.punch_holes`` calls on a plain
memfd set up the same way (same size, same pages committed), timed from the
first punch to fstat reading 0.  What "merged as well as possible" means
given that freeing order:

- ``bare merged`` (the target's baseline): by the end every page is freed
  and they are all adjacent, so the fewest calls that can do the job are
  one range of the whole size cut into 128 MiB calls (the allocator's own
  cap, since Linux serialises fallocate on a shmem file): 8 calls for 1 GiB.
  This is the hindsight floor: it waits until everything is freed.
- ``bare online`` (informational): punching as the pages are freed, batch by
  batch (a batch is the 1,000 frees between two yields), each batch's pages
  merged with each other across pages already punched.  In the even phase
  no two freed pages touch (the odd ones are still live): 1,000 calls a
  batch.  In the odd phase every gap is already a hole: one call a batch.
  This is the floor for an allocator that releases as soon as it can.
- ``bare per page`` (informational, not with ``--quick``): one call per
  page, in freeing order.

Also shown: the *Python floor*, the same loop with the same yields around a
function that does nothing instead of ``dec_ref`` (timed in the same run,
before the frees): what one Python call per freed page costs by itself.

aiopgalloc runs on every chosen backend; the bare calls need no event loop
and run once per repetition.  Target: aiopgalloc's time over ``bare merged``
<= 1.3.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable
from typing import Any

import anyio
import anyio.lowlevel

from ..host import syscalls
from ..lifecycle import open_memory_file
from ..memory_file import MemoryFile
from ..ranges import PAGE_SIZE, FileRange
from .common import (
    Config,
    Progress,
    Row,
    Target,
    WorkloadResult,
    collect,
    fmt_bytes,
    fmt_time,
    interleave,
    median,
    perf_counter,
    run_on,
    spread_pct,
)

__all__ = [
    "committed_pages",
    "freeing_order",
    "plan_merged",
    "plan_online",
    "run",
    "time_aiopgalloc",
    "time_bare",
    "total_steps",
]

NAME = "release"
TITLE = "free interleaved 4 KiB pages until total_usage() is 0"
P = PAGE_SIZE
BATCH = 1000
PUNCH_CAP = 128 << 20
TARGET = Target("<=", 1.3)
BARE = ("bare merged", "bare online", "bare per page")


def _pages(cfg: Config) -> int:
    return cfg.pick((1 << 30) // P, (128 << 20) // P, (16 << 20) // P)


def _bare_names(cfg: Config) -> tuple[str, ...]:
    """The bare contenders: ``bare per page`` only in full runs."""
    return BARE if not (cfg.quick or cfg.smoke) else BARE[:2]


def total_steps(cfg: Config) -> int:
    """Progress steps: every contender once per repetition."""
    return cfg.reps * (len(cfg.backends) + len(_bare_names(cfg)))


def freeing_order(pages: int) -> list[int]:
    """Page indexes in the order they are freed: evens, then odds."""
    return [*range(0, pages, 2), *range(1, pages, 2)]


def plan_merged(pages: int) -> list[tuple[int, int]]:
    """The whole range, cut at ``PUNCH_CAP``: the fewest calls after the end."""
    size = pages * P
    return [(s, min(s + PUNCH_CAP, size)) for s in range(0, size, PUNCH_CAP)]


def plan_online(order: list[int], pages: int, batch: int = BATCH) -> list[list[tuple[int, int]]]:
    """Per batch of ``batch`` frees (in ``order``), the fewest ranges that
    cover the batch's pages, merging pages whose gaps are already punched.

    Returns byte ranges, one list per batch."""
    punched = bytearray(pages)
    plans: list[list[tuple[int, int]]] = []
    for b in range(0, len(order), batch):
        chunk = sorted(order[b : b + batch])
        runs: list[list[int]] = []
        for p in chunk:
            if runs:
                last = runs[-1]
                if last[1] == p or punched.find(0, last[1], p) == -1:
                    last[1] = p + 1
                    continue
            runs.append([p, p + 1])
        for p in chunk:
            punched[p] = 1
        plans.append([(s * P, e * P) for s, e in runs])
    return plans


def _noop(fr: object) -> None:
    """Stands in for ``dec_ref`` in the call-floor loop."""


def committed_pages(mf: MemoryFile, pages: int) -> list[FileRange]:
    """The setup: ``pages`` one-page allocations, contiguous from offset 0,
    every page committed; returned in freeing order (``freeing_order``)."""
    frs = [mf.allocate(P) for _ in range(pages)]
    if frs[-1].end != pages * P:
        raise RuntimeError("release setup: the pages are not contiguous from 0")
    # Commit them all: one zero byte written to each page faults it in.
    with mf.view(FileRange(0, pages * P)) as v:
        v[::P] = bytes(pages)
    got = mf.total_usage()
    if got != pages * P:
        raise RuntimeError(f"release setup: total_usage {got} != {pages * P}")
    return [frs[i] for i in freeing_order(pages)]


async def time_aiopgalloc(pages: int) -> dict[str, Any]:
    """One aiopgalloc sample: free the pages of ``committed_pages`` until
    ``total_usage()`` reads 0, and the no-op call floor beforehand."""
    async with open_memory_file() as mf:
        dec_ref, total_usage = mf.dec_ref, mf.total_usage
        order = committed_pages(mf, pages)
        # The floor of any Python API taking one call per freed page: the
        # same loop and yields around a call that does nothing.
        collect()
        t0 = perf_counter()
        for i, fr in enumerate(order, 1):
            _noop(fr)
            if i % BATCH == 0:
                await anyio.lowlevel.checkpoint()
        call_floor = perf_counter() - t0
        releases0 = mf.stats().releases
        polls = 0
        collect()
        t0 = perf_counter()
        for i, fr in enumerate(order, 1):
            dec_ref(fr)
            if i % BATCH == 0:
                await anyio.lowlevel.checkpoint()
        t_freed = perf_counter()
        with anyio.fail_after(300):
            while total_usage() != 0:
                polls += 1
                await mf.wait_for_reclaim()
                if total_usage() == 0:
                    break
                await anyio.lowlevel.checkpoint()
        t1 = perf_counter()
        releases = mf.stats().releases - releases0
    return {
        "seconds": t1 - t0,
        "free_loop_s": t_freed - t0,
        "after_last_free_s": t1 - t_freed,
        "release_batches": releases,
        "polls": polls,
        "call_floor_s": call_floor,
    }


def time_bare(pages: int, plans: list[list[tuple[int, int]]]) -> dict[str, Any]:
    """Punch ``plans`` (one ``punch_holes`` call per list) on a fresh memfd
    with the same pages written; time it until fstat reads 0."""
    size = pages * P
    fd = os.memfd_create("aiopgalloc-bench", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        with mmap.mmap(fd, size) as m:
            try:
                m.madvise(syscalls.MADV_POPULATE_WRITE)
            except OSError:
                for o in range(0, size, P):
                    m[o] = 1
        got = syscalls.fstat_blocks_bytes(fd)
        if got != size:
            raise RuntimeError(f"bare setup: {got} bytes committed, {size} expected")
        punch = syscalls.punch_holes
        calls = sum(len(p) for p in plans)
        collect()
        t0 = perf_counter()
        for ranges in plans:
            failed = punch(fd, ranges)
            if failed:
                raise RuntimeError(f"bare punch failed: {failed[0]}")
        left = syscalls.fstat_blocks_bytes(fd)
        t1 = perf_counter()
        if left:
            raise RuntimeError(f"bare punch left {left} bytes committed")
    finally:
        os.close(fd)
    return {"seconds": t1 - t0, "calls": calls}


def run(cfg: Config, progress: Progress) -> WorkloadResult:
    """Run workload 3: aiopgalloc on every chosen backend, the bare calls once."""
    pages = _pages(cfg)
    order = freeing_order(pages)
    plans: dict[str, list[list[tuple[int, int]]]] = {
        "bare merged": [plan_merged(pages)],
        "bare online": plan_online(order, pages),
    }
    if "bare per page" in _bare_names(cfg):
        plans["bare per page"] = [[(p * P, (p + 1) * P) for p in order]]

    def on_backend(b: str) -> Callable[[int], dict[str, Any]]:
        return lambda rep: run_on(b, time_aiopgalloc, pages)

    def bare(name: str) -> Callable[[int], dict[str, Any]]:
        return lambda rep: time_bare(pages, plans[name])

    contenders = [(f"aiopgalloc@{b}", on_backend(b)) for b in cfg.backends]
    contenders += [(name, bare(name)) for name in _bare_names(cfg)]
    samples = interleave(contenders, cfg.reps, progress)
    secs = {k: [s["seconds"] for s in v] for k, v in samples.items()}
    med = {k: median(v) for k, v in secs.items()}
    result = WorkloadResult(
        key=3,
        name=NAME,
        title=TITLE,
        backends=list(cfg.backends),
        params={
            "bytes": pages * P,
            "pages": pages,
            "order": "even pages, then odd pages",
            "yield_every": BATCH,
            "punch_cap_bytes": PUNCH_CAP,
            "bare_calls": {k: sum(len(x) for x in v) for k, v in plans.items()},
        },
    )
    base = med["bare merged"]
    size = fmt_bytes(pages * P)
    for b in cfg.backends:
        a = med[f"aiopgalloc@{b}"]
        result.rows.append(
            Row(
                measurement=f"release {size} vs bare merged ({b})",
                value=fmt_time(a),
                peer=fmt_time(base),
                ratio=a / base if base else None,
                ratio_note="aiopgalloc time / bare time (lower is better)",
                target=TARGET,
            )
        )
    a0 = med[f"aiopgalloc@{cfg.primary}"]
    for name in ("bare online", "bare per page"):
        if name not in med:
            continue
        result.rows.append(
            Row(
                measurement=f"release {size} vs {name} ({cfg.primary})",
                value=fmt_time(a0),
                peer=fmt_time(med[name]),
                ratio=a0 / med[name] if med[name] else None,
                ratio_note="informational",
            )
        )
    floor = median([x["call_floor_s"] for x in samples[f"aiopgalloc@{cfg.primary}"]])
    result.rows.append(
        Row(
            measurement=f"  Python floor: a no-op call per page, same yields ({cfg.primary})",
            value=fmt_time(floor),
            peer=fmt_time(base),
            ratio=floor / base if base else None,
            ratio_note="informational: the loop of calls alone over bare merged",
        )
    )
    for b in cfg.backends:
        s = samples[f"aiopgalloc@{b}"]
        result.notes.append(
            f"aiopgalloc@{b}: free loop {fmt_time(median([x['free_loop_s'] for x in s]))}, then "
            f"{fmt_time(median([x['after_last_free_s'] for x in s]))} until usage 0; "
            f"{median([x['release_batches'] for x in s]):.0f} release batches"
        )
    calls = result.params["bare_calls"]
    result.notes.append(
        "bare calls: " + ", ".join(f"{k.removeprefix('bare ')} {v:,}" for k, v in calls.items())
    )
    result.data = {
        "samples": samples,
        "median_s": med,
        "spread_pct": {k: spread_pct(v) for k, v in secs.items()},
    }
    return result
