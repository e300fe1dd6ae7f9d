"""How fast a memory-pressure notification turns into eviction, and whether
a storm of kernel events hurts the event loop, per anyio backend.

Run::

    .venv/bin/python benchmarks/bench_pressure.py [--quick] [--save]
        [--backends asyncio,asyncio+uvloop,trio]

For each backend (asyncio, asyncio + uvloop, trio) one memory file is opened
with ``DelayedEviction.ENABLED`` and ``use_host_memcg_pressure=True``, and a
probe user with one evictable page whose ``evict`` notes the time of its
first call.  Measured:

1. **Notification to first ``evict()``** (N samples, 500; 100 with
   ``--quick``), from three starting points:

   - ``manual/loop``: ``ManualPressure.notify()`` called on the event loop's
     thread (a policy task that decided to shed);
   - ``manual/thread``: the same from another thread (a watchdog thread);
   - ``v1 eventfd``: a write to the eventfd that a ``CgroupV1Pressure``
     registered with the kernel, from another thread, standing in for the
     kernel's own signal (the source cannot tell the difference).  The
     source listens on a child memory cgroup made for the run (no process
     in it, so the kernel adds nothing) and removed afterwards; this part
     needs root and the cgroup v1 memory controller and is skipped
     otherwise.

   Next to them, the floor under the two cross-thread figures: ``bare
   wake/thread``, an eventfd written by the same thread and awaited with
   ``anyio.wait_readable``, no allocator involved.

   Before each sample the previous eviction has finished, the page is
   marked evictable again, and the loop has been idle for about a
   millisecond, so every notification finds the loop asleep in its poller,
   as a real one would.  Reported: median and 99th percentile.

2. **v1 storm**: a thread writes that eventfd at 10,000 writes/s for 2 s
   (1 s with ``--quick``) while a ticker task sleeps 5 ms at a time and
   records how late it wakes (lag = elapsed - 5 ms), and four caches are
   refilled every 10 ms so evictions have work all along.  Reported: the
   writes made, the deliveries the source coalesced them into, the
   ``evict`` calls made during the storm, and the ticker's worst and 99th
   percentile lag, next to the same ticker's figures with no storm.

``--save`` writes everything (every latency sample included) and the
machine's description to ``benchmarks/results/pressure-<hostname>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import threading
import time
from collections.abc import Callable
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
from aiopgalloc._bench.common import machine_info
from aiopgalloc._bench.eviction import Poker, Probe
from aiopgalloc.host.cgroup import create_child_memcg, current_memory_cgroup, remove_child
from aiopgalloc.host.pressure import CgroupV1Pressure, ManualPressure, PressureLevel

RESULTS_DIR = Path(__file__).resolve().parent / "results"
BACKENDS: dict[str, tuple[str, dict[str, Any]]] = {
    "asyncio": ("asyncio", {}),
    "asyncio+uvloop": ("asyncio", {"use_uvloop": True}),
    "trio": ("trio", {}),
}
TICK = 0.005
STORM_RATE = 10_000  # eventfd writes per second
IDLE_BEFORE_SAMPLE = 0.001
P = PAGE_SIZE

perf_counter = time.perf_counter


# ------------------------------------------------------------------ pieces


class Cache:
    """An evictable user holding real one-page entries, for the storm."""

    def __init__(self, mf: MemoryFile) -> None:
        self.mf = mf
        self.entries: dict[int, FileRange] = {}
        self.calls = 0

    def refill(self, slots: int) -> None:
        for slot in range(slots):
            if slot in self.entries:
                continue
            fr = self.mf.allocate(P, MemoryKind.PAGE_CACHE)
            for view in self.mf.map_internal(fr):
                view[:8] = slot.to_bytes(8, "little")
                view.release()
            self.entries[slot] = fr
            self.mf.mark_evictable(self, EvictableRange(slot * P, (slot + 1) * P))

    async def evict(self, er: EvictableRange) -> None:
        self.calls += 1
        for slot in range(er.start // P, er.end // P):
            fr = self.entries.pop(slot, None)
            if fr is not None:
                self.mf.dec_ref(fr)


def _opts(source: object) -> MemoryFileOpts:
    return MemoryFileOpts(
        delayed_eviction=DelayedEviction.ENABLED,
        use_host_memcg_pressure=True,
        pressure_source=source,
    )


def _summary(samples_s: list[float]) -> dict[str, float]:
    xs = sorted(samples_s)
    p99 = xs[min(len(xs) - 1, round(0.99 * (len(xs) - 1)))]
    return {
        "median_us": statistics.median(xs) * 1e6,
        "p99_us": p99 * 1e6,
        "min_us": xs[0] * 1e6,
        "max_us": xs[-1] * 1e6,
        "n": len(xs),
    }


async def _latency(
    mf: MemoryFile, n: int, fire: Callable[[], None], poker: Poker | None
) -> list[float]:
    """n samples of notification -> first evict(); ``fire`` is called on
    the loop's thread, or in the poker thread when one is given."""
    probe = Probe(mf)
    samples: list[float] = []
    for _ in range(n):
        assert await mf.wait_for_evictions(5), "an eviction never finished"
        probe.arm()
        if poker is None:
            await anyio.sleep(IDLE_BEFORE_SAMPLE)
            started = perf_counter()
            fire()
        else:
            poker.poke(fire)
        with anyio.fail_after(5):
            await probe.hit.wait()
        if poker is not None:
            started = poker.started_at
        assert probe.hit_at is not None
        samples.append(probe.hit_at - started)
    assert await mf.wait_for_evictions(5)
    mf.dec_ref(probe.fr)
    return samples


async def _bare_wake(n: int, poker: Poker) -> list[float]:
    """n samples of the floor under the cross-thread figures: an eventfd
    written by the poker thread, awaited with ``anyio.wait_readable``, no
    allocator involved."""
    efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    samples: list[float] = []
    try:
        for _ in range(n):
            poker.poke(lambda: os.eventfd_write(efd, 1))
            with anyio.fail_after(5):
                await anyio.wait_readable(efd)
            woke = perf_counter()
            os.eventfd_read(efd)
            samples.append(woke - poker.started_at)
    finally:
        os.close(efd)
    return samples


async def _ticker(duration: float) -> list[float]:
    """Sleep TICK at a time for ``duration`` seconds; return each wake's lag."""
    lags: list[float] = []
    end = perf_counter() + duration
    while perf_counter() < end:
        t = perf_counter()
        await anyio.sleep(TICK)
        lags.append(perf_counter() - t - TICK)
    return lags


def _lag_summary(lags: list[float]) -> dict[str, float]:
    xs = sorted(lags)
    return {
        "worst_ms": xs[-1] * 1e3,
        "p99_ms": xs[min(len(xs) - 1, round(0.99 * (len(xs) - 1)))] * 1e3,
        "median_ms": statistics.median(xs) * 1e3,
        "ticks": len(xs),
    }


async def _storm(mf: MemoryFile, efd: int, duration: float) -> dict[str, Any]:
    """A thread writes ``efd`` at STORM_RATE/s for ``duration`` s while the
    ticker runs and caches are refilled every 10 ms."""
    idle_lags = await _ticker(min(1.0, duration))
    caches = [Cache(mf) for _ in range(4)]
    for c in caches:
        c.refill(16)
    written = 0
    stop = threading.Event()

    def writer() -> None:
        nonlocal written
        start = perf_counter()
        while not stop.is_set():
            due = int((perf_counter() - start) * STORM_RATE)
            while written < due:
                os.eventfd_write(efd, 1)
                written += 1
            time.sleep(0.0005)

    async def refiller() -> None:
        while True:
            await anyio.sleep(0.010)
            for c in caches:
                c.refill(16)

    before = mf.stats().evictions
    thread = threading.Thread(target=writer, name="storm")
    async with anyio.create_task_group() as tg:
        tg.start_soon(refiller)
        t0 = perf_counter()
        thread.start()
        lags = await _ticker(duration)
        stop.set()
        await anyio.to_thread.run_sync(thread.join)
        took = perf_counter() - t0
        tg.cancel_scope.cancel()
    # What is still pending is delivered at the next wake; wait for it.
    with anyio.move_on_after(1):
        while mf.stats().evictions.pressure_events == before.pressure_events:
            await anyio.sleep(0.01)
    assert await mf.wait_for_evictions(5)
    after = mf.stats().evictions
    calls = sum(c.calls for c in caches)
    for c in caches:
        mf.mark_all_unevictable(c)
        for fr in c.entries.values():
            mf.dec_ref(fr)
    return {
        "seconds": took,
        "writes": written,
        "writes_per_s": written / took,
        "deliveries": after.pressure_events - before.pressure_events,
        "evict_calls": calls,
        "evicted_bytes": after.evicted_bytes - before.evicted_bytes,
        "lag": _lag_summary(lags),
        "idle_lag": _lag_summary(idle_lags),
    }


# ------------------------------------------------------------------ per backend


async def run_backend(n: int, storm_s: float, v1_dir: Path | None) -> dict[str, Any]:
    """Every measurement on the current backend."""
    out: dict[str, Any] = {}
    manual = ManualPressure()
    poker = Poker()
    try:
        await _bare_wake(20, poker)  # warm-up
        out["bare_eventfd_thread_s"] = await _bare_wake(n, poker)
        async with open_memory_file(opts=_opts(manual)) as mf:
            await _latency(mf, 20, manual.notify, None)  # warm-up
            out["manual_loop_s"] = await _latency(mf, n, manual.notify, None)
            out["manual_thread_s"] = await _latency(mf, n, manual.notify, poker)
        if v1_dir is not None:
            v1 = CgroupV1Pressure(v1_dir, "low")
            async with open_memory_file(opts=_opts(v1)) as mf:
                efd = v1.eventfds[PressureLevel.LOW]

                def kernel_signal() -> None:
                    os.eventfd_write(efd, 1)

                await _latency(mf, 20, kernel_signal, poker)  # warm-up
                out["v1_eventfd_s"] = await _latency(mf, n, kernel_signal, poker)
                out["storm"] = await _storm(mf, efd, storm_s)
    finally:
        poker.stop()
    return out


# ------------------------------------------------------------------ output


def _table(results: dict[str, dict[str, Any]]) -> None:
    kinds = [
        ("bare_eventfd_thread_s", "bare wake/thread"),
        ("manual_loop_s", "manual/loop"),
        ("manual_thread_s", "manual/thread"),
        ("v1_eventfd_s", "v1 eventfd"),
    ]
    print("\nnotification -> first evict(), microseconds (median / p99)")
    print(f"{'backend':<16}" + "".join(f"{label:>20}" for _, label in kinds))
    for backend, r in results.items():
        cells = []
        for key, _ in kinds:
            s = r.get("summary", {}).get(key)
            cells.append(f"{s['median_us']:>9.0f} / {s['p99_us']:<7.0f}" if s else f"{'-':>20}")
        print(f"{backend:<16}" + "".join(f"{c:>20}" for c in cells))
    storms = {b: r["storm"] for b, r in results.items() if "storm" in r}
    if not storms:
        return
    print("\nv1 storm: eventfd writes from a thread; ticker sleeping 5 ms; lag in ms")
    print(
        f"{'backend':<16}{'writes/s':>10}{'writes':>9}{'deliveries':>12}{'evict calls':>13}"
        f"{'worst lag':>11}{'p99 lag':>9}{'median':>8}   idle: worst / p99 / median"
    )
    for backend, s in storms.items():
        lag, idle = s["lag"], s["idle_lag"]
        print(
            f"{backend:<16}{s['writes_per_s']:>10,.0f}{s['writes']:>9,}{s['deliveries']:>12,}"
            f"{s['evict_calls']:>13,}{lag['worst_ms']:>11.2f}{lag['p99_ms']:>9.2f}"
            f"{lag['median_ms']:>8.2f}   {idle['worst_ms']:>11.2f} / {idle['p99_ms']:.2f} / "
            f"{idle['median_ms']:.2f}"
        )


def main() -> None:
    """Parse the arguments, run every backend, print, save."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="100 samples, 1 s storm")
    ap.add_argument("--save", action="store_true", help="write results/pressure-<host>.json")
    ap.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated subset")
    args = ap.parse_args()
    n = 100 if args.quick else 500
    storm_s = 1.0 if args.quick else 2.0
    wanted = [b.strip() for b in args.backends.split(",") if b.strip()]
    for b in wanted:
        if b not in BACKENDS:
            ap.error(f"unknown backend {b!r}; choose from {', '.join(BACKENDS)}")

    info = machine_info()
    print(
        f"aiopgalloc {info['packages']['aiopgalloc']} | Python {platform.python_version()} | "
        f"{info['platform']} | {info['cpu_count']} CPUs | anyio {info['packages']['anyio']}"
    )
    print(f"{n} samples per latency; storm {STORM_RATE:,} writes/s for {storm_s:g} s")

    memcg = current_memory_cgroup()
    v1_dir: Path | None = None
    v1_skipped: str | None = None
    if memcg is None or memcg.version != 1:
        v1_skipped = "no cgroup v1 memory controller"
    else:
        try:
            v1_dir = create_child_memcg(memcg, f"aiopgalloc_bench{os.getpid()}", 1 << 30)
        except OSError as exc:
            v1_skipped = f"cannot create a memory cgroup: {exc}"
    if v1_skipped:
        print(f"v1 eventfd latency and storm skipped: {v1_skipped}")

    started = perf_counter()
    results: dict[str, dict[str, Any]] = {}
    try:
        for b in wanted:
            backend, options = BACKENDS[b]
            print(f"  {b} ...", flush=True)
            raw: dict[str, Any] = anyio.run(
                run_backend, n, storm_s, v1_dir, backend=backend, backend_options=options
            )
            raw["summary"] = {k: _summary(v) for k, v in raw.items() if k.endswith("_s")}
            results[b] = raw
    finally:
        if v1_dir is not None:
            remove_child(v1_dir)
    elapsed = perf_counter() - started
    _table(results)
    print(f"\ntotal time {elapsed:.1f} s")

    if args.save:
        info["loadavg_end"] = os.getloadavg()
        doc = {
            "benchmark": "pressure",
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "config": {
                "quick": args.quick,
                "samples": n,
                "idle_before_sample_s": IDLE_BEFORE_SAMPLE,
                "storm_seconds": storm_s,
                "storm_target_writes_per_s": STORM_RATE,
                "tick_s": TICK,
                "v1_skipped": v1_skipped,
            },
            "machine": info,
            "elapsed_s": elapsed,
            "results": results,
        }
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        path = RESULTS_DIR / f"pressure-{socket.gethostname()}.json"
        path.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"saved {path}")


if __name__ == "__main__":
    main()
