"""A model-based (stateful) test of ``PageCache`` on every backend.

Hypothesis drives a real cache on a real memory file (its event loop in a
background thread: ``anyio.from_thread``'s blocking portal, one per
backend) and a plain reference side by side: a dict of key -> (bytes,
version, visited bit, expiry) plus a list-based SIEVE written apart from the
cache's own (a list of keys oldest first and the key the hand points at).
The reference predicts every outcome: which keys a put pushes out, which
keys a low or medium pressure event sheds (the share the file asks for,
coldest first in SIEVE's order), hits, misses, expiries, and the pages the
file holds (the cache's, plus those of values that left the cache while a
reader still pins them).

After every step: ``cache.check_invariants()``, ``mf.check_invariants()``,
the figures against the reference, the file's live bytes, and the ledger
(the file's evictable bytes equal ``cache.nbytes``).  At the end every pin
is released and the cache cleared, and the file must hold no live page.

About 10-20 s per backend; ``AIOPGALLOC_FUZZ=long`` runs ten times the
examples.
"""

from __future__ import annotations

import math
import time
from typing import Any, ClassVar

import anyio
import pytest
from anyio.from_thread import BlockingPortal
from helpers import FUZZ_LONG, backend_id, blocking_portal
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from aiopgalloc import (
    PAGE_SIZE,
    ManualPressure,
    MemoryFileOpts,
    PageCache,
    PinnedValue,
    PressureLevel,
    open_memory_file,
    page_round_down,
)

P = PAGE_SIZE
LOW, MEDIUM = 0.25, 0.5
EXAMPLES = 1200 if FUZZ_LONG else 120
STEP_COUNT = 40
KEYS = st.integers(0, 11)
LENGTHS = st.sampled_from([0, 1, 100, P - 1, P, P + 1, 2 * P + 7, 3 * P, 5 * P])
SETTINGS = settings(
    max_examples=EXAMPLES,
    stateful_step_count=STEP_COUNT,
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
STEPS: dict[str, int] = {}


def pages_of(n: int) -> int:
    return -(-n // P) * P


class RefSieve:
    """The reference: SIEVE over a list, written for clarity, not speed."""

    def __init__(self, max_bytes: int) -> None:
        self.max = max_bytes
        self.queue: list[int] = []  # keys, oldest first
        self.hand: int | None = None  # the key the hand is at; None: the oldest
        self.data: dict[int, bytes] = {}
        self.version: dict[int, int] = {}
        self.visited: dict[int, bool] = {}
        self.expires: dict[int, float | None] = {}
        self.held = 0

    def victim(self) -> int:
        i = 0 if self.hand is None else self.queue.index(self.hand)
        while self.visited[self.queue[i]]:
            self.visited[self.queue[i]] = False
            i = (i + 1) % len(self.queue)
        self.hand = self.queue[i]
        return self.hand

    def remove(self, key: int) -> None:
        i = self.queue.index(key)
        if self.hand == key:
            self.hand = self.queue[i + 1] if i + 1 < len(self.queue) else None
        del self.queue[i]
        self.held -= pages_of(len(self.data.pop(key)))
        del self.version[key], self.visited[key], self.expires[key]

    def insert(self, key: int, data: bytes, version: int, expires: float | None) -> None:
        self.queue.append(key)
        self.data[key] = data
        self.version[key] = version
        self.visited[key] = False
        self.expires[key] = expires
        self.held += pages_of(len(data))


class PageCacheMachine(RuleBasedStateMachine):
    portal: ClassVar[BlockingPortal]
    backend: ClassVar[str]

    def __init__(self) -> None:
        super().__init__()
        self.now = 1000.0
        self.counter = 0
        self.pins: list[tuple[PinnedValue, memoryview, bytes, int]] = []
        self.gone: dict[int, int] = {}  # version -> pages, of pinned values out of the cache
        self.hits = self.misses = self.expired = self.by_capacity = self.by_pressure = 0

    @initialize(max_pages=st.integers(2, 16))
    def open_cache(self, max_pages: int) -> None:
        self.src = ManualPressure()
        opts = MemoryFileOpts(
            pressure_source=self.src, evict_fraction_low=LOW, evict_fraction_medium=MEDIUM
        )
        self.cm = self.portal.wrap_async_context_manager(open_memory_file(opts=opts))
        self.mf = self.cm.__enter__()
        self.cache = PageCache(self.mf, max_bytes=max_pages * P, clock=lambda: self.now)
        self.ref = RefSieve(max_pages * P)

    def teardown(self) -> None:
        if not hasattr(self, "cm"):
            return
        try:
            for pinned, view, data, _ in self.pins:
                assert bytes(view) == data
                pinned.release()
            self.pins.clear()
            self.cache.clear()
            assert self.mf.stats().live_bytes == 0, "pages left after clear"
            self.mf.check_invariants()
        finally:
            self.cm.__exit__(None, None, None)

    # ------------------------------------------------------------ helpers

    def _drop(self, key: int) -> None:
        """The reference drops ``key``; a pinned version stays live."""
        v = self.ref.version[key]
        if any(ver == v for *_, ver in self.pins):
            self.gone[v] = pages_of(len(self.ref.data[key]))
        self.ref.remove(key)

    def _expired(self, key: int) -> bool:
        e = self.ref.expires[key]
        return e is not None and self.now >= e

    def _lookup(self, key: int) -> bytes | None:
        """The reference's side of get/get_bytes."""
        if key in self.ref.data and self._expired(key):
            self._drop(key)
            self.expired += 1
        if key not in self.ref.data:
            self.misses += 1
            return None
        self.ref.visited[key] = True
        self.hits += 1
        return self.ref.data[key]

    # -------------------------------------------------------------- rules

    @rule(key=KEYS, length=LENGTHS, ttl=st.sampled_from([None, None, 1.0, 5.0]))
    def put(self, key: int, length: int, ttl: float | None) -> None:
        self.counter += 1
        stamp = f"<{key}.{self.counter}>".encode()
        data = (stamp * (length // len(stamp) + 1))[:length]
        if pages_of(length) > self.ref.max:
            with pytest.raises(ValueError, match="more than max_bytes"):
                self.cache.put(key, data, ttl=ttl)
            return
        self.cache.put(key, bytearray(data), ttl=ttl)
        ref = self.ref
        if key in ref.data:
            self._drop(key)
        while ref.held + pages_of(length) > ref.max:
            self._drop(ref.victim())
            self.by_capacity += 1
        ref.insert(key, data, self.counter, None if ttl is None else self.now + ttl)

    @rule(key=KEYS, bad=st.sampled_from(["str", 1, None, ["list"]]))
    def put_bad(self, key: int, bad: Any) -> None:
        with pytest.raises(TypeError):
            if isinstance(bad, list):
                self.cache.put(bad, b"x")  # an unhashable key
            else:
                self.cache.put(key, bad)

    @rule(key=KEYS, hold=st.booleans())
    def get(self, key: int, hold: bool) -> None:
        pinned = self.cache.get(key)
        want = self._lookup(key)
        if want is None:
            assert pinned is None
            return
        assert pinned is not None
        view = pinned.__enter__()
        assert bytes(view) == want
        if hold:
            self.pins.append((pinned, view, want, self.ref.version[key]))
        else:
            pinned.__exit__(None, None, None)

    @rule(key=KEYS)
    def get_bytes(self, key: int) -> None:
        got = self.cache.get_bytes(key)
        assert got == self._lookup(key)

    @precondition(lambda self: self.pins)
    @rule(i=st.integers(0, 1 << 8))
    def release(self, i: int) -> None:
        pinned, view, data, version = self.pins.pop(i % len(self.pins))
        assert bytes(view) == data, "a pinned value changed under its reader"
        pinned.__exit__(None, None, None)
        if version in self.gone and all(v != version for *_, v in self.pins):
            del self.gone[version]

    @rule(key=KEYS)
    def delete(self, key: int) -> None:
        live = key in self.ref.data and not self._expired(key)
        if key in self.ref.data:
            if not live:
                self.expired += 1
            self._drop(key)
        assert self.cache.delete(key) is live

    @rule(key=KEYS)
    def contains(self, key: int) -> None:
        assert (key in self.cache) is (key in self.ref.data and not self._expired(key))

    @rule(dt=st.sampled_from([0.5, 1.0, 3.0]))
    def advance_clock(self, dt: float) -> None:
        self.now += dt

    @rule()
    def clear(self) -> None:
        self.cache.clear()
        for key in list(self.ref.queue):
            self._drop(key)
        self.ref.hand = None

    @rule(level=st.sampled_from(list(PressureLevel)))
    def pressure(self, level: PressureLevel) -> None:
        ref = self.ref
        n = ref.held
        if n:
            if level is PressureLevel.CRITICAL:
                want = n
            else:
                share = math.ceil(n * (LOW if level is PressureLevel.LOW else MEDIUM))
                cut = page_round_down(n - share)
                want = n - cut if cut > 0 else n
            shed = 0
            while shed < want and ref.queue:
                k = ref.victim()
                shed += pages_of(len(ref.data[k]))
                self._drop(k)
                self.by_pressure += 1
        before = self.mf.stats().evictions.pressure_events
        self.src.notify(level)

        async def settle() -> None:
            with anyio.fail_after(10):
                while self.mf.stats().evictions.pressure_events == before:  # noqa: ASYNC110
                    await anyio.sleep(0.001)
                await self.mf.wait_for_evictions()

        self.portal.call(settle)

    # ----------------------------------------------------------- invariants

    @invariant()
    def matches_the_reference(self) -> None:
        if not hasattr(self, "cache"):
            return
        STEPS[self.backend] = STEPS.get(self.backend, 0) + 1
        cache, ref, mf = self.cache, self.ref, self.mf
        cache.check_invariants()
        mf.check_invariants()
        st_ = cache.stats()
        assert st_.entries == len(ref.data) and len(cache) == len(ref.data)
        assert st_.bytes_held == cache.nbytes == ref.held
        assert st_.value_bytes == sum(len(d) for d in ref.data.values())
        assert (st_.hits, st_.misses, st_.expired) == (self.hits, self.misses, self.expired)
        assert (st_.evicted_by_capacity, st_.evicted_by_pressure) == (
            self.by_capacity,
            self.by_pressure,
        )
        assert st_.pinned == len(self.pins)
        fs = mf.stats()
        assert fs.live_bytes == ref.held + sum(self.gone.values()), "pages leaked or freed early"
        assert fs.evictions.evictable_bytes == ref.held, "the ledger is out of step"


def test_page_cache_matches_model(anyio_backend: Any, capsys: pytest.CaptureFixture[str]) -> None:
    bid = backend_id(anyio_backend)
    STEPS[bid] = 0
    t0 = time.perf_counter()
    with blocking_portal(anyio_backend) as portal:
        PageCacheMachine.portal = portal
        PageCacheMachine.backend = bid
        run_state_machine_as_test(PageCacheMachine, settings=SETTINGS)
    seconds = time.perf_counter() - t0
    with capsys.disabled():
        print(f"\n[page-cache model, {bid}] {STEPS[bid]} steps checked, {seconds:.1f} s")
    assert STEPS[bid] >= EXAMPLES * 5
