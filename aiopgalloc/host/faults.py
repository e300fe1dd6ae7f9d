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
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass

__all__ = ["OPS", "FaultInjector", "faults"]

OPS: frozenset[str] = frozenset(
    {"fallocate", "mmap", "ftruncate", "mincore", "madvise", "fstat", "memset", "lseek"}
)
"""The operation names a fault can be injected into."""


@dataclass
class _Rule:
    """One armed fault: the errno to raise, calls to let through, failures left."""

    err: int
    skip: int
    remaining: int | None


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
        self._armed: dict[str, _Rule] = {}
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
            if rule.skip > 0:
                rule.skip -= 1
                return
            if rule.remaining is not None:
                rule.remaining -= 1
                if rule.remaining <= 0:
                    del self._armed[op]
            self._fired[op] += 1
            err = rule.err
        raise OSError(err, os.strerror(err))

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
