"""Waking the releaser from any thread, and telling waiters it made progress.

A ``dec_ref`` in any thread (a worker thread included, with no event loop of
its own) must be able to wake the releaser, which sleeps on the event loop.
An eventfd does that on every backend: writing it is one system call from
any thread, and the loop watches it with ``anyio.wait_readable``.  A burst of
frees should cost one write, not one each: a *pending* flag says a write is
already on its way, and the releaser clears it just before it looks at the
books, so a free after that look writes again.
"""

from __future__ import annotations

import contextlib
import os
import threading

import anyio

from .host.epoll import drain_eventfd, new_eventfd, signal_eventfd

__all__ = ["Wakeups"]


class Wakeups:
    """The releaser's eventfd and pending flag, and the progress event.

    ``wake``, ``signal`` and ``clear`` are thread-safe (a private lock);
    ``wait``, ``progress`` and ``progress_event`` run on the event loop.
    Make it inside the loop (it makes an ``anyio.Event``).
    """

    __slots__ = ("_closed", "_fd", "_lock", "_pending", "_progress")

    def __init__(self) -> None:
        self._fd = new_eventfd()
        self._lock = threading.Lock()
        self._pending = False  # guarded by _lock (read without it as a hint)
        self._closed = False  # guarded by _lock
        self._progress = anyio.Event()

    def wake(self) -> None:
        """Wake the releaser unless a wake-up is already pending.  Any
        thread; a no-op after ``close``.  O(1): one eventfd write at most."""
        if self._pending:
            return
        with self._lock:
            if self._pending or self._closed:
                return
            self._pending = True
            signal_eventfd(self._fd)

    def signal(self) -> None:
        """Wake the releaser whatever the flag says (a worker thread's job is
        done).  Any thread; a no-op after ``close``."""
        with self._lock:
            if not self._closed:
                signal_eventfd(self._fd)

    def clear(self) -> None:
        """The releaser is about to look at the books: the next free must
        wake it again."""
        self._pending = False

    async def wait(self) -> None:
        """Sleep until woken (on the event loop)."""
        await anyio.wait_readable(self._fd)
        drain_eventfd(self._fd)

    def progress_event(self) -> anyio.Event:
        """The event the next ``progress()`` sets: take it, then look at the
        state, then wait on it."""
        return self._progress

    def progress(self) -> None:
        """Tell waiters the releaser (or a decommit, or the close) made
        progress.  On the event loop."""
        ev, self._progress = self._progress, anyio.Event()
        ev.set()

    def close(self) -> None:
        """Close the eventfd; later wake-ups are dropped.  Call it once no
        task waits in ``wait``.  Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        with contextlib.suppress(OSError):
            os.close(self._fd)
