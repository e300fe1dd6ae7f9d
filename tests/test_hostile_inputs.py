"""Hostile inputs: what a careless or hostile caller hands the library.

- an ``open_memory_file(...)`` / ``load_memory_file(...)`` object entered a
  second time, after the first block or nested in it;
- options that are out of range or of the wrong type (checked when the
  options are built, not when a file is opened);
- a user's own offsets (``EvictableRange``) or a plain tuple where a
  ``FileRange`` is expected;
- a checkpoint handed over as a text stream;
- ``MEMORY_PRESSURE_WATCH=/dev/null`` (systemd's ``MemoryPressureWatch=off``);
- a ``KeyboardInterrupt`` or ``SystemExit`` raised in an ``evict`` callback
  (in a child process, so a real interrupt cannot disturb pytest).

Each case leaves everything as it was: no fd opened or left behind, no file
truncated, no reference dropped.
"""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import anyio
import pytest
from helpers import State, fill_byte, memfd_fds, open_fds, read_all

from aiopgalloc import (
    HUGE_PAGE_SIZE,
    PAGE_SIZE,
    AccessType,
    DelayedEviction,
    EvictableRange,
    FileRange,
    MemoryFile,
    MemoryFileOpts,
    load_memory_file,
    open_memory_file,
)
from aiopgalloc.host import pressure
from aiopgalloc.host.pressure import ManualPressure, PressureEvent, PressureLevel
from aiopgalloc.options import MAX_CHUNK_SIZE, MAX_THRESHOLD_BYTES, MAX_THRESHOLD_RANGES

pytestmark = pytest.mark.anyio

P = PAGE_SIZE
H = HUGE_PAGE_SIZE
SMALL = MemoryFileOpts(chunk_size=H)
REPO = Path(__file__).resolve().parent.parent


# ------------------------------------------------------- entering twice (A)


def _file_arg(kind: str) -> tuple[Any, int | None]:
    """A ``file=`` argument of the given kind, and the caller's fd in it."""
    if kind == "none":
        return None, None
    fd = os.memfd_create("caller", os.MFD_CLOEXEC)
    if kind == "fd":
        return fd, fd
    return open(fd, "r+b", buffering=0), fd  # the memory file closes it


@pytest.mark.parametrize("kind", ["none", "fd", "fileobj"])
async def test_second_entry_after_the_block_is_refused(kind: str) -> None:
    """The first block closed the fd; with ``file=`` an int, the number may
    now name someone else's file.  A second entry must not truncate it (the
    defect: the victim was zeroed and grew to one chunk)."""
    file, fd = _file_arg(kind)
    ctx = open_memory_file(file=file, opts=SMALL)
    async with ctx as mf:
        fill_byte(mf, mf.allocate(P), 1)
    victim = os.memfd_create("victim", os.MFD_CLOEXEC)
    try:
        if fd is not None and victim != fd:
            os.dup2(victim, fd, inheritable=False)  # the victim takes the old number
            os.close(victim)
            victim = fd
        os.write(victim, b"precious")
        before = open_fds()
        with pytest.raises(RuntimeError, match="already entered"):
            async with ctx:
                pytest.fail("entered a second time")
        assert open_fds() == before, "the refused entry opened or closed an fd"
        assert os.fstat(victim).st_size == 8, "the victim was truncated"
        assert os.pread(victim, 8, 0) == b"precious"
    finally:
        os.close(victim)


@pytest.mark.parametrize("kind", ["none", "fd", "fileobj"])
async def test_nested_entry_is_refused_and_the_outer_block_closes_cleanly(kind: str) -> None:
    before = open_fds()
    file, _fd = _file_arg(kind)
    ctx = open_memory_file(file=file, opts=SMALL)
    async with ctx as mf:
        fr = mf.allocate(P)
        fill_byte(mf, fr, 7)
        inside = open_fds()
        state = State.of(mf)
        with pytest.raises(RuntimeError, match="already entered"):
            async with ctx:
                pytest.fail("entered while entered")
        assert open_fds() == inside, "the refused entry opened an fd"
        assert State.of(mf) == state
        assert read_all(mf, fr) == b"\x07" * P, "the refused entry truncated the file"
        mf.check_invariants()
    # The outer exit neither raises (it raised a bare AssertionError) nor
    # leaks (4 fds were left behind).
    assert mf.closed
    assert open_fds() == before


async def test_exit_without_entry_is_refused() -> None:
    ctx = open_memory_file(opts=SMALL)
    with pytest.raises(RuntimeError, match="not entered"):
        await ctx.__aexit__(None, None, None)


async def _checkpoint(tmp_path: Path) -> tuple[Path, bytes]:
    path = tmp_path / "ck.bin"
    async with open_memory_file(opts=SMALL) as mf:
        fr = mf.allocate(2 * P)
        fill_byte(mf, fr, 0x5A)
        await mf.save(path, fsync=False)
        data = read_all(mf, fr)
    return path, data


@pytest.mark.parametrize("source", ["path", "stream"])
async def test_load_object_entered_twice_is_refused(tmp_path: Path, source: str) -> None:
    path, data = await _checkpoint(tmp_path)
    stream = io.BytesIO(path.read_bytes())
    ctx = load_memory_file(path if source == "path" else stream, SMALL)
    before = open_fds()
    async with ctx as mf:
        assert read_all(mf, FileRange(0, 2 * P)) == data
        inside = open_fds()
        pos = stream.tell()
        with pytest.raises(RuntimeError, match="already entered"):
            async with ctx:
                pytest.fail("entered while entered")
        assert open_fds() == inside
        assert stream.tell() == pos, "the refused entry read from the source"
    assert open_fds() == before
    with pytest.raises(RuntimeError, match="already entered"):
        async with ctx:
            pytest.fail("entered a second time")
    assert open_fds() == before
    assert stream.tell() == pos


# -------------------------------------------------------------- options (B, C)

TOO_BIG = [
    ("chunk_size", 2**63),
    ("chunk_size", 2**47),
    ("chunk_size", 2 * MAX_CHUNK_SIZE),
    ("recycle_max_bytes", MAX_THRESHOLD_BYTES + 1),
    ("release_inline_max_bytes", 2**63),
    ("release_inline_max_ranges", MAX_THRESHOLD_RANGES + 1),
]
BAD_VALUES = [
    ("chunk_size", H // 2, "a power of two in"),
    ("chunk_size", 3 * H, "a power of two in"),
    ("chunk_size", 0, "a power of two in"),
    ("chunk_size", -H, "a power of two in"),
    ("recycle_max_bytes", -1, "[0, 2**47]"),
    ("release_inline_max_bytes", -P, "[0, 2**47]"),
    ("release_inline_max_ranges", -1, "[0, 2**35]"),
    ("evict_fraction_low", 0.0, "(0, 1]"),
    ("evict_fraction_low", 1.5, "(0, 1]"),
    ("evict_fraction_medium", float("nan"), "(0, 1]"),
    ("evict_fraction_medium", float("inf"), "(0, 1]"),
    ("evict_fraction_medium", -0.5, "(0, 1]"),
]
BAD_TYPES = [
    ("delayed_eviction", 2, "DelayedEviction"),
    ("delayed_eviction", "ENABLED", "DelayedEviction"),
    ("use_host_memcg_pressure", "no", "True or False"),
    ("use_host_memcg_pressure", 1, "True or False"),
    ("use_host_memcg_pressure", 0, "None, True or False"),
    ("chunk_size", float(H), "an int"),
    ("chunk_size", True, "an int"),
    ("recycle_max_bytes", "2M", "an int"),
    ("release_inline_max_bytes", 1.5, "an int"),
    ("release_inline_max_ranges", False, "an int"),
    ("evict_fraction_low", True, "a number"),
    ("evict_fraction_low", "0.5", "a number"),
    ("pressure_source", 5, "no __aenter__, __aexit__, __aiter__"),
    ("pressure_source", "psi", "no __aenter__, __aexit__, __aiter__"),
    ("pressure_source", ManualPressure, "pass an instance"),
]


@pytest.mark.parametrize(("field", "value"), TOO_BIG, ids=[f"{f}={v}" for f, v in TOO_BIG])
def test_options_too_big_are_refused_on_construction(field: str, value: int) -> None:
    """The defect: ``chunk_size=2**63`` was accepted and opening raised
    OverflowError; from 2**47 up opening failed with ENOMEM."""
    with pytest.raises(ValueError, match=rf"MemoryFileOpts\.{field} must be .*\[.*, 2\*\*\d+\]"):
        MemoryFileOpts(**{field: value})


@pytest.mark.parametrize(
    ("field", "value", "says"), BAD_VALUES, ids=[f"{f}={v}" for f, v, _ in BAD_VALUES]
)
def test_options_out_of_range_are_refused(field: str, value: object, says: str) -> None:
    with pytest.raises(ValueError) as info:
        MemoryFileOpts(**{field: value})
    assert f"MemoryFileOpts.{field}" in str(info.value) and says in str(info.value)


@pytest.mark.parametrize(
    ("field", "value", "says"), BAD_TYPES, ids=[f"{f}={v!r}" for f, v, _ in BAD_TYPES]
)
def test_options_of_the_wrong_type_are_refused(field: str, value: object, says: str) -> None:
    """The defect: ``use_host_memcg_pressure="no"`` turned host pressure on,
    and ``pressure_source=5`` failed only at open with a protocol error."""
    with pytest.raises(TypeError) as info:
        MemoryFileOpts(**{field: value})
    assert f"MemoryFileOpts.{field}" in str(info.value) and says in str(info.value)


def test_options_at_the_bounds_are_accepted() -> None:
    opts = MemoryFileOpts(
        chunk_size=MAX_CHUNK_SIZE,
        recycle_max_bytes=MAX_THRESHOLD_BYTES,
        release_inline_max_bytes=0,
        release_inline_max_ranges=MAX_THRESHOLD_RANGES,
        evict_fraction_low=1e-9,
        evict_fraction_medium=1,
    )
    assert opts.chunk_size == MAX_CHUNK_SIZE
    assert MemoryFileOpts(chunk_size=H).chunk_size == H


async def test_the_largest_chunk_size_opens() -> None:
    """The upper bound is real: a file with ``MAX_CHUNK_SIZE`` chunks opens,
    maps its first chunk and holds data."""
    async with open_memory_file(opts=MemoryFileOpts(chunk_size=MAX_CHUNK_SIZE)) as mf:
        fr = mf.allocate(P)
        fill_byte(mf, fr, 3)
        assert read_all(mf, fr) == b"\x03" * P
        assert mf.total_size() == MAX_CHUNK_SIZE
        mf.dec_ref(fr)


class DuckSource:
    """A pressure source written from scratch (no base class): it has the
    methods, so the options take it, and the file listens to it."""

    name = "duck"

    def __init__(self) -> None:
        self.entered = False

    async def __aenter__(self) -> DuckSource:
        self.entered = True
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.entered = False

    def __aiter__(self) -> AsyncIterator[PressureEvent]:
        return self._events()

    async def _events(self) -> AsyncIterator[PressureEvent]:
        yield PressureEvent(PressureLevel.LOW, self.name, 1)
        await anyio.sleep_forever()
        yield PressureEvent(PressureLevel.LOW, self.name, 1)  # never reached


class HalfSource:
    """An async context manager that is no async iterator."""

    async def __aenter__(self) -> HalfSource:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None


def test_pressure_source_without_aiter_is_refused() -> None:
    with pytest.raises(TypeError, match="whose type has no __aiter__"):
        MemoryFileOpts(pressure_source=HalfSource())


async def test_a_structural_pressure_source_is_accepted_and_used() -> None:
    source = DuckSource()
    opts = MemoryFileOpts(use_host_memcg_pressure=True, pressure_source=source, chunk_size=H)
    async with open_memory_file(opts=opts) as mf:
        assert source.entered
        with anyio.fail_after(5):
            while mf.stats().pressure_low == 0:
                await anyio.sleep(0.001)
        st = mf.stats()
        assert (st.pressure_source, st.pressure_note) == ("duck", "")
    assert not source.entered


# ------------------------------------------------------ range types (D)

FILE_RANGE_CALLS = ["dec_ref", "inc_ref", "decommit", "map_internal"]


async def _call(mf: MemoryFile, op: str, fr: Any) -> None:
    if op == "decommit":
        await mf.decommit(fr)
    else:
        getattr(mf, op)(fr)


@pytest.mark.parametrize("op", FILE_RANGE_CALLS)
@pytest.mark.parametrize("make", ["evictable", "tuple"])
async def test_file_range_calls_refuse_other_ranges(op: str, make: str) -> None:
    """An ``EvictableRange`` is in a user's own offsets: ``dec_ref`` of one
    whose bounds happen to be a live page of the file freed that page (an
    unrelated allocation).  Now a ``TypeError``, and nothing changes."""
    async with open_memory_file(opts=SMALL) as mf:
        a = mf.allocate(P)  # the unrelated allocation at offset 0
        b = mf.allocate(2 * P)
        fill_byte(mf, a, 0xA)
        fill_byte(mf, b, 0xB)
        assert a == (0, P)
        state = State.of(mf)
        bad = EvictableRange(a.start, a.end) if make == "evictable" else (a.start, a.end)
        with pytest.raises(TypeError, match="expected a FileRange"):
            await _call(mf, op, bad)
        assert State.of(mf) == state
        assert read_all(mf, a) == b"\x0a" * P, "the pages were decommitted"
        mf.check_invariants()
        # a still holds exactly one reference.
        mf.dec_ref(a)
        mf.dec_ref(b)
        await mf.wait_for_reclaim()
        assert mf.total_usage() == 0


async def test_evictable_range_error_says_what_it_is() -> None:
    async with open_memory_file(opts=SMALL) as mf:
        fr = mf.allocate(P)
        with pytest.raises(TypeError, match="an EvictableRange is in a user's own offsets"):
            mf.dec_ref(EvictableRange(fr.start, fr.end))
        mf.dec_ref(fr)


class PinnedRange(FileRange):
    """A user's own subclass of FileRange (accepted)."""

    __slots__ = ()


async def test_file_range_subclasses_are_accepted() -> None:
    async with open_memory_file(opts=SMALL) as mf:
        fr = mf.allocate(2 * P)
        sub = PinnedRange(fr.start, fr.end)
        mf.inc_ref(sub)
        (view,) = mf.map_internal(sub, AccessType.READ_WRITE)
        view[:4] = b"sub!"
        view.release()
        await mf.decommit(PinnedRange(fr.start, fr.start + P))
        mf.dec_ref(sub)
        mf.dec_ref(sub)
        mf.check_invariants()
        await mf.wait_for_reclaim()
        assert mf.total_usage() == 0


# ------------------------------------------------------- text streams (E)


async def test_loading_from_a_text_file_is_refused_before_anything_opens(
    tmp_path: Path,
) -> None:
    """The defect: ``TypeError("can't concat str to bytes")`` from deep in the
    reader."""
    path, _ = await _checkpoint(tmp_path)
    before = open_fds()
    with open(path, encoding="latin-1") as f:
        with pytest.raises(TypeError, match="a path or a binary stream") as info:
            load_memory_file(f, SMALL)
        assert "mode 'rb'" in str(info.value)
        assert f.tell() == 0
    assert open_fds() == before


class TextReader:
    """A stream that reads ``str`` without being an ``io.TextIOBase``."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def read(self, n: int = -1) -> str:
        end = len(self.text) if n < 0 else self.pos + n
        out, self.pos = self.text[self.pos : end], min(end, len(self.text))
        return out


async def test_loading_from_a_duck_typed_text_stream_is_refused(tmp_path: Path) -> None:
    path, _ = await _checkpoint(tmp_path)
    reader = TextReader(path.read_bytes().decode("latin-1"))
    before, memfds = open_fds(), memfd_fds()
    with pytest.raises(TypeError, match="binary stream") as info:
        async with load_memory_file(reader, SMALL):
            pytest.fail("loaded from a text stream")
    assert "TextReader" in str(info.value)
    assert reader.pos == 0, "the check consumed input"
    assert open_fds() == before and memfd_fds() == memfds, "a memory file was opened"


# ----------------------------------------- MEMORY_PRESSURE_WATCH=/dev/null (F)


@pytest.fixture
def systemd_off(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("MEMORY_PRESSURE_WATCH", "/dev/null")
    monkeypatch.delenv("MEMORY_PRESSURE_WRITE", raising=False)
    yield


async def test_systemd_dev_null_opens_with_host_pressure_off(
    systemd_off: None, caplog: pytest.LogCaptureFixture
) -> None:
    """The defect: NoPressureSourceError, so a service with
    ``MemoryPressureWatch=off`` could not start."""
    caplog.set_level(logging.INFO, logger="aiopgalloc")
    opts = MemoryFileOpts(use_host_memcg_pressure=True, chunk_size=H)
    async with open_memory_file(opts=opts) as mf:
        st = mf.stats()
        assert st.pressure_source == ""
        assert st.pressure_note == "MEMORY_PRESSURE_WATCH=/dev/null: turned off by systemd"
        assert st.pressure_note == pressure.SYSTEMD_OFF_NOTE
        fr = mf.allocate(P)
        mf.dec_ref(fr)
        await mf.wait_for_reclaim()
    said = [r for r in caplog.records if "turned off by systemd" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.INFO, caplog.records


async def test_stats_name_the_pressure_source_or_say_why_none() -> None:
    manual = ManualPressure(name="by hand")
    cases = [
        (
            MemoryFileOpts(chunk_size=H, use_host_memcg_pressure=False),
            "",
            "use_host_memcg_pressure is False",
        ),
        (MemoryFileOpts(chunk_size=H, pressure_source=manual), "by hand", ""),
        (
            MemoryFileOpts(chunk_size=H, delayed_eviction=DelayedEviction.IDLE),
            "",
            "delayed_eviction=IDLE does not use memory pressure",
        ),
        (
            MemoryFileOpts(
                chunk_size=H,
                use_host_memcg_pressure=True,
                delayed_eviction=DelayedEviction.MANUAL,
            ),
            "",
            "delayed_eviction=MANUAL does not use memory pressure",
        ),
        (
            MemoryFileOpts(chunk_size=H, use_host_memcg_pressure=True, pressure_source=manual),
            "by hand",
            "",
        ),
    ]
    for opts, source, note in cases:
        async with open_memory_file(opts=opts) as mf:
            st = mf.stats()
            assert (st.pressure_source, st.pressure_note) == (source, note), opts


async def test_stats_name_the_host_source_chosen() -> None:
    try:
        expected, _ = pressure.choose_pressure_source()
    except pressure.NoPressureSourceError as exc:
        pytest.skip(f"no host pressure source here: {exc}")
    opts = MemoryFileOpts(use_host_memcg_pressure=True, chunk_size=H)
    async with open_memory_file(opts=opts) as mf:
        st = mf.stats()
        assert st.pressure_source == expected.name and st.pressure_note == ""


# ------------------------------------------ interrupts from background tasks (G)

_INTERRUPT_SCENARIO = textwrap.dedent(
    """
    import json, sys
    import anyio
    from aiopgalloc import (
        DelayedEviction, EvictableRange, MemoryFileOpts, PAGE_SIZE, open_memory_file,
    )

    backend, exc_name = sys.argv[1], sys.argv[2]
    exc_type = {"KeyboardInterrupt": KeyboardInterrupt, "SystemExit": SystemExit}[exc_name]
    seen = {}

    class User:
        async def evict(self, er):
            raise exc_type("from evict")

    async def main():
        opts = MemoryFileOpts(delayed_eviction=DelayedEviction.MANUAL)
        try:
            async with open_memory_file(opts=opts) as mf:
                mf.mark_evictable(User(), EvictableRange(0, PAGE_SIZE))
                mf.start_evictions()
                await anyio.sleep(30)
        except BaseException as exc:
            seen["block"] = type(exc).__name__
            seen["block_args"] = [str(a) for a in getattr(exc, "args", ())]
            raise

    name, options = backend, {}
    if backend == "uvloop":
        name, options = "asyncio", {"use_uvloop": True}
    try:
        anyio.run(main, backend=name, backend_options=options)
    except BaseException as exc:
        seen["run"] = type(exc).__name__
    print(json.dumps(seen), flush=True)
    """
)


@pytest.mark.parametrize("exc_name", ["KeyboardInterrupt", "SystemExit"])
@pytest.mark.parametrize("backend", ["asyncio", "uvloop", "trio"])
def test_interrupt_in_evict_comes_out_as_itself(backend: str, exc_name: str) -> None:
    """The defect: on trio it came out wrapped in two nested
    BaseExceptionGroups.  In a child process: a real interrupt."""
    res = subprocess.run(
        [sys.executable, "-c", _INTERRUPT_SCENARIO, backend, exc_name],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    seen = json.loads(res.stdout.strip().splitlines()[-1])
    # Out of the async with block, and out of anyio.run, as itself.
    assert seen.get("block") == exc_name, (seen, res.stderr)
    assert seen["block_args"] == ["from evict"]
    assert seen.get("run") == exc_name, (seen, res.stderr)
