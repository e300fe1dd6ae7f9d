"""``python -m aiopgalloc info``: what this host offers the allocator."""

from __future__ import annotations

import argparse

from ..host import cgroup, hugepage, pressure
from ..ranges import PAGE_SIZE


def info() -> int:
    """Print what this host offers."""
    print(f"page size        {PAGE_SIZE}")
    print(f"huge page size   {hugepage.HUGE_PAGE_SIZE}")
    for k, v in hugepage.thp_settings().items():
        print(f"THP {k:<13}{v}")
    cg = cgroup.current_memory_cgroup()
    if cg is None:
        print("memory cgroup    none found")
    else:
        print(f"memory cgroup    v{cg.version} {cg.path}")
    print("pressure sources, in order of preference:")
    try:
        source, report = pressure.choose_pressure_source()
        chosen = source.name
    except pressure.NoPressureSourceError as exc:
        report = list(exc.report)
        chosen = None
    for line in report:
        print(f"  {line}")
    print(f"chosen           {chosen or 'none'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m aiopgalloc info``."""
    argparse.ArgumentParser(prog="python -m aiopgalloc info").parse_args(argv)
    return info()
