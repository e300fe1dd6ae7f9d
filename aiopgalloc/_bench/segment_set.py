"""Workload 11: SegmentSet micro-benchmarks (the allocator's usage map alone).

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
    ``split_at`` the middle of a random segment, then ``merge_adjacent`` of
    the right half (which merges it back); one op = the pair.
``first_fit``
    ``first_fit(2 P)`` from key 0: no gap holds two pages, so the only fit is
    past the last segment (the allocator's worst case for a full file).
``first_fit (baseline)``
    The same request against what the reference's ``findUnallocatedRange``
    does: a ``sortedcontainers.SortedDict`` of start -> (end, value),
    scanned linearly from the lower bound of the key until a gap is big
    enough.  Up to 100k segments only: it is O(n) per call.

Each measurement runs a calibrated number of operations (about 0.1 s worth;
0.04 s with ``--quick``), repeated, the operations' rounds interleaved
(order rotated every round); medians reported.  Workload 2 measures the
same map through ``allocate`` / ``dec_ref``; this one isolates the data
structure.  Reported (informational): for each operation, its cost per op
at the largest size over its cost at 1k (about 1 means it does not grow
with the number of segments), and first fit's speed-up over the baseline
at the largest size the baseline runs.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from typing import Any

from sortedcontainers import SortedDict

from .. import segments
from ..ranges import PAGE_SIZE
from ..segments import SegmentSet
from .common import (
    Config,
    Progress,
    Row,
    WorkloadResult,
    collect,
    fmt_rate,
    interleave,
    median,
    perf_counter,
    spread_pct,
)

__all__ = ["OPS", "baseline_first_fit", "build_set", "run", "total_steps"]

NAME = "segment_set"
TITLE = "SegmentSet operations on a fragmented map"
P = PAGE_SIZE
BASELINE_MAX = 100_000
OPS = ("find", "insert+remove", "split+merge", "first_fit", "first_fit (baseline)")

Run = Callable[[int], None]


def _sizes(cfg: Config) -> list[int]:
    return cfg.pick([1_000, 10_000, 100_000, 1_000_000], [1_000, 10_000, 100_000], [1_000, 4_000])


def _round_s(cfg: Config) -> float:
    return cfg.pick(0.1, 0.04, 0.005)


def _ops_at(n: int) -> int:
    return len(OPS) if n <= BASELINE_MAX else len(OPS) - 1


def total_steps(cfg: Config) -> int:
    """Progress steps: every operation once per repetition, at every size."""
    return cfg.reps * sum(_ops_at(n) for n in _sizes(cfg))


def _block_size() -> int | None:
    """The segment set's block size (for the report only); None if the
    module no longer says."""
    load = getattr(segments, "_LOAD", None)
    return load if isinstance(load, int) else None


def build_set(n: int) -> SegmentSet[int]:
    """The fragmented map of ``n`` one-page segments."""
    s: SegmentSet[int] = SegmentSet()
    for k in range(n):
        s.insert_without_merging(2 * k * P, (2 * k + 1) * P, k)
    if len(s) != n:
        raise RuntimeError(f"fragmented map of {n} segments has {len(s)}")
    return s


def baseline_first_fit(sd: SortedDict[int, tuple[int, int]], length: int, key: int = 0) -> int:
    """First fit as the reference does it: walk the segments from the lower
    bound of ``key`` and return the first gap big enough (or the end)."""
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
    return start


def _cycle(xs: list[int]) -> Iterator[int]:
    while True:
        yield from xs


def operations(n: int, rng: random.Random) -> dict[str, Run]:
    """The timed operations on a fresh map of ``n`` segments; each
    ``run(ops)`` does ``ops`` operations and checks its answers."""
    s = build_set(n)
    last_end = (2 * n - 1) * P
    seg_keys = _cycle([rng.randrange(n) for _ in range(1 << 16)])
    find_keys = _cycle([rng.randrange(2 * n * P) for _ in range(1 << 16)])

    def find(ops: int) -> None:
        f = s.find
        for _ in range(ops):
            f(next(find_keys))

    def insert_remove(ops: int) -> None:
        add, remove = s.add, s.remove
        for _ in range(ops):
            a = (2 * next(seg_keys) + 1) * P
            if not add(a, a + P, -1):
                raise RuntimeError("segment set: the gap was not free")
            remove(a)

    def split_merge(ops: int) -> None:
        split, merge = s.split_at, s.merge_adjacent
        for _ in range(ops):
            k = next(seg_keys)
            mid = 2 * k * P + P // 2
            if not split(mid):
                raise RuntimeError("segment set: nothing to split")
            merge(mid, (2 * k + 1) * P)

    def first_fit(ops: int) -> None:
        ff = s.first_fit
        for _ in range(ops):
            if ff(2 * P, 0) != last_end:
                raise RuntimeError("segment set: wrong first fit")

    out: dict[str, Run] = {
        "find": find,
        "insert+remove": insert_remove,
        "split+merge": split_merge,
        "first_fit": first_fit,
    }
    if n <= BASELINE_MAX:
        sd: SortedDict[int, tuple[int, int]] = SortedDict(
            {2 * k * P: ((2 * k + 1) * P, k) for k in range(n)}
        )

        def first_fit_baseline(ops: int) -> None:
            for _ in range(ops):
                if baseline_first_fit(sd, 2 * P, 0) != last_end:
                    raise RuntimeError("baseline: wrong first fit")

        out["first_fit (baseline)"] = first_fit_baseline
    return out


def _time(run: Run, ops: int) -> float:
    collect()
    t0 = perf_counter()
    run(ops)
    return perf_counter() - t0


def _rate(run: Run, ops: int) -> Callable[[int], float]:
    """A sample maker for ``interleave``: ``ops`` operations' rate."""
    return lambda rep: ops / _time(run, ops)


def calibrate(run: Run, round_s: float) -> int:
    """How many operations make a round of about ``round_s`` seconds."""
    run(1)  # warm up
    n = 1
    while True:
        t = _time(run, n)
        if t >= round_s / 5 or n >= 1 << 22:
            return max(1, round(n * round_s / max(t, 1e-9)))
        n *= 4


def run(cfg: Config, progress: Progress) -> WorkloadResult:
    """Run workload 11 (no event loop: the segment set is synchronous)."""
    sizes = _sizes(cfg)
    round_s = _round_s(cfg)
    rng = random.Random(cfg.seed)
    results: dict[int, dict[str, dict[str, Any]]] = {}
    build_s: dict[int, float] = {}
    for n in sizes:
        t0 = perf_counter()
        ops = operations(n, rng)
        build_s[n] = perf_counter() - t0
        per_round = {name: calibrate(fn, round_s) for name, fn in ops.items()}
        samples = interleave(
            [(f"{name} @{n:,}", _rate(fn, per_round[name])) for name, fn in ops.items()],
            cfg.reps,
            progress,
        )
        results[n] = {
            name: {
                "ops_per_s": median(samples[f"{name} @{n:,}"]),
                "samples": samples[f"{name} @{n:,}"],
                "spread_pct": spread_pct(samples[f"{name} @{n:,}"]),
                "ops_per_sample": per_round[name],
            }
            for name in ops
        }
        del ops
    result = WorkloadResult(
        key=11,
        name=NAME,
        title=TITLE,
        backends=[cfg.primary],
        params={
            "sizes": sizes,
            "seconds_per_sample": round_s,
            "baseline_max": BASELINE_MAX,
            "map": "segment k = [2k*P, (2k+1)*P) -> k",
            "first_fit_request": "2 pages from key 0 (fits only past the last segment)",
            "block_size": _block_size(),
        },
    )

    def ops_per_s(n: int, op: str) -> float | None:
        r = results[n].get(op)
        return None if r is None else float(r["ops_per_s"])

    small = sizes[0]
    ratios: dict[str, float] = {}
    for op in OPS:
        big = max(n for n in sizes if op in results[n])
        r_small, r_big = ops_per_s(small, op), ops_per_s(big, op)
        if not r_small or not r_big or big == small:
            continue
        ratios[f"{op} cost {big}/{small}"] = r_small / r_big
        result.rows.append(
            Row(
                measurement=f"SegmentSet {op}, ops/s at {big:,} vs {small:,} segments",
                value=fmt_rate(r_big),
                peer=fmt_rate(r_small),
                ratio=r_small / r_big,
                ratio_note="informational: cost per op at the larger N over at 1k",
            )
        )
    top = max(n for n in sizes if "first_fit (baseline)" in results[n])
    ours, base = ops_per_s(top, "first_fit"), ops_per_s(top, "first_fit (baseline)")
    if ours and base:
        result.rows.append(
            Row(
                measurement=f"first_fit vs a linear scan of a SortedDict, at {top:,} segments",
                value=fmt_rate(ours),
                peer=fmt_rate(base),
                ratio=ours / base,
                ratio_note="informational: SegmentSet rate / baseline rate (higher is better)",
            )
        )
    result.notes.append(
        "map build times: " + ", ".join(f"{n:,}: {s:.2f} s" for n, s in build_s.items())
    )
    result.data = {
        "results": {str(n): r for n, r in results.items()},
        "first_fit_cost_ratios": ratios,
        "build_s": {str(n): s for n, s in build_s.items()},
    }
    return result
