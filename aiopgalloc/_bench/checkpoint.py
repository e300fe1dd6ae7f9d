"""Workload 8: checkpoint save / load throughput (informational).

Files of 256 MiB and 1 GiB (``--quick``: 256 MiB) allocated as 2 MiB
pieces, 10% and 50% of the pieces written with random bytes (no two pieces
alike), the rest never touched.  Timed:

- ``save`` to a file in a fresh temporary directory (fsync on, as by
  default: the checkpoint is on disk when ``save`` returns);
- ``save`` to an ``io.BytesIO`` (no disk: finding, reading, checksumming
  and copying the pages);
- ``load_memory_file`` from that file up to the ``async with`` body (read
  from the page cache, since it was just written).

Throughput in MiB of committed data per second (what is really moved).
Each figure is the median of 3 runs (1 with ``--quick``); the checkpoint's
size is in the JSON.
"""

from __future__ import annotations

import io
import random
import tempfile
from pathlib import Path
from typing import Any

from ..lifecycle import load_memory_file, open_memory_file
from ..memory_file import MemoryFile
from ..options import AccessType
from .common import Config, Progress, Row, WorkloadResult, collect, median, perf_counter, run_on

__all__ = ["run", "total_steps"]

NAME = "checkpoint"
TITLE = "checkpoint save / load throughput"
MiB = 1 << 20
PIECE = 2 * MiB
FRACTIONS = (0.1, 0.5)


def _sizes(cfg: Config) -> list[int]:
    return cfg.pick([256 * MiB, 1024 * MiB], [256 * MiB], [16 * MiB])


def _runs(cfg: Config) -> int:
    return cfg.pick(3, 1, 1)


def total_steps(cfg: Config) -> int:
    """Progress steps: one per case."""
    return len(_sizes(cfg)) * len(FRACTIONS)


def write_pieces(mf: MemoryFile, size: int, fraction: float, rng: random.Random) -> int:
    """Allocate ``size`` bytes in 2 MiB pieces; write ``fraction`` of them.
    Returns the bytes written."""
    pieces = [mf.allocate(PIECE) for _ in range(size // PIECE)]
    chosen = rng.sample(pieces, round(len(pieces) * fraction))
    block = rng.randbytes(PIECE)
    for i, fr in enumerate(chosen):
        for v in mf.map_internal(fr, AccessType.WRITE):
            v[:] = block
            v[:8] = i.to_bytes(8, "little")
            v.release()
    return len(chosen) * PIECE


async def _case(size: int, fraction: float, runs: int) -> dict[str, Any]:
    rng = random.Random(size ^ int(fraction * 100))
    save_file: list[float] = []
    save_mem: list[float] = []
    load: list[float] = []
    ckpt_size = 0
    async with open_memory_file() as src:
        data = write_pieces(src, size, fraction, rng)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "ck"
            for _ in range(runs):
                collect()
                t0 = perf_counter()
                ckpt_size = await src.save(path)
                save_file.append(perf_counter() - t0)
                buf = io.BytesIO()
                t0 = perf_counter()
                await src.save(buf)
                save_mem.append(perf_counter() - t0)
                del buf
                collect()
                t0 = perf_counter()
                async with load_memory_file(path) as dst:
                    load.append(perf_counter() - t0)
                    if dst.total_usage() != data:
                        raise RuntimeError("the loaded file does not hold what was saved")
    return {
        "file_bytes": size,
        "written_percent": round(fraction * 100),
        "committed_bytes": data,
        "checkpoint_bytes": ckpt_size,
        "save_file_s": median(save_file),
        "save_bytesio_s": median(save_mem),
        "load_s": median(load),
        "samples": {"save_file_s": save_file, "save_bytesio_s": save_mem, "load_s": load},
    }


def run(cfg: Config, progress: Progress) -> WorkloadResult:
    """Run workload 8 on the primary backend."""
    runs = _runs(cfg)
    cases: list[dict[str, Any]] = []
    for size in _sizes(cfg):
        for fraction in FRACTIONS:
            cases.append(run_on(cfg.primary, _case, size, fraction, runs))
            progress.step(f"{size // MiB} MiB, {round(fraction * 100)}% written")
    result = WorkloadResult(
        key=8,
        name=NAME,
        title=TITLE,
        backends=[cfg.primary],
        params={"runs_per_case": runs, "piece_bytes": PIECE, "fractions": list(FRACTIONS)},
    )
    for c in cases:
        mib = c["committed_bytes"] / MiB
        rates = {
            k: mib / c[f"{k}_s"] if c[f"{k}_s"] else 0.0
            for k in ("save_file", "save_bytesio", "load")
        }
        c["data_mib_per_s"] = rates
        result.rows.append(
            Row(
                measurement=f"checkpoint {c['file_bytes'] // MiB} MiB, {c['written_percent']}% "
                "written: save/BytesIO/load",
                value=f"{rates['save_file']:,.0f}/{rates['save_bytesio']:,.0f}/"
                f"{rates['load']:,.0f} MiB/s",
                ratio_note="informational",
            )
        )
    result.notes.append("checkpoint MiB/s are of committed data; saving to disk includes fsync")
    result.data = {"cases": cases}
    return result
