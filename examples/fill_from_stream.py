"""Fill pages of the memory file straight from a socket stream.

    python examples/fill_from_stream.py

``await mf.allocate_and_fill(length, kind, reader)`` allocates ``length``
bytes and receives into the pages directly: ``reader`` is an anyio byte
stream (here a TCP connection on 127.0.0.1) or any object with
``readinto`` (a file).  No intermediate buffer of the whole length exists.

Three uploads:

1. 24 MiB sent whole: the range is full, the SHA-256 of its pages matches
   the sender's;
2. a sender that stops early (1 MiB and 100 bytes of a promised 4 MiB):
   the call returns the whole pages received (1 MiB) and frees the rest;
   the 100 bytes of the last partial page are dropped;
3. a sender that sends nothing: ``EOFError``, and nothing stays allocated.
"""

from __future__ import annotations

import hashlib
import os

import anyio
import anyio.abc

from aiopgalloc import AccessType, FileRange, MemoryFile, MemoryKind, open_memory_file

MiB = 1 << 20


def sha256_of(mf: MemoryFile, fr: FileRange) -> str:
    """The SHA-256 of the bytes in ``fr``, read in place."""
    h = hashlib.sha256()
    with mf.view(fr, AccessType.READ) as view:
        h.update(view)
    return h.hexdigest()


async def upload(port: int, data: bytes) -> None:
    """The sender: connect, send ``data`` in 64 KiB pieces, close."""
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        for i in range(0, len(data), 64 * 1024):
            await stream.send(data[i : i + 64 * 1024])


async def receive(
    mf: MemoryFile,
    listener: anyio.abc.Listener[anyio.abc.SocketStream],
    port: int,
    data: bytes,
    length: int,
) -> FileRange:
    """Start a sender of ``data``; fill ``length`` bytes from its connection.
    Raises ``EOFError`` if the sender sent less than a page."""
    result: FileRange | EOFError
    async with anyio.create_task_group() as tg:
        tg.start_soon(upload, port, data)
        assert isinstance(listener, anyio.abc.SocketListener)
        async with await listener.accept() as conn:
            try:
                result = await mf.allocate_and_fill(length, MemoryKind.ANONYMOUS, conn)
            except EOFError as exc:  # raised outside the task group: not wrapped in a group
                result = exc
    if isinstance(result, EOFError):
        raise result
    return result


async def main() -> None:
    async with (
        open_memory_file() as mf,
        await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0) as listeners,
    ):
        listener = listeners.listeners[0]  # one address, one listener
        port = listener.extra(anyio.abc.SocketAttribute.local_port)

        data = os.urandom(24 * MiB)
        fr = await receive(mf, listener, port, data, len(data))
        assert fr.length == len(data)
        same = sha256_of(mf, fr) == hashlib.sha256(data).hexdigest()
        assert same
        await mf.update_usage()
        print(
            f"1. received {fr.length // MiB} MiB over TCP into {fr}; SHA-256 matches the "
            f"sender's; {mf.accounting.snapshot().anonymous // MiB} MiB committed (anonymous)"
        )
        mf.dec_ref(fr)

        short = os.urandom(MiB + 100)
        fr = await receive(mf, listener, port, short, 4 * MiB)
        assert fr.length == MiB and sha256_of(mf, fr) == hashlib.sha256(short[:MiB]).hexdigest()
        print(
            f"2. asked for 4 MiB, the sender stopped after {len(short)} bytes: got {fr} "
            f"({fr.length} bytes, whole pages only); the rest was freed"
        )
        mf.dec_ref(fr)

        try:
            await receive(mf, listener, port, b"", 4 * MiB)
        except EOFError as exc:
            print(f"3. a sender with nothing to send: EOFError ({exc}); nothing kept")
        else:
            raise AssertionError("expected EOFError")

        await mf.wait_for_reclaim()
        assert mf.total_usage() == 0
        print(f"all freed: {mf.total_usage()} bytes committed in the memory file")


if __name__ == "__main__":
    anyio.run(main)
