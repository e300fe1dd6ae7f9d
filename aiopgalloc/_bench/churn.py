"""Workload 1: allocation churn, against the peers a user would pick instead.

Every contender holds 10,000 live allocations of mixed sizes (1-64 pages,
uniformly; 1% of them 2-4 MiB, i.e. 512-1024 pages), every page written
once, then runs random *steps*: free one live allocation chosen at random,
allocate another (its size drawn the same way) and write one byte in each
of its pages.  200,000 steps (20,000 with ``--quick``), cut into one window
per repetition; each window is one sample, timed on its own, and the
contenders' windows are interleaved (order rotated every round).  Every
contender replays the same sequence of victims and sizes.

Contenders:

- ``aiopgalloc``: ``dec_ref`` / ``allocate`` / ``map_internal`` and a write
  per page through the memoryviews; no ``await`` inside the loop (the
  synchronous hot path: freed pages are recycled, zeroed by hand).
- ``mmap``: one anonymous ``mmap.mmap(-1, n)`` per allocation, closed on free.
- ``shared_memory``: one ``multiprocessing.shared_memory.SharedMemory`` per
  allocation, ``close()`` + ``unlink()`` on free.  Each live one holds two
  fds (its own and the mmap's private dup): where ``RLIMIT_NOFILE`` cannot be
  raised far enough, it holds as many live as fit (said in the notes).
- ``free list``: ``FirstFitArena`` (``aiopgalloc._bench.peers``), a
  hand-written first-fit free list over one big anonymous mmap.  It neither
  zeroes reused memory nor returns any to the kernel.
- ``pyarrow``: ``pyarrow.allocate_buffer`` (its default C++ memory pool: the
  in-process ceiling), freed by dropping the buffer; skipped when pyarrow is
  not installed.  Its buffers are not zeroed either.

``mmap`` and ``shared_memory`` create one kernel object per allocation, so
their cost per step does not depend on what came before: each of their
windows stops early at a wall-clock budget (3 s; 0.4 s with ``--quick``), and
their rate is the steps they did over the time they took.  The others run
every step (their cost depends on the fragmentation the history left).

All contenders live in one event loop run (the primary backend), set up
once and kept across windows, so the ten-thousand-allocation setup (about
1.6 GiB written per contender) is paid once; the windows continue one
long run.  With ``--quick`` the initial live sets of ``mmap`` and
``shared_memory`` are mapped but not written: their cost per step does not
depend on it (their early victims free no pages, a few percent in their
favour), and it keeps the machine's memory footprint, and the run, short
(on a VM, memory the guest has not touched lately costs about three times
as much to fault in).  Reported: steps per second, and aiopgalloc's rate
over each peer's.
"""

from __future__ import annotations

import contextlib
import importlib
import mmap
import random
import resource
from dataclasses import dataclass
from multiprocessing import shared_memory
from typing import Any, Protocol

from ..lifecycle import open_memory_file
from ..memory_file import MemoryFile
from ..ranges import PAGE_SIZE, FileRange
from .common import (
    Config,
    Progress,
    Row,
    Target,
    WorkloadResult,
    collect,
    fmt_bytes,
    fmt_rate,
    median,
    perf_counter,
    rotate,
    run_on,
    spread_pct,
    write_pages,
)
from .peers import FirstFitArena

__all__ = ["Aiopgalloc", "FreeList", "arena_capacity", "make_plan", "run", "total_steps"]

NAME = "churn"
TITLE = "allocation churn vs mmap / shared_memory / free list / pyarrow"
P = PAGE_SIZE
TARGETS = {"mmap": Target(">=", 3), "shared_memory": Target(">=", 10), "free list": Target(">=", 2)}
BUDGETED = ("mmap", "shared_memory")
CHECK_EVERY = 32  # steps between clock reads in budgeted windows
_FD_RESERVE = 512


def draw_pages(rng: random.Random) -> int:
    """One allocation size in pages: 1-64, or 512-1024 (2-4 MiB) 1% of the time."""
    if rng.random() < 0.01:
        return rng.randint(512, 1024)
    return rng.randint(1, 64)


@dataclass(frozen=True)
class Plan:
    """The sequence every contender replays: initial sizes, then per window
    the victims (indexes into the live list) and the new sizes, in bytes."""

    initial: list[int]
    windows: list[tuple[list[int], list[int]]]


def make_plan(seed: int, live: int, steps: int, windows: int) -> Plan:
    """Draw the initial sizes and ``steps`` steps cut into ``windows`` windows."""
    rng = random.Random(seed)
    initial = [draw_pages(rng) * P for _ in range(live)]
    per = -(-steps // windows)
    out: list[tuple[list[int], list[int]]] = []
    left = steps
    for _ in range(windows):
        n = min(per, left)
        left -= n
        out.append(
            ([rng.randrange(live) for _ in range(n)], [draw_pages(rng) * P for _ in range(n)])
        )
    return Plan(initial, out)


def arena_capacity(plan: Plan) -> int:
    """The free list's arena for a plan: room for four times the initial
    live set (at least 1 GiB) plus 4 MiB, in whole pages."""
    capacity = max(1 << 30, 4 * sum(plan.initial)) + (1 << 22)
    return capacity - capacity % P


class Contender(Protocol):
    """One way of doing the churn."""

    name: str

    def setup(self, sizes: list[int]) -> None:
        """Allocate and write the initial live set."""

    def window(
        self, victims: list[int], sizes: list[int], budget: float | None
    ) -> tuple[int, float]:
        """Run the steps (or until ``budget`` seconds); return (steps, seconds)."""

    def info(self) -> dict[str, Any]:
        """Figures worth keeping after the run."""

    def close(self) -> None:
        """Free everything."""


class Aiopgalloc:
    """aiopgalloc's hot path on one memory file."""

    name = "aiopgalloc"

    def __init__(self, mf: MemoryFile) -> None:
        self.mf = mf
        self.live: list[FileRange] = []
        self._allocated = 0
        self._recycled0 = 0

    def setup(self, sizes: list[int]) -> None:
        """Allocate and write the live set."""
        mf = self.mf
        for n in sizes:
            fr = mf.allocate(n)
            for v in mf.map_internal(fr):
                write_pages(v, 0, len(v))
            self.live.append(fr)
        self._recycled0 = mf.stats().recycled_bytes

    def window(
        self, victims: list[int], sizes: list[int], budget: float | None
    ) -> tuple[int, float]:
        """The timed steps."""
        live = self.live
        alloc, map_internal, dec_ref = self.mf.allocate, self.mf.map_internal, self.mf.dec_ref
        step = P
        deadline = float("inf") if budget is None else perf_counter() + budget
        done = len(sizes)
        collect()
        t0 = perf_counter()
        for k in range(len(sizes)):
            i = victims[k]
            dec_ref(live[i])
            fr = alloc(sizes[k])
            for v in map_internal(fr):
                for o in range(0, len(v), step):
                    v[o] = 1
            live[i] = fr
            if k % CHECK_EVERY == 0 and perf_counter() > deadline:
                done = k + 1
                break
        took = perf_counter() - t0
        self._allocated += sum(sizes[:done])
        return done, took

    def info(self) -> dict[str, Any]:
        """File size, committed memory and how much was recycled."""
        st = self.mf.stats()
        recycled = self.mf.stats().recycled_bytes - self._recycled0
        return {
            "file_size": st.file_size,
            "committed_bytes": st.committed_bytes,
            "usage_segments": st.segments,
            "freed_bytes_pending": st.freed_bytes,
            "recycled_fraction": recycled / self._allocated if self._allocated else 0.0,
        }

    def close(self) -> None:
        """Nothing: the file's block closes it."""
        self.live.clear()


class Mmap:
    """One anonymous mmap per allocation."""

    name = "mmap"

    def __init__(self, write_initial: bool) -> None:
        self.write_initial = write_initial
        self.live: list[mmap.mmap] = []

    def setup(self, sizes: list[int]) -> None:
        """Map the live set (and write it, unless told not to)."""
        for n in sizes:
            m = mmap.mmap(-1, n)
            if self.write_initial:
                write_pages(m, 0, n)
            self.live.append(m)

    def window(
        self, victims: list[int], sizes: list[int], budget: float | None
    ) -> tuple[int, float]:
        """The timed steps."""
        live = self.live
        new_map = mmap.mmap
        step = P
        deadline = float("inf") if budget is None else perf_counter() + budget
        done = len(sizes)
        collect()
        t0 = perf_counter()
        for k in range(len(sizes)):
            i = victims[k]
            live[i].close()
            n = sizes[k]
            m = new_map(-1, n)
            for o in range(0, n, step):
                m[o] = 1
            live[i] = m
            if k % CHECK_EVERY == 0 and perf_counter() > deadline:
                done = k + 1
                break
        return done, perf_counter() - t0

    def info(self) -> dict[str, Any]:
        """Nothing to add."""
        return {}

    def close(self) -> None:
        """Unmap everything."""
        for m in self.live:
            m.close()
        self.live.clear()


def ensure_open_files(needed: int) -> int:
    """Raise RLIMIT_NOFILE's soft limit towards ``needed`` (up to the hard
    limit); return the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        want = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class SharedMemory:
    """One POSIX shared memory segment per allocation."""

    name = "shared_memory"

    def __init__(self, live_cap: int, write_initial: bool) -> None:
        self.live_cap = live_cap
        self.write_initial = write_initial
        self.live: list[shared_memory.SharedMemory] = []

    def setup(self, sizes: list[int]) -> None:
        """Create the live set, at most ``live_cap`` (and write it, unless
        told not to)."""
        for n in sizes[: self.live_cap]:
            shm = shared_memory.SharedMemory(create=True, size=n)
            if self.write_initial:
                buf = shm.buf
                assert buf is not None
                write_pages(buf, 0, n)
                del buf
            self.live.append(shm)

    def window(
        self, victims: list[int], sizes: list[int], budget: float | None
    ) -> tuple[int, float]:
        """The timed steps (victims taken modulo the live count)."""
        live = self.live
        n_live = len(live)
        create = shared_memory.SharedMemory
        step = P
        deadline = float("inf") if budget is None else perf_counter() + budget
        done = len(sizes)
        collect()
        t0 = perf_counter()
        for k in range(len(sizes)):
            i = victims[k] % n_live
            old = live[i]
            old.close()
            old.unlink()
            n = sizes[k]
            shm = create(create=True, size=n)
            buf: Any = shm.buf
            for o in range(0, n, step):
                buf[o] = 1
            live[i] = shm
            if k % CHECK_EVERY == 0 and perf_counter() > deadline:
                done = k + 1
                break
        return done, perf_counter() - t0

    def info(self) -> dict[str, Any]:
        """How many it held live."""
        return {"live": len(self.live)}

    def close(self) -> None:
        """Close and unlink everything."""
        for shm in self.live:
            shm.close()
            with contextlib.suppress(FileNotFoundError):
                shm.unlink()
        self.live.clear()


class FreeList:
    """The hand-written first-fit free list over one big mmap."""

    name = "free list"

    def __init__(self, capacity: int) -> None:
        self.arena = FirstFitArena(capacity)
        self.live: list[tuple[int, int]] = []
        self._high = 0

    def setup(self, sizes: list[int]) -> None:
        """Carve and write the live set."""
        arena, view = self.arena, self.arena.view
        for n in sizes:
            s = arena.alloc(n)
            write_pages(view, s, n)
            self.live.append((s, n))

    def window(
        self, victims: list[int], sizes: list[int], budget: float | None
    ) -> tuple[int, float]:
        """The timed steps."""
        live = self.live
        alloc, free, view = self.arena.alloc, self.arena.free, self.arena.view
        step = P
        deadline = float("inf") if budget is None else perf_counter() + budget
        done = len(sizes)
        high = self._high
        collect()
        t0 = perf_counter()
        for k in range(len(sizes)):
            i = victims[k]
            s, n = live[i]
            free(s, n)
            n = sizes[k]
            s = alloc(n)
            for o in range(s, s + n, step):
                view[o] = 1
            live[i] = (s, n)
            if s + n > high:
                high = s + n
            if k % CHECK_EVERY == 0 and perf_counter() > deadline:
                done = k + 1
                break
        took = perf_counter() - t0
        self._high = high
        return done, took

    def info(self) -> dict[str, Any]:
        """The free list's length and the arena's high-water mark."""
        return {
            "free_runs": self.arena.free_runs,
            "high_water_bytes": max(self._high, max(s + n for s, n in self.live)),
            "capacity": self.arena.capacity,
        }

    def close(self) -> None:
        """Unmap the arena."""
        self.live.clear()
        self.arena.close()


class Pyarrow:
    """``pyarrow.allocate_buffer`` from the default memory pool."""

    name = "pyarrow"

    def __init__(self, pa: Any) -> None:
        self.pa = pa
        self.live: list[Any] = []

    def setup(self, sizes: list[int]) -> None:
        """Allocate and write the live set."""
        allocate = self.pa.allocate_buffer
        for n in sizes:
            b = allocate(n)
            with memoryview(b) as mv:
                write_pages(mv, 0, n)
            self.live.append(b)

    def window(
        self, victims: list[int], sizes: list[int], budget: float | None
    ) -> tuple[int, float]:
        """The timed steps."""
        live = self.live
        allocate = self.pa.allocate_buffer
        step = P
        deadline = float("inf") if budget is None else perf_counter() + budget
        done = len(sizes)
        collect()
        t0 = perf_counter()
        for k in range(len(sizes)):
            i = victims[k]
            live[i] = None  # frees it
            n = sizes[k]
            b = allocate(n)
            mv = memoryview(b)
            for o in range(0, n, step):
                mv[o] = 1
            mv.release()
            live[i] = b
            if k % CHECK_EVERY == 0 and perf_counter() > deadline:
                done = k + 1
                break
        return done, perf_counter() - t0

    def info(self) -> dict[str, Any]:
        """The pool's backend and what it holds."""
        pool = self.pa.default_memory_pool()
        return {"pool": pool.backend_name, "pool_bytes_allocated": pool.bytes_allocated()}

    def close(self) -> None:
        """Drop every buffer."""
        self.live.clear()


def total_steps(cfg: Config) -> int:
    """Progress steps: five setups, then five contenders per window."""
    return 5 + 5 * cfg.reps


def _pyarrow() -> Any:
    try:
        return importlib.import_module("pyarrow")
    except ImportError:
        return None


async def _workload(cfg: Config, progress: Progress, plan: Plan, budget: float) -> dict[str, Any]:
    live = len(plan.initial)
    notes: list[str] = []
    write_initial = not (cfg.quick or cfg.smoke)
    if not write_initial:
        notes.append(
            "quick: the initial live sets of mmap and shared_memory are not written (their "
            "cost per step does not depend on it, and it keeps the machine's memory footprint "
            "and the run short); their early victims then free no pages, which flatters them "
            "by a few percent"
        )
    limit = ensure_open_files(2 * live + _FD_RESERVE)
    shm_cap = max(1, min(live, (limit - _FD_RESERVE) // 2))
    if shm_cap < live:
        notes.append(
            f"shared_memory held {shm_cap:,} live segments, not {live:,}: RLIMIT_NOFILE is "
            f"{limit:,} and each live segment holds two fds"
        )
    pa = _pyarrow()
    if pa is None:
        notes.append("pyarrow is not installed: its contender was skipped")
    samples: dict[str, list[dict[str, Any]]] = {}
    infos: dict[str, dict[str, Any]] = {}
    async with open_memory_file() as mf:
        contenders: list[Contender] = [
            Aiopgalloc(mf),
            Mmap(write_initial),
            SharedMemory(shm_cap, write_initial),
            FreeList(arena_capacity(plan)),
        ]
        if pa is not None:
            contenders.append(Pyarrow(pa))
        try:
            for c in contenders:
                t0 = perf_counter()
                c.setup(plan.initial)
                progress.step(f"set up {c.name} ({perf_counter() - t0:.1f} s)")
                samples[c.name] = []
            if pa is None:
                progress.step("pyarrow skipped")
            for rep, (victims, sizes) in enumerate(plan.windows):
                for c in rotate(contenders, rep):
                    b = budget if c.name in BUDGETED else None
                    done, took = c.window(victims, sizes, b)
                    samples[c.name].append(
                        {"steps": done, "seconds": took, "rate": done / took if took else 0.0}
                    )
                    progress.step(f"{c.name}, window {rep + 1}/{len(plan.windows)}")
                if pa is None:
                    progress.step("pyarrow skipped")
            for c in contenders:
                infos[c.name] = c.info()
        finally:
            for c in contenders:
                c.close()
    return {"samples": samples, "info": infos, "notes": notes, "shm_live": shm_cap}


def run(cfg: Config, progress: Progress) -> WorkloadResult:
    """Run workload 1 on the primary backend."""
    live = cfg.pick(10_000, 10_000, 300)
    steps = cfg.pick(200_000, 20_000, 600)
    budget = cfg.pick(3.0, 0.4, 0.05)
    plan = make_plan(cfg.seed, live, steps, cfg.reps)
    out = run_on(cfg.primary, _workload, cfg, progress, plan, budget)
    samples: dict[str, list[dict[str, Any]]] = out["samples"]
    rates = {k: [s["rate"] for s in v] for k, v in samples.items()}
    med = {k: median(v) for k, v in rates.items()}
    result = WorkloadResult(
        key=1,
        name=NAME,
        title=TITLE,
        backends=[cfg.primary],
        params={
            "live": live,
            "steps": steps,
            "windows": cfg.reps,
            "steps_per_window": len(plan.windows[0][0]),
            "sizes": "1-64 pages uniform; 1% 512-1024 pages (2-4 MiB)",
            "initial_live_bytes": sum(plan.initial),
            "budget_s_per_window": {k: budget for k in BUDGETED},
            "await_in_loop": False,
        },
        notes=list(out["notes"]),
    )
    a = med["aiopgalloc"]
    for peer in ("mmap", "shared_memory", "free list", "pyarrow"):
        if peer not in med:
            continue
        result.rows.append(
            Row(
                measurement=f"churn steps/s vs {peer}",
                value=fmt_rate(a),
                peer=fmt_rate(med[peer]),
                ratio=a / med[peer] if med[peer] else None,
                ratio_note="aiopgalloc rate / peer rate (higher is better)",
                target=TARGETS.get(peer),
            )
        )
    info = out["info"]
    ai = info.get("aiopgalloc", {})
    result.notes.append(
        f"aiopgalloc at the end: file {fmt_bytes(ai.get('file_size', 0))}, committed "
        f"{fmt_bytes(ai.get('committed_bytes', 0))}, {ai.get('usage_segments', 0):,} usage "
        f"segments, {ai.get('recycled_fraction', 0.0):.0%} of the bytes allocated in the "
        "windows were recycled"
    )
    done = {k: sum(s["steps"] for s in v) for k, v in samples.items()}
    for peer in BUDGETED:
        if peer in done and done[peer] < steps:
            result.notes.append(
                f"{peer} ran {done[peer]:,} of the {steps:,} steps "
                f"(a {budget:g} s budget per window; its cost per step has no history)"
            )
    fl = info.get("free list", {})
    if fl:
        result.notes.append(
            f"free list: {fl['free_runs']:,} free runs at the end (the first-fit scan's "
            f"length), high-water mark {fmt_bytes(fl['high_water_bytes'])}"
        )
    result.data = {
        "samples": samples,
        "median_steps_per_s": med,
        "spread_pct": {k: spread_pct(v) for k, v in rates.items()},
        "steps_done": done,
        "ratios": {
            f"aiopgalloc_over_{k.replace(' ', '_')}": a / v
            for k, v in med.items()
            if v and k != "aiopgalloc"
        },
        "info": info,
    }
    return result
