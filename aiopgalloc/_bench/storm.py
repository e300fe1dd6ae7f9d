"""Workload 10: a kernel pressure source: its signal to the first ``evict()``,
and whether a storm of its events hurts the event loop.

The source is a ``CgroupV1Pressure`` listening (at ``low``) on a child
memory cgroup made for the run (no process in it, so the kernel adds
nothing; removed afterwards).  A write to the eventfd it registered with the
kernel, from another thread, stands in for the kernel's own signal (the
source cannot tell the difference).  That needs root and the cgroup v1
memory controller; elsewhere the storm is made with ``ManualPressure.notify()``
from the thread instead (said in the notes), and the first figure is
skipped.  Per backend, on a memory file with ``DelayedEviction.ENABLED`` and
``use_host_memcg_pressure=True``:

1. **v1 eventfd -> first evict()**: the method of workload 5 (a probe user,
   the loop idle about 1 ms before each sample, the time taken in the
   writing thread); 500 samples (100 with ``--quick``) after 20 of warm-up;
   median and 99th percentile.
2. **storm**: a thread signals at 10,000 events/s for 2 s (1 s with
   ``--quick``) while a ticker task sleeps 5 ms at a time and records how
   late it wakes (lag = elapsed - 5 ms), and four caches of 16 one-page
   entries are refilled every 10 ms so evictions have work all along.
   Reported: the ticker's worst and 99th percentile lag, next to the same
   ticker's with no storm (measured just before); in the notes the events
   sent, the deliveries the source coalesced them into and the ``evict``
   calls made.

Informational: no target.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio

from ..host.cgroup import create_child_memcg, current_memory_cgroup, remove_child
from ..host.pressure import CgroupV1Pressure, ManualPressure, PressureLevel, PressureSource
from ..lifecycle import open_memory_file
from ..memory_file import MemoryFile
from ..options import DelayedEviction, MemoryFileOpts
from ..ranges import PAGE_SIZE, EvictableRange, FileRange
from ..usage import MemoryKind
from .common import Config, Progress, Row, WorkloadResult, median, p99, perf_counter, run_on
from .eviction import Poker, latency

__all__ = ["run", "total_steps"]

NAME = "storm"
TITLE = "kernel pressure events: v1 eventfd to evict(), event storm vs loop lag"
P = PAGE_SIZE
TICK = 0.005
STORM_RATE = 10_000  # events per second
CACHES = 4
SLOTS = 16


def total_steps(cfg: Config) -> int:
    """Progress steps: one per backend."""
    return len(cfg.backends)


class Cache:
    """An evictable user holding real one-page entries, for the storm."""

    def __init__(self, mf: MemoryFile) -> None:
        self.mf = mf
        self.entries: dict[int, FileRange] = {}
        self.calls = 0

    def refill(self) -> None:
        """Allocate and mark evictable every empty slot."""
        for slot in range(SLOTS):
            if slot in self.entries:
                continue
            fr = self.mf.allocate(P, MemoryKind.PAGE_CACHE)
            for view in self.mf.map_internal(fr):
                view[:8] = slot.to_bytes(8, "little")
                view.release()
            self.entries[slot] = fr
            self.mf.mark_evictable(self, EvictableRange(slot * P, (slot + 1) * P))

    async def evict(self, er: EvictableRange) -> None:
        """Drop the entries of ``er``."""
        self.calls += 1
        for slot in range(er.start // P, er.end // P):
            fr = self.entries.pop(slot, None)
            if fr is not None:
                self.mf.dec_ref(fr)

    def close(self) -> None:
        """Withdraw and free every entry."""
        self.mf.mark_all_unevictable(self)
        for fr in self.entries.values():
            self.mf.dec_ref(fr)
        self.entries.clear()


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
    return {
        "worst_ms": max(lags) * 1e3,
        "p99_ms": p99(lags) * 1e3,
        "median_ms": median(lags) * 1e3,
        "ticks": len(lags),
    }


async def _storm(
    mf: MemoryFile, signal: Callable[[], None], duration: float, idle: float
) -> dict[str, Any]:
    """A thread calls ``signal`` STORM_RATE times a second for ``duration``
    seconds while the ticker runs and the caches are refilled every 10 ms."""
    idle_lags = await _ticker(idle)
    caches = [Cache(mf) for _ in range(CACHES)]
    for c in caches:
        c.refill()
    sent = 0
    stop = threading.Event()

    def writer() -> None:
        nonlocal sent
        start = perf_counter()
        while not stop.is_set():
            due = int((perf_counter() - start) * STORM_RATE)
            while sent < due:
                signal()
                sent += 1
            time.sleep(0.0005)

    async def refiller() -> None:
        while True:
            await anyio.sleep(0.010)
            for c in caches:
                c.refill()

    before = mf.stats().evictions
    thread = threading.Thread(target=writer, name="bench-storm")
    async with anyio.create_task_group() as tg:
        tg.start_soon(refiller)
        t0 = perf_counter()
        thread.start()
        try:
            lags = await _ticker(duration)
        finally:
            stop.set()
            await anyio.to_thread.run_sync(thread.join)
        took = perf_counter() - t0
        tg.cancel_scope.cancel()
    # What is still pending is delivered at the next wake; wait for it.
    with anyio.move_on_after(1):
        while mf.stats().evictions.pressure_events == before.pressure_events:
            await anyio.sleep(0.01)
    if not await mf.wait_for_evictions(5):
        raise RuntimeError("an eviction never finished")
    after = mf.stats().evictions
    calls = sum(c.calls for c in caches)
    for c in caches:
        c.close()
    return {
        "seconds": took,
        "events": sent,
        "events_per_s": sent / took,
        "deliveries": after.pressure_events - before.pressure_events,
        "evict_calls": calls,
        "evicted_bytes": after.evicted_bytes - before.evicted_bytes,
        "lag": _lag_summary(lags),
        "idle_lag": _lag_summary(idle_lags),
    }


def _opts(source: PressureSource) -> MemoryFileOpts:
    return MemoryFileOpts(
        delayed_eviction=DelayedEviction.ENABLED,
        use_host_memcg_pressure=True,
        pressure_source=source,
    )


async def _backend(
    v1_dir: Path | None, n: int, warmup: int, duration: float, idle: float
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    poker = Poker()
    try:
        if v1_dir is not None:
            v1 = CgroupV1Pressure(v1_dir, "low")
            async with open_memory_file(opts=_opts(v1)) as mf:
                efd = v1.eventfds[PressureLevel.LOW]

                def kernel_signal() -> None:
                    os.eventfd_write(efd, 1)

                await latency(mf, warmup, kernel_signal, poker)
                out["v1_eventfd_s"] = await latency(mf, n, kernel_signal, poker)
                out["storm"] = await _storm(mf, kernel_signal, duration, idle)
        else:
            manual = ManualPressure()
            async with open_memory_file(opts=_opts(manual)) as mf:
                out["storm"] = await _storm(mf, manual.notify, duration, idle)
    finally:
        poker.stop()
    return out


def _v1_cgroup() -> tuple[Path | None, str | None]:
    """A fresh child memory cgroup (v1), or None and why not."""
    memcg = current_memory_cgroup()
    if memcg is None or memcg.version != 1:
        return None, "no cgroup v1 memory controller"
    try:
        return create_child_memcg(memcg, f"aiopgalloc_bench{os.getpid()}", 1 << 30), None
    except OSError as exc:
        return None, f"cannot create a memory cgroup: {exc}"


def run(cfg: Config, progress: Progress) -> WorkloadResult:
    """Run workload 10 on every chosen backend."""
    n = cfg.pick(500, 100, 20)
    warmup = cfg.pick(20, 20, 5)
    duration = cfg.pick(2.0, 1.0, 0.2)
    idle = cfg.pick(1.0, 0.5, 0.1)
    v1_dir, skipped = _v1_cgroup()
    raw: dict[str, dict[str, Any]] = {}
    try:
        for b in cfg.backends:
            raw[b] = run_on(b, _backend, v1_dir, n, warmup, duration, idle)
            progress.step(b)
    finally:
        if v1_dir is not None:
            with contextlib.suppress(OSError):
                remove_child(v1_dir)
    source = "cgroup v1 eventfd" if v1_dir is not None else "ManualPressure.notify()"
    result = WorkloadResult(
        key=10,
        name=NAME,
        title=TITLE,
        backends=list(cfg.backends),
        params={
            "samples": n if v1_dir is not None else 0,
            "warmup": warmup,
            "storm_source": source,
            "storm_seconds": duration,
            "storm_events_per_s": STORM_RATE,
            "idle_ticker_seconds": idle,
            "tick_s": TICK,
            "caches": f"{CACHES} x {SLOTS} one-page entries, refilled every 10 ms",
            "v1_skipped": skipped,
        },
    )
    if skipped:
        result.notes.append(
            f"v1 eventfd latency skipped ({skipped}); the storm used ManualPressure.notify() "
            "from a thread, which coalesces its wakes before the eventfd"
        )
    summary: dict[str, dict[str, Any]] = {}
    for b, r in raw.items():
        summary[b] = {}
        xs = r.get("v1_eventfd_s")
        if xs:
            s = {"median_us": median(xs) * 1e6, "p99_us": p99(xs) * 1e6, "n": len(xs)}
            summary[b]["v1 eventfd/thread"] = s
            result.rows.append(
                Row(
                    measurement=f"v1 eventfd->evict() from a thread, median/p99 ({b})",
                    value=f"{s['median_us']:.0f}/{s['p99_us']:.0f} us",
                    ratio_note="informational",
                )
            )
        st = r["storm"]
        lag, idle_lag = st["lag"], st["idle_lag"]
        summary[b]["storm"] = st
        result.rows.append(
            Row(
                measurement=f"storm {STORM_RATE:,}/s: 5 ms ticker lag worst/p99, vs idle ({b})",
                value=f"{lag['worst_ms']:.2f}/{lag['p99_ms']:.2f} ms",
                peer=f"{idle_lag['worst_ms']:.2f}/{idle_lag['p99_ms']:.2f} ms",
                ratio=lag["p99_ms"] / idle_lag["p99_ms"] if idle_lag["p99_ms"] > 0 else None,
                ratio_note="informational: p99 lag in the storm over p99 lag idle",
            )
        )
        result.notes.append(
            f"storm ({b}): {st['events']:,} events ({st['events_per_s']:,.0f}/s) coalesced into "
            f"{st['deliveries']:,} deliveries, {st['evict_calls']:,} evict calls"
        )
    result.data = {
        "summary": summary,
        "samples_us": {
            b: [x * 1e6 for x in r["v1_eventfd_s"]] for b, r in raw.items() if "v1_eventfd_s" in r
        },
    }
    return result
