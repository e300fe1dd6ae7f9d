"""What every workload shares: the run's configuration, the result types,
timing helpers, the backends, and the description of the machine.

Conventions
-----------
- A *contender* is one way of doing a workload's job (aiopgalloc, or a
  peer).  Each measurement is repeated ``Config.reps`` times (5; 3 with
  ``--quick``), the contenders' repetitions interleaved and their order
  rotated every round (``interleave``), and the median is reported.
  Ratios are ratios of medians.
- The cyclic garbage collector stays on (a service has it on);
  ``gc.collect()`` runs before every timed section.
- Every ratio that has a target is a ``Row`` with a ``Target``; the table
  prints the target next to the measured ratio with PASS or MISS.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.metadata
import importlib.util
import math
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

import anyio

from ..ranges import PAGE_SIZE

__all__ = [
    "BACKENDS",
    "Config",
    "Progress",
    "Row",
    "Target",
    "WorkloadResult",
    "available_backends",
    "collect",
    "fmt_bytes",
    "fmt_rate",
    "fmt_time",
    "interleave",
    "machine_info",
    "median",
    "p99",
    "perf_counter",
    "rotate",
    "run_on",
    "spread_pct",
    "write_pages",
]

T = TypeVar("T")

perf_counter = time.perf_counter

# label -> (anyio backend, backend options)
BACKENDS: dict[str, tuple[str, dict[str, Any]]] = {
    "asyncio": ("asyncio", {}),
    "asyncio+uvloop": ("asyncio", {"use_uvloop": True}),
    "trio": ("trio", {}),
}

_NEEDS = {"asyncio": None, "asyncio+uvloop": "uvloop", "trio": "trio"}


def available_backends() -> list[str]:
    """The backend labels whose event loop package is importable here."""
    return [b for b, mod in _NEEDS.items() if mod is None or importlib.util.find_spec(mod)]


@dataclass(frozen=True)
class Config:
    """How big and how often: one run's settings.

    ``quick`` shrinks every workload so the suite finishes in under a minute;
    ``smoke`` shrinks them further still (a hidden flag for the tests, not
    meaningful as a measurement).  ``backends`` are labels of ``BACKENDS``;
    the first is the *primary* backend, on which the workloads that are not
    run per backend run.
    """

    quick: bool = False
    smoke: bool = False
    backends: tuple[str, ...] = ("asyncio",)
    seed: int = 1

    @property
    def reps(self) -> int:
        """Repetitions per measurement: 5, 3 with ``--quick`` or smoke."""
        return 3 if (self.quick or self.smoke) else 5

    @property
    def primary(self) -> str:
        """The backend of the workloads that run once."""
        return self.backends[0]

    @property
    def mode(self) -> str:
        """``full``, ``quick`` or ``smoke``."""
        return "smoke" if self.smoke else "quick" if self.quick else "full"

    def pick(self, full: T, quick: T, smoke: T) -> T:
        """The value for this run's size."""
        return smoke if self.smoke else quick if self.quick else full


@dataclass(frozen=True)
class Target:
    """A performance target on one figure: ``figure OP threshold``.

    The figure is a ratio (``unit`` "x") unless ``unit`` says otherwise
    (" B" for the bytes of workload 6)."""

    op: Literal[">=", "<="]
    threshold: float
    unit: str = "x"

    def check(self, value: float | None) -> bool | None:
        """Whether ``value`` meets the target (None when not measured)."""
        if value is None or math.isnan(value):
            return None
        return value >= self.threshold if self.op == ">=" else value <= self.threshold

    def __str__(self) -> str:
        return f"{self.op} {self.threshold:g}{self.unit}"


@dataclass
class Row:
    """One line of the results table.

    ``value`` is aiopgalloc's figure and ``peer`` the peer's (both already
    formatted, with units); ``ratio`` is the number the target applies to
    (or an informational ratio); ``ratio_note`` says which way it reads.
    """

    measurement: str
    value: str
    peer: str = ""
    ratio: float | None = None
    ratio_note: str = ""
    target: Target | None = None

    @property
    def passed(self) -> bool | None:
        """PASS (True), MISS (False), or no target (None)."""
        return None if self.target is None else self.target.check(self.ratio)

    def to_json(self) -> dict[str, Any]:
        """The row as plain data."""
        return {
            "measurement": self.measurement,
            "aiopgalloc": self.value,
            "peer": self.peer,
            "ratio": self.ratio,
            "ratio_note": self.ratio_note,
            "target": None if self.target is None else str(self.target),
            "target_op": None if self.target is None else self.target.op,
            "target_value": None if self.target is None else self.target.threshold,
            "pass": self.passed,
        }


@dataclass
class WorkloadResult:
    """What one workload hands back: table rows, notes, raw data."""

    key: int
    name: str
    title: str
    backends: list[str]
    params: dict[str, Any]
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    elapsed_s: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """The result as plain data (for the JSON file)."""
        return {
            "key": self.key,
            "name": self.name,
            "title": self.title,
            "backends": self.backends,
            "params": self.params,
            "elapsed_s": round(self.elapsed_s, 3),
            "rows": [r.to_json() for r in self.rows],
            "notes": self.notes,
            "results": self.data,
        }


class Progress(Protocol):
    """Where workloads report their steps (see ``aiopgalloc._bench.progress``)."""

    def begin(self, key: int, title: str, total: int) -> None:
        """A workload starts with ``total`` steps."""

    def step(self, detail: str) -> None:
        """One step of the current workload is done."""

    def end(self) -> None:
        """The current workload is done."""


# ------------------------------------------------------------------ timing


def median(xs: Sequence[float]) -> float:
    """The median (NaN for no samples)."""
    return statistics.median(xs) if xs else math.nan


def p99(xs: Sequence[float]) -> float:
    """The 99th percentile, nearest rank (NaN for no samples)."""
    if not xs:
        return math.nan
    s = sorted(xs)
    return s[max(0, math.ceil(0.99 * len(s)) - 1)]


def spread_pct(xs: Sequence[float]) -> float:
    """(max - min) / median, in percent: how noisy the samples were."""
    m = median(xs)
    return 100.0 * (max(xs) - min(xs)) / m if xs and m else 0.0


def rotate(items: Sequence[T], k: int) -> list[T]:
    """``items`` rotated left by ``k``."""
    if not items:
        return []
    k %= len(items)
    return [*items[k:], *items[:k]]


def collect() -> None:
    """Collect garbage before a timed section."""
    gc.collect()


def interleave(
    contenders: Sequence[tuple[str, Callable[[int], T]]],
    reps: int,
    progress: Progress,
) -> dict[str, list[T]]:
    """Run every contender ``reps`` times, round by round, the order rotated
    each round; ``fn(rep)`` returns one sample.  Returns the samples by name."""
    samples: dict[str, list[T]] = {name: [] for name, _ in contenders}
    for rep in range(reps):
        for name, fn in rotate(contenders, rep):
            samples[name].append(fn(rep))
            progress.step(f"{name}, repetition {rep + 1}/{reps}")
    return samples


def write_pages(buf: Any, start: int, n: int) -> None:
    """Write one byte (1) in every page of ``buf[start:start + n]`` (a
    memoryview, an mmap or a bytearray): what commits them.  Timed loops
    inline it instead (the call per allocation would be part of the figure)."""
    for o in range(start, start + n, PAGE_SIZE):
        buf[o] = 1


def run_on(backend: str, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    """``anyio.run(fn, *args)`` on a backend label of ``BACKENDS``."""
    name, options = BACKENDS[backend]
    return anyio.run(fn, *args, backend=name, backend_options=options)


# ------------------------------------------------------------------ format


def fmt_time(seconds: float) -> str:
    """Seconds with a unit that keeps three significant digits."""
    if math.isnan(seconds):
        return "-"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds * 1e6:.3g} us"


def fmt_rate(per_s: float, unit: str = "/s") -> str:
    """A rate with thousands separators."""
    if math.isnan(per_s):
        return "-"
    return f"{per_s:,.0f}{unit}"


def fmt_bytes(n: float) -> str:
    """Bytes in B, KiB, MiB or GiB."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.4g} {unit}"
    return f"{n:.0f} B"


# ------------------------------------------------------------------ machine


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str | None:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return None


def _meminfo() -> dict[str, int]:
    out: dict[str, int] = {}
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("MemTotal", "MemAvailable", "SwapTotal"):
                out[key] = int(rest.split()[0]) * 1024
    return out


def _memcg_limit() -> int | None:
    """The memory limit of this process's cgroup, where one is set."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        with contextlib.suppress(OSError, ValueError):
            text = Path(path).read_text().strip()
            if text == "max":
                return None
            value = int(text)
            return None if value >= 1 << 60 else value
    return None


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def _git() -> dict[str, Any]:
    """The checkout's commit, when the package runs from one."""
    root = Path(__file__).resolve().parent.parent.parent
    if not (root / ".git").exists():
        return {"commit": None, "dirty": None}
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return {"commit": head, "dirty": bool(dirty)}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}


PACKAGES = ("aiopgalloc", "anyio", "trio", "uvloop", "sortedcontainers")
OPTIONAL_PACKAGES = ("pyarrow", "rich", "matplotlib")


def machine_info() -> dict[str, Any]:
    """Where the numbers come from: the host, the CPU, the memory, the
    interpreter and the package versions."""
    mem = _meminfo()
    return {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "kernel": platform.release(),
        "machine": platform.machine(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)),
        "memory_total": mem.get("MemTotal"),
        "memory_available": mem.get("MemAvailable"),
        "swap_total": mem.get("SwapTotal"),
        "memory_cgroup_limit": _memcg_limit(),
        "thp_enabled": _read("/sys/kernel/mm/transparent_hugepage/enabled"),
        "thp_shmem_enabled": _read("/sys/kernel/mm/transparent_hugepage/shmem_enabled"),
        "loadavg_start": list(os.getloadavg()),
        "python": sys.version,
        "python_version": platform.python_version(),
        "implementation": platform.python_implementation(),
        "packages": {
            "python": platform.python_version(),
            **{n: _version(n) for n in PACKAGES},
        },
        "optional_packages": {n: _version(n) for n in OPTIONAL_PACKAGES},
        "git": _git(),
    }
