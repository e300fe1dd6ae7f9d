"""Workload 5: from an eviction request to the first ``evict()`` call.

A memory file with ``DelayedEviction.ENABLED``, ``use_host_memcg_pressure=True``
and a ``ManualPressure`` source, and a probe user with one evictable page whose
``evict`` notes the time of its first call.  Each sample marks the page
evictable again once the previous eviction has finished, lets the loop go
idle (about 1 ms, so the request finds it asleep in its poller, as a real one
would), then asks:

- ``manual/loop``: ``ManualPressure.notify()`` on the event loop's thread (a
  policy task that decided to shed);
- ``manual/thread``: the same from another thread (a watchdog thread); the
  time is taken in that thread just before the call;
- ``start_evictions/loop`` and ``start_evictions/thread``: ``mf.start_evictions()``
  on a file with ``DelayedEviction.MANUAL`` instead (no pressure source in
  the way: the request goes straight to the eviction dispatcher);

and next to them the floor under the cross-thread figures, ``bare
wake/thread``: an eventfd written by the same thread and awaited with
``anyio.wait_readable``, no allocator involved.

500 samples per series (100 with ``--quick``) after 20 of warm-up, on every
chosen backend; reported: median and 99th percentile, in microseconds.
Informational: no target.  ``latency``, ``bare_wake``, ``Probe`` and
``Poker`` are shared with workload 10 (``storm``).
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import anyio

from ..eviction_api import EvictableMemoryUser
from ..host.pressure import ManualPressure
from ..lifecycle import open_memory_file
from ..memory_file import MemoryFile
from ..options import DelayedEviction, MemoryFileOpts
from ..ranges import PAGE_SIZE, EvictableRange
from ..usage import MemoryKind
from .common import Config, Progress, Row, WorkloadResult, median, p99, perf_counter, run_on

__all__ = ["Poker", "Probe", "bare_wake", "latency", "run", "total_steps"]

NAME = "eviction"
TITLE = "pressure notification / start_evictions() to first evict()"
IDLE_BEFORE_SAMPLE = 0.001
SERIES = (
    "manual/loop",
    "manual/thread",
    "start_evictions/loop",
    "start_evictions/thread",
    "bare wake/thread",
)


def total_steps(cfg: Config) -> int:
    """Progress steps: one per backend."""
    return len(cfg.backends)


class Probe:
    """An evictable user with one page; ``evict`` records when it is first
    called after ``arm()`` and wakes the measuring task."""

    def __init__(self, mf: MemoryFile) -> None:
        self.mf = mf
        self.fr = mf.allocate(PAGE_SIZE, MemoryKind.PAGE_CACHE)
        self.hit_at: float | None = None
        self.hit = anyio.Event()

    def arm(self) -> None:
        """Mark the page evictable again; forget the last hit."""
        self.hit_at = None
        self.hit = anyio.Event()
        self.mf.mark_evictable(self, EvictableRange(0, PAGE_SIZE))

    async def evict(self, er: EvictableRange) -> None:
        """Note the first call's time."""
        if self.hit_at is None:
            self.hit_at = perf_counter()
            self.hit.set()


class Poker:
    """A thread that runs one action on request, noting the time just before
    it (so the cue from the loop is not part of the measurement)."""

    def __init__(self) -> None:
        self._q: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self.started_at = 0.0
        self._thread = threading.Thread(target=self._run, name="bench-poker", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            action = self._q.get()
            if action is None:
                return
            time.sleep(IDLE_BEFORE_SAMPLE)  # let the loop go back to sleep
            self.started_at = perf_counter()
            action()

    def poke(self, action: Callable[[], None]) -> None:
        """Run ``action`` in the thread, after a short idle."""
        self._q.put(action)

    def stop(self) -> None:
        """End the thread."""
        self._q.put(None)
        self._thread.join()


async def latency(
    mf: MemoryFile, n: int, fire: Callable[[], None], poker: Poker | None
) -> list[float]:
    """``n`` samples (seconds) of notification -> first evict(); ``fire`` is
    called on the loop's thread, or in the poker thread when one is given."""
    probe = Probe(mf)
    user: EvictableMemoryUser = probe
    samples: list[float] = []
    for _ in range(n):
        if not await mf.wait_for_evictions(5):
            raise RuntimeError("an eviction never finished")
        probe.arm()
        started = 0.0
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
    if not await mf.wait_for_evictions(5):
        raise RuntimeError("an eviction never finished")
    mf.mark_all_unevictable(user)
    mf.dec_ref(probe.fr)
    return samples


async def bare_wake(n: int, poker: Poker) -> list[float]:
    """``n`` samples of an eventfd written by the poker thread and awaited
    with ``anyio.wait_readable``."""
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


async def _backend(n: int, warmup: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    manual = ManualPressure()
    opts = MemoryFileOpts(
        delayed_eviction=DelayedEviction.ENABLED,
        use_host_memcg_pressure=True,
        pressure_source=manual,
    )
    poker = Poker()
    try:
        await bare_wake(warmup, poker)
        out["bare wake/thread"] = await bare_wake(n, poker)
        async with open_memory_file(opts=opts) as mf:
            await latency(mf, warmup, manual.notify, None)
            out["manual/loop"] = await latency(mf, n, manual.notify, None)
            await latency(mf, warmup, manual.notify, poker)
            out["manual/thread"] = await latency(mf, n, manual.notify, poker)
        async with open_memory_file(
            opts=MemoryFileOpts(delayed_eviction=DelayedEviction.MANUAL)
        ) as mf:
            await latency(mf, warmup, mf.start_evictions, None)
            out["start_evictions/loop"] = await latency(mf, n, mf.start_evictions, None)
            await latency(mf, warmup, mf.start_evictions, poker)
            out["start_evictions/thread"] = await latency(mf, n, mf.start_evictions, poker)
    finally:
        poker.stop()
    return out


def run(cfg: Config, progress: Progress) -> WorkloadResult:
    """Run workload 5 on every chosen backend."""
    n = cfg.pick(500, 100, 20)
    warmup = cfg.pick(20, 20, 5)
    samples: dict[str, dict[str, list[float]]] = {}
    for b in cfg.backends:
        samples[b] = run_on(b, _backend, n, warmup)
        progress.step(b)
    result = WorkloadResult(
        key=5,
        name=NAME,
        title=TITLE,
        backends=list(cfg.backends),
        params={
            "samples_per_series": n,
            "warmup": warmup,
            "idle_before_sample_s": IDLE_BEFORE_SAMPLE,
            "sources": "ManualPressure.notify() (ENABLED, host pressure); "
            "mf.start_evictions() (MANUAL)",
        },
    )
    summary: dict[str, dict[str, Any]] = {}
    for b, series in samples.items():
        summary[b] = {}
        for name in SERIES:
            xs = series[name]
            s = {
                "median_us": median(xs) * 1e6,
                "p99_us": p99(xs) * 1e6,
                "min_us": min(xs) * 1e6,
                "max_us": max(xs) * 1e6,
                "n": len(xs),
            }
            summary[b][name] = s
        loop, thread = summary[b]["manual/loop"], summary[b]["manual/thread"]
        bare = summary[b]["bare wake/thread"]
        result.rows.append(
            Row(
                measurement=f"notify->evict() from the loop, median/p99 ({b})",
                value=f"{loop['median_us']:.0f}/{loop['p99_us']:.0f} us",
                ratio_note="informational",
            )
        )
        result.rows.append(
            Row(
                measurement=f"notify->evict() from a thread vs bare wake ({b})",
                value=f"{thread['median_us']:.0f}/{thread['p99_us']:.0f} us",
                peer=f"{bare['median_us']:.0f}/{bare['p99_us']:.0f} us",
                ratio=thread["median_us"] / bare["median_us"] if bare["median_us"] else None,
                ratio_note="informational: medians, thread notify over the bare eventfd wake",
            )
        )
        se_loop = summary[b]["start_evictions/loop"]
        se_thread = summary[b]["start_evictions/thread"]
        result.rows.append(
            Row(
                measurement=f"start_evictions()->evict(), loop / thread, median/p99 ({b})",
                value=f"{se_loop['median_us']:.0f}/{se_loop['p99_us']:.0f}, "
                f"{se_thread['median_us']:.0f}/{se_thread['p99_us']:.0f} us",
                ratio_note="informational",
            )
        )
    result.data = {
        "summary": summary,
        "samples_us": {
            b: {k: [x * 1e6 for x in v] for k, v in s.items()} for b, s in samples.items()
        },
    }
    return result
