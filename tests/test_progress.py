"""Progress of long commands off a terminal, and an interrupted replay that resumes.

``replay`` and ``simulate --out`` show a bar on a terminal and plain log lines otherwise; a
replay stopped by SIGINT says what it committed, exits 130, and a second run finishes the
table with every tick once.
"""

from __future__ import annotations

import logging
import queue
import re
import signal
import subprocess
import threading
import time

import psycopg
import pytest

from daemon_harness import ingestor
from ingestor import _core
from ingestor.pipeline.batch import decode_capture
from ingestor.progress import Progress
from ingestor.sim.market import generate_capture
from ingestor.store.offsets import committed

LINE = re.compile(r"INFO ingestor\.progress: replay big\.cap: [\d.]+% of [\d.]+ ?[kMG]?i?B, "
                  r"[\d,]+ ticks/s, ETA ")


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """A capture of several read chunks (4 MiB each): full packets, 184 bytes a tick."""
    path = tmp_path_factory.mktemp("cap") / "big.cap"
    generate_capture(path, ticks=150_000, tokens=200, mode="full", seed=5)
    return path


def _ticks(path) -> int:
    dec = _core.KiteDecoder(capacity=1 << 16)
    return sum(dec.n_ticks for _ in decode_capture(path, dec))


def test_progress_log_lines_say_share_rate_eta_and_note(caplog):
    caplog.set_level(logging.INFO, "ingestor.progress")
    p = Progress("job", 1000, unit="ticks", mode="log", every=0.0)
    p.update(250, 250, "committed 200 ticks")
    p.update(1000, 1000)
    p.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "ingestor.progress"]
    assert len(lines) == 2
    assert lines[0].startswith("job: 25.0%, ") and "ticks/s, ETA " in lines[0]
    assert lines[0].endswith("; committed 200 ticks")
    assert lines[1].startswith("job: 100.0%, ") and "ETA 00:00" in lines[1]


def test_progress_off_is_silent(caplog, capsys):
    caplog.set_level(logging.INFO, "ingestor.progress")
    with Progress("job", 10, mode="off", every=0.0) as p:
        p.update(5, 5)
    assert not caplog.records and capsys.readouterr().err == ""


def test_replay_off_a_terminal_logs_progress_lines_without_escapes(db, big):
    r = subprocess.run(ingestor("replay", str(big), "--dsn", db, "--flush-rows", "20000",
                                "--progress-every", "0.001"),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if "ingestor.progress" in ln]
    assert len(lines) >= 2, r.stderr  # one per chunk read at this interval
    assert all(LINE.search(ln) for ln in lines), lines
    assert any("committed " in ln and "ticks, up to seq " in ln for ln in lines), lines
    assert "\x1b" not in r.stderr and "\r" not in r.stderr


def test_simulate_out_off_a_terminal_logs_progress(tmp_path):
    out = tmp_path / "s.cap"
    r = subprocess.run(ingestor("simulate", "--out", str(out), "--ticks", "50000",
                                "--progress-every", "0.001"),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if "ingestor.progress" in ln]
    assert lines and all(re.search(r"simulate s\.cap: [\d.]+%, [\d,]+ ticks/s, ETA ", ln)
                         for ln in lines), r.stderr
    assert "\x1b" not in r.stderr and "\r" not in r.stderr


def _lines(stream, q: queue.Queue) -> None:
    for ln in stream:
        q.put(ln)
    q.put(None)


def test_interrupted_replay_says_what_it_committed_and_resumes(db, tmp_path):
    cap = tmp_path / "long.cap"
    generate_capture(cap, ticks=400_000, tokens=300, mode="full", seed=9)
    # small transactions: commits come early and the whole replay takes a while
    proc = subprocess.Popen(ingestor("replay", str(cap), "--dsn", db, "--flush-rows", "2000",
                                     "--progress-every", "0.05"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    q: queue.Queue = queue.Queue()
    threading.Thread(target=_lines, args=(proc.stderr, q), daemon=True).start()
    seen = []
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            ln = q.get(timeout=max(0.01, deadline - time.monotonic()))
            assert ln is not None, "replay ended before it committed anything: " + "".join(seen)
            seen.append(ln)
            if "up to seq " in ln:
                break
        else:
            pytest.fail("no commit within 120 s: " + "".join(seen))
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    while (ln := q.get(timeout=10)) is not None:
        seen.append(ln)
    err = "".join(seen)
    assert rc == 130, err
    m = re.search(r"interrupted: stream (\S+) committed up to sequence number (\d+) "
                  r"\(([\d,]+) ticks written by this run\); replaying it again resumes there",
                  err)
    assert m, err
    with psycopg.connect(db) as conn:
        assert committed(conn, m.group(1)) == int(m.group(2))
        written = conn.execute("select count(*) from tick_data").fetchone()[0]
    total = _ticks(cap)
    assert 0 < written < total  # interrupted mid-way, what it said is in the table

    again = subprocess.run(ingestor("replay", str(cap), "--dsn", db, "--flush-rows", "2000",
                                    "--no-progress"),
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert "skipped" in again.stdout  # it resumed: what was committed is not written again
    with psycopg.connect(db) as conn:
        # (instrument_id, time) is the key: a tick written twice could not be there twice
        assert conn.execute("select count(*) from tick_data").fetchone()[0] == total
