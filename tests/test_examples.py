"""Every script in ``examples/`` runs as a user runs it (``python
examples/NAME.py``, in a subprocess): it finishes on its own within its time
budget, exits 0, prints what it shows, and writes nothing to stderr (no
traceback, no warning such as a memoryview left alive at close)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"

# name -> lines (substrings) the output must contain
EXPECTED: dict[str, list[str]] = {
    "cache_server.py": [
        "cache server listening on 127.0.0.1:",
        "load: 8 connections stored and read back 2000 values",
        "every byte checked",
        "PRESSURE low      -> the shards gave back",
        "PRESSURE critical -> the shards gave back",
        "0 entries (0.0 MiB) remain",
        "100 of 100 reads miss",
        "server stopped; 0 bytes committed in the memory file",
    ],
    "zero_copy_workers.py": [
        "2 workers hold a read-only fd each; a writable mapping was refused",
        "zero-copy (fd + offsets):",
        "every checksum right",
        "pickled (Pool.map):",
        "zero-copy is ",
    ],
    "fill_from_stream.py": [
        "1. received 24 MiB over TCP",
        "SHA-256 matches the sender's",
        "2. asked for 4 MiB, the sender stopped after 1048676 bytes",
        "(1048576 bytes, whole pages only)",
        "3. a sender with nothing to send: EOFError",
        "all freed: 0 bytes committed in the memory file",
    ],
    "trio_app.py": [
        "256 thumbnails",
        "medium pressure: ",
        "critical pressure: 0 thumbnails left",
        "pinned buffer freed: 0 bytes committed",
    ],
}

# Seconds each may take here (2 vCPUs); they take a second or two.
BUDGET = 60


def test_every_example_is_tested() -> None:
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_runs(name: str) -> None:
    if name == "trio_app.py":
        pytest.importorskip("trio")
    t0 = time.monotonic()
    res = subprocess.run(
        [sys.executable, str(EXAMPLES / name)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=BUDGET,
    )
    took = time.monotonic() - t0
    assert res.returncode == 0, f"exit {res.returncode}\n{res.stdout}\n{res.stderr}"
    assert res.stderr == "", res.stderr
    for line in EXPECTED[name]:
        assert line in res.stdout, f"{line!r} missing from:\n{res.stdout}"
    print(f"\n{name} ({took:.1f} s):\n{res.stdout}")
