"""Page sizes and transparent-huge-page settings of the running kernel.

The allocator aligns allocations of ``HUGE_PAGE_SIZE`` bytes or more on a
huge-page boundary so that, where the kernel backs shmem with transparent huge
pages, such a range can be one PMD mapping instead of 512 PTEs.  On machines
where ``shmem_enabled`` is ``never`` the alignment costs nothing but a little
address space.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["HUGE_PAGE_SIZE", "PAGE_SIZE", "read_huge_page_size", "thp_settings"]

_THP_DIR = Path("/sys/kernel/mm/transparent_hugepage")
_DEFAULT_HUGE_PAGE_SIZE = 2 * 1024 * 1024

PAGE_SIZE: int = os.sysconf("SC_PAGE_SIZE")
"""The size of a base page in bytes (4096 on x86-64)."""


def read_huge_page_size() -> int:
    """Return the PMD huge page size in bytes.

    Read from ``hpage_pmd_size`` in sysfs, then ``Hugepagesize`` in
    ``/proc/meminfo``; 2 MiB when neither can be read.  Cost: one or two small
    file reads (done once, at import).
    """
    try:
        size = int((_THP_DIR / "hpage_pmd_size").read_text().strip())
        if size > 0:
            return size
    except (OSError, ValueError):
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("Hugepagesize:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return _DEFAULT_HUGE_PAGE_SIZE


HUGE_PAGE_SIZE: int = read_huge_page_size()
"""The size of a PMD huge page in bytes (2 MiB on x86-64)."""


def thp_settings() -> dict[str, str]:
    """Return the active transparent-huge-page settings.

    Keys are the sysfs file names that exist (``enabled``, ``shmem_enabled``,
    ``defrag``); each value is the selected word (the one in brackets).  Files
    that cannot be read are left out.  Cost: a few small file reads.
    """
    settings: dict[str, str] = {}
    for name in ("enabled", "shmem_enabled", "defrag"):
        try:
            text = (_THP_DIR / name).read_text()
        except OSError:
            continue
        words = text.split()
        chosen = next((w[1:-1] for w in words if w.startswith("[") and w.endswith("]")), None)
        settings[name] = chosen if chosen is not None else text.strip()
    return settings
