"""The suite's outputs: the results table, the JSON document and the PNG of
the scaling curve.

matplotlib is optional (``pip install 'aiopgalloc[bench]'``): it is
imported through ``importlib`` only when a PNG is asked for, with the
non-interactive Agg backend, and its absence only means no picture.
"""

from __future__ import annotations

import importlib
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .common import Row, WorkloadResult

__all__ = ["document", "format_table", "misses", "write_json", "write_png"]

SCHEMA = "aiopgalloc-bench/1"


def _verdict(row: Row) -> str:
    p = row.passed
    return "" if p is None else "PASS" if p else "MISS"


def _ratio(row: Row) -> str:
    if row.ratio is None or math.isnan(row.ratio):
        return "-"
    r = row.ratio
    unit = "x" if row.target is None else row.target.unit
    return f"{r:.3g}{unit}" if r < 100 else f"{r:,.0f}{unit}"


def format_table(results: Sequence[WorkloadResult]) -> str:
    """Every row of every workload, as a fixed-width text table, followed by
    each workload's notes."""
    head = ("#", "measurement", "aiopgalloc", "peer", "ratio", "target", "result")
    lines: list[tuple[str, ...]] = []
    for r in results:
        for row in r.rows:
            lines.append(
                (
                    str(r.key),
                    row.measurement,
                    row.value,
                    row.peer,
                    _ratio(row),
                    "" if row.target is None else str(row.target),
                    _verdict(row),
                )
            )
    widths = [
        max(len(head[i]), *(len(x[i]) for x in lines)) if lines else len(head[i]) for i in range(7)
    ]

    def fmt(cells: tuple[str, ...]) -> str:
        out = []
        for i, c in enumerate(cells):
            out.append(c.rjust(widths[i]) if i in (2, 3, 4) else c.ljust(widths[i]))
        return "  ".join(out).rstrip()

    rule = "-" * len(fmt(head))
    text = [rule, fmt(head), rule]
    last = None
    for cells in lines:
        if last is not None and cells[0] != last:
            text.append("")
        text.append(fmt(cells))
        last = cells[0]
    text.append(rule)
    for r in results:
        for note in r.notes:
            text.append(f"[{r.key}] {note}")
    return "\n".join(text)


def misses(results: Sequence[WorkloadResult]) -> list[tuple[int, Row]]:
    """The rows whose target was missed."""
    return [(r.key, row) for r in results for row in r.rows if row.passed is False]


def document(
    results: Sequence[WorkloadResult],
    *,
    machine: dict[str, Any],
    config: dict[str, Any],
    elapsed_s: float,
    created: str,
    argv: Sequence[str],
) -> dict[str, Any]:
    """The JSON document of one run."""
    targets = [
        {"workload": r.key, **row.to_json()}
        for r in results
        for row in r.rows
        if row.target is not None
    ]
    return {
        "schema": SCHEMA,
        "created": created,
        "argv": list(argv),
        "config": config,
        "machine": machine,
        "elapsed_s": round(elapsed_s, 3),
        "summary": {
            "targets": len(targets),
            "passed": sum(1 for t in targets if t["pass"] is True),
            "missed": [
                f"{t['workload']}: {t['measurement']}" for t in targets if t["pass"] is False
            ],
        },
        "targets": targets,
        "workloads": {str(r.key): r.to_json() for r in results},
    }


def write_json(doc: dict[str, Any], path: Path) -> None:
    """Write the document (pretty-printed, NaN as null)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_clean(doc), indent=2) + "\n")


def _clean(x: Any) -> Any:
    """NaN and infinities become None (JSON has neither)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    return x


def write_png(results: Sequence[WorkloadResult], path: Path, title: str) -> str | None:
    """Draw the scaling curve (workload 2) as a PNG at ``path``.

    Returns None when written, else why not (matplotlib missing, or
    workload 2 not run)."""
    scaling = next((r for r in results if r.key == 2), None)
    if scaling is None or not scaling.data.get("series"):
        return "workload 2 (scaling) was not run"
    try:
        mpl = importlib.import_module("matplotlib")
        mpl.use("Agg")
        plt = importlib.import_module("matplotlib.pyplot")
    except ImportError:
        return "matplotlib is not installed (pip install 'aiopgalloc[bench]')"
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    for label, series in scaling.data["series"].items():
        xs = [p["live_segments"] for p in series]
        ys = [p["median_us_per_op"] for p in series]
        lo = [p["median_us_per_op"] - p["min_us_per_op"] for p in series]
        hi = [p["max_us_per_op"] - p["median_us_per_op"] for p in series]
        ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=label)
    written = scaling.data["series"].get("written map")
    if written:
        limit = 2 * written[0]["median_us_per_op"]
        ax.axhline(limit, color="grey", linestyle="--", linewidth=1)
        ax.annotate(
            "target: 2x the cost at 1k (written map)",
            (written[0]["live_segments"], limit),
            textcoords="offset points",
            xytext=(0, 4),
            fontsize=7,
            color="grey",
        )
    ax.set_xscale("log")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("live segments (fragmented map: every other page live)")
    ax.set_ylabel("us per allocate + dec_ref (median, min-max)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return None
