"""A memory file holds a constant handful of fds, whatever its size.

Issue 13, defect 6: each mapped chunk used to hold a dup of the file's fd
(Python's ``mmap.mmap`` keeps one per mapping), so a large file exhausted
``RLIMIT_NOFILE`` and the process could not open a socket any more.  The
file is now mapped with raw ``mmap(2)``, which holds the file, not an fd.
"""

from __future__ import annotations

import gc
import textwrap
from typing import Any

import pytest
from helpers import mapping_of, open_fds, run_child

from aiopgalloc import HUGE_PAGE_SIZE, PAGE_SIZE, AccessType, MemoryFileOpts, open_memory_file

pytestmark = pytest.mark.anyio

H = HUGE_PAGE_SIZE
GROWTHS = 300


async def test_fd_count_does_not_grow_with_the_file() -> None:
    before_open = open_fds()
    async with open_memory_file(opts=MemoryFileOpts(chunk_size=H)) as mf:
        first = mf.allocate(H)
        views = [mf.map_internal(first)[0]]
        views[0][0] = 1
        fds_open = open_fds()
        # The handful the file needs (memfd, eventfd, its scan fd, ...).
        assert 0 < len(fds_open - before_open) <= 8
        size0 = mf.total_size()
        for i in range(GROWTHS):
            fr = mf.allocate(H)
            (v,) = mf.map_internal(fr, AccessType.READ_WRITE)
            v[PAGE_SIZE] = i & 0xFF
            views.append(v)
        # Hundreds of chunks later, mapped and touched: not one fd more.
        assert mf.total_size() >= size0 + GROWTHS * H
        assert open_fds() == fds_open
        assert mapping_of(mf).regions == 1
    # Every fd of the file is gone with it, while its views still work.
    assert open_fds() == before_open
    assert views[-1][PAGE_SIZE] == (GROWTHS - 1) & 0xFF
    views[-1][0] = 2
    assert views[-1][0] == 2
    del views, v
    gc.collect()
    assert mapping_of(mf).regions == 0


_CHILD = """
import resource, socket, sys
import anyio
from aiopgalloc import AccessType, open_memory_file

LIMIT = 64
RANGES = 200
MiB = 1 << 20

async def main():
    async with open_memory_file() as mf:
        views = []
        for i in range(RANGES):
            fr = mf.allocate(64 * MiB)
            v = mf.map_internal(fr, AccessType.READ_WRITE)[0]
            v[0] = i % 251 + 1
            views.append(v)
        assert mf.total_size() >= RANGES * 64 * MiB, mf.total_size()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
        assert [v[0] for v in views] == [i % 251 + 1 for i in range(RANGES)]
        print("fds", len(__import__("os").listdir("/proc/self/fd")))
        del views, v
    print("ok")

resource.setrlimit(resource.RLIMIT_NOFILE, (LIMIT, LIMIT))
anyio.run(main, backend=sys.argv[1], backend_options=OPTIONS)
"""


def test_more_64_mib_ranges_than_the_fd_limit(anyio_backend: tuple[str, dict[str, Any]]) -> None:
    """The issue's scenario, in a child limited to 64 fds: 200 ranges of
    64 MiB (12.5 GiB of sparse file, one page of each touched), then a
    socket.  Both succeed."""
    name, options = anyio_backend
    code = f"import sys; sys.argv[1:] = [{name!r}]\nOPTIONS = {dict(options)!r}\n"
    out = run_child(code + textwrap.dedent(_CHILD))
    assert out.returncode == 0, (out.returncode, out.stdout, out.stderr)
    lines = out.stdout.split()
    assert lines[-1] == "ok"
    assert int(lines[lines.index("fds") + 1]) < 64
