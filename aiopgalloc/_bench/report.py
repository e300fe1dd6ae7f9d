"""The suite's outputs: the results table, the JSON document and the PNG
(every target's figure against its threshold, and the scaling curve).

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


def _target_rows(results: Sequence[WorkloadResult]) -> list[tuple[int, Row]]:
    """Every row with a target and a measured ratio, in table order."""
    return [
        (r.key, row)
        for r in results
        for row in r.rows
        if row.target is not None and row.ratio is not None and math.isfinite(row.ratio)
    ]


def _draw_targets(ax: Any, rows: list[tuple[int, Row]]) -> None:
    """One bar per target: how far the figure is from its threshold, as
    "times better than needed" on a log scale, so that every target reads
    the same way whatever its direction (right of 1 = met)."""
    labels, margins, colours = [], [], []
    for key, row in rows:
        assert row.target is not None and row.ratio is not None
        t = row.target
        if row.ratio <= 0 or t.threshold <= 0:
            continue
        margin = row.ratio / t.threshold if t.op == ">=" else t.threshold / row.ratio
        labels.append(f"[{key}] {row.measurement}\n{row.ratio:.3g}{t.unit} (target {t})")
        margins.append(margin)
        colours.append("tab:green" if row.passed else "tab:red")
    ys = list(range(len(labels)))[::-1]
    # Bars grow from the threshold (1): rightwards when met, leftwards when missed.
    ax.barh(ys, [m - 1.0 for m in margins], left=1.0, color=colours, alpha=0.8)
    ax.axvline(1.0, color="black", linewidth=1)
    if margins:
        ax.set_xlim(min(*margins, 1.0) / 1.6, max(*margins, 1.0) * 1.6)
    ax.set_yticks(ys)
    ax.set_yticklabels(labels, fontsize=6)
    ax.set_xscale("log")
    ax.set_xlabel("figure / target (log; right of 1 = target met)", fontsize=8)
    ax.set_title("every target of this run", fontsize=9)
    ax.grid(True, axis="x", which="both", alpha=0.3)


def _draw_scaling(ax: Any, scaling: WorkloadResult) -> None:
    """The scaling curve of workload 2, with its target line."""
    for label, series in scaling.data["series"].items():
        xs = [p["live_segments"] for p in series]
        ys = [p["median_us_per_op"] for p in series]
        lo = [p["median_us_per_op"] - p["min_us_per_op"] for p in series]
        hi = [p["max_us_per_op"] - p["median_us_per_op"] for p in series]
        ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=label)
    written = scaling.data["series"].get("written map")
    if written:
        limit = 2 * written[0]["median_us_per_op"]
        ax.axhline(limit, color="grey", linestyle="--", linewidth=1, label="target: 2x at 1k")
    ax.set_xscale("log")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("live segments (every other page live)", fontsize=8)
    ax.set_ylabel("us per allocate + dec_ref (median, min-max)", fontsize=8)
    ax.set_title("[2] scaling", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)


def write_png(
    results: Sequence[WorkloadResult], path: Path, title: str, caption: str = ""
) -> str | None:
    """Draw the run as a PNG at ``path``: every target's figure against
    its threshold (one bar each, met or missed), and the scaling curve
    when workload 2 ran; ``caption`` (the machine) under it.

    Returns None when written, else why not (matplotlib missing, or no
    target measured)."""
    rows = _target_rows(results)
    scaling = next((r for r in results if r.key == 2 and r.data.get("series")), None)
    if not rows and scaling is None:
        return "no target was measured in this run"
    try:
        mpl = importlib.import_module("matplotlib")
        mpl.use("Agg")
        plt = importlib.import_module("matplotlib.pyplot")
    except ImportError:
        return "matplotlib is not installed (pip install 'aiopgalloc[bench]')"
    panels = (1 if rows else 0) + (1 if scaling is not None else 0)
    height = max(4.0, 0.45 * len(rows) + 1.6)
    fig, axes = plt.subplots(
        1,
        panels,
        figsize=(7.5 * panels, height),
        dpi=120,
        gridspec_kw={"width_ratios": [1.3, 1.0][:panels]} if panels == 2 else None,
    )
    axes = list(axes) if panels > 1 else [axes]
    if rows:
        _draw_targets(axes[0], rows)
    if scaling is not None:
        _draw_scaling(axes[-1], scaling)
    fig.suptitle(title, fontsize=10)
    if caption:
        fig.text(0.5, 0.005, caption, ha="center", va="bottom", fontsize=7, color="dimgrey")
    fig.tight_layout(rect=(0, 0.03, 1, 0.95))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return None
