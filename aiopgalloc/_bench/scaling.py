"""Workload 2: allocate + dec_ref cost against the number of live segments.

For N in 1k, 10k, 100k and 1M (``--quick``: up to 100k) a memory file is
made *fragmented*: N two-page allocations whose kinds alternate (ANONYMOUS,
PAGE_CACHE, so neighbours never merge), then ``dec_ref`` of the second page
of each, and ``wait_for_reclaim()``: every other page is live, every gap is
one clean page, and the usage set holds N segments (checked).

One operation is ``allocate(PAGE_SIZE, TMPFS)`` (a kind no live page has, so
it merges with nothing: it lands in the lowest gap, first fit) followed by
``dec_ref`` of a live page chosen at random (whose slot the new page takes),
so the number of live segments stays N while frees hit every part of the
map.  A sample is 20,000 operations (5,000 with ``--quick``), no ``await``
among them; between samples the releaser catches up
(``wait_for_reclaim()``).  Every file is built first and kept, so the sizes'
samples are interleaved (order rotated every round).

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
    live: list[FileRange] = []
    for k in range(n):
        fr = alloc(2 * P, kinds[k & 1])
        dec_ref(FileRange(fr.start + P, fr.end))
        live.append(FileRange(fr.start, fr.start + P))
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


def sample(mf: MemoryFile, live: list[FileRange], victims: list[int]) -> float:
    """Time ``len(victims)`` operations; return seconds per operation."""
    alloc, dec_ref = mf.allocate, mf.dec_ref
    kind = MemoryKind.TMPFS
    collect()
    t0 = perf_counter()
    for i in victims:
        fr = alloc(P, kind)
        dec_ref(live[i])
        live[i] = fr
    return (perf_counter() - t0) / len(victims)


async def _workload(cfg: Config, progress: Progress, sizes: list[int], ops: int) -> dict[str, Any]:
    rng = random.Random(cfg.seed)
    out: dict[str, dict[int, list[float]]] = {s: {n: [] for n in sizes} for s in SERIES}
    segments: dict[str, dict[int, int]] = {s: {} for s in SERIES}
    files: dict[int, tuple[MemoryFile, list[FileRange]]] = {}
    build_s: dict[int, float] = {}
    async with contextlib.AsyncExitStack() as stack:
        for n in sizes:
            mf = await stack.enter_async_context(open_memory_file())
            t0 = perf_counter()
            files[n] = (mf, await build(mf, n))
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
                    out[series][n].append(sample(mf, live, victims))
                    segments[series][n] = mf.stats().segments
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
            "operation": "allocate(PAGE_SIZE, TMPFS) + dec_ref(random live page)",
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
