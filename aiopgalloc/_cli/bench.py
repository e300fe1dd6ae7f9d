"""``python -m aiopgalloc bench``: the benchmark suite, side by side with the
alternatives, with the performance targets.

    python -m aiopgalloc bench [--quick] [--json PATH] [--png PATH]
                               [--workloads 1,2,...] [--backend asyncio|uvloop|trio|all]

Runs the workloads of ``aiopgalloc._bench`` (1 churn, 2 scaling, 3 release,
4 usage scan, 5 eviction latency, 6 memory per segment, 7 commit modes,
8 checkpoint throughput, 9 reuse policy, 10 pressure event storm, 11 segment
set operations, 12 the tight loop on both builds of the core, 13 PageCache
against cachetools and dict) with a progress bar on stderr (``rich`` on a
terminal when installed, else one line per step), prints a table of the
results with every ratio next to its target (PASS or MISS), writes
everything to JSON (``bench-results.json`` in the current directory unless
``--json``) and draws the scaling curve as a PNG when matplotlib is
installed (beside the JSON, same name with ``.png``, unless ``--png``).

Backends: workloads 3, 4, 5, 10 and 12 (the ones whose timed part awaits, or
wakes what does: the releaser, a worker-thread scan, an eviction task, the
loop under a storm of pressure events) run on every backend chosen; the others (synchronous calls
with the event loop idle, and the informational figures) run once, on the
first backend chosen (asyncio for ``all``).  ``--quick`` shrinks the sizes
and takes 3 repetitions instead of 5, finishing in about a minute and a
half.

Exit status: 0 when it ran (missed targets are reported, not errors); 2 for
bad arguments, checked before anything runs: among them a ``--json`` or
``--png`` path whose directory does not exist (it is not created).
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from .._bench import report
from .._bench.common import Config, WorkloadResult, available_backends, machine_info, perf_counter
from .._bench.progress import make_progress

__all__ = ["main"]

# key -> (module under aiopgalloc._bench, runs on every chosen backend)
WORKLOADS: dict[int, tuple[str, bool]] = {
    1: ("churn", False),
    2: ("scaling", False),
    3: ("release", True),
    4: ("usage_scan", True),
    5: ("eviction", True),
    6: ("memory", False),
    7: ("commit", False),
    8: ("checkpoint", False),
    9: ("reuse", False),
    10: ("storm", True),
    11: ("segment_set", False),
    12: ("tight_loop", True),
    13: ("page_cache", False),
}
BACKEND_CHOICES = {"asyncio": "asyncio", "uvloop": "asyncio+uvloop", "trio": "trio"}


def _workload_list(text: str) -> list[int]:
    keys: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            key = int(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a workload number: {part!r}") from None
        if key not in WORKLOADS:
            raise argparse.ArgumentTypeError(
                f"no workload {key} (choose from {', '.join(map(str, WORKLOADS))})"
            )
        if key not in keys:
            keys.append(key)
    if not keys:
        raise argparse.ArgumentTypeError("no workload given")
    return sorted(keys)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m aiopgalloc bench",
        description="Benchmarks of aiopgalloc side by side with the alternatives, "
        "with its performance targets.",
    )
    p.add_argument("--quick", action="store_true", help="smaller sizes, 3 repetitions (~1.5 min)")
    p.add_argument(
        "--json",
        type=Path,
        default=Path("bench-results.json"),
        metavar="PATH",
        help="where to write the results (default: bench-results.json)",
    )
    p.add_argument(
        "--png",
        type=Path,
        default=None,
        metavar="PATH",
        help="where to draw the scaling curve (default: beside the JSON; needs matplotlib)",
    )
    p.add_argument(
        "--workloads",
        type=_workload_list,
        default=sorted(WORKLOADS),
        metavar="1,2,...",
        help="which workloads to run (default: all: "
        "1 churn, 2 scaling, 3 release, 4 usage scan, 5 eviction, 6 memory, 7 commit modes, "
        "8 checkpoint, 9 reuse policy, 10 pressure storm, 11 segment set, 12 tight loop)",
    )
    p.add_argument(
        "--backend",
        choices=[*BACKEND_CHOICES, "all"],
        default="all",
        help="anyio backend(s) (default: all; workloads 3-5, 10 and 12 run on each, "
        "the others on the first)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress output")
    # Tiny sizes for the test suite: checks that everything runs, measures nothing.
    p.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    return p


def _backends(choice: str) -> tuple[list[str], list[str]]:
    """The backends to run, and notes about the ones not available."""
    available = available_backends()
    wanted = list(BACKEND_CHOICES.values()) if choice == "all" else [BACKEND_CHOICES[choice]]
    chosen = [b for b in wanted if b in available]
    notes = [
        f"backend {b} skipped: its package is not installed" for b in wanted if b not in available
    ]
    return chosen, notes


def run_suite(cfg: Config, keys: list[int], progress: Any) -> list[WorkloadResult]:
    """Run the chosen workloads in order; return their results."""
    results: list[WorkloadResult] = []
    for key in keys:
        module_name, per_backend = WORKLOADS[key]
        module: Any = importlib.import_module(f"aiopgalloc._bench.{module_name}")
        progress.begin(key, module.TITLE, module.total_steps(cfg))
        t0 = perf_counter()
        result: WorkloadResult = module.run(cfg, progress)
        result.elapsed_s = perf_counter() - t0
        if not per_backend:
            result.backends = [cfg.primary]
        progress.end()
        results.append(result)
    return results


def _output_problem(flag: str, path: Path) -> str | None:
    """Why the results cannot be written to ``path``, or None.  Checked
    before the run, so a typo costs no benchmark run; the directory must
    exist (it is not created: a mistyped path would silently make a tree)."""
    parent = path.parent
    if path.is_dir():
        return f"{flag} {path}: is a directory"
    if not parent.is_dir():
        what = "is not a directory" if parent.exists() else "does not exist"
        return f"{flag} {path}: the directory {parent} {what}"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{flag} {path}: the directory {parent} is not writable"
    return None


def main(argv: list[str] | None = None) -> int:
    """``python -m aiopgalloc bench``; returns the exit code.  Bad arguments
    (an output file in a directory that does not exist included) exit with
    status 2 before anything runs."""
    parser = _parser()
    args = parser.parse_args(argv)
    for flag, path in (("--json", args.json), ("--png", args.png)):
        problem = None if path is None else _output_problem(flag, path)
        if problem is not None:
            parser.error(problem)
    backends, backend_notes = _backends(args.backend)
    if not backends:
        print("no backend available: " + "; ".join(backend_notes), file=sys.stderr)
        return 2
    cfg = Config(quick=args.quick, smoke=args.smoke, backends=tuple(backends))
    keys: list[int] = args.workloads
    json_path: Path = args.json
    png_path: Path = args.png if args.png is not None else json_path.with_suffix(".png")

    machine = machine_info()
    pk = machine["packages"]
    print(
        f"aiopgalloc {pk['aiopgalloc']} | Python {pk['python']} | anyio {pk['anyio']} | "
        f"{machine['cpu_model']} x {machine['cpu_count']} | kernel {machine['kernel']}"
    )
    print(
        f"mode {cfg.mode}: {cfg.reps} repetitions, interleaved, medians | workloads "
        f"{','.join(map(str, keys))} | backends {', '.join(backends)} "
        f"(workloads {', '.join(str(k) for k, (_, each) in WORKLOADS.items() if not each)} "
        f"on {cfg.primary})",
        flush=True,
    )
    for note in backend_notes:
        print(note)

    progress = make_progress(len(keys), enabled=not args.no_progress)
    started = perf_counter()
    created = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    try:
        results = run_suite(cfg, keys, progress)
    finally:
        progress.close()
    elapsed = perf_counter() - started
    machine["loadavg_end"] = list(os.getloadavg())

    print()
    print(report.format_table(results))
    missed = report.misses(results)
    n_targets = sum(1 for r in results for row in r.rows if row.target is not None)
    print(
        f"\n{n_targets - len(missed)} of {n_targets} targets met"
        + (": MISS " + "; ".join(f"[{k}] {row.measurement}" for k, row in missed) if missed else "")
    )
    print(f"total time {elapsed:.1f} s")

    config = {
        "mode": cfg.mode,
        "quick": cfg.quick,
        "smoke": cfg.smoke,
        "repetitions": cfg.reps,
        "backends": list(backends),
        "primary_backend": cfg.primary,
        "workloads": keys,
        "backend_notes": backend_notes,
    }
    doc = report.document(
        results,
        machine=machine,
        config=config,
        elapsed_s=elapsed,
        created=created,
        argv=["python", "-m", "aiopgalloc", "bench", *(sys.argv[2:] if argv is None else argv)],
    )
    why_not = report.write_png(
        results,
        png_path,
        f"aiopgalloc {pk['aiopgalloc']} bench ({cfg.mode}, {cfg.primary})",
        caption=(
            f"{machine.get('cpu_model') or 'unknown CPU'} x {machine.get('cpu_count', '?')} | "
            f"kernel {machine.get('kernel', '?')} | Python {platform.python_version()} | "
            f"{machine.get('hostname', '')} | {created}"
        ),
    )
    doc["png"] = None if why_not else str(png_path)
    report.write_json(doc, json_path)
    print(f"wrote {json_path}")
    if why_not:
        print(f"no PNG: {why_not}")
    else:
        print(f"wrote {png_path}")
    return 0
