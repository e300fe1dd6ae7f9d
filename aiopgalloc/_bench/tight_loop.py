"""Workload 12: the tight loop, on both builds of the core, against mmap.

What a service does between two awaits: allocate a small buffer, use it,
free it, with no ``await`` in the loop.  The file holds 10,000 live
allocations (20,000 of 1-16 pages allocated, a random half freed, then
``await mf.wait_for_reclaim()``), so first fit searches a fragmented map.
Two cases, each timed as ``cycles`` repetitions in one go:

``4 KiB``
    ``mf.dec_ref(mf.allocate(4096))``; against ``mmap.mmap(-1, 4096)`` +
    ``close()``, and ``shared_memory.SharedMemory(create=True, size=4096)``
    + ``close()`` + ``unlink()``.
``16 KiB written``
    ``allocate(16384)``, one byte written in each of its 4 pages through
    ``mf.view(fr)``, ``dec_ref``; against the same with an mmap and with a
    ``SharedMemory`` (written through ``.buf``).

Both builds side by side: the build this process runs (compiled, unless
the install is pure or ``AIOPGALLOC_PURE=1``) in process, and, when that
is the compiled one, the pure build in a worker process started with
``AIOPGALLOC_PURE=1`` (same backend, same seed, same live set), driven
sample by sample over a pipe so its samples interleave with the others.
Every contender's samples are interleaved, the order rotated every round;
before each aiopgalloc sample the file waits for reclaim (so each starts
from the same state); medians of the time per cycle are reported, and
mmap's time over aiopgalloc's (higher is better).  Runs on every backend
chosen (the loop has no await, but each ``dec_ref`` wakes the releaser).

Targets (issue 15, compiled build): 4 KiB >= 1.0x mmap; 16 KiB written
>= 1.5x mmap and >= 5x shared_memory.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import random
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable
from multiprocessing import shared_memory
from pathlib import Path
from typing import IO, Any

import anyio
import anyio.to_thread

from .. import _native
from ..lifecycle import open_memory_file
from ..memory_file import MemoryFile
from ..ranges import PAGE_SIZE
from .common import (
    BACKENDS,
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
    spread_pct,
)

__all__ = ["CASES", "PureWorker", "prepare", "run", "time_case", "total_steps"]

NAME = "tight_loop"
TITLE = "tight loop: allocate + dec_ref, no await, 10,000 live, compiled and pure"
P = PAGE_SIZE
CASES = ("4 KiB", "16 KiB written")
TARGETS = {
    ("4 KiB", "mmap"): Target(">=", 1.0),
    ("16 KiB written", "mmap"): Target(">=", 1.5),
    ("16 KiB written", "shared_memory"): Target(">=", 5.0),
}


def _live(cfg: Config) -> int:
    return cfg.pick(10_000, 10_000, 500)


def _cycles(cfg: Config, who: str) -> int:
    """Cycles per sample: shared_memory is about ten times slower."""
    if who == "shared_memory":
        return cfg.pick(2_000, 500, 50)
    return cfg.pick(20_000, 5_000, 200)


# ------------------------------------------------------------ the loops


async def prepare(mf: MemoryFile, live: int, seed: int) -> None:
    """Allocate ``2 * live`` ranges of 1-16 pages, free a random half,
    wait until the freed pages are back with the kernel."""
    rng = random.Random(seed)
    ranges = [mf.allocate(rng.randint(1, 16) * P) for _ in range(2 * live)]
    for i in sorted(rng.sample(range(len(ranges)), len(ranges) - live)):
        mf.dec_ref(ranges[i])
    await mf.wait_for_reclaim()


def time_case(mf: MemoryFile, case: str, cycles: int) -> float:
    """Seconds for ``cycles`` cycles of ``case`` on ``mf`` (no await)."""
    allocate, dec_ref = mf.allocate, mf.dec_ref
    if case == "4 KiB":
        t0 = perf_counter()
        for _ in range(cycles):
            dec_ref(allocate(P))
        return perf_counter() - t0
    view = mf.view
    size = 4 * P
    t0 = perf_counter()
    for _ in range(cycles):
        fr = allocate(size)
        v = view(fr)
        v[0] = 1
        v[P] = 1
        v[2 * P] = 1
        v[3 * P] = 1
        dec_ref(fr)
    t = perf_counter() - t0
    del v
    return t


def time_mmap(case: str, cycles: int) -> float:
    """Seconds for ``cycles`` anonymous mmaps of the case's size (written
    the same way), each closed."""
    new = mmap.mmap
    if case == "4 KiB":
        t0 = perf_counter()
        for _ in range(cycles):
            new(-1, P).close()
        return perf_counter() - t0
    size = 4 * P
    t0 = perf_counter()
    for _ in range(cycles):
        m = new(-1, size)
        m[0] = 1
        m[P] = 1
        m[2 * P] = 1
        m[3 * P] = 1
        m.close()
    return perf_counter() - t0


def time_shared_memory(case: str, cycles: int) -> float:
    """Seconds for ``cycles`` ``SharedMemory`` segments of the case's size
    (written the same way), each closed and unlinked."""
    new = shared_memory.SharedMemory
    size = P if case == "4 KiB" else 4 * P
    written = case != "4 KiB"
    t0 = perf_counter()
    for _ in range(cycles):
        s = new(create=True, size=size)
        if written:
            b = s.buf
            assert b is not None
            b[0] = 1
            b[P] = 1
            b[2 * P] = 1
            b[3 * P] = 1
            del b
        s.close()
        s.unlink()
    return perf_counter() - t0


# ------------------------------------------------------ the pure worker


class PureWorker:
    """The pure build in a child process (``AIOPGALLOC_PURE=1``), with its
    own memory file prepared the same way, timing one sample per request."""

    def __init__(self, backend: str, live: int, seed: int) -> None:
        top = str(Path(__file__).resolve().parent.parent.parent)
        path = os.environ.get("PYTHONPATH")
        env = {
            **os.environ,
            _native.PURE_ENV: "1",
            "PYTHONPATH": top if not path else top + os.pathsep + path,
        }
        # Closed by close(); the worker's errors are read from it.
        self._stderr: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115
        self._proc = subprocess.Popen(
            [sys.executable, "-m", __name__, backend, str(live), str(seed)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=env,
            text=True,
        )
        self.compiled = self._read() == "compiled"

    def _read(self) -> str:
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if not line:
            self._stderr.seek(0)
            err = self._stderr.read().decode(errors="replace").strip()
            raise RuntimeError(f"the pure-build worker died: {err[-2000:]}")
        return line.strip()

    def sample(self, case: str, cycles: int) -> float:
        """Seconds for ``cycles`` cycles of ``case`` in the worker."""
        assert self._proc.stdin is not None
        self._proc.stdin.write(f"{case}|{cycles}\n")
        self._proc.stdin.flush()
        return float(self._read())

    def close(self) -> None:
        """Stop the worker (it closes its file) and wait for it."""
        with contextlib.suppress(OSError, ValueError):
            if self._proc.stdin is not None:
                self._proc.stdin.close()
        try:
            self._proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._stderr.close()


async def _worker(live: int, seed: int) -> None:
    async with open_memory_file() as mf:
        await prepare(mf, live, seed)
        print("compiled" if _native.compiled() else "pure", flush=True)
        while True:
            line = await anyio.to_thread.run_sync(sys.stdin.readline)
            if not line.strip():
                return
            case, _, cycles = line.strip().partition("|")
            await mf.wait_for_reclaim()
            collect()
            print(repr(time_case(mf, case, int(cycles))), flush=True)


def worker_main(argv: list[str]) -> None:
    """The worker's entry point: ``python -m aiopgalloc._bench.tight_loop
    BACKEND LIVE SEED``; one sample per stdin line ``case|cycles``, its
    seconds on stdout; stops at end of input."""
    backend, live, seed = argv
    run_on(backend, _worker, int(live), int(seed))


# ---------------------------------------------------------------- the run

Sample = Callable[[], Awaitable[float]]


# Per case: this process's build, the pure worker, mmap, shared_memory.
_PER_CASE = 4


def total_steps(cfg: Config) -> int:
    """Progress steps: every contender of both cases, every repetition, on
    every backend (the pure worker's included, even when absent)."""
    return cfg.reps * len(CASES) * _PER_CASE * len(cfg.backends)


async def _session(cfg: Config, progress: Progress, backend: str) -> dict[str, Any]:
    live = _live(cfg)
    here = "compiled" if _native.compiled() else "pure"
    async with open_memory_file() as mf:
        await prepare(mf, live, cfg.seed)
        worker = (
            await anyio.to_thread.run_sync(PureWorker, backend, live, cfg.seed)
            if here == "compiled"
            else None
        )
        try:
            if worker is not None and worker.compiled:
                raise RuntimeError("the AIOPGALLOC_PURE=1 worker runs compiled")

            def ours(case: str) -> Sample:
                async def sample() -> float:
                    await mf.wait_for_reclaim()
                    collect()
                    return time_case(mf, case, _cycles(cfg, "aiopgalloc"))

                return sample

            def pure(case: str) -> Sample:
                async def sample() -> float:
                    assert worker is not None
                    n = _cycles(cfg, "aiopgalloc")
                    return await anyio.to_thread.run_sync(worker.sample, case, n)

                return sample

            def bare(case: str, who: str) -> Sample:
                fn = time_mmap if who == "mmap" else time_shared_memory

                async def sample() -> float:
                    collect()
                    return fn(case, _cycles(cfg, who))

                return sample

            contenders: list[tuple[str, Sample]] = []
            cycles: dict[str, int] = {}
            for case in CASES:
                contenders.append((f"{here}|{case}", ours(case)))
                if worker is not None:
                    contenders.append((f"pure|{case}", pure(case)))
                contenders.append((f"mmap|{case}", bare(case, "mmap")))
                contenders.append((f"shared_memory|{case}", bare(case, "shared_memory")))
            for name, _ in contenders:
                who = name.partition("|")[0]
                cycles[name] = _cycles(
                    cfg, who if who in ("mmap", "shared_memory") else "aiopgalloc"
                )
            seconds: dict[str, list[float]] = {name: [] for name, _ in contenders}
            for rep in range(cfg.reps):
                for name, fn in rotate(contenders, rep):
                    seconds[name].append(await fn())
                    progress.step(f"{name.replace('|', ' ')} ({backend}), rep {rep + 1}/{cfg.reps}")
                if worker is None:  # keep the progress total honest
                    for case in CASES:
                        progress.step(f"no pure worker for {case} ({backend})")
        finally:
            if worker is not None:
                await anyio.to_thread.run_sync(worker.close)
    us = {name: [t / cycles[name] * 1e6 for t in v] for name, v in seconds.items()}
    return {"here": here, "us_per_cycle": us}


def run(cfg: Config, progress: Progress) -> WorkloadResult:
    """Run workload 12 on every chosen backend."""
    by_backend: dict[str, dict[str, Any]] = {}
    for b in cfg.backends:
        if b not in BACKENDS:
            continue
        by_backend[b] = run_on(b, _session, cfg, progress, b)
    result = WorkloadResult(
        key=12,
        name=NAME,
        title=TITLE,
        backends=list(cfg.backends),
        params={
            "live": _live(cfg),
            "prepared": f"{2 * _live(cfg):,} allocations of 1-16 pages, a random half freed",
            "cycles_per_sample": {
                "aiopgalloc": _cycles(cfg, "aiopgalloc"),
                "mmap": _cycles(cfg, "mmap"),
                "shared_memory": _cycles(cfg, "shared_memory"),
            },
            "cases": list(CASES),
        },
    )
    medians: dict[str, dict[str, float]] = {}
    for b, got in by_backend.items():
        med = {name: median(v) for name, v in got["us_per_cycle"].items()}
        medians[b] = med
        builds = [x for x in ("compiled", "pure") if f"{x}|4 KiB" in med]
        for case in CASES:
            for build in builds:
                ours = med[f"{build}|{case}"]
                for peer in ("mmap", "shared_memory"):
                    if case == "4 KiB" and peer == "shared_memory" and build == "pure":
                        continue
                    theirs = med[f"{peer}|{case}"]
                    result.rows.append(
                        Row(
                            measurement=f"{case} cycle, {build}, vs {peer} ({b})",
                            value=f"{fmt_time(ours * 1e-6)}",
                            peer=f"{fmt_time(theirs * 1e-6)}",
                            ratio=theirs / ours if ours else None,
                            ratio_note=f"{peer} time / aiopgalloc time (higher is better)",
                            target=TARGETS.get((case, peer)) if build == "compiled" else None,
                        )
                    )
            if len(builds) == 2:
                c, p = med[f"compiled|{case}"], med[f"pure|{case}"]
                result.rows.append(
                    Row(
                        measurement=f"{case} cycle, compiled vs pure ({b})",
                        value=fmt_time(c * 1e-6),
                        peer=fmt_time(p * 1e-6),
                        ratio=p / c if c else None,
                        ratio_note="informational: pure time / compiled time (what compiling buys)",
                    )
                )
        if len(builds) < 2:
            result.notes.append(
                f"{b}: only the {builds[0] if builds else '?'} build measured "
                "(the pure build runs beside a compiled install only)"
            )
    result.data = {
        "median_us_per_cycle": medians,
        "samples_us_per_cycle": {b: got["us_per_cycle"] for b, got in by_backend.items()},
        "spread_pct": {
            b: {name: spread_pct(v) for name, v in got["us_per_cycle"].items()}
            for b, got in by_backend.items()
        },
        "this_build": next(iter(by_backend.values()))["here"] if by_backend else None,
    }
    return result


if __name__ == "__main__":
    worker_main(sys.argv[1:])
