"""A TCP cache server whose shards are evictable users of one memory file.

    python examples/cache_server.py

The server listens on 127.0.0.1 (a free port) and speaks a tiny line
protocol, one command per line:

    SET <key> <n>\\n<n bytes>\\n  ->  STORED
    GET <key>\\n                 ->  VALUE <n>\\n<n bytes>\\n   or   MISS
    DEL <key>\\n                 ->  DELETED   or   MISS
    STATS\\n                     ->  STATS entries=.. bytes=.. evicted=.. committed=..
    PRESSURE low|medium|critical\\n  ->  SHED <bytes>   (admin: simulate memory pressure)

Each value lives in its own page-aligned allocation of the memory file; each
of the 8 shards marks its values evictable, so under memory pressure the
allocator calls ``await shard.evict(range)`` and the shard drops the values
in that range.  Eviction is graded: ``low`` sheds a quarter of every shard,
``medium`` half, ``critical`` everything.

Here the pressure comes from a ``ManualPressure`` source (the admin
command), so the example runs anywhere; in production pass
``use_host_memcg_pressure=True`` without a source and the library listens to
the kernel (cgroup v1 pressure levels, cgroup v2 PSI, ...).

The load client opens 8 connections, stores and reads 2,000 values, checks
every byte, then sends ``PRESSURE low`` and ``PRESSURE critical`` and shows
what the cache gave back.  Then both stop.  It runs on asyncio (anyio's
asyncio backend: ``anyio.run(main)``); the same code runs on trio.
"""

from __future__ import annotations

import hashlib
import random
import time
from dataclasses import dataclass

import anyio
import anyio.abc
from anyio.streams.buffered import BufferedByteReceiveStream

from aiopgalloc import (
    AccessType,
    DelayedEviction,
    EvictableRange,
    FileRange,
    ManualPressure,
    MemoryFile,
    MemoryFileOpts,
    MemoryKind,
    PressureLevel,
    open_memory_file,
    page_round_up,
)

SHARDS = 8
MAX_VALUE = 1 << 20


@dataclass
class Entry:
    """One stored value: its pages and its length in bytes."""

    fr: FileRange
    length: int


class Shard:
    """One shard of the cache: an evictable user of the memory file.

    Its own offsets (the ``EvictableRange`` space) are the file offsets of its
    values, so ``evict(er)`` drops the values whose pages overlap ``er``."""

    def __init__(self, mf: MemoryFile) -> None:
        self.mf = mf
        self.entries: dict[bytes, Entry] = {}
        self.evicted_bytes = 0

    def set(self, key: bytes, value: bytes) -> None:
        self.delete(key)
        fr = self.mf.allocate(page_round_up(len(value)), MemoryKind.PAGE_CACHE)
        with self.mf.view(fr) as view:  # one buffer, whatever chunks it crosses
            view[: len(value)] = value
        self.entries[key] = Entry(fr, len(value))
        self.mf.mark_evictable(self, EvictableRange(fr.start, fr.end))

    def get(self, key: bytes) -> bytes | None:
        entry = self.entries.get(key)
        if entry is None:
            return None
        with self.mf.view(entry.fr, AccessType.READ) as view:
            return bytes(view[: entry.length])

    def delete(self, key: bytes) -> bool:
        entry = self.entries.pop(key, None)
        if entry is None:
            return False
        self.mf.mark_unevictable(self, EvictableRange(entry.fr.start, entry.fr.end))
        self.mf.dec_ref(entry.fr)
        return True

    async def evict(self, er: EvictableRange) -> None:
        """Called by the allocator under memory pressure."""
        for key, entry in list(self.entries.items()):
            fr = entry.fr
            if fr.start < er.end and er.start < fr.end:
                del self.entries[key]
                # A graded eviction may cut er inside a value: withdraw the rest.
                if fr.start < er.start:
                    self.mf.mark_unevictable(self, EvictableRange(fr.start, er.start))
                if fr.end > er.end:
                    self.mf.mark_unevictable(self, EvictableRange(er.end, fr.end))
                self.mf.dec_ref(fr)
                self.evicted_bytes += fr.length


class CacheServer:
    """The server: shards, the pressure source and the connection handler."""

    def __init__(self, mf: MemoryFile, pressure: ManualPressure) -> None:
        self.mf = mf
        self.pressure = pressure
        self.shards = [Shard(mf) for _ in range(SHARDS)]

    def shard(self, key: bytes) -> Shard:
        return self.shards[hashlib.blake2b(key, digest_size=2).digest()[0] % SHARDS]

    def stats_line(self) -> bytes:
        entries = sum(len(s.entries) for s in self.shards)
        nbytes = sum(e.fr.length for s in self.shards for e in s.entries.values())
        evicted = sum(s.evicted_bytes for s in self.shards)
        return (
            f"STATS entries={entries} bytes={nbytes} evicted={evicted} "
            f"committed={self.mf.total_usage()}\n"
        ).encode()

    async def shed(self, level: PressureLevel) -> int:
        """Notify the pressure source and wait until the evictions it caused
        are done; returns the bytes given back."""
        before = sum(s.evicted_bytes for s in self.shards)
        seen = self.mf.stats()
        counts = (seen.pressure_low, seen.pressure_medium, seen.pressure_critical)
        self.pressure.notify(level)
        with anyio.fail_after(5):
            while True:  # until the allocator's watcher has taken the notification
                st = self.mf.stats()
                if (st.pressure_low, st.pressure_medium, st.pressure_critical) != counts:
                    break
                await anyio.sleep(0.001)
            # Then until the evictions it started are done: a cancel scope
            # bounds the wait, as anyio and trio take timeouts.
            await self.mf.wait_for_evictions()
        return sum(s.evicted_bytes for s in self.shards) - before

    async def handle(self, client: anyio.abc.ByteStream) -> None:
        """Serve one connection until it closes."""
        reader = BufferedByteReceiveStream(client)
        async with client:
            while True:
                try:
                    line = await reader.receive_until(b"\n", 1024)
                except (anyio.EndOfStream, anyio.IncompleteRead):
                    return
                cmd, *args = line.split()
                if cmd == b"SET":
                    n = int(args[1])
                    if not 0 < n <= MAX_VALUE:
                        await client.send(b"ERROR bad length\n")
                        return
                    value = await reader.receive_exactly(n + 1)
                    self.shard(args[0]).set(args[0], value[:-1])
                    await client.send(b"STORED\n")
                elif cmd == b"GET":
                    found = self.shard(args[0]).get(args[0])
                    reply = b"MISS\n" if found is None else b"VALUE %d\n%s\n" % (len(found), found)
                    await client.send(reply)
                elif cmd == b"DEL":
                    deleted = self.shard(args[0]).delete(args[0])
                    await client.send(b"DELETED\n" if deleted else b"MISS\n")
                elif cmd == b"STATS":
                    await client.send(self.stats_line())
                elif cmd == b"PRESSURE":
                    shed = await self.shed(PressureLevel[args[0].decode().upper()])
                    await client.send(b"SHED %d\n" % shed)
                else:
                    await client.send(b"ERROR unknown command\n")


class Client:
    """A connection speaking the line protocol."""

    def __init__(self, stream: anyio.abc.ByteStream) -> None:
        self.stream = stream
        self.reader = BufferedByteReceiveStream(stream)

    async def call(self, line: bytes) -> bytes:
        await self.stream.send(line)
        return await self.reader.receive_until(b"\n", 1024)

    async def set(self, key: bytes, value: bytes) -> None:
        await self.stream.send(b"SET %s %d\n%s\n" % (key, len(value), value))
        assert await self.reader.receive_until(b"\n", 1024) == b"STORED"

    async def get(self, key: bytes) -> bytes | None:
        head = await self.call(b"GET %s\n" % key)
        if head == b"MISS":
            return None
        n = int(head.split()[1])
        return (await self.reader.receive_exactly(n + 1))[:-1]


def stats(line: bytes) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in (kv.split(b"=") for kv in line.split()[1:])}


async def load(port: int, keys: int = 2000, connections: int = 8) -> None:
    """Store, read back and check ``keys`` values, then shed under pressure."""
    rng = random.Random(42)
    values = {b"key%d" % i: rng.randbytes(rng.randint(100, 40_000)) for i in range(keys)}
    names = sorted(values)
    t0 = time.perf_counter()

    async def worker(part: list[bytes]) -> None:
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            c = Client(stream)
            for key in part:
                await c.set(key, values[key])
            for key in part:
                assert await c.get(key) == values[key], key

    async with anyio.create_task_group() as tg:
        for i in range(connections):
            tg.start_soon(worker, names[i::connections])
    took = time.perf_counter() - t0
    total = sum(len(v) for v in values.values())
    print(
        f"load: {connections} connections stored and read back {keys} values "
        f"({total / 2**20:.1f} MiB) in {took:.2f} s; every byte checked"
    )
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        admin = Client(stream)
        st = stats(await admin.call(b"STATS\n"))
        print(
            f"server: {st['entries']} entries, {st['bytes'] / 2**20:.1f} MiB in pages, "
            f"{st['committed'] / 2**20:.1f} MiB committed in the memory file"
        )
        for level in (b"low", b"critical"):
            shed = int((await admin.call(b"PRESSURE %s\n" % level)).split()[1])
            st = stats(await admin.call(b"STATS\n"))
            print(
                f"PRESSURE {level.decode():<8} -> the shards gave back {shed / 2**20:5.1f} MiB; "
                f"{st['entries']} entries ({st['bytes'] / 2**20:.1f} MiB) remain"
            )
        misses = 0
        for key in names[:100]:
            got = await admin.get(key)
            misses += got is None
            assert got is None or got == values[key]
        print(f"after critical pressure: {misses} of 100 reads miss (a client would refill them)")
        assert st["entries"] == 0 and misses == 100


async def main() -> None:
    pressure = ManualPressure()
    opts = MemoryFileOpts(
        delayed_eviction=DelayedEviction.ENABLED,
        use_host_memcg_pressure=True,
        pressure_source=pressure,  # drop this line to listen to the kernel instead
        evict_fraction_low=0.25,
        evict_fraction_medium=0.5,
    )
    async with open_memory_file(opts=opts) as mf:
        server = CacheServer(mf, pressure)
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        print(f"cache server listening on 127.0.0.1:{port}")
        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, server.handle)
            await load(port)
            tg.cancel_scope.cancel()  # stop the server
        await mf.wait_for_reclaim()
        print(f"server stopped; {mf.total_usage()} bytes committed in the memory file")


if __name__ == "__main__":
    anyio.run(main)
