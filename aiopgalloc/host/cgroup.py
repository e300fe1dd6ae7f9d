"""Find the memory cgroup this process is charged to (cgroup v1 or v2).

How Linux tells a process where it sits
---------------------------------------

Two files answer the question together, and neither is enough alone:

* ``/proc/<pid>/cgroup`` names, per hierarchy, the cgroup path of the
  process: ``4:memory:/system.slice/foo.service`` on a v1 hierarchy (the
  middle field lists the controllers bound to it, comma separated) and
  ``0::/system.slice/foo.service`` for the unified v2 hierarchy (empty
  controller field, id 0).  The path is relative to the root of the
  hierarchy *as seen from the process's cgroup namespace*.

* ``/proc/self/mountinfo`` says where each hierarchy is mounted and which
  part of it: field 4 is the root of the mount inside the hierarchy, field 5
  the mount point, and after the ``-`` separator come the file system type
  (``cgroup`` or ``cgroup2``) and the super options (for v1, the controller
  names, so ``memory`` appears there).

The directory is then ``mount point + (cgroup path minus mount root)``.  The
subtraction matters in containers started without a private cgroup
namespace: the container sees ``/docker/<id>`` in ``/proc/self/cgroup`` and has
exactly that cgroup bind-mounted at ``/sys/fs/cgroup/memory`` with mount root
``/docker/<id>``, so the answer is the mount point itself.  Some runtimes
mount the container's own cgroup with root ``/`` while ``/proc/self/cgroup``
still shows a host path; the path then does not exist under the mount.  We
then try the path with leading components dropped, and finally the mount
point, the same fallback the JVM's container support settled on.

v1 or v2?  A machine can run both ("hybrid"): v1 hierarchies for some
controllers and a v2 mount (often at ``/sys/fs/cgroup/unified``) that has no
controllers at all.  The memory controller lives on exactly one of them.
v2 has it when ``memory`` is listed in the cgroup's ``cgroup.controllers``;
otherwise a v1 hierarchy with ``memory`` among its super options has it.
PSI (``memory.pressure``) is a v2 feature that does not need the memory
controller, so :func:`unified_cgroup_dir` finds the v2 directory on its own.

Everything that parses text is a pure function, so the logic is tested on
sample files; the functions that touch the system are thin wrappers.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

__all__ = [
    "COMMIT_RESERVE",
    "COMMIT_STEP_MAX",
    "CgroupInfo",
    "CgroupLine",
    "Headroom",
    "MountEntry",
    "commit_in_steps",
    "commit_need",
    "create_child_memcg",
    "current_memory_cgroup",
    "memcg_levels",
    "memory_cgroup_levels",
    "move_pid",
    "parse_flat_keyed",
    "parse_memory_limit",
    "parse_mountinfo",
    "parse_proc_cgroup",
    "read_headroom",
    "remove_child",
    "resolve_cgroup_dir",
    "select_memory_cgroup",
    "select_unified_dir",
    "unified_cgroup_dir",
]


@dataclass(frozen=True)
class CgroupInfo:
    """Where the memory controller of a process lives.

    ``version`` is 1 or 2; ``path`` is the process's memory cgroup directory
    (for example ``/sys/fs/cgroup/memory/system.slice/foo.service``) and
    ``mount`` the mount point of the hierarchy it belongs to.
    """

    version: int
    path: Path
    mount: Path


@dataclass(frozen=True)
class MountEntry:
    """One cgroup-related line of ``/proc/self/mountinfo``.

    ``root`` is the directory of the hierarchy that is mounted (``/`` unless
    the mount is a bind mount of a sub-cgroup), ``fstype`` is ``cgroup`` (v1)
    or ``cgroup2``, and ``super_options`` holds the v1 controller names.
    """

    mount_point: Path
    root: str
    fstype: str
    super_options: frozenset[str]


@dataclass(frozen=True)
class CgroupLine:
    """One line of ``/proc/<pid>/cgroup``: ``id:controllers:path``."""

    hierarchy_id: int
    controllers: tuple[str, ...]
    path: str


_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    # mountinfo writes space, tab, newline and backslash as \040 style octal.
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[MountEntry]:
    """Return the cgroup (v1) and cgroup2 mounts listed in mountinfo ``text``.

    Other file systems and malformed lines are skipped.  Pure; cost is linear
    in the text.
    """
    mounts: list[MountEntry] = []
    for line in text.splitlines():
        head, sep, tail = line.partition(" - ")
        if not sep:
            continue
        fields = head.split()
        rest = tail.split()
        if len(fields) < 5 or len(rest) < 2:
            continue
        fstype = rest[0]
        if fstype not in ("cgroup", "cgroup2"):
            continue
        opts = frozenset(rest[2].split(",")) if len(rest) > 2 else frozenset()
        mounts.append(
            MountEntry(
                mount_point=Path(_unescape(fields[4])),
                root=_unescape(fields[3]),
                fstype=fstype,
                super_options=opts,
            )
        )
    return mounts


def parse_proc_cgroup(text: str) -> list[CgroupLine]:
    """Parse the text of ``/proc/<pid>/cgroup`` into its lines.

    Controllers are split on commas (``cpu,cpuacct``); a named hierarchy keeps
    its ``name=`` prefix.  Malformed lines are skipped.  Pure.
    """
    lines: list[CgroupLine] = []
    for raw in text.splitlines():
        parts = raw.split(":", 2)
        if len(parts) != 3:
            continue
        try:
            hid = int(parts[0])
        except ValueError:
            continue
        controllers = tuple(c for c in parts[1].split(",") if c)
        lines.append(CgroupLine(hid, controllers, parts[2]))
    return lines


def parse_flat_keyed(text: str) -> dict[str, int]:
    """Parse a cgroup "flat keyed" file (``memory.events``: ``key value``
    lines) into a dict.  Lines that do not parse are skipped.  Pure."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2:
            try:
                out[parts[0]] = int(parts[1])
            except ValueError:
                continue
    return out


def resolve_cgroup_dir(
    mount: MountEntry,
    cgroup_path: str,
    exists: Callable[[Path], bool] = os.path.isdir,
) -> Path:
    """Return the directory of ``cgroup_path`` under ``mount``.

    The mount's root is stripped from the path first.  When the result does
    not exist (a container whose cgroup was mounted at the hierarchy's root
    while ``/proc/self/cgroup`` still shows the host path), the path is
    retried with leading components dropped, and the mount point is returned
    as the last resort.  ``exists`` is injected so the logic is testable.
    """
    path = PurePosixPath(cgroup_path if cgroup_path.startswith("/") else "/" + cgroup_path)
    root = PurePosixPath(mount.root or "/")
    if path == root or root in path.parents:
        rel_parts = path.relative_to(root).parts
    else:
        rel_parts = path.parts[1:]
    for skip in range(len(rel_parts) + 1):
        candidate = mount.mount_point.joinpath(*rel_parts[skip:])
        if exists(candidate):
            return candidate
    return mount.mount_point


def _best_mount(mounts: Iterable[MountEntry], cgroup_path: str) -> MountEntry | None:
    # Several mounts of one hierarchy can exist (bind mounts).  Prefer the one
    # whose root is the longest prefix of the path, then the first listed.
    path = PurePosixPath(cgroup_path or "/")

    def score(m: MountEntry) -> int:
        root = PurePosixPath(m.root or "/")
        return len(root.parts) if path == root or root in path.parents else -1

    return max(mounts, key=score, default=None)


def _unified(
    mounts: list[MountEntry], lines: list[CgroupLine], exists: Callable[[Path], bool]
) -> tuple[MountEntry, Path] | None:
    v2_line = next((ln for ln in lines if ln.hierarchy_id == 0 and not ln.controllers), None)
    if v2_line is None:
        return None
    mount = _best_mount((m for m in mounts if m.fstype == "cgroup2"), v2_line.path)
    if mount is None:
        return None
    return mount, resolve_cgroup_dir(mount, v2_line.path, exists)


def select_unified_dir(
    mounts: list[MountEntry],
    lines: list[CgroupLine],
    exists: Callable[[Path], bool] = os.path.isdir,
) -> Path | None:
    """Return the v2 cgroup directory from parsed mountinfo and cgroup lines.

    ``None`` when there is no cgroup2 mount or no ``0::`` line.  Pure except
    for ``exists``.
    """
    found = _unified(mounts, lines, exists)
    return None if found is None else found[1]


def select_memory_cgroup(
    mounts: list[MountEntry],
    lines: list[CgroupLine],
    read_controllers: Callable[[Path], str | None],
    exists: Callable[[Path], bool] = os.path.isdir,
) -> CgroupInfo | None:
    """Decide which hierarchy holds the memory controller.

    v2 wins when ``memory`` is among the words ``read_controllers`` returns
    for the v2 directory (the text of its ``cgroup.controllers``; ``None`` if
    unreadable); otherwise the v1 hierarchy with ``memory`` in its super
    options and a ``memory`` line in ``lines``.  ``None`` when neither exists.
    """
    found = _unified(mounts, lines, exists)
    if found is not None:
        controllers = read_controllers(found[1])
        if controllers is not None and "memory" in controllers.split():
            return CgroupInfo(2, found[1], found[0].mount_point)
    v1_line = next((ln for ln in lines if "memory" in ln.controllers), None)
    if v1_line is None:
        return None
    mount = _best_mount(
        (m for m in mounts if m.fstype == "cgroup" and "memory" in m.super_options),
        v1_line.path,
    )
    if mount is None:
        return None
    return CgroupInfo(1, resolve_cgroup_dir(mount, v1_line.path, exists), mount.mount_point)


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _read_proc(pid: int | str) -> tuple[list[MountEntry], list[CgroupLine]] | None:
    # mountinfo is read from our own mount namespace: that is where the paths
    # we return will be opened, whichever pid we are asked about.
    mountinfo = _read_text(Path("/proc/self/mountinfo"))
    cgroups = _read_text(Path(f"/proc/{pid}/cgroup"))
    if mountinfo is None or cgroups is None:
        return None
    return parse_mountinfo(mountinfo), parse_proc_cgroup(cgroups)


def current_memory_cgroup(pid: int | str = "self") -> CgroupInfo | None:
    """Return the memory cgroup of process ``pid`` (default: this process).

    ``None`` when the kernel has no memory controller mounted or the proc
    files cannot be read (the process is gone, or /proc is not mounted).
    Cost: three small file reads, tens of microseconds.  Never raises OSError.
    """
    parsed = _read_proc(pid)
    if parsed is None:
        return None
    return select_memory_cgroup(
        parsed[0], parsed[1], lambda d: _read_text(d / "cgroup.controllers")
    )


def unified_cgroup_dir(pid: int | str = "self") -> Path | None:
    """Return the cgroup v2 directory of ``pid``, with or without the memory
    controller (PSI's ``memory.pressure`` exists either way).

    ``None`` when no cgroup2 file system is mounted.  Never raises OSError.
    """
    parsed = _read_proc(pid)
    if parsed is None:
        return None
    return select_unified_dir(parsed[0], parsed[1])


def _explain(exc: OSError, action: str, path: Path) -> OSError:
    # Keep the errno (so the subclass stays PermissionError, FileExistsError,
    # ...) and say what we were doing in words.
    hints = {
        errno.EACCES: "permission denied (needs root or a delegated cgroup)",
        errno.EPERM: "operation not permitted (needs root or a delegated cgroup)",
        errno.EROFS: "the cgroup file system is mounted read-only",
        errno.EBUSY: "the cgroup still has processes or children",
        errno.ESRCH: "no such process",
        errno.EEXIST: "it already exists",
        errno.ENOENT: "no such cgroup",
    }
    reason = hints.get(exc.errno or 0, exc.strerror or str(exc))
    return OSError(exc.errno or errno.EIO, f"cannot {action}: {reason}", str(path))


def create_child_memcg(parent: CgroupInfo, name: str, limit_bytes: int) -> Path:
    """Create the memory cgroup ``name`` under ``parent`` with a hard limit.

    v1 writes ``memory.limit_in_bytes``, v2 writes ``memory.max``.  Used by
    tests and the demo to put a workload under a small limit.  The directory
    is removed again if the limit cannot be set.  Raises ``ValueError`` for a
    bad name or limit, ``PermissionError`` / ``FileExistsError`` / ``OSError``
    with a message saying what failed.
    """
    if not name or "/" in name or name in (".", ".."):
        raise ValueError(f"invalid cgroup name {name!r}")
    if isinstance(limit_bytes, bool) or not isinstance(limit_bytes, int):
        raise TypeError("limit_bytes must be an int")
    if limit_bytes <= 0:
        raise ValueError("limit_bytes must be positive")
    path = parent.path / name
    try:
        path.mkdir()
    except OSError as exc:
        raise _explain(exc, "create memory cgroup", path) from exc
    limit_file = path / ("memory.limit_in_bytes" if parent.version == 1 else "memory.max")
    try:
        limit_file.write_text(str(limit_bytes))
    except OSError as exc:
        with contextlib.suppress(OSError):
            path.rmdir()
        raise _explain(exc, f"set the memory limit to {limit_bytes}", limit_file) from exc
    return path


def move_pid(path: Path, pid: int) -> None:
    """Move process ``pid`` (all its threads) into the cgroup at ``path``.

    Writes ``cgroup.procs``.  Raises ``ProcessLookupError`` if there is no
    such process, ``PermissionError`` or ``OSError`` otherwise.
    """
    procs = Path(path) / "cgroup.procs"
    try:
        procs.write_text(str(int(pid)))
    except OSError as exc:
        raise _explain(exc, f"move pid {pid} into the cgroup", procs) from exc


def remove_child(path: Path) -> None:
    """Remove the (empty) cgroup directory ``path``.

    A cgroup can only be removed once no process is left in it; memory still
    charged to it (page cache) moves to the parent.  Raises ``OSError(EBUSY)``
    listing the pids still inside, ``FileNotFoundError`` if it is gone.
    """
    path = Path(path)
    try:
        path.rmdir()
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            pids = (_read_text(path / "cgroup.procs") or "").split()
            raise OSError(
                errno.EBUSY,
                f"cannot remove cgroup: processes still inside: {', '.join(pids) or 'none'}",
                str(path),
            ) from exc
        raise _explain(exc, "remove cgroup", path) from exc


# ---------------------------------------------------------------- headroom
#
# Kernel facts the commit check depends on:
#
# * A shmem page (our memfd's) is charged to the memory cgroup of the task
#   that first allocates it: the one calling fallocate, or faulting the page
#   in (MADV_POPULATE_WRITE, a write).  So the cgroup that matters is the
#   committing process's own, not the file's creator's.
# * The charge must fit the limit at the cgroup and at every ancestor
#   (v1 with use_hierarchy, the only mode since Linux 5.14; always on v2).
#   When it does not, the kernel reclaims inside the cgroup; when that
#   fails it runs the cgroup's OOM killer, from fallocate and madvise too,
#   and the biggest task (normally the committing one, which holds the
#   shmem) is killed with SIGKILL.  Nothing reaches user space as ENOMEM.
# * Without swap, shmem and anonymous pages cannot be reclaimed; clean page
#   cache can.  Inactive clean file pages are what reclaim takes first and
#   surely; active ones may be hot and are not counted; dirty pages and
#   pages under writeback need I/O first and are not counted either.
# * v1 reports "unlimited" as PAGE_COUNTER_MAX pages in bytes
#   (9223372036854771712 with 4 KiB pages), v2 as "max".  The root cgroup
#   cannot be limited (v1 refuses the write, v2 has no memory.max there).

COMMIT_STEP_MAX = 64 << 20
"""The most bytes committed by one system call when a limit applies."""

COMMIT_RESERVE = 8 << 20
"""Bytes of room a committing allocation leaves free in a limited cgroup,
for the process's own heap, stacks and kernel objects."""

_STEP_ALIGN = 2 << 20  # steps of whole huge pages keep THP-backed shmem whole
_UNLIMITED_FLOOR = 1 << 62  # no real limit is this big; v1's "none" is above it

_LIMIT_FILES = {
    1: ("memory.limit_in_bytes", "memory.usage_in_bytes"),
    2: ("memory.max", "memory.current"),
}
_STAT_KEYS = {
    1: ("total_inactive_file", "total_dirty", "total_writeback"),
    2: ("inactive_file", "file_dirty", "file_writeback"),
}


def parse_memory_limit(text: str) -> int | None:
    """Parse a memory limit file (``memory.limit_in_bytes``, ``memory.max``).

    Returns the limit in bytes, or ``None`` for no limit: v2's ``max``, and
    any value of 2**62 or more (v1 writes its "unlimited" as
    9223372036854771712).  Raises ``ValueError`` for text that is neither.
    Pure.
    """
    word = text.strip()
    if word == "max":
        return None
    value = int(word)
    if value < 0:
        raise ValueError(f"negative memory limit {value}")
    return None if value >= _UNLIMITED_FLOOR else value


@dataclass(frozen=True)
class Headroom:
    """The room one limited memory cgroup has left for unreclaimable memory.

    ``path`` is the cgroup directory, ``limit`` and ``usage`` its hard limit
    and charged bytes (v1 ``memory.limit_in_bytes`` / ``memory.usage_in_bytes``,
    v2 ``memory.max`` / ``memory.current``; both count the whole subtree).
    ``reclaimable`` is the inactive clean page cache (``inactive_file`` minus
    dirty and writeback pages, from ``memory.stat``), or ``None`` when
    ``memory.stat`` was not read because ``limit - usage`` already covered
    the need.
    """

    path: Path
    limit: int
    usage: int
    reclaimable: int | None

    @property
    def room(self) -> int:
        """``limit - usage + reclaimable`` (0 when negative)."""
        return max(0, self.limit - self.usage + (self.reclaimable or 0))


def _read_small(path: str) -> str | None:
    # os.open/os.read cost a fraction of open().read() (no io stack), and
    # these reads happen inside allocate().  A cgroup file is a seq_file: a
    # read shorter than asked is the whole rest of it.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        data = chunk = os.read(fd, 65536)
        while len(chunk) == 65536:
            chunk = os.read(fd, 65536)
            data += chunk
        return data.decode("ascii", "replace")
    except OSError:
        return None
    finally:
        os.close(fd)


def _read_int(path: str) -> int | None:
    text = _read_small(path)
    try:
        return None if text is None else int(text)
    except ValueError:
        return None


def _level_headroom(version: int, path: Path, need: int) -> Headroom | None:
    limit_name, usage_name = _LIMIT_FILES[version]
    where = str(path)
    limit_text = _read_small(f"{where}/{limit_name}")
    try:
        limit = None if limit_text is None else parse_memory_limit(limit_text)
    except ValueError:
        limit = None
    if limit is None:
        return None  # unlimited, no such file (the v2 root), or unreadable
    usage = _read_int(f"{where}/{usage_name}")
    if usage is None:
        return None
    if limit - usage >= need:
        return Headroom(path, limit, usage, None)
    stat = parse_flat_keyed(_read_small(f"{where}/memory.stat") or "")
    inactive, dirty, writeback = (stat.get(key, 0) for key in _STAT_KEYS[version])
    return Headroom(path, limit, usage, max(0, inactive - dirty - writeback))


def read_headroom(version: int, levels: Iterable[Path], need: int = 0) -> Headroom | None:
    """Return the tightest limited level of ``levels`` (cgroup directories of
    a v``version`` memory hierarchy), or ``None`` when none is limited.

    Tightest means least :attr:`Headroom.room`.  A level's ``memory.stat`` is
    read only when ``limit - usage < need`` (the page cache it could reclaim
    is then counted); pass ``need=0`` for the bare ``limit - usage``.  A
    level whose files are missing (the v2 root) or do not parse counts as
    unlimited.  The files are read fresh each call: usage moves.  Cost: two
    small reads per limited level and one per unlimited level (about 10 us
    each here), plus about 65 us for ``memory.stat`` (read and parsed)
    where it is read.  Raises ``ValueError`` for a version other than 1 or
    2; never raises OSError.
    """
    if version not in _LIMIT_FILES:
        raise ValueError(f"cgroup version must be 1 or 2, got {version!r}")
    tightest: Headroom | None = None
    for path in levels:
        level = _level_headroom(version, path, need)
        if level is not None and (tightest is None or level.room < tightest.room):
            tightest = level
    return tightest


def memcg_levels(info: CgroupInfo) -> tuple[Path, ...]:
    """The directories from ``info.path`` up to ``info.mount`` (the root of
    the hierarchy as mounted here), nearest first.  Ancestors above the
    mount (a container's host side) are not visible and not listed.  Pure.
    """
    levels = [info.path]
    here = info.path
    while here != info.mount and info.mount in here.parents:
        here = here.parent
        levels.append(here)
    return tuple(levels)


# (text of /proc/self/cgroup, version, levels): replaced whole, so a reader
# in another thread sees an old or a new triple, never a mix.
_levels_cache: tuple[bytes, int, tuple[Path, ...]] | None = None


def _proc_self_cgroup() -> bytes | None:
    try:
        fd = os.open("/proc/self/cgroup", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return os.read(fd, 65536)
    except OSError:
        return None
    finally:
        os.close(fd)


def memory_cgroup_levels() -> tuple[int, tuple[Path, ...]] | None:
    """Return the memory cgroup version and :func:`memcg_levels` of this
    process, or ``None`` when no memory controller is found.

    Resolving (:func:`current_memory_cgroup`: mountinfo parsed) costs
    0.75-1.5 ms here, so the answer is kept and reused while the text of
    ``/proc/self/cgroup`` stays the same: a process moved to another cgroup
    (or a forked child moved alone) resolves again.  Cost on a hit: one read
    of ``/proc/self/cgroup``, about 9 us.  Never raises OSError.
    """
    global _levels_cache
    key = _proc_self_cgroup()
    if key is None:
        return None
    cached = _levels_cache
    if cached is not None and cached[0] == key:
        return cached[1], cached[2]
    info = current_memory_cgroup()
    if info is None:
        return None
    _levels_cache = (key, info.version, memcg_levels(info))
    return info.version, _levels_cache[2]


def commit_need(remaining: int) -> int:
    """The room a commit of ``remaining`` more bytes asks of a limited cgroup:
    the bytes, 1/128 of them again for the kernel's bookkeeping (page-cache
    index nodes, page tables of a populated mapping, both charged to the
    cgroup), and :data:`COMMIT_RESERVE`.  Pure."""
    return remaining + remaining // 128 + COMMIT_RESERVE


def _step_size(room: int, remaining: int) -> int:
    # A quarter of the room, in whole huge pages, 2 MiB to 64 MiB: the less
    # room, the more often usage (which others move too) is looked at again.
    step = max(_STEP_ALIGN, min(COMMIT_STEP_MAX, room // 4 // _STEP_ALIGN * _STEP_ALIGN))
    return min(step, remaining)


def commit_in_steps(
    offset: int,
    length: int,
    commit: Callable[[int, int], None],
    levels: Callable[[], tuple[int, Sequence[Path]] | None] = memory_cgroup_levels,
) -> None:
    """Call ``commit(offset, n)`` over ``[offset, offset + length)`` so that
    it never makes the calling process's memory cgroup run out.

    ``levels`` says where the process is charged (default: this process's
    memory cgroup and its ancestors).  When no level has a limit, or no
    memory controller is found, ``commit`` is called once for the whole
    range, as without the check.  Otherwise the range is committed in steps
    of at most :data:`COMMIT_STEP_MAX` bytes (fewer when room is short: a
    quarter of the room, at least 2 MiB), and before each step every limited
    level must have :func:`commit_need` of the bytes still to commit in
    room (:attr:`Headroom.room`: limit minus usage plus inactive clean page
    cache).  The ranges passed to ``commit`` are page-aligned when
    ``offset`` and ``length`` are.

    Cost of the check (medians here, v1, three levels): about 45 us with
    no limit (one read of ``/proc/self/cgroup`` and one limit file per
    level), about 70 us per step with one (two files per limited level),
    130 us where ``memory.stat`` is read; a 64 MiB step itself takes about
    14 ms (fallocate) to 42 ms (populate).

    Raises ``OSError(ENOMEM)`` naming the tightest cgroup directory, its
    room and the bytes asked, before a step that does not fit; the steps
    already made stay committed (the caller undoes them).  Raises what
    ``commit`` raises, ``ValueError`` for ``length <= 0``.

    Not guaranteed: the check and the step are not atomic, so memory charged
    by other tasks of the cgroup (or other threads) between them can still
    make the kernel's OOM killer run; swap is not counted (with swap, shmem
    over the limit would be swapped out rather than killed, and the check
    refuses it all the same); ancestors above the hierarchy's mount point
    are not seen; v2 ``memory.high`` (throttling, not killing) is ignored.
    """
    if length <= 0:
        raise ValueError(f"length must be positive, got {length}")
    found = levels()
    version, dirs = found if found is not None else (1, ())
    tightest = read_headroom(version, dirs, commit_need(length))
    if tightest is None:
        commit(offset, length)
        return
    done = 0
    while True:
        remaining = length - done
        need = commit_need(remaining)
        if tightest.room < need:
            raise OSError(
                errno.ENOMEM,
                f"committing {remaining} more bytes of a {length}-byte request needs "
                f"{need} bytes of room in the memory cgroup, which has {tightest.room} "
                f"(limit {tightest.limit}, usage {tightest.usage}, reclaimable "
                f"{tightest.reclaimable or 0}, reserve {COMMIT_RESERVE})",
                str(tightest.path),
            )
        step = _step_size(tightest.room, remaining)
        commit(offset + done, step)
        done += step
        if done >= length:
            return
        level = read_headroom(version, dirs, commit_need(length - done))
        if level is None:  # the limit was lifted meanwhile
            commit(offset + done, length - done)
            return
        tightest = level
