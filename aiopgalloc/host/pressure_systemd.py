"""systemd's memory-pressure protocol (``$MEMORY_PRESSURE_WATCH`` and
``$MEMORY_PRESSURE_WRITE``) as a pressure source.

The service manager tells a service what to watch (normally the unit's
``memory.pressure``) and what to write to it first (normally a PSI trigger,
base64-encoded).  A FIFO or a socket signals with POLLIN instead of
POLLPRI; ``/dev/null`` means memory-pressure handling was switched off for
the service.  Re-exported by :mod:`aiopgalloc.host.pressure`.
"""

from __future__ import annotations

import base64
import binascii
import os
import socket
import stat
from collections.abc import Mapping
from pathlib import Path

from .epoll import EPOLLPRI, EpollWaiter, count_pri_wake, drain_stream
from .pressure_sources import PressureLevel, PressureSourceBase, with_context

__all__ = ["SystemdPressureWatch", "parse_systemd_environ"]


def parse_systemd_environ(environ: Mapping[str, str]) -> tuple[str, bytes | None] | None:
    """Read ``$MEMORY_PRESSURE_WATCH`` and ``$MEMORY_PRESSURE_WRITE``.

    Returns ``None`` when the watch variable is unset or empty, otherwise the
    path (``"/dev/null"`` included, the caller decides) and the decoded write
    bytes (``None`` when unset or empty).  Raises ``ValueError`` for a write
    value that is not base64.  Pure.
    """
    watch = environ.get("MEMORY_PRESSURE_WATCH", "").strip()
    if not watch:
        return None
    raw = environ.get("MEMORY_PRESSURE_WRITE", "").strip()
    if not raw:
        return watch, None
    try:
        return watch, base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"MEMORY_PRESSURE_WRITE is not valid base64: {raw!r}") from exc


class SystemdPressureWatch(PressureSourceBase):
    """systemd's memory-pressure protocol: watch what the service manager
    names in ``$MEMORY_PRESSURE_WATCH``.

    A regular or kernfs file (normally the unit's ``memory.pressure``) is
    opened, ``write`` is written to it (normally a PSI trigger) and it is
    watched for POLLPRI, with the same rules as :class:`PsiTrigger`.  An
    ``AF_UNIX`` stream socket is connected (a blocking connect, immediate for
    a listening local socket), ``write`` is sent to it, and it is watched for
    POLLIN; a peer that closes ends iteration with
    :class:`PressureSourceGone`.  A FIFO is watched for POLLIN and opened
    read-write, so a departing writer does not leave it reporting hang-up
    forever; ``write`` is not written to a FIFO, since we would read our own
    bytes back as an event.  For sockets and FIFOs the count of an event is
    the number of bytes drained.  Every event has the fixed ``level``.
    Build it from the environment with :meth:`from_environ`.
    """

    def __init__(
        self,
        path: str | Path,
        write: bytes | None = None,
        *,
        level: PressureLevel = PressureLevel.LOW,
        min_interval: float = 0.0,
        name: str | None = None,
    ) -> None:
        self.path = Path(path)
        self.write = write or None
        self.level = PressureLevel(level)
        super().__init__(name or f"systemd:{self.path}", min_interval=min_interval)
        self._ep: EpollWaiter | None = None
        self._stream_fd = -1
        self._sock: socket.socket | None = None

    @classmethod
    def from_environ(
        cls,
        environ: Mapping[str, str] | None = None,
        *,
        level: PressureLevel = PressureLevel.LOW,
        min_interval: float = 0.0,
        name: str | None = None,
    ) -> SystemdPressureWatch | None:
        """Build the source from the environment (default ``os.environ``).

        ``None`` when ``$MEMORY_PRESSURE_WATCH`` is unset, empty or
        ``/dev/null`` (pressure handling disabled).  The keyword arguments go
        to the constructor.  Raises ``ValueError`` for bad base64.
        """
        parsed = parse_systemd_environ(os.environ if environ is None else environ)
        if parsed is None or parsed[0] == "/dev/null":
            return None
        return cls(parsed[0], parsed[1], level=level, min_interval=min_interval, name=name)

    def _setup(self) -> int:
        self._ep, self._sock, self._stream_fd = None, None, -1
        try:
            mode = os.stat(self.path).st_mode
            if stat.S_ISSOCK(mode):
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self._own_fd(sock.fileno(), sock.close)
                sock.connect(os.fspath(self.path))
                if self.write:
                    sock.sendall(self.write)
                sock.setblocking(False)
                self._sock, self._stream_fd = sock, sock.fileno()
                return self._stream_fd
            flags = os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
            if stat.S_ISFIFO(mode):
                fd = self._own_fd(os.open(self.path, flags | os.O_RDWR))
                self._stream_fd = fd
                return fd
            fd = self._own_fd(
                os.open(self.path, flags | (os.O_RDWR if self.write else os.O_RDONLY))
            )
            if self.write:
                os.write(fd, self.write)
            self._ep = self._own_epoll()
            self._ep.register(fd, EPOLLPRI)
            return self._ep.fileno()
        except OSError as exc:
            raise with_context(exc, "cannot watch MEMORY_PRESSURE_WATCH", self.path) from exc

    def _collect(self, woken: bool) -> tuple[int, int]:
        if self._ep is not None:
            n = count_pri_wake(self._ep, woken, f"pressure file {self.path}")
        else:
            n = drain_stream(self._stream_fd, str(self.path))
        return (self.level, n) if n else (0, 0)
