"""Micro-benchmark of SegmentSet, the allocator's usage map.

Run::

    .venv/bin/python benchmarks/bench_segments.py [--quick] [--save] [--repeat N]

The map is *fragmented*: segment k is ``[2k P, (2k+1) P)`` with value ``k``
(P = PAGE_SIZE), so every gap is one page and nothing merges.  At 1k, 10k,
100k and 1M segments (``--quick``: up to 100k) it measures operations per
second of:

``find``
    ``find(key)`` at a random key.
``insert+remove``
    ``add`` of one page into a random one-page gap (a value that merges with
    neither neighbour), then ``remove`` of it; one op = the pair.
``split+merge``
    ``split_at`` the middle of a random segment, then ``merge_adjacent``
    of the right half (which merges it back); one op = the pair.
``first_fit``
    ``first_fit(2 P)`` from key 0: no gap holds two pages, so the only fit is
    past the last segment (the allocator's worst case for a full file).
``first_fit (baseline)``
    The same request against a baseline that mimics the reference's
    ``findUnallocatedRange``: a ``sortedcontainers.SortedDict`` of
    start -> (end, value), scanned linearly from the lower bound of the key
    until a gap is big enough.  At 1k/10k/100k only: it is O(n) per call.

Each measurement runs a calibrated number of operations (about 0.1 s worth),
is repeated ``--repeat`` times (default 5) and the median is reported.  The
first-fit *cost ratio* is (time per op at the largest size) / (time per op at
1k): about 1 means the cost does not grow with the number of segments;
the baseline's grows linearly.

``--save`` writes everything, with the machine's description, to
``benchmarks/results/segments-<hostname>.json``.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # benchmark the checkout, installed or not

from sortedcontainers import SortedDict  # noqa: E402

from aiopgalloc import segment_blocks as segmod  # noqa: E402
from aiopgalloc.ranges import PAGE_SIZE  # noqa: E402
from aiopgalloc.segments import SegmentSet  # noqa: E402

P = PAGE_SIZE
FULL_SIZES = [1_000, 10_000, 100_000, 1_000_000]
QUICK_SIZES = [1_000, 10_000, 100_000]
BASELINE_MAX = 100_000
TARGET_S = 0.1  # wall time of one timed round
OPS = ["find", "insert+remove", "split+merge", "first_fit", "first_fit (baseline)"]


# ------------------------------------------------------------------ fixtures


def build_set(n: int) -> SegmentSet[int]:
    s: SegmentSet[int] = SegmentSet()
    for k in range(n):
        s.insert_without_merging(2 * k * P, (2 * k + 1) * P, k)
    return s


def build_baseline(n: int) -> SortedDict[int, tuple[int, int]]:
    return SortedDict({2 * k * P: ((2 * k + 1) * P, k) for k in range(n)})


def baseline_first_fit(
    sd: SortedDict[int, tuple[int, int]], length: int, key: int = 0, max_key: int = 1 << 64
) -> int | None:
    """First fit as the 2020 reference does it: walk the segments from the
    lower bound of ``key`` and return the first gap big enough."""
    start = key
    i = sd.bisect_right(key) - 1
    if i >= 0:
        end = sd.peekitem(i)[1][0]
        if end > start:
            start = end
    for s in sd.irange(minimum=key, inclusive=(False, False)):
        if s - start >= length:
            return start
        end = sd[s][0]
        if end > start:
            start = end
    return start if start + length <= max_key else None


# ------------------------------------------------------------------- timing


def time_ops(run: Callable[[int], None], n_ops: int) -> float:
    gc.collect()
    t0 = time.perf_counter()
    run(n_ops)
    return time.perf_counter() - t0


def calibrate(run: Callable[[int], None]) -> int:
    """How many ops make a round of about TARGET_S seconds."""
    n = 1
    while True:
        t = time_ops(run, n)
        if t >= TARGET_S / 5 or n >= 1 << 22:
            return max(1, round(n * TARGET_S / max(t, 1e-9)))
        n *= 4


def measure(run: Callable[[int], None], repeat: int) -> dict[str, Any]:
    run(1)  # warm up (builds the gap tree, fills caches)
    n_ops = calibrate(run)
    rates = [n_ops / time_ops(run, n_ops) for _ in range(repeat)]
    return {"ops_per_s": statistics.median(rates), "samples": rates, "ops_per_sample": n_ops}


def cycle(xs: list[int]) -> Iterator[int]:
    while True:
        yield from xs


# ---------------------------------------------------------------- workloads


def workloads(n: int, rng: random.Random) -> dict[str, Callable[[int], None]]:
    s = build_set(n)
    s.check()
    last_end = (2 * n - 1) * P
    seg_keys = cycle([rng.randrange(n) for _ in range(1 << 16)])
    find_keys = cycle([rng.randrange(2 * n * P) for _ in range(1 << 16)])

    def find(ops: int) -> None:
        f = s.find
        for _ in range(ops):
            f(next(find_keys))

    def insert_remove(ops: int) -> None:
        add, remove = s.add, s.remove
        for _ in range(ops):
            a = (2 * next(seg_keys) + 1) * P
            if not add(a, a + P, -1):
                raise AssertionError("gap was not free")
            remove(a)

    def split_merge(ops: int) -> None:
        split, merge = s.split_at, s.merge_adjacent
        for _ in range(ops):
            k = next(seg_keys)
            mid = 2 * k * P + P // 2
            if not split(mid):
                raise AssertionError("nothing to split")
            merge(mid, (2 * k + 1) * P)

    def first_fit(ops: int) -> None:
        ff = s.first_fit
        for _ in range(ops):
            if ff(2 * P, 0) != last_end:
                raise AssertionError("wrong first fit")

    out: dict[str, Callable[[int], None]] = {
        "find": find,
        "insert+remove": insert_remove,
        "split+merge": split_merge,
        "first_fit": first_fit,
    }
    if n <= BASELINE_MAX:
        sd = build_baseline(n)

        def first_fit_baseline(ops: int) -> None:
            for _ in range(ops):
                if baseline_first_fit(sd, 2 * P, 0) != last_end:
                    raise AssertionError("wrong baseline first fit")

        out["first_fit (baseline)"] = first_fit_baseline
    return out


# ------------------------------------------------------------------ machine


def machine_info() -> dict[str, Any]:
    def version(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    cpu_model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    git: dict[str, Any] = {}
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "aiopgalloc/segments.py"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        git = {"commit": commit, "segments_py_dirty": bool(dirty)}
    except (OSError, subprocess.CalledProcessError):
        pass
    return {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "python": sys.version,
        "implementation": platform.python_implementation(),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model,
        "loadavg_start": list(os.getloadavg()),
        "page_size": P,
        "segments_load": segmod._LOAD,
        "packages": {
            "aiopgalloc": version("aiopgalloc"),
            "sortedcontainers": version("sortedcontainers"),
        },
        "git": git,
    }


# --------------------------------------------------------------------- main


def size_label(n: int) -> str:
    return f"{n // 1_000_000}M" if n >= 1_000_000 else f"{n // 1000}k"


def fmt_rate(x: float | None) -> str:
    if x is None:
        return "-"
    if x >= 1e6:
        return f"{x / 1e6:.2f}M"
    if x >= 1e3:
        return f"{x / 1e3:.1f}k"
    return f"{x:.1f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="sizes up to 100k only")
    ap.add_argument(
        "--save", action="store_true", help="write benchmarks/results/segments-<host>.json"
    )
    ap.add_argument("--repeat", type=int, default=5, help="timed rounds per measurement (median)")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)

    sizes = QUICK_SIZES if args.quick else FULL_SIZES
    info = machine_info()
    rng = random.Random(args.seed)
    t_start = time.perf_counter()
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for n in sizes:
        t0 = time.perf_counter()
        ops = workloads(n, rng)
        build_s = time.perf_counter() - t0
        results[str(n)] = {}
        for name, run in ops.items():
            results[str(n)][name] = measure(run, args.repeat)
        print(f"{n:>10,} segments: built in {build_s:.2f} s, measured", flush=True)

    def rate(n: int, op: str) -> float | None:
        r = results.get(str(n), {}).get(op)
        return None if r is None else float(r["ops_per_s"])

    # The table.
    header = f"{'segments':>10} | " + " | ".join(f"{op:>20}" for op in OPS) + " | ff speed-up"
    print(f"\nSegmentSet ops/s, median of {args.repeat} (fragmented map, P={P}):")
    print(header)
    print("-" * len(header))
    for n in sizes:
        ours, base = rate(n, "first_fit"), rate(n, "first_fit (baseline)")
        speedup = f"{ours / base:,.0f}x" if ours and base else "-"
        cells = " | ".join(f"{fmt_rate(rate(n, op)):>20}" for op in OPS)
        print(f"{n:>10,} | {cells} | {speedup:>11}")

    # First-fit cost ratios (time per op, largest size / 1k).
    ratios: dict[str, float] = {}
    small = sizes[0]
    for op in ("first_fit", "first_fit (baseline)"):
        big = max((n for n in sizes if rate(n, op) is not None), default=small)
        r_small, r_big = rate(small, op), rate(big, op)
        if r_small and r_big and big != small:
            key = f"{op} cost {size_label(big)}/{size_label(small)}"
            ratios[key] = r_small / r_big
    print()
    for key, value in ratios.items():
        print(f"{key}: {value:.2f}")
    elapsed = time.perf_counter() - t_start
    print(f"(total {elapsed:.0f} s)")

    if args.save:
        info["loadavg_end"] = list(os.getloadavg())
        out = {
            "benchmark": "segments",
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "config": {
                "quick": args.quick,
                "repetitions": args.repeat,
                "seconds_per_sample": TARGET_S,
                "sizes": sizes,
                "baseline_max": BASELINE_MAX,
                "seed": args.seed,
                "map": "segment k = [2k*P, (2k+1)*P) -> k",
                "first_fit_request": "2 pages from key 0 (fits only past the last segment)",
            },
            "machine": info,
            "elapsed_s": elapsed,
            "results": results,
            "first_fit_cost_ratios": ratios,
        }
        path = ROOT / "benchmarks" / "results" / f"segments-{socket.gethostname()}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=1) + "\n")
        print(f"saved {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
