"""One run of the demo: the cache, its clients, the pressure, the summary.

Phases (as shares of ``--seconds``):

1. fill (0 - 20 %): the clients start; each miss stores the value;
2. load (20 - 40 %): the cache is full; its LRU replaces values, and the
   freed pages are recycled or returned to the kernel;
3. pressure (40 - 70 %): real (a reader streams a sparse file bigger than the
   cgroup's limit through the page cache, in the same memory cgroup) or
   simulated (``ManualPressure.notify``: low, medium, critical); the
   allocator asks the cache's shards to shrink;
4. recovery (70 - 100 %): the pressure is gone, the cache fills again;
5. shutdown: the clients stop, the cache is cleared, every freed page goes
   back to the kernel; the summary says what happened, in plain words.

Eviction is graded: a low notification asks each shard for a quarter of its
evictable bytes, medium for half, critical for all of it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.abc

from .. import DelayedEviction, FileStats, MemoryFile, MemoryFileOpts, MemoryKind, open_memory_file
from ..host import cgroup as cgroup_mod
from ..host.pressure import ManualPressure, PressureLevel
from .demo_cache import DemoCache, EvictRecord, LoadGenerator, ValuePool
from .demo_map import FileMap
from .demo_summary import RunFacts, summarize
from .demo_view import Frame, Header, View, fmt_bytes

__all__ = ["CACHE_BUDGET", "Plan", "run_session"]

MiB = 1 << 20
CACHE_BUDGET = 48 * MiB
SESSION_TABLE = 4 * MiB
KEYS = 3000
FRACTION_LOW, FRACTION_MEDIUM = 0.25, 0.5

_PHASES = (
    (
        "fill",
        0.0,
        "4 clients ask for keys; every miss stores the value in the cache, "
        "in its own page-aligned allocation of the memory file, marked evictable",
    ),
    (
        "load",
        0.2,
        "the cache is at its 48 MiB budget: its LRU replaces old values; "
        "the allocator recycles freed pages or returns them to the kernel",
    ),
    ("pressure", 0.4, ""),
    ("recovery", 0.7, "the pressure is over; the clients go on and the cache fills again"),
    (
        "shutdown",
        1.0,
        "the clients stop and the cache is cleared; the releaser returns "
        "every freed page to the kernel",
    ),
)


@dataclass(frozen=True)
class Plan:
    """How this run makes pressure.  ``cgroup`` set: this process already sits
    in that memory cgroup (limit ``limit``) and ``big_file`` is a sparse file
    to stream through the page cache; otherwise ``manual_reason`` says why
    the pressure is simulated."""

    backend: str
    seconds: float
    cgroup: Path | None = None
    cgroup_version: int | None = None
    limit: int | None = None
    big_file: Path | None = None
    manual_reason: str | None = None
    notes: tuple[str, ...] = ()


class _LogCapture(logging.Handler):
    """Keeps what the library logs (the chooser's report, warnings)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _drop_page_cache(path: Path) -> None:
    """Drop ``path``'s pages from the page cache (they are clean: a hole)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _read_through(path: Path) -> None:
    """Read ``path`` to the end (in this process, when ``cat`` is missing)."""
    buf = bytearray(1 << 20)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass


class _Reader:
    """Real pressure: stream ``path`` through the page cache inside the
    cgroup, ``bursts`` times, each burst lasting at least ``min_seconds``
    (PSI on cgroup v2 needs a stall over a 2 s window to fire)."""

    def __init__(self, path: Path, cgroup: Path, bursts: int, min_seconds: float) -> None:
        self.path = path
        self.cgroup = cgroup
        self.room: int | None = None  # free bytes in the cgroup when the first burst began
        self.bursts = bursts
        self.min_seconds = min_seconds
        self.size = path.stat().st_size
        self.passes = 0
        self.seconds = 0.0
        self.cat = shutil.which("cat")

    async def burst(self, i: int) -> str:
        _drop_page_cache(self.path)  # pages cached earlier would not fault again
        if i == 0:
            usage = _cgroup_file(self.cgroup, "memory.usage_in_bytes", "memory.current")
            limit = _cgroup_file(self.cgroup, "memory.limit_in_bytes", "memory.max")
            if usage is not None and limit is not None:
                self.room = max(0, limit - usage)
        t0 = time.monotonic()
        passes = 0
        while True:
            if self.cat is not None:
                # A child process inherits our memory cgroup: its page cache
                # is charged to the same limit as our memory file.
                await anyio.run_process(
                    [self.cat, str(self.path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
                )
            else:
                await anyio.to_thread.run_sync(_read_through, self.path)
            passes += 1
            if time.monotonic() - t0 >= self.min_seconds:
                break
        took = time.monotonic() - t0
        self.passes += passes
        self.seconds += took
        # Drop what the reader left in the page cache, so that each burst is
        # one episode: a cgroup left full of it would make every later
        # allocation reclaim (and the kernel signal) until it is gone.
        _drop_page_cache(self.path)
        who = "cat" if self.cat else "a reader thread"
        return (
            f"reader {i + 1}/{self.bursts} ({who}, in the cgroup): streamed "
            f"{fmt_bytes(self.size * passes)} through the page cache in {took:.2f} s; "
            "its pages were dropped after"
        )

    async def end(self) -> str:
        return "no more readers: the cgroup has room again"


class _Manual:
    """Simulated pressure: ``ManualPressure.notify`` at rising levels."""

    LEVELS = (PressureLevel.LOW, PressureLevel.MEDIUM, PressureLevel.CRITICAL)

    def __init__(self, source: ManualPressure) -> None:
        self.source = source
        self.bursts = len(self.LEVELS)

    async def burst(self, i: int) -> str:
        level = self.LEVELS[i]
        self.source.notify(level)
        return f"ManualPressure.notify({level.name}), standing in for the kernel"

    async def end(self) -> str:
        return "no more notifications"


def _cgroup_file(path: Path | None, *names: str) -> int | None:
    for name in names:
        if path is None:
            return None
        with contextlib.suppress(OSError, ValueError):
            text = (path / name).read_text().strip()
            return None if text == "max" else int(text)
    return None


def _cgroup_figures(path: Path | None) -> dict[str, int]:
    """Limit hits and OOM kills as the kernel counts them (v1 and v2)."""
    out: dict[str, int] = {}
    if path is None:
        return out
    fail = _cgroup_file(path, "memory.failcnt")
    if fail is not None:
        out["limit_hits"] = fail
    with contextlib.suppress(OSError):
        for line in (path / "memory.oom_control").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                out["oom_kills"] = int(value)
    with contextlib.suppress(OSError):
        events = cgroup_mod.parse_flat_keyed((path / "memory.events").read_text())
        out["limit_hits"] = events.get("max", 0)
        out["oom_kills"] = events.get("oom_kill", 0)
    return out


@dataclass
class _Run:
    """The moving parts of one run, shared by its tasks."""

    plan: Plan
    view: View
    mf: MemoryFile
    cache: DemoCache
    load: LoadGenerator
    driver: _Reader | _Manual
    t0: float = field(default_factory=time.monotonic)
    phase: int = 1
    phase_text: str = ""
    source_name: str = ""
    filemap: FileMap = field(default_factory=FileMap)
    last_frame: Frame | None = None
    peak_committed: int = 0
    peak_file: int = 0
    pressure_began: float | None = None
    recovery_peak: int = 0
    reported_pressure: tuple[int, int, int] = (0, 0, 0)
    reported_evicts: int = 0
    last_ops: tuple[float, int] = (0.0, 0)
    last_gets: tuple[int, int] = (0, 0)

    def now(self) -> float:
        return time.monotonic() - self.t0

    def event(self, text: str, detail: str = "") -> None:
        self.view.event(self.now(), text, detail)

    async def sleep_until(self, t: float) -> None:
        await anyio.sleep(max(0.0, t - self.now()))

    def enter(self, phase: int, text: str = "") -> None:
        name, _, default = _PHASES[phase - 1]
        self.phase, self.phase_text = phase, text or default
        self.event(f"phase {phase}/{len(_PHASES)}: {name}", self.phase_text)

    async def sample(self) -> Frame:
        """Take the figures, report what changed, make a frame."""
        mf = self.mf
        stats = mf.stats()
        self._report(stats)
        self.peak_committed = max(self.peak_committed, stats.committed_bytes)
        self.peak_file = max(self.peak_file, stats.file_size)
        if self.phase == 4:
            self.recovery_peak = max(self.recovery_peak, self.cache.nbytes)
        t = self.now()
        last_t, last_ops = self.last_ops
        rate = (self.load.ops - last_ops) / (t - last_t) if t > last_t else 0.0
        if not self.load.running:
            rate = 0.0
        self.last_ops = (t, self.load.ops)
        fig = self.cache.figures
        gets, hits = fig.gets - self.last_gets[0], fig.hits - self.last_gets[1]
        self.last_gets = (fig.gets, fig.hits)
        cg = self.plan.cgroup
        frame = Frame(
            t=t,
            phase=self.phase,
            phase_name=_PHASES[self.phase - 1][0],
            phase_text=self.phase_text,
            stats=stats,
            cells=self.filemap.update(mf.page_map(), stats.file_size, self.view.cells),
            cache_entries=self.cache.entries,
            cache_bytes=self.cache.nbytes,
            cache_budget=self.cache.budget,
            hit_ratio=hits / gets if gets and self.load.running else 0.0,
            verified=fig.verified,
            lru_dropped=fig.lru_dropped,
            ops_per_s=rate,
            cgroup_usage=_cgroup_file(cg, "memory.usage_in_bytes", "memory.current"),
            cgroup_limit=self.plan.limit,
            pressure_source=self.source_name,
        )
        self.last_frame = frame
        return frame

    def _report(self, s: FileStats) -> None:
        """One event for new pressure notifications and the evictions that
        followed them (both seen since the previous frame)."""
        now = (s.pressure_low, s.pressure_medium, s.pressure_critical)
        new = [n - o for n, o in zip(now, self.reported_pressure, strict=True)]
        self.reported_pressure = now
        log = self.cache.figures.evict_log
        recs = log[self.reported_evicts :]
        self.reported_evicts = len(log)
        evicted = (
            f"the cache evicted {sum(r.entries for r in recs):,} values, "
            f"{fmt_bytes(sum(r.nbytes for r in recs))} ({len(recs):,} evict calls)"
        )
        if any(new):
            names = ("low", "medium", "critical")
            levels = ", ".join(f"{name} x{n}" for name, n in zip(names, new, strict=True) if n)
            self.event(f"pressure: {levels}" + (f" -> {evicted}" if recs else ""))
        elif recs:
            self.event(evicted)


async def _ticker(run: _Run, interval: float) -> None:
    while True:
        run.view.frame(await run.sample())
        await anyio.sleep(interval)


async def _account(mf: MemoryFile, interval: float) -> None:
    """Keep the per-kind accounting fresh, apart from the frames: under heavy
    churn a usage scan can take a few hundred milliseconds (it is redone
    when pages were released while it ran)."""
    while True:
        await mf.update_usage()
        await anyio.sleep(interval)


async def _direct(run: _Run) -> None:
    """Walk through the phases (the clients run meanwhile)."""
    seconds = run.plan.seconds
    run.enter(1)
    await run.sleep_until(0.2 * seconds)
    if run.cache.nbytes >= 0.9 * run.cache.budget:
        run.enter(2)
    else:
        run.enter(
            2,
            f"the cache fills toward its {CACHE_BUDGET >> 20} MiB budget; past it, its LRU "
            "replaces old values, and the allocator recycles or releases the freed pages",
        )
    await run.sleep_until(0.4 * seconds)
    if isinstance(run.driver, _Reader):
        reader = run.driver
        text = (
            f"a reader in the same memory cgroup streams a {fmt_bytes(reader.size)} sparse file "
            f"through the page cache, {reader.bursts} times; the cgroup's "
            f"{fmt_bytes(run.plan.limit or 0)} limit forces the kernel to reclaim, and it "
            "signals memory pressure"
        )
    else:
        text = "the demo calls ManualPressure.notify() three times: low, medium, critical"
    run.enter(3, text)
    run.pressure_began = time.monotonic()
    start = run.now()
    for i in range(run.driver.bursts):
        await run.sleep_until(start + i * 0.1 * seconds)
        run.event(await run.driver.burst(i))
    await anyio.sleep(0.05 * seconds)
    await run.sleep_until(0.7 * seconds)
    run.event(await run.driver.end())
    run.enter(4)
    await run.sleep_until(max(seconds, run.now() + 0.2 * seconds))


async def _watch_signals(scope: anyio.CancelScope, got: list[int]) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGHUP) as signals:
        async for signum in signals:
            got.append(signum)
            scope.cancel()
            return


async def run_session(plan: Plan, view: View) -> int:
    """Run the demo; returns the exit code (0: every check passed)."""
    capture = _LogCapture()
    logger = logging.getLogger("aiopgalloc")
    logger.addHandler(capture)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    manual = ManualPressure("ManualPressure") if plan.cgroup is None else None
    opts = MemoryFileOpts(
        delayed_eviction=DelayedEviction.ENABLED,
        use_host_memcg_pressure=True,
        pressure_source=manual,
        evict_fraction_low=FRACTION_LOW,
        evict_fraction_medium=FRACTION_MEDIUM,
    )
    got_signals: list[int] = []
    try:
        async with anyio.create_task_group() as outer:
            outer.start_soon(_watch_signals, outer.cancel_scope, got_signals)
            async with open_memory_file(opts=opts) as mf:
                run = _make_run(plan, view, mf, manual, capture)
                view.start(_header(run))
                facts = await _play(run)
            outer.cancel_scope.cancel()
    except BaseException:
        view.stop()
        raise
    finally:
        logger.removeHandler(capture)
        logger.setLevel(old_level)
    if got_signals:
        view.stop()
        print(f"\ninterrupted by signal {got_signals[0]}; the memory file is closed", flush=True)
        return 128 + got_signals[0]
    view.finish(run.last_frame, summarize(facts))
    return 0 if facts.ok else 1


def _make_run(
    plan: Plan, view: View, mf: MemoryFile, manual: ManualPressure | None, capture: _LogCapture
) -> _Run:
    cache = DemoCache(mf, CACHE_BUDGET)
    load = LoadGenerator(cache, ValuePool(), keys=KEYS, seed=int(time.time()))
    driver: _Reader | _Manual
    if manual is not None:
        driver = _Manual(manual)
    else:
        assert plan.big_file is not None
        v2 = plan.cgroup_version == 2
        assert plan.cgroup is not None
        driver = _Reader(
            plan.big_file, plan.cgroup, bursts=1 if v2 else 3, min_seconds=3.0 if v2 else 0.0
        )
    run = _Run(plan, view, mf, cache, load, driver)
    run.source_name = "ManualPressure" if manual is not None else _chosen_source(capture)
    return run


def _chosen_source(capture: _LogCapture) -> str:
    for rec in capture.records:
        msg = rec.getMessage()
        if msg.startswith("pressure source: ") and ": chosen" in msg:
            return msg[len("pressure source: ") :].split(": chosen")[0]
    return "the host's pressure source"


def _header(run: _Run) -> Header:
    plan = run.plan
    lines = [
        "An async cache keeps its values in one memory file (a memfd) while 4 clients work it; "
        "then memory pressure arrives and the cache sheds.",
    ]
    if plan.cgroup is not None:
        lines.append(
            f"Real pressure: this process runs inside memory cgroup {plan.cgroup} "
            f"(cgroup v{plan.cgroup_version}, limit {fmt_bytes(plan.limit or 0)}), opened with "
            f"use_host_memcg_pressure=True; the library chose {run.source_name}."
        )
    else:
        lines.append(
            f"Simulated pressure: {plan.manual_reason}. Pressure comes from "
            "ManualPressure.notify() instead of the kernel ('python -m aiopgalloc info' "
            "tells what this host offers)."
        )
    lines.extend(plan.notes)
    lines.append(
        f"Graded eviction: each low notification asks every shard for {FRACTION_LOW:.0%} of its "
        f"evictable bytes, medium for {FRACTION_MEDIUM:.0%}, critical for all of it."
    )
    return Header(plan.backend, plan.seconds, tuple(lines), len(_PHASES))


async def _play(run: _Run) -> RunFacts:
    """The phases, then the shutdown; returns the facts for the summary."""
    mf = run.mf
    table = mf.allocate(SESSION_TABLE, MemoryKind.ANONYMOUS)  # pinned, never evictable
    with mf.view(table) as view:
        view[:] = b"\x5a" * len(view)
    async with anyio.create_task_group() as ticking:
        ticking.start_soon(_account, mf, 0.5)
        ticking.start_soon(_ticker, run, run.view.interval)
        async with anyio.create_task_group() as work:
            work.start_soon(run.load.run)
            await _direct(run)
            run.load.running = False
        # 5: shutdown
        run.enter(5)
        cgroup_figures = _cgroup_figures(run.plan.cgroup)
        before = mf.stats()
        run.cache.clear()
        mf.dec_ref(table)
        await mf.wait_for_evictions(10)
        await mf.wait_for_reclaim()
        ticking.cancel_scope.cancel()
    await mf.update_usage()
    final = await run.sample()
    stats = final.stats
    run.event(
        f"cleared: {fmt_bytes(before.live_bytes)} freed; committed now "
        f"{fmt_bytes(stats.committed_bytes)}"
    )
    return _facts(run, stats, cgroup_figures)


FIRST_WINDOW = 0.1
"""The summary tells what the cache gave back in this many seconds after
the first evict call of the pressure phase."""


def _first_wave(log: list[EvictRecord], since: float | None) -> tuple[int, float, float] | None:
    """Bytes given back in the evict calls that began within FIRST_WINDOW
    of the first one after ``since``, the window, and the delay of that
    first call after ``since``."""
    if since is None:
        return None
    recs = [r for r in log if r.began >= since]
    if not recs:
        return None
    first = recs[0].began
    nbytes = sum(r.nbytes for r in recs if r.began - first <= FIRST_WINDOW)
    return nbytes, FIRST_WINDOW, first - since


def _facts(run: _Run, stats: FileStats, cgroup_figures: dict[str, Any]) -> RunFacts:
    fig = run.cache.figures
    driver = run.driver
    return RunFacts(
        backend=run.plan.backend,
        seconds=run.now(),
        real=run.plan.cgroup is not None,
        manual_reason=run.plan.manual_reason,
        cgroup=str(run.plan.cgroup) if run.plan.cgroup else None,
        cgroup_version=run.plan.cgroup_version,
        limit=run.plan.limit,
        source=run.source_name,
        reader_bytes=driver.size if isinstance(driver, _Reader) else 0,
        reader_passes=driver.passes if isinstance(driver, _Reader) else 0,
        reader_seconds=driver.seconds if isinstance(driver, _Reader) else 0.0,
        reader_room=driver.room if isinstance(driver, _Reader) else None,
        clients=run.load.clients,
        requests=fig.gets,
        hits=fig.hits,
        verified=fig.verified,
        mismatches=fig.mismatches,
        peak_bytes=fig.peak_bytes,
        peak_entries=fig.peak_entries,
        peak_committed=run.peak_committed,
        peak_file=run.peak_file,
        lru_dropped=fig.lru_dropped,
        lru_dropped_bytes=fig.lru_dropped_bytes,
        stats=stats,
        evicted_entries=fig.evicted_entries,
        evicted_bytes=fig.evicted_bytes,
        first_wave=_first_wave(fig.evict_log, run.pressure_began),
        session_table=SESSION_TABLE,
        recovery_peak=run.recovery_peak,
        cgroup_figures=cgroup_figures,
        fraction_low=FRACTION_LOW,
        fraction_medium=FRACTION_MEDIUM,
    )
