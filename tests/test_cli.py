"""``python -m aiopgalloc demo`` and ``info``, run as a user runs them: in
subprocesses, checking the exit status, the closing summary, and that the
memory cgroup and the temporary directory the run made are gone afterwards
(also after Ctrl-C and SIGTERM).  Only what the run itself made is checked
(the cgroup is named after the demo's pid, the directory is printed), so
another demo running on the machine meanwhile does not fail these tests;
the ``foreign_demo`` fixture plays that other demo.  Plus the demo's pure
parts: the file map (on a real ``page_map()``), the summary, and the
rich view drawn into a string; and ``bench``'s argument checks (no
benchmark is run).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import pty
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import aiopgalloc
from aiopgalloc import (
    HUGE_PAGE_SIZE,
    PAGE_SIZE,
    EvictionStats,
    FileStats,
    MemoryKind,
    MemoryStats,
    open_memory_file,
)
from aiopgalloc._cli import bench, demo_map
from aiopgalloc._cli import info as info_cli
from aiopgalloc._cli.demo_summary import RunFacts, summarize
from aiopgalloc._cli.demo_view import Frame, Header, RichView
from aiopgalloc.host.cgroup import current_memory_cgroup
from aiopgalloc.stats import PageRun

REPO = Path(__file__).resolve().parent.parent
MEMCG = current_memory_cgroup()
CAN_MAKE_CGROUP = os.geteuid() == 0 and MEMCG is not None and os.access(MEMCG.path, os.W_OK)
P = PAGE_SIZE


def _own_cgroup(pid: int) -> Path | None:
    """Where the demo with this pid makes its cgroup (``aiopgalloc-demo-<pid>``
    under this process's memory cgroup, which the demo inherits)."""
    return None if MEMCG is None else MEMCG.path / f"aiopgalloc-demo-{pid}"


_MADE = re.compile(r"Made memory cgroup (\S+) \(cgroup v.*? sparse file (\S+?);")


def _made(out: str) -> tuple[Path, Path] | None:
    """The cgroup and the temporary directory the demo says it made."""
    m = _MADE.search(_flat(out))
    return None if m is None else (Path(m.group(1)), Path(m.group(2)).parent)


def _check_own_cleanup(pid: int, out: str) -> None:
    """Whatever this demo run made is gone (and nothing else is looked at)."""
    own = _own_cgroup(pid)
    made = _made(out)
    if made is not None:
        cgroup, tmpdir = made
        assert cgroup == own, f"the demo made {cgroup}, not {own}"
        assert tmpdir.name.startswith("aiopgalloc-demo-"), tmpdir
        assert not tmpdir.exists(), f"the temporary directory {tmpdir} was left behind"
    assert own is None or not own.exists(), f"the cgroup {own} was left behind"


@pytest.fixture
def foreign_demo() -> Iterator[None]:
    """Another demo on the same machine: shortly after the test starts, a
    cgroup ``aiopgalloc-demo-<pid of a live process>`` (which no demo's
    sweep removes) and an ``aiopgalloc-demo-*`` temporary directory appear,
    and stay until the test is over."""
    sleeper = subprocess.Popen(["sleep", "300"])
    made: list[Path] = []

    def appear() -> None:
        tmp = Path(tempfile.mkdtemp(prefix="aiopgalloc-demo-", dir=tempfile.gettempdir()))
        made.append(tmp)
        if CAN_MAKE_CGROUP:
            assert MEMCG is not None
            cgroup = MEMCG.path / f"aiopgalloc-demo-{sleeper.pid}"
            cgroup.mkdir()
            made.append(cgroup)

    timer = threading.Timer(0.3, appear)
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        timer.join()
        for path in reversed(made):
            with contextlib.suppress(OSError):
                path.rmdir()
        sleeper.kill()
        sleeper.wait()


def _run_demo(
    *args: str, cmd: tuple[str, ...] = (), cwd: Path = REPO, timeout: float = 90
) -> tuple[int, subprocess.CompletedProcess[str]]:
    """Run ``python -m aiopgalloc demo ...`` (after ``cmd``, which must exec
    it, as ``setpriv`` does); returns the demo's pid and the result."""
    argv = [*cmd, sys.executable, "-m", "aiopgalloc", "demo", *args]
    proc = subprocess.Popen(
        argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.pid, subprocess.CompletedProcess(argv, proc.returncode, out, err)


def _run(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aiopgalloc", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _flat(text: str) -> str:
    """``text`` with every run of whitespace made one space (lines wrap)."""
    return " ".join(text.split())


def _check_summary(out: str) -> None:
    out = _flat(out)
    assert "What happened" in out, out
    assert "every freed page went back to the kernel" in out, out
    assert "Every one of the" in out and "read back exactly the bytes" in out, out


# ---------------------------------------------------------------------------- demo


def test_demo_plain_makes_real_pressure_where_it_can(foreign_demo: None) -> None:
    pid, res = _run_demo("--seconds", "2", "--plain")
    assert res.returncode == 0, res.stdout + res.stderr
    _check_summary(res.stdout)
    out = _flat(res.stdout)
    if CAN_MAKE_CGROUP:
        assert "Real pressure: this process runs inside memory cgroup" in out
        assert "Cleaned up: removed the cgroup" in out
        assert "the allocator received" in out
        assert _made(res.stdout) is not None, "the demo did not say what it made"
    else:
        assert "Simulated pressure" in out
    _check_own_cleanup(pid, res.stdout)


@pytest.mark.parametrize("backend", ["asyncio", "uvloop", "trio"])
def test_demo_no_cgroup_on_each_backend(backend: str, foreign_demo: None) -> None:
    pid, res = _run_demo("--seconds", "2", "--plain", "--no-cgroup", "--backend", backend)
    assert res.returncode == 0, res.stdout + res.stderr
    _check_summary(res.stdout)
    out = _flat(res.stdout)
    assert f"aiopgalloc demo on {backend}" in out
    assert "Simulated pressure: --no-cgroup was given" in out
    assert "received 3 notifications (low 1, medium 1, critical 1)" in out
    assert _made(res.stdout) is None
    _check_own_cleanup(pid, res.stdout)


def test_demo_plain_when_stdout_is_not_a_terminal() -> None:
    res = _run("demo", "--seconds", "1", "--no-cgroup")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "plain output: stdout is not a terminal" in _flat(res.stdout).lower()
    _check_summary(res.stdout)


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root, setpriv")
def test_demo_without_root_says_so_and_simulates(foreign_demo: None) -> None:
    """As an unprivileged user no cgroup can be made: the demo says why
    and drives the pressure through ManualPressure."""
    cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    probe = subprocess.run([*cmd, sys.executable, "-c", "import aiopgalloc"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"user 65534 cannot run this interpreter: {probe.stderr[-200:]!r}")
    pid, res = _run_demo("--seconds", "1", "--plain", cmd=tuple(cmd), cwd=Path("/"), timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    out = _flat(res.stdout)
    assert "Simulated pressure: no memory cgroup could be made under" in out
    assert "permission denied" in out
    _check_summary(res.stdout)
    _check_own_cleanup(pid, res.stdout)


def test_demo_rejects_bad_options() -> None:
    res = _run("demo", "--seconds", "0.5")
    assert res.returncode == 2 and "--seconds must be between 1 and 50" in res.stderr
    res = _run("demo", "--backend", "curio")
    assert res.returncode == 2 and "invalid choice" in res.stderr


def test_demo_live_view_in_a_terminal() -> None:
    """In a pseudo-terminal the live view (rich) is drawn, or, without rich,
    the plain view says why."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "aiopgalloc", "demo", "--seconds", "2", "--no-cgroup"],
        cwd=REPO,
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env={**os.environ, "COLUMNS": "100", "LINES": "50", "TERM": "xterm-256color"},
    )
    os.close(slave)
    chunks = []
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the other side is closed
                    break
                if not data:
                    break
                chunks.append(data)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    out = _flat(b"".join(chunks).decode(errors="replace"))
    assert "What happened" in out
    try:
        import rich  # noqa: F401
    except ImportError:
        assert "rich is not installed" in out
    else:
        assert "file map" in out and "╭" in out  # panels drawn


def _wait_for(proc: subprocess.Popen[str], text: str, timeout: float) -> str:
    """Read the process's stdout until ``text`` appears; returns what was read."""
    assert proc.stdout is not None
    seen = ""
    deadline = time.monotonic() + timeout
    while text not in seen:
        assert time.monotonic() < deadline, f"{text!r} not seen in time:\n{seen}"
        line = proc.stdout.readline()
        assert line, f"the demo ended before {text!r}:\n{seen}"
        seen += line
    return seen


@pytest.mark.skipif(not CAN_MAKE_CGROUP, reason="needs root and a writable memory cgroup")
@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_demo_cleans_up_when_interrupted(how: str, foreign_demo: None) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "aiopgalloc", "demo", "--seconds", "6", "--plain"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a terminal job
    )
    try:
        seen = _wait_for(proc, "phase 3/5: pressure", timeout=30)
        own = _own_cgroup(proc.pid)
        assert own is not None and own.is_dir(), "the demo made no cgroup"
        made = _made(seen)
        assert made is not None and made[0] == own and made[1].is_dir(), seen
        if how == "ctrl-c":
            os.killpg(proc.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
        else:
            proc.send_signal(signal.SIGTERM)  # to the parent alone
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == (130 if how == "ctrl-c" else 143), out + err
    assert "Cleaned up: removed the cgroup" in _flat(out), out + err
    assert "Traceback" not in err, err
    _check_own_cleanup(proc.pid, seen + out)


# ---------------------------------------------------------------------------- info


def test_info() -> None:
    res = _run("info", timeout=30)
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    for text in (
        f"page size                 {PAGE_SIZE} bytes",
        "huge page size (PMD)",
        "Transparent huge pages",
        "Cgroups",
        "version ",
        "Pressure sources: what use_host_memcg_pressure=True picks",
        "Each source tried on its own",
        "cgroup v1 memory.pressure_level: ",
        "cgroup v2 memory.pressure (PSI): ",
        "host-wide /proc/pressure/memory (PSI): ",
        "ManualPressure: OK",
    ):
        assert text in out, f"{text!r} missing:\n{out}"
    assert "=> " in out


def test_info_when_systemd_disables_pressure() -> None:
    res = subprocess.run(
        [sys.executable, "-m", "aiopgalloc", "info"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "MEMORY_PRESSURE_WATCH": "/dev/null"},
    )
    assert res.returncode == 0, res.stderr
    assert "disabled by the service manager" in res.stdout
    verdict = next(line for line in res.stdout.splitlines() if "=> " in line)
    assert "=> none: host memory pressure is off" in verdict
    assert "MEMORY_PRESSURE_WATCH=/dev/null: turned off by systemd" in verdict
    assert "opens the file without it" in verdict and "would fail" not in verdict


def test_info_json_is_the_same_facts_as_the_text() -> None:
    res = _run("info", "--json", timeout=30)
    assert res.returncode == 0, res.stderr
    facts = json.loads(res.stdout)
    assert set(facts) == {"aiopgalloc", "build", "pages", "thp", "cgroups", "pressure"}
    assert facts["aiopgalloc"] == aiopgalloc.__version__
    build = facts["build"]
    assert build["compiled"] is aiopgalloc.COMPILED
    assert build["build"] in (None, "compiled", "pure")
    assert build["modules"] and build["pure_env"] in (True, False)
    assert facts["pages"]["page_size"] == PAGE_SIZE
    assert facts["pages"]["huge_page_size"] == HUGE_PAGE_SIZE
    assert facts["cgroups"]["layout"] in (None, "v1", "v2", "hybrid")
    pressure = facts["pressure"]
    labels = [c["label"] for c in pressure["each"]]
    assert labels[-1] == "ManualPressure" and pressure["each"][-1]["ok"] is True
    assert "cgroup v1 memory.pressure_level" in labels
    assert all(isinstance(c["ok"], bool) and c["detail"] for c in pressure["each"])
    assert pressure["report"] and pressure["verdict"]
    assert (pressure["chosen"] is None) == pressure["verdict"].startswith("none")
    # The text is rendered from the same document.
    text = info_cli.render(facts)
    core = "compiled (" if build["compiled"] else "pure Python ("
    assert f"core                      {core}" in text
    assert f"page size                 {PAGE_SIZE} bytes" in text
    assert f"  => {pressure['verdict']}" in text


def test_info_json_when_systemd_disables_pressure() -> None:
    res = subprocess.run(
        [sys.executable, "-m", "aiopgalloc", "info", "--json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "MEMORY_PRESSURE_WATCH": "/dev/null"},
    )
    assert res.returncode == 0, res.stderr
    pressure = json.loads(res.stdout)["pressure"]
    assert pressure["chosen"] is None
    assert pressure["off"] == "MEMORY_PRESSURE_WATCH=/dev/null: turned off by systemd"


# --------------------------------------------------------- version, usage


def test_version() -> None:
    for flag in ("--version", "-V"):
        res = _run(flag, timeout=30)
        assert res.returncode == 0, res.stderr
        assert res.stdout == f"aiopgalloc {aiopgalloc.__version__}\n"


def test_usage() -> None:
    res = _run("--help", timeout=30)
    assert res.returncode == 0
    assert "usage: python -m aiopgalloc {demo,info,bench}" in res.stdout
    assert "--version" in res.stdout
    res = _run(timeout=30)
    assert res.returncode == 2 and "usage:" in res.stderr and not res.stdout
    res = _run("frobnicate", timeout=30)
    assert res.returncode == 2 and "unknown command 'frobnicate'" in res.stderr


# ---------------------------------------------------------------------------- bench


@pytest.mark.parametrize(
    ("flag", "where", "says"),
    [
        ("--json", "missing/dir/x.json", "does not exist"),
        ("--png", "missing/x.png", "does not exist"),
        ("--json", "file.txt/x.json", "is not a directory"),
        ("--json", ".", "is a directory"),
    ],
)
def test_bench_refuses_an_output_path_it_cannot_write_before_running(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str, where: str, says: str
) -> None:
    """The defect: ``--json /nonexistent/dir/x.json`` silently made the
    directory tree (after the whole run).  Now exit status 2 and a message,
    before anything runs (nothing printed on stdout, no directory made)."""
    (tmp_path / "file.txt").write_text("not a directory")
    target = tmp_path / where
    argv = [flag, str(target), "--smoke", "--workloads", "6", "--backend", "asyncio"]
    argv += ["--no-progress"]
    if flag == "--png":
        argv += ["--json", str(tmp_path / "ok.json")]
    with pytest.raises(SystemExit) as info:
        bench.main(argv)
    out, err = capsys.readouterr()
    assert info.value.code == 2
    assert f"{flag} {target}" in err and says in err, err
    assert out == "", "the benchmark started"
    assert not (tmp_path / "missing").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


def test_bench_refuses_a_missing_directory_from_the_command_line(tmp_path: Path) -> None:
    res = _run("bench", "--json", str(tmp_path / "no" / "such" / "x.json"), timeout=60)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "the directory" in res.stderr and "does not exist" in res.stderr
    assert res.stdout == ""
    assert not (tmp_path / "no").exists()


# -------------------------------------------------------------------- pure parts


@pytest.mark.anyio
async def test_file_map_reads_the_real_page_map_of_a_memory_file() -> None:
    """The map agrees with ``mf.page_map()`` as the allocator reports it:
    live pages per kind, freed pages, and pages released since."""
    async with open_memory_file() as mf:
        a = mf.allocate(4 * P, MemoryKind.PAGE_CACHE)
        b = mf.allocate(2 * P, MemoryKind.ANONYMOUS)
        c = mf.allocate(2 * P, MemoryKind.PAGE_CACHE)
        segs = demo_map.segment_states(mf.page_map())
        live = {(s, e): st for s, e, st in segs}
        assert live[(a.start, a.end)] == demo_map.LIVE_BASE + MemoryKind.PAGE_CACHE
        assert live[(b.start, b.end)] == demo_map.LIVE_BASE + MemoryKind.ANONYMOUS
        fm = demo_map.FileMap()
        cells = fm.update(mf.page_map(), 16 * P, 16)
        assert cells.cell_size == P
        assert cells.states[:8] == bytes(
            [demo_map.LIVE_BASE + MemoryKind.PAGE_CACHE] * 4
            + [demo_map.LIVE_BASE + MemoryKind.ANONYMOUS] * 2
            + [demo_map.LIVE_BASE + MemoryKind.PAGE_CACHE] * 2
        )
        assert cells.states[8:] == bytes([demo_map.NEVER_USED]) * 8
        mf.dec_ref(b)
        runs = mf.page_map()
        if any(r.state != "live" for r in runs):  # the releaser may be quicker
            assert fm.update(runs, 16 * P, 16).states[4:6] == bytes([demo_map.FREED]) * 2
        await mf.wait_for_reclaim()
        assert fm.update(mf.page_map(), 16 * P, 16).states[4:6] == bytes([demo_map.RELEASED]) * 2
        mf.dec_ref(a)
        mf.dec_ref(c)


def test_segment_states_of_each_run_state() -> None:
    runs = [
        PageRun(0, 0x2000, "live", MemoryKind.PAGE_CACHE, 1, True),
        PageRun(0x2000, 0x3000, "freed", MemoryKind.SYSTEM, 0, False),
        PageRun(0x3000, 0x4000, "releasing", MemoryKind.SYSTEM, 0, False),
    ]
    assert demo_map.segment_states(runs) == [
        (0, 0x2000, demo_map.LIVE_BASE + MemoryKind.PAGE_CACHE),
        (0x2000, 0x3000, demo_map.FREED),
        (0x3000, 0x4000, demo_map.FREED),
    ]
    assert demo_map.segment_states([]) == []


def _facts(**over: Any) -> RunFacts:
    """Made-up figures of a run with simulated pressure (``over`` replaces
    fields; ``stats_over`` replaces fields of its FileStats)."""
    ev = EvictionStats(
        users=0, evictable_bytes=0, outstanding=0, started=3, finished=3, evict_calls=40,
        evicted_bytes=30 << 20, failed=0, pressure_events=3, max_pressure_level=3,
    )  # fmt: skip
    stats = FileStats(
        usage=MemoryStats(), file_size=64 << 20, committed_bytes=0, known_committed_bytes=0,
        live_bytes=0, freed_bytes=0, releasing_bytes=0, release_backlog=0, segments=0,
        largest_free_gap=64 << 20, releases=20, bytes_released=90 << 20,
        recycled_bytes=5 << 20, allocations=900, evictions=ev, pressure_low=1,
        pressure_medium=1, pressure_critical=1,
    )  # fmt: skip
    stats = dataclasses.replace(stats, **over.pop("stats_over", {}))
    base: dict[str, Any] = dict(
        backend="trio", seconds=2.0, real=False, manual_reason="--no-cgroup was given",
        cgroup=None, cgroup_version=None, limit=None, source="ManualPressure",
        reader_bytes=0, reader_passes=0, reader_seconds=0.0, reader_room=None, clients=4,
        requests=1000, hits=800, verified=800, mismatches=0, peak_bytes=48 << 20,
        peak_entries=1400, peak_committed=52 << 20, peak_file=64 << 20, lru_dropped=10,
        lru_dropped_bytes=1 << 20, stats=stats, evicted_entries=900, evicted_bytes=30 << 20,
        first_wave=(12 << 20, 0.003, 0.04), session_table=4 << 20, recovery_peak=40 << 20,
    )  # fmt: skip
    base.update(over)
    return RunFacts(**base)


def test_summary_explains_the_run() -> None:
    facts = _facts()
    text = " ".join(summarize(facts))
    assert "4 clients made 1,000 requests to the cache on trio" in text
    assert "Simulated pressure" not in text and "simulated: --no-cgroup was given" in text
    assert "received 3 notifications (low 1, medium 1, critical 1)" in text
    assert (
        "came 40 ms after the pressure began; within 3 ms of it the cache had given back 12.0 MiB"
        in text
    )
    assert "every freed page went back to the kernel" in text
    assert facts.ok


def test_summary_of_real_pressure() -> None:
    facts = _facts(
        real=True, cgroup="/sys/fs/cgroup/memory/x/aiopgalloc-demo-1", cgroup_version=1,
        limit=128 << 20, source="cgroup v1 memory.pressure_level", reader_bytes=512 << 20,
        reader_passes=3, reader_seconds=0.6, reader_room=60 << 20,
        cgroup_figures={"limit_hits": 900, "oom_kills": 0},
    )  # fmt: skip
    text = " ".join(summarize(facts))
    assert "this process ran inside memory cgroup /sys/fs/cgroup/memory/x/aiopgalloc-demo-1" in text
    assert "streamed 512.0 MiB (a sparse file, so no disk I/O) through the page cache" in text
    assert "The cgroup hit its limit 900 times" in text
    assert "after the reader started (it first had to fill the 60.0 MiB still free" in text
    assert "No process was OOM-killed" in text


def test_summary_says_when_something_is_wrong() -> None:
    facts = _facts(mismatches=2, stats_over={"committed_bytes": 8192})
    text = " ".join(summarize(facts))
    assert "2 of 802 hits read back WRONG bytes" in text
    assert "8 KiB were still committed" in text
    assert not facts.ok


def test_rich_view_draws_a_frame() -> None:
    pytest.importorskip("rich")
    view = RichView()
    view._console = view._rich.console.Console(
        file=io.StringIO(), width=100, height=50, force_terminal=True
    )
    facts = _facts()
    cells = demo_map.CellMap(bytes([5, 5, 4, 2, 1, 0] * 40), 256 << 10, 60 << 20)
    frame = Frame(
        t=1.0, phase=3, phase_name="pressure", phase_text="the kernel signals",
        stats=facts.stats, cells=cells, cache_entries=10, cache_bytes=1 << 20,
        cache_budget=48 << 20, hit_ratio=0.8, verified=5, lru_dropped=1, ops_per_s=1000.0,
        cgroup_usage=100 << 20, cgroup_limit=128 << 20, pressure_source="ManualPressure",
    )  # fmt: skip
    view.start(Header("asyncio", 2.0, ("line one",), 5))
    view.event(0.5, "something happened", "in detail")
    view.frame(frame)
    view.finish(frame, ["all went well"])
    out = view._console.file.getvalue()
    for text in ("PRESSURE", "file map", "cgroup", "something happened", "What happened"):
        assert text in out, text
