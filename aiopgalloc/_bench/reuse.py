"""Workload 9: the reuse policy: recycling freed pages against releasing
them and faulting fresh ones in.

Every sample opens a fresh memory file, makes 10,000 live allocations of
1-16 pages (uniformly; 5,000 with ``--quick``), writes one byte in each of
their pages, lets the releaser catch up (``wait_for_reclaim()``), then runs
*steps* for a wall-clock budget (1.5 s; 0.4 s with ``--quick``): allocate
1-16 pages, write one byte in each page, ``dec_ref`` a live allocation
chosen at random (the new one takes its slot).  Three variants:

- ``recycle``: the default policy, no ``await`` in the loop: freed pages are
  recycled by the next allocations that fit, zeroed by hand (the churn of
  workload 1, with smaller sizes);
- ``release+refault``: what the reference does: ``recycle_max_bytes=0`` and
  ``await mf.wait_for_reclaim()`` after every free, so nothing is ever
  recycled and every write of a new page faults a fresh one in;
- ``recycle+yield``: the default policy with ``await anyio.sleep(0)`` every
  100 steps, so the releaser runs meanwhile: the realistic mix.

Each variant replays the same sequence of sizes and victims in a round;
the variants' samples are interleaved (order rotated every round).
Reported: steps per second, each ``recycle`` variant's rate over
``release+refault``'s, the share of the allocated bytes that were recycled,
and the committed memory and file size at the end.  Informational: no
target.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import anyio
import anyio.lowlevel

from ..lifecycle import open_memory_file
from ..options import MemoryFileOpts
from ..ranges import PAGE_SIZE, FileRange
from .common import (
    Config,
    Progress,
    Row,
    WorkloadResult,
    collect,
    fmt_bytes,
    fmt_rate,
    interleave,
    median,
    perf_counter,
    run_on,
    spread_pct,
    write_pages,
)

__all__ = ["VARIANTS", "run", "total_steps"]

NAME = "reuse"
TITLE = "reuse policy: recycle freed pages vs release + refault"
P = PAGE_SIZE
MAX_PAGES = 16
YIELD_EVERY = 100
VARIANTS = ("recycle", "release+refault", "recycle+yield")


def total_steps(cfg: Config) -> int:
    """Progress steps: every variant once per repetition."""
    return cfg.reps * len(VARIANTS)


async def _sample(variant: str, live_n: int, budget: float, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    refault = variant == "release+refault"
    yields = variant == "recycle+yield"
    opts = MemoryFileOpts(recycle_max_bytes=0) if refault else None
    async with open_memory_file(opts=opts) as mf:
        alloc, map_internal, dec_ref = mf.allocate, mf.map_internal, mf.dec_ref
        live: list[FileRange] = []
        for _ in range(live_n):
            fr = alloc(rng.randint(1, MAX_PAGES) * P)
            for v in map_internal(fr):
                write_pages(v, 0, len(v))
            live.append(fr)
        del v  # no view may outlive the file
        await mf.wait_for_reclaim()
        recycled0 = mf.stats().recycled_bytes
        randint, randrange = rng.randint, rng.randrange
        step = P
        n = allocated = 0
        collect()
        t0 = t1 = perf_counter()
        deadline = t0 + budget
        while t1 < deadline:
            for _ in range(YIELD_EVERY):
                length = randint(1, MAX_PAGES) * step
                fr = alloc(length)
                for v in map_internal(fr):
                    for o in range(0, len(v), step):
                        v[o] = 1
                i = randrange(live_n)
                victim = live[i]
                live[i] = fr
                dec_ref(victim)
                allocated += length
                if refault:
                    await mf.wait_for_reclaim()
            n += YIELD_EVERY
            if yields:
                await anyio.lowlevel.checkpoint()
            t1 = perf_counter()
        del v
        st = mf.stats()
        for fr in live:
            dec_ref(fr)
    return {
        "steps": n,
        "seconds": t1 - t0,
        "rate": n / (t1 - t0),
        "recycled_fraction": (st.recycled_bytes - recycled0) / allocated if allocated else 0.0,
        "committed_bytes": st.committed_bytes,
        "file_size": st.file_size,
        "freed_bytes_pending": st.freed_bytes,
    }


def run(cfg: Config, progress: Progress) -> WorkloadResult:
    """Run workload 9 on the primary backend."""
    live_n = cfg.pick(10_000, 5_000, 300)
    budget = cfg.pick(1.5, 0.4, 0.05)

    def variant(name: str) -> Callable[[int], dict[str, Any]]:
        return lambda rep: run_on(cfg.primary, _sample, name, live_n, budget, cfg.seed + rep)

    samples = interleave([(v, variant(v)) for v in VARIANTS], cfg.reps, progress)
    rates = {k: [s["rate"] for s in v] for k, v in samples.items()}
    med = {k: median(v) for k, v in rates.items()}

    def mid(variant: str, key: str) -> float:
        return median([s[key] for s in samples[variant]])

    result = WorkloadResult(
        key=9,
        name=NAME,
        title=TITLE,
        backends=[cfg.primary],
        params={
            "live": live_n,
            "sizes": f"1-{MAX_PAGES} pages uniform",
            "budget_s_per_sample": budget,
            "yield_every": YIELD_EVERY,
            "variants": {
                "recycle": "default options, no await in the loop",
                "release+refault": "recycle_max_bytes=0, await wait_for_reclaim() after each free",
                "recycle+yield": f"default options, await anyio.sleep(0) every {YIELD_EVERY} steps",
            },
        },
    )
    base = med["release+refault"]
    for name in ("recycle", "recycle+yield"):
        result.rows.append(
            Row(
                measurement=f"reuse steps/s, {name} vs release+refault",
                value=fmt_rate(med[name]),
                peer=fmt_rate(base),
                ratio=med[name] / base if base else None,
                ratio_note="informational: variant rate / release+refault rate (higher is better)",
            )
        )
    result.notes.append(
        "recycled share of the bytes allocated, committed / file size at the end: "
        + "; ".join(
            f"{v} {mid(v, 'recycled_fraction'):.0%}, {fmt_bytes(mid(v, 'committed_bytes'))} / "
            f"{fmt_bytes(mid(v, 'file_size'))}"
            for v in VARIANTS
        )
    )
    result.data = {
        "samples": samples,
        "median_steps_per_s": med,
        "spread_pct": {k: spread_pct(v) for k, v in rates.items()},
        "ratios": {
            "recycle_over_release_refault": med["recycle"] / base if base else None,
            "recycle_yield_over_release_refault": med["recycle+yield"] / base if base else None,
        },
        "median_recycled_fraction": {v: mid(v, "recycled_fraction") for v in VARIANTS},
        "median_end_committed_bytes": {v: mid(v, "committed_bytes") for v in VARIANTS},
        "median_end_file_size": {v: mid(v, "file_size") for v in VARIANTS},
    }
    return result
