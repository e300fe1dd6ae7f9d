"""Everything that talks to Linux.

Modules here perform system calls and read kernel files; they hold no
allocator state and never import from the package above them.  The allocator
(``aiopgalloc.memory_file``) decides; this layer performs.

Importing this package on anything but Linux with ``memfd_create`` raises
``ImportError`` saying so, before any module here looks up a libc symbol
(which would fail with a less helpful ``AttributeError`` from ctypes).
``aiopgalloc/__init__.py`` imports it first, so ``import aiopgalloc`` refuses
the same way.
"""

from __future__ import annotations

import os
import sys

__all__ = ["unsupported_platform"]


def unsupported_platform(platform: str, has_memfd_create: bool) -> str | None:
    """Why this platform cannot run the allocator, or None when it can.

    ``platform`` is a ``sys.platform`` value; ``has_memfd_create`` whether
    this Python's ``os`` module offers ``memfd_create`` (Linux 3.17+ with a
    C library that wraps it).  Pure; no system call.
    """
    if platform != "linux":
        return (
            f"aiopgalloc requires Linux (memfd_create, fallocate, madvise, "
            f"mincore); this platform is {platform!r}"
        )
    if not has_memfd_create:
        return (
            "aiopgalloc requires Linux 3.17 or later and a Python whose os module "
            "has memfd_create; this Python's does not"
        )
    return None


_why_not = unsupported_platform(sys.platform, hasattr(os, "memfd_create"))
if _why_not is not None:
    raise ImportError(_why_not)
