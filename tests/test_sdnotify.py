"""Readiness notification (``Type=notify``): the daemon tells systemd ``READY=1`` once it is
receiving, ``STOPPING=1`` when it drains, and pings ``WATCHDOG=1`` when asked to.

The tests own the notification socket: a Unix datagram socket whose path they hand the
daemon as ``NOTIFY_SOCKET``, as systemd does.
"""

from __future__ import annotations

import csv
import os
import signal
import socket
import tempfile
import time

import pytest

from daemon_harness import Daemon, Simulator, free_port, load_instruments
from ingestor.sdnotify import Notifier


class NotifySocket:
    """What a service sent to ``$NOTIFY_SOCKET``: one dict of KEY=VALUE lines per datagram."""

    def __init__(self):
        # a short path: sun_path holds 108 bytes, a pytest tmp_path can be longer
        self.dir = tempfile.mkdtemp(prefix="ntf")
        self.path = os.path.join(self.dir, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.messages: list[dict[str, str]] = []

    def wait_for(self, key: str, value: str = "1", timeout: float = 60) -> dict[str, str]:
        """The first datagram carrying KEY=value (read in order; a deadline, not a sleep)."""
        for m in self.messages:
            if m.get(key) == value:
                return m
        end = time.monotonic() + timeout
        while (left := end - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                break
            m = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append(m)
            if m.get(key) == value:
                return m
        raise AssertionError(f"no {key}={value} in {timeout} s; got {self.messages}")

    def keys(self) -> list[str]:
        return [k for m in self.messages for k in m if k in ("READY", "STOPPING")]

    def close(self) -> None:
        self.sock.close()
        os.unlink(self.path)
        os.rmdir(self.dir)


@pytest.fixture
def notify_socket():
    s = NotifySocket()
    yield s
    s.close()


def test_notifier_without_socket_does_nothing():
    n = Notifier({})
    assert not n.enabled and n.notify("READY=1") is False and n.watchdog_interval is None


def test_notifier_sends_datagrams_and_reads_the_watchdog(notify_socket):
    n = Notifier({"NOTIFY_SOCKET": notify_socket.path, "WATCHDOG_USEC": "4000000",
                  "WATCHDOG_PID": str(os.getpid())})
    assert n.watchdog_interval == 2.0
    n.set_ready("receiving")
    n.set_ready("again")                          # READY=1 is said once
    n.set_status("receiving")                     # unchanged: not sent
    n.set_status("database away: spooling")
    n.stopping()
    got = [notify_socket.wait_for("READY"), notify_socket.wait_for("STATUS", "database away: "
                                                                   "spooling"),
           notify_socket.wait_for("STOPPING")]
    assert got[0]["STATUS"] == "receiving"
    assert notify_socket.keys() == ["READY", "STOPPING"]
    assert len(notify_socket.messages) == 3
    # another process's watchdog settings are not ours
    assert Notifier({"NOTIFY_SOCKET": notify_socket.path, "WATCHDOG_USEC": "4000000",
                     "WATCHDOG_PID": "1"}).watchdog_interval is None


def test_notifier_failure_is_logged_once_and_never_raised(tmp_path, caplog):
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "absent")})
    assert n.notify("READY=1") is False and n.notify("STOPPING=1") is False
    assert sum("systemd notification failed" in r.message for r in caplog.records) == 1


def test_abstract_socket_address():
    assert Notifier({"NOTIFY_SOCKET": "@ingestor-test"}).address == "\0ingestor-test"
    assert Notifier({"NOTIFY_SOCKET": "relative/path"}).enabled is False


def test_daemon_says_ready_when_receiving_then_stopping(tmp_path, db, notify_socket):
    """READY=1 once the feed connection receives (with the database connected), WATCHDOG=1
    while it runs, STOPPING=1 at SIGTERM, then a clean exit."""
    sim = Simulator(tmp_path, tokens=10, rate=1000)
    load_instruments(db, sim.csv)
    d = Daemon(tmp_path, db, sim.url, env={"NOTIFY_SOCKET": notify_socket.path,
                                           "WATCHDOG_USEC": "400000"})
    try:
        ready = notify_socket.wait_for("READY")
        assert ready["STATUS"] == "receiving on 1 of 1 connection(s); database connected", ready
        notify_socket.wait_for("WATCHDOG")
        assert d.terminate() == 0, d.output()
    finally:
        if d.proc.poll() is None:
            d.kill()
        sim.stop()
    stopping = notify_socket.wait_for("STOPPING")
    assert stopping["STATUS"].startswith("stopping (SIGTERM)")
    assert notify_socket.keys() == ["READY", "STOPPING"]


def test_daemon_with_the_database_away_is_ready_and_spooling(tmp_path, notify_socket):
    """The database away at start: the daemon receives into its spool, and says so; READY=1
    is not held back (a database outage is what the spool is for)."""
    sim = Simulator(tmp_path, tokens=10, rate=1000)
    dsn = f"host=127.0.0.1 port={free_port()} dbname=none user=none connect_timeout=1"
    with open(sim.csv) as f:  # subscriptions given: none can come from the database
        tokens = [int(r["instrument_token"]) for r in csv.DictReader(f)]
    d = Daemon(tmp_path, dsn, sim.url, feed=f"tokens = {tokens}\n",
               env={"NOTIFY_SOCKET": notify_socket.path})
    try:
        ready = notify_socket.wait_for("READY")
        assert ready["STATUS"] == "receiving on 1 of 1 connection(s); database away: spooling"
        d.proc.send_signal(signal.SIGTERM)
        notify_socket.wait_for("STOPPING")
        d.proc.wait(timeout=60)
    finally:
        if d.proc.poll() is None:
            d.kill()
        sim.stop()
    assert "WATCHDOG" not in {k for m in notify_socket.messages for k in m}
