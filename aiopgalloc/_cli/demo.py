"""``python -m aiopgalloc demo``: the main use case, end to end.

An async cache keeps its values in a memory file while clients work it;
then memory pressure arrives and the cache sheds.  The pressure is real
where the demo can make a child memory cgroup (root; cgroup v1, or v2 with
the memory controller) and the temporary directory is on a disk file
system: the demo then

1. creates the cgroup ``aiopgalloc-demo-<pid>`` under its own memory cgroup
   with a small limit (128 MiB), and a sparse file four times that size;
2. re-runs itself in a child process, which moves itself into the cgroup and
   opens the memory file with ``use_host_memcg_pressure=True``; to make
   pressure it streams the sparse file through the page cache with ``cat``
   (a hole reads as zeros, with no disk I/O, yet fills the page cache,
   charged to the cgroup);
3. removes the cgroup and the file when the child ends, whatever happened
   (Ctrl-C, SIGTERM, an error), killing anything left inside the cgroup.

Anywhere else it says why, and drives the pressure through
``ManualPressure``.  The session itself is in :mod:`.demo_session`; this
module chooses the plan and cleans up.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Any

import anyio

from ..host import cgroup as cg
from .demo_session import Plan, run_session
from .demo_view import PlainView, RichView, View, fmt_bytes, rich_available

__all__ = ["main"]

LIMIT = 128 << 20
BIG_FILE = 4 * LIMIT
CGROUP_PREFIX = "aiopgalloc-demo-"
TEMP_PREFIX = "aiopgalloc-demo-"
BACKENDS = ("asyncio", "uvloop", "trio")


# ------------------------------------------------------------------ the plan


def _fs_type(path: Path) -> str:
    """The file system type of the mount holding ``path`` (from mountinfo)."""
    best, fstype = "", "?"
    target = str(path.resolve())
    with contextlib.suppress(OSError), open("/proc/self/mountinfo") as f:
        for line in f:
            head, _, tail = line.partition(" - ")
            fields = head.split()
            if len(fields) < 5 or not tail:
                continue
            mount_point = fields[4]
            inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
            if inside and len(mount_point) >= len(best):
                best, fstype = mount_point, tail.split()[0]
    return fstype


def _disk_tempdir() -> tuple[Path | None, str]:
    """A temporary directory on a file system whose holes fill the page
    cache when read (not tmpfs/ramfs), or None and why not."""
    tried = []
    for candidate in (tempfile.gettempdir(), "/var/tmp", os.getcwd()):
        path = Path(candidate)
        fstype = _fs_type(path)
        if fstype in ("tmpfs", "ramfs", "?") or not os.access(path, os.W_OK):
            tried.append(f"{path} ({fstype})")
            continue
        return path, ""
    return None, (
        "no writable directory on a disk file system for the sparse file "
        f"(tried {', '.join(tried)}; reading a hole on tmpfs fills no page cache)"
    )


def _sweep_stale(parent: Path) -> None:
    """Remove demo cgroups left by runs that were killed outright (their
    pid is gone and nothing is inside)."""
    for path in parent.glob(CGROUP_PREFIX + "*"):
        pid = path.name[len(CGROUP_PREFIX) :]
        if not pid.isdigit() or Path(f"/proc/{pid}").exists():
            continue
        with contextlib.suppress(OSError):
            if not (path / "cgroup.procs").read_text().split():
                cg.remove_child(path)


class _Real:
    """What real pressure needs, made by :func:`_prepare` and removed by
    :meth:`cleanup`."""

    def __init__(self, memcg: cg.CgroupInfo, path: Path, tmpdir: Path, big: Path) -> None:
        self.memcg = memcg
        self.path = path
        self.tmpdir = tmpdir
        self.big = big

    def cleanup(self) -> list[str]:
        """Kill what is left in the cgroup, remove it and the file; returns
        what could not be removed (empty when all went well)."""
        problems = []
        deadline = time.monotonic() + 5
        while self.path.exists():
            with contextlib.suppress(OSError, ValueError):
                for pid in (self.path / "cgroup.procs").read_text().split():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGKILL)
            try:
                cg.remove_child(self.path)
            except FileNotFoundError:
                break
            except OSError as exc:
                if time.monotonic() > deadline:
                    problems.append(f"cgroup {self.path}: {exc}")
                    break
                time.sleep(0.02)
        if self.tmpdir == Path():
            return problems
        shutil.rmtree(self.tmpdir, ignore_errors=True)
        if self.tmpdir.exists():
            problems.append(f"directory {self.tmpdir} could not be removed")
        return problems


def _prepare() -> tuple[_Real | None, str]:
    """Make the cgroup and the sparse file, or say why not."""
    memcg = cg.current_memory_cgroup()
    if memcg is None:
        return None, "no memory cgroup controller was found (neither cgroup v1 nor v2 memory)"
    folder, why = _disk_tempdir()
    if folder is None:
        return None, why
    with contextlib.suppress(OSError):
        _sweep_stale(memcg.path)
    try:
        path = cg.create_child_memcg(memcg, f"{CGROUP_PREFIX}{os.getpid()}", LIMIT)
    except OSError as exc:
        why = (exc.strerror or str(exc)).removeprefix("cannot create memory cgroup: ")
        return None, f"no memory cgroup could be made under {memcg.path} ({why})"
    real = _Real(memcg, path, Path(), Path())
    try:
        real.tmpdir = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=folder))
        real.big = real.tmpdir / "sparse.bin"
        with open(real.big, "wb") as f:
            f.truncate(BIG_FILE)
    except OSError as exc:
        real.cleanup()
        return None, f"cannot create the sparse file in {folder}: {exc}"
    except BaseException:  # Ctrl-C right here: leave nothing behind
        real.cleanup()
        raise
    return real, ""


# ------------------------------------------------------------ the supervisor


def _child_command(args: argparse.Namespace, real: _Real) -> list[str]:
    cmd = [sys.executable, "-m", "aiopgalloc", "demo", "--backend", args.backend]
    cmd += ["--seconds", str(args.seconds)]
    if args.plain:
        cmd.append("--plain")
    cmd += ["--inside-cgroup", str(real.path), "--sparse-file", str(real.big)]
    return cmd


def _supervise(args: argparse.Namespace, real: _Real) -> int:
    """Run the demo in a child inside the cgroup; clean up whatever happens.

    Ctrl-C reaches the child from the terminal, which winds down and exits;
    this process only waits (SIGINT is ignored here meanwhile), forwards
    SIGTERM and SIGHUP (and a SIGINT sent to this process alone, after 3 s),
    and kills the child if it has not ended 10 s after a signal."""
    print(
        f"Made memory cgroup {real.path} (cgroup v{real.memcg.version}, limit "
        f"{fmt_bytes(LIMIT)}) and a {fmt_bytes(BIG_FILE)} sparse file {real.big}; "
        "the demo runs again in a child process inside that cgroup.",
        flush=True,
    )
    signalled: list[int] = []
    proc: subprocess.Popen[bytes] | None = None

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        signalled.append(signum)
        if proc is not None and proc.poll() is None and signum != signal.SIGINT:
            proc.send_signal(signal.SIGTERM)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        proc = subprocess.Popen(_child_command(args, real))
        since: float | None = None
        while True:
            try:
                code = proc.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                pass
            if signalled and since is None:
                since = time.monotonic()
            if since is not None and time.monotonic() > since + 10:
                proc.kill()
            elif since is not None and time.monotonic() > since + 3:
                proc.send_signal(signal.SIGTERM)  # the signal did not reach it
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        problems = real.cleanup()
        for s, handler in old.items():
            signal.signal(s, handler)
    if problems:
        print("Cleanup FAILED: " + "; ".join(problems), file=sys.stderr)
        return 1
    print(f"Cleaned up: removed the cgroup {real.path.name} and the sparse file.", flush=True)
    if signalled:
        return 128 + signalled[0]
    return code if code >= 0 else 128 - code


# ---------------------------------------------------------------- running


def _backend_args(backend: str) -> tuple[str, dict[str, Any]] | str:
    """anyio's backend name and options, or what to install."""
    if backend == "uvloop":
        if importlib.util.find_spec("uvloop") is None:
            return "uvloop is not installed: pip install uvloop (or 'aiopgalloc[uvloop]')"
        return "asyncio", {"use_uvloop": True}
    if backend == "trio" and importlib.util.find_spec("trio") is None:
        return "trio is not installed: pip install trio (or 'aiopgalloc[trio]')"
    return backend, {}


def _make_view(plain: bool) -> tuple[View, str | None]:
    if plain:
        return PlainView(), None
    if not sys.stdout.isatty():
        return PlainView(), "plain output: stdout is not a terminal"
    if not rich_available():
        return PlainView(), "plain output: rich is not installed (pip install 'aiopgalloc[demo]')"
    return RichView(), None


def _run(args: argparse.Namespace, plan: Plan) -> int:
    backend = _backend_args(args.backend)
    assert not isinstance(backend, str)
    view, note = _make_view(args.plain)
    if note:
        plan = dataclasses.replace(plan, notes=(*plan.notes, note.capitalize() + "."))
    interrupted = False
    code = 1
    try:
        code = anyio.run(run_session, plan, view, backend=backend[0], backend_options=backend[1])
    except* KeyboardInterrupt:  # trio raises it inside a task: it comes out in a group
        interrupted = True
    if interrupted:
        print("\ninterrupted (Ctrl-C); the memory file is closed", flush=True)
        return 130
    return code


def _run_inside(args: argparse.Namespace) -> int:
    """The child: join the cgroup (after every import), then run."""
    backend = _backend_args(args.backend)
    if isinstance(backend, str):
        print(backend, file=sys.stderr)
        return 2
    if backend[0] == "trio":
        importlib.import_module("trio")
    elif backend[1]:
        importlib.import_module("uvloop")
    if not args.plain and rich_available():
        for name in ("rich.console", "rich.live", "rich.panel", "rich.table", "rich.text"):
            importlib.import_module(name)
    path = Path(args.inside_cgroup)
    try:
        cg.move_pid(path, os.getpid())
    except OSError as exc:
        plan = Plan(args.backend, args.seconds, manual_reason=f"cannot join the cgroup: {exc}")
        return _run(args, plan)
    memcg = cg.current_memory_cgroup()
    plan = Plan(
        args.backend,
        args.seconds,
        cgroup=path,
        cgroup_version=memcg.version if memcg else None,
        limit=LIMIT,
        big_file=Path(args.sparse_file),
    )
    return _run(args, plan)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m aiopgalloc demo",
        description="An async cache keeps its values in one memory file while clients work "
        "it; then memory pressure arrives (real where a memory cgroup can be made, else "
        "simulated) and the cache sheds.  A live view shows it; a summary explains it.",
    )
    p.add_argument(
        "--backend", choices=BACKENDS, default="asyncio", help="event loop (default asyncio)"
    )
    p.add_argument(
        "--seconds", type=float, default=12.0, help="length of the run, 1 to 50 (default 12)"
    )
    p.add_argument("--plain", action="store_true", help="plain lines instead of the live view")
    p.add_argument(
        "--no-cgroup",
        action="store_true",
        help="do not make a memory cgroup: simulate the pressure with ManualPressure",
    )
    p.add_argument("--inside-cgroup", help=argparse.SUPPRESS)
    p.add_argument("--sparse-file", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    """``python -m aiopgalloc demo``; returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    if not 1 <= args.seconds <= 50:
        parser.error("--seconds must be between 1 and 50")
    backend = _backend_args(args.backend)
    if isinstance(backend, str):
        parser.error(backend)
    real: _Real | None = None
    try:
        if args.inside_cgroup:
            return _run_inside(args)
        if args.no_cgroup:
            real, why = None, "--no-cgroup was given"
        else:
            real, why = _prepare()
        if real is not None:
            return _supervise(args, real)
        return _run(args, Plan(args.backend, args.seconds, manual_reason=why))
    except KeyboardInterrupt:  # before the event loop ran, or between two steps
        if real is not None:
            real.cleanup()
        print("\ninterrupted (Ctrl-C)", flush=True)
        return 130
