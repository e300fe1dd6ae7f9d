"""``has_unique_ref`` and ``first_shared_range``: copy-on-write queries.

Checked against a per-page count of references kept by the test, over
random inc_ref/dec_ref sequences, and for their errors.
"""

from __future__ import annotations

import random

import pytest

from aiopgalloc import PAGE_SIZE, ClosedError, FileRange, RefCountError, open_memory_file

pytestmark = pytest.mark.anyio

P = PAGE_SIZE


def expected_first_shared(refs: dict[int, int], a: int, b: int) -> FileRange | None:
    run: list[int] = []
    for i in range(a, b):
        if refs[i] > 1:
            if run and run[-1] != i - 1:
                break
            run.append(i)
        elif run:
            break
    return FileRange(run[0] * P, (run[-1] + 1) * P) if run else None


async def test_queries_match_a_per_page_count() -> None:
    rng = random.Random(7)
    async with open_memory_file() as mf:
        base = mf.allocate(64 * P)
        refs = dict.fromkeys(range(64), 1)
        for _ in range(300):
            a = rng.randrange(64)
            b = rng.randrange(a + 1, min(64, a + 12) + 1)
            fr = FileRange(base.start + a * P, base.start + b * P)
            if rng.random() < 0.6:
                mf.inc_ref(fr)
                for i in range(a, b):
                    refs[i] += 1
            elif all(refs[i] > 1 for i in range(a, b)):
                mf.dec_ref(fr)
                for i in range(a, b):
                    refs[i] -= 1
            qa = rng.randrange(64)
            qb = rng.randrange(qa + 1, 65)
            q = FileRange(base.start + qa * P, base.start + qb * P)
            want = expected_first_shared(refs, qa, qb)
            if want is not None:
                want = FileRange(base.start + want.start, base.start + want.end)
            assert mf.first_shared_range(q) == want
            assert mf.has_unique_ref(q) is (want is None)
        mf.check_invariants()


async def test_a_fresh_allocation_is_unique_until_shared() -> None:
    async with open_memory_file() as mf:
        fr = mf.allocate(4 * P)
        assert mf.has_unique_ref(fr)
        assert mf.first_shared_range(fr) is None
        mid = FileRange(fr.start + P, fr.start + 3 * P)
        mf.inc_ref(mid)
        assert not mf.has_unique_ref(fr)
        assert mf.first_shared_range(fr) == mid
        assert mf.has_unique_ref(FileRange(fr.start, fr.start + P))
        mf.dec_ref(mid)
        assert mf.has_unique_ref(fr)
        mf.dec_ref(fr)


async def test_errors_change_nothing() -> None:
    async with open_memory_file() as mf:
        fr = mf.allocate(2 * P)
        before = mf.page_map()
        with pytest.raises(RefCountError):
            mf.has_unique_ref(FileRange(fr.start, fr.end + P))  # a page not allocated
        with pytest.raises(TypeError):
            mf.first_shared_range((fr.start, fr.end))  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            mf.has_unique_ref(FileRange(fr.start, fr.start + 1))
        assert mf.page_map() == before
        mf.dec_ref(fr)
        with pytest.raises(RefCountError):
            mf.has_unique_ref(fr)  # freed
    with pytest.raises(ClosedError):
        mf.has_unique_ref(fr)
