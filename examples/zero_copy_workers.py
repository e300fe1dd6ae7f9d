"""Share the memory file with worker processes, read-only and zero-copy.

    python examples/zero_copy_workers.py

The parent keeps 48 MiB of payloads in one memory file.  It gives each
worker process a read-only fd of that file (``mf.share(readonly=True)``),
passed over a Unix socket (SCM_RIGHTS: anyio's ``send_fds`` in the parent,
``socket.recv_fds`` in the worker).  From then on a job is 16 bytes,
``(offset, length)``; the worker maps the fd once and checksums the bytes in
place.  Nothing is copied between the processes.  The fd is read-only: the
kernel refuses a writable mapping of it (the worker checks).  It is not a
sandbox: a process of the same user can still open ``/proc/<pid>/fd/<n>``
afresh, read-write (see ``tests/test_security.py``).

For comparison the same payloads go through ``multiprocessing.Pool.map``,
which pickles every payload and pipes it to a worker.  Both sides check
every CRC against the parent's.  Prints both throughputs and their ratio.
"""

from __future__ import annotations

import mmap
import multiprocessing
import os
import random
import shutil
import socket
import struct
import tempfile
import time
import zlib
from pathlib import Path

import anyio
import anyio.abc
from anyio.streams.buffered import BufferedByteReceiveStream

from aiopgalloc import AccessType, FileRange, MemoryKind, open_memory_file

WORKERS = 2
PAYLOADS = 192
PAYLOAD_SIZE = 256 * 1024
ROUNDS = 4
JOB = struct.Struct("<QQ")  # offset, length; length 0 = stop
REPLY = struct.Struct("<I")  # crc32


def zero_copy_worker(sock_path: str) -> None:
    """A worker process: receive the fd, map it read-only, checksum jobs."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(sock_path)
        _, fds, _, _ = socket.recv_fds(sock, 16, 1)
        fd = fds[0]
        try:  # the fd is read-only: a writable shared mapping must be refused
            mmap.mmap(fd, mmap.PAGESIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            refused = False
        except PermissionError:
            refused = True
        mm = mmap.mmap(fd, os.fstat(fd).st_size, mmap.MAP_SHARED, mmap.PROT_READ)
        view = memoryview(mm)
        sock.sendall(bytes([refused]))
        jobs = sock.makefile("rb")
        while True:
            offset, length = JOB.unpack(jobs.read(JOB.size))
            if length == 0:
                break
            if offset + length > len(mm):  # the file grew since: map it again
                view.release()
                mm.close()
                mm = mmap.mmap(fd, os.fstat(fd).st_size, mmap.MAP_SHARED, mmap.PROT_READ)
                view = memoryview(mm)
            sock.sendall(REPLY.pack(zlib.crc32(view[offset : offset + length])))
        view.release()
        mm.close()
        os.close(fd)


async def run_zero_copy(
    fd: int, jobs: list[FileRange], expected: list[int], folder: Path
) -> tuple[float, int]:
    """Start the workers, pass them the fd, run every job ``ROUNDS`` times.
    Returns the seconds taken and the bytes sent over the sockets."""
    path = folder / "workers.sock"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=zero_copy_worker, args=(str(path),)) for _ in range(WORKERS)]
    sent = 0
    async with await anyio.create_unix_listener(path) as listener:
        for p in procs:
            await anyio.to_thread.run_sync(p.start)
        conns: list[anyio.abc.SocketStream] = []
        for _ in procs:
            conn = await listener.accept()
            assert isinstance(conn, anyio.abc.UNIXSocketStream)
            await conn.send_fds(b"F", [fd])  # SCM_RIGHTS: the worker gets its own fd
            conns.append(conn)
        readers = [BufferedByteReceiveStream(c) for c in conns]
        for r in readers:
            assert await r.receive_exactly(1) == b"\x01", "a worker could map the file writable"
        print(f"{WORKERS} workers hold a read-only fd each; a writable mapping was refused")

        async def drive(i: int) -> None:
            nonlocal sent
            mine = [k for k in range(len(jobs)) if k % WORKERS == i] * ROUNDS
            msgs = b"".join(JOB.pack(jobs[k].start, PAYLOAD_SIZE) for k in mine)
            sent += len(msgs) + JOB.size
            await conns[i].send(msgs)  # pipelined: every job at once
            replies = await readers[i].receive_exactly(REPLY.size * len(mine))
            for n, k in enumerate(mine):
                (crc,) = REPLY.unpack_from(replies, n * REPLY.size)
                assert crc == expected[k], f"payload {k}: bad checksum"
            await conns[i].send(JOB.pack(0, 0))

        t0 = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for i in range(WORKERS):
                tg.start_soon(drive, i)
        took = time.perf_counter() - t0
        for c in conns:
            await c.aclose()
    for p in procs:
        await anyio.to_thread.run_sync(p.join)
    return took, sent


def run_pickled(payloads: list[bytes], expected: list[int]) -> float:
    """The same jobs through multiprocessing.Pool.map (pickled payloads)."""
    with multiprocessing.get_context("spawn").Pool(WORKERS) as pool:
        pool.map(zlib.crc32, [b""] * WORKERS)  # workers started before timing
        t0 = time.perf_counter()
        crcs = pool.map(zlib.crc32, payloads * ROUNDS, chunksize=8)
        took = time.perf_counter() - t0
    assert crcs == expected * ROUNDS, "bad checksum through the pool"
    return took


async def main() -> None:
    rng = random.Random(1)
    folder = Path(tempfile.mkdtemp(prefix="aiopgalloc-zero-copy-"))
    try:
        async with open_memory_file() as mf:
            jobs, expected, payloads = [], [], []
            for _ in range(PAYLOADS):
                fr = mf.allocate(PAYLOAD_SIZE, MemoryKind.ANONYMOUS)
                data = rng.randbytes(PAYLOAD_SIZE)
                with mf.view(fr, AccessType.WRITE) as view:
                    view[:] = data  # released on leaving: views alive at close draw a warning
                jobs.append(fr)
                expected.append(zlib.crc32(data))
                payloads.append(data)
            total = PAYLOADS * PAYLOAD_SIZE * ROUNDS
            print(
                f"{PAYLOADS} payloads of {PAYLOAD_SIZE // 1024} KiB in one memory file; each "
                f"worker checksums its share {ROUNDS} times ({total >> 20} MiB in all)"
            )
            fd = mf.share(readonly=True)
            try:
                zc_took, sent = await run_zero_copy(fd, jobs, expected, folder)
            finally:
                os.close(fd)
            pk_took = await anyio.to_thread.run_sync(run_pickled, payloads, expected)
            zc, pk = total / zc_took / 2**20, total / pk_took / 2**20
            print(
                f"zero-copy (fd + offsets):   {zc:8.0f} MiB/s  ({sent} bytes of messages, "
                "every checksum right)"
            )
            print(f"pickled (Pool.map):         {pk:8.0f} MiB/s  (every payload copied)")
            print(f"zero-copy is {zc / pk:.1f}x the throughput of pickling here")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    anyio.run(main)
