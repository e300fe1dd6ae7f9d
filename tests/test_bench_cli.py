"""``python -m aiopgalloc bench``: the command runs end to end and writes a
complete JSON document; the peers and plans the workloads rely on are right.

The end-to-end runs use the hidden ``--smoke`` sizes (workloads 2 and 6 in a
few seconds): they check the plumbing and the shape of every workload's
figures, not how good the numbers are.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from sortedcontainers import SortedDict

from aiopgalloc import PAGE_SIZE
from aiopgalloc._bench import release
from aiopgalloc._bench.churn import make_plan
from aiopgalloc._bench.common import Row, Target, WorkloadResult
from aiopgalloc._bench.peers import FirstFitArena
from aiopgalloc._bench.report import format_table
from aiopgalloc._bench.segment_set import baseline_first_fit, build_set
from aiopgalloc._cli import bench
from aiopgalloc.segments import SegmentSet

P = PAGE_SIZE
ROOT = Path(__file__).resolve().parent.parent


def _run_bench(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], Any]:
    out = tmp_path / "bench.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "aiopgalloc", "bench", *args, "--json", str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc, json.loads(out.read_text())


def _numbers(x: Any) -> list[float]:
    if isinstance(x, bool):
        return []
    if isinstance(x, int | float):
        return [float(x)]
    if isinstance(x, dict):
        return [n for v in x.values() for n in _numbers(v)]
    if isinstance(x, list):
        return [n for v in x for n in _numbers(v)]
    return []


def test_bench_smoke_writes_machine_workloads_and_numbers(tmp_path: Path) -> None:
    proc, doc = _run_bench(
        tmp_path, "--quick", "--smoke", "--workloads", "2,6", "--backend", "asyncio"
    )
    # The table, with targets and verdicts, goes to stdout.
    assert "alloc+dec_ref" in proc.stdout
    assert "heap bytes per segment" in proc.stdout
    assert "<= 2x" in proc.stdout and "<= 250 B" in proc.stdout
    assert "PASS" in proc.stdout or "MISS" in proc.stdout
    # Progress went to stderr, one line per step (not a terminal: no rich bar).
    assert "workload 2" in proc.stderr and "workload 6" in proc.stderr

    machine = doc["machine"]
    for key in ("platform", "kernel", "cpu_model", "cpu_count", "memory_total", "hostname"):
        assert key in machine
    assert machine["cpu_count"] >= 1 and machine["memory_total"] > 0
    for pkg in ("aiopgalloc", "anyio", "trio", "uvloop", "sortedcontainers", "python"):
        assert pkg in machine["packages"]
    assert machine["packages"]["anyio"] and machine["packages"]["python"]

    cfg = doc["config"]
    assert cfg["backends"] == ["asyncio"] and cfg["workloads"] == [2, 6]
    assert cfg["smoke"] and cfg["repetitions"] == 3

    assert set(doc["workloads"]) == {"2", "6"}
    scaling, memory = doc["workloads"]["2"], doc["workloads"]["6"]
    assert scaling["backends"] == ["asyncio"]
    for series in scaling["results"]["series"].values():
        assert [p["live_segments"] for p in series] == [1_000, 4_000]
        for p in series:
            assert p["median_us_per_op"] > 0 and len(p["samples_us_per_op"]) == 3
    per = memory["results"]["bytes_per_segment"]
    assert 20 < per < 2_000
    assert memory["results"]["segments"] == 10_000

    # Every target row carries a number, its target and a verdict.
    assert doc["targets"], "no target rows"
    for t in doc["targets"]:
        assert isinstance(t["ratio"], float) and t["ratio"] > 0
        assert t["target_op"] in (">=", "<=") and t["target_value"] > 0
        assert isinstance(t["pass"], bool)
    assert doc["summary"]["targets"] == len(doc["targets"])
    nums = _numbers(doc["workloads"])
    assert nums and all(math.isfinite(n) for n in nums)


def test_bench_smoke_every_workload_every_backend(tmp_path: Path) -> None:
    """All twelve workloads at smoke size on every backend: each reports rows,
    the per-backend ones once per backend, and nothing warns (a memoryview
    left alive when a file closes, a task that failed)."""
    proc, doc = _run_bench(tmp_path, "--smoke")
    assert set(doc["workloads"]) == {str(k) for k in bench.WORKLOADS}
    backends = doc["config"]["backends"]
    assert backends[0] == "asyncio"
    for key, w in doc["workloads"].items():
        assert w["rows"], f"workload {key} has no rows"
        assert w["backends"] == (backends if key in ("3", "4", "5", "10", "12") else ["asyncio"])
    release_rows = [t for t in doc["targets"] if t["workload"] == 3]
    assert len(release_rows) == len(backends)
    churn = doc["workloads"]["1"]["results"]["median_steps_per_s"]
    assert {"aiopgalloc", "mmap", "shared_memory", "free list"} <= set(churn)
    assert all(v > 0 for v in churn.values())
    noise = [
        line
        for line in proc.stderr.splitlines()
        if line.strip() and not line.lstrip().startswith("[") and not line.startswith("done in")
    ]
    assert not noise, "\n".join(noise)


def test_bench_smoke_new_workloads_report_real_figures(tmp_path: Path) -> None:
    """Workloads 9-11 (reuse policy, pressure storm, SegmentSet) and the
    start_evictions series of workload 5, at smoke size on one backend:
    their JSON holds every series with positive, plausible figures."""
    proc, doc = _run_bench(
        tmp_path, "--smoke", "--workloads", "5,9,10,11", "--backend", "asyncio", "--no-progress"
    )
    assert set(doc["workloads"]) == {"5", "9", "10", "11"}
    for key in ("9", "10", "11"):
        w = doc["workloads"][key]
        assert w["rows"] and all(r["target"] is None for r in w["rows"])
        assert w["elapsed_s"] > 0

    # 5: the start_evictions series next to the pressure ones.
    ev = doc["workloads"]["5"]["results"]["summary"]["asyncio"]
    for series in (
        "manual/loop",
        "manual/thread",
        "start_evictions/loop",
        "start_evictions/thread",
    ):
        assert 0 < ev[series]["median_us"] <= ev[series]["p99_us"], series
        assert ev[series]["n"] == 20
    assert "start_evictions()->evict()" in proc.stdout

    # 9: every variant ran steps; only release+refault recycles nothing.
    reuse = doc["workloads"]["9"]["results"]
    assert set(reuse["median_steps_per_s"]) == {"recycle", "release+refault", "recycle+yield"}
    for variant, samples in reuse["samples"].items():
        assert len(samples) == 3, variant
        for s in samples:
            assert s["steps"] > 0 and s["rate"] > 0 and s["file_size"] > 0
    assert reuse["median_recycled_fraction"]["release+refault"] == 0
    assert reuse["median_recycled_fraction"]["recycle"] > 0
    assert all(v > 0 for v in reuse["ratios"].values())

    # 10: the storm sent events, the source delivered some, evict ran, the
    # ticker ticked; the v1 latency is there exactly when v1 was usable.
    storm = doc["workloads"]["10"]
    st = storm["results"]["summary"]["asyncio"]
    s = st["storm"]
    assert s["events"] > 0 and 0 < s["deliveries"] <= s["events"]
    assert s["evict_calls"] > 0 and s["evicted_bytes"] > 0
    for lag in (s["lag"], s["idle_lag"]):
        assert lag["ticks"] > 0 and lag["worst_ms"] >= lag["p99_ms"] >= lag["median_ms"]
    if storm["params"]["v1_skipped"] is None:
        assert storm["params"]["storm_source"] == "cgroup v1 eventfd"
        assert st["v1 eventfd/thread"]["median_us"] > 0
        assert len(storm["results"]["samples_us"]["asyncio"]) == 20
    else:
        assert "v1 eventfd/thread" not in st

    # 11: every operation at every size, the baseline at both smoke sizes.
    seg = doc["workloads"]["11"]
    assert seg["params"]["sizes"] == [1_000, 4_000]
    for n in ("1000", "4000"):
        ops = seg["results"]["results"][n]
        assert set(ops) == {
            "find",
            "insert+remove",
            "split+merge",
            "first_fit",
            "first_fit (baseline)",
        }
        for op, r in ops.items():
            assert r["ops_per_s"] > 0 and len(r["samples"]) == 3, (n, op)
    ratios = seg["results"]["first_fit_cost_ratios"]
    assert ratios and all(v > 0 for v in ratios.values())
    assert "SortedDict" in proc.stdout


def test_bench_png_when_matplotlib(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    _, doc = _run_bench(
        tmp_path, "--smoke", "--workloads", "2", "--backend", "asyncio", "--no-progress"
    )
    png = Path(doc["png"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_rejects_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--workloads", "14"], ["--workloads", "x"], ["--backend", "tokio"]):
        with pytest.raises(SystemExit) as exc:
            bench.main(argv)
        assert exc.value.code == 2
    assert "no workload 14" in capsys.readouterr().err


def test_bench_workload_numbers_are_stable() -> None:
    """Workloads 1-8 keep their numbers; the ones moved in from the old
    ``benchmarks/`` scripts come after them."""
    assert {k: name for k, (name, _) in bench.WORKLOADS.items()} == {
        1: "churn",
        2: "scaling",
        3: "release",
        4: "usage_scan",
        5: "eviction",
        6: "memory",
        7: "commit",
        8: "checkpoint",
        9: "reuse",
        10: "storm",
        11: "segment_set",
        12: "tight_loop",
        13: "page_cache",
    }


def test_bench_tight_loop_reports_both_builds_side_by_side(tmp_path: Path) -> None:
    """Workload 12 at smoke size: every contender's samples per backend,
    and, on a compiled install, the pure build's (from its AIOPGALLOC_PURE=1
    worker) with the compiled-vs-pure rows."""
    import aiopgalloc

    _, doc = _run_bench(
        tmp_path, "--smoke", "--workloads", "12", "--backend", "asyncio", "--no-progress"
    )
    w = doc["workloads"]["12"]
    assert w["backends"] == ["asyncio"]
    med = w["results"]["median_us_per_cycle"]["asyncio"]
    builds = ["compiled", "pure"] if aiopgalloc.COMPILED else ["pure"]
    assert w["results"]["this_build"] == builds[0]
    for case in ("4 KiB", "16 KiB written"):
        for who in [*builds, "mmap", "shared_memory"]:
            assert med[f"{who}|{case}"] > 0, (who, case)
            samples = w["results"]["samples_us_per_cycle"]["asyncio"][f"{who}|{case}"]
            assert len(samples) == 3
    rows = [r["measurement"] for r in w["rows"]]
    assert ("4 KiB cycle, compiled vs pure (asyncio)" in rows) == aiopgalloc.COMPILED
    targets = [t for t in doc["targets"] if t["workload"] == 12]
    assert len(targets) == (3 if aiopgalloc.COMPILED else 0)
    assert "mmap time / aiopgalloc time" in json.dumps(w["rows"])


def test_first_fit_arena_against_a_model() -> None:
    """The hand-written peer is a correct first-fit allocator: it returns the
    lowest fitting offset, never overlaps, and coalesces on free."""
    rng = random.Random(3)
    cap = 256 * P
    arena = FirstFitArena(cap)
    model = bytearray(cap // P)  # 1 = allocated
    live: list[tuple[int, int]] = []
    try:
        for _ in range(3_000):
            if live and (rng.random() < 0.5 or len(live) > 40):
                s, n = live.pop(rng.randrange(len(live)))
                arena.free(s, n)
                model[s // P : (s + n) // P] = bytes(n // P)
            else:
                n = rng.randint(1, 8) * P
                want = model.find(bytes(n // P))
                if want < 0:
                    with pytest.raises(MemoryError):
                        arena.alloc(n)
                    continue
                s = arena.alloc(n)
                assert s == want * P
                model[s // P : (s + n) // P] = b"\x01" * (n // P)
                live.append((s, n))
            # Free runs are sorted, disjoint, maximally merged, and exactly the holes.
            runs = list(zip(arena.starts, arena.lengths, strict=True))
            for (s0, n0), (s1, _) in itertools.pairwise(runs):
                assert s0 + n0 < s1
            assert sum(arena.lengths) == model.count(0) * P
        for s, n in live:
            arena.free(s, n)
        assert (arena.starts, arena.lengths) == ([0], [cap])
    finally:
        arena.close()


def test_release_plans() -> None:
    pages = 6_000
    order = release.freeing_order(pages)
    assert sorted(order) == list(range(pages)) and order[:3] == [0, 2, 4]
    merged = release.plan_merged(pages)
    assert merged == [(0, pages * P)]
    assert len(release.plan_merged((300 << 20) // P)) == 3  # cut at 128 MiB
    online = release.plan_online(order, pages, batch=1000)
    # Even phase: nothing touches, one range per page; odd phase: every gap
    # is already punched, one range per batch.
    assert [len(b) for b in online] == [1000, 1000, 1000, 1, 1, 1]
    covered = sorted({p for batch in online for s, e in batch for p in range(s // P, e // P)})
    assert covered == list(range(pages))


def test_segment_set_baseline_first_fit_agrees_with_segment_set() -> None:
    """Workload 11's baseline (a linear scan of a SortedDict, as the
    reference does it) answers first fit as SegmentSet does, so the speed-up
    compares equal work."""
    rng = random.Random(11)
    s: SegmentSet[int] = SegmentSet()
    for k in range(400):  # distinct values: nothing merges
        start = rng.randrange(0, 4_000) * P
        s.add(start, start + rng.randint(1, 6) * P, k)
    sd: SortedDict[int, tuple[int, int]] = SortedDict({a: (b, v) for a, b, v in s})
    assert len(sd) == len(s) > 100
    for _ in range(500):
        length = rng.randint(1, 8) * P
        key = rng.randrange(0, 4_200) * P
        assert baseline_first_fit(sd, length, key) == s.first_fit(length, key)
    fragmented = build_set(1_000)
    assert len(fragmented) == 1_000 and fragmented.first_fit(2 * P, 0) == 1_999 * P


def test_churn_plan_is_the_same_for_everyone() -> None:
    a = make_plan(7, 100, 1_000, 3)
    b = make_plan(7, 100, 1_000, 3)
    assert a == b
    assert sum(len(v) for v, _ in a.windows) == 1_000
    sizes = a.initial + [s for _, w in a.windows for s in w]
    assert all(s % P == 0 and P <= s <= 1024 * P for s in sizes)
    assert all(0 <= i < 100 for v, _ in a.windows for i in v)


def test_table_marks_pass_and_miss() -> None:
    r = WorkloadResult(key=1, name="x", title="x", backends=["asyncio"], params={})
    r.rows = [
        Row("good", "3/s", "1/s", 3.0, target=Target(">=", 2)),
        Row("bad", "1/s", "1/s", 1.0, target=Target(">=", 2)),
        Row("info", "5 us", ratio=None),
    ]
    text = format_table([r])
    assert "PASS" in text and "MISS" in text and ">= 2x" in text
    assert r.rows[0].passed is True and r.rows[1].passed is False and r.rows[2].passed is None


def test_bench_smoke_page_cache_workload(tmp_path: Path) -> None:
    """Workload 13: PageCache's throughput beside cachetools' LRUCache and a
    dict, and the hit ratios, the real cache matching its simulation."""
    _, doc = _run_bench(
        tmp_path, "--smoke", "--workloads", "13", "--backend", "asyncio", "--no-progress"
    )
    w = doc["workloads"]["13"]
    tp = w["results"]["throughput"]
    # cachetools comes with the bench extra, not the test one.
    peers = {"dict"}
    if importlib.util.find_spec("cachetools") is not None:
        peers.add("cachetools.LRUCache")
    assert set(tp["read"]) == {"PageCache.get", "PageCache.get_bytes", *peers}
    assert all(x > 0 for xs in tp["read"].values() for x in xs)
    assert set(tp["put"]) == {"PageCache.put", *peers}
    for alpha, h in w["results"]["hit_ratio"].items():
        assert 0 < h["lru"] < 1 and 0 < h["sieve"] < 1, alpha
        assert h["page_cache"] == h["sieve"], "the real cache differs from its simulation"
