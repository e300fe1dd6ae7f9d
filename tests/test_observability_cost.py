"""Observability that stays cheap however fragmented the file is.

``stats()`` reads figures the books keep as they change (O(1) in the number
of segments) and ``str(mf)`` prints a bounded summary; ``page_map()`` is
the explicit call for the whole map.  The checks count work, not time: the
same answers, and a bounded string, at 10 and at 20,000 segments.
"""

from __future__ import annotations

import pytest

from aiopgalloc import PAGE_SIZE, FileRange, MemoryFile, open_memory_file
from aiopgalloc.memory_file import STR_SEGMENTS

pytestmark = pytest.mark.anyio

P = PAGE_SIZE


async def _fragmented(mf: MemoryFile, n: int) -> list[FileRange]:
    """``n`` one-page live segments with clean gaps between them: allocate
    2n pages one by one, free every other one, let the releaser return
    them."""
    frs = [mf.allocate(P) for _ in range(2 * n)]
    for fr in frs[1::2]:
        mf.dec_ref(fr)
    await mf.wait_for_reclaim()
    return frs[0::2]


@pytest.mark.parametrize("n", [10, 20_000])
async def test_stats_and_str_stay_bounded(n: int) -> None:
    async with open_memory_file() as mf:
        live = await _fragmented(mf, n)
        st = mf.stats()
        assert st.segments == n
        assert st.live_bytes == n * P
        assert st.freed_bytes == 0
        text = str(mf)
        lines = text.splitlines()
        assert lines[0].startswith("MemoryFile size=")
        assert f"segments={n}" in lines[0]
        # A header, at most STR_SEGMENTS segment lines and a "more" line.
        assert len(lines) <= 1 + STR_SEGMENTS + 1
        if n > STR_SEGMENTS:
            assert lines[-1] == f"... {n - STR_SEGMENTS} more segments"
        assert len(text) < 4096
        # The whole map is one explicit call away.
        runs = mf.page_map()
        assert [(r.start, r.end) for r in runs] == [(fr.start, fr.end) for fr in live]
        for fr in live:
            mf.dec_ref(fr)
