"""Tests for aiopgalloc.host.pressure and its fd plumbing (host.epoll).

Async tests run on asyncio, asyncio+uvloop and trio (see conftest.py).  The
ones marked ``needs_root_v1`` use the real cgroup v1 memory controller and
cgroup v2 PSI of this project's machines and are skipped elsewhere.
"""

from __future__ import annotations

import base64
import errno
import gc
import os
import socket
import struct
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import anyio
import pytest

from aiopgalloc.host import pressure
from aiopgalloc.host.cgroup import (
    CgroupInfo,
    create_child_memcg,
    current_memory_cgroup,
    remove_child,
    unified_cgroup_dir,
)
from aiopgalloc.host.epoll import EPOLLPRI, EpollWaiter, drain_eventfd, new_eventfd
from aiopgalloc.host.pressure import (
    CgroupV1Pressure,
    ManualPressure,
    MemoryEvents,
    NoPressureSourceError,
    PressureEvent,
    PressureLevel,
    PressureSource,
    PressureSourceGone,
    PsiTrigger,
    SystemdPressureWatch,
    choose_pressure_source,
    memory_events_delta,
    parse_flat_keyed,
    parse_systemd_environ,
)

HOST_PSI = Path("/proc/pressure/memory")
MEMCG = current_memory_cgroup()
UNIFIED = unified_cgroup_dir()
IS_ROOT = os.geteuid() == 0

needs_root_v1 = pytest.mark.skipif(
    MEMCG is None or MEMCG.version != 1 or not IS_ROOT,
    reason="needs root and the cgroup v1 memory controller",
)
needs_root_v2 = pytest.mark.skipif(
    UNIFIED is None or not IS_ROOT or not (UNIFIED / "memory.pressure").exists(),
    reason="needs root and a cgroup2 mount with PSI",
)
needs_host_psi = pytest.mark.skipif(not HOST_PSI.exists(), reason="kernel without PSI")


def open_fds() -> set[int]:
    gc.collect()  # see helpers.open_fds: stale mmaps close their dup fds on collection
    return {int(name) for name in os.listdir("/proc/self/fd")}


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as server:
        a = socket.create_connection(server.getsockname())
        b, _ = server.accept()
    return a, b


async def next_event(source: AsyncIterator[PressureEvent], timeout: float = 5.0) -> PressureEvent:
    with anyio.fail_after(timeout):
        return await source.__anext__()


async def no_event(source: AsyncIterator[PressureEvent], wait: float = 0.2) -> None:
    with anyio.move_on_after(wait):
        ev = await source.__anext__()
        pytest.fail(f"unexpected event {ev}")


@pytest.fixture
def v1_child() -> Iterator[Path]:
    assert MEMCG is not None
    path = create_child_memcg(MEMCG, f"aiopgalloc_t{os.getpid()}_{time.monotonic_ns()}", 32 << 20)
    yield path
    if path.exists():
        remove_child(path)


@pytest.fixture
def v2_child() -> Iterator[Path]:
    assert UNIFIED is not None
    path = UNIFIED / f"aiopgalloc_t{os.getpid()}_{time.monotonic_ns()}"
    path.mkdir()
    yield path
    if path.exists():
        remove_child(path)


@pytest.fixture(scope="module")
def big_file(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    # On the root file system (not tmpfs), so reading it fills the page cache.
    path = tmp_path_factory.mktemp("pressure") / "big.bin"
    chunk = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for _ in range(256):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    yield path
    path.unlink()  # 256 MiB: do not leave it to pytest's tmp rotation


def evict_from_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


# -- pure parsing ----------------------------------------------------------------

MEMORY_EVENTS = "low 0\nhigh 3\nmax 1\noom 0\noom_kill 0\noom_group_kill 0\n"


def test_parse_flat_keyed() -> None:
    assert parse_flat_keyed(MEMORY_EVENTS) == {
        "low": 0,
        "high": 3,
        "max": 1,
        "oom": 0,
        "oom_kill": 0,
        "oom_group_kill": 0,
    }
    assert parse_flat_keyed("bad\nx y\nhigh 2 3\nmax 7\n") == {"max": 7}


def test_memory_events_delta() -> None:
    old = parse_flat_keyed(MEMORY_EVENTS)
    assert memory_events_delta(old, old) == (None, 0)
    assert memory_events_delta(old, {**old, "low": 9, "oom_group_kill": 1}) == (None, 0)
    assert memory_events_delta(old, {**old, "high": 8}) == (PressureLevel.MEDIUM, 5)
    assert memory_events_delta(old, {**old, "high": 4, "max": 3}) == (PressureLevel.CRITICAL, 3)
    assert memory_events_delta(old, {**old, "oom": 1}) == (PressureLevel.CRITICAL, 1)
    assert memory_events_delta(old, {**old, "oom_kill": 2}) == (PressureLevel.CRITICAL, 1)
    assert memory_events_delta({}, {"high": 2}) == (PressureLevel.MEDIUM, 2)
    # A counter that went down (another file, a reset) is not an event.
    assert memory_events_delta(old, {**old, "high": 0}) == (None, 0)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_parse_systemd_environ() -> None:
    assert parse_systemd_environ({}) is None
    assert parse_systemd_environ({"MEMORY_PRESSURE_WATCH": "  "}) is None
    assert parse_systemd_environ({"MEMORY_PRESSURE_WATCH": "/dev/null"}) == ("/dev/null", None)
    env = {
        "MEMORY_PRESSURE_WATCH": "/sys/fs/cgroup/system.slice/x.service/memory.pressure",
        "MEMORY_PRESSURE_WRITE": b64(b"some 200000 2000000\0"),
    }
    assert parse_systemd_environ(env) == (env["MEMORY_PRESSURE_WATCH"], b"some 200000 2000000\0")
    assert parse_systemd_environ({**env, "MEMORY_PRESSURE_WRITE": ""}) == (
        env["MEMORY_PRESSURE_WATCH"],
        None,
    )
    with pytest.raises(ValueError, match="not valid base64"):
        parse_systemd_environ({**env, "MEMORY_PRESSURE_WRITE": "***"})


def test_systemd_from_environ() -> None:
    assert SystemdPressureWatch.from_environ({}) is None
    assert SystemdPressureWatch.from_environ({"MEMORY_PRESSURE_WATCH": "/dev/null"}) is None
    src = SystemdPressureWatch.from_environ(
        {"MEMORY_PRESSURE_WATCH": "/x/memory.pressure", "MEMORY_PRESSURE_WRITE": b64(b"hi")},
        level=PressureLevel.MEDIUM,
    )
    assert src is not None
    assert (src.path, src.write, src.level) == (
        Path("/x/memory.pressure"),
        b"hi",
        PressureLevel.MEDIUM,
    )


def test_constructor_validation() -> None:
    with pytest.raises(ValueError):
        CgroupV1Pressure(Path("/x"), level="high")
    with pytest.raises(ValueError):
        CgroupV1Pressure(Path("/x"), mode="sometimes")
    with pytest.raises(ValueError):
        PsiTrigger(HOST_PSI, kind="most")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        PsiTrigger(HOST_PSI, stall_us=0)
    with pytest.raises(ValueError):
        PsiTrigger(HOST_PSI, stall_us=3_000_000, window_us=2_000_000)
    with pytest.raises(ValueError):
        PsiTrigger(HOST_PSI, window_us=20_000_000)
    with pytest.raises(ValueError):
        ManualPressure(min_interval=-1)
    with pytest.raises(ValueError):
        ManualPressure(min_interval=float("nan"))
    assert PsiTrigger(HOST_PSI, "full", 100_000, 4_000_000).trigger == b"full 100000 4000000\0"


def test_sources_satisfy_the_protocol() -> None:
    for src in (
        ManualPressure(),
        PsiTrigger(HOST_PSI),
        CgroupV1Pressure(Path("/x")),
        MemoryEvents(Path("/x")),
        SystemdPressureWatch("/x"),
    ):
        assert isinstance(src, PressureSource)


# -- the epoll plumbing ----------------------------------------------------------


@pytest.mark.anyio
async def test_epoll_waiter_sees_pollpri_from_oob_data() -> None:
    # TCP urgent data raises POLLPRI, which no event loop watches: the
    # private epoll fd turns it into readability.
    a, b = tcp_pair()
    ep = EpollWaiter()
    try:
        ep.register(b.fileno(), EPOLLPRI)
        assert ep.poll() == []
        with anyio.move_on_after(0.1) as scope:
            await ep.wait()
        assert scope.cancelled_caught
        a.send(b"!", socket.MSG_OOB)
        with anyio.fail_after(5):
            await ep.wait()
        ((fd, events),) = ep.poll()
        assert fd == b.fileno() and events & EPOLLPRI
        assert b.recv(1, socket.MSG_OOB) == b"!"
        assert ep.poll() == []
    finally:
        ep.notify_closing()
        ep.close()
        a.close()
        b.close()
    assert ep.closed
    with pytest.raises(anyio.ClosedResourceError):
        ep.fileno()


def test_eventfd_helpers() -> None:
    fd = new_eventfd()
    try:
        assert drain_eventfd(fd) == 0
        os.eventfd_write(fd, 3)
        os.eventfd_write(fd, 4)
        assert drain_eventfd(fd) == 7
        assert drain_eventfd(fd) == 0
    finally:
        os.close(fd)


class OobPriority(PsiTrigger):
    """A PsiTrigger whose POLLPRI comes from a TCP socket's urgent data: the
    same waiter, coalescing and error handling as a real trigger."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(HOST_PSI, level=PressureLevel.MEDIUM, name="oob")
        self.sock = sock

    def _setup(self) -> int:
        self._ep = self._own_epoll()
        self._ep.register(self.sock.fileno(), EPOLLPRI)
        return self._ep.fileno()


@pytest.mark.anyio
async def test_pri_source_delivers_and_ends_on_error() -> None:
    a, b = tcp_pair()
    try:
        async with OobPriority(b) as src:
            await no_event(src, 0.1)
            a.send(b"x", socket.MSG_OOB)
            assert await next_event(src) == PressureEvent(PressureLevel.MEDIUM, "oob", 1)
            b.recv(1, socket.MSG_OOB)
            await no_event(src, 0.1)
            # A reset connection reports EPOLLERR|EPOLLHUP: the source is gone.
            a.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            a.close()
            with anyio.fail_after(5), pytest.raises(PressureSourceGone, match="is gone"):
                await src.__anext__()
            with pytest.raises(PressureSourceGone):  # and stays gone
                await src.__anext__()
    finally:
        a.close()
        b.close()


# -- ManualPressure --------------------------------------------------------------


@pytest.mark.anyio
async def test_manual_notify_from_a_thread_wakes_the_iterator() -> None:
    async with ManualPressure() as src:
        t = threading.Timer(0.05, src.notify, args=(PressureLevel.MEDIUM,))
        t.start()
        try:
            assert await next_event(src) == PressureEvent(PressureLevel.MEDIUM, "manual", 1)
        finally:
            t.join()


@pytest.mark.anyio
async def test_manual_storm_coalesces_with_summed_count() -> None:
    n = 10_000
    async with ManualPressure() as src:

        def worker() -> None:
            for i in range(n):
                src.notify(PressureLevel.CRITICAL if i == n // 2 else PressureLevel.LOW)

        thread = threading.Thread(target=worker)
        thread.start()
        events: list[PressureEvent] = []
        try:
            while sum(e.count for e in events) < n:
                events.append(await next_event(src))
        finally:
            thread.join()
        assert sum(e.count for e in events) == n
        assert len(events) < n // 20, len(events)
        assert [e.level for e in events].count(PressureLevel.CRITICAL) == 1
        print(f"\n10,000 notifies from a thread -> {len(events)} deliveries")


@pytest.mark.anyio
async def test_manual_highest_level_wins_and_early_notifies_are_kept() -> None:
    src = ManualPressure("m")
    src.notify(PressureLevel.LOW)  # before the source is open: kept
    async with src:
        src.notify(PressureLevel.CRITICAL)
        src.notify(PressureLevel.MEDIUM)
        assert await next_event(src) == PressureEvent(PressureLevel.CRITICAL, "m", 3)
        await no_event(src, 0.05)
    with pytest.raises(ValueError):
        src.notify(7)  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_manual_min_interval_merges_what_arrives_too_soon() -> None:
    async with ManualPressure(min_interval=0.3) as src:
        src.notify()
        first = await next_event(src)
        t1 = anyio.current_time()
        src.notify()
        threading.Timer(0.1, src.notify, args=(PressureLevel.CRITICAL,)).start()
        second = await next_event(src)
        waited = anyio.current_time() - t1
        assert first.count == 1
        assert second == PressureEvent(PressureLevel.CRITICAL, "manual", 2)
        assert waited >= 0.29, waited
        # A cancelled wait keeps the pending notification.
        src.notify()
        with anyio.move_on_after(0.05):
            await src.__anext__()
        assert (await next_event(src)).count == 1


@pytest.mark.anyio
async def test_iterating_a_source_that_was_never_entered_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="async with"):
        await ManualPressure().__anext__()


# -- closing: every fd goes, whatever the consumer was doing ------------------------

SOURCE_FACTORIES: dict[str, Callable[[], PressureSource]] = {
    "manual": ManualPressure,
    "psi-host": lambda: PsiTrigger(HOST_PSI),
    "systemd-psi": lambda: SystemdPressureWatch(HOST_PSI, b"some 150000 2000000\0"),
    "cgroup-v1": lambda: CgroupV1Pressure(MEMCG.path if MEMCG else Path("/nonexistent")),
}


def _factory_or_skip(kind: str) -> PressureSource:
    if kind == "cgroup-v1" and (MEMCG is None or MEMCG.version != 1 or not IS_ROOT):
        pytest.skip("needs root and the cgroup v1 memory controller")
    if "psi" in kind and not HOST_PSI.exists():
        pytest.skip("kernel without PSI")
    return SOURCE_FACTORIES[kind]()


@pytest.mark.anyio
@pytest.mark.parametrize("kind", sorted(SOURCE_FACTORIES))
async def test_exit_closes_every_fd_after_cancelled_consumer(kind: str) -> None:
    before = open_fds()
    source = _factory_or_skip(kind)
    async with source:
        assert len(open_fds()) > len(before)
        async with anyio.create_task_group() as tg:

            async def consume() -> None:
                async for _ in source:
                    pass

            tg.start_soon(consume)
            await anyio.sleep(0.05)
            tg.cancel_scope.cancel()
    assert open_fds() == before


@pytest.mark.anyio
@pytest.mark.parametrize("kind", sorted(SOURCE_FACTORIES))
async def test_exit_from_another_task_ends_iteration(kind: str) -> None:
    before = open_fds()
    source = _factory_or_skip(kind)
    ended = anyio.Event()

    async def consume() -> None:
        async for _ in source:
            pass
        ended.set()  # a clean end: no exception

    async with anyio.create_task_group() as tg:
        await source.__aenter__()
        tg.start_soon(consume)
        await anyio.sleep(0.05)
        await source.__aexit__(None, None, None)
        with anyio.fail_after(5):
            await ended.wait()
    assert open_fds() == before
    # A closed source stays closed for iteration.
    with pytest.raises(StopAsyncIteration):
        await source.__aiter__().__anext__()


# -- PSI triggers, for real ----------------------------------------------------------


@needs_host_psi
@pytest.mark.anyio
async def test_psi_trigger_on_host_pressure_sets_up_and_closes() -> None:
    before = open_fds()
    async with PsiTrigger(HOST_PSI, "full", 100_000, 4_000_000) as src:
        await no_event(src, 0.05)
    assert open_fds() == before
    # The kernel refuses sub-2-second windows without CAP_SYS_RESOURCE.
    short = PsiTrigger(HOST_PSI, window_us=1_000_000)
    try:
        short.probe()
    except OSError as exc:
        assert exc.errno == errno.EINVAL
        assert "multiple of 2 s" in str(exc)
    assert open_fds() == before


@needs_root_v2
@pytest.mark.anyio
async def test_psi_trigger_on_cgroup_memory_pressure(v2_child: Path) -> None:
    before = open_fds()
    async with PsiTrigger(v2_child / "memory.pressure") as src:
        await no_event(src, 0.05)
        # Removing the cgroup destroys the trigger: sticky EPOLLERR.
        remove_child(v2_child)
        with anyio.fail_after(5), pytest.raises(PressureSourceGone, match="removed"):
            await src.__anext__()
    assert open_fds() == before


def test_psi_trigger_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="cannot open PSI file") as info:
        PsiTrigger(tmp_path / "memory.pressure").probe()
    assert str(tmp_path) in str(info.value)


@needs_root_v1
@needs_root_v2
@pytest.mark.anyio
async def test_real_pressure_fires_v1_level_and_cgroup_psi(
    big_file: Path, v1_child: Path, v2_child: Path
) -> None:
    # A reader limited to 32 MiB by a v1 memcg streams 256 MiB through the
    # page cache: reclaim raises memory.pressure_level, and the stall shows
    # in the PSI of the v2 cgroup the reader also sits in (scoped to it, so
    # nothing else on the host can fire this trigger).
    evict_from_cache(big_file)
    v1_events: list[PressureEvent] = []
    async with (
        CgroupV1Pressure(v1_child, "low") as v1,
        PsiTrigger(v2_child / "memory.pressure", stall_us=100) as psi,
        anyio.create_task_group() as tg,
    ):

        async def collect_v1() -> None:
            async for ev in v1:
                v1_events.append(ev)

        tg.start_soon(collect_v1)
        t0 = anyio.current_time()
        script = (
            f"echo $$ > {v1_child}/cgroup.procs && echo $$ > {v2_child}/cgroup.procs"
            f" && exec cat {big_file} > /dev/null"
        )
        await anyio.run_process(["sh", "-c", script])
        psi_event = await next_event(psi, timeout=10)
        took = anyio.current_time() - t0
        await anyio.sleep(0.05)
        tg.cancel_scope.cancel()
    assert psi_event.level is PressureLevel.LOW
    assert v1_events, "memory.pressure_level never fired"
    raw = sum(e.count for e in v1_events)
    print(
        f"\nv1: {len(v1_events)} deliveries, {raw} raw events, levels "
        f"{sorted({e.level.name for e in v1_events})}; PSI fired after {took:.2f} s"
    )


# -- cgroup v1 memory.pressure_level ---------------------------------------------------


@needs_root_v1
@pytest.mark.anyio
async def test_v1_eventfd_storm_coalesces_without_starving_the_loop(v1_child: Path) -> None:
    async with CgroupV1Pressure(v1_child, "low") as src:
        efd = src._efds[PressureLevel.LOW]  # the registered eventfd itself
        stop = threading.Event()
        written = 0

        def storm() -> None:
            nonlocal written
            while not stop.is_set():
                for _ in range(50):
                    os.eventfd_write(efd, 1)
                written += 50
                time.sleep(0.001)

        lags: list[float] = []
        received: list[PressureEvent] = []
        running = True

        async def ticker() -> None:
            while running:
                t = anyio.current_time()
                await anyio.sleep(0.005)
                lags.append(anyio.current_time() - t - 0.005)

        async def consume() -> None:
            async for ev in src:
                received.append(ev)

        thread = threading.Thread(target=storm)
        async with anyio.create_task_group() as tg:
            tg.start_soon(ticker)
            tg.start_soon(consume)
            thread.start()
            await anyio.sleep(1.0)
            stop.set()
            thread.join()
            with anyio.fail_after(5):
                while sum(e.count for e in received) < written:
                    await anyio.sleep(0.01)
            running = False
            tg.cancel_scope.cancel()
    total = sum(e.count for e in received)
    worst = max(lags)
    print(
        f"\nstorm: {written} eventfd writes in 1 s -> {len(received)} deliveries; "
        f"ticker worst lag {worst * 1000:.1f} ms over {len(lags)} ticks"
    )
    assert total == written
    assert len(received) < written // 10
    assert all(e.level is PressureLevel.LOW for e in received)
    assert worst < 0.1


@needs_root_v1
@pytest.mark.anyio
async def test_v1_highest_level_wins_and_removal_ends_iteration(v1_child: Path) -> None:
    src = CgroupV1Pressure(v1_child, "medium", mode="hierarchy")
    async with src:
        assert sorted(src._efds) == [PressureLevel.MEDIUM, PressureLevel.CRITICAL]
        # The kernel signals every listener at or below the event's level.
        os.eventfd_write(src._efds[PressureLevel.MEDIUM], 4)
        os.eventfd_write(src._efds[PressureLevel.CRITICAL], 1)
        ev = await next_event(src)
        assert (ev.level, ev.count) == (PressureLevel.CRITICAL, 4)
        # rmdir signals every registered eventfd once more: that is "gone".
        remove_child(v1_child)
        with anyio.fail_after(5), pytest.raises(PressureSourceGone, match="was removed"):
            await src.__anext__()


def test_v1_registration_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"memory\.pressure_level"):
        CgroupV1Pressure(tmp_path).probe()
    (tmp_path / "memory.pressure_level").write_text("")
    (tmp_path / "cgroup.event_control").write_text("")
    # A plain file accepts the write, but it is not a registration: the
    # kernel is the one that rejects bad specs.  Nothing leaks either way.
    before = open_fds()
    CgroupV1Pressure(tmp_path).probe()
    assert open_fds() == before


# -- memory.events (kernfs POLLPRI) ----------------------------------------------------


@needs_root_v2
@pytest.mark.anyio
async def test_memory_events_plumbing_on_a_real_kernfs_file(v2_child: Path) -> None:
    # No v2 memory controller here, so watch cgroup.events, a kernfs file of
    # the same kind: it changes (populated 0 -> 1) when a process joins, and
    # has no high/max counters, so nothing may be delivered.
    before = open_fds()
    got: list[object] = []
    async with MemoryEvents(v2_child / "cgroup.events") as src, anyio.create_task_group() as tg:

        async def consume() -> None:
            try:
                async for ev in src:
                    got.append(ev)
            except PressureSourceGone:
                got.append("gone")

        tg.start_soon(consume)
        await anyio.sleep(0.05)
        proc = subprocess.Popen(["sleep", "30"])
        try:
            (v2_child / "cgroup.procs").write_text(str(proc.pid))
            await anyio.sleep(0.2)
            assert got == []
            assert src._last.get("populated") == 1  # it woke and re-read
        finally:
            proc.kill()
            proc.wait()
        # No await between the change and the removal: the consumer's next
        # read fails with ENODEV.
        remove_child(v2_child)
        with anyio.fail_after(5):
            while not got:
                await anyio.sleep(0.01)
        assert got == ["gone"]
    assert open_fds() == before


def test_memory_events_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"cannot open memory\.events"):
        MemoryEvents(tmp_path / "memory.events").probe()


# -- systemd's MEMORY_PRESSURE_WATCH ---------------------------------------------------


@needs_host_psi
@pytest.mark.anyio
async def test_systemd_watch_on_a_psi_file() -> None:
    env = {
        "MEMORY_PRESSURE_WATCH": str(HOST_PSI),
        "MEMORY_PRESSURE_WRITE": b64(b"some 150000 2000000\0"),
    }
    src = SystemdPressureWatch.from_environ(env)
    assert src is not None
    before = open_fds()
    async with src:
        await no_event(src, 0.05)
    assert open_fds() == before


def test_systemd_watch_on_a_plain_file_fails_clearly(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.write_text("")
    with pytest.raises(PermissionError, match="cannot watch MEMORY_PRESSURE_WATCH"):
        SystemdPressureWatch(plain).probe()


@pytest.mark.anyio
async def test_systemd_watch_on_a_fifo(tmp_path: Path) -> None:
    fifo = tmp_path / "pressure.fifo"
    os.mkfifo(fifo)
    async with SystemdPressureWatch(fifo, b"cfg", level=PressureLevel.CRITICAL) as src:
        await no_event(src, 0.05)  # the write is not echoed back as an event
        writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.write(writer, b"abc")
        assert await next_event(src) == PressureEvent(PressureLevel.CRITICAL, src.name, 3)
        os.close(writer)  # the writer leaving is no event (and no busy loop)
        await no_event(src, 0.1)


@pytest.mark.anyio
async def test_systemd_watch_on_a_unix_socket(tmp_path: Path) -> None:
    path = tmp_path / "pressure.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    try:
        async with SystemdPressureWatch(path, b"hello") as src:
            conn, _ = server.accept()  # connected during __aenter__
            with conn:
                assert conn.recv(16) == b"hello"  # the write goes first
                conn.sendall(b"pressure")
                ev = await next_event(src)
                assert (ev.level, ev.count) == (PressureLevel.LOW, 8)
            with anyio.fail_after(5), pytest.raises(PressureSourceGone, match="peer closed"):
                await src.__anext__()
    finally:
        server.close()


# -- choosing ------------------------------------------------------------------------

LABELS = [
    "systemd MEMORY_PRESSURE_WATCH",
    "cgroup v1 memory.pressure_level",
    "cgroup v2 memory.pressure (PSI)",
    "cgroup v2 memory.events",
    "host-wide /proc/pressure/memory (PSI)",
]


def check_report(report: list[str], chosen: str | None) -> None:
    assert [line.split(":")[0] for line in report] == LABELS
    for label, line in zip(LABELS, report, strict=True):
        if label == chosen:
            assert line.startswith(f"{label}: chosen")
        else:
            assert "chosen (" not in line


@needs_root_v1
@pytest.mark.anyio
async def test_choose_picks_cgroup_v1_on_this_machine() -> None:
    source, report = choose_pressure_source({})
    print("\n" + "\n".join(report))
    assert isinstance(source, CgroupV1Pressure)
    check_report(report, LABELS[1])
    assert report[0].endswith("MEMORY_PRESSURE_WATCH is not set")
    assert "not tried, cgroup v1 memory.pressure_level chosen first" in report[2]
    before = open_fds()
    async with source:  # the probe left it ready to enter
        await no_event(source, 0.05)
    assert open_fds() == before


@needs_host_psi
def test_choose_prefers_systemd_when_set() -> None:
    env = {
        "MEMORY_PRESSURE_WATCH": str(HOST_PSI),
        "MEMORY_PRESSURE_WRITE": b64(b"some 150000 2000000\0"),
    }
    source, report = choose_pressure_source(env)
    assert isinstance(source, SystemdPressureWatch)
    check_report(report, LABELS[0])


def test_choose_honours_systemd_dev_null() -> None:
    with pytest.raises(NoPressureSourceError, match="disabled") as info:
        choose_pressure_source({"MEMORY_PRESSURE_WATCH": "/dev/null"})
    assert len(info.value.report) == 5


@needs_root_v2
def test_choose_falls_through_to_v2_psi(tmp_path: Path) -> None:
    missing = CgroupInfo(1, tmp_path / "gone", tmp_path)
    env = {"MEMORY_PRESSURE_WATCH": "/x", "MEMORY_PRESSURE_WRITE": "!!"}
    source, report = choose_pressure_source(env, missing)
    assert isinstance(source, PsiTrigger)
    check_report(report, LABELS[2])
    assert "not valid base64" in report[0]
    assert str(tmp_path / "gone") in report[1]


def test_choose_reports_every_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pressure, "HOST_PSI_MEMORY", tmp_path / "no-psi")
    with pytest.raises(NoPressureSourceError) as info:
        choose_pressure_source({}, CgroupInfo(2, tmp_path, tmp_path))
    err = info.value
    check_report(err.report, None)
    assert "the memory controller is on v2" in err.report[1]
    assert f"{tmp_path}/memory.events does not exist" in err.report[3]
    for label in LABELS:
        assert label in str(err)
    assert isinstance(err, OSError)
