"""Checkpoint throughput: ``save`` and ``load_memory_file``, on asyncio.

For files of 256 MiB and 1 GiB (256 MiB only with ``--quick``), allocated
as 2 MiB pieces, with 10% and 50% of the pieces written (random bytes; the
rest never touched), the script times:

- ``save`` to a file in a fresh temporary directory on the disk (``fsync``
  on, as by default: the checkpoint is on disk when ``save`` returns);
- ``save`` to an ``io.BytesIO`` (no disk: the cost of finding, reading,
  checksumming and copying the pages);
- ``load_memory_file`` from that file, up to the ``async with`` body (the
  file was just written, so it is read from the page cache, not the disk).

Throughput is given twice: in MiB of committed data per second (what is
really moved) and in MiB of file size per second (what a user sees).  Each
figure is the median of 3 runs (1 with ``--quick``).  The checkpoint's size
on disk is shown too.

Usage::

    python benchmarks/bench_checkpoint.py [--quick] [--save]

``--save`` writes ``benchmarks/results/checkpoint-<hostname>.json``.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import io
import json
import os
import platform
import random
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

from aiopgalloc import AccessType, MemoryFile, open_memory_file
from aiopgalloc.checkpoint import load_memory_file, save

MiB = 1 << 20
PIECE = 2 * MiB


def _write(mf: MemoryFile, size: int, fraction: float, rng: random.Random) -> int:
    """Allocate ``size`` bytes in 2 MiB pieces; write ``fraction`` of them."""
    pieces = [mf.allocate(PIECE) for _ in range(size // PIECE)]
    chosen = rng.sample(pieces, round(len(pieces) * fraction))
    block = rng.randbytes(PIECE)
    for i, fr in enumerate(chosen):
        for v in mf.map_internal(fr, AccessType.WRITE):
            v[:] = block
            v[:8] = i.to_bytes(8, "little")  # no two pieces alike
            v.release()
    return len(chosen) * PIECE


async def _case(size: int, fraction: float, runs: int) -> dict[str, Any]:
    rng = random.Random(size ^ int(fraction * 100))
    save_file: list[float] = []
    save_mem: list[float] = []
    load: list[float] = []
    ckpt_size = 0
    async with open_memory_file() as src:
        data = _write(src, size, fraction, rng)
        assert src.total_size() == size
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "ck"
            for _ in range(runs):
                gc.collect()
                t0 = time.perf_counter()
                ckpt_size = await save(src, path)
                save_file.append(time.perf_counter() - t0)
                buf = io.BytesIO()
                t0 = time.perf_counter()
                await save(src, buf)
                save_mem.append(time.perf_counter() - t0)
                del buf
                gc.collect()
                t0 = time.perf_counter()
                async with load_memory_file(path) as dst:
                    load.append(time.perf_counter() - t0)
                    assert dst.total_size() == size
                    assert dst.total_usage() == data
    return {
        "file_mib": size // MiB,
        "written_percent": round(fraction * 100),
        "committed_mib": data // MiB,
        "checkpoint_mib": round(ckpt_size / MiB, 2),
        "save_file_s": round(statistics.median(save_file), 4),
        "save_bytesio_s": round(statistics.median(save_mem), 4),
        "load_s": round(statistics.median(load), 4),
    }


def _rates(row: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key in ("save_file", "save_bytesio", "load"):
        t = row[f"{key}_s"]
        out[f"{key}_data_mib_s"] = round(row["committed_mib"] / t, 1)
        out[f"{key}_file_mib_s"] = round(row["file_mib"] / t, 1)
    return out


def _table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| file | written | checkpoint | save to disk: s, data MiB/s, file MiB/s "
        "| save to BytesIO: s, data MiB/s, file MiB/s | load: s, data MiB/s, file MiB/s |"
    )
    lines = [head, "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        cells = []
        for key in ("save_file", "save_bytesio", "load"):
            cells.append(
                f"{r[f'{key}_s']:.3f} s, {r[f'{key}_data_mib_s']:.0f}, {r[f'{key}_file_mib_s']:.0f}"
            )
        lines.append(
            f"| {r['file_mib']} MiB | {r['written_percent']}% ({r['committed_mib']} MiB) "
            f"| {r['checkpoint_mib']} MiB | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


def _versions() -> dict[str, str]:
    out = {}
    for name in ("aiopgalloc", "anyio"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "?"
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the cases, print the table, optionally save the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="256 MiB only, one run per case")
    parser.add_argument("--save", action="store_true", help="write benchmarks/results/...json")
    args = parser.parse_args(argv)
    sizes = [256 * MiB] if args.quick else [256 * MiB, 1024 * MiB]
    runs = 1 if args.quick else 3
    rows = []
    for size in sizes:
        for fraction in (0.1, 0.5):
            row = anyio.run(_case, size, fraction, runs, backend="asyncio")
            row.update(_rates(row))
            rows.append(row)
            print(f"done: {size // MiB} MiB at {round(fraction * 100)}%", file=sys.stderr)
    print(_table(rows))
    if args.save:
        host = socket.gethostname()
        doc = {
            "benchmark": "checkpoint save/load throughput (asyncio backend)",
            "host": host,
            "platform": platform.platform(),
            "machine": platform.machine(),
            "cpu_count": os.cpu_count(),
            "python": sys.version,
            "packages": _versions(),
            "runs_per_case": runs,
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "notes": "save to disk includes fsync; load reads a checkpoint in the page cache",
            "results": rows,
        }
        path = Path(__file__).resolve().parent / "results" / f"checkpoint-{host}.json"
        path.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
