"""Workload 13: PageCache against the caches a service would use instead.

(a) Throughput, side by side, same keys, same value-size mix (64 B to
16 KiB: 64, 256, 1 KiB, 4 KiB, 16 KiB, one fifth each), Zipf(0.9) keys over
a key space 10x what the caches hold, byte-bounded alike (``max_bytes`` of
pages for PageCache; ``cachetools.LRUCache(maxsize, getsizeof=len)`` holding
``bytes``; a plain ``dict`` with no bound, the ceiling).  Two mixes: *read*
(90 % lookups, a miss followed by a put, as a read-through cache does) and
*put* (puts only).  A PageCache lookup is ``get`` entered and exited (a
zero-copy pinned view), also shown as ``get_bytes`` (a copy); the peers'
lookup returns the stored ``bytes`` object.  Medians of ``reps`` samples
taken round-robin (order rotated each round), in operations per second.

(b) Hit ratio of the shipped policy (SIEVE) against LRU on Zipf traces
(alpha 0.9 and 1.0) over a key space 10x the capacity, the policies
simulated with the cache's own policy code on one-page values, and the real
PageCache run on the same trace as a check that it behaves as simulated.

No target: the figures inform the README's table.
"""

from __future__ import annotations

import importlib
import itertools
import random
import time
from collections.abc import Callable
from typing import Any

from .._cache_policy import POLICIES, Linked
from ..lifecycle import open_memory_file
from ..page_cache import PageCache
from ..ranges import PAGE_SIZE
from .common import (
    Config,
    Progress,
    Row,
    WorkloadResult,
    collect,
    fmt_rate,
    interleave,
    median,
    run_on,
    spread_pct,
)

__all__ = ["hit_ratio", "run", "total_steps", "zipf_trace"]

NAME = "page_cache"
TITLE = "PageCache: get/put throughput against cachetools and dict; SIEVE vs LRU hit ratio"
SIZES = (64, 256, 1024, 4096, 16384)
ALPHAS = (0.9, 1.0)


def zipf_trace(n_keys: int, alpha: float, n: int, seed: int) -> list[int]:
    """``n`` keys in ``[0, n_keys)`` drawn with P(k) proportional to
    ``1 / (k + 1) ** alpha``."""
    rng = random.Random(seed)
    cum = list(itertools.accumulate(1.0 / (k**alpha) for k in range(1, n_keys + 1)))
    return rng.choices(range(n_keys), cum_weights=cum, k=n)


class _Sim(Linked):
    __slots__ = ("key",)

    def __init__(self, key: int) -> None:
        super().__init__()
        self.key = key


def hit_ratio(policy: str, trace: list[int], capacity: int) -> float:
    """The hit ratio of ``policy`` (``lru`` or ``sieve``) on ``trace`` with
    room for ``capacity`` equal-sized values, a miss inserting the key."""
    pol = POLICIES[policy]()
    table: dict[int, _Sim] = {}
    hits = 0
    for k in trace:
        e = table.get(k)
        if e is not None:
            hits += 1
            pol.hit(e)
            continue
        if len(table) >= capacity:
            v = pol.victim()
            assert isinstance(v, _Sim)
            pol.remove(v)
            del table[v.key]
        e = _Sim(k)
        pol.insert(e)
        table[k] = e
    return hits / len(trace)


async def _real_hit_ratio(trace: list[int], capacity: int) -> float:
    """The real PageCache (one-page values) on ``trace``: get, put on a miss."""
    async with open_memory_file() as mf:
        cache = PageCache(mf, max_bytes=capacity * PAGE_SIZE, evictable=False)
        data = b"v" * 100
        for k in trace:
            if cache.get_bytes(k) is None:
                cache.put(k, data)
        return cache.stats().hit_ratio


def total_steps(cfg: Config) -> int:
    """Progress steps: every throughput sample, then the hit-ratio rows."""
    return 2 * 4 * cfg.reps + len(ALPHAS) * 2


def _values(n_keys: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    return [bytes([k % 251]) * rng.choice(SIZES) for k in range(n_keys)]


async def _throughput(cfg: Config, progress: Progress) -> dict[str, Any]:
    n_ops = cfg.pick(200_000, 60_000, 5_000)
    mean = sum(SIZES) / len(SIZES)
    max_bytes = cfg.pick(64 << 20, 32 << 20, 4 << 20)
    # A key space 10x what the byte-bound caches hold (by value bytes).
    n_keys = int(10 * max_bytes / mean)
    values = _values(n_keys, cfg.seed)
    trace = zipf_trace(n_keys, 0.9, n_ops, cfg.seed)
    rng = random.Random(cfg.seed + 1)
    is_put = [rng.random() < 0.1 for _ in range(n_ops)]
    cachetools: Any
    try:
        # Imported by name: the lint environment need not have it.
        cachetools = importlib.import_module("cachetools")
    except ImportError:  # pragma: no cover - the bench extra installs it
        cachetools = None

    out: dict[str, Any] = {"ops": n_ops, "keys": n_keys, "max_bytes": max_bytes}
    async with open_memory_file() as mf:

        def make(name: str) -> Any:
            if name.startswith("PageCache"):
                return PageCache(mf, max_bytes=max_bytes, evictable=False)
            if name == "cachetools.LRUCache":
                return cachetools.LRUCache(maxsize=max_bytes, getsizeof=len)
            return {}

        def read_mix(name: str) -> Callable[[int], float]:
            def sample(_rep: int) -> float:
                c = make(name)
                for k in trace[: n_ops // 4]:  # warm up
                    if k not in c:
                        c.put(k, values[k]) if isinstance(c, PageCache) else c.__setitem__(
                            k, values[k]
                        )
                collect()
                t0 = time.perf_counter()
                if name == "PageCache.get":
                    get, put = c.get, c.put
                    for k, p in zip(trace, is_put, strict=True):
                        if p:
                            put(k, values[k])
                            continue
                        h = get(k)
                        if h is None:
                            put(k, values[k])
                        else:
                            with h as v:
                                v.nbytes  # noqa: B018 - the read
                elif name == "PageCache.get_bytes":
                    getb, put = c.get_bytes, c.put
                    for k, p in zip(trace, is_put, strict=True):
                        if p or getb(k) is None:
                            put(k, values[k])
                else:
                    dget = c.get
                    for k, p in zip(trace, is_put, strict=True):
                        if p or dget(k) is None:
                            c[k] = values[k]
                dt = time.perf_counter() - t0
                if isinstance(c, PageCache):
                    c.clear()
                return n_ops / dt

            return sample

        def put_mix(name: str) -> Callable[[int], float]:
            def sample(_rep: int) -> float:
                c = make(name)
                collect()
                t0 = time.perf_counter()
                if isinstance(c, PageCache):
                    put = c.put
                    for k in trace:
                        put(k, values[k])
                else:
                    for k in trace:
                        c[k] = values[k]
                dt = time.perf_counter() - t0
                if isinstance(c, PageCache):
                    c.clear()
                return n_ops / dt

            return sample

        peers = ["cachetools.LRUCache", "dict"] if cachetools is not None else ["dict"]
        names = ["PageCache.get", "PageCache.get_bytes", *peers]
        out["read"] = interleave([(n, read_mix(n)) for n in names], cfg.reps, progress)
        put_names = ["PageCache.put", *peers]
        out["put"] = interleave([(n, put_mix(n)) for n in put_names], cfg.reps, progress)
        for _ in range(2 * 4 * cfg.reps - len(names) * cfg.reps - len(put_names) * cfg.reps):
            progress.step("(no cachetools)")
    return out


def run(cfg: Config, progress: Progress) -> WorkloadResult:
    """Run workload 13 on the primary backend."""
    result = WorkloadResult(
        key=13,
        name=NAME,
        title=TITLE,
        backends=[cfg.primary],
        params={"value_sizes": list(SIZES), "zipf_alpha_throughput": 0.9, "seed": cfg.seed},
    )
    tp = run_on(cfg.primary, _throughput, cfg, progress)
    result.params.update(ops=tp["ops"], keys=tp["keys"], max_bytes=tp["max_bytes"])
    for mix, samples in (("read 90%/put 10%", tp["read"]), ("put only", tp["put"])):
        peer = samples.get("cachetools.LRUCache")
        peer_med = median(peer) if peer else None
        for name, xs in samples.items():
            m = median(xs)
            result.rows.append(
                Row(
                    measurement=f"{mix}: {name}",
                    value=f"{fmt_rate(m, ' op/s')} (spread {spread_pct(xs):.0f}%)",
                    peer="" if peer_med is None else f"LRUCache {fmt_rate(peer_med, ' op/s')}",
                    ratio=None if peer_med is None else m / peer_med,
                    ratio_note="x cachetools.LRUCache (higher is faster)",
                )
            )
    n_req = cfg.pick(1_000_000, 300_000, 20_000)
    capacity = cfg.pick(1000, 1000, 200)
    hits: dict[str, dict[str, float]] = {}
    for alpha in ALPHAS:
        trace = zipf_trace(10 * capacity, alpha, n_req, cfg.seed)
        lru = hit_ratio("lru", trace, capacity)
        sieve = hit_ratio("sieve", trace, capacity)
        progress.step(f"alpha {alpha}: simulated")
        real = run_on(cfg.primary, _real_hit_ratio, trace, capacity)
        progress.step(f"alpha {alpha}: real PageCache")
        hits[str(alpha)] = {"lru": lru, "sieve": sieve, "page_cache": real}
        result.rows.append(
            Row(
                measurement=f"hit ratio, Zipf {alpha}, {capacity:,} of {10 * capacity:,} keys",
                value=f"SIEVE {sieve:.3f} (PageCache {real:.3f})",
                peer=f"LRU {lru:.3f}",
                ratio=sieve / lru,
                ratio_note="x LRU's hit ratio (higher is better)",
            )
        )
    result.params.update(hit_requests=n_req, hit_capacity=capacity)
    result.data = {"throughput": tp, "hit_ratio": hits}
    result.notes.append(
        "PageCache stores each value in whole pages (a 64-byte value takes 4 KiB of the file); "
        "its max_bytes counts pages, the LRUCache's maxsize counts value bytes"
    )
    return result
