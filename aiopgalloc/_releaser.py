"""The releaser: the task that returns freed pages to the kernel.

One task per memory file, in the file's task group.  It loops: take a
release batch from the books (under the file's lock: the pages become
*releasing*, so no allocation recycles them meanwhile), punch it out
(``fallocate(PUNCH_HOLE)``) without the lock, settle the books, tell
waiters.  With nothing to do it sleeps on the wake-ups' eventfd, which any
thread's ``dec_ref`` signals without needing the event loop.

Which side of the thread hop
----------------------------
A worker-thread round trip costs far more than punching a few small ranges
(a punch of one resident page costs microseconds; a hop, a few hundred).
So a small batch (``MemoryFileOpts.release_inline_max_bytes`` / ``_ranges``)
is punched on the event loop, which it holds for well under a millisecond,
and anything larger goes to a thread.  Each punch is at most 128 MiB: Linux
serialises fallocate calls on one shmem file, and one huge punch would hold
up every other fallocate on it (the books cut the batches).

The worker thread and the GIL
-----------------------------
A thread waiting for the GIL asks for it only after a whole switch interval
(5 ms by default) in which the holder never let go.  An event loop busy
with ``dec_ref`` calls lets go at every ``await`` (in its poll) and takes it
straight back, which restarts that wait; with bursts shorter than the
interval, a plain ``to_thread`` worker starves, and its punches begin only
once the frees are over.  So the releaser has its own worker thread
(``_Puncher``) and hands the GIL over on purpose: right after submitting a
job it blocks on the job's "started" event (the worker takes the GIL and
enters fallocate, which releases it), and once the punch should be over
(``_PUNCH_BYTES_PER_S``) it blocks on the job's "done" event at each wake,
at most ``_HANDOFF`` each time.

When to punch: long runs now, lone short ranges later
-----------------------------------------------------
The waste set is kept merged, so neighbouring frees become one punch, but
only if they are still waste when the neighbour comes; and taking a range
out of the books costs bookkeeping on the loop per range.  So the releaser
takes at once only the runs of at least ``RUN_BYTES`` that the books noted
(see ``aiopgalloc._books``); lone short ranges stay waste, where an
allocation may recycle them, until

- the frees pause: no free for ``QUIET`` seconds;
- ``MAX_DEFER`` seconds have passed since they were first left waiting, so
  a steady stream of scattered frees still returns its memory;
- someone asks for a flush (``wait_for_reclaim``, memory pressure).

Then everything goes, lowest address first.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

import anyio
import anyio.abc
import anyio.lowlevel

from ._books import PageBooks, ReleaseBatch
from ._wakeups import Wakeups
from .host.handle import FileHandle
from .options import MemoryFileOpts

__all__ = ["MAX_DEFER", "QUIET", "Releaser"]

log = logging.getLogger(__name__)

QUIET = 0.02
"""Seconds without a free after which short lone waste is released too."""
MAX_DEFER = 5.0
"""Short lone waste waits at most about this long, however busy the frees."""
_ERROR_BACKOFF = 0.5  # seconds to wait after a batch failed outright
_BATCH_BYTES = 1 << 30  # at most this much per release batch
_BATCH_RANGES = 4096  # and this many waste ranges (bookkeeping on the loop)
_HANDOFF = 0.001  # longest the loop blocks to hand the GIL to the puncher
_PUNCH_BYTES_PER_S = 8 << 30  # when a punch "should be over", for the hand-off


class _Job:
    """One release batch for the puncher thread."""

    __slots__ = ("batch", "done", "error", "handle", "started", "wake")

    def __init__(self, handle: FileHandle, batch: ReleaseBatch, wake: Callable[[], None]) -> None:
        self.handle = handle
        self.batch = batch
        self.wake = wake
        self.started = threading.Event()
        self.done = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        self.started.set()
        try:
            self.batch.failed = self.handle.punch_out(self.batch.ranges)
            self.batch.performed = True
        except BaseException as exc:  # handed to the releaser, which logs it
            self.error = exc
        finally:
            self.done.set()
            self.wake()


class _Puncher:
    """The releaser's own worker thread (started on first use, joined when
    the releaser ends), so that the releaser knows when the worker needs
    the GIL and can hand it over (see the module notes)."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            job.run()

    def submit(self, job: _Job) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name="aiopgalloc-releaser", daemon=True
            )
            self._thread.start()
        self._jobs.put(job)

    def close(self) -> None:
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join()
            self._thread = None


class Releaser:
    """Returns a file's freed pages to the kernel, until cancelled.

    Built by ``open_memory_file`` from the file's parts: the lock that
    guards ``books``, the handle whose fd it punches (it holds a lease while
    it runs), the wake-ups it sleeps on.  ``on_idle`` is called each time no
    freed page is left (the reference's "evict when the releaser is idle").
    """

    def __init__(
        self,
        *,
        lock: threading.Lock,
        books: PageBooks,
        handle: FileHandle,
        wakeups: Wakeups,
        opts: MemoryFileOpts,
        on_idle: Callable[[], None],
    ) -> None:
        self._mu = lock
        self._books = books
        self._handle = handle
        self._wake = wakeups
        self._inline_bytes = opts.release_inline_max_bytes
        self._inline_ranges = opts.release_inline_max_ranges
        self._on_idle = on_idle

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Release freed pages until cancelled (the file closing)."""
        puncher = _Puncher()
        with self._handle.lease():
            task_status.started()
            try:
                await self._loop(puncher)
            finally:
                puncher.close()

    def _take(self, runs_only: bool) -> ReleaseBatch | None:
        with self._mu:
            # Cleared under the lock: a free after this look wakes us again.
            self._wake.clear()
            return self._books.take_release_batch(_BATCH_BYTES, _BATCH_RANGES, runs_only=runs_only)

    def _settle(self, batch: ReleaseBatch) -> None:
        with self._mu:
            self._books.finish_release(batch)

    async def _loop(self, puncher: _Puncher) -> None:
        books, wake = self._books, self._wake
        # ``flush`` is None while only long runs are taken, else why
        # everything goes: "quiet" (stops as soon as frees resume) or "aged".
        flush: str | None = None
        frees_seen = -1
        deferred_since: float | None = None  # when short waste was first left waiting
        while True:
            if flush == "quiet" and books.frees != frees_seen:
                flush = None  # frees resumed: they may merge with what is left
            elif (
                flush is None
                and deferred_since is not None
                and anyio.current_time() - deferred_since >= MAX_DEFER
            ):
                flush = "aged"
            batch = self._take(runs_only=flush is None)
            if batch is None:
                flush = None
                wake.progress()
                with self._mu:
                    waiting = books.has_waste
                    frees_seen = books.frees
                if not waiting:
                    deferred_since = None
                    self._on_idle()
                    await wake.wait()
                    continue
                if deferred_since is None:
                    deferred_since = anyio.current_time()
                with anyio.move_on_after(QUIET):
                    await wake.wait()
                    continue
                flush = "quiet"  # no free for QUIET seconds
                continue
            if flush is not None and (
                len(batch.pieces) < _BATCH_RANGES and batch.nbytes < _BATCH_BYTES
            ):
                # Everything that was waiting is in this batch.
                flush = deferred_since = None
            failed = False
            try:
                if batch.nbytes <= self._inline_bytes and len(batch.ranges) <= self._inline_ranges:
                    batch.failed = self._handle.punch_out(batch.ranges)
                    batch.performed = True
                else:
                    await self._punch_in_thread(puncher, batch)
            except Exception:
                failed = True
                log.exception("releasing %d bytes failed; will retry", batch.nbytes)
            finally:
                self._settle(batch)
            wake.progress()
            if failed:
                await anyio.sleep(_ERROR_BACKOFF)
            else:
                await anyio.lowlevel.checkpoint()

    async def _punch_in_thread(self, puncher: _Puncher, batch: ReleaseBatch) -> None:
        """Run ``batch`` in the puncher thread; wait for it without blocking
        the loop, except for the short GIL hand-overs.  Raises what the
        batch raised.  On cancellation, waits for the batch (a punch never
        runs on behind the books' back)."""
        wake = self._wake
        job = _Job(self._handle, batch, wake.signal)
        puncher.submit(job)
        try:
            # Let the worker take the GIL and reach its syscall now.
            job.started.wait(_HANDOFF)
            ready_at = time.monotonic() + batch.nbytes / _PUNCH_BYTES_PER_S
            while not job.done.is_set():
                wake.clear()  # the next free wakes us again
                await wake.wait()
                if time.monotonic() >= ready_at:
                    # The punch should be over: the worker may be waiting for
                    # the GIL, which a busy loop hardly ever lets go of.
                    job.done.wait(_HANDOFF)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(job.done.wait)
            raise
        if job.error is not None:
            raise job.error
