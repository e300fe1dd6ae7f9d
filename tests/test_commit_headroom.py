"""Committing allocations respect the memory cgroup's headroom (issue 13,
defect 3).

Before the fix, ``allocate(512 MiB, commit=FALLOCATE)`` (or ``POPULATE``) in
a process whose memory cgroup was limited to 256 MiB got the process killed
by the kernel's OOM killer inside the call (exit status -9).  Now it raises
``OSError(ENOMEM)`` with the allocator's state unchanged.

Two parts:

* the headroom arithmetic (``aiopgalloc.host.cgroup.read_headroom`` and
  ``commit_in_steps``) on fake cgroup directory trees in ``tmp_path``, v1
  and v2 layouts, several levels, the kernel's spellings of "unlimited";
* the real thing: a child process (tests/headroom_child.py) moved into a
  fresh 256 MiB memory cgroup, on each event loop backend and commit mode.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from aiopgalloc.host.cgroup import (
    COMMIT_RESERVE,
    COMMIT_STEP_MAX,
    CgroupInfo,
    Headroom,
    commit_in_steps,
    commit_need,
    create_child_memcg,
    current_memory_cgroup,
    memcg_levels,
    parse_memory_limit,
    read_headroom,
    remove_child,
)

MIB = 1 << 20
V1_UNLIMITED = "9223372036854771712"  # PAGE_COUNTER_MAX * 4 KiB, as v1 prints it


# ------------------------------------------------------------ fake trees


def v1_level(
    path: Path,
    limit: int | str,
    usage: int,
    stat: dict[str, int] | None = None,
) -> Path:
    """Write the v1 files of one cgroup level into ``path``."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "memory.limit_in_bytes").write_text(f"{limit}\n")
    (path / "memory.usage_in_bytes").write_text(f"{usage}\n")
    (path / "memory.stat").write_text("".join(f"{k} {v}\n" for k, v in (stat or {}).items()))
    return path


def v2_level(
    path: Path,
    limit: int | str | None,
    current: int,
    stat: dict[str, int] | None = None,
) -> Path:
    """Write the v2 files of one cgroup level (``limit=None``: no memory.max,
    as at the root)."""
    path.mkdir(parents=True, exist_ok=True)
    if limit is not None:
        (path / "memory.max").write_text(f"{limit}\n")
    (path / "memory.current").write_text(f"{current}\n")
    (path / "memory.stat").write_text("".join(f"{k} {v}\n" for k, v in (stat or {}).items()))
    return path


def add_usage(level: Path, delta: int, version: int = 1) -> None:
    """Charge ``delta`` bytes to a fake level, as the kernel would."""
    name = "memory.usage_in_bytes" if version == 1 else "memory.current"
    f = level / name
    f.write_text(f"{int(f.read_text()) + delta}\n")


def test_parse_memory_limit() -> None:
    assert parse_memory_limit("max\n") is None
    assert parse_memory_limit(V1_UNLIMITED + "\n") is None
    assert parse_memory_limit("9223372036854710272") is None  # v1 with 64 KiB pages
    assert parse_memory_limit("268435456\n") == 256 * MIB
    assert parse_memory_limit("0") == 0
    for bad in ("", "-1", "12abc", "unlimited"):
        with pytest.raises(ValueError):
            parse_memory_limit(bad)


def test_v1_tightest_of_several_levels(tmp_path: Path) -> None:
    root = v1_level(tmp_path, V1_UNLIMITED, 10_000 * MIB)
    mid = v1_level(tmp_path / "svc", 2048 * MIB, 1024 * MIB)
    low = v1_level(tmp_path / "svc" / "worker", 1024 * MIB, 900 * MIB)
    leaf = v1_level(tmp_path / "svc" / "worker" / "task", V1_UNLIMITED, 850 * MIB)
    found = read_headroom(1, [leaf, low, mid, root])
    assert found == Headroom(low, 1024 * MIB, 900 * MIB, None)
    assert found is not None and found.room == 124 * MIB
    # The parent becomes the tightest once its usage grows.
    add_usage(mid, 950 * MIB)
    found = read_headroom(1, [leaf, low, mid, root])
    assert found is not None and found.path == mid and found.room == 74 * MIB


def test_v2_layout_with_max_and_a_root_without_memory_max(tmp_path: Path) -> None:
    root = v2_level(tmp_path, None, 5000 * MIB)
    slice_ = v2_level(tmp_path / "system.slice", "max", 3000 * MIB)
    svc = v2_level(tmp_path / "system.slice" / "foo.service", 512 * MIB, 100 * MIB)
    leaf = v2_level(tmp_path / "system.slice" / "foo.service" / "w", "max", 60 * MIB)
    found = read_headroom(2, [leaf, svc, slice_, root])
    assert found == Headroom(svc, 512 * MIB, 100 * MIB, None)
    # The v1 file names mean nothing on v2 and the reverse.
    assert read_headroom(1, [leaf, svc, slice_, root]) is None


def test_no_limit_anywhere(tmp_path: Path) -> None:
    v1 = [
        v1_level(tmp_path / "v1" / "a", V1_UNLIMITED, 1),
        v1_level(tmp_path / "v1", V1_UNLIMITED, 2),
    ]
    v2 = [v2_level(tmp_path / "v2" / "a", "max", 1), v2_level(tmp_path / "v2", None, 2)]
    assert read_headroom(1, v1, 1 << 40) is None
    assert read_headroom(2, v2, 1 << 40) is None
    assert read_headroom(1, []) is None
    with pytest.raises(ValueError):
        read_headroom(3, v1)


def test_reclaimable_page_cache_counts_only_when_needed(tmp_path: Path) -> None:
    stat = {
        "inactive_file": 1 * MIB,  # this level only: not the one that counts
        "total_inactive_file": 100 * MIB,
        "total_active_file": 500 * MIB,  # never counted
        "total_dirty": 10 * MIB,
        "total_writeback": 5 * MIB,
        "total_shmem": 50 * MIB,
    }
    lvl = v1_level(tmp_path, 1024 * MIB, 1000 * MIB, stat)
    assert read_headroom(1, [lvl], need=24 * MIB) == Headroom(lvl, 1024 * MIB, 1000 * MIB, None)
    found = read_headroom(1, [lvl], need=25 * MIB)
    assert found == Headroom(lvl, 1024 * MIB, 1000 * MIB, 85 * MIB)
    assert found is not None and found.room == 109 * MIB

    v2stat = {"inactive_file": 40 * MIB, "active_file": 99 * MIB, "file_dirty": 8 * MIB}
    lvl2 = v2_level(tmp_path / "v2", 300 * MIB, 290 * MIB, v2stat)
    found = read_headroom(2, [lvl2], need=20 * MIB)
    assert found is not None and found.reclaimable == 32 * MIB and found.room == 42 * MIB


def test_room_is_never_negative(tmp_path: Path) -> None:
    # Usage over the limit (a limit lowered under a full cgroup), dirty pages
    # beyond the inactive ones.
    stat = {"total_inactive_file": 1 * MIB, "total_dirty": 3 * MIB}
    lvl = v1_level(tmp_path, 100 * MIB, 120 * MIB, stat)
    found = read_headroom(1, [lvl], need=1)
    assert found == Headroom(lvl, 100 * MIB, 120 * MIB, 0)
    assert found is not None and found.room == 0


def test_missing_or_damaged_level_counts_as_unlimited(tmp_path: Path) -> None:
    good = v1_level(tmp_path / "good", 100 * MIB, 10 * MIB)
    garbage = v1_level(tmp_path / "garbage", "lots", 10 * MIB)
    no_usage = v1_level(tmp_path / "nousage", 50 * MIB, 0)
    (no_usage / "memory.usage_in_bytes").unlink()
    bad_usage = v1_level(tmp_path / "badusage", 50 * MIB, 0)
    (bad_usage / "memory.usage_in_bytes").write_text("?\n")
    gone = tmp_path / "gone"
    found = read_headroom(1, [gone, garbage, no_usage, bad_usage, good])
    assert found is not None and found.path == good


def test_memcg_levels_walks_up_to_the_mount() -> None:
    mount = Path("/sys/fs/cgroup/memory")
    info = CgroupInfo(1, mount / "process_api" / "abc", mount)
    assert memcg_levels(info) == (mount / "process_api" / "abc", mount / "process_api", mount)
    assert memcg_levels(CgroupInfo(2, mount, mount)) == (mount,)
    elsewhere = Path("/somewhere/else")
    assert memcg_levels(CgroupInfo(1, elsewhere, mount)) == (elsewhere,)


def test_commit_need() -> None:
    assert commit_need(0) == COMMIT_RESERVE
    assert commit_need(128 * MIB) == 129 * MIB + COMMIT_RESERVE


# ------------------------------------------------------------ stepping


class Committer:
    """Records the commit calls and charges each to the fake levels."""

    def __init__(self, *levels: Path, version: int = 1) -> None:
        self.levels = levels
        self.version = version
        self.calls: list[tuple[int, int]] = []

    def __call__(self, offset: int, length: int) -> None:
        self.calls.append((offset, length))
        for level in self.levels:
            add_usage(level, length, self.version)


def covered(calls: list[tuple[int, int]], offset: int) -> int:
    """Assert the calls are contiguous from ``offset``; return their end."""
    end = offset
    for off, n in calls:
        assert off == end and n > 0
        end += n
    return end


def test_no_limit_commits_in_one_call(tmp_path: Path) -> None:
    lvl = v1_level(tmp_path, V1_UNLIMITED, 0)
    commit = Committer(lvl)
    commit_in_steps(4096, 1024 * MIB, commit, lambda: (1, (lvl,)))
    assert commit.calls == [(4096, 1024 * MIB)]
    commit = Committer(lvl)
    commit_in_steps(0, 8192, commit, lambda: None)  # no memory controller
    assert commit.calls == [(0, 8192)]


def test_limited_commit_goes_in_steps_of_at_most_64_mib(tmp_path: Path) -> None:
    root = v1_level(tmp_path, V1_UNLIMITED, 0)
    lvl = v1_level(tmp_path / "svc", 4096 * MIB, 0)
    commit = Committer(lvl, root)
    commit_in_steps(2 * MIB, 300 * MIB + 4096, commit, lambda: (1, (lvl, root)))
    assert covered(commit.calls, 2 * MIB) == 2 * MIB + 300 * MIB + 4096
    assert [n for _, n in commit.calls] == [COMMIT_STEP_MAX] * 4 + [44 * MIB + 4096]
    assert int((lvl / "memory.usage_in_bytes").read_text()) == 300 * MIB + 4096


def test_steps_shrink_with_the_room(tmp_path: Path) -> None:
    lvl = v2_level(tmp_path, 100 * MIB, 0)
    commit = Committer(lvl, version=2)
    commit_in_steps(0, 60 * MIB, commit, lambda: (2, (lvl,)))
    sizes = [n for _, n in commit.calls]
    assert covered(commit.calls, 0) == 60 * MIB
    # A quarter of the room at each step, in whole 2 MiB units: 100 -> 24,
    # 76 -> 18, 58 -> 14, then the 4 MiB left.
    assert sizes == [24 * MIB, 18 * MIB, 14 * MIB, 4 * MIB]


def test_too_big_is_refused_before_any_step(tmp_path: Path) -> None:
    root = v1_level(tmp_path, V1_UNLIMITED, 0)
    lvl = v1_level(tmp_path / "svc", 256 * MIB, 3 * MIB)
    commit = Committer(lvl, root)
    with pytest.raises(OSError) as info:
        commit_in_steps(0, 512 * MIB, commit, lambda: (1, (lvl, root)))
    exc = info.value
    assert exc.errno == errno.ENOMEM
    assert exc.filename == str(lvl)
    assert str(512 * MIB) in str(exc) and f"has {253 * MIB}" in str(exc)
    assert commit.calls == []
    # The largest request that fits leaves the reserve and 1/128 free.
    commit_in_steps(0, 243 * MIB, commit, lambda: (1, (lvl, root)))
    assert covered(commit.calls, 0) == 243 * MIB
    with pytest.raises(OSError):
        commit_in_steps(0, 245 * MIB, Committer(), lambda: (1, (lvl, root)))


def test_refused_midway_when_others_charge_the_cgroup(tmp_path: Path) -> None:
    lvl = v1_level(tmp_path, 512 * MIB, 0)
    calls: list[tuple[int, int]] = []

    def commit_and_a_neighbour_grows(offset: int, length: int) -> None:
        calls.append((offset, length))
        add_usage(lvl, length + 350 * MIB)  # another task charges meanwhile

    with pytest.raises(OSError) as info:
        commit_in_steps(0, 200 * MIB, commit_and_a_neighbour_grows, lambda: (1, (lvl,)))
    assert info.value.errno == errno.ENOMEM
    assert calls == [(0, COMMIT_STEP_MAX)]  # one step made, the caller undoes it
    assert f"committing {136 * MIB} more bytes of a {200 * MIB}-byte request" in str(info.value)


def test_limit_lifted_midway_commits_the_rest_at_once(tmp_path: Path) -> None:
    lvl = v1_level(tmp_path, 1024 * MIB, 0)
    calls: list[tuple[int, int]] = []

    def commit_then_lift(offset: int, length: int) -> None:
        calls.append((offset, length))
        (lvl / "memory.limit_in_bytes").write_text(V1_UNLIMITED)

    commit_in_steps(0, 200 * MIB, commit_then_lift, lambda: (1, (lvl,)))
    assert calls == [(0, 64 * MIB), (64 * MIB, 136 * MIB)]


def test_commit_errors_and_bad_length(tmp_path: Path) -> None:
    lvl = v1_level(tmp_path, 1024 * MIB, 0)

    def failing(offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "no space")

    with pytest.raises(OSError) as info:
        commit_in_steps(0, 4096, failing, lambda: (1, (lvl,)))
    assert info.value.errno == errno.ENOSPC
    for bad in (0, -4096):
        with pytest.raises(ValueError):
            commit_in_steps(0, bad, Committer(lvl), lambda: (1, (lvl,)))


# ------------------------------------------------------------ real cgroups

CHILD = Path(__file__).resolve().parent / "headroom_child.py"
REPO = CHILD.parent.parent
MEMCG = current_memory_cgroup()
LIMIT = 256 * MIB
BACKENDS = ["asyncio", "asyncio+uvloop", "trio"]
MODES = ["fallocate", "populate"]


def _skip(reason: str) -> None:
    print(f"\nSKIP: {reason}")  # shown with -s; pytest -ra lists the reason too
    pytest.skip(reason)


def _kill_members(path: Path) -> None:
    for _ in range(50):
        try:
            pids = [int(p) for p in (path / "cgroup.procs").read_text().split()]
        except OSError:
            return
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.02)


def _oom_kills(path: Path) -> int:
    """The OOM kills the kernel counted in the cgroup (v1 memory.oom_control,
    v2 memory.events)."""
    for name in ("memory.oom_control", "memory.events"):
        with contextlib.suppress(OSError):
            for line in (path / name).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
    return 0


@pytest.fixture
def limited_cgroup() -> Iterator[Path]:
    """A fresh child of this process's memory cgroup limited to 256 MiB;
    removed afterwards even when the test fails (the teardown errors if it
    cannot be)."""
    if os.geteuid() != 0:
        _skip("needs root to create and join memory cgroups")
    if MEMCG is None:
        _skip("no memory controller: neither a cgroup v1 memory hierarchy nor cgroup v2 memory")
    assert MEMCG is not None
    name = f"aiopgalloc-test-headroom-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        path = create_child_memcg(MEMCG, name, LIMIT)
    except OSError as exc:
        _skip(f"cannot create a limited memory cgroup under {MEMCG.path}: {exc}")
    try:
        yield path
    finally:
        _kill_members(path)
        deadline = time.monotonic() + 5
        while path.exists():
            try:
                remove_child(path)
            except FileNotFoundError:
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        assert not path.exists(), f"cgroup {path} was not removed"


def run_child(cgroup: Path, backend: str, mode: str, *args: str) -> dict[str, Any]:
    """Run the child in ``cgroup``; assert it lived and exited 0; return its
    report."""
    proc = subprocess.run(
        [
            sys.executable,
            str(CHILD),
            "--cgroup",
            str(cgroup),
            "--backend",
            backend,
            "--mode",
            mode,
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert proc.returncode != -signal.SIGKILL, (
        f"the child was killed (OOM kills counted: {_oom_kills(cgroup)}); stderr:\n{proc.stderr}"
    )
    assert proc.returncode == 0, f"child exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    doc: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert doc.get("done") is True, doc
    assert _oom_kills(cgroup) == 0
    return doc


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_commit_over_the_cgroup_limit_raises_enomem(
    limited_cgroup: Path, backend: str, mode: str
) -> None:
    """512 MiB in a 256 MiB cgroup: OSError(ENOMEM) naming the cgroup, the
    state as before, and the process goes on to commit 64 MiB."""
    doc = run_child(limited_cgroup, backend, mode, "--request-mib", "512", "--then-mib", "64")
    assert doc["cgroup"] == str(limited_cgroup)
    first = doc["first"]
    assert first["ok"] is False
    assert first["errno"] == errno.ENOMEM
    assert str(limited_cgroup) in first["message"] and str(512 * MIB) in first["message"]
    assert first["state_unchanged"] is True
    assert first["usage_after"] == first["usage_before"]
    then = doc["then"]
    assert then["ok"] is True
    assert then["usage_after"] - then["usage_before"] == 64 * MIB
    # The answer cached before the move was not used after it.
    assert doc["levels_before_move"] != str(limited_cgroup)
    assert doc["levels_after_move"] == str(limited_cgroup)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_commit_that_fits_the_cgroup_succeeds(
    limited_cgroup: Path, backend: str, mode: str
) -> None:
    doc = run_child(limited_cgroup, backend, mode, "--request-mib", "128")
    first = doc["first"]
    assert first["ok"] is True, first
    assert first["usage_after"] - first["usage_before"] == 128 * MIB


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_failure_after_some_steps_undoes_them(
    limited_cgroup: Path, backend: str, mode: str
) -> None:
    """The commit's second system call fails (EIO, injected) after the first
    committed part of the range: the committed pages are punched back out
    and the state is as before.  With FALLOCATE this also shows the commit
    went in steps (one fallocate call would not have reached a second)."""
    doc = run_child(
        limited_cgroup,
        backend,
        mode,
        "--request-mib",
        "192",
        "--fault-after",
        "1",
        "--then-mib",
        "64",
    )
    first = doc["first"]
    assert first["ok"] is False and first["errno"] == errno.EIO, first
    assert first["faults_fired"] == 1
    assert first["state_unchanged"] is True
    assert first["usage_after"] == first["usage_before"] == 0
    assert doc["then"]["ok"] is True
