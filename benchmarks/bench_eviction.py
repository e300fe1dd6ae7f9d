"""How long from asking for an eviction to the user's ``evict`` being called.

For each backend (asyncio, asyncio + uvloop, trio) and each way of asking:

- ``start_evictions`` on the event loop's thread (the task is spawned
  inline, and runs at the loop's next turn);
- ``start_evictions`` from a worker thread (the request crosses over through
  the eventfd the dispatcher task waits on);
- ``on_pressure(level)`` on the loop's thread and from a worker thread (what
  the pressure watcher will call; ENABLED mode with host pressure),

the script takes N samples (500; 100 with ``--quick``) of the time from just
before the call to the first line of ``evict``, and prints the median and
the 99th percentile in microseconds.  One user with one evictable range per
sample; every sample waits for the eviction to finish before the next one.
The clock is ``time.perf_counter_ns`` (one clock for every thread); the
garbage collector is paused while sampling, and the first 20 samples of
each series are thrown away as warm-up.  The loop is otherwise idle, so the
figures are the floor of the latency, not its value under load.

Usage::

    python benchmarks/bench_eviction.py [--quick] [--save]

``--save`` writes ``benchmarks/results/eviction-<hostname>.json`` with the
samples' summary, the platform, the Python and the package versions.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import math
import os
import platform
import queue
import socket
import statistics
import sys
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
    MemoryFile,
    MemoryFileOpts,
    open_memory_file,
)

BACKENDS: list[tuple[str, str, dict[str, Any]]] = [
    ("asyncio", "asyncio", {}),
    ("asyncio+uvloop", "asyncio", {"use_uvloop": True}),
    ("trio", "trio", {}),
]
SOURCES = [
    "start_evictions (loop)",
    "start_evictions (thread)",
    "on_pressure (loop)",
    "on_pressure (thread)",
]
WARMUP = 20
RANGE = EvictableRange(0, PAGE_SIZE)


class TimedUser:
    """Records when its evict starts and tells the sampler."""

    def __init__(self) -> None:
        self.t_evict = 0
        self.called = anyio.Event()

    async def evict(self, er: EvictableRange) -> None:
        self.t_evict = time.perf_counter_ns()
        self.called.set()


class Caller:
    """A plain worker thread that makes one call per request and notes the
    time just before it (so the hand-over to the thread is not measured)."""

    def __init__(self) -> None:
        self._requests: queue.SimpleQueue[Callable[[], object] | None] = queue.SimpleQueue()
        self.t_call = 0
        self._thread = threading.Thread(target=self._run, name="bench-caller", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (fn := self._requests.get()) is not None:
            self.t_call = time.perf_counter_ns()
            fn()

    def call(self, fn: Callable[[], object]) -> None:
        self._requests.put(fn)

    def stop(self) -> None:
        self._requests.put(None)
        self._thread.join()


async def _series(mf: MemoryFile, n: int, how: str, caller: Caller) -> list[float]:
    """``n`` latencies in microseconds for one way of asking."""
    ev = mf._evictions
    assert ev is not None
    pressure = how.startswith("on_pressure")
    in_thread = how.endswith("(thread)")

    def ask() -> object:
        return ev.on_pressure(1) if pressure else ev.start_evictions()

    out: list[float] = []
    for i in range(n + WARMUP):
        user = TimedUser()
        mf.mark_evictable(user, RANGE)
        if in_thread:
            caller.call(ask)
            await user.called.wait()
            t0 = caller.t_call
        else:
            t0 = time.perf_counter_ns()
            ask()
            await user.called.wait()
        if not await mf.wait_for_evictions(timeout=10):
            raise RuntimeError("an eviction did not finish")
        if i >= WARMUP:
            out.append((user.t_evict - t0) / 1000)
    return out


async def _run_backend(n: int) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {}
    caller = Caller()
    try:
        for how in SOURCES:
            mode = (
                DelayedEviction.ENABLED if how.startswith("on_pressure") else DelayedEviction.MANUAL
            )
            opts = MemoryFileOpts(
                delayed_eviction=mode, use_host_memcg_pressure=mode is DelayedEviction.ENABLED
            )
            async with open_memory_file(opts=opts) as mf:
                gc.collect()
                gc.disable()
                try:
                    results[how] = await _series(mf, n, how, caller)
                finally:
                    gc.enable()
    finally:
        caller.stop()
    return results


def _p99(xs: list[float]) -> float:
    s = sorted(xs)
    return s[max(0, math.ceil(0.99 * len(s)) - 1)]


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("aiopgalloc", "anyio", "trio", "uvloop", "sniffio"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print the table; save it with ``--save``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="100 samples instead of 500")
    parser.add_argument("--save", action="store_true", help="write benchmarks/results/...json")
    args = parser.parse_args(argv)
    n = 100 if args.quick else 500

    rows: list[dict[str, Any]] = []
    for label, backend, options in BACKENDS:
        samples = anyio.run(_run_backend, n, backend=backend, backend_options=options)
        for how in SOURCES:
            xs = samples[how]
            rows.append(
                {
                    "backend": label,
                    "source": how,
                    "n": len(xs),
                    "median_us": round(statistics.median(xs), 1),
                    "p99_us": round(_p99(xs), 1),
                    "min_us": round(min(xs), 1),
                    "max_us": round(max(xs), 1),
                }
            )

    print(f"latency from the request to the first evict() call, N={n} per row (microseconds)")
    header = f"{'backend':<16} {'requested by':<26} {'median':>9} {'p99':>9}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['backend']:<16} {r['source']:<26} {r['median_us']:>9.1f} {r['p99_us']:>9.1f}")

    if args.save:
        host = socket.gethostname()
        doc = {
            "benchmark": "eviction latency: request -> first evict() call",
            "host": host,
            "platform": platform.platform(),
            "machine": platform.machine(),
            "cpu_count": os.cpu_count(),
            "python": sys.version,
            "implementation": platform.python_implementation(),
            "packages": _versions(),
            "samples_per_row": n,
            "warmup": WARMUP,
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "results": rows,
        }
        path = Path(__file__).resolve().parent / "results" / f"eviction-{host}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
