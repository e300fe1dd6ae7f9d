"""Security: old contents never leak, and shared fds cannot harm the file.

- A new allocation never sees earlier contents, whether its pages were
  recycled (freed, zeroed by hand, handed out again before the releaser got
  to them) or released (punched out, then handed out): every allocation is
  filled with 0xFF before it is freed, and every new allocation must hold
  no 0xFF byte.  ``CYCLES_TOTAL`` cycles per CI run across the backends,
  both paths counted and required.
- Every fd the library opens is close-on-exec: a child process does not
  inherit any of them.
- A read-only fd from ``share(readonly=True)`` cannot write to or grow the
  file from another process, by any route (write calls, fallocate,
  mappings, mprotect, seals, re-opening through /proc).
- No holder of a shared fd, read-write either, can shrink the file
  (``F_SEAL_SHRINK``).

The child processes run with the same uid as the tests, or, when the tests
run as root, as ``nobody`` (root bypasses file permissions, so it would
prove nothing).
"""

from __future__ import annotations

import json
import os
import random
import re
import time
from typing import Any

import anyio
import pytest
from helpers import (
    FUZZ_LONG,
    backend_id,
    fill_byte,
    memfd_fds,
    open_fds,
    read_all,
    run_child,
)

from aiopgalloc import (
    HUGE_PAGE_SIZE,
    PAGE_SIZE,
    AccessType,
    FileRange,
    MemoryFile,
    MemoryFileOpts,
    open_memory_file,
)
from aiopgalloc.host.faults import faults

pytestmark = pytest.mark.anyio

P = PAGE_SIZE
H = HUGE_PAGE_SIZE
CYCLES_TOTAL = 1_000_000 if FUZZ_LONG else 50_000
CYCLES_PER_BACKEND = -(-CYCLES_TOTAL // 3)
RECYCLE_MAX = 16 * P
OPTS = MemoryFileOpts(chunk_size=H, recycle_max_bytes=RECYCLE_MAX)

# Figures per backend id, printed by the last test.
FIGURES: dict[str, dict[str, int]] = {}
CHILD_CHECKS: dict[str, int] = {}

_FF = memoryview(b"\xff" * (2 * H))
_FF_RE = re.compile(b"\xff")


@pytest.fixture(autouse=True)
def _no_faults() -> None:
    faults.reset()


def first_ff(mf: MemoryFile, fr: FileRange) -> int:
    """The offset of the first 0xFF byte in ``fr``, or -1.  (Only 0xFF is
    ever written in these tests, so any earlier content shows as 0xFF.)
    Searches the views in place (``re`` reads the buffer, no copy)."""
    pos = fr.start
    for v in mf.map_internal(fr, AccessType.READ):
        m = _FF_RE.search(v)
        i, n = (-1 if m is None else m.start()), len(v)
        del m
        v.release()
        if i >= 0:
            return pos + i
        pos += n
    return -1


def fill_ff(mf: MemoryFile, fr: FileRange) -> None:
    for v in mf.map_internal(fr, AccessType.WRITE):
        v[:] = _FF[: len(v)]
        v.release()


# ------------------------------------------------------- no leaked contents


async def test_new_allocations_never_see_old_contents(
    anyio_backend: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    bid = backend_id(anyio_backend)
    rng = random.Random(int(os.environ.get("AIOPGALLOC_TEST_SEED", "0")) + len(bid))
    recycled_cycles = released_cycles = clean_cycles = 0
    t0 = time.perf_counter()
    async with open_memory_file(opts=OPTS) as mf:
        # The check itself works: it finds a 0xFF byte anywhere in a range.
        probe = mf.allocate(3 * H)
        assert first_ff(mf, probe) == -1
        for off in (0, P - 1, H + 7, 3 * H - 1):
            page = FileRange(probe.start + off // P * P, probe.start + off // P * P + P)
            (v,) = mf.map_internal(page)
            v[off % P] = 0xFF
            v.release()
            assert first_ff(mf, probe) == probe.start + off
            (v,) = mf.map_internal(page)
            v[off % P] = 0
            v.release()
        mf.dec_ref(probe)
        await mf.wait_for_reclaim()

        dirty = bytearray(1 << 16)  # pages that ever held 0xFF
        pool: list[FileRange] = []
        for i in range(CYCLES_PER_BACKEND):
            r = rng.random()
            if r < 0.5:
                n = rng.randint(1, RECYCLE_MAX // P) * P  # may recycle
            elif r < 0.99:
                n = rng.randint(RECYCLE_MAX // P + 1, 48) * P  # prefers clean pages
            else:
                n = rng.choice([H, H + 5 * P])  # huge-page aligned
            before = mf.stats().recycled_bytes
            fr = mf.allocate(n)
            a, b = fr.start // P, fr.end // P
            if b > len(dirty):
                dirty += bytes(b)
            bad = first_ff(mf, fr)
            assert bad < 0, (
                f"cycle {i}: new allocation {fr} shows old contents at {bad:#x} "
                f"({'recycled' if mf.stats().recycled_bytes > before else 'not recycled'})"
            )
            if mf.stats().recycled_bytes > before:
                recycled_cycles += 1
            elif dirty.find(1, a, b) >= 0:
                released_cycles += 1  # once dirty, punched since, handed out again
            else:
                clean_cycles += 1
            fill_ff(mf, fr)
            dirty[a:b] = b"\1" * (b - a)
            pool.append(fr)
            while len(pool) > 6 or (pool and rng.random() < 0.5):
                victim = pool.pop(rng.randrange(len(pool)))
                if victim.length > P and rng.random() < 0.2:
                    # Free the tail only; the head stays live (and dirty).
                    cut = victim.start + P * rng.randint(1, victim.length // P - 1)
                    mf.dec_ref(FileRange(cut, victim.end))
                    pool.append(FileRange(victim.start, cut))
                else:
                    mf.dec_ref(victim)
            r2 = rng.random()
            if r2 < 0.12:
                await mf.wait_for_reclaim()
            elif r2 < 0.3:
                await anyio.sleep(0)
        for fr in pool:
            mf.dec_ref(fr)
        await mf.wait_for_reclaim()
        assert mf.total_usage() == 0
        mf.check_invariants()
        recycled_bytes, released_bytes = mf.stats().recycled_bytes, mf.stats().bytes_released
    seconds = time.perf_counter() - t0
    # Both paths were really taken, many times.
    assert recycled_bytes > 0 and released_bytes > 0
    assert recycled_cycles >= CYCLES_PER_BACKEND // 10, recycled_cycles
    assert released_cycles >= CYCLES_PER_BACKEND // 10, released_cycles
    FIGURES[bid] = {
        "cycles": CYCLES_PER_BACKEND,
        "recycled": recycled_cycles,
        "released": released_cycles,
        "clean": clean_cycles,
    }
    with capsys.disabled():
        print(
            f"\n[security, {bid}] {CYCLES_PER_BACKEND} allocate/fill 0xFF/free cycles in "
            f"{seconds:.1f} s: {recycled_cycles} on recycled pages "
            f"({recycled_bytes / 2**20:.0f} MiB), {released_cycles} on released pages "
            f"({released_bytes / 2**20:.0f} MiB released), {clean_cycles} on fresh pages; "
            f"old contents seen: 0"
        )


# ------------------------------------------------------------- fds and children

_ATTEMPT = r"""
import ctypes, errno, fcntl, json, mmap, os
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_int64]
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]

def attempt(name, f):
    try:
        f()
        res[name] = "ok"
    except OSError as e:
        res[name] = e.errno

def check(rc):
    if rc != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))

def fallocate(fd, mode, off, n):
    check(libc.fallocate(fd, mode, off, n))

def mprotect_write(fd, off):
    addr = libc.mmap(None, 4096, mmap.PROT_READ, mmap.MAP_SHARED, fd, off)
    if addr in (None, ctypes.c_void_p(-1).value):
        check(-1)
    check(libc.mprotect(addr, 4096, mmap.PROT_READ | mmap.PROT_WRITE))

def reopen_and_write(fd, flags, off):
    w = os.open(f"/proc/self/fd/{fd}", flags)
    try:
        os.pwrite(w, b"EVIL", off)
    finally:
        os.close(w)
"""


_DROP_PRIVILEGES = r"""
res = {}
if os.getuid() == 0:
    # Root bypasses file permissions: act as another, unprivileged process.
    try:
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)
        ctypes.CDLL(None).prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE: keep /proc/self/fd
    except OSError as e:
        res["drop"] = e.errno
res["uid"] = os.getuid()
"""


def _child(body: str, fd: int) -> dict[str, Any]:
    # Imports first: the stdlib may not be readable once privileges are dropped.
    code = _ATTEMPT + _DROP_PRIVILEGES + body + "\nprint(json.dumps(res))\n"
    out = run_child(code, pass_fds=(fd,))
    if out.returncode != 0:
        raise RuntimeError(f"the child failed: {out.stderr}")
    res: dict[str, Any] = json.loads(out.stdout)
    CHILD_CHECKS["children"] = CHILD_CHECKS.get("children", 0) + 1
    CHILD_CHECKS["attempts"] = CHILD_CHECKS.get("attempts", 0) + len(res) - 1
    return res


async def _populated(mf: MemoryFile) -> tuple[FileRange, bytes]:
    mf.allocate(P)
    fr = mf.allocate(4 * P)
    data = os.urandom(fr.length)
    for v in mf.map_internal(fr):
        v[:] = data
        v.release()
    return fr, data


def _unchanged(mf: MemoryFile, fr: FileRange, data: bytes, size: int) -> None:
    assert read_all(mf, fr) == data, "a child changed the file's bytes"
    assert os.fstat(mf.fd).st_size == size == mf.total_size(), "a child changed the size"
    mf.check_invariants()


async def test_every_fd_of_the_file_is_close_on_exec() -> None:
    before = open_fds()
    async with open_memory_file(opts=OPTS) as mf:
        fr = mf.allocate(3 * H)  # three chunks mapped: the mapping holds no fd
        fill_byte(mf, fr, 1)
        await mf.update_usage()
        shares = [mf.share(readonly=True), mf.share(readonly=False)]
        try:
            ours = open_fds() - before
            assert len(ours) >= 6, ours  # memfd, scan fd, eventfds, shares
            inheritable = [fd for fd in ours if os.get_inheritable(fd)]
            assert not inheritable, [(fd, os.readlink(f"/proc/self/fd/{fd}")) for fd in inheritable]
            st = os.fstat(mf.fd)
            # close_fds=False: only close-on-exec keeps them from the child.
            probe = (
                "import json, os\n"
                "out = []\n"
                "for name in os.listdir('/proc/self/fd'):\n"
                "    try:\n"
                "        s = os.fstat(int(name)); out.append([s.st_dev, s.st_ino])\n"
                "    except OSError:\n"
                "        pass\n"
                "print(json.dumps(out))\n"
            )
            out = run_child(probe, close_fds=False)
            assert out.returncode == 0, out.stderr
            seen = {tuple(x) for x in json.loads(out.stdout)}
            assert (st.st_dev, st.st_ino) not in seen, "the child inherited an fd of the file"
            CHILD_CHECKS["children"] = CHILD_CHECKS.get("children", 0) + 1
            CHILD_CHECKS["attempts"] = CHILD_CHECKS.get("attempts", 0) + len(ours)
        finally:
            for fd in shares:
                os.close(fd)
    assert open_fds() == before
    assert not memfd_fds()


async def test_readonly_share_cannot_write_or_grow() -> None:
    async with open_memory_file(opts=OPTS) as mf:
        fr, data = await _populated(mf)
        size = mf.total_size()
        fd = mf.share(readonly=True)
        try:
            res = _child(
                f"fd, off, size = {fd}, {fr.start}, {size}\n"
                "attempt('pwrite', lambda: os.pwrite(fd, b'EVIL', off))\n"
                "attempt('write', lambda: os.write(fd, b'EVIL'))\n"
                "attempt('writev', lambda: os.pwritev(fd, [b'EV', b'IL'], off))\n"
                "attempt('ftruncate_grow', lambda: os.ftruncate(fd, size * 2))\n"
                "attempt('fallocate_grow', lambda: fallocate(fd, 0, size, 4096))\n"
                "attempt('punch_hole', lambda: fallocate(fd, 3, off, 4096))\n"
                "attempt('mmap_shared_write', lambda: mmap.mmap(fd, 4096, mmap.MAP_SHARED,\n"
                "        mmap.PROT_READ | mmap.PROT_WRITE, offset=off))\n"
                "attempt('mprotect_write', lambda: mprotect_write(fd, off))\n"
                "attempt('add_seal', lambda: fcntl.fcntl(fd, fcntl.F_ADD_SEALS,\n"
                "        fcntl.F_SEAL_GROW))\n"
                "m = mmap.mmap(fd, 4096, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE,\n"
                "              offset=off)\n"
                "m[:4] = b'EVIL'  # copy-on-write: the file must not see it\n"
                "res['private_write_stayed_private'] = os.pread(fd, 4, off) != b'EVIL'\n"
                "res['size'] = os.fstat(fd).st_size\n",
                fd,
            )
        finally:
            os.close(fd)
        refused = {
            "pwrite",
            "write",
            "writev",
            "ftruncate_grow",
            "fallocate_grow",
            "punch_hole",
            "mmap_shared_write",
            "mprotect_write",
            "add_seal",
        }
        allowed = sorted(k for k in refused if res[k] == "ok")
        assert not allowed, f"a read-only share could {allowed}: {res}"
        assert res["private_write_stayed_private"] is True
        assert res["size"] == size
        _unchanged(mf, fr, data, size)


async def test_readonly_share_cannot_be_reopened_read_write() -> None:
    async with open_memory_file(opts=OPTS) as mf:
        fr, data = await _populated(mf)
        size = mf.total_size()
        fd = mf.share(readonly=True)
        try:
            res = _child(
                f"fd, off, size = {fd}, {fr.start}, {size}\n"
                "attempt('reopen_read', lambda: os.close(os.open(f'/proc/self/fd/{fd}',\n"
                "        os.O_RDONLY)))\n"
                "attempt('reopen_rw_write', lambda: reopen_and_write(fd, os.O_RDWR, off))\n"
                "attempt('reopen_wo_write', lambda: reopen_and_write(fd, os.O_WRONLY, off))\n",
                fd,
            )
        finally:
            os.close(fd)
        if res["uid"] == 0:
            pytest.skip("the child could not drop root privileges")
        assert res["reopen_rw_write"] != "ok", f"a read-only share was reopened read-write: {res}"
        assert res["reopen_wo_write"] != "ok", f"a read-only share was reopened write-only: {res}"
        _unchanged(mf, fr, data, size)


@pytest.mark.parametrize("readonly", [True, False], ids=["ro", "rw"])
async def test_no_shared_fd_can_shrink_the_file(readonly: bool) -> None:
    async with open_memory_file(opts=OPTS) as mf:
        fr, data = await _populated(mf)
        fill_byte(mf, mf.allocate(2 * H), 7)  # the file grows past its first chunk
        size = mf.total_size()
        fd = mf.share(readonly=readonly)
        try:
            res = _child(
                f"fd, size = {fd}, {size}\n"
                "attempt('truncate_zero', lambda: os.ftruncate(fd, 0))\n"
                "attempt('truncate_by_a_page', lambda: os.ftruncate(fd, size - 4096))\n"
                "attempt('truncate_to_one_chunk', lambda: os.ftruncate(fd, size // 2))\n"
                "attempt('collapse_range', lambda: fallocate(fd, 8, 0, 2 << 20))\n"
                "try:\n"
                "    os.close(os.open(f'/proc/self/fd/{fd}', os.O_RDWR))\n"
                "    attempt('truncate_reopened', lambda: os.truncate(f'/proc/self/fd/{fd}', 0))\n"
                "except OSError:\n"
                "    res['truncate_reopened'] = 'no reopen'\n"
                "res['size'] = os.fstat(fd).st_size\n",
                fd,
            )
        finally:
            os.close(fd)
        for name in ("truncate_zero", "truncate_by_a_page", "truncate_to_one_chunk"):
            assert res[name] != "ok", f"{name} succeeded: {res}"
            if not readonly:
                assert res[name] == 1, res  # EPERM: F_SEAL_SHRINK
        assert res["collapse_range"] != "ok", res
        assert res["truncate_reopened"] != "ok", res
        assert res["size"] == size
        _unchanged(mf, fr, data, size)


async def test_readwrite_share_cannot_seal_the_file_against_the_allocator() -> None:
    async with open_memory_file(opts=OPTS) as mf:
        fr, data = await _populated(mf)
        size = mf.total_size()
        fd = mf.share(readonly=False)
        try:
            res = _child(
                f"fd = {fd}\n"
                "attempt('seal_grow', lambda: fcntl.fcntl(fd, fcntl.F_ADD_SEALS,\n"
                "        fcntl.F_SEAL_GROW))\n"
                "attempt('seal_future_write', lambda: fcntl.fcntl(fd, fcntl.F_ADD_SEALS,\n"
                "        getattr(fcntl, 'F_SEAL_FUTURE_WRITE', 16)))\n",
                fd,
            )
        finally:
            os.close(fd)
        assert res["seal_grow"] != "ok" and res["seal_future_write"] != "ok", res
        _unchanged(mf, fr, data, size)
        mf.allocate(4 * H)  # the allocator can still grow the file


# ------------------------------------------------------------------- figures


def test_security_figures(capsys: pytest.CaptureFixture[str]) -> None:
    """Runs after every other test of the module."""
    if not FIGURES and not CHILD_CHECKS:
        pytest.skip("no security test ran")
    cycles = sum(f["cycles"] for f in FIGURES.values())
    if len(FIGURES) == 3:
        assert cycles >= CYCLES_TOTAL
    with capsys.disabled():
        print(
            f"\n[security] {cycles} allocate/fill/free cycles on {len(FIGURES)} backend(s) "
            f"({sum(f['recycled'] for f in FIGURES.values())} on recycled pages, "
            f"{sum(f['released'] for f in FIGURES.values())} on released pages), "
            f"old contents seen: 0; {CHILD_CHECKS.get('children', 0)} child processes "
            f"tried {CHILD_CHECKS.get('attempts', 0)} fd checks; profile "
            f"{'long' if FUZZ_LONG else 'ci'}"
        )
