"""Opening and closing a memory file: the ``async with`` block and its tasks.

``open_memory_file`` owns an anyio task group in which the releaser, the
eviction dispatcher and (with host pressure) the pressure watcher run.
Leaving the block cancels them, closes the file and unmaps it: nothing keeps
running afterwards.

Exceptions come out as themselves.  anyio (on trio in particular) wraps an
exception that leaves a task group's body in an ``ExceptionGroup``; the
background tasks here never raise, so when the group holds nothing but the
body's own exception, the group is dropped and the exception propagates
unchanged.  The one thing a background task does let through is a
``KeyboardInterrupt`` or ``SystemExit`` raised in user code it calls (an
``evict``, a pressure source): on trio it arrives wrapped in a group per
task group it crossed, and it comes out alone, as itself.  (On asyncio the
event loop re-raises such an exception out of ``run`` at once.)

An ``open_memory_file(...)`` or ``load_memory_file(...)`` object is entered
at most once: a second entry, nested or after the first ended, raises
``RuntimeError`` before touching the file.

Every part of a memory file is built here, in one place: the file handle
(fds and mapping), the page books and the lock that guards them, the
wake-ups, the evictions, the pressure status, the ``MemoryFile`` front, the
releaser; a checkpoint being loaded is read into the books and the mapping
before the block is entered.  Closing happens in the reverse order: the
front first (every later call raises ``ClosedError``), then the
evictions, the wake-ups, and the handle (whose fds close once no call in
flight holds a lease).
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import threading
from collections.abc import Callable
from types import TracebackType
from typing import NoReturn, Protocol

import anyio
import anyio.abc

from . import checkpoint
from ._books import PageBooks
from ._releaser import Releaser
from ._wakeups import Wakeups
from .arguments import MAX_OFFSET
from .checkpoint_format import CheckpointReader, Metadata, merge_spans
from .eviction import Evictions
from .host import memfd, pressure
from .host.handle import FileHandle
from .host.pressure_sources import PressureSource
from .memory_file import MemoryFile
from .options import DelayedEviction, MemoryFileOpts
from .ranges import PAGE_SIZE
from .stats import PressureStatus

__all__ = ["load_memory_file", "open_memory_file"]

log = logging.getLogger(__name__)


class _HasFileno(Protocol):
    def fileno(self) -> int: ...


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for e in exc.exceptions for leaf in _leaves(e)]
    return [exc]


def _only_exception(group: BaseExceptionGroup[BaseException], exc: BaseException) -> bool:
    """Whether every leaf of the group is ``exc`` or one of ``exc``'s own
    leaves (``exc`` may itself be a group, which trio re-derives)."""
    own = {id(e) for e in _leaves(exc)}
    return all(id(e) in own for e in _leaves(group))


_INTERRUPTS = (KeyboardInterrupt, SystemExit)


def _unwrap(
    group: BaseExceptionGroup[BaseException], exc: BaseException | None
) -> BaseException | None:
    """The one exception to let out instead of ``group``, which a task group
    raised while ``exc`` (None: nothing) was leaving its body; None to let
    the group out as it is.

    - A ``KeyboardInterrupt`` or ``SystemExit`` among the leaves (from the
      body, or from user code a background task called): the first one.
      An interrupt asks the program to stop; it must reach the caller's
      ``except KeyboardInterrupt`` whatever else failed meanwhile.
    - Every leaf is ``exc`` or one of its leaves: ``exc``.
    """
    leaves = _leaves(group)
    for leaf in leaves:
        if isinstance(leaf, _INTERRUPTS):
            return leaf
    if exc is not None and _only_exception(group, exc):
        return exc
    return None


def _raise_unwrapped(
    group: BaseExceptionGroup[BaseException], out: BaseException, exc: BaseException | None
) -> NoReturn:
    """Raise ``out`` (an interrupt found by ``_unwrap``) in place of ``group``;
    the group stays attached as the cause only when it holds other failures
    too, so they are not lost from the traceback."""
    own = {id(out)} | ({id(e) for e in _leaves(exc)} if exc is not None else set())
    if all(id(e) in own for e in _leaves(group)):
        raise out from None
    raise out from group


def _prepare_fd(file: int | _HasFileno | None, opts: MemoryFileOpts) -> tuple[int, bool]:
    """Get the fd to own and truncate it to one chunk.  Returns (fd, sealed).

    On failure nothing is owned: an fd this function created is closed, a
    caller's fd is left open."""
    created = file is None
    if file is None:
        fd = memfd.create_memfd()
    elif isinstance(file, int) and not isinstance(file, bool):
        fd = file
    elif not isinstance(file, bool) and callable(getattr(file, "fileno", None)):
        # Own a private duplicate; the caller's object is closed once the
        # block is entered, so nothing of the caller's can close our fd.
        fd = os.dup(file.fileno())
        created = True
    else:
        raise TypeError("file must be None, an fd, or an object with fileno()")
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"fd {fd} is not a regular file or memfd")
        # Start from an empty file, as the reference does.
        memfd.truncate(fd, 0)
        memfd.truncate(fd, opts.chunk_size)
        sealed = memfd.seal_shrink(fd) if file is None else False
        if sealed:
            memfd.seal_seals(fd)
    except BaseException:
        if created:
            os.close(fd)
        raise
    return fd, sealed


def _source_name(source: object) -> str:
    name = getattr(source, "name", None)
    return name if isinstance(name, str) and name else type(source).__name__


def _pressure_source(
    asked: MemoryFileOpts, opts: MemoryFileOpts
) -> tuple[PressureSource | None, str, str]:
    """The pressure source to listen to, its name, and (when there is none)
    why not.  ``asked`` are the options as given, ``opts`` as resolved.

    The source given in the options, or the best one the host offers.
    When the service manager switched pressure handling off
    (``MEMORY_PRESSURE_WATCH=/dev/null``), none, said once at INFO.  With
    ``use_host_memcg_pressure=None`` a host without a working source opens
    the file without one, the reason kept as the note (logged at DEBUG).
    With ``True`` that raises ``NoPressureSourceError`` (an ``OSError``)
    naming every source tried and why it failed, as the reference fails
    when it cannot set up its cgroup notifications."""
    if opts.use_host_memcg_pressure is False:
        if asked.use_host_memcg_pressure is False:
            note = "use_host_memcg_pressure is False"
        else:
            mode = asked.delayed_eviction
            assert mode in (DelayedEviction.DISABLED, DelayedEviction.MANUAL, DelayedEviction.IDLE)
            note = f"delayed_eviction={mode.name} does not use memory pressure"
        return None, "", note
    if opts.pressure_source is not None:
        return opts.pressure_source, _source_name(opts.pressure_source), ""
    try:
        source, report = pressure.choose_pressure_source()
    except pressure.PressureHandlingOff as exc:
        log.info("host memory pressure is off for this file: %s", exc.note)
        return None, "", exc.note
    except pressure.NoPressureSourceError as exc:
        if opts.use_host_memcg_pressure:
            raise
        note = f"no memory-pressure source works on this host: {exc}"
        log.debug("opening without host memory pressure: %s", note)
        return None, "", note
    # One line per candidate, on every open: DEBUG (``info`` shows the same
    # report, and ``stats().pressure_source`` the choice).
    for line in report:
        log.debug("pressure source: %s", line)
    return source, _source_name(source), ""


async def _watch_pressure(
    source: PressureSource,
    status: PressureStatus,
    evictions: Evictions,
    release_freed: Callable[[], None],
    opts: MemoryFileOpts,
    *,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Turn pressure notifications into evictions until cancelled.

    The source coalesces: at most one notification is pending, carrying the
    highest level seen since the last one, so a storm of kernel events costs
    one eviction round per wake-up.  A source that ends (its cgroup is gone)
    or fails once open is logged and the watcher stops; the file keeps
    working.  A failure to open the source fails the open."""
    fractions = {1: opts.evict_fraction_low, 2: opts.evict_fraction_medium}
    started = False
    try:
        async with source:
            task_status.started()
            started = True
            async for event in source:
                level = int(event.level)
                status.count(level)
                # Freed pages first: lone ones may be waiting to merge.
                release_freed()
                evictions.on_pressure(level, fractions.get(level, 1.0))
    except pressure.PressureSourceGone as exc:
        if not started:
            raise
        log.warning("memory pressure source %s is gone: %s", status.source, exc)
    except Exception:
        if not started:
            raise
        log.exception(
            "memory pressure source %s failed; no more pressure notifications", status.source
        )


class _Parts:
    """Every part of one memory file, built together and closed together."""

    def __init__(self, fd: int, opts: MemoryFileOpts, pressure_status: PressureStatus) -> None:
        """Take ``fd`` (prepared: one chunk long).  Must run on the event
        loop.  Raises ``OSError``; on failure nothing is left open but
        ``fd`` (the caller's to close)."""
        chunk = opts.chunk_size
        self.opts = opts
        self.handle = FileHandle(fd, chunk)
        try:
            self.handle.mapping.set_file_size(chunk)
            self.wakeups = Wakeups()
        except BaseException:
            self.handle.close(close_fd=False)
            raise
        self.lock = threading.Lock()
        self.books = PageBooks(
            file_size=chunk,
            max_end=(MAX_OFFSET // chunk) * chunk,
            recycle_max_bytes=opts.recycle_max_bytes,
        )
        self.evictions = Evictions(opts, self.wakeups.wake)
        self.pressure = pressure_status
        self.on_close = contextlib.ExitStack()
        self.mf = MemoryFile(
            opts=opts,
            lock=self.lock,
            books=self.books,
            handle=self.handle,
            wakeups=self.wakeups,
            evictions=self.evictions,
            pressure=pressure_status,
            on_close=self.on_close,
        )
        self.releaser = Releaser(
            lock=self.lock,
            books=self.books,
            handle=self.handle,
            wakeups=self.wakeups,
            opts=opts,
            on_idle=self.evictions.on_releaser_idle,
        )

    def close(self, *, close_fd: bool = True) -> None:
        """Close every part (after the task group ended)."""
        self.on_close.close()  # the front: every later call raises ClosedError
        self.evictions.close()
        # Waiters in wait_for_reclaim() wake, see the file closed and raise.
        self.wakeups.progress()
        self.wakeups.close()
        self.handle.close(close_fd=close_fd)

    def grow(self, size: int) -> None:
        """Grow a fresh file to ``size`` (rounded up to whole chunks)."""
        chunk = self.opts.chunk_size
        size = (size + chunk - 1) // chunk * chunk
        if size <= self.books.file_size:
            return
        memfd.truncate(self.handle.fd, size)
        self.handle.mapping.set_file_size(size)
        with self.lock:
            self.books.grow(size)


class _MemoryFileContext:
    """The async context manager returned by ``open_memory_file``."""

    def __init__(self, file: int | _HasFileno | None, opts: MemoryFileOpts | None) -> None:
        if opts is not None and not isinstance(opts, MemoryFileOpts):
            raise TypeError("opts must be a MemoryFileOpts")
        self._file = file
        self._asked = opts or MemoryFileOpts()
        self._opts = self._asked.resolved()
        self._parts: _Parts | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        # Set on the first entry and never cleared: the object is single-use.
        # An int fd is the caller's number, which may name another file by
        # a second entry (ours was closed at the first exit).
        self._entered = False
        self._what = "open_memory_file"

    def _enter_once(self) -> None:
        if self._entered:
            raise RuntimeError(
                f"this {self._what}(...) object was already entered; it can be entered "
                f"only once (call {self._what}(...) again for a new memory file)"
            )
        self._entered = True

    async def __aenter__(self) -> MemoryFile:
        self._enter_once()
        return await self._open()

    async def _open(self, meta: Metadata | None = None) -> MemoryFile:
        """Build the parts, start the tasks; with ``meta``, book the saved
        segments first.  Returns the front."""
        opts = self._opts
        fd, sealed = _prepare_fd(self._file, opts)
        caller_fd = isinstance(self._file, int)
        try:
            err = memfd.ima_workaround(fd, PAGE_SIZE)
            if err is not None:
                log.warning("could not pre-map the file PROT_EXEC (IMA work-around): %s", err)
            source, name, note = _pressure_source(self._asked, opts)
            parts = _Parts(fd, opts, PressureStatus(name, note))
        except BaseException:
            if not caller_fd:
                os.close(fd)
            raise
        log.debug("memory file opened: fd %d, sealed %s, pressure %s", fd, sealed, name or note)
        tg = anyio.create_task_group()
        await tg.__aenter__()
        try:
            if meta is not None:
                parts.grow(meta.file_size)
                with parts.lock:
                    parts.books.restore(list(meta.segments))
            await tg.start(parts.releaser.run)
            await tg.start(parts.evictions.run)
            if source is not None:
                await tg.start(
                    _watch_pressure,
                    source,
                    parts.pressure,
                    parts.evictions,
                    parts.mf.release_freed_soon,
                    opts,
                )
        except BaseException as exc:
            tg.cancel_scope.cancel()
            try:
                await tg.__aexit__(type(exc), exc, exc.__traceback__)
            except BaseExceptionGroup as group:
                # The task group wraps the failure it was handed; when the
                # group holds nothing else, let the failure out as itself.
                out = _unwrap(group, exc)
                if out is None:
                    raise
                if out is not exc:
                    _raise_unwrapped(group, out, exc)
            finally:
                # The block was never entered: a caller's fd stays the caller's.
                parts.close(close_fd=not caller_fd)
            raise
        self._parts, self._tg = parts, tg
        # The caller's file object is ours now.
        if self._file is not None and not caller_fd:
            self._detach_caller_object()
        return parts.mf

    def _detach_caller_object(self) -> None:
        # We own a duplicate of its fd (see _prepare_fd): close the caller's
        # object, so its fd is not leaked and it cannot touch ours.
        close = getattr(self._file, "close", None)
        if callable(close):
            try:
                close()
            except Exception:
                log.warning("closing the caller's file object failed", exc_info=True)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        parts, tg = self._parts, self._tg
        if parts is None or tg is None:
            raise RuntimeError(f"this {self._what}(...) object is not entered")
        self._parts = self._tg = None
        tg.cancel_scope.cancel()
        try:
            await tg.__aexit__(exc_type, exc, tb)
        except BaseExceptionGroup as group:
            out = _unwrap(group, exc)
            if out is None:
                raise
            if out is not exc:
                _raise_unwrapped(group, out, exc)
        finally:
            parts.close()


class _LoadContext(_MemoryFileContext):
    """The async context manager returned by ``load_memory_file``."""

    def __init__(
        self, source: checkpoint.PathType | checkpoint.Readable, opts: MemoryFileOpts | None
    ) -> None:
        checkpoint.check_source(source)
        super().__init__(None, opts)
        self._source = source
        self._what = "load_memory_file"

    async def __aenter__(self) -> MemoryFile:
        self._enter_once()
        chunk = self._opts.chunk_size
        max_end = (MAX_OFFSET // chunk) * chunk
        inp, owned = await anyio.to_thread.run_sync(checkpoint.open_source, self._source)
        try:
            meta = await anyio.to_thread.run_sync(checkpoint.read_books, inp, max_end)
            mf = await self._open(meta)
            try:
                await self._load_pages(inp, meta)
            except BaseException as exc:
                await self.__aexit__(type(exc), exc, exc.__traceback__)
                raise
        finally:
            if owned is not None:
                owned.close()
        return mf

    async def _load_pages(self, inp: CheckpointReader, meta: Metadata) -> None:
        """Read the pages straight into the mapping, a batch per thread hop,
        and book what was written as known committed."""
        parts = self._parts
        assert parts is not None
        cur = checkpoint.PageCursor()
        while True:
            with parts.lock:
                seq = parts.books.commit_seq
            written, done = await anyio.to_thread.run_sync(
                checkpoint.read_pages, parts.handle.mapping, inp, meta, cur
            )
            if written:
                with parts.lock:
                    if not parts.books.apply_scan(seq, merge_spans(written)):
                        raise RuntimeError(
                            "pages were punched out of the file while it was being loaded"
                        )
            if done:
                return


def open_memory_file(
    file: int | _HasFileno | None = None, opts: MemoryFileOpts | None = None
) -> _MemoryFileContext:
    """Open a memory file: ``async with open_memory_file() as mf: ...``.

    ``file`` is None (a new memfd, close-on-exec and sealed against
    shrinking), an fd, or an object with ``fileno()``; once the block is
    entered the file belongs to the memory file, which truncates it to zero
    first and closes it at the end.  ``opts`` defaults to ``MemoryFileOpts()``.

    Leaving the block stops the background tasks, closes the file and unmaps
    it; memoryviews still alive stay valid until dropped (a warning is
    logged).  An exception raised in the block comes out as itself, and so
    does a ``KeyboardInterrupt`` or ``SystemExit`` raised in user code the
    file's tasks call (an ``evict``, a pressure source), on every backend.

    With host pressure asked for and ``MEMORY_PRESSURE_WATCH=/dev/null``
    (systemd's ``MemoryPressureWatch=off``) the file opens with host
    pressure off, logs that once at INFO, and ``mf.stats().pressure_note``
    says so; ``mf.stats().pressure_source`` names the source in use.

    The returned object can be entered once.  Raises ``TypeError`` for a
    bad ``file`` or ``opts``; on entering, ``RuntimeError`` if it was
    entered before (nothing is touched then), ``ValueError`` if the file is
    not a regular file, ``OSError`` if it cannot be set up
    (``NoPressureSourceError`` when host pressure is asked for and no
    source works).
    """
    return _MemoryFileContext(file, opts)


def load_memory_file(
    source: checkpoint.PathType | checkpoint.Readable, opts: MemoryFileOpts | None = None
) -> _LoadContext:
    """Open a memory file restored from a checkpoint:
    ``async with load_memory_file(path) as mf: ...``.

    Like ``open_memory_file`` (a fresh memfd, the same background tasks,
    the same ``opts``), with the saved books and pages installed before the
    block is entered: the same offsets, kinds, reference counts and bytes.
    The pages written back are committed, so they are marked known-committed
    and accounted per kind: ``mf.accounting`` equals the saved file's after
    ``update_usage()``, less its freed pages and its all-zero committed
    pages (neither is saved).  The file size is the saved one, rounded up
    to whole chunks of ``opts.chunk_size``.

    ``source`` is a path or a blocking binary stream (``read()``, better
    ``readinto()``; read from worker threads, exactly up to the end of the
    checkpoint, and not closed).  A text stream is refused with
    ``TypeError`` before anything is opened.  The returned object can be
    entered once; a second entry raises ``RuntimeError``.

    Cost: reading the checkpoint once, the pages straight into the file's
    mapping (first-touch faults), in worker threads, one hop per 64 MiB.

    Raises ``CheckpointError`` (a ``ValueError``) naming the section and
    offset for input that is not a checkpoint, is damaged or truncated, or
    is of a newer format version; ``TypeError`` for a bad source or opts;
    ``OSError`` from reading the source or growing the file.  On any error
    nothing is left behind: the new file, its fds and its tasks are gone.
    An exception raised in the block comes out as itself.
    """
    return _LoadContext(source, opts)
