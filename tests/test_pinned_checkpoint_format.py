"""Checkpoints, byte by byte, against the format the module documents.

``aiopgalloc.checkpoint``'s docstring is the spec: a 32-byte header whose
last four bytes are the CRC-32 of bytes 0-27, then sections ``tag (4) |
zero (4) | payload length L (8) | payload (L) | CRC-32 of the 16-byte head
and the payload (4)``, in the order META, PAGE..., END.  The tests here
parse a saved checkpoint with ``struct`` and compute every CRC with
``zlib.crc32`` over the bytes they slice out, independently of the
library's own encoder and reader.  Then they craft checkpoints (sections
re-encoded here, with correct CRCs) that break one rule each: a CRC that
leaves out part of what it must cover, and page runs out of order while
still inside the live pages.  The loader must refuse them.

Public API only (``save``, ``load_memory_file``, ``CheckpointError``).
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from dataclasses import dataclass

import pytest
from helpers import open_fds

from aiopgalloc import (
    HUGE_PAGE_SIZE,
    PAGE_SIZE,
    CheckpointError,
    FileRange,
    MemoryFile,
    MemoryFileOpts,
    MemoryKind,
    load_memory_file,
    open_memory_file,
)

pytestmark = pytest.mark.anyio

P = PAGE_SIZE
OPTS = MemoryFileOpts(chunk_size=HUGE_PAGE_SIZE)

HEADER = struct.Struct("<8sHHIQII")
SECTION_HEAD = struct.Struct("<4sIQ")
CRC = struct.Struct("<I")
SEGMENT = struct.Struct("<QQQB7s")


@dataclass
class Section:
    tag: bytes
    at: int  # offset of its head in the checkpoint
    head: bytes
    payload: bytes
    crc: int


def parse(data: bytes) -> tuple[bytes, list[Section]]:
    """Split a checkpoint into its header and sections (no checking)."""
    header = data[: HEADER.size]
    sections = []
    pos = HEADER.size
    while pos < len(data):
        head = data[pos : pos + SECTION_HEAD.size]
        tag, _reserved, length = SECTION_HEAD.unpack(head)
        body = pos + SECTION_HEAD.size
        payload = data[body : body + length]
        (crc,) = CRC.unpack_from(data, body + length)
        sections.append(Section(tag, pos, head, payload, crc))
        pos = body + length + CRC.size
    assert pos == len(data), "trailing bytes after the last section"
    return header, sections


def section(tag: bytes, payload: bytes, *, crc_over: str = "head+payload") -> bytes:
    """Encode a section; ``crc_over`` chooses what its CRC covers (the
    documented formula, or a wrong one)."""
    head = SECTION_HEAD.pack(tag, 0, len(payload))
    covered = {
        "head+payload": head + payload,
        "payload": payload,
        "head+payload-without-offset": head + payload[8:],
    }[crc_over]
    return head + payload + CRC.pack(zlib.crc32(covered))


def page_run(offset: int, data: bytes) -> bytes:
    return section(b"PAGE", struct.pack("<Q", offset) + data)


def pread(mf: MemoryFile, fr: FileRange) -> bytes:
    return os.pread(mf.fd, fr.length, fr.start)


async def _saved() -> tuple[bytes, int, dict[str, object]]:
    """A checkpoint of a small file; returns (bytes, save's return value,
    what was built)."""
    async with open_memory_file(opts=OPTS) as mf:
        a = mf.allocate(4 * P, MemoryKind.PAGE_CACHE)
        b = mf.allocate(2 * P)
        mf.inc_ref(b)  # refs 2
        c = mf.allocate(3 * P, MemoryKind.TMPFS)
        for off, byte in ((a.start, 0x11), (a.start + 2 * P, 0x22), (c.start + P, 0x33)):
            v = mf.map_internal(FileRange(off, off + P))[0]
            v[:] = bytes([byte]) * P
            v.release()
        # b is committed but all zero: not saved.
        v = mf.map_internal(b)[0]
        v[:] = bytes(b.length)
        v.release()
        out = io.BytesIO()
        n = await mf.save(out)
        built = {
            "file_size": mf.total_size(),
            "segments": [
                (a.start, a.end, 1, int(MemoryKind.PAGE_CACHE)),
                (b.start, b.end, 2, int(MemoryKind.ANONYMOUS)),
                (c.start, c.end, 1, int(MemoryKind.TMPFS)),
            ],
            "runs": [
                (a.start, b"\x11" * P),
                (a.start + 2 * P, b"\x22" * P),
                (c.start + P, b"\x33" * P),
            ],
        }
        return out.getvalue(), n, built


async def test_every_crc_is_the_documented_formula() -> None:
    data, n, built = await _saved()
    assert n == len(data)
    header, sections = parse(data)

    magic, version, flags, page_size, chunk, zero, crc = HEADER.unpack(header)
    assert (magic, version, flags, page_size, chunk, zero) == (
        b"AIOPGCKP",
        1,
        0,
        P,
        HUGE_PAGE_SIZE,
        0,
    )
    assert crc == zlib.crc32(data[0:28]), "header CRC is not the CRC-32 of bytes 0-27"

    assert [s.tag for s in sections] == [b"META", b"PAGE", b"PAGE", b"PAGE", b"END "]
    for s in sections:
        tag, reserved, length = SECTION_HEAD.unpack(s.head)
        assert reserved == 0 and length == len(s.payload)
        # Sliced straight out of the checkpoint: head (16) then payload (L).
        covered = data[s.at : s.at + SECTION_HEAD.size + length]
        assert covered == s.head + s.payload
        assert s.crc == zlib.crc32(covered), f"CRC of {tag!r} at {s.at} is not crc32(head+payload)"
        assert s.crc != zlib.crc32(s.payload)  # the head really counts

    meta = sections[0].payload
    file_size, count = struct.unpack_from("<QQ", meta)
    assert file_size == built["file_size"]
    assert len(meta) == 16 + 32 * count
    segs = [(s, e, refs, kind) for s, e, refs, kind, pad in SEGMENT.iter_unpack(meta[16:])]
    assert segs == built["segments"]
    assert all(pad == bytes(7) for *_x, pad in SEGMENT.iter_unpack(meta[16:]))

    runs = []
    for s in sections[1:-1]:
        (off,) = struct.unpack_from("<Q", s.payload)
        runs.append((off, s.payload[8:]))
    assert runs == built["runs"]

    assert struct.unpack("<QQ", sections[-1].payload) == (3, 3 * P)


@pytest.mark.parametrize(
    ("what", "match"),
    [
        ("header-crc-short", r"bad checksum in the header"),
        ("header-chunk-byte", r"bad checksum in the header"),
        ("meta-crc-payload-only", r"bad checksum in section META"),
        ("meta-padding-byte", r"bad checksum in section META"),
        ("page-crc-payload-only", r"bad checksum in page run"),
        ("page-crc-without-offset", r"bad checksum in page run"),
        ("end-crc-payload-only", r"bad checksum in section END"),
    ],
)
async def test_bytes_a_crc_covers_are_checked(what: str, match: str) -> None:
    """Each variant changes only what a CRC covers, or computes a CRC over
    less than the format says; everything else stays well-formed."""
    data, _n, _built = await _saved()
    _header, sections = parse(data)
    body = bytearray(data)
    meta, page, end = sections[0], sections[1], sections[-1]

    def replace(s: Section, new: bytes) -> bytes:
        old_len = SECTION_HEAD.size + len(s.payload) + CRC.size
        return bytes(body[: s.at]) + new + bytes(body[s.at + old_len :])

    if what == "header-crc-short":
        struct.pack_into("<I", body, 28, zlib.crc32(data[0:24]))
        crafted = bytes(body)
    elif what == "header-chunk-byte":
        body[17] ^= 0x01  # the writer's chunk size: informational, CRC only
        crafted = bytes(body)
    elif what == "meta-crc-payload-only":
        crafted = replace(meta, section(b"META", meta.payload, crc_over="payload"))
    elif what == "meta-padding-byte":
        body[meta.at + 16 + 16 + 25] ^= 0x01  # a pad byte of segment 0
        crafted = bytes(body)
    elif what == "page-crc-payload-only":
        crafted = replace(page, section(b"PAGE", page.payload, crc_over="payload"))
    elif what == "page-crc-without-offset":
        crafted = replace(
            page, section(b"PAGE", page.payload, crc_over="head+payload-without-offset")
        )
    else:
        crafted = replace(end, section(b"END ", end.payload, crc_over="payload"))
    assert crafted != data and len(crafted) == len(data)
    before = open_fds()
    with pytest.raises(CheckpointError, match=match):
        async with load_memory_file(io.BytesIO(crafted)):
            pytest.fail("a checkpoint with a wrong CRC was loaded")
    assert open_fds() == before


async def _two_runs() -> tuple[bytes, list[Section], FileRange]:
    """One live range of 4 pages, pages 0 and 2 written: two PAGE runs."""
    async with open_memory_file(opts=OPTS) as mf:
        fr = mf.allocate(4 * P)
        for i, byte in ((0, 0x11), (2, 0x22)):
            v = mf.map_internal(FileRange(fr.start + i * P, fr.start + (i + 1) * P))[0]
            v[:] = bytes([byte]) * P
            v.release()
        out = io.BytesIO()
        await mf.save(out)
    data = out.getvalue()
    header, sections = parse(data)
    assert [s.tag for s in sections] == [b"META", b"PAGE", b"PAGE", b"END "]
    return header, sections, fr


def _assemble(header: bytes, sections: list[Section], runs: list[bytes]) -> bytes:
    meta, end = sections[0], sections[-1]
    return (
        header
        + section(b"META", meta.payload)
        + b"".join(runs)
        + section(b"END ", end.payload)  # same count and bytes
    )


@pytest.mark.parametrize("how", ["swapped", "moved-onto-the-first"])
async def test_a_page_run_before_the_previous_one_is_refused(how: str) -> None:
    """Both runs stay inside the live pages and every CRC is right: only the
    order is wrong.  Loading must refuse it, not silently write the second
    run over (or before) the first."""
    header, sections, fr = await _two_runs()
    first = page_run(fr.start, b"\x11" * P)
    if how == "swapped":
        runs = [page_run(fr.start + 2 * P, b"\x22" * P), first]
    else:  # the second run moved from page 2 to page 0, over the first
        runs = [first, page_run(fr.start, b"\x22" * P)]
    crafted = _assemble(header, sections, runs)
    before = open_fds()
    with pytest.raises(CheckpointError, match="out of order"):
        async with load_memory_file(io.BytesIO(crafted)) as mf:
            got = pread(mf, FileRange(fr.start, fr.start + 3 * P))
            pytest.fail(f"out-of-order runs were loaded; page 0 starts {got[:1]!r}")
    assert open_fds() == before


async def test_a_run_starting_where_the_previous_one_ends_is_in_order() -> None:
    """The boundary of the same rule: a run moved to start exactly at the end
    of the previous one is in order, and lands where it says."""
    header, sections, fr = await _two_runs()
    runs = [page_run(fr.start, b"\x11" * P), page_run(fr.start + P, b"\x22" * P)]
    async with load_memory_file(io.BytesIO(_assemble(header, sections, runs))) as mf:
        got = pread(mf, fr)
        assert got == b"\x11" * P + b"\x22" * P + bytes(2 * P)
        assert mf.accounting.snapshot().anonymous == 2 * P
        mf.check_invariants()
