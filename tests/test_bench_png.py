"""The bench PNG: every target of the run drawn against its threshold, the
scaling curve beside it, the machine in the caption."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from aiopgalloc._bench import report
from aiopgalloc._bench.common import Row, Target, WorkloadResult


def _results() -> list[WorkloadResult]:
    return [
        WorkloadResult(
            1,
            "churn",
            "churn",
            ["asyncio"],
            {},
            rows=[
                Row("churn vs mmap", "3/s", "1/s", 3.3, target=Target(">=", 3)),
                Row("informational", "1", "1", 2.0),
                Row("not measured", "-", "-", None, target=Target(">=", 2)),
            ],
        ),
        WorkloadResult(
            3,
            "release",
            "release",
            ["asyncio"],
            {},
            rows=[Row("release vs merged", "1", "1", 37.9, target=Target("<=", 1.3))],
        ),
    ]


def test_every_measured_target_is_drawn_and_nothing_else() -> None:
    rows = report._target_rows(_results())
    assert [(k, r.measurement) for k, r in rows] == [
        (1, "churn vs mmap"),
        (3, "release vs merged"),
    ]


def test_no_target_no_picture(tmp_path: Path) -> None:
    empty = [WorkloadResult(8, "checkpoint", "checkpoint", ["asyncio"], {}, rows=[Row("x", "1")])]
    why = report.write_png(empty, tmp_path / "x.png", "t")
    assert why == "no target was measured in this run"
    assert not (tmp_path / "x.png").exists()


@pytest.mark.skipif(
    importlib.util.find_spec("matplotlib") is None, reason="matplotlib (the bench extra)"
)
def test_png_is_written_with_the_caption(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "run.png"
    assert report.write_png(_results(), path, "title", caption="AMD EPYC x 2") is None
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
