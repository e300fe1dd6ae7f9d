"""Tests for aiopgalloc.host.cgroup: parsing from sample texts, and the
child-cgroup helpers against the real (v1) memory controller."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from aiopgalloc.host.cgroup import (
    CgroupInfo,
    CgroupLine,
    MountEntry,
    create_child_memcg,
    current_memory_cgroup,
    move_pid,
    parse_mountinfo,
    parse_proc_cgroup,
    remove_child,
    resolve_cgroup_dir,
    select_memory_cgroup,
    select_unified_dir,
    unified_cgroup_dir,
)

# This project's machines: v1 memory controller, v2 mounted without it.
HYBRID_MOUNTINFO = """\
22 1 253:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
HYBRID_CGROUP = """\
9:name=systemd:/
4:memory:/process_api/2faf0a08
3:cpu,cpuacct:/
0::/
"""

# A pure v1 host (old distribution, no cgroup2 mount at all).
V1_MOUNTINFO = """\
25 18 0:22 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
30 25 0:27 / /sys/fs/cgroup/memory rw,nosuid,relatime shared:13 - cgroup cgroup rw,memory
31 25 0:28 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid shared:14 - cgroup cgroup rw,cpu,cpuacct
"""
V1_CGROUP = "5:memory:/user.slice/user-1000.slice\n2:cpu,cpuacct:/user.slice\n"

# A pure v2 host (systemd "unified" mode); optional mountinfo fields present.
V2_MOUNTINFO = """\
27 22 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
"""
V2_CGROUP = "0::/system.slice/foo.service\n"

# Docker without a private cgroup namespace: the container's own cgroup is
# bind-mounted at /sys/fs/cgroup/memory with its path as the mount root.
DOCKER_V1_MOUNTINFO = """\
700 690 0:32 /docker/abc123 /sys/fs/cgroup/memory ro,nosuid - cgroup cgroup rw,memory
"""
DOCKER_V1_CGROUP = "4:memory:/docker/abc123\n"


def exists_in(*paths: str) -> Callable[[Path], bool]:
    known = {Path(p) for p in paths}
    return lambda p: Path(p) in known


def test_parse_mountinfo_keeps_only_cgroup_mounts() -> None:
    mounts = parse_mountinfo(HYBRID_MOUNTINFO)
    assert [m.mount_point for m in mounts] == [
        Path("/sys/fs/cgroup/cpu"),
        Path("/sys/fs/cgroup/memory"),
        Path("/sys/fs/cgroup/systemd"),
        Path("/sys/fs/cgroup/unified"),
    ]
    memory = mounts[1]
    assert memory.fstype == "cgroup" and "memory" in memory.super_options
    assert memory.root == "/"
    assert mounts[3].fstype == "cgroup2"


def test_parse_mountinfo_unescapes_and_skips_garbage() -> None:
    text = "garbage line\n50 1 0:40 /a\\040b /mnt/my\\040cg rw - cgroup2 none rw\n"
    (m,) = parse_mountinfo(text)
    assert m.mount_point == Path("/mnt/my cg")
    assert m.root == "/a b"


def test_parse_proc_cgroup() -> None:
    lines = parse_proc_cgroup(HYBRID_CGROUP + "nonsense\nx:y:z\n")
    assert lines[0] == CgroupLine(9, ("name=systemd",), "/")
    assert lines[1] == CgroupLine(4, ("memory",), "/process_api/2faf0a08")
    assert lines[2].controllers == ("cpu", "cpuacct")
    assert lines[3] == CgroupLine(0, (), "/")
    assert len(lines) == 4


def test_path_with_colons_survives() -> None:
    (line,) = parse_proc_cgroup("0::/weird:name\n")
    assert line.path == "/weird:name"


def test_select_v1_only() -> None:
    info = select_memory_cgroup(
        parse_mountinfo(V1_MOUNTINFO),
        parse_proc_cgroup(V1_CGROUP),
        read_controllers=lambda p: None,
        exists=exists_in("/sys/fs/cgroup/memory/user.slice/user-1000.slice"),
    )
    assert info == CgroupInfo(
        1, Path("/sys/fs/cgroup/memory/user.slice/user-1000.slice"), Path("/sys/fs/cgroup/memory")
    )


def test_select_v2_with_memory_controller() -> None:
    seen: list[Path] = []

    def controllers(p: Path) -> str:
        seen.append(p)
        return "cpuset cpu io memory pids\n"

    info = select_memory_cgroup(
        parse_mountinfo(V2_MOUNTINFO),
        parse_proc_cgroup(V2_CGROUP),
        read_controllers=controllers,
        exists=exists_in("/sys/fs/cgroup/system.slice/foo.service"),
    )
    assert info == CgroupInfo(
        2, Path("/sys/fs/cgroup/system.slice/foo.service"), Path("/sys/fs/cgroup")
    )
    assert seen == [Path("/sys/fs/cgroup/system.slice/foo.service")]


def test_select_v2_without_memory_controller_and_no_v1() -> None:
    info = select_memory_cgroup(
        parse_mountinfo(V2_MOUNTINFO),
        parse_proc_cgroup(V2_CGROUP),
        read_controllers=lambda p: "cpu io pids",
        exists=lambda p: True,
    )
    assert info is None


def test_select_hybrid_reports_v1_and_finds_unified_dir() -> None:
    mounts, lines = parse_mountinfo(HYBRID_MOUNTINFO), parse_proc_cgroup(HYBRID_CGROUP)
    # The v2 hierarchy only has hugetlb: memory is on v1.
    info = select_memory_cgroup(
        mounts, lines, read_controllers=lambda p: "hugetlb\n", exists=lambda p: True
    )
    assert info == CgroupInfo(
        1, Path("/sys/fs/cgroup/memory/process_api/2faf0a08"), Path("/sys/fs/cgroup/memory")
    )
    assert select_unified_dir(mounts, lines, exists=lambda p: True) == Path(
        "/sys/fs/cgroup/unified"
    )


def test_bind_mounted_container_cgroup_strips_mount_root() -> None:
    info = select_memory_cgroup(
        parse_mountinfo(DOCKER_V1_MOUNTINFO),
        parse_proc_cgroup(DOCKER_V1_CGROUP),
        read_controllers=lambda p: None,
        exists=exists_in("/sys/fs/cgroup/memory"),
    )
    assert info is not None and info.path == Path("/sys/fs/cgroup/memory")


def test_containerised_path_missing_under_mount_falls_back() -> None:
    # /proc/self/cgroup shows a host path, the mount root is "/", and that
    # path does not exist under the mount: drop leading components, and
    # finally use the mount point itself.
    mount = MountEntry(Path("/sys/fs/cgroup/memory"), "/", "cgroup", frozenset({"memory"}))
    path = "/kubepods/burstable/pod42/ctr9"
    assert resolve_cgroup_dir(mount, path, exists=lambda p: False) == mount.mount_point
    assert resolve_cgroup_dir(
        mount, path, exists=exists_in("/sys/fs/cgroup/memory/pod42/ctr9")
    ) == Path("/sys/fs/cgroup/memory/pod42/ctr9")
    assert resolve_cgroup_dir(mount, path, exists=lambda p: True) == Path(
        "/sys/fs/cgroup/memory/kubepods/burstable/pod42/ctr9"
    )


def test_no_memory_hierarchy_at_all() -> None:
    assert (
        select_memory_cgroup(
            parse_mountinfo(V1_MOUNTINFO), parse_proc_cgroup("2:cpu,cpuacct:/\n"), lambda p: None
        )
        is None
    )
    assert select_unified_dir(parse_mountinfo(V1_MOUNTINFO), parse_proc_cgroup(V1_CGROUP)) is None


# -- the running machine -------------------------------------------------------

MEMCG = current_memory_cgroup()
needs_v1_root = pytest.mark.skipif(
    MEMCG is None or MEMCG.version != 1 or os.geteuid() != 0,
    reason="needs root and the cgroup v1 memory controller",
)


def test_current_memory_cgroup_on_this_machine() -> None:
    if MEMCG is None:
        pytest.skip("no memory controller")
    assert MEMCG.path.is_dir()
    assert MEMCG.path == MEMCG.mount or MEMCG.mount in MEMCG.path.parents
    marker = "memory.pressure_level" if MEMCG.version == 1 else "memory.events"
    assert (MEMCG.path / marker).exists()
    assert current_memory_cgroup(os.getpid()) == MEMCG
    assert current_memory_cgroup(2**31 - 1) is None  # no such process


def test_unified_cgroup_dir_on_this_machine() -> None:
    d = unified_cgroup_dir()
    if d is None:
        pytest.skip("no cgroup2 mount")
    assert (d / "cgroup.procs").exists()


@needs_v1_root
def test_child_memcg_create_move_remove() -> None:
    assert MEMCG is not None
    child = create_child_memcg(MEMCG, f"aiopgalloc_test_{os.getpid()}", 64 << 20)
    proc = subprocess.Popen(["sleep", "30"])
    try:
        assert int((child / "memory.limit_in_bytes").read_text()) == 64 << 20
        move_pid(child, proc.pid)
        assert str(proc.pid) in (child / "cgroup.procs").read_text().split()
        assert current_memory_cgroup(proc.pid) == CgroupInfo(1, child, MEMCG.mount)
        with pytest.raises(OSError, match=f"processes still inside: {proc.pid}"):
            remove_child(child)
    finally:
        proc.kill()
        proc.wait()
    remove_child(child)
    assert not child.exists()
    with pytest.raises(FileNotFoundError, match="cannot remove cgroup"):
        remove_child(child)


@needs_v1_root
def test_child_memcg_errors() -> None:
    assert MEMCG is not None
    for bad in ("", "a/b", "..", "."):
        with pytest.raises(ValueError):
            create_child_memcg(MEMCG, bad, 1 << 20)
    with pytest.raises(ValueError):
        create_child_memcg(MEMCG, "x", 0)
    with pytest.raises(TypeError):
        create_child_memcg(MEMCG, "x", 1.5)  # type: ignore[arg-type]
    name = f"aiopgalloc_dup_{os.getpid()}"
    child = create_child_memcg(MEMCG, name, 1 << 30)
    try:
        with pytest.raises(FileExistsError, match="already exists"):
            create_child_memcg(MEMCG, name, 1 << 30)
        gone = subprocess.Popen(["true"])
        gone.wait()
        with pytest.raises(ProcessLookupError, match="no such process"):
            move_pid(child, gone.pid)
    finally:
        remove_child(child)


def test_create_child_v2_writes_memory_max(tmp_path: Path) -> None:
    # On a plain directory the v2 branch just shows which file it writes.
    child = create_child_memcg(CgroupInfo(2, tmp_path, tmp_path), "svc", 12345 * 4096)
    assert (child / "memory.max").read_text() == str(12345 * 4096)
