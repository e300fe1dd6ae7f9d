"""The bytes of a checkpoint: layouts, encoding, and a checking reader.

``aiopgalloc.checkpoint`` describes the format and drives saving and
loading; this module only knows bytes.  Nothing here touches a memory file,
so every check can be reasoned about (and tested) on its own.  All integers
are little-endian; every section ends with a CRC-32 (``zlib.crc32``) of its
16-byte head and its payload.
"""

from __future__ import annotations

import bisect
import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .ranges import PAGE_SIZE
from .usage import MemoryKind

__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "CheckpointError",
    "CheckpointReader",
    "Header",
    "Metadata",
    "encode_end",
    "encode_header",
    "encode_meta",
    "encode_page_head",
    "section_crc",
]

MAGIC = b"AIOPGCKP"
"""The first eight bytes of every checkpoint."""
FORMAT_VERSION = 1
"""The format version this module writes, and the newest it reads."""

TAG_META = b"META"
TAG_PAGE = b"PAGE"
TAG_END = b"END "

HEADER = struct.Struct("<8sHHIQII")  # magic, version, flags, page size, chunk size, 0, crc
SECTION = struct.Struct("<4sIQ")  # tag, reserved (0), payload length
CRC = struct.Struct("<I")
META_HEAD = struct.Struct("<QQ")  # file size, segment count
SEGMENT = struct.Struct("<QQQB7x")  # start, end, refs, kind, padding
PAGE_OFFSET = struct.Struct("<Q")  # a page run's file offset, first in its payload
END = struct.Struct("<QQ")  # page runs, page bytes

KNOWN_FLAGS = 0
"""No header flag is defined yet; a reader refuses any set bit, since a flag
would only exist to change how the rest must be read."""

_MAX_OFFSET = (1 << 63) - 1


class CheckpointError(ValueError):
    """A checkpoint cannot be loaded: it is not one, it is damaged or
    truncated, or it was written by a newer format version.  The message
    names the section and the byte offset in the checkpoint where the
    problem was found.  Loading that raises it leaves nothing behind."""


@dataclass(frozen=True, slots=True)
class Header:
    """The fixed header: format version, flags, the writer's page and chunk sizes."""

    version: int
    flags: int
    page_size: int
    chunk_size: int


@dataclass(frozen=True, slots=True)
class Metadata:
    """The META section: the file size and the live segments, as
    ``(start, end, kind, refs)`` sorted by start.  ``spans`` are the same
    pages merged into maximal runs, for checking where page runs land."""

    file_size: int
    segments: list[tuple[int, int, MemoryKind, int]]
    spans: list[tuple[int, int]]

    def span_end(self, offset: int) -> int:
        """The end of the live span holding ``offset``, or -1 if none does."""
        i = bisect.bisect_right(self.spans, (offset, _MAX_OFFSET)) - 1
        if i >= 0 and self.spans[i][0] <= offset < self.spans[i][1]:
            return self.spans[i][1]
        return -1


def merge_spans(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted ranges with touching neighbours joined."""
    spans: list[tuple[int, int]] = []
    for s, e in ranges:
        if spans and spans[-1][1] == s:
            spans[-1] = (spans[-1][0], e)
        else:
            spans.append((s, e))
    return spans


# ----------------------------------------------------------------- encoding


def encode_header(chunk_size: int) -> bytes:
    """The 32-byte file header for this format version."""
    head = HEADER.pack(MAGIC, FORMAT_VERSION, 0, PAGE_SIZE, chunk_size, 0, 0)
    crc = zlib.crc32(head[: HEADER.size - CRC.size])
    return head[: HEADER.size - CRC.size] + CRC.pack(crc)


def section_crc(head: bytes, payload: Iterable[Any], crc: int = 0) -> int:
    """The CRC-32 of a section's head followed by its payload pieces."""
    crc = zlib.crc32(head, crc)
    for piece in payload:
        crc = zlib.crc32(piece, crc)
    return crc


def _section(tag: bytes, payload: bytes) -> bytes:
    head = SECTION.pack(tag, 0, len(payload))
    return head + payload + CRC.pack(section_crc(head, (payload,)))


def encode_meta(file_size: int, segments: list[tuple[int, int, MemoryKind, int]]) -> bytes:
    """The whole META section (head, payload, CRC)."""
    parts = [META_HEAD.pack(file_size, len(segments))]
    pack = SEGMENT.pack
    parts.extend(pack(s, e, refs, int(kind)) for s, e, kind, refs in segments)
    return _section(TAG_META, b"".join(parts))


def encode_page_head(offset: int, length: int) -> bytes:
    """The head of a PAGE section for ``length`` bytes at file ``offset``,
    with the offset that starts its payload (24 bytes).  The data and the
    CRC follow."""
    return SECTION.pack(TAG_PAGE, 0, PAGE_OFFSET.size + length) + PAGE_OFFSET.pack(offset)


def encode_end(runs: int, page_bytes: int) -> bytes:
    """The whole END section."""
    return _section(TAG_END, END.pack(runs, page_bytes))


# ------------------------------------------------------------------ reading


class CheckpointReader:
    """Reads a checkpoint from a blocking binary stream, checking as it goes.

    Keeps the offset of every byte consumed so errors can name it.  When the
    stream's remaining size is known (a file, a seekable stream), a section
    whose length runs past the end is refused before anything is read;
    otherwise a short read reports the truncation.  Reads exactly the
    checkpoint's bytes, nothing past its END section.
    """

    def __init__(self, stream: Any, size: int | None) -> None:
        self._stream = stream
        self._size = size
        self._readinto = getattr(stream, "readinto", None)
        self.pos = 0

    def _truncated(self, what: str, want: int, got: int) -> CheckpointError:
        return CheckpointError(
            f"checkpoint truncated at offset {self.pos + got}: {what} needs {want} bytes "
            f"from offset {self.pos}, only {got} are there"
        )

    def read_exact(self, n: int, what: str) -> bytes:
        """Exactly ``n`` bytes; ``CheckpointError`` naming ``what`` if the
        input ends first."""
        parts: list[bytes] = []
        got = 0
        while got < n:
            piece = self._stream.read(min(n - got, 16 << 20))
            if not piece:
                raise self._truncated(what, n, got)
            parts.append(piece)
            got += len(piece)
        self.pos += n
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def readinto_exact(self, view: memoryview, what: str) -> None:
        """Fill ``view`` entirely (straight into it when the stream has
        ``readinto``)."""
        n = len(view)
        got = 0
        while got < n:
            if self._readinto is not None:
                k = self._readinto(view[got:])
            else:
                piece = self._stream.read(n - got)
                k = len(piece)
                view[got : got + k] = piece
            if not k:
                raise self._truncated(what, n, got)
            got += k
        self.pos += n

    def check_room(self, n: int, what: str) -> None:
        """Refuse a length that runs past the end of a stream of known size
        (``what`` names the claim, with its offset)."""
        if self._size is not None and self.pos + n > self._size:
            raise CheckpointError(
                f"checkpoint truncated or damaged: {what} claims {n} more bytes from "
                f"offset {self.pos}, past the end of the input ({self._size - self.pos} "
                "bytes left)"
            )

    def read_header(self) -> Header:
        """The file header, checked: magic, version, CRC, flags, page size."""
        raw = b""
        while len(raw) < HEADER.size:
            piece = self._stream.read(HEADER.size - len(raw))
            if not piece:
                break
            raw += piece
        if not raw:
            raise CheckpointError("checkpoint truncated: the input is empty (offset 0)")
        if raw[: len(MAGIC)] != MAGIC[: len(raw)]:
            raise CheckpointError(
                f"not an aiopgalloc checkpoint: bad magic {raw[:8]!r} at offset 0 "
                f"(expected {MAGIC!r})"
            )
        if len(raw) < HEADER.size:
            raise self._truncated("the header", HEADER.size, len(raw))
        self.pos = HEADER.size
        _magic, version, flags, page_size, chunk_size, _zero, crc = HEADER.unpack(raw)
        crc_ok = zlib.crc32(raw[: HEADER.size - CRC.size]) == crc
        if version > FORMAT_VERSION:
            # Bytes 0-11 mean the same in every version, so this is a newer
            # checkpoint, unless the header is damaged (then say so too).
            raise CheckpointError(
                f"checkpoint written by format version {version}, this aiopgalloc "
                f"reads up to {FORMAT_VERSION}"
                + ("" if crc_ok else " (or its header is damaged: bad checksum)")
            )
        if not crc_ok:
            raise CheckpointError("bad checksum in the header (offset 0)")
        if version < 1:
            raise CheckpointError(f"bad format version {version} in the header (offset 8)")
        if flags & ~KNOWN_FLAGS:
            raise CheckpointError(f"unknown header flags {flags:#x} (offset 10)")
        if page_size != PAGE_SIZE:
            raise CheckpointError(
                f"checkpoint has {page_size}-byte pages, this host has {PAGE_SIZE} (offset 12)"
            )
        return Header(version, flags, page_size, chunk_size)

    def read_section_head(self) -> tuple[bytes, int, bytes, int]:
        """The next section's (tag, payload length, raw head, offset)."""
        at = self.pos
        first = self._stream.read(SECTION.size)
        if not first:
            raise CheckpointError(
                f"checkpoint truncated at offset {at}: the input ends between two "
                "sections, before the END section"
            )
        self.pos += len(first)
        rest = SECTION.size - len(first)
        head = (
            first + self.read_exact(rest, f"the section header at offset {at}") if rest else first
        )
        tag, reserved, length = SECTION.unpack(head)
        name = tag.decode("ascii", "replace").strip()
        if tag not in (TAG_META, TAG_PAGE, TAG_END):
            raise CheckpointError(f"unknown section {tag!r} at offset {at}")
        if reserved:
            raise CheckpointError(f"section {name} at offset {at}: reserved field is not zero")
        self.check_room(length + CRC.size, f"section {name} at offset {at}")
        return tag, length, head, at

    def check_crc(self, crc: int, what: str, at: int) -> None:
        """Read a section's trailing CRC and compare it with ``crc``."""
        (stored,) = CRC.unpack(self.read_exact(CRC.size, f"the checksum of {what}"))
        if stored != crc:
            raise CheckpointError(f"bad checksum in {what} at offset {at}")

    def read_meta(self, max_end: int) -> Metadata:
        """The META section, which must come first, checked through: its
        CRC, then every segment (page-aligned, sorted, disjoint, inside the
        file, refs >= 1, a known kind).  ``max_end`` bounds the file size."""
        tag, length, head, at = self.read_section_head()
        if tag != TAG_META:
            raise CheckpointError(f"expected the META section at offset {at}, found {tag!r}")
        if length < META_HEAD.size or (length - META_HEAD.size) % SEGMENT.size:
            raise CheckpointError(f"section META at offset {at}: bad length {length}")
        payload = self.read_exact(length, "section META")
        self.check_crc(section_crc(head, (payload,)), "section META", at)
        file_size, count = META_HEAD.unpack_from(payload)
        if count != (length - META_HEAD.size) // SEGMENT.size:
            raise CheckpointError(
                f"section META at offset {at}: {count} segments do not fit {length} bytes"
            )
        if file_size % PAGE_SIZE or file_size > max_end:
            raise CheckpointError(f"section META at offset {at}: bad file size {file_size:#x}")
        segments: list[tuple[int, int, MemoryKind, int]] = []
        prev_end = 0
        kinds = len(MemoryKind)
        for i, (s, e, refs, kind) in enumerate(SEGMENT.iter_unpack(payload[META_HEAD.size :])):
            if (s | e) % PAGE_SIZE or s < prev_end or e <= s or e > file_size:
                raise CheckpointError(
                    f"section META at offset {at}: segment {i} [{s:#x}, {e:#x}) is "
                    f"misaligned, out of order or past the file size"
                )
            if refs < 1 or kind >= kinds:
                raise CheckpointError(
                    f"section META at offset {at}: segment {i} has refs {refs}, kind {kind}"
                )
            segments.append((s, e, MemoryKind(kind), refs))
            prev_end = e
        spans = merge_spans((s, e) for s, e, _k, _r in segments)
        return Metadata(file_size, segments, spans)

    def read_end(self, length: int, head: bytes, at: int) -> tuple[int, int]:
        """The END section's payload (after its head): (page runs, page bytes)."""
        if length != END.size:
            raise CheckpointError(f"section END at offset {at}: bad length {length}")
        payload = self.read_exact(length, "section END")
        self.check_crc(section_crc(head, (payload,)), "section END", at)
        runs, nbytes = END.unpack(payload)
        return runs, nbytes
