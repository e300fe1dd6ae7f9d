"""The gate of the fault-injection seam: a call of a host operation waits at
it until the test opens it, so a race can be replayed step by step."""

from __future__ import annotations

import os
import threading

import pytest

from aiopgalloc.host import memfd, syscalls
from aiopgalloc.host.faults import faults


def test_gate_holds_one_call_until_opened() -> None:
    fd = memfd.create_memfd()
    try:
        os.ftruncate(fd, 1 << 20)
        done = threading.Event()

        def punch() -> None:
            syscalls.punch_hole(fd, 0, 4096)
            done.set()

        with faults.gated("fallocate") as gate:
            t = threading.Thread(target=punch)
            t.start()
            assert gate.wait_reached(5.0)
            assert gate.reached
            # Held: the call has not returned, and the gate left the table,
            # so another call of the same op passes at once.
            assert not done.wait(0.05)
            assert "fallocate" not in faults.armed()
            syscalls.punch_hole(fd, 4096, 4096)
            gate.open()
            t.join(5.0)
        assert done.is_set()
    finally:
        os.close(fd)


def test_gate_not_reached_is_disarmed_on_exit() -> None:
    with faults.gated("lseek") as gate:
        assert "lseek" in faults.armed()
    assert not gate.reached
    assert "lseek" not in faults.armed()
    assert not gate.wait_reached(0.01)


def test_gate_rejects_unknown_op() -> None:
    with pytest.raises(ValueError, match="unknown fault-injection op"):
        faults.gate("write")


def test_gate_replaces_an_armed_fault_and_injects_nothing() -> None:
    fd = memfd.create_memfd()
    try:
        faults.inject("fstat", 5)
        with faults.gated("fstat") as gate:
            gate.open()  # opened before it is reached: the call passes
            assert syscalls.fstat_blocks_bytes(fd) == 0
            assert gate.reached
        assert faults.calls("fstat") == 0
    finally:
        faults.reset()
        os.close(fd)
