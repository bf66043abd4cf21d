"""systemd's service notification protocol (``sd_notify(3)``): readiness, stopping, watchdog.

Under ``Type=notify`` systemd passes ``$NOTIFY_SOCKET``, a Unix datagram socket (a path,
or ``@name`` in the abstract namespace); the service sends it newline-separated
``KEY=VALUE`` lines: ``READY=1``, ``STOPPING=1``, ``STATUS=...``, ``WATCHDOG=1``.  Without the
variable every call does nothing, so the daemon runs the same outside systemd.

Written here rather than taken from a package: the protocol is one datagram, stable and
documented; ``sdnotify`` has had no release since 2017, ``systemd-python`` builds against
libsystemd's headers at install time, and ``cysystemd`` is a binary wrapper of libsystemd
(journal, daemon, ...) for what is a ``sendto``.

A failed send is logged once and otherwise ignored: a notification must never stop the
daemon.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


class Notifier:
    """``notify("READY=1", "STATUS=...")``; ``watchdog_interval``: seconds between
    ``WATCHDOG=1`` pings (half of ``$WATCHDOG_USEC``), or None when systemd asked for none."""

    def __init__(self, environ: dict | None = None):
        env = os.environ if environ is None else environ
        addr = env.get("NOTIFY_SOCKET", "")
        self.address: str | None = None
        if addr.startswith("@"):
            self.address = "\0" + addr[1:]  # the abstract namespace
        elif addr.startswith("/"):
            self.address = addr
        self.watchdog_interval: float | None = None
        usec, pid = env.get("WATCHDOG_USEC", ""), env.get("WATCHDOG_PID", "")
        if self.address and usec.isdigit() and int(usec) > 0 and (
                not pid or pid == str(os.getpid())):
            self.watchdog_interval = int(usec) / 2e6
        self._sock: socket.socket | None = None
        self._failed = False
        #: what was said last (READY=1 once; STATUS only when it changes)
        self.ready = False
        self.status: str | None = None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *lines: str) -> bool:
        if self.address is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto("\n".join(lines).encode(), self.address)
            return True
        except OSError as exc:
            if not self._failed:
                self._failed = True
                log.warning("systemd notification failed (%s); the daemon goes on without it",
                            exc.strerror or exc)
            return False

    def set_ready(self, status: str) -> None:
        """``READY=1`` once, with a status line."""
        if not self.ready:
            self.ready = True
            self.status = status
            self.notify("READY=1", f"STATUS={status}")

    def set_status(self, status: str) -> None:
        if status != self.status:
            self.status = status
            self.notify(f"STATUS={status}")

    def stopping(self, status: str = "stopping: draining the spool") -> None:
        self.status = status
        self.notify("STOPPING=1", f"STATUS={status}")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
