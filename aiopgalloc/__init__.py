"""aiopgalloc: a page allocator for async Python services.

One memfd, page-aligned reference-counted ranges of it, freed memory given
back to the kernel, async eviction callbacks under memory pressure, and
honest per-kind accounting; on asyncio, asyncio + uvloop and trio alike.
"""

from .checkpoint_format import CheckpointError
from .errors import ClosedError, RefCountError
from .eviction_api import EvictableMemoryUser, EvictionStats
from .lifecycle import load_memory_file, open_memory_file
from .memory_file import MemoryFile
from .options import AccessType, CommitMode, DelayedEviction, MemoryFileOpts
from .ranges import HUGE_PAGE_SIZE, PAGE_SIZE, EvictableRange, FileRange
from .stats import FileStats
from .usage import MemoryAccounting, MemoryKind, MemoryStats

__all__ = [
    "HUGE_PAGE_SIZE",
    "PAGE_SIZE",
    "AccessType",
    "CheckpointError",
    "ClosedError",
    "CommitMode",
    "DelayedEviction",
    "EvictableMemoryUser",
    "EvictableRange",
    "EvictionStats",
    "FileRange",
    "FileStats",
    "MemoryAccounting",
    "MemoryFile",
    "MemoryFileOpts",
    "MemoryKind",
    "MemoryStats",
    "RefCountError",
    "load_memory_file",
    "open_memory_file",
]
