"""Workload 2: allocate + dec_ref cost against the number of live segments.

For N in 1k, 10k, 100k and 1M (``--quick``: up to 100k) a memory file is
made *fragmented*: N two-page allocations whose kinds alternate (ANONYMOUS,
PAGE_CACHE, so neighbours never merge), then ``dec_ref`` of the second page
of each, and ``wait_for_reclaim()``: every other page is live, every gap is
one clean page, and the usage set holds N segments (checked).

One operation is ``allocate(PAGE_SIZE, kind)``, which lands in the lowest
free page (first fit), followed by ``dec_ref`` of a live page chosen at
random, so frees hit every part of the map.  The kind depends on the parity
of the page the allocation lands on (RAMDISKFS on even pages, TMPFS on odd
ones): two touching pages never share a kind, so they never merge and the
usage set keeps exactly N segments, sample after sample (checked).  Where
each allocation lands is known in advance: the victims are drawn before a
sample, and a heap of free pages replays first fit for one-page requests
outside the timed loop; the positions are checked after it.  (An earlier
version gave every new page the same kind: runs of them merged, and the
1k and 10k maps fell to 2-4 segments after the first sample, so the "1k"
baseline was not a 1k map.)  A sample is 20,000 operations (5,000 with
``--quick``), no ``await`` among them; between samples the releaser catches
up (``wait_for_reclaim()``).  Every file is built first and kept, so the
sizes' samples are interleaved (order rotated every round).

Two series:

- ``written``: every live page holds data (one byte written in each), as in
  a service whose allocations hold something.  The target applies here:
  cost at the largest N over cost at 1k <= 2.
- ``untouched``: the same map before anything was written, measured first.
  A recycled page that is not known to be committed is probed with one
  ``lseek(SEEK_DATA)``; on a file with no data at all that call walks to the
  end of the file, so this series shows what the probe costs as the file
  grows (informational).
"""

from __future__ import annotations

import contextlib
import heapq
import random
from typing import Any

from ..lifecycle import open_memory_file
from ..memory_file import MemoryFile
from ..ranges import PAGE_SIZE, FileRange
from ..usage import MemoryKind
from .common import (
    Config,
    Progress,
    Row,
    Target,
    WorkloadResult,
    collect,
    fmt_time,
    median,
    perf_counter,
    rotate,
    run_on,
)

__all__ = ["run", "total_steps"]

NAME = "scaling"
TITLE = "allocate + dec_ref cost vs live segments"
P = PAGE_SIZE
TARGET = Target("<=", 2)
SERIES = ("untouched", "written")
KIND_BY_PARITY = (MemoryKind.RAMDISKFS, MemoryKind.TMPFS)
"""The kind of a new page, by the parity of its page number: neighbours differ."""


def _sizes(cfg: Config) -> list[int]:
    return cfg.pick([1_000, 10_000, 100_000, 1_000_000], [1_000, 10_000, 100_000], [1_000, 4_000])


def total_steps(cfg: Config) -> int:
    """Progress steps: a build and a touch per size, a sample per size per
    series per repetition."""
    n = len(_sizes(cfg))
    return 2 * n + 2 * n * cfg.reps


async def build(mf: MemoryFile, n: int) -> list[FileRange]:
    """Make ``n`` live one-page segments, each followed by a one-page clean
    gap; return them."""
    kinds = (MemoryKind.ANONYMOUS, MemoryKind.PAGE_CACHE)
    alloc, dec_ref = mf.allocate, mf.dec_ref
    pairs = [alloc(2 * P, kinds[k & 1]) for k in range(n)]
    # Freed only once all are allocated, so that no allocation lands in a
    # page freed before it: live pages at even page numbers, gaps at odd ones.
    live: list[FileRange] = []
    for k, fr in enumerate(pairs):
        if fr.start != 2 * k * P:
            raise RuntimeError(f"fragmented map: allocation {k} at {fr.start:#x}")
        dec_ref(FileRange(fr.start + P, fr.end))
        live.append(FileRange(fr.start, fr.start + P))
    del pairs
    await mf.wait_for_reclaim()
    segments = mf.stats().segments
    if segments != n:
        raise RuntimeError(f"fragmented map of {n} pages has {segments} segments")
    return live


def touch(mf: MemoryFile, live: list[FileRange]) -> None:
    """Write one byte in every live page."""
    map_internal = mf.map_internal
    for fr in live:
        for v in map_internal(fr):
            v[0] = 1


class Landing:
    """Where one-page allocations land on a built map: first fit takes the
    lowest free page.  Replays a sample's operations on a heap of free page
    numbers, outside the timed loop.  O(log N) an operation."""

    def __init__(self, n: int) -> None:
        self.free = list(range(1, 2 * n, 2))  # sorted: already a heap
        self.page = [2 * k for k in range(n)]  # page number of live[k]

    def plan(self, victims: list[int]) -> list[MemoryKind]:
        """The kind of each operation's allocation (by the parity of the
        page it will land on), advancing the replay past those operations."""
        free, page = self.free, self.page
        kinds = []
        for i in victims:
            p = heapq.heappop(free)  # the allocation comes first...
            heapq.heappush(free, page[i])  # ...then the victim is freed
            page[i] = p
            kinds.append(KIND_BY_PARITY[p & 1])
        return kinds

    def check(self, live: list[FileRange]) -> None:
        """Raise RuntimeError unless every live page is where the replay
        put it."""
        for k, fr in enumerate(live):
            if fr.start != self.page[k] * P:
                want = self.page[k] * P
                raise RuntimeError(f"live page {k} at {fr.start:#x}, replay says {want:#x}")


def sample(
    mf: MemoryFile, live: list[FileRange], victims: list[int], kinds: list[MemoryKind]
) -> float:
    """Time ``len(victims)`` operations; return seconds per operation."""
    alloc, dec_ref = mf.allocate, mf.dec_ref
    collect()
    t0 = perf_counter()
    for i, kind in zip(victims, kinds, strict=True):
        fr = alloc(P, kind)
        dec_ref(live[i])
        live[i] = fr
    return (perf_counter() - t0) / len(victims)


async def _workload(cfg: Config, progress: Progress, sizes: list[int], ops: int) -> dict[str, Any]:
    rng = random.Random(cfg.seed)
    out: dict[str, dict[int, list[float]]] = {s: {n: [] for n in sizes} for s in SERIES}
    segments: dict[str, dict[int, int]] = {s: {} for s in SERIES}
    files: dict[int, tuple[MemoryFile, list[FileRange]]] = {}
    landings: dict[int, Landing] = {}
    build_s: dict[int, float] = {}
    async with contextlib.AsyncExitStack() as stack:
        for n in sizes:
            mf = await stack.enter_async_context(open_memory_file())
            t0 = perf_counter()
            files[n] = (mf, await build(mf, n))
            landings[n] = Landing(n)
            build_s[n] = perf_counter() - t0
            progress.step(f"built {n:,} segments ({build_s[n]:.1f} s)")
        for series in SERIES:
            if series == "written":
                for n in sizes:
                    mf, live = files[n]
                    touch(mf, live)
                    progress.step(f"wrote the {n:,} live pages")
            for rep in range(cfg.reps):
                for n in rotate(sizes, rep):
                    mf, live = files[n]
                    victims = [rng.randrange(n) for _ in range(ops)]
                    kinds = landings[n].plan(victims)
                    out[series][n].append(sample(mf, live, victims, kinds))
                    landings[n].check(live)
                    segments[series][n] = mf.stats().segments
                    if segments[series][n] != n:
                        raise RuntimeError(f"map of {n:,} now has {segments[series][n]:,} segments")
                    await mf.wait_for_reclaim()
                    progress.step(f"{series} map, {n:,} segments, repetition {rep + 1}/{cfg.reps}")
    return {"samples": out, "segments": segments, "build_s": build_s}


def run(cfg: Config, progress: Progress) -> WorkloadResult:
    """Run workload 2 on the primary backend."""
    sizes = _sizes(cfg)
    ops = cfg.pick(20_000, 5_000, 1_000)
    out = run_on(cfg.primary, _workload, cfg, progress, sizes, ops)
    samples: dict[str, dict[int, list[float]]] = out["samples"]
    result = WorkloadResult(
        key=2,
        name=NAME,
        title=TITLE,
        backends=[cfg.primary],
        params={
            "live_segments": sizes,
            "ops_per_sample": ops,
            "operation": "allocate(PAGE_SIZE, kind by page parity) + dec_ref(random live page)",
            "map": "N two-page allocations of alternating kinds, second page of each freed",
        },
    )
    series_json: dict[str, list[dict[str, Any]]] = {}
    first, last = sizes[0], sizes[-1]
    for series in reversed(SERIES):
        points = []
        for n in sizes:
            xs = samples[series][n]
            points.append(
                {
                    "live_segments": n,
                    "segments_after": out["segments"][series].get(n),
                    "median_us_per_op": median(xs) * 1e6,
                    "min_us_per_op": min(xs) * 1e6,
                    "max_us_per_op": max(xs) * 1e6,
                    "samples_us_per_op": [x * 1e6 for x in xs],
                }
            )
        series_json[f"{series} map"] = points
        base = median(samples[series][first])
        top = median(samples[series][last])
        result.rows.append(
            Row(
                measurement=f"alloc+dec_ref, {last:,} / {first:,} segments ({series})",
                value=f"{fmt_time(top)} @{last:,}",
                peer=f"{fmt_time(base)} @{first:,}",
                ratio=top / base if base else None,
                ratio_note="cost per op at the largest N over cost at 1k (lower is better)",
                target=TARGET if series == "written" else None,
            )
        )
        for n in sizes[1:-1]:
            m = median(samples[series][n])
            result.rows.append(
                Row(
                    measurement=f"alloc+dec_ref, {n:,} / {first:,} segments ({series})",
                    value=f"{fmt_time(m)} @{n:,}",
                    peer=f"{fmt_time(base)} @{first:,}",
                    ratio=m / base if base else None,
                    ratio_note="informational",
                )
            )
    if last < 1_000_000:
        result.notes.append(
            f"the target is for 1M segments; this run stops at {last:,} (--quick); the ratio "
            f"shown is at {last:,}"
        )
    result.notes.append(
        "build times: " + ", ".join(f"{n:,}: {s:.1f} s" for n, s in out["build_s"].items())
    )
    result.data = {"series": series_json, "build_s": out["build_s"]}
    return result
