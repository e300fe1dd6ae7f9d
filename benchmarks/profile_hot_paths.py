"""Where the time goes in the workloads whose targets aiopgalloc misses, and
the budget each target leaves.

    python benchmarks/profile_hot_paths.py [--out PATH] [--pages N] [--steps N]

A profiling companion to ``python -m aiopgalloc bench``: it runs workloads 1
and 3 with the suite's own pieces (``aiopgalloc._bench.churn`` and
``aiopgalloc._bench.release``) and the library's public API only.  Needs
pyinstrument (``pip install 'aiopgalloc[bench]'``).  Writes a text report
(default ``benchmarks/results/profile-vm.txt``):

1. Churn (workload 1's plan: 10,000 live allocations, random free/allocate
   steps, one byte written per page).  Times windows of steps for
   aiopgalloc and for the hand-written free list side by side, then the
   parts of aiopgalloc's step: the memset of recycled pages (zeroing that
   the free list skips: it hands out old bytes) and the rest.  The zeroing
   is replayed: one more window records, per allocation, where it landed
   and the bytes it recycled (``stats().recycled_bytes`` before and after),
   then the same bytes are zeroed with the allocator's own memset
   (``FileMapping.zero``, on a mapping of a dup of the file's fd) and timed.
   The 2x target leaves half the free list's step; the report says how much
   of that the zeroing alone takes.  Then a pyinstrument tree of one more
   window.
2. Release (workload 3: free 1 GiB of 4 KiB pages, evens then odds, a
   ``sleep(0)`` every 1,000 frees).  Times the ``dec_ref`` loop and the
   bare merged punches; the 1.3x target leaves ``1.3 * bare / pages`` per
   page for everything, which the report compares with one ``dec_ref`` and
   with a no-op Python call.  Then a pyinstrument tree of the free loop.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel

from aiopgalloc import PAGE_SIZE, FileRange, MemoryFile, open_memory_file
from aiopgalloc._bench import release as release_wl
from aiopgalloc._bench.churn import Aiopgalloc, FreeList, arena_capacity, make_plan
from aiopgalloc._bench.common import collect, machine_info, median, perf_counter
from aiopgalloc.host.mapping import FileMapping


def _tree(profiler: Any) -> str:
    text: str = profiler.output_text(unicode=False, color=False, show_all=False)
    return text


class RecordingFile:
    """The memory file as one churn window sees it, recording for every
    allocation where it landed and how many bytes it recycled (public
    figures: ``stats().recycled_bytes`` before and after the call)."""

    def __init__(self, mf: MemoryFile) -> None:
        self.mf = mf
        self.recycled: list[tuple[int, int]] = []

    def allocate(self, length: int) -> FileRange:
        before = self.mf.stats().recycled_bytes
        fr = self.mf.allocate(length)
        got = self.mf.stats().recycled_bytes - before
        if got:
            self.recycled.append((fr.start, got))
        return fr

    def __getattr__(self, name: str) -> Any:
        return getattr(self.mf, name)


def replay_zeroing(mf: MemoryFile, recycled: list[tuple[int, int]]) -> float:
    """Seconds to zero the recorded bytes (at the start of each allocation,
    whose pages are resident: the window wrote them) with the allocator's
    memset, on a mapping of our own."""
    fd = os.dup(mf.fd)
    mapping = FileMapping(fd, mf.opts.chunk_size)
    try:
        mapping.set_file_size(mf.total_size())
        zero = mapping.zero
        collect()
        t0 = perf_counter()
        for start, n in recycled:
            zero(start, n)
        return perf_counter() - t0
    finally:
        mapping.close()
        os.close(fd)


async def churn(out: io.StringIO, steps: int) -> None:
    from pyinstrument import Profiler

    plan = make_plan(1, 10_000, 6 * steps, 6)
    fl = FreeList(arena_capacity(plan))
    fl.setup(plan.initial)
    async with open_memory_file() as mf:
        ours = Aiopgalloc(mf)
        ours.setup(plan.initial)
        # Window 0 warms both up; windows 1-3 are timed side by side
        # (alternating), medians kept.
        for c in (ours, fl):
            c.window(*plan.windows[0], None)
        per: dict[str, list[float]] = {"ours": [], "fl": []}
        for w in (1, 2, 3):
            for name, c in (("ours", ours), ("fl", fl)):
                n, t = c.window(*plan.windows[w], None)
                per[name].append(t / n * 1e6)
        us_ours, us_fl = median(per["ours"]), median(per["fl"])
        # Window 4 recorded (not timed), its zeroing replayed and timed.
        rec = RecordingFile(mf)
        ours.mf = rec  # type: ignore[assignment]
        n4, _ = ours.window(*plan.windows[4], None)
        ours.mf = mf
        us_zero = replay_zeroing(mf, rec.recycled) / n4 * 1e6
        recycled_kib = sum(n for _, n in rec.recycled) / n4 / 1024
        profiler = Profiler(interval=0.0005)
        profiler.start()
        ours.window(*plan.windows[5], None)
        profiler.stop()
        ours.close()
    fl.close()
    budget = us_fl / 2
    print("== 1. churn: 10,000 live, random free + allocate + one byte a page", file=out)
    print(f"steps per window: {steps:,}", file=out)
    print(
        f"aiopgalloc: {us_ours:.1f} us/step; free list: {us_fl:.1f} us/step "
        "(medians of 3 windows each, alternating)",
        file=out,
    )
    print(f"ratio (free list time / ours): {us_fl / us_ours:.2f}x (target >= 2x)", file=out)
    print(f"2x budget: {budget:.1f} us/step", file=out)
    print(
        f"zeroing recycled pages ({recycled_kib:.0f} KiB a step, replayed): {us_zero:.1f} us of "
        f"a {us_ours:.1f} us step ({us_zero / budget:.0%} of the 2x budget; the free list "
        "does none)",
        file=out,
    )
    print(
        f"everything else: {us_ours - us_zero:.1f} us/step against the "
        f"{budget - us_zero:.1f} us the budget leaves",
        file=out,
    )
    print("\npyinstrument (one more window; sampling inflates the times):", file=out)
    print(_tree(profiler), file=out)


async def release(out: io.StringIO, pages: int) -> None:
    from pyinstrument import Profiler

    res = await release_wl.time_aiopgalloc(pages)
    bare = release_wl.time_bare(pages, [release_wl.plan_merged(pages)])
    total, loop, floor = res["seconds"], res["free_loop_s"], res["call_floor_s"]
    budget = 1.3 * bare["seconds"]
    print(
        f"== 2. release: free {pages * PAGE_SIZE >> 20} MiB of 4 KiB pages, evens then odds",
        file=out,
    )
    print(
        f"aiopgalloc: {total * 1e3:.0f} ms until usage 0 (the dec_ref loop {loop * 1e3:.0f} ms, "
        f"{loop / pages * 1e6:.2f} us a page); bare merged punches: "
        f"{bare['seconds'] * 1e3:.0f} ms in {bare['calls']} calls",
        file=out,
    )
    print(f"ratio: {total / bare['seconds']:.2f}x (target <= 1.3x)", file=out)
    spare = budget - bare["seconds"]
    print(
        f"1.3x budget: {budget * 1e3:.0f} ms; per page for all the Python work: "
        f"{spare / pages * 1e6:.2f} us if the punches cannot overlap the frees, "
        f"{budget / pages * 1e6:.2f} us if they overlap completely",
        file=out,
    )
    print(
        f"a no-op Python call per page with the same yields: {floor * 1e3:.0f} ms, "
        f"{floor / pages * 1e6:.2f} us a page",
        file=out,
    )
    # The free loop alone, profiled.
    async with open_memory_file() as mf:
        order = release_wl.committed_pages(mf, pages)
        profiler = Profiler(interval=0.0005)
        profiler.start()
        for i, fr in enumerate(order, 1):
            mf.dec_ref(fr)
            if i % release_wl.BATCH == 0:
                await anyio.lowlevel.checkpoint()
        profiler.stop()
        await mf.wait_for_reclaim()
    print("\npyinstrument (the dec_ref loop; sampling inflates the times):", file=out)
    print(_tree(profiler), file=out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/results/profile-vm.txt")
    ap.add_argument("--pages", type=int, default=262_144, help="pages freed in part 2")
    ap.add_argument("--steps", type=int, default=20_000, help="churn steps per window")
    args = ap.parse_args(argv)
    try:
        import pyinstrument  # noqa: F401
    except ImportError:
        print("needs pyinstrument: pip install 'aiopgalloc[bench]'", file=sys.stderr)
        return 2
    out = io.StringIO()
    info = machine_info()
    info.pop("hostname", None)
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()), file=out)
    print(f"date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n", file=out)
    anyio.run(churn, out, args.steps)
    print(file=out)
    anyio.run(release, out, args.pages)
    Path(args.out).write_text(out.getvalue())
    print(out.getvalue())
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
