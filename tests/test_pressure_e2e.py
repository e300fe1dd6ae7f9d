"""Real memory pressure, end to end: kernel -> pressure source -> watcher ->
eviction -> memory given back.  No mocks.

1. cgroup v1 (or v2 where it has the memory controller): a child memory
   cgroup limited to 64 MiB holds a service (tests/pressure_child.py) that
   opens a memory file with ``use_host_memcg_pressure=True`` and keeps 16 MiB
   of evictable cache.  A reader in the same cgroup streams a file of 384 MiB
   through the page cache; reclaim makes the kernel signal
   ``memory.pressure_level``, the child's caches are evicted, and the child
   exits 0 (not OOM-killed).  Once per anyio backend, chosen by an argument
   of the child.

2. PSI: a memory file in this process with ``pressure_source=PsiTrigger(...)``
   on a real trigger file: the trigger's fd exists while the file is open and
   is gone after.  Then a real stall: a reader limited by a v1 memory cgroup
   is also put into a fresh v2 cgroup, whose ``memory.pressure`` carries the
   trigger; the stall fires it (about 2 s later: 2 s is the shortest window
   the kernel allows here without CAP_SYS_RESOURCE) and the cache is evicted.

The file read is sparse (a hole of 384 MiB): reading a hole on a disk file
system still fills the page cache (pages of zeros, charged to the reader's
cgroup) without any disk I/O, which keeps this fast.  Where the temporary
directory is on tmpfs that does not hold, and the tests are skipped.
Skipped too, with the reason printed, where cgroups cannot be written (not
root) or no memory controller is found.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from helpers import open_fds

from aiopgalloc import (
    PAGE_SIZE,
    DelayedEviction,
    EvictableRange,
    FileRange,
    MemoryFile,
    MemoryFileOpts,
    MemoryKind,
    open_memory_file,
)
from aiopgalloc.host.cgroup import (
    create_child_memcg,
    current_memory_cgroup,
    remove_child,
    unified_cgroup_dir,
)
from aiopgalloc.host.pressure import PressureLevel, PsiTrigger

CHILD = Path(__file__).resolve().parent / "pressure_child.py"
REPO = CHILD.parent.parent
MEMCG = current_memory_cgroup()
UNIFIED = unified_cgroup_dir()
IS_ROOT = os.geteuid() == 0
HOST_PSI = Path("/proc/pressure/memory")
LIMIT = 64 << 20
BIG = 384 << 20
HOLD_MIB = 16
P = PAGE_SIZE


def _cgroup_skip_reason() -> str | None:
    if not IS_ROOT:
        return "needs root to create and join memory cgroups"
    if MEMCG is None:
        return "no memory controller: neither a cgroup v1 memory hierarchy nor cgroup v2 memory"
    return None


def _skip(reason: str) -> None:
    print(f"\nSKIP: {reason}")  # shown with -s; pytest -ra lists the reason too
    pytest.skip(reason)


def _fs_type(path: Path) -> str:
    """The file system type of the mount holding ``path`` (mountinfo)."""
    best, fstype = "", "?"
    target = str(path.resolve())
    with open("/proc/self/mountinfo") as f:
        for line in f:
            head, _, tail = line.partition(" - ")
            mount_point = head.split()[4]
            inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
            if inside and len(mount_point) >= len(best):
                best, fstype = mount_point, tail.split()[0]
    return fstype


def _drop_from_page_cache(path: Path) -> None:
    # Pages cached by an earlier reader stay charged to that reader's cgroup
    # (or its parent, once removed): a new reader must fault them in again.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@pytest.fixture(scope="module")
def big_file(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A sparse file bigger than the cgroup limit, on a disk file system."""
    folder = tmp_path_factory.mktemp("pressure-e2e")
    fstype = _fs_type(folder)
    if fstype in ("tmpfs", "ramfs"):
        _skip(f"{folder} is on {fstype}: reading a hole there charges no page cache")
    path = folder / "big.bin"
    with open(path, "wb") as f:
        f.truncate(BIG)
    yield path
    path.unlink()


def _kill_members(path: Path) -> None:
    procs = path / "cgroup.procs"
    for _ in range(50):
        try:
            pids = [int(p) for p in procs.read_text().split()]
        except OSError:
            return
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.02)


def _remove_cgroup(path: Path) -> None:
    """Remove ``path`` whatever happened: kill what is left inside, retry
    while the last exits are being reaped; raise if it stays."""
    if not path.exists():
        return
    _kill_members(path)
    deadline = time.monotonic() + 5
    while True:
        try:
            remove_child(path)
            return
        except FileNotFoundError:
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


@pytest.fixture
def limited_cgroup() -> Iterator[Path]:
    """A child memory cgroup of this process's, limited to LIMIT bytes;
    removed afterwards even when the test fails (the teardown errors if it
    cannot be)."""
    reason = _cgroup_skip_reason()
    if reason:
        _skip(reason)
    assert MEMCG is not None
    name = f"aiopgalloc_e2e{os.getpid()}_{time.monotonic_ns()}"
    try:
        path = create_child_memcg(MEMCG, name, LIMIT)
    except OSError as exc:
        _skip(f"cannot create a limited memory cgroup under {MEMCG.path}: {exc}")
    try:
        yield path
    finally:
        _remove_cgroup(path)
        assert not path.exists(), f"cgroup {path} was not removed"


@pytest.fixture
def v2_cgroup() -> Iterator[Path]:
    """A fresh cgroup v2 directory (for PSI; no memory controller needed)."""
    if not IS_ROOT:
        _skip("needs root to create cgroups")
    if UNIFIED is None or not (UNIFIED / "memory.pressure").exists():
        _skip("no cgroup2 mount with PSI (memory.pressure)")
    assert UNIFIED is not None
    path = UNIFIED / f"aiopgalloc_e2e{os.getpid()}_{time.monotonic_ns()}"
    try:
        path.mkdir()
    except OSError as exc:
        _skip(f"cannot create a cgroup under {UNIFIED}: {exc}")
    try:
        yield path
    finally:
        _remove_cgroup(path)
        assert not path.exists(), f"cgroup {path} was not removed"


class LineReader:
    """Reads JSON lines from a child's stdout with a deadline on each."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        self.proc = proc
        self.fd = proc.stdout.fileno()
        self.buf = b""

    def next(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no line from the child within {timeout} s")
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                chunk = os.read(self.fd, 65536)
                if not chunk:
                    raise EOFError(f"child ended (status {self.proc.poll()}) without a line")
                self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        doc: dict[str, Any] = json.loads(line)
        return doc


@contextlib.contextmanager
def _kernel_event_counter(path: Path) -> Iterator[list[int]]:
    """Count the v1 ``memory.pressure_level`` events (level low and above)
    of the cgroup at ``path`` with a registration of our own, made with
    plain system calls: an observer independent of the library.  The list
    holds the count once the block ends (empty on v2)."""
    counted: list[int] = []
    if not (path / "memory.pressure_level").exists():
        yield counted
        return
    efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    try:
        level_fd = os.open(path / "memory.pressure_level", os.O_RDONLY | os.O_CLOEXEC)
        try:
            control = os.open(path / "cgroup.event_control", os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.write(control, f"{efd} {level_fd} low".encode())
            finally:
                os.close(control)
        finally:
            os.close(level_fd)
        yield counted
        try:
            counted.append(os.eventfd_read(efd))
        except BlockingIOError:
            counted.append(0)
    finally:
        os.close(efd)


def _memcg_figures(path: Path) -> dict[str, Any]:
    """What the kernel says about the cgroup: limit hits and OOM kills."""
    out: dict[str, Any] = {}
    for name in ("memory.failcnt", "memory.max_usage_in_bytes"):
        with contextlib.suppress(OSError, ValueError):
            out[name] = int((path / name).read_text())
    with contextlib.suppress(OSError):
        for line in (path / "memory.oom_control").read_text().splitlines():
            key, _, value = line.partition(" ")
            out[f"oom_control.{key}"] = int(value)
    with contextlib.suppress(OSError):  # v2
        for line in (path / "memory.events").read_text().splitlines():
            key, _, value = line.partition(" ")
            out[f"events.{key}"] = int(value)
    return out


# -- 1. a service in a limited cgroup, real kernel pressure --------------------------


@pytest.mark.parametrize("backend", ["asyncio", "asyncio+uvloop", "trio"])
def test_real_pressure_evicts_the_cache_of_a_limited_service(
    backend: str, limited_cgroup: Path, big_file: Path
) -> None:
    assert MEMCG is not None
    v1 = MEMCG.version == 1
    # v2 chooses PSI on the cgroup's memory.pressure: 2 s windows, slower.
    wait = 10.0 if v1 else 20.0
    proc = subprocess.Popen(
        [
            sys.executable,
            str(CHILD),
            "--cgroup",
            str(limited_cgroup),
            "--backend",
            backend,
            "--hold-mib",
            str(HOLD_MIB),
            "--timeout",
            str(wait),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO,
    )
    lines = LineReader(proc)
    try:
        ready = lines.next(timeout=20)
        assert ready.get("ready"), ready
        members = (limited_cgroup / "cgroup.procs").read_text().split()
        assert str(proc.pid) in members
        _drop_from_page_cache(big_file)
        with _kernel_event_counter(limited_cgroup) as kernel_events:
            t0 = time.monotonic()
            reader = subprocess.run(
                ["sh", "-c", f"echo $$ > {limited_cgroup}/cgroup.procs && exec cat {big_file}"],
                stdout=subprocess.DEVNULL,
                timeout=30,
                check=True,
            )
            read_took = time.monotonic() - t0
            done = lines.next(timeout=wait + 10)
        status = proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        stderr = proc.stderr.read().decode(errors="replace")
        proc.stderr.close()
        assert proc.stdout is not None
        proc.stdout.close()
    figures = _memcg_figures(limited_cgroup)
    assert reader.returncode == 0
    assert "error" not in done, done.get("traceback", done)
    assert status == 0, f"child ended with status {status}: {stderr}"
    first = done["first_evict_at"]
    print(
        f"\n[{backend}] held {done['held_bytes'] >> 20} MiB; read {BIG >> 20} MiB in "
        f"{read_took:.2f} s; kernel events {kernel_events}; "
        f"{done['pressure_events']} pressure deliveries (max level "
        f"{done['max_pressure_level']}), {done['evict_calls']} evict calls, "
        f"{done['evicted_bytes'] >> 20} MiB evicted; first evict "
        f"{(first - t0) * 1000 if first else float('nan'):.0f} ms after the read began; "
        f"cgroup {figures}"
    )
    chosen = [line for line in done["log"] if ": chosen (" in line]
    assert len(chosen) == 1, done["log"]
    if v1:
        assert "cgroup v1 memory.pressure_level: chosen" in chosen[0]
        assert str(limited_cgroup) in chosen[0]  # the cgroup it moved into
    assert done["cgroup"] == str(limited_cgroup)
    assert done["held_bytes"] >= HOLD_MIB << 20
    assert done["pressure_events"] >= 1
    assert done["max_pressure_level"] >= PressureLevel.LOW
    assert done["entries_left"] == 0
    assert done["evicted_bytes"] >= HOLD_MIB << 20
    assert done["committed_after"] == 0
    assert first is not None and first >= t0
    # Not killed, and the kernel agrees: the limit was hit (reclaim ran) but
    # nothing was OOM-killed.
    assert figures.get("oom_control.oom_kill", 0) == 0
    assert figures.get("events.oom_kill", 0) == 0
    if v1:
        assert figures["memory.failcnt"] > 0
        # The kernel spoke at least as often as the child acted on it (the
        # source coalesces; our own registration counts every event).
        assert kernel_events[0] >= done["pressure_events"]


# -- 2. PSI triggers -----------------------------------------------------------------


class Cache:
    """An evictable user holding ``slots`` one-page entries."""

    def __init__(self, mf: MemoryFile, slots: int) -> None:
        self.mf = mf
        self.entries: dict[int, FileRange] = {}
        self.first_call: float | None = None
        for slot in range(slots):
            fr = mf.allocate(P, MemoryKind.PAGE_CACHE)
            for view in mf.map_internal(fr):
                view[:] = b"\x5a" * len(view)
                view.release()
            self.entries[slot] = fr
            mf.mark_evictable(self, EvictableRange(slot * P, (slot + 1) * P))

    async def evict(self, er: EvictableRange) -> None:
        if self.first_call is None:
            self.first_call = time.monotonic()
        for slot in range(er.start // P, er.end // P):
            fr = self.entries.pop(slot, None)
            if fr is not None:
                self.mf.dec_ref(fr)


def _fds_on(path: Path) -> list[int]:
    found = []
    for fd in open_fds():
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{fd}") == str(path):
                found.append(fd)
    return found


def _psi_opts(source: PsiTrigger) -> MemoryFileOpts:
    return MemoryFileOpts(
        delayed_eviction=DelayedEviction.ENABLED,
        use_host_memcg_pressure=True,
        pressure_source=source,
    )


@pytest.mark.anyio
@pytest.mark.parametrize("where", ["cgroup", "host"])
async def test_psi_trigger_is_registered_while_open_and_removed_on_close(
    where: str, request: pytest.FixtureRequest
) -> None:
    if where == "cgroup":
        path = request.getfixturevalue("v2_cgroup") / "memory.pressure"
    else:
        path = HOST_PSI
    if not path.exists():
        _skip(f"{path} does not exist (kernel without PSI)")
    source = PsiTrigger(path, "some", 150_000, 2_000_000)
    before = open_fds()
    assert _fds_on(path) == []
    async with open_memory_file(opts=_psi_opts(source)) as mf:
        assert source.is_open
        (fd,) = _fds_on(path)  # the trigger lives as long as this fd
        # One trigger per fd: the kernel refuses a second write on it.
        with pytest.raises(OSError) as info:
            os.write(fd, source.trigger)
        assert info.value.errno == 16  # EBUSY: a trigger is armed on it
        cache = Cache(mf, 8)
        assert mf.should_cache_evictable()
        assert len(cache.entries) == 8
    assert not source.is_open
    assert _fds_on(path) == []
    assert open_fds() == before


@pytest.mark.anyio
async def test_a_real_psi_stall_evicts_the_cache(
    big_file: Path, limited_cgroup: Path, v2_cgroup: Path
) -> None:
    assert MEMCG is not None
    if MEMCG.version != 1:
        _skip("the stall is made with a v1 memory limit; this host's memory cgroup is v2")
    source = PsiTrigger(v2_cgroup / "memory.pressure", "some", 1_000, 2_000_000)
    async with open_memory_file(opts=_psi_opts(source)) as mf:
        cache = Cache(mf, 64)
        t0 = time.monotonic()
        script = (
            f"echo $$ > {limited_cgroup}/cgroup.procs && echo $$ > {v2_cgroup}/cgroup.procs"
            f" && exec cat {big_file} > /dev/null"
        )
        # Whether a read stalls long enough depends on the host's load: read
        # again (up to 4 times, each followed by a PSI window) until the
        # trigger fires.
        read_took = 0.0
        for _attempt in range(4):
            _drop_from_page_cache(big_file)
            r0 = time.monotonic()
            await anyio.run_process(["sh", "-c", script])
            read_took += time.monotonic() - r0
            with anyio.move_on_after(3):
                while cache.entries:
                    await anyio.sleep(0.01)
            if not cache.entries:
                break
        if cache.entries:
            total = (v2_cgroup / "memory.pressure").read_text().split()[4]
            if total == "total=0":
                _skip("the reads never stalled the cgroup (PSI recorded no stall): nothing to see")
            raise AssertionError(f"the cgroup stalled ({total} us) but no eviction followed")
        with anyio.fail_after(5):
            await mf.wait_for_evictions()
        stats = mf.stats().evictions
        stall = (v2_cgroup / "memory.pressure").read_text().split()
    first = cache.first_call
    assert first is not None
    print(
        f"\nPSI: read took {read_took:.2f} s, first evict {first - t0:.2f} s after it began; "
        f"{stats.pressure_events} deliveries; stall in the cgroup: {stall[4]} us"
    )
    assert stats.pressure_events >= 1
    assert stats.max_pressure_level == PressureLevel.LOW
    assert stats.evicted_bytes == 64 * P
