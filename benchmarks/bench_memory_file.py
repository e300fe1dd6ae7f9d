"""Benchmarks of MemoryFile against the peers a user would pick instead.

Run::

    .venv/bin/python benchmarks/bench_memory_file.py [--quick] [--save]
        [--workloads 1,2,3] [--profile]

Three workloads, each run with its contenders side by side in one process:

1. **Allocation churn** (4 KiB and 64 KiB).  One cycle allocates a range,
   writes one byte in each of its pages and frees it.  aiopgalloc
   (``allocate`` / ``map_internal`` / ``dec_ref``, no ``await`` in the loop,
   so freed pages are recycled) against (a) one anonymous ``mmap.mmap(-1,
   size)`` per allocation, closed after the writes, and (b) one
   ``multiprocessing.shared_memory.SharedMemory(create=True)`` per
   allocation, closed and unlinked after the writes.  Every contender holds
   10,000 live allocations of 1-16 pages (untouched) while it runs
   (shared_memory: as many as RLIMIT_NOFILE allows, two fds each).  For
   aiopgalloc they are made by allocating 20,000 and freeing a random half
   (then letting the releaser catch up), so the usage set is fragmented
   rather than one merged segment and first fit has real work to do.
2. **Reuse policy**.  allocate (1-16 pages) / write every page / free a
   random one of 10,000 live (all written) allocations.  Three variants of
   aiopgalloc: the default policy with no ``await`` (freed pages recycled,
   zeroed by hand); release-then-refault, the reference's behaviour
   (``recycle_max_bytes=0`` and ``await mf.wait_for_reclaim()`` after every
   free, so nothing is ever recycled and every touch faults a fresh page);
   and the default policy with ``await anyio.sleep(0)`` every 100 steps (the
   releaser gets to run: the realistic mix).
3. **Release latency**.  20,000 one-page allocations; the 10,000 at even
   indices are written (the odd ones stay uncommitted, as separators that
   keep the freed pages from merging), then freed with ``await
   anyio.sleep(0)`` every 1,000 frees; the time from the first free until
   ``total_usage()`` reads 0.  Against the bare
   ``aiopgalloc.host.syscalls.punch_holes`` of the same 10,000 ranges in one
   thread hop (then one ``total_usage()``), on a file set up the same way.

Machines are shared and noisy: each measurement is repeated (5 times, 3 with
``--quick``), the contenders' repetitions are interleaved (and their order
rotated each round), and medians are reported; ratios are ratios of medians.
Throughput measurements run for a fixed wall-clock budget each.  The cyclic
garbage collector stays on (a service has it on); ``gc.collect()`` runs
before every timed section.

``--save`` writes every sample, the medians, the ratios and the machine's
description to ``benchmarks/results/memory_file-<hostname>.json``.
``--profile`` runs cProfile over aiopgalloc's side of workload 1 and prints
the top functions by own time.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import io
import json
import mmap
import os
import platform
import pstats
import random
import resource
import socket
import statistics
import time
from collections.abc import Awaitable, Callable
from multiprocessing import shared_memory
from pathlib import Path
from typing import Any

import anyio

from aiopgalloc import PAGE_SIZE, FileRange, MemoryFile, MemoryFileOpts, open_memory_file
from aiopgalloc._bench.common import machine_info
from aiopgalloc.host import syscalls

LIVE = 10_000
MAX_PAGES = 16
BATCH = 50  # cycles between clock reads in throughput loops
RESULTS_DIR = Path(__file__).resolve().parent / "results"

perf_counter = time.perf_counter


def _run(fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
    return anyio.run(fn, *args, backend="asyncio")


def _touch_views(views: list[memoryview]) -> None:
    for v in views:
        for o in range(0, len(v), PAGE_SIZE):
            v[o] = 1


def _median(xs: list[float]) -> float:
    return statistics.median(xs)


def _spread(xs: list[float]) -> float:
    """(max - min) / median, as a percentage: how noisy the samples were."""
    m = _median(xs)
    return 100.0 * (max(xs) - min(xs)) / m if m else 0.0


def _fmt_rate(x: float) -> str:
    return f"{x:,.0f}"


def _mib(n: int) -> str:
    return f"{n / (1 << 20):,.1f} MiB"


def _rotate(items: list[Any], k: int) -> list[Any]:
    k %= len(items)
    return items[k:] + items[:k]


# --------------------------------------------------------------- workload 1


def _fragment(mf: MemoryFile, rng: random.Random) -> list[FileRange]:
    """Allocate 2*LIVE mixed ranges, free a random half; return the live half."""
    frs = [mf.allocate(rng.randint(1, MAX_PAGES) * PAGE_SIZE) for _ in range(2 * LIVE)]
    rng.shuffle(frs)
    for fr in frs[LIVE:]:
        mf.dec_ref(fr)
    return frs[:LIVE]


async def w1_aiopgalloc(
    size: int, duration: float, seed: int, profiler: cProfile.Profile | None = None
) -> dict[str, Any]:
    rng = random.Random(seed)
    async with open_memory_file() as mf:
        live = _fragment(mf, rng)
        await mf.wait_for_reclaim()
        segments = len(mf._usage)
        alloc, map_internal, dec_ref = mf.allocate, mf.map_internal, mf.dec_ref
        step = PAGE_SIZE
        n = 0
        gc.collect()
        if profiler is not None:
            profiler.enable()
        t0 = perf_counter()
        deadline = t0 + duration
        while True:
            for _ in range(BATCH):
                fr = alloc(size)
                for v in map_internal(fr):
                    for o in range(0, len(v), step):
                        v[o] = 1
                del v
                dec_ref(fr)
            n += BATCH
            t1 = perf_counter()
            if t1 >= deadline:
                break
        if profiler is not None:
            profiler.disable()
        for fr in live:
            dec_ref(fr)
    return {"rate": n / (t1 - t0), "cycles": n, "usage_segments": segments}


def w1_mmap(size: int, duration: float, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    live = [mmap.mmap(-1, rng.randint(1, MAX_PAGES) * PAGE_SIZE) for _ in range(LIVE)]
    new_map = mmap.mmap
    offsets = range(0, size, PAGE_SIZE)
    n = 0
    gc.collect()
    t0 = perf_counter()
    deadline = t0 + duration
    while True:
        for _ in range(BATCH):
            m = new_map(-1, size)
            for o in offsets:
                m[o] = 1
            m.close()
        n += BATCH
        t1 = perf_counter()
        if t1 >= deadline:
            break
    for m in live:
        m.close()
    return {"rate": n / (t1 - t0), "cycles": n}


def _ensure_open_files(needed: int) -> int:
    """Raise RLIMIT_NOFILE to at least ``needed`` if allowed; return the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, max(hard, needed)))
    except (ValueError, OSError):
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def w1_shm(size: int, duration: float, seed: int) -> dict[str, Any]:
    # Each live SharedMemory holds two fds (its own and the mmap's private dup).
    # Where RLIMIT_NOFILE cannot be raised that far, hold as many as fit.
    limit = _ensure_open_files(2 * LIVE + 1024)
    n_live = max(0, min(LIVE, (limit - 1024) // 2))
    rng = random.Random(seed)
    SharedMemory = shared_memory.SharedMemory
    live = [
        SharedMemory(create=True, size=rng.randint(1, MAX_PAGES) * PAGE_SIZE) for _ in range(n_live)
    ]
    offsets = range(0, size, PAGE_SIZE)
    n = 0
    try:
        gc.collect()
        t0 = perf_counter()
        deadline = t0 + duration
        while True:
            for _ in range(BATCH):
                shm = SharedMemory(create=True, size=size)
                buf: Any = shm.buf
                for o in offsets:
                    buf[o] = 1
                del buf
                shm.close()
                shm.unlink()
            n += BATCH
            t1 = perf_counter()
            if t1 >= deadline:
                break
    finally:
        for shm in live:
            shm.close()
            shm.unlink()
    return {"rate": n / (t1 - t0), "cycles": n, "live": n_live}


def workload1(reps: int, duration: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    contenders: list[tuple[str, Callable[[int, float, int], dict[str, Any]]]] = [
        ("aiopgalloc", lambda s, d, seed: _run(w1_aiopgalloc, s, d, seed)),
        ("mmap", w1_mmap),
        ("shared_memory", w1_shm),
    ]
    for size in (4 * 1024, 64 * 1024):
        samples: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in contenders}
        for rep in range(reps):
            for name, fn in _rotate(contenders, rep):
                samples[name].append(fn(size, duration, 1000 + rep))
        rates = {k: [s["rate"] for s in v] for k, v in samples.items()}
        med = {k: _median(v) for k, v in rates.items()}
        res: dict[str, Any] = {
            "samples": samples,
            "median_cycles_per_s": med,
            "spread_pct": {k: _spread(v) for k, v in rates.items()},
            "ratio_aiopgalloc_over_mmap": med["aiopgalloc"] / med["mmap"],
            "ratio_aiopgalloc_over_shared_memory": med["aiopgalloc"] / med["shared_memory"],
            "paired_ratio_over_mmap": [
                a / b for a, b in zip(rates["aiopgalloc"], rates["mmap"], strict=True)
            ],
            "paired_ratio_over_shared_memory": [
                a / b for a, b in zip(rates["aiopgalloc"], rates["shared_memory"], strict=True)
            ],
        }
        out[f"{size // 1024}KiB"] = res
        print(f"\n[1] allocate + touch + free, {size // 1024} KiB, {LIVE:,} live  (cycles/s)")
        print(f"    {'contender':<16}{'median':>12}{'spread':>9}   samples")
        for k in rates:
            print(
                f"    {k:<16}{_fmt_rate(med[k]):>12}{res['spread_pct'][k]:>8.0f}%   "
                + " ".join(_fmt_rate(x) for x in rates[k])
            )
        print(
            f"    aiopgalloc/mmap = {res['ratio_aiopgalloc_over_mmap']:.2f}x   "
            f"aiopgalloc/shared_memory = {res['ratio_aiopgalloc_over_shared_memory']:.2f}x   "
            f"(usage segments held: {samples['aiopgalloc'][0]['usage_segments']:,})"
        )
        if samples["shared_memory"][0]["live"] < LIVE:
            print(
                f"    note: shared_memory held {samples['shared_memory'][0]['live']:,} live "
                f"segments, not {LIVE:,} (RLIMIT_NOFILE; each holds two fds)"
            )
    return out


# --------------------------------------------------------------- workload 2

W2_VARIANTS = ("default", "release_then_refault", "default_yield100")


async def w2_run(variant: str, duration: float, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    opts = MemoryFileOpts(recycle_max_bytes=0) if variant == "release_then_refault" else None
    async with open_memory_file(opts=opts) as mf:
        alloc, map_internal, dec_ref = mf.allocate, mf.map_internal, mf.dec_ref
        live: list[FileRange] = []
        for _ in range(LIVE):
            fr = alloc(rng.randint(1, MAX_PAGES) * PAGE_SIZE)
            _touch_views(map_internal(fr))
            live.append(fr)
        await mf.wait_for_reclaim()
        recycled0 = mf.recycled_bytes
        randint, randrange = rng.randint, rng.randrange
        step = PAGE_SIZE
        n = 0
        allocated = 0
        wait = variant == "release_then_refault"
        yield100 = variant == "default_yield100"
        gc.collect()
        t0 = perf_counter()
        deadline = t0 + duration
        while True:
            for _ in range(100):
                length = randint(1, MAX_PAGES) * step
                fr = alloc(length)
                for v in map_internal(fr):
                    for o in range(0, len(v), step):
                        v[o] = 1
                del v
                i = randrange(LIVE)
                victim = live[i]
                live[i] = fr
                dec_ref(victim)
                allocated += length
                if wait:
                    await mf.wait_for_reclaim()
            n += 100
            if yield100:
                await anyio.sleep(0)
            t1 = perf_counter()
            if t1 >= deadline:
                break
        usage, size = mf.total_usage(), mf.total_size()
        pending = mf.reclaim_pending()
        recycled = mf.recycled_bytes - recycled0
        for fr in live:
            dec_ref(fr)
    return {
        "rate": n / (t1 - t0),
        "steps": n,
        "total_usage": usage,
        "total_size": size,
        "reclaim_pending": pending,
        "recycled_fraction": recycled / allocated if allocated else 0.0,
    }


def workload2(reps: int, duration: float) -> dict[str, Any]:
    samples: dict[str, list[dict[str, Any]]] = {v: [] for v in W2_VARIANTS}
    for rep in range(reps):
        for variant in _rotate(list(W2_VARIANTS), rep):
            samples[variant].append(_run(w2_run, variant, duration, 2000 + rep))
    rates = {k: [s["rate"] for s in v] for k, v in samples.items()}
    med = {k: _median(v) for k, v in rates.items()}
    base = med["release_then_refault"]
    res: dict[str, Any] = {
        "samples": samples,
        "median_steps_per_s": med,
        "spread_pct": {k: _spread(v) for k, v in rates.items()},
        "ratio_default_over_release_then_refault": med["default"] / base,
        "ratio_default_yield100_over_release_then_refault": med["default_yield100"] / base,
        "ratio_default_over_default_yield100": med["default"] / med["default_yield100"],
        "median_end_total_usage": {
            k: _median([s["total_usage"] for s in v]) for k, v in samples.items()
        },
        "median_end_total_size": {
            k: _median([s["total_size"] for s in v]) for k, v in samples.items()
        },
    }
    print(
        f"\n[2] reuse policy: allocate 1-16 pages / touch / free random, {LIVE:,} live  (steps/s)"
    )
    print(
        f"    {'variant':<22}{'median':>10}{'spread':>8}{'recycled':>10}"
        f"{'end usage':>14}{'end size':>14}{'pending':>12}"
    )
    for k in W2_VARIANTS:
        last = samples[k][-1]
        rec = _median([s["recycled_fraction"] for s in samples[k]])
        print(
            f"    {k:<22}{_fmt_rate(med[k]):>10}{res['spread_pct'][k]:>7.0f}%{rec:>9.0%} "
            f"{_mib(int(res['median_end_total_usage'][k])):>14}"
            f"{_mib(int(res['median_end_total_size'][k])):>14}"
            f"{_mib(last['reclaim_pending']):>12}"
        )
    print(
        f"    default/release_then_refault = "
        f"{res['ratio_default_over_release_then_refault']:.2f}x   "
        f"default_yield100/release_then_refault = "
        f"{res['ratio_default_yield100_over_release_then_refault']:.2f}x   "
        f"default/default_yield100 = {res['ratio_default_over_default_yield100']:.2f}x"
    )
    return res


# --------------------------------------------------------------- workload 3

W3_PAGES = 20_000


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for s, e in sorted(ranges):
        if out and out[-1][1] == s:
            out[-1] = (out[-1][0], e)
        else:
            out.append((s, e))
    return out


async def _w3_setup(mf: MemoryFile) -> tuple[list[FileRange], list[FileRange]]:
    frs = [mf.allocate(PAGE_SIZE) for _ in range(W3_PAGES)]
    to_free = frs[0::2]
    for fr in to_free:
        _touch_views(mf.map_internal(fr))
    await mf.wait_for_reclaim()
    expect = len(to_free) * PAGE_SIZE
    got = mf.total_usage()
    if got != expect:
        raise RuntimeError(f"setup: total_usage {got} != {expect}")
    return to_free, frs[1::2]


async def w3_aiopgalloc() -> dict[str, Any]:
    async with open_memory_file() as mf:
        to_free, keep = await _w3_setup(mf)
        dec_ref, total_usage = mf.dec_ref, mf.total_usage
        polls = 0
        gc.collect()
        t0 = perf_counter()
        for i, fr in enumerate(to_free, 1):
            dec_ref(fr)
            if i % 1000 == 0:
                await anyio.sleep(0)
        t_freed = perf_counter()
        while True:
            await mf.wait_for_reclaim()
            polls += 1
            if total_usage() == 0:
                break
            await anyio.sleep(0)
        t1 = perf_counter()
        releases = mf.releases
        for fr in keep:
            dec_ref(fr)
    return {
        "latency_s": t1 - t0,
        "free_loop_s": t_freed - t0,
        "after_last_free_s": t1 - t_freed,
        "polls": polls,
        "release_batches": releases,
    }


async def w3_bare() -> dict[str, Any]:
    async with open_memory_file() as mf:
        to_free, keep = await _w3_setup(mf)
        ranges = _merge([(fr.start, fr.end) for fr in to_free])
        if len(ranges) != len(to_free):
            raise RuntimeError("scattered pages merged unexpectedly")
        fd = mf.fd
        gc.collect()
        t0 = perf_counter()
        failed = await anyio.to_thread.run_sync(syscalls.punch_holes, fd, ranges)
        usage = mf.total_usage()
        t1 = perf_counter()
        if failed or usage != 0:
            raise RuntimeError(f"bare punch: {len(failed)} failed, usage {usage}")
        # The allocator never knew these pages were committed: freeing them
        # now just hands uncommitted pages to the releaser.
        for fr in to_free + keep:
            mf.dec_ref(fr)
    return {"latency_s": t1 - t0, "ranges": len(ranges)}


def workload3(reps: int) -> dict[str, Any]:
    contenders: list[tuple[str, Callable[[], Awaitable[dict[str, Any]]]]] = [
        ("aiopgalloc", w3_aiopgalloc),
        ("bare_punch_holes", w3_bare),
    ]
    samples: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in contenders}
    for rep in range(reps):
        for name, fn in _rotate(contenders, rep):
            samples[name].append(_run(fn))
    lat = {k: [s["latency_s"] * 1e3 for s in v] for k, v in samples.items()}
    med = {k: _median(v) for k, v in lat.items()}
    ap = samples["aiopgalloc"]
    res: dict[str, Any] = {
        "samples": samples,
        "median_latency_ms": med,
        "spread_pct": {k: _spread(v) for k, v in lat.items()},
        "median_free_loop_ms": _median([s["free_loop_s"] * 1e3 for s in ap]),
        "median_after_last_free_ms": _median([s["after_last_free_s"] * 1e3 for s in ap]),
        "ratio_aiopgalloc_over_bare": med["aiopgalloc"] / med["bare_punch_holes"],
    }
    print(
        f"\n[3] release latency: free {W3_PAGES // 2:,} scattered 4 KiB pages "
        "until total_usage() == 0  (ms)"
    )
    print(f"    {'contender':<18}{'median':>10}{'spread':>8}   samples")
    for k in lat:
        print(
            f"    {k:<18}{med[k]:>10.1f}{res['spread_pct'][k]:>7.0f}%   "
            + " ".join(f"{x:.1f}" for x in lat[k])
        )
    print(
        f"    aiopgalloc: free loop {res['median_free_loop_ms']:.1f} ms, then "
        f"{res['median_after_last_free_ms']:.1f} ms until usage 0 "
        f"({ap[-1]['release_batches']} release batches, {ap[-1]['polls']} polls)"
    )
    print(
        f"    aiopgalloc/bare = {res['ratio_aiopgalloc_over_bare']:.2f}x (latency; lower is better)"
    )
    return res


# ----------------------------------------------------------------- profile


def profile_workload1(duration: float) -> str:
    prof = cProfile.Profile()
    for size in (4 * 1024, 64 * 1024):
        _run(w1_aiopgalloc, size, duration, 1, prof)
    buf = io.StringIO()
    stats = pstats.Stats(prof, stream=buf)
    stats.sort_stats("tottime").print_stats(15)
    return buf.getvalue()


# ------------------------------------------------------------------ output


def final_table(results: dict[str, Any]) -> None:
    rows: list[tuple[str, str, str]] = []
    w1 = results.get("workload1")
    if w1:
        for size, r in w1.items():
            m = r["median_cycles_per_s"]
            rows.append(
                (
                    f"1  churn {size}: aiopgalloc / mmap / shm (cycles/s)",
                    f"{_fmt_rate(m['aiopgalloc'])} / {_fmt_rate(m['mmap'])} / "
                    f"{_fmt_rate(m['shared_memory'])}",
                    f"{r['ratio_aiopgalloc_over_mmap']:.2f}x mmap, "
                    f"{r['ratio_aiopgalloc_over_shared_memory']:.2f}x shm",
                )
            )
    w2 = results.get("workload2")
    if w2:
        m = w2["median_steps_per_s"]
        rows.append(
            (
                "2  reuse: default / refault / yield100 (steps/s)",
                " / ".join(_fmt_rate(m[k]) for k in W2_VARIANTS),
                f"{w2['ratio_default_over_release_then_refault']:.2f}x, "
                f"{w2['ratio_default_yield100_over_release_then_refault']:.2f}x refault",
            )
        )
        u, s = w2["median_end_total_usage"], w2["median_end_total_size"]
        rows.append(
            (
                "2  end usage / size: default, refault, yield100",
                ", ".join(f"{u[k] / (1 << 20):.0f}/{s[k] / (1 << 20):.0f}" for k in W2_VARIANTS)
                + " MiB",
                "",
            )
        )
    w3 = results.get("workload3")
    if w3:
        m = w3["median_latency_ms"]
        rows.append(
            (
                "3  release 10k pages: aiopgalloc / bare (ms)",
                f"{m['aiopgalloc']:.1f} / {m['bare_punch_holes']:.1f}",
                f"{w3['ratio_aiopgalloc_over_bare']:.2f}x slower",
            )
        )
    if not rows:
        return
    w0 = max(len(r[0]) for r in rows)
    w1_ = max(len(r[1]) for r in rows)
    print("\n" + "=" * (w0 + w1_ + 30))
    print(f"{'measurement (medians)':<{w0}}  {'values':<{w1_}}  ratio")
    print("-" * (w0 + w1_ + 30))
    for a, b, c in rows:
        print(f"{a:<{w0}}  {b:<{w1_}}  {c}")
    print("=" * (w0 + w1_ + 30))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 repetitions, short runs (< 1 min)")
    ap.add_argument("--save", action="store_true", help="write results/memory_file-<host>.json")
    ap.add_argument("--workloads", default="1,2,3", help="comma-separated subset of 1,2,3")
    ap.add_argument("--profile", action="store_true", help="cProfile aiopgalloc in workload 1")
    args = ap.parse_args()
    reps = 3 if args.quick else 5
    w1_duration = 0.25 if args.quick else 1.0
    w2_duration = 0.4 if args.quick else 1.5
    wanted = {w.strip() for w in args.workloads.split(",") if w.strip()}

    info = machine_info()
    print(
        f"aiopgalloc {info['packages']['aiopgalloc']} | Python {platform.python_version()} | "
        f"{info['platform']} | {info['cpu_count']} CPUs | anyio {info['packages']['anyio']}"
    )
    print(f"{reps} repetitions per measurement, interleaved; medians; asyncio backend")
    started = perf_counter()
    results: dict[str, Any] = {}
    if "1" in wanted:
        results["workload1"] = workload1(reps, w1_duration)
    if "2" in wanted:
        results["workload2"] = workload2(reps, w2_duration)
    if "3" in wanted:
        results["workload3"] = workload3(reps)
    elapsed = perf_counter() - started
    final_table(results)
    print(f"total time {elapsed:.1f} s")

    profile_text = None
    if args.profile:
        print("\ncProfile, aiopgalloc side of workload 1 (4 KiB then 64 KiB), by own time:")
        profile_text = profile_workload1(1.0 if not args.quick else 0.3)
        print(profile_text)

    if args.save:
        info["loadavg_end"] = os.getloadavg()
        doc = {
            "benchmark": "memory_file",
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "config": {
                "quick": args.quick,
                "repetitions": reps,
                "workload1_seconds_per_sample": w1_duration,
                "workload2_seconds_per_sample": w2_duration,
                "live_allocations": LIVE,
                "max_pages": MAX_PAGES,
                "workload3_pages": W3_PAGES,
                "backend": "asyncio",
            },
            "machine": info,
            "elapsed_s": elapsed,
            "results": results,
            "profile_workload1_aiopgalloc": profile_text,
        }
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        path = RESULTS_DIR / f"memory_file-{socket.gethostname()}.json"
        path.write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n")
        print(f"saved {path}")


if __name__ == "__main__":
    main()
