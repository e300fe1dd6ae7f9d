"""``python -m aiopgalloc info``: what this host offers the allocator.

Five sections:

- build: whether the core (page books, segment sets) runs compiled with
  mypyc or as pure Python, and why (``aiopgalloc._native.describe``);
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

``--json`` prints the same facts as one JSON document (see ``gather``), for
scripts and monitoring; the text is made from that document.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import __version__, _native
from ..host import cgroup, hugepage, pressure
from ..ranges import PAGE_SIZE

__all__ = ["candidates", "gather", "info", "main", "render"]


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


def _int(text: str | None) -> int | None:
    return int(text) if text is not None and text.isdigit() else None


_HOW = {
    "systemd MEMORY_PRESSURE_WATCH": "what the service manager names, after its trigger is written",
    "cgroup v1 memory.pressure_level": "an eventfd per level, registered via cgroup.event_control",
    "cgroup v2 memory.pressure (PSI)": "a PSI trigger on the cgroup's stalls, POLLPRI",
    "cgroup v2 memory.events": "POLLPRI when the high/max/oom counters change (late signal)",
    "host-wide /proc/pressure/memory (PSI)": "a PSI trigger on the whole host's stalls",
    "ManualPressure": "notify(level) from your own code; always works",
}


def _pages() -> dict[str, Any]:
    folder = Path("/sys/kernel/mm/hugepages")
    hugetlb: list[dict[str, Any]] = []
    if folder.is_dir():
        for entry in sorted(folder.iterdir()):
            if entry.name.startswith("hugepages-") and entry.name.endswith("kB"):
                kib = int(entry.name[len("hugepages-") : -2])
                reserved = _int(_read(entry / "nr_hugepages"))
                hugetlb.append({"size": kib * 1024, "reserved": reserved})
    return {
        "page_size": PAGE_SIZE,
        "huge_page_size": hugepage.HUGE_PAGE_SIZE,
        "hugetlb": hugetlb,
    }


_SHMEM_MEANING = {
    "never": "memfd pages are never huge",
    "always": "memfd pages may be huge wherever a range is big and aligned enough",
    "within_size": "memfd pages may be huge inside the file's size",
    "advise": "memfd pages are huge only where madvise(MADV_HUGEPAGE) asked",
    "deny": "huge pages are off for shmem, even for tmpfs mounted with huge=",
    "force": "every shmem page that can be huge is",
}


def _cgroups(memcg: cgroup.CgroupInfo | None) -> dict[str, Any]:
    unified = cgroup.unified_cgroup_dir()
    v2_controllers = _read(unified / "cgroup.controllers") if unified else None
    if memcg is None:
        layout = None
    elif memcg.version == 2:
        layout = "v2"
    else:
        layout = "hybrid" if unified is not None else "v1"
    facts: dict[str, Any] = {
        "layout": layout,
        "v2_directory": str(unified) if unified is not None else None,
        "v2_controllers": (v2_controllers.split() if v2_controllers else [])
        if unified is not None
        else None,
        "v2_psi": (unified / "memory.pressure").exists() if unified is not None else None,
        "memory_cgroup": None,
        "limit": None,
        "limit_bytes": None,
        "usage_bytes": None,
        "can_make_child_cgroups": None,
        "host_psi": Path("/proc/pressure/memory").exists(),
    }
    if memcg is not None:
        if memcg.version == 1:
            limit = _read(memcg.path / "memory.limit_in_bytes")
            usage = _read(memcg.path / "memory.usage_in_bytes")
        else:
            limit = _read(memcg.path / "memory.max")
            usage = _read(memcg.path / "memory.current")
        limit_bytes = _int(limit)
        facts.update(
            memory_cgroup=str(memcg.path),
            # The file's word ("max" on v2), or None when it cannot be read;
            # limit_bytes is None when there is no limit (v1 says so with a
            # number of 2**60 or more).
            limit=limit,
            limit_bytes=limit_bytes if limit_bytes is not None and limit_bytes < 1 << 60 else None,
            usage_bytes=_int(usage),
            can_make_child_cgroups=os.geteuid() == 0 and os.access(memcg.path, os.W_OK),
        )
    return facts


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


def _pressure(memcg: cgroup.CgroupInfo | None) -> dict[str, Any]:
    chosen: str | None = None
    off: str | None = None
    try:
        source, report = pressure.choose_pressure_source(cgroup=memcg)
        chosen = verdict = source.name
    except pressure.PressureHandlingOff as exc:
        report = list(exc.report)
        off = exc.note
        verdict = (
            f"none: host memory pressure is off ({exc.note}); "
            "open_memory_file(use_host_memcg_pressure=True) opens the file without it"
        )
    except pressure.NoPressureSourceError as exc:
        report = list(exc.report)
        verdict = "none: open_memory_file(use_host_memcg_pressure=True) would fail"
    each: list[dict[str, Any]] = []
    for label, make in candidates(memcg):
        if isinstance(make, str):
            each.append({"label": label, "ok": False, "detail": make})
            continue
        try:
            src = make()
            src.probe()
        except (OSError, ValueError) as exc:
            each.append({"label": label, "ok": False, "detail": str(exc)})
        else:
            each.append({"label": label, "ok": True, "detail": _HOW.get(label, src.name)})
    return {"chosen": chosen, "off": off, "report": report, "verdict": verdict, "each": each}


def gather() -> dict[str, Any]:
    """What this host offers, as a JSON-serialisable dict.

    Keys: ``aiopgalloc`` (the version); ``build`` (``compiled``: a bool,
    as ``aiopgalloc.COMPILED``; ``build``: what the install was built as,
    ``"compiled"``, ``"pure"`` or None for a tree never built; ``note``: the
    mypyc version or why the build is pure; ``pure_env``: whether
    ``AIOPGALLOC_PURE`` asks for the pure build; ``modules``: the compiled
    unit); ``pages`` (``page_size``,
    ``huge_page_size``, ``hugetlb``: a list of ``{size, reserved}``, sizes in
    bytes); ``thp`` (the sysfs settings by file name; empty without THP);
    ``cgroups`` (``layout``: ``"v1"``, ``"v2"``, ``"hybrid"`` or None when no
    memory controller is found; ``v2_directory``, ``v2_controllers``,
    ``v2_psi``; ``memory_cgroup``; ``limit`` as the kernel file says it and
    ``limit_bytes``, None for no limit; ``usage_bytes``;
    ``can_make_child_cgroups``; ``host_psi``); ``pressure`` (``chosen``: the
    source ``use_host_memcg_pressure=True`` picks, or None; ``off``: why
    pressure handling is switched off, or None; ``report``: the chooser's
    lines; ``verdict``: its one-line summary; ``each``: every candidate tried
    on its own, as ``{label, ok, detail}``).  Unknown values are None.

    Cost: a few dozen small file reads, and every pressure source opened and
    closed again (a few milliseconds).  Raises nothing for what the host
    lacks (that is what it reports); ``OSError`` only for an unexpected
    failure reading the cgroup file system.
    """
    memcg = cgroup.current_memory_cgroup()
    return {
        "aiopgalloc": __version__,
        "build": _native.describe(),
        "pages": _pages(),
        "thp": hugepage.thp_settings(),
        "cgroups": _cgroups(memcg),
        "pressure": _pressure(memcg),
    }


_LAYOUT = {
    None: "no memory controller found (neither a v1 memory hierarchy nor v2 memory)",
    "v2": "v2 (unified), with the memory controller",
    "hybrid": "v1 memory controller; hybrid: cgroup2 is mounted too, without memory",
    "v1": "v1 (legacy), the memory controller on its own hierarchy",
}


def render(facts: dict[str, Any]) -> str:
    """The text of ``python -m aiopgalloc info``, made from ``gather()``'s
    document.  Pure; raises ``KeyError`` for a document missing a key."""
    out: list[str] = []

    def row(name: str, value: str) -> None:
        out.append(f"  {name:<26}{value}")

    build = facts["build"]
    out.append("Build")
    if build["compiled"]:
        running = f"compiled ({build['note'] or 'mypyc'})"
    elif build["pure_env"] and build["build"] == "compiled":
        running = "pure Python (AIOPGALLOC_PURE is set; the install is compiled)"
    elif build["build"] == "pure":
        running = f"pure Python ({build['note']})"
    else:
        running = "pure Python (a source tree never built: pip install -e . compiles it)"
    row("core", running)
    row("compiled unit", ", ".join(build["modules"]))
    out.append("")

    pages = facts["pages"]
    out.append("Pages")
    size, huge = pages["page_size"], pages["huge_page_size"]
    row("page size", f"{size} bytes ({_size(size)})")
    row("huge page size (PMD)", f"{huge} bytes ({_size(huge)}); allocations this big are aligned")
    sizes = [
        f"{_size(h['size'])} ({'?' if h['reserved'] is None else h['reserved']} reserved)"
        for h in pages["hugetlb"]
    ]
    row("hugetlb page sizes", ", ".join(sizes) or "none")

    out += ["", "Transparent huge pages (/sys/kernel/mm/transparent_hugepage)"]
    if not facts["thp"]:
        row("(not available)", "this kernel has no transparent huge pages")
    for key, value in facts["thp"].items():
        meaning = _SHMEM_MEANING.get(value, "") if key == "shmem_enabled" else ""
        row(key, value + (f": {meaning}" if meaning else ""))

    cg = facts["cgroups"]
    out += ["", "Cgroups"]
    row("version", _LAYOUT[cg["layout"]])
    if cg["v2_directory"] is not None:
        controllers = cg["v2_controllers"]
        row("v2 directory", cg["v2_directory"])
        row(
            "v2 controllers",
            (" ".join(controllers) or "none")
            + ("" if "memory" in controllers else " (no memory controller on v2)"),
        )
        row("v2 PSI (memory.pressure)", "present" if cg["v2_psi"] else "absent")
    if cg["memory_cgroup"] is not None:
        row("memory cgroup", cg["memory_cgroup"])
        limit, limit_bytes = cg["limit"], cg["limit_bytes"]
        if limit is not None and limit.isdigit() and limit_bytes is None:
            limit = "none"
        elif limit_bytes is not None:
            limit = _size(limit_bytes) if limit_bytes % 1024 == 0 else f"{limit_bytes} bytes"
        row("limit", limit or "?")
        usage = cg["usage_bytes"]
        row("usage", f"{usage / (1 << 20):.1f} MiB" if usage is not None else "?")
        row(
            "child cgroups",
            "can be made here (root, writable): 'demo' uses real pressure"
            if cg["can_make_child_cgroups"]
            else "cannot be made (needs root and a writable cgroup): 'demo' simulates pressure",
        )
    row("host PSI", "present" if cg["host_psi"] else "absent (kernel without PSI)")

    pr = facts["pressure"]
    out += ["", "Pressure sources: what use_host_memcg_pressure=True picks, in order of preference"]
    out += [f"  {line}" for line in pr["report"]]
    out.append(f"  => {pr['verdict']}")
    out.append("Each source tried on its own (opened and closed again)")
    for c in pr["each"]:
        if c["ok"]:
            out.append(f"  {c['label']}: OK ({c['detail']})")
        else:
            out.append(f"  {c['label']}: no: {c['detail']}")
    return "\n".join(out)


def info(as_json: bool = False) -> int:
    """Print what this host offers (text, or with ``as_json`` one JSON
    document, indented); returns the exit code (0).  Costs what ``gather``
    costs."""
    facts = gather()
    if as_json:
        json.dump(facts, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(render(facts))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m aiopgalloc info [--json]``; returns the exit code.  Raises
    ``SystemExit`` (status 2) for an unknown option, as argparse does."""
    args = argparse.ArgumentParser(
        prog="python -m aiopgalloc info",
        description="What this host offers the allocator: page sizes, transparent huge "
        "pages, cgroups, and which memory-pressure sources work here (and why not).",
    )
    args.add_argument(
        "--json",
        action="store_true",
        help="print the facts as one JSON document (the keys are described in "
        "aiopgalloc._cli.info.gather)",
    )
    return info(as_json=args.parse_args(argv).json)
