"""A committing allocation inside a small memory cgroup, run by
tests/test_commit_headroom.py.

    python tests/headroom_child.py --cgroup DIR --backend asyncio|asyncio+uvloop|trio
        --mode fallocate|populate --request-mib N [--then-mib M]

1. imports everything first (so the interpreter's own memory stays charged
   to the cgroup it started in), resolves its memory cgroup once (so the
   library's cached answer is stale after the move), then moves itself into
   the memory cgroup ``DIR`` (``cgroup.procs``);
2. opens a memory file on the chosen event loop and asks for ``N`` MiB
   committed with the chosen ``CommitMode``;
3. records what happened: the errno if ``allocate`` raised ``OSError``,
   whether the allocator's state (``check_invariants``, ``total_usage``,
   ``str``) is the same as before the call, and the committed bytes;
   With ``--fault-after K`` the commit's system call (``fallocate`` or
   ``madvise``) fails with ``EIO`` at its ``K+1``-th call, once, through
   ``aiopgalloc.host.faults``: a failure after part of the range was
   committed;
4. with ``--then-mib M``, allocates ``M`` MiB more with the same mode and
   records the committed bytes again (the process is still usable);
5. prints one JSON line (``"done": true``) and exits 0.  Any unexpected
   error: a JSON line with ``"error"`` and exit status 1.  If the kernel's
   OOM killer ends the process, nothing is printed and the status is -9.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

import anyio

from aiopgalloc import CommitMode, MemoryFile, open_memory_file
from aiopgalloc.host.cgroup import current_memory_cgroup, memory_cgroup_levels, move_pid
from aiopgalloc.host.faults import faults

MIB = 1 << 20
MODES = {"fallocate": CommitMode.FALLOCATE, "populate": CommitMode.POPULATE}


def emit(doc: dict[str, Any]) -> None:
    """One JSON document per line on stdout, flushed at once."""
    sys.stdout.write(json.dumps(doc) + "\n")
    sys.stdout.flush()


def snapshot(mf: MemoryFile) -> tuple[int, str]:
    """The allocator's observable state, after checking its invariants."""
    mf.check_invariants()
    return mf.total_usage(), repr(mf.page_map())


def attempt(mf: MemoryFile, length: int, mode: CommitMode) -> dict[str, Any]:
    """Allocate ``length`` committed bytes; say what happened."""
    before = snapshot(mf)
    out: dict[str, Any] = {"length": length, "usage_before": before[0]}
    try:
        fr = mf.allocate(length, commit=mode)
    except OSError as exc:
        after = snapshot(mf)
        out.update(
            ok=False,
            errno=exc.errno,
            message=str(exc),
            usage_after=after[0],
            state_unchanged=after == before,
        )
        return out
    after = snapshot(mf)
    out.update(ok=True, range=[fr.start, fr.end], usage_after=after[0])
    return out


async def run(mode: CommitMode, request: int, then: int, fault_after: int) -> dict[str, Any]:
    """Steps 2 to 4 above; returns the result document."""
    op = "fallocate" if mode is CommitMode.FALLOCATE else "madvise"
    async with open_memory_file() as mf:
        if fault_after >= 0:
            with faults.injected(op, errno.EIO, times=1, after=fault_after):
                first = attempt(mf, request, mode)
            first["faults_fired"] = faults.calls(op)
        else:
            first = attempt(mf, request, mode)
        second = attempt(mf, then, mode) if then else None
        cg = current_memory_cgroup()
        return {
            "done": True,
            "pid": os.getpid(),
            "cgroup": str(cg.path) if cg else None,
            "first": first,
            "then": second,
        }


def main() -> int:
    """Parse the arguments, join the cgroup, run, report."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cgroup", type=Path, required=True, help="memory cgroup to join first")
    ap.add_argument("--backend", choices=["asyncio", "asyncio+uvloop", "trio"], default="asyncio")
    ap.add_argument("--mode", choices=sorted(MODES), required=True)
    ap.add_argument("--request-mib", type=int, required=True)
    ap.add_argument("--then-mib", type=int, default=0)
    ap.add_argument("--fault-after", type=int, default=-1)
    args = ap.parse_args()
    backend, options = args.backend, {}
    if backend == "asyncio+uvloop":
        import uvloop  # noqa: F401  (imported before joining the cgroup)

        backend, options = "asyncio", {"use_uvloop": True}
    elif backend == "trio":
        import trio  # noqa: F401
    try:
        levels_before = memory_cgroup_levels()
        move_pid(args.cgroup, os.getpid())
        result = anyio.run(
            run,
            MODES[args.mode],
            args.request_mib * MIB,
            args.then_mib * MIB,
            args.fault_after,
            backend=backend,
            backend_options=options,
        )
    except BaseException as exc:
        emit({"error": repr(exc), "traceback": traceback.format_exc()})
        return 1
    result["levels_before_move"] = None if levels_before is None else str(levels_before[1][0])
    levels_after = memory_cgroup_levels()
    result["levels_after_move"] = None if levels_after is None else str(levels_after[1][0])
    emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
