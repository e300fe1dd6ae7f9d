"""``python -m aiopgalloc info``: what this host offers the allocator.

Four sections:

- pages: the base page size, the PMD huge page size (allocations of that
  size or more are aligned to it) and the hugetlb sizes the kernel has;
- transparent huge pages: the three sysfs settings, and what
  ``shmem_enabled`` means for a memfd;
- cgroups: v1, v2 or both ("hybrid"), where the memory controller is, this
  process's memory cgroup with its limit and usage, whether the v2
  directory has PSI, and whether the demo can make a child cgroup here;
- pressure sources: the report of ``choose_pressure_source`` (what
  ``open_memory_file(MemoryFileOpts(use_host_memcg_pressure=True))`` would
  pick, and why not the others; or that pressure handling is off, with
  ``MEMORY_PRESSURE_WATCH=/dev/null``), then every candidate tried on its own,
  OK or why not.  Trying a source opens and closes it: a PSI trigger is
  written and removed, a v1 eventfd registered and released.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path

from ..host import cgroup, hugepage, pressure
from ..ranges import PAGE_SIZE

__all__ = ["candidates", "main"]


def _size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} B"


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _row(name: str, value: str) -> None:
    print(f"  {name:<26}{value}")


_HOW = {
    "systemd MEMORY_PRESSURE_WATCH": "what the service manager names, after its trigger is written",
    "cgroup v1 memory.pressure_level": "an eventfd per level, registered via cgroup.event_control",
    "cgroup v2 memory.pressure (PSI)": "a PSI trigger on the cgroup's stalls, POLLPRI",
    "cgroup v2 memory.events": "POLLPRI when the high/max/oom counters change (late signal)",
    "host-wide /proc/pressure/memory (PSI)": "a PSI trigger on the whole host's stalls",
    "ManualPressure": "notify(level) from your own code; always works",
}


def _pages() -> None:
    print("Pages")
    _row("page size", f"{PAGE_SIZE} bytes ({_size(PAGE_SIZE)})")
    huge = hugepage.HUGE_PAGE_SIZE
    _row("huge page size (PMD)", f"{huge} bytes ({_size(huge)}); allocations this big are aligned")
    folder = Path("/sys/kernel/mm/hugepages")
    sizes = []
    if folder.is_dir():
        for entry in sorted(folder.iterdir()):
            if entry.name.startswith("hugepages-") and entry.name.endswith("kB"):
                kib = int(entry.name[len("hugepages-") : -2])
                total = _read(entry / "nr_hugepages") or "?"
                sizes.append(f"{_size(kib * 1024)} ({total} reserved)")
    _row("hugetlb page sizes", ", ".join(sizes) or "none")


_SHMEM_MEANING = {
    "never": "memfd pages are never huge",
    "always": "memfd pages may be huge wherever a range is big and aligned enough",
    "within_size": "memfd pages may be huge inside the file's size",
    "advise": "memfd pages are huge only where madvise(MADV_HUGEPAGE) asked",
    "deny": "huge pages are off for shmem, even for tmpfs mounted with huge=",
    "force": "every shmem page that can be huge is",
}


def _thp() -> None:
    print("Transparent huge pages (/sys/kernel/mm/transparent_hugepage)")
    settings = hugepage.thp_settings()
    if not settings:
        _row("(not available)", "this kernel has no transparent huge pages")
    for key, value in settings.items():
        meaning = _SHMEM_MEANING.get(value, "") if key == "shmem_enabled" else ""
        _row(key, value + (f": {meaning}" if meaning else ""))


def _cgroups() -> cgroup.CgroupInfo | None:
    print("Cgroups")
    memcg = cgroup.current_memory_cgroup()
    unified = cgroup.unified_cgroup_dir()
    v2_controllers = _read(unified / "cgroup.controllers") if unified else None
    v2_has_memory = v2_controllers is not None and "memory" in v2_controllers.split()
    if memcg is None:
        version = "no memory controller found (neither a v1 memory hierarchy nor v2 memory)"
    elif memcg.version == 2:
        version = "v2 (unified), with the memory controller"
    elif unified is not None:
        version = "v1 memory controller; hybrid: cgroup2 is mounted too, without memory"
    else:
        version = "v1 (legacy), the memory controller on its own hierarchy"
    _row("version", version)
    if unified is not None:
        controllers = v2_controllers.split() if v2_controllers else []
        _row("v2 directory", str(unified))
        _row(
            "v2 controllers",
            (" ".join(controllers) or "none")
            + ("" if v2_has_memory else " (no memory controller on v2)"),
        )
        psi = (unified / "memory.pressure").exists()
        _row("v2 PSI (memory.pressure)", "present" if psi else "absent")
    if memcg is not None:
        _row("memory cgroup", str(memcg.path))
        if memcg.version == 1:
            limit = _read(memcg.path / "memory.limit_in_bytes")
            usage = _read(memcg.path / "memory.usage_in_bytes")
        else:
            limit = _read(memcg.path / "memory.max")
            usage = _read(memcg.path / "memory.current")
        if limit is not None and limit.isdigit() and int(limit) >= 1 << 60:
            limit = "none"
        elif limit is not None and limit.isdigit():
            limit = _size(int(limit)) if int(limit) % 1024 == 0 else f"{limit} bytes"
        _row("limit", limit or "?")
        _row("usage", f"{int(usage) / (1 << 20):.1f} MiB" if usage and usage.isdigit() else "?")
        can = os.geteuid() == 0 and os.access(memcg.path, os.W_OK)
        _row(
            "child cgroups",
            "can be made here (root, writable): 'demo' uses real pressure"
            if can
            else "cannot be made (needs root and a writable cgroup): 'demo' simulates pressure",
        )
    pressure_files = Path("/proc/pressure/memory")
    _row("host PSI", "present" if pressure_files.exists() else "absent (kernel without PSI)")
    return memcg


def candidates(
    memcg: cgroup.CgroupInfo | None, environ: dict[str, str] | None = None
) -> list[tuple[str, Callable[[], pressure.PressureSourceBase] | str]]:
    """Every pressure source this host might offer, each as a factory or,
    where it cannot even be built, the reason.  In the chooser's order, with
    the manual source last."""
    env = dict(os.environ) if environ is None else environ
    out: list[tuple[str, Callable[[], pressure.PressureSourceBase] | str]] = []
    try:
        systemd = pressure.parse_systemd_environ(env)
    except ValueError as exc:
        out.append(("systemd MEMORY_PRESSURE_WATCH", str(exc)))
    else:
        if systemd is None:
            out.append(("systemd MEMORY_PRESSURE_WATCH", "MEMORY_PRESSURE_WATCH is not set"))
        elif systemd[0] == "/dev/null":
            out.append(("systemd MEMORY_PRESSURE_WATCH", "set to /dev/null: disabled"))
        else:
            path, data = systemd
            out.append(
                ("systemd MEMORY_PRESSURE_WATCH", lambda: pressure.SystemdPressureWatch(path, data))
            )
    if memcg is not None and memcg.version == 1:
        v1 = memcg.path
        out.append(("cgroup v1 memory.pressure_level", lambda: pressure.CgroupV1Pressure(v1)))
    else:
        why = "no memory cgroup" if memcg is None else "the memory controller is on v2"
        out.append(("cgroup v1 memory.pressure_level", why))
    v2 = memcg.path if memcg is not None and memcg.version == 2 else cgroup.unified_cgroup_dir()
    if v2 is None:
        out.append(("cgroup v2 memory.pressure (PSI)", "no cgroup2 file system is mounted"))
        out.append(("cgroup v2 memory.events", "no cgroup2 file system is mounted"))
    else:
        psi, events = v2 / "memory.pressure", v2 / "memory.events"
        out.append(("cgroup v2 memory.pressure (PSI)", lambda: pressure.PsiTrigger(psi)))
        if events.exists():
            out.append(("cgroup v2 memory.events", lambda: pressure.MemoryEvents(events)))
        else:
            out.append(("cgroup v2 memory.events", f"{events} does not exist (no v2 memory)"))
    host = pressure.HOST_PSI_MEMORY
    out.append(("host-wide /proc/pressure/memory (PSI)", lambda: pressure.PsiTrigger(host)))
    out.append(("ManualPressure", lambda: pressure.ManualPressure()))
    return out


def _pressure(memcg: cgroup.CgroupInfo | None) -> None:
    print("Pressure sources: what use_host_memcg_pressure=True picks, in order of preference")
    try:
        source, report = pressure.choose_pressure_source(cgroup=memcg)
        verdict = source.name
    except pressure.PressureHandlingOff as exc:
        report = list(exc.report)
        verdict = (
            f"none: host memory pressure is off ({exc.note}); "
            "open_memory_file(use_host_memcg_pressure=True) opens the file without it"
        )
    except pressure.NoPressureSourceError as exc:
        report = list(exc.report)
        verdict = "none: open_memory_file(use_host_memcg_pressure=True) would fail"
    for line in report:
        print(f"  {line}")
    print(f"  => {verdict}")
    print("Each source tried on its own (opened and closed again)")
    for label, make in candidates(memcg):
        if isinstance(make, str):
            print(f"  {label}: no: {make}")
            continue
        try:
            src = make()
            src.probe()
        except (OSError, ValueError) as exc:
            print(f"  {label}: no: {exc}")
        else:
            print(f"  {label}: OK ({_HOW.get(label, src.name)})")


def info() -> int:
    """Print what this host offers; returns the exit code (0)."""
    _pages()
    print()
    _thp()
    print()
    memcg = _cgroups()
    print()
    _pressure(memcg)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m aiopgalloc info``."""
    argparse.ArgumentParser(
        prog="python -m aiopgalloc info",
        description="What this host offers the allocator: page sizes, transparent huge "
        "pages, cgroups, and which memory-pressure sources work here (and why not).",
    ).parse_args(argv)
    return info()
