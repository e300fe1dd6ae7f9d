"""The user-facing side of eviction: what a user implements, what it passes
in, and what it reads back.

- ``EvictableMemoryUser``: the protocol a cache implements to have its
  evictable ranges taken back (its ``evict`` contract is here);
- ``check_evictable_range`` / ``check_user``: the argument checks of the
  ``mark_*`` methods, run before any lock is taken;
- ``EvictionStats``: the frozen snapshot of the eviction figures.

Split from ``aiopgalloc.eviction`` (the engine: per-user evictable sets, the
eviction tasks, their locking and invariants) because none of this touches
that state: these are plain types and pure checks, importable without the
engine (``stats`` and the public package only need them).  The old names
stay importable from ``aiopgalloc.eviction``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from .ranges import EvictableRange

__all__ = [
    "MAX_USER_OFFSET",
    "EvictableMemoryUser",
    "EvictionStats",
    "check_evictable_range",
    "check_user",
]

MAX_USER_OFFSET = 1 << 64
"""Bounds of the user's offset space (the reference's uint64)."""


@runtime_checkable
class EvictableMemoryUser(Protocol):
    """A user of the memory file that can give memory back on request.

    Users are told apart by identity (they need not be hashable, and two
    equal users are still two users).  The file keeps a reference to a user
    while it has evictable ranges or an eviction running.

    ``evict`` runs in the file's task group, on its event loop, with no lock
    held: it may call any method of the file (``dec_ref``, ``mark_*``), but
    not ``wait_for_evictions`` (it would wait for itself: ``RuntimeError``).
    It must let itself be cancelled: closing the file cancels it and waits
    for it to end.
    """

    async def evict(self, er: EvictableRange) -> None:
        """Give back the memory behind ``er`` (in the user's own offsets),
        which was marked evictable.  It may have been marked unevictable in
        the meantime: then do nothing.  After the call the file treats ``er``
        as unevictable until it is marked again.  An exception is logged and
        counted, not propagated."""
        ...


@dataclass(frozen=True, slots=True)
class EvictionStats:
    """One snapshot of the eviction figures (see ``Evictions.stats``).

    ``users``: users with evictable ranges or a running eviction;
    ``evictable_bytes``: bytes marked evictable and not yet handed to
    ``evict``; ``outstanding``: eviction tasks started and not finished
    (queued ones included); ``started``/``finished``: eviction tasks;
    ``evict_calls``: calls of ``evict``; ``evicted_bytes``: bytes of the
    calls that returned normally; ``failed``: calls that raised (or were
    cancelled by something other than the file); ``pressure_events``:
    ``on_pressure`` notifications acted upon; ``max_pressure_level``: the
    highest level among them (0 if none).
    """

    users: int
    evictable_bytes: int
    outstanding: int
    started: int
    finished: int
    evict_calls: int
    evicted_bytes: int
    failed: int
    pressure_events: int
    max_pressure_level: int


def check_evictable_range(er: object, what: str) -> tuple[int, int]:
    """``er``'s bounds as ints, or ``TypeError``/``ValueError`` naming ``what``."""
    if not isinstance(er, EvictableRange):
        raise TypeError(f"{what}: expected an EvictableRange, got {type(er).__name__}")
    start, end = er
    for x in (start, end):
        if isinstance(x, bool) or not isinstance(x, int):
            raise TypeError(f"{what}: range bounds must be ints, got {er!r}")
    if start < 0 or end <= start or end > MAX_USER_OFFSET:
        raise ValueError(f"{what}: empty, negative or ill-formed range {er!r}")
    return int(start), int(end)


def _is_async_callable(fn: object) -> bool:
    if inspect.iscoroutinefunction(fn):
        return True
    call = getattr(fn, "__call__", None)  # noqa: B004 - an object with async __call__
    return call is not None and inspect.iscoroutinefunction(call)


def check_user(user: object, what: str) -> None:
    """``TypeError`` naming ``what`` unless ``user`` has an async ``evict``.
    Looking ``evict`` up may run user code: call it without a lock held."""
    evict = getattr(user, "evict", None)
    if evict is None or not _is_async_callable(evict):
        raise TypeError(
            f"{what}: the user must have an async evict(er) method, got {type(user).__name__}"
        )
