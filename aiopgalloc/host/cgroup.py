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
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

__all__ = [
    "CgroupInfo",
    "CgroupLine",
    "MountEntry",
    "create_child_memcg",
    "current_memory_cgroup",
    "move_pid",
    "parse_flat_keyed",
    "parse_mountinfo",
    "parse_proc_cgroup",
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
