"""The fault-injection seam of the host layer.

Every wrapper in ``aiopgalloc.host`` that performs a system call first calls
``faults.check(op)``.  Normally nothing is armed and that call costs one method
call plus one dict truthiness test (well under a microsecond), so production
code pays nothing worth measuring.  Tests arm an operation with
``faults.inject(op, errno)`` (or the ``faults.injected(...)`` context manager)
and the next calls of that operation raise ``OSError(errno, strerror)`` exactly
as a failing kernel call would, without mocks and without touching the real
syscall path.

Operation names: ``fallocate``, ``mmap``, ``ftruncate``, ``mincore``,
``madvise``, ``fstat``, ``memset`` and ``lseek`` (the ``SEEK_DATA`` /
``SEEK_HOLE`` walk of ``syscalls.data_ranges``).

Races are made deterministic the same way: ``faults.gate(op)`` arms a
``Gate`` at which the next call of ``op`` stops, on whatever thread makes it,
until the test opens it.  Meanwhile the test does what must happen "during"
the call (close the file, free the pages, allocate them again), then lets
the call go on and checks what it did.  A gate never changes what the call
does once opened.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass

__all__ = ["OPS", "FaultInjector", "Gate", "faults"]

OPS: frozenset[str] = frozenset(
    {"fallocate", "mmap", "ftruncate", "mincore", "madvise", "fstat", "memset", "lseek", "pressure"}
)
"""The operation names a fault can be injected into.  ``pressure`` is the
set-up of a memory-pressure source while one is chosen (each candidate's
probe), which happens only when a file opens."""


@dataclass
class _Rule:
    """One armed fault: the errno to raise, calls to let through, failures left."""

    err: int
    skip: int
    remaining: int | None


class Gate:
    """Where a call of one host operation waits until the test lets it go.

    Made by :meth:`FaultInjector.gate`.  The first call of the operation that
    reaches the gate blocks (its thread waits on an event) before making its
    system call; later calls pass freely.  Thread-safe.
    """

    def __init__(self, op: str) -> None:
        self.op = op
        """The operation this gate holds."""
        self._reached = threading.Event()
        self._opened = threading.Event()

    @property
    def reached(self) -> bool:
        """Whether a call has arrived at the gate (and is held, unless opened)."""
        return self._reached.is_set()

    def wait_reached(self, timeout: float | None = 10.0) -> bool:
        """Block until a call has arrived at the gate; return False if
        ``timeout`` seconds passed first.  Do not call it from the thread
        that will make the call (it would wait for itself)."""
        return self._reached.wait(timeout)

    def open(self) -> None:
        """Let the held call (and every later one) through.  Idempotent."""
        self._opened.set()

    def _arrive(self) -> None:
        self._reached.set()
        self._opened.wait()


def _validate_op(op: str) -> None:
    if op not in OPS:
        raise ValueError(f"unknown fault-injection op {op!r}; expected one of {sorted(OPS)}")


class FaultInjector:
    """Makes chosen host operations fail on demand, for tests.

    Thread-safe: arming, clearing and firing are serialised by one
    ``threading.Lock``; the unarmed fast path of :meth:`check` takes no lock.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # op -> rule; empty whenever nothing is armed, which is what the fast
        # path of check() tests.
        self._armed: dict[str, _Rule | Gate] = {}
        self._fired: dict[str, int] = dict.fromkeys(OPS, 0)

    def inject(self, op: str, err: int, *, times: int | None = None, after: int = 0) -> None:
        """Arm ``op`` so that its calls raise ``OSError(err, os.strerror(err))``.

        The first ``after`` calls still succeed; then ``times`` calls fail
        (``None``: every call until :meth:`clear`).  Arming replaces any rule
        already armed for ``op`` and resets its :meth:`calls` counter to zero.

        Raises ``ValueError`` for an unknown op, ``err <= 0``, ``times < 1`` or
        ``after < 0``.
        """
        _validate_op(op)
        if err <= 0:
            raise ValueError(f"errno must be positive, got {err}")
        if times is not None and times < 1:
            raise ValueError(f"times must be None or >= 1, got {times}")
        if after < 0:
            raise ValueError(f"after must be >= 0, got {after}")
        with self._lock:
            self._armed[op] = _Rule(err=err, skip=after, remaining=times)
            self._fired[op] = 0

    def clear(self, op: str | None = None) -> None:
        """Disarm ``op``, or every op when ``op`` is None.

        The :meth:`calls` counters are kept, so a test can clear and then
        assert.  Raises ``ValueError`` for an unknown op.
        """
        if op is not None:
            _validate_op(op)
        with self._lock:
            if op is None:
                self._armed.clear()
            else:
                self._armed.pop(op, None)

    def check(self, op: str) -> None:
        """Raise the injected ``OSError`` if ``op`` is armed and due to fail.

        Called by every host wrapper before its system call.  Cost when
        nothing at all is armed: one dict truthiness test.  An unknown op name
        raises ``ValueError``, but only detected while some op is armed (the
        fast path does not look at the name).
        """
        if not self._armed:
            return
        self._check_armed(op)

    def _check_armed(self, op: str) -> None:
        with self._lock:
            rule = self._armed.get(op)
            if rule is None:
                _validate_op(op)
                return
            if isinstance(rule, Gate):
                # One call stops at a gate; it leaves the table, so later
                # calls (and the held one, once opened) pass.
                del self._armed[op]
            else:
                if rule.skip > 0:
                    rule.skip -= 1
                    return
                if rule.remaining is not None:
                    rule.remaining -= 1
                    if rule.remaining <= 0:
                        del self._armed[op]
                self._fired[op] += 1
        if isinstance(rule, Gate):
            rule._arrive()  # outside the lock: the test arms and clears meanwhile
            return
        raise OSError(rule.err, os.strerror(rule.err))

    def gate(self, op: str) -> Gate:
        """Arm a :class:`Gate` for ``op``: its next call waits at the gate
        until ``gate.open()``.  Replaces any rule armed for ``op``.  Use it
        through :meth:`gated` so that the gate is always opened.  Raises
        ``ValueError`` for an unknown op."""
        _validate_op(op)
        gate = Gate(op)
        with self._lock:
            self._armed[op] = gate
        return gate

    @contextlib.contextmanager
    def gated(self, op: str) -> Iterator[Gate]:
        """``with faults.gated("fallocate") as gate:``: arm a gate for the
        body; on exit the gate is opened (a held call goes on) and disarmed
        if no call reached it."""
        gate = self.gate(op)
        try:
            yield gate
        finally:
            gate.open()
            with self._lock:
                if self._armed.get(op) is gate:
                    del self._armed[op]

    @contextlib.contextmanager
    def injected(
        self, op: str, err: int, *, times: int | None = None, after: int = 0
    ) -> Iterator[None]:
        """Arm ``op`` as :meth:`inject` does for the body of a ``with`` block.

        On exit ``op`` is cleared (even if the body raised); its :meth:`calls`
        count stays readable.  Raises what :meth:`inject` raises.
        """
        self.inject(op, err, times=times, after=after)
        try:
            yield
        finally:
            self.clear(op)

    def calls(self, op: str) -> int:
        """Return how many injected failures of ``op`` have fired.

        Counted since ``op`` was last armed with :meth:`inject` /
        :meth:`injected` (0 if never).  Raises ``ValueError`` for an unknown op.
        """
        _validate_op(op)
        with self._lock:
            return self._fired[op]

    def armed(self) -> frozenset[str]:
        """Return the ops currently armed (for test hygiene checks)."""
        with self._lock:
            return frozenset(self._armed)

    def reset(self) -> None:
        """Disarm every op and zero every :meth:`calls` counter."""
        with self._lock:
            self._armed.clear()
            self._fired = dict.fromkeys(OPS, 0)


faults: FaultInjector = FaultInjector()
"""The process-wide injector consulted by every host wrapper."""
